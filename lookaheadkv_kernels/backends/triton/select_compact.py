"""Triton kernels of select_compact (docs/ops.md §4).

Scores become order keys: uint32 values that compare like the contract's ranking (-0.0 folded into
+0.0, NaN below -inf), so "the n_pick best candidates" is "every key above a threshold T, plus the
first `need` keys equal to T by position" — exactly the reference's order (ties: lower position
first).

  1. _threshold_kernel, one program per (batch, KV head) row: finds T and `need` by a radix select
     on the keys of the candidates [min(num_sink, S), S) — four passes, each a 256-bin histogram of
     one byte of the keys that match the bytes already fixed. A last pass counts, per CHUNK of
     positions, the candidates above T and those equal to T, and stores their exclusive prefix
     sums: where each chunk's kept candidates start in the output.
  2. _compact_kernel, one program per (row, CHUNK of positions): recomputes its keys, decides what
     it keeps (sinks, the tail [S, N), candidates above T, the first `need` ties), places them by a
     prefix sum (tl.cumsum) after its chunk's offset, and gathers those rows of K and V (masked
     loads: only kept rows are read, each a contiguous run of D elements, vectorised to 16 bytes).
The gather runs on N/CHUNK programs per row rather than one, so it reaches full memory bandwidth
even with few (batch, KV head) rows. All sizes come from shapes and ints: no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRETING

CHUNK = 32 if INTERPRETING else 128  # positions per compaction program
SELECT_BLOCK = 64 if INTERPRETING else 2048  # keys per step of the radix passes (a multiple of CHUNK)
BLOCK_D = 32 if INTERPRETING else 64  # head-dim slice per gather step: [CHUNK, BLOCK_D] tiles of K and V
RADIX_BITS = 8


@triton.jit
def _order_key(x):
    """uint32 order key of float32 scores: larger score → larger key, -0.0 == +0.0, NaN → 0 (lowest)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.uint32, bitcast=True)
    key = tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)
    return tl.where(x != x, 0, key)


@triton.jit
def _load_keys(row_scores, pos, stride_s, lo, hi):
    """Keys of positions pos; `valid` = pos in [lo, hi)."""
    valid = (pos >= lo) & (pos < hi)
    return _order_key(tl.load(row_scores + pos.to(tl.int64) * stride_s, mask=valid, other=0.0)), valid


