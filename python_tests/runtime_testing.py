"""Helpers shared by the runtime and evaluation tests."""

import torch

from lookaheadkv_kernels.runtime import LookaheadModule


def trained_looking(model, seed=3, **kwargs):
    """A lookahead module whose LoRA B is non-zero, as after training (fresh modules start at B = 0)."""
    module = LookaheadModule(model, seed=seed, **kwargs)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("_b"):
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    return module
