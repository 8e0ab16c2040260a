"""StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks")."""

from __future__ import annotations

import torch

from ..scoring import KeyScorer
from .base import Policy, register


@register
class StreamingLLM(Policy):
    """Attention sinks plus the most recent tokens: scores rise with position, so the top are the newest."""

    name = "streamingllm"

    def scorer(self, run):
        n = run.num_prompt

        def recency(keys):
            order = torch.arange(n, device=keys.device, dtype=torch.float32)
            return order.expand(keys.shape[0], keys.shape[1], n)

        return KeyScorer(recency)
