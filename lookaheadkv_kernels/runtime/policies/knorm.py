"""KNorm (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression")."""

from __future__ import annotations

from ..scoring import KeyScorer
from .base import Policy, register


@register
class KNorm(Policy):
    """Keep the keys of smallest L2 norm (kvpress KnormPress: low-norm keys draw the most attention)."""

    name = "knorm"

    def scorer(self, run):
        n = run.num_prompt
        return KeyScorer(lambda keys: -keys[:, :, :n].float().norm(dim=-1))
