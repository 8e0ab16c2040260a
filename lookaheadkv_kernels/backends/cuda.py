"""Hand-written CUDA kernels (csrc/cuda/, native module _C_cuda) behind the backend interface.

The native ops take their tensors (checked in csrc/op_bindings.h, as the CPU module's are), a
workspace sized by the native `*_workspace_bytes` query, the multiprocessor count and the caller's
current stream. This module allocates outputs and workspace with torch on the inputs' device; the
kernels are enqueued on the current stream without host synchronisation, so every op is CUDA-graph
capturable.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from ._native import native_available, native_module
from .reference import paged_geometry

__all__ = [
    "available",
    "lookahead_qproj",
    "attention_scores",
    "lookahead_attention",
    "select_compact",
    "paged_attention_scores",
    "paged_lookahead_attention",
    "paged_select_compact",
]


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
    rank = 0 if lora_a is None else lora_a.shape[0]
    out = launch.empty((T, num_heads, weight.shape[0] // num_heads), x.dtype, x.device)
    need = launch.module.qproj_workspace_bytes(T, hidden, weight.shape[0], rank, launch.num_sms)
    workspace = launch.empty((need,), torch.uint8, x.device)
    launch.module.lookahead_qproj(
        x, weight, bias, lora_a, lora_b, lora_scale, cos, sin, num_heads, norm_weight, eps, out,
        workspace, launch.num_sms, launch.stream,
    )  # fmt: skip
    return out


def run_attention(launch, q, k, v, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce):
    """(out, scores) of lookahead_attention; out is None when v is None (attention_scores)."""
    with_out = v is not None
    scores = launch.empty((q.shape[0], k.shape[1], num_scored), torch.float32, q.device)
    need = launch.module.attention_workspace_bytes(q, k, num_scored, with_out, launch.num_sms)
    workspace = launch.empty((need,), torch.uint8, q.device)
    args = (num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce)
    if not with_out:
        launch.module.attention_scores(q, k, *args, scores, workspace, launch.num_sms, launch.stream)
        return None, scores
    out = launch.empty(q.shape, q.dtype, q.device)
    launch.module.lookahead_attention(q, k, v, *args, out, scores, workspace, launch.num_sms, launch.stream)
    return out, scores


def run_select_compact(launch, scores, k, v, budget, num_sink):
    B, Hkv, N, D = k.shape
    M = min(budget, N)
    k_out = launch.empty((B, Hkv, M, D), k.dtype, k.device)
    v_out = launch.empty((B, Hkv, M, D), v.dtype, v.device)
    kept = launch.empty((B, Hkv, M), torch.int64, k.device)
    need = launch.module.select_workspace_bytes(B, Hkv, N, scores.shape[2], budget, num_sink)
    workspace = launch.empty((need,), torch.uint8, k.device)
    launch.module.select_compact(scores, k, v, budget, num_sink, k_out, v_out, kept, workspace, launch.stream)
    return k_out, v_out, kept


def run_paged_attention(
    launch,
    q,
    q_offsets,
    k_cache,
    v_cache,
    block_table,
    seq_lens,
    num_scored,
    scale,
    gqa_reduce,
    pool_kernel,
    pool_type,
    query_reduce,
    layout,
):
    """(out, scores) of paged_lookahead_attention; out is None when v_cache is None (paged_attention_scores).
    The index tensors stay on the device: the kernels check them there."""
    with_out = v_cache is not None
    block_size, Hkv, _ = paged_geometry(k_cache, layout)
    scores = launch.empty((block_table.shape[0], Hkv, block_table.shape[1] * block_size), torch.float32, q.device)
    need = launch.module.paged_attention_workspace_bytes(q, k_cache, block_table, layout, with_out, launch.num_sms)
    workspace = launch.empty((need,), torch.uint8, q.device)
    args = (block_table, seq_lens, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce, layout)
    if not with_out:
        launch.module.paged_attention_scores(
            q, q_offsets, k_cache, *args, scores, workspace, launch.num_sms, launch.stream
        )
        return None, scores
    out = launch.empty(q.shape, q.dtype, q.device)
    launch.module.paged_lookahead_attention(
        q, q_offsets, k_cache, v_cache, *args, out, scores, workspace, launch.num_sms, launch.stream
    )
    return out, scores


def run_paged_select_compact(
    launch, scores, k_cache, v_cache, block_table, seq_lens, num_scored, budgets, num_sink, layout
):
    B, Hkv = scores.shape[:2]
    capacity = block_table.shape[1] * paged_geometry(k_cache, layout)[0]
    new_lens = launch.empty((B,), torch.int32, scores.device)
    kept = launch.empty((B, Hkv, capacity), torch.int32, scores.device)
    need = launch.module.paged_select_workspace_bytes(B, Hkv, capacity)
    workspace = launch.empty((need,), torch.uint8, scores.device)
    launch.module.paged_select_compact(
        scores, k_cache, v_cache, block_table, seq_lens, num_scored, budgets, num_sink, layout, new_lens, kept,
        workspace, launch.stream,
    )  # fmt: skip
    return new_lens, kept


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


def paged_attention_scores(
    q,
    q_offsets,
    k_cache,
    block_table,
    seq_lens,
    num_scored,
    scale,
    gqa_reduce,
    pool_kernel,
    pool_type,
    query_reduce,
    layout,
):
    with torch.cuda.device(q.device):
        return run_paged_attention(
            _launch_on(q.device), q, q_offsets, k_cache, None, block_table, seq_lens, num_scored, scale, gqa_reduce,
            pool_kernel, pool_type, query_reduce, layout,
        )[1]  # fmt: skip


def paged_lookahead_attention(
    q,
    q_offsets,
    k_cache,
    v_cache,
    block_table,
    seq_lens,
    num_scored,
    scale,
    gqa_reduce,
    pool_kernel,
    pool_type,
    query_reduce,
    layout,
):
    with torch.cuda.device(q.device):
        return run_paged_attention(
            _launch_on(q.device), q, q_offsets, k_cache, v_cache, block_table, seq_lens, num_scored, scale,
            gqa_reduce, pool_kernel, pool_type, query_reduce, layout,
        )  # fmt: skip


def paged_select_compact(scores, k_cache, v_cache, block_table, seq_lens, num_scored, budgets, num_sink, layout):
    with torch.cuda.device(scores.device):
        return run_paged_select_compact(
            _launch_on(scores.device), scores, k_cache, v_cache, block_table, seq_lens, num_scored, budgets, num_sink,
            layout,
        )  # fmt: skip
