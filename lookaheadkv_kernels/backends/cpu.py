"""Native CPU backend: the C++/OpenMP kernels of csrc/cpu/ (module _C_cpu) behind the backend interface.

This module allocates the outputs and hands every tensor to the native op of the same name, which
checks them (csrc/op_bindings.h) and runs on torch's intra-op thread count (`torch.get_num_threads()`).
"""

from __future__ import annotations

import torch

from ._native import native_available, native_module
from .reference import paged_geometry

_MODULE = "_C_cpu"


def available(device: torch.device | None = None) -> tuple[bool, str | None]:
    return native_available(_MODULE)


def lookahead_qproj(x, weight, bias, lora_a, lora_b, lora_scale, cos, sin, num_heads, norm_weight, eps):
    out = x.new_empty(x.shape[0], num_heads, weight.shape[0] // num_heads)
    native_module(_MODULE).lookahead_qproj(
        x, weight, bias, lora_a, lora_b, lora_scale, cos, sin, num_heads, norm_weight, eps, out,
        torch.get_num_threads(),
    )  # fmt: skip
    return out


def attention_scores(q, k, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce):
    scores = q.new_empty(q.shape[0], k.shape[1], num_scored, dtype=torch.float32)
    native_module(_MODULE).attention_scores(
        q, k, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce, scores, torch.get_num_threads()
    )
    return scores


def lookahead_attention(q, k, v, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    scores = q.new_empty(q.shape[0], k.shape[1], num_scored, dtype=torch.float32)
    native_module(_MODULE).lookahead_attention(
        q, k, v, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce, out, scores,
        torch.get_num_threads(),
    )  # fmt: skip
    return out, scores


def select_compact(scores, k, v, budget, num_sink):
    B, Hkv, N, D = k.shape
    M = min(budget, N)
    k_out, v_out = k.new_empty(B, Hkv, M, D), k.new_empty(B, Hkv, M, D)
    kept = k.new_empty(B, Hkv, M, dtype=torch.int64)
    native_module(_MODULE).select_compact(scores, k, v, budget, num_sink, k_out, v_out, kept, torch.get_num_threads())
    return k_out, v_out, kept


def _paged_scores(q, block_table, k_cache, layout):
    block_size, Hkv, _ = paged_geometry(k_cache, layout)
    return q.new_empty(block_table.shape[0], Hkv, block_table.shape[1] * block_size, dtype=torch.float32)


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
    scores = _paged_scores(q, block_table, k_cache, layout)
    native_module(_MODULE).paged_attention_scores(
        q, q_offsets, k_cache, block_table, seq_lens, num_scored, scale, gqa_reduce, pool_kernel, pool_type,
        query_reduce, layout, scores, torch.get_num_threads(),
    )  # fmt: skip
    return scores


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
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    scores = _paged_scores(q, block_table, k_cache, layout)
    native_module(_MODULE).paged_lookahead_attention(
        q, q_offsets, k_cache, v_cache, block_table, seq_lens, num_scored, scale, gqa_reduce, pool_kernel, pool_type,
        query_reduce, layout, out, scores, torch.get_num_threads(),
    )  # fmt: skip
    return out, scores


def paged_select_compact(scores, k_cache, v_cache, block_table, seq_lens, num_scored, budgets, num_sink, layout):
    B, Hkv = scores.shape[:2]
    capacity = block_table.shape[1] * paged_geometry(k_cache, layout)[0]
    new_lens = torch.empty(B, dtype=torch.int32)
    kept = torch.empty(B, Hkv, capacity, dtype=torch.int32)
    native_module(_MODULE).paged_select_compact(
        scores, k_cache, v_cache, block_table, seq_lens, num_scored, budgets, num_sink, layout, new_lens, kept,
        torch.get_num_threads(),
    )  # fmt: skip
    return new_lens, kept
