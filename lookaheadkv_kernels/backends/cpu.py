"""Native CPU backend: the C++/OpenMP kernels of csrc/cpu/ (module _C_cpu) behind the backend interface.

The ops layer has validated every argument (docs/ops.md). This module allocates the outputs, passes
data pointers, sizes and element strides, and runs the kernels on torch's intra-op thread count
(`torch.get_num_threads()`). The kernels index every dim by stride except the last, which must be
dense; `_dense_rows` / `_float32` make that true (no-ops for inputs the ops layer normalised) so that
a direct call can never hand the kernels a layout they would misread.
"""

from __future__ import annotations

import torch

from ._native import dtype_code, native_available, native_module, ptr

_MODULE = "_C_cpu"


def available(device: torch.device | None = None) -> tuple[bool, str | None]:
    return native_available(_MODULE)


def _dense_rows(t):
    if t is None or t.stride(-1) == 1 or t.shape[-1] == 1:
        return t
    return t.contiguous()


def _float32(t):
    return None if t is None else t.to(torch.float32).contiguous()


def lookahead_qproj(x, weight, bias, lora_a, lora_b, lora_scale, cos, sin, num_heads, norm_weight, eps):
    x, weight = _dense_rows(x), _dense_rows(weight)
    bias, lora_a, lora_b, cos, sin, norm_weight = map(_float32, (bias, lora_a, lora_b, cos, sin, norm_weight))
    T, hidden = x.shape
    head_dim = weight.shape[0] // num_heads
    out = torch.empty(T, num_heads, head_dim, dtype=x.dtype, device=x.device)
    native_module(_MODULE).lookahead_qproj(
        ptr(x),
        x.stride(0),
        ptr(weight),
        weight.stride(0),
        ptr(bias),
        ptr(lora_a),
        ptr(lora_b),
        0 if lora_a is None else lora_a.shape[0],
        float(lora_scale),
        ptr(cos),
        ptr(sin),
        ptr(norm_weight),
        float(eps),
        ptr(out),
        dtype_code(x),
        T,
        hidden,
        num_heads,
        head_dim,
        torch.get_num_threads(),
    )
    return out


def _attention(q, k, v, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce):
    """attention_scores when v is None, else lookahead_attention: one fused kernel."""
    q, k, v = _dense_rows(q), _dense_rows(k), _dense_rows(v)
    B, Hq, Tq, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    scores = torch.empty(B, Hkv, num_scored, dtype=torch.float32, device=q.device)
    out = None if v is None else torch.empty(B, Hq, Tq, D, dtype=q.dtype, device=q.device)
    v_strides = (0, 0, 0) if v is None else v.stride()[:3]
    native_module(_MODULE).attention(
        ptr(q),
        *q.stride()[:3],
        ptr(k),
        *k.stride()[:3],
        ptr(v),
        *v_strides,
        dtype_code(q),
        ptr(out),
        ptr(scores),
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
        pool_type == "max",
        torch.get_num_threads(),
    )
    return scores, out


def attention_scores(q, k, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce):
    scores, _ = _attention(q, k, None, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce)
    return scores


def lookahead_attention(q, k, v, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce):
    scores, out = _attention(q, k, v, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce)
    return out, scores


def select_compact(scores, k, v, budget, num_sink):
    if v.dtype != k.dtype:
        raise ValueError(f"v must have k's dtype {k.dtype}, got {v.dtype}")
    scores = scores.to(torch.float32)
    k, v = _dense_rows(k), _dense_rows(v)
    B, Hkv, N, D = k.shape
    S = scores.shape[2]
    M = min(budget, N)
    k_out = torch.empty(B, Hkv, M, D, dtype=k.dtype, device=k.device)
    v_out = torch.empty(B, Hkv, M, D, dtype=k.dtype, device=k.device)
    kept = torch.empty(B, Hkv, M, dtype=torch.int64, device=k.device)
    native_module(_MODULE).select_compact(
        ptr(scores),
        *scores.stride(),
        ptr(k),
        *k.stride()[:3],
        ptr(v),
        *v.stride()[:3],
        k.element_size(),
        ptr(k_out),
        ptr(v_out),
        ptr(kept),
        B,
        Hkv,
        N,
        D,
        S,
        budget,
        num_sink,
        torch.get_num_threads(),
    )
    return k_out, v_out, kept
