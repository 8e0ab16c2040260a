"""Triton kernels of lookahead_qproj (docs/ops.md §1).

The op is a small-M GEMM (T ≈ 32 lookahead rows against W[Hq·D, hidden]): memory-bound on reading W
once. Two kernels:
  1. _split_k_matmul_kernel: partial x·Wᵀ over one slice of the hidden axis per program, into a
     float32 workspace [split_k, T, Hq·D]. Split-K gives the launch enough programs to stream W
     with every SM (Hq·D / BLOCK_N column blocks alone are too few: 32 for Hq·D = 4096). The
     product is computed as W·xᵀ so the wide side (W rows) is the M dimension of the tensor-core
     dot and the few T rows its N dimension. The same kernel computes x·Aᵀ of the LoRA (r rows).
  2. _epilogue_kernel: one program per (head, row block) sums the split-K slices in fixed order
     (deterministic), adds the bias and the LoRA delta lora_scale·(x·Aᵀ)·Bᵀ, then the optional
     per-head RMSNorm and the RoPE. A program owns whole heads, holding each head as its two halves
     [D/2] so rotate_half(q) = cat(-q_hi, q_lo) is a pairing of registers, and rounds to x's dtype
     once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRETING, autotune, dot_acc, dot_upcast, next_pow2, target_programs

MIN_ROWS = 16  # tl.dot needs 16 rows on each side
MAX_BLOCK_T = 64
K_ALIGN = 32 if INTERPRETING else 128  # a split-K slice is a multiple of every BLOCK_K used
# A slice of at least MIN_SPLIT_K keeps its float32 partial sums (T·BLOCK_N) small next to the W it
# reads (BLOCK_N·MIN_SPLIT_K).
MIN_SPLIT_K = 4 * K_ALIGN
EPILOGUE_ROWS = 16

# Shared memory per pipeline stage is about (BLOCK_N + BLOCK_T)·BLOCK_K elements; the autotuner
# skips the configs beyond sm_90's 227 KiB (float32 ones with the largest tiles and stages).
_CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
    for n in (64, 128)
    for k in (64, 128)
    for w in (4, 8)
    for s in (3, 4)
]
_INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1)


@autotune(_CONFIGS, _INTERPRETER_CONFIG, key=["N_OUT", "K", "BLOCK_T"])
@triton.jit
def _split_k_matmul_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    T,
    N_OUT,
    K,
    stride_xt,
    stride_wn,
    k_per_split,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """out[split, t, n] = sum over k in this split's slice of x[t, k]·w[n, k] (float32 accumulation).
    A float32 w (the LoRA A) takes x converted to float32; float32 products use Triton's default
    precision (tf32 tensor cores on the GPU)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    kk = tl.arange(0, BLOCK_K)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    w_rows = w_ptr + n.to(tl.int64) * stride_wn
    x_rows = x_ptr + t.to(tl.int64) * stride_xt
    acc = tl.zeros((BLOCK_N, BLOCK_T), tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_in = (k0 + kk) < k_hi
        w = tl.load(w_rows[:, None] + (k0 + kk)[None, :], mask=(n < N_OUT)[:, None] & k_in[None, :], other=0.0)
        x = tl.load(x_rows[:, None] + (k0 + kk)[None, :], mask=(t < T)[:, None] & k_in[None, :], other=0.0)
        acc = dot_acc(w, tl.trans(x.to(w.dtype)), acc, UPCAST)
    out = out_ptr + (split * T + t[None, :]).to(tl.int64) * N_OUT + n[:, None]
    tl.store(out, acc, mask=(n < N_OUT)[:, None] & (t < T)[None, :])


@triton.jit
def _epilogue_kernel(
    qw_ptr,
    xa_ptr,
    bias_ptr,
    lora_b_ptr,
    cos_ptr,
    sin_ptr,
    norm_ptr,
    out_ptr,
    T,
    num_heads,
    rank,
    split_k,
    lora_scale,
    eps,
    HEAD_DIM: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    HAS_NORM: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    h = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.arange(0, BLOCK_HALF)
    n_out = num_heads * HEAD_DIM
    lo_col = h * HEAD_DIM + c
    hi_col = lo_col + HALF
    mask = (t < T)[:, None] & (c < HALF)[None, :]

    lo = tl.zeros((BLOCK_T, BLOCK_HALF), tl.float32)
    hi = tl.zeros((BLOCK_T, BLOCK_HALF), tl.float32)
    for s in range(split_k):
        rows = qw_ptr + (s * T + t[:, None]).to(tl.int64) * n_out
        lo += tl.load(rows + lo_col[None, :], mask=mask, other=0.0)
        hi += tl.load(rows + hi_col[None, :], mask=mask, other=0.0)
    if HAS_BIAS:
        lo += tl.load(bias_ptr + lo_col, mask=c < HALF, other=0.0)[None, :]
        hi += tl.load(bias_ptr + hi_col, mask=c < HALF, other=0.0)[None, :]
    if HAS_LORA:
        delta_lo = tl.zeros((BLOCK_T, BLOCK_HALF), tl.float32)
        delta_hi = tl.zeros((BLOCK_T, BLOCK_HALF), tl.float32)
        for r in range(rank):
            xa = tl.zeros((BLOCK_T,), tl.float32)  # (x·Aᵀ)[t, r], summed over the split-K slices
            for s in range(split_k):
                xa += tl.load(xa_ptr + (s * T + t) * rank + r, mask=t < T, other=0.0)
            b_lo = tl.load(lora_b_ptr + lo_col.to(tl.int64) * rank + r, mask=c < HALF, other=0.0)
            b_hi = tl.load(lora_b_ptr + hi_col.to(tl.int64) * rank + r, mask=c < HALF, other=0.0)
            delta_lo += xa[:, None] * b_lo[None, :]
            delta_hi += xa[:, None] * b_hi[None, :]
        lo += lora_scale * delta_lo
        hi += lora_scale * delta_hi
    if HAS_NORM:
        mean_sq = (tl.sum(lo * lo, axis=1) + tl.sum(hi * hi, axis=1)) / HEAD_DIM
        rstd = tl.rsqrt(mean_sq + eps)[:, None]
        lo = lo * rstd * tl.load(norm_ptr + c, mask=c < HALF, other=0.0)[None, :]
        hi = hi * rstd * tl.load(norm_ptr + HALF + c, mask=c < HALF, other=0.0)[None, :]

    rope = t[:, None] * HEAD_DIM + c[None, :]
    cos_lo = tl.load(cos_ptr + rope, mask=mask, other=0.0)
    cos_hi = tl.load(cos_ptr + rope + HALF, mask=mask, other=0.0)
    sin_lo = tl.load(sin_ptr + rope, mask=mask, other=0.0)
    sin_hi = tl.load(sin_ptr + rope + HALF, mask=mask, other=0.0)
    out = out_ptr + (t[:, None].to(tl.int64) * num_heads + h) * HEAD_DIM + c[None, :]
    tl.store(out, (lo * cos_lo - hi * sin_lo).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out + HALF, (hi * cos_hi + lo * sin_hi).to(out_ptr.dtype.element_ty), mask=mask)


def _split_k(K: int, programs_without_split: int, device: torch.device) -> tuple[int, int]:
    """(split_k, k_per_split): enough hidden-axis slices to fill the GPU, each ≥ MIN_SPLIT_K long."""
    wanted = triton.cdiv(target_programs(device), programs_without_split)
    split_k = max(1, min(wanted, triton.cdiv(K, MIN_SPLIT_K)))
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), K_ALIGN) * K_ALIGN
    return triton.cdiv(K, k_per_split), k_per_split


