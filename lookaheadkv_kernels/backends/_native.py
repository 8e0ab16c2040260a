"""Loading of the native modules (_C_cpu, _C_cuda).

The modules take torch.Tensor arguments but read them through torch's Python API
(csrc/tensor_args.h): they link no libtorch, so one build serves every torch version.
"""

from __future__ import annotations

import importlib
from functools import cache


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
