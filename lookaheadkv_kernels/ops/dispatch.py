"""Which backend runs an op: explicit `backend=` requests, and the per-device default of "auto".

Backends are imported lazily (Triton's import is slow and optional). A backend module exports the
four op functions and `available()`; this module adds the device rules.
"""

from __future__ import annotations

import importlib
import os
import warnings
from functools import cache

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
OPS = (
    "lookahead_qproj",
    "attention_scores",
    "lookahead_attention",
    "select_compact",
    "paged_attention_scores",
    "paged_lookahead_attention",
    "paged_select_compact",
)
CUDA_BACKEND_ENV = "LOOKAHEADKV_CUDA_BACKEND"

# Default implementation on CUDA devices, per op, in order of preference (the first available one
# runs). Without a measured GPU run yet, the hand-written CUDA kernels come first; see
# bench/results/ for the measurements that decide this table.
CUDA_PREFERENCE = {op: ("cuda", "triton") for op in OPS}


@cache
def backend_module(backend: str):
    if backend == "triton":
        return importlib.import_module("lookaheadkv_kernels.backends.triton")
    return importlib.import_module(f"lookaheadkv_kernels.backends.{backend}")


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None if `backend` can run on `device`, else why not."""
    if backend not in BACKENDS:
        return f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}"
    if backend == "cpu" and device.type != "cpu":
        return f"backend 'cpu' runs on CPU tensors, got tensors on {device}"
    if backend == "cuda" and device.type != "cuda":
        return f"backend 'cuda' runs on CUDA tensors, got tensors on {device}"
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "backend 'triton' runs on CPU tensors only under TRITON_INTERPRET=1"
    try:
        module = backend_module(backend)
    except ImportError as exc:
        return f"backend {backend!r} cannot be imported: {exc}"
    ok, reason = module.available()
    return None if ok else reason


@cache
def _warn_fallback(op: str, device_type: str, reason: str):
    warnings.warn(f"lookaheadkv: {op} on {device_type} falls back to the slow reference: {reason}", stacklevel=4)


def resolve(op: str, device: torch.device, backend: str = "auto"):
    """The backend module that runs `op` on `device`."""
    if backend != "auto":
        reason = unavailable_reason(backend, device)
        if reason is not None:
            raise RuntimeError(f"lookaheadkv.{op}: {reason}")
        return backend_module(backend)
    if device.type == "cpu":
        preference = ("cpu",)
    elif device.type == "cuda":
        forced = os.environ.get(CUDA_BACKEND_ENV)
        if forced:
            return resolve(op, device, forced)
        preference = CUDA_PREFERENCE[op]
    else:
        preference = ()
    reasons = []
    for name in preference:
        reason = unavailable_reason(name, device)
        if reason is None:
            return backend_module(name)
        reasons.append(reason)
    if reasons:
        _warn_fallback(op, device.type, "; ".join(reasons))
    return backend_module("reference")
