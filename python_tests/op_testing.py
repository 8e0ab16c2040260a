"""Shared by the op tests: which (backend, device) pairs to run, tolerances, inputs."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from lookaheadkv_kernels.ops import dispatch

HAS_CUDA = torch.cuda.is_available()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def backend_cases():
    """(backend, device) pairs the op tests run. The CPU module is always built, so its absence is
    a failure, not a skip; Triton runs wherever it is installed (interpreter on CPU); CUDA needs a GPU."""
    cases = [("reference", "cpu"), ("cpu", "cpu")]
    if importlib.util.find_spec("triton") is not None:
        cases.append(("triton", "cuda" if HAS_CUDA else "cpu"))
    if HAS_CUDA:
        cases.append(("cuda", "cuda"))
    only = os.environ.get("LOOKAHEADKV_TEST_BACKENDS")  # e.g. "cuda,triton" on the GPU machine
    if only:
        cases = [c for c in cases if c[0] in only.split(",")]
    return [pytest.param(b, d, id=f"{b}-{d}") for b, d in cases]


def require(backend, device):
    reason = dispatch.unavailable_reason(backend, torch.device(device))
    if reason is not None:
        pytest.fail(f"backend {backend} should run here: {reason}")


def tf32_like(backend, device, dtype):
    """Triton's float32 dot on a GPU uses tf32 by default (~3e-4 relative)."""
    return dtype == torch.float32 and backend == "triton" and device == "cuda"


def randn(*shape, dtype=torch.float32, device="cpu", generator=None, scale=1.0):
    return (torch.randn(*shape, generator=generator, dtype=torch.float32) * scale).to(device=device, dtype=dtype)


def strided_last_dims(t, layout):
    """A view of t with the same values but a non-contiguous layout.
    "transposed": dims 1 and 2 swapped in memory; "padded": rows of a wider buffer."""
    if layout == "contiguous":
        return t
    if layout == "transposed":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "padded":
        wide = torch.zeros(*t.shape[:-1], t.shape[-1] + 8, dtype=t.dtype, device=t.device)
        wide[..., : t.shape[-1]] = t
        return wide[..., : t.shape[-1]]
    raise ValueError(layout)
