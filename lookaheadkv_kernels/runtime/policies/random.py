"""Random scores: the floor every other policy must beat."""

from __future__ import annotations

import torch

from ..scoring import KeyScorer
from .base import DEFAULT_NUM_SINK, Policy, register


@register
class RandomPolicy(Policy):
    """Uniformly random scores from a generator seeded with `seed` at every run."""

    name = "random"

    def __init__(self, seed: int = 0, num_sink: int = DEFAULT_NUM_SINK):
        super().__init__(num_sink)
        self.seed = seed

    def scorer(self, run):
        generator = torch.Generator().manual_seed(self.seed)
        n = run.num_prompt

        def uniform(keys):
            return torch.rand(keys.shape[0], keys.shape[1], n, generator=generator).to(keys.device)

        return KeyScorer(uniform)
