"""Native CPU backend: the C++/OpenMP kernels of csrc/cpu/ (module _C_cpu) behind the backend interface.

This module allocates the outputs and hands every tensor to the native op of the same name, which
checks them (csrc/op_bindings.h) and runs on torch's intra-op thread count (`torch.get_num_threads()`).
"""

from __future__ import annotations

import torch

from ._native import native_available, native_module

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
