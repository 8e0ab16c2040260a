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

paged_select_compact (docs/ops.md §6) runs the same two kernels with PAGED: each sequence's length,
num_scored and budget are read in the kernels, rows are addressed through its block table
(_paged.row_offsets), and the compaction is in place: one program per (row, BLOCK_D slice of the
head dim) moves the kept rows chunk after chunk in increasing position, keeping the counts as it
goes instead of using chunk offsets (why that order is safe: paged_select_compact).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRETING
from ._paged import cache_geometry, check_sequences, row_offsets

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
def _selection(
    b,
    N,
    S,
    sink,
    n_pick,
    seq_lens_ptr,
    num_scored_ptr,
    budgets_ptr,
    seq_ok_ptr,
    num_sink,
    PAGED: tl.constexpr,
):
    """(N, S, sink, n_pick) of sequence b: the call's ints in a dense batch; from the index tensors
    when paged, where an invalid sequence (_paged.py) reads as one without keys: nothing of it is
    read or moved."""
    if PAGED:
        valid = tl.load(seq_ok_ptr + b) != 0
        N = tl.where(valid, tl.load(seq_lens_ptr + b), 0)
        S = tl.where(valid, tl.load(num_scored_ptr + b), 0)
        sink = tl.minimum(S, num_sink)
        n_pick = tl.minimum(tl.load(budgets_ptr + b), N) - sink - (N - S)
    return N, S, sink, n_pick


@triton.jit
def _threshold_kernel(
    scores_ptr,
    threshold_ptr,
    need_ptr,
    above_before_ptr,
    ties_before_ptr,
    seq_lens_ptr,
    num_scored_ptr,
    budgets_ptr,
    seq_ok_ptr,
    Hkv,
    N,
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
    PAGED: tl.constexpr,
):
    """Paged: `sink` is num_sink (a sequence's sink count is min(num_sink, S_b)), and no chunk offsets
    are stored: one program compacts a whole row."""
    row = tl.program_id(0)
    N, S, sink, n_pick = _selection(
        row // Hkv, N, S, sink, n_pick, seq_lens_ptr, num_scored_ptr, budgets_ptr, seq_ok_ptr, sink, PAGED
    )
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

    if not PAGED:
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
def _move_rows(src, src_rows, dst, dst_rows, cols, mask, IN_PLACE: tl.constexpr):
    rows = tl.load(src + src_rows[:, None] + cols[None, :], mask=mask)
    if IN_PLACE:
        tl.debug_barrier()  # every thread has read its part of the tile before any part is overwritten
    tl.store(dst + dst_rows[:, None] + cols[None, :], rows, mask=mask)


