"""Loading of the native modules (_C_cpu, _C_cuda) and the raw-argument helpers they need.

The native modules take data pointers, sizes, element strides and a dtype code; they never see a
torch.Tensor, so they need no libtorch and one build serves every torch version.
"""

from __future__ import annotations

import importlib
from functools import cache

import torch

# Must match csrc/common.h::DType.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@cache
def _load(name: str):
    try:
        return importlib.import_module(f"lookaheadkv_kernels.{name}"), None
    except ImportError as exc:  # not built, or built for another platform
        return None, f"lookaheadkv_kernels.{name} is not available ({exc}); rebuild with `pip install -e .`"


def native_module(name: str):
    """The native module `name` ("_C_cpu" or "_C_cuda"); raises RuntimeError with the reason if missing."""
    module, reason = _load(name)
    if module is None:
        raise RuntimeError(reason)
    return module


def native_available(name: str) -> tuple[bool, str | None]:
    module, reason = _load(name)
    return module is not None, reason


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def ptr(t: torch.Tensor | None) -> int:
    """Data pointer, 0 for an absent optional tensor."""
    return 0 if t is None else t.data_ptr()