@triton.jit
def _radix_select(row_scores, stride_s, lo, hi, k, BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr):
    """(T, need): T = the k-th largest key in [lo, hi) (1 ≤ k ≤ hi - lo); need = how many keys
    equal to T are among the k largest."""
    BINS: tl.constexpr = 1 << RADIX_BITS
    bins = tl.arange(0, BINS)
    prefix = tl.zeros((), tl.uint32)
    fixed = tl.zeros((), tl.uint32)  # mask of the key bits already decided
    remaining = k
    for p in tl.static_range(32 // RADIX_BITS):
        shift = 32 - RADIX_BITS * (p + 1)
        hist = tl.zeros((BINS,), tl.int32)
        for start in range(lo, hi, BLOCK):
            key, valid = _load_keys(row_scores, start + tl.arange(0, BLOCK), stride_s, lo, hi)
            digit = ((key >> shift) & (BINS - 1)).to(tl.int32)
            hist += tl.histogram(digit, BINS, mask=valid & ((key & fixed) == prefix))
        at_or_above = tl.cumsum(hist, 0, reverse=True)  # keys whose digit is ≥ each bin
        digit_t = tl.max(tl.where(at_or_above >= remaining, bins, 0), axis=0)
        remaining -= tl.sum(tl.where(bins > digit_t, hist, 0), axis=0)
        prefix |= digit_t.to(tl.uint32) << shift
        fixed |= tl.full((), BINS - 1, tl.uint32) << shift
    return prefix, remaining


@triton.jit
def _threshold_kernel(
    scores_ptr,
    threshold_ptr,
    need_ptr,
    above_before_ptr,
    ties_before_ptr,
    Hkv,
    S,
    sink,
    n_pick,
    num_chunks,
    stride_sb,
    stride_sg,
    stride_ss,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
    RADIX_BITS: tl.constexpr,
):
    row = tl.program_id(0)
    row_scores = scores_ptr + (row // Hkv).to(tl.int64) * stride_sb + (row % Hkv).to(tl.int64) * stride_sg
    candidates = S - sink
    if n_pick >= candidates:  # budget ≥ N: every key, whatever it is, is kept
        threshold = tl.zeros((), tl.uint32)
        need = tl.zeros((), tl.int32) + candidates
    elif n_pick > 0:
        threshold, need = _radix_select(row_scores, stride_ss, sink, S, n_pick, BLOCK, RADIX_BITS)
    else:  # budget == protected count: no candidate is kept (no key is above 0xFFFFFFFF)
        threshold = tl.full((), 0xFFFFFFFF, tl.uint32)
        need = tl.zeros((), tl.int32)
    tl.store(threshold_ptr + row, threshold.to(tl.int64))
    tl.store(need_ptr + row, need)

    # Exclusive prefix sums, per CHUNK of positions, of the candidates above T and equal to T.
    CHUNKS_PER_BLOCK: tl.constexpr = BLOCK // CHUNK
    above_total = 0
    ties_total = 0
    for start in range(0, S, BLOCK):
        key, valid = _load_keys(row_scores, start + tl.arange(0, BLOCK), stride_ss, sink, S)
        above = tl.sum(tl.reshape((valid & (key > threshold)).to(tl.int32), (CHUNKS_PER_BLOCK, CHUNK)), axis=1)
        ties = tl.sum(tl.reshape((valid & (key == threshold)).to(tl.int32), (CHUNKS_PER_BLOCK, CHUNK)), axis=1)
        chunk = start // CHUNK + tl.arange(0, CHUNKS_PER_BLOCK)
        out = row.to(tl.int64) * num_chunks + chunk
        tl.store(above_before_ptr + out, above_total + tl.cumsum(above, 0) - above, mask=chunk < num_chunks)
        tl.store(ties_before_ptr + out, ties_total + tl.cumsum(ties, 0) - ties, mask=chunk < num_chunks)
        above_total += tl.sum(above, axis=0)
        ties_total += tl.sum(ties, axis=0)


@triton.jit
def _compact_kernel(
    scores_ptr,
    k_ptr,
    v_ptr,
    threshold_ptr,
    need_ptr,
    above_before_ptr,
    ties_before_ptr,
    kept_ptr,
    k_out_ptr,
    v_out_ptr,
    Hkv,
    N,
    S,
    D,
    M,
    sink,
    n_pick,
    num_chunks,
    stride_sb,
    stride_sg,
    stride_ss,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    b = row // Hkv
    g = row % Hkv
    start = chunk * CHUNK
    pos = start + tl.arange(0, CHUNK)
    row_scores = scores_ptr + b.to(tl.int64) * stride_sb + g.to(tl.int64) * stride_sg
    key, candidate = _load_keys(row_scores, pos, stride_ss, sink, S)

    threshold = tl.load(threshold_ptr + row).to(tl.uint32)
    need = tl.load(need_ptr + row)
    # Chunks starting at or after S hold no candidate: all n_pick picks come before them.
    has_offsets = start < S
    above_before = tl.load(above_before_ptr + row.to(tl.int64) * num_chunks + chunk, mask=has_offsets, other=n_pick)
    ties_before = tl.load(ties_before_ptr + row.to(tl.int64) * num_chunks + chunk, mask=has_offsets, other=0)
    tie = candidate & (key == threshold)
    tie_rank = ties_before + tl.cumsum(tie.to(tl.int32), 0) - 1
    picked = candidate & ((key > threshold) | (tie & (tie_rank < need)))
    keep = (pos < N) & ((pos < sink) | (pos >= S) | picked)
    kept_before = tl.minimum(start, sink) + above_before + tl.minimum(ties_before, need) + tl.maximum(start - S, 0)
    slot = kept_before + tl.cumsum(keep.to(tl.int32), 0) - 1

    out_row = row.to(tl.int64) * M + slot
    tl.store(kept_ptr + out_row, pos.to(tl.int64), mask=keep)
    k_rows = k_ptr + b.to(tl.int64) * stride_kb + g.to(tl.int64) * stride_kh + pos.to(tl.int64) * stride_kn
    v_rows = v_ptr + b.to(tl.int64) * stride_vb + g.to(tl.int64) * stride_vh + pos.to(tl.int64) * stride_vn
    d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        m = keep[:, None] & ((d0 + d) < D)[None, :]
        tl.store(
            k_out_ptr + out_row[:, None] * D + (d0 + d)[None, :],
            tl.load(k_rows[:, None] + (d0 + d)[None, :], mask=m),
            mask=m,
        )
        tl.store(
            v_out_ptr + out_row[:, None] * D + (d0 + d)[None, :],
            tl.load(v_rows[:, None] + (d0 + d)[None, :], mask=m),
            mask=m,
        )


def select_compact(scores, k, v, budget, num_sink):
    B, Hkv, S = scores.shape
    N, D = k.shape[2], k.shape[3]
    M = min(budget, N)
    sink = min(num_sink, S)
    n_pick = M - sink - (N - S)
    rows = B * Hkv
    device = k.device
    num_chunks = triton.cdiv(S, CHUNK)

    threshold = torch.empty(rows, dtype=torch.int64, device=device)
    need = torch.empty(rows, dtype=torch.int32, device=device)
    above_before = torch.empty(rows, num_chunks, dtype=torch.int32, device=device)
    ties_before = torch.empty_like(above_before)
    _threshold_kernel[(rows,)](
        scores,
        threshold,
        need,
        above_before,
        ties_before,
        Hkv,
        S,
        sink,
        n_pick,
        num_chunks,
        *scores.stride(),
        BLOCK=SELECT_BLOCK,
        CHUNK=CHUNK,
        RADIX_BITS=RADIX_BITS,
        num_warps=8,
    )

    kept = torch.empty(B, Hkv, M, dtype=torch.int64, device=device)
    k_out = torch.empty(B, Hkv, M, D, dtype=k.dtype, device=device)
    v_out = torch.empty_like(k_out)
    _compact_kernel[(rows, triton.cdiv(N, CHUNK))](
        scores,
        k,
        v,
        threshold,
        need,
        above_before,
        ties_before,
        kept,
        k_out,
        v_out,
        Hkv,
        N,
        S,
        D,
        M,
        sink,
        n_pick,
        num_chunks,
        *scores.stride(),
        *k.stride()[:3],
        *v.stride()[:3],
        CHUNK=CHUNK,
        BLOCK_D=BLOCK_D,
        num_warps=8,
    )
    return k_out, v_out, kept