@triton.jit
def _compact_chunk(
    row_scores,
    k_src,
    v_src,
    k_dst,
    v_dst,
    kept_row,
    block_table_ptr,
    b,
    start,
    kept_before,
    ties_before,
    threshold,
    need,
    N,
    S,
    sink,
    d_lo,
    d_hi,
    stride_ss,
    stride_table,
    stride_kb,
    stride_kn,
    stride_vb,
    stride_vn,
    dst_seq,
    stride_k_dst_block,
    stride_k_dst_slot,
    stride_v_dst_block,
    stride_v_dst_slot,
    write_kept,
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGED: tl.constexpr,
    CACHE_BLOCK: tl.constexpr,
):
    """Keeps the positions [start, start + CHUNK) that the selection keeps, at slots from kept_before
    on, moving their K and V elements [d_lo, d_hi); returns how many it kept and how many candidates
    equal to the threshold it saw. Rows go to slot m of sequence dst_seq of k_dst, v_dst: dense, the
    outputs (row b·Hkv + g of [B·Hkv, M, D]); paged, the same sequence of the same caches, every row
    of the chunk read before any is written (paged_select_compact says why that suffices)."""
    pos = start + tl.arange(0, CHUNK)
    key, candidate = _load_keys(row_scores, pos, stride_ss, sink, S)
    tie = candidate & (key == threshold)
    tie_rank = ties_before + tl.cumsum(tie.to(tl.int32), 0) - 1
    picked = candidate & ((key > threshold) | (tie & (tie_rank < need)))
    keep = (pos < N) & ((pos < sink) | (pos >= S) | picked)
    slot = kept_before + tl.cumsum(keep.to(tl.int32), 0) - 1
    # tl.where, not `keep & write_kept`: the interpreter rejects the mask a scalar & vector makes.
    tl.store(kept_row + slot, pos.to(kept_row.dtype.element_ty), mask=tl.where(write_kept, keep, False))

    # In place, a kept row already in its slot stays where it is.
    move = keep & (slot != pos) if PAGED else keep
    k_from = row_offsets(block_table_ptr, stride_table, b, pos, move, stride_kb, stride_kn, PAGED, CACHE_BLOCK)
    v_from = row_offsets(block_table_ptr, stride_table, b, pos, move, stride_vb, stride_vn, PAGED, CACHE_BLOCK)
    k_to = row_offsets(
        block_table_ptr, stride_table, dst_seq, slot, move, stride_k_dst_block, stride_k_dst_slot, PAGED, CACHE_BLOCK
    )
    v_to = row_offsets(
        block_table_ptr, stride_table, dst_seq, slot, move, stride_v_dst_block, stride_v_dst_slot, PAGED, CACHE_BLOCK
    )
    d = tl.arange(0, BLOCK_D)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        cols = d0 + d
        m = move[:, None] & (cols < d_hi)[None, :]
        _move_rows(k_src, k_from, k_dst, k_to, cols, m, PAGED)
        _move_rows(v_src, v_from, v_dst, v_to, cols, m, PAGED)
    return tl.sum(keep.to(tl.int32), axis=0), tl.sum(tie.to(tl.int32), axis=0)


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
    block_table_ptr,
    seq_lens_ptr,
    num_scored_ptr,
    budgets_ptr,
    seq_ok_ptr,
    Hkv,
    N,
    S,
    D,
    sink,
    n_pick,
    num_chunks,
    kept_width,
    stride_table,
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
    PAGED: tl.constexpr,
    CACHE_BLOCK: tl.constexpr,
):
    """Dense: one program per (row, CHUNK of positions), placed by the chunk offsets of
    _threshold_kernel. Paged: one program per (row, BLOCK_D slice of the head dim), through every
    chunk in increasing position, counting as it goes (in-place order: paged_select_compact)."""
    row = tl.program_id(0)
    b = row // Hkv
    g = row % Hkv
    N, S, sink, n_pick = _selection(
        b, N, S, sink, n_pick, seq_lens_ptr, num_scored_ptr, budgets_ptr, seq_ok_ptr, sink, PAGED
    )
    row_scores = scores_ptr + b.to(tl.int64) * stride_sb + g.to(tl.int64) * stride_sg
    k_src = k_ptr + g.to(tl.int64) * stride_kh
    v_src = v_ptr + g.to(tl.int64) * stride_vh
    kept_row = kept_ptr + row.to(tl.int64) * kept_width
    threshold = tl.load(threshold_ptr + row).to(tl.uint32)
    need = tl.load(need_ptr + row)
    if PAGED:
        d_lo = tl.program_id(1) * BLOCK_D
        kept_before = 0
        ties_before = 0
        for start in range(0, N, CHUNK):
            kept, ties = _compact_chunk(
                row_scores,
                k_src,
                v_src,
                k_src,
                v_src,
                kept_row,
                block_table_ptr,
                b,
                start,
                kept_before,
                ties_before,
                threshold,
                need,
                N,
                S,
                sink,
                d_lo,
                tl.minimum(d_lo + BLOCK_D, D),
                stride_ss,
                stride_table,
                stride_kb,
                stride_kn,
                stride_vb,
                stride_vn,
                b,
                stride_kb,
                stride_kn,
                stride_vb,
                stride_vn,
                tl.program_id(1) == 0,
                CHUNK,
                BLOCK_D,
                PAGED,
                CACHE_BLOCK,
            )
            kept_before += kept
            ties_before += ties
    else:
        chunk = tl.program_id(1)
        start = chunk * CHUNK
        # Chunks starting at or after S hold no candidate: all n_pick picks come before them.
        has_offsets = start < S
        above_before = tl.load(above_before_ptr + row.to(tl.int64) * num_chunks + chunk, mask=has_offsets, other=n_pick)
        ties_before = tl.load(ties_before_ptr + row.to(tl.int64) * num_chunks + chunk, mask=has_offsets, other=0)
        kept_before = tl.minimum(start, sink) + above_before + tl.minimum(ties_before, need) + tl.maximum(start - S, 0)
        _compact_chunk(
            row_scores,
            k_src,
            v_src,
            k_out_ptr,
            v_out_ptr,
            kept_row,
            block_table_ptr,
            b,
            start,
            kept_before,
            ties_before,
            threshold,
            need,
            N,
            S,
            sink,
            0,
            D,
            stride_ss,
            stride_table,
            stride_kb,
            stride_kn,
            stride_vb,
            stride_vn,
            row,
            kept_width * D,
            D,
            kept_width * D,
            D,
            True,
            CHUNK,
            BLOCK_D,
            PAGED,
            CACHE_BLOCK,
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
    no_index = (None, None, None, None)  # dense: no per-sequence index tensors
    _threshold_kernel[(rows,)](
        scores,
        threshold,
        need,
        above_before,
        ties_before,
        *no_index,
        Hkv,
        N,
        S,
        sink,
        n_pick,
        num_chunks,
        *scores.stride(),
        BLOCK=SELECT_BLOCK,
        CHUNK=CHUNK,
        RADIX_BITS=RADIX_BITS,
        PAGED=False,
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
        None,
        *no_index,
        Hkv,
        N,
        S,
        D,
        sink,
        n_pick,
        num_chunks,
        M,
        0,
        *scores.stride(),
        *k.stride()[:3],
        *v.stride()[:3],
        CHUNK=CHUNK,
        BLOCK_D=BLOCK_D,
        PAGED=False,
        CACHE_BLOCK=0,
        num_warps=8,
    )
    return k_out, v_out, kept


def paged_select_compact(scores, k_cache, v_cache, block_table, seq_lens, num_scored, budgets, num_sink, layout):
    """In place. Kept positions ascend, so kept[m] ≥ m: the row moving to slot m comes from slot
    kept[m] ≥ m. One program owns one (sequence, KV head, head-dim slice): no other program touches
    its elements (heads and slices are disjoint elements; a sequence's slots map to its own cache
    entries, docs/ops.md §6). It takes the positions CHUNK by CHUNK in increasing order and reads
    every kept row of a chunk before writing any (a barrier between the chunk's loads and its
    stores). The writes of chunk c go to slots m ≤ kept[m] < (c + 1)·CHUNK, so they never reach a
    later chunk's sources (positions ≥ (c + 1)·CHUNK), and every earlier or same chunk has finished
    its reads before chunk c writes: no move reads a slot that another move has already written.
    Rows already in their slot (m = kept[m]) are not rewritten, so budgets[b] ≥ N_b leaves the
    sequence bit for bit as it was."""
    B, Hkv, width = scores.shape
    block_size, _, stride_kb, stride_kn, stride_kh = cache_geometry(k_cache, layout)
    _, _, stride_vb, stride_vn, stride_vh = cache_geometry(v_cache, layout)
    D = k_cache.shape[-1]
    rows = B * Hkv
    device = k_cache.device
    seq_ok, _ = check_sequences(
        block_table, seq_lens, num_scored, k_cache.shape[0], block_size, width, budgets=budgets, num_sink=num_sink
    )
    index = (seq_lens, num_scored, budgets, seq_ok)

    threshold = torch.empty(rows, dtype=torch.int64, device=device)
    need = torch.empty(rows, dtype=torch.int32, device=device)
    _threshold_kernel[(rows,)](
        scores,
        threshold,
        need,
        None,
        None,
        *index,
        Hkv,
        0,
        0,
        num_sink,  # the sink count is per sequence: min(num_sink, S_b)
        0,
        0,
        *scores.stride(),
        BLOCK=SELECT_BLOCK,
        CHUNK=CHUNK,
        RADIX_BITS=RADIX_BITS,
        PAGED=True,
        num_warps=8,
    )

    capacity = block_table.shape[1] * block_size
    kept = torch.full((B, Hkv, capacity), -1, dtype=torch.int32, device=device)
    _compact_kernel[(rows, triton.cdiv(D, BLOCK_D))](
        scores,
        k_cache,
        v_cache,
        threshold,
        need,
        None,
        None,
        kept,
        k_cache,
        v_cache,
        block_table,
        *index,
        Hkv,
        0,
        0,
        D,
        num_sink,
        0,
        0,
        capacity,
        block_table.stride(0),
        *scores.stride(),
        stride_kb,
        stride_kh,
        stride_kn,
        stride_vb,
        stride_vh,
        stride_vn,
        CHUNK=CHUNK,
        BLOCK_D=BLOCK_D,
        PAGED=True,
        CACHE_BLOCK=block_size,
        num_warps=8,
    )
    new_lens = torch.where(seq_ok != 0, torch.minimum(budgets, seq_lens), -1).to(torch.int32)
    return new_lens, kept