def _matmul_parts(x, w, split_k, k_per_split, block_t):
    """The float32 workspace [split_k, T, rows of w] of x·wᵀ split over the hidden axis."""
    T, K = x.shape
    n_out = w.shape[0]
    parts = torch.empty(split_k, T, n_out, dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton.cdiv(n_out, meta["BLOCK_N"]), split_k, triton.cdiv(T, block_t))  # noqa: E731
    _split_k_matmul_kernel[grid](
        x,
        w,
        parts,
        T,
        n_out,
        K,
        x.stride(0),
        w.stride(0),
        k_per_split,
        BLOCK_T=block_t,
        UPCAST=dot_upcast(x.dtype),
    )
    return parts


def lookahead_qproj(x, weight, bias, lora_a, lora_b, lora_scale, cos, sin, num_heads, norm_weight, eps):
    T, K = x.shape
    n_out = weight.shape[0]
    D = n_out // num_heads
    block_t = min(max(next_pow2(T), MIN_ROWS), MAX_BLOCK_T)
    # Column blocks of the widest BLOCK_N: the split count must not depend on the autotuned config.
    split_k, k_per_split = _split_k(K, triton.cdiv(n_out, 128) * triton.cdiv(T, block_t), x.device)
    qw = _matmul_parts(x, weight, split_k, k_per_split, block_t)
    has_lora = lora_a is not None
    xa = _matmul_parts(x, lora_a, split_k, k_per_split, block_t) if has_lora else None

    out = torch.empty(T, num_heads, D, dtype=x.dtype, device=x.device)
    _epilogue_kernel[(num_heads, triton.cdiv(T, EPILOGUE_ROWS))](
        qw,
        xa,
        bias,
        lora_b,
        cos,
        sin,
        norm_weight,
        out,
        T,
        num_heads,
        lora_a.shape[0] if has_lora else 0,
        split_k,
        float(lora_scale),
        float(eps),
        HEAD_DIM=D,
        BLOCK_HALF=next_pow2(D // 2),
        BLOCK_T=EPILOGUE_ROWS,
        HAS_BIAS=bias is not None,
        HAS_LORA=has_lora,
        HAS_NORM=norm_weight is not None,
    )
    return out
