"""Hand-written CUDA kernels (csrc/cuda/, native module _C_cuda) behind the backend interface.

The native functions take data pointers, sizes, element strides, a dtype code and the caller's
current stream. This module allocates the outputs and the workspace (its size from the native
`*_workspace_bytes` query) with torch on the inputs' device and enqueues the kernels on the current
stream: no host synchronisation, so every op is CUDA-graph capturable.

Arguments arrive validated by the ops layer (docs/ops.md): last dims contiguous, the small qproj
parameters and select_compact's scores float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from ._native import dtype_code, native_available, native_module, ptr

__all__ = ["available", "lookahead_qproj", "attention_scores", "lookahead_attention", "select_compact"]


def available() -> tuple[bool, str | None]:
    ok, reason = native_available("_C_cuda")
    if not ok:
        return False, reason
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    return True, None


@dataclass(frozen=True)
class Launch:
    """What a call needs besides its tensors: the native module, the stream to enqueue on, the
    device's multiprocessor count (it sizes the grids and the workspace) and the allocator of outputs
    and workspace. The tests substitute the host-emulated module and a poisoning allocator."""

    module: object
    stream: int
    num_sms: int

    def empty(self, shape, dtype, device):
        return torch.empty(shape, dtype=dtype, device=device)


@cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch_on(device: torch.device) -> Launch:
    return Launch(native_module("_C_cuda"), torch.cuda.current_stream(device).cuda_stream, _num_sms(device.index))


def run_lookahead_qproj(launch, x, weight, bias, lora_a, lora_b, lora_scale, cos, sin, num_heads, norm_weight, eps):
    T, hidden = x.shape
    out_features = weight.shape[0]
    head_dim = out_features // num_heads
    rank = 0 if lora_a is None else lora_a.shape[0]
    out = launch.empty((T, num_heads, head_dim), x.dtype, x.device)
    workspace = launch.empty(
        (launch.module.qproj_workspace_bytes(T, hidden, out_features, rank, launch.num_sms),), torch.uint8, x.device
    )
    launch.module.lookahead_qproj(
        dtype_code(x),
        ptr(x),
        x.stride(0),
        ptr(weight),
        weight.stride(0),
        ptr(bias),
        ptr(lora_a),
        ptr(lora_b),
        rank,
        float(lora_scale),
        ptr(cos),
        ptr(sin),
        T,
        hidden,
        num_heads,
        head_dim,
        ptr(norm_weight),
        float(eps),
        ptr(out),
        ptr(workspace),
        launch.num_sms,
        launch.stream,
    )
    return out


def run_attention(launch, q, k, v, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce):
    """(out, scores) of lookahead_attention; out is None when v is None (attention_scores)."""
    B, Hq, Tq, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    with_out = v is not None
    out = launch.empty(q.shape, q.dtype, q.device) if with_out else None
    scores = launch.empty((B, Hkv, num_scored), torch.float32, q.device)
    workspace_bytes = launch.module.attention_workspace_bytes(
        dtype_code(q), B, Hq, Hkv, Tq, N, D, num_scored, with_out, launch.num_sms
    )
    workspace = launch.empty((workspace_bytes,), torch.uint8, q.device)
    v_strides = v.stride()[:3] if with_out else (0, 0, 0)
    launch.module.attention(
        dtype_code(q),
        ptr(q),
        *q.stride()[:3],
        ptr(k),
        *k.stride()[:3],
        ptr(v),
        *v_strides,
        B,
        Hq,
        Hkv,
        Tq,
        N,
        D,
        num_scored,
        float(scale),
        gqa_reduce == "max",
        query_reduce == "max",
        pool_kernel,
        pool_type == "avg",
        ptr(out),
        ptr(scores),
        ptr(workspace),
        launch.num_sms,
        launch.stream,
    )
    return out, scores


def run_select_compact(launch, scores, k, v, budget, num_sink):
    B, Hkv, N, D = k.shape
    S = scores.shape[2]
    M = min(budget, N)
    k_out = launch.empty((B, Hkv, M, D), k.dtype, k.device)
    v_out = launch.empty((B, Hkv, M, D), v.dtype, v.device)
    kept = launch.empty((B, Hkv, M), torch.int64, k.device)
    workspace = launch.empty(
        (launch.module.select_workspace_bytes(B, Hkv, N, S, budget, num_sink),), torch.uint8, k.device
    )
    launch.module.select_compact(
        ptr(scores),
        *scores.stride(),
        ptr(k),
        *k.stride()[:3],
        ptr(v),
        *v.stride()[:3],
        k.element_size(),
        B,
        Hkv,
        N,
        D,
        S,
        budget,
        num_sink,
        ptr(k_out),
        ptr(v_out),
        ptr(kept),
        ptr(workspace),
        launch.stream,
    )
    return k_out, v_out, kept


# ---- the backend interface: run on the inputs' device and its current stream --------------------


def lookahead_qproj(x, weight, bias, lora_a, lora_b, lora_scale, cos, sin, num_heads, norm_weight, eps):
    with torch.cuda.device(x.device):
        return run_lookahead_qproj(
            _launch_on(x.device), x, weight, bias, lora_a, lora_b, lora_scale, cos, sin, num_heads, norm_weight, eps
        )


def attention_scores(q, k, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce):
    with torch.cuda.device(q.device):
        return run_attention(
            _launch_on(q.device), q, k, None, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce
        )[1]


def lookahead_attention(q, k, v, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce):
    with torch.cuda.device(q.device):
        return run_attention(
            _launch_on(q.device), q, k, v, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce
        )


def select_compact(scores, k, v, budget, num_sink):
    with torch.cuda.device(k.device):
        return run_select_compact(_launch_on(k.device), scores, k, v, budget, num_sink)
