"""What the kernels share to run on a paged cache (docs/ops.md, "Paged ops"): the row addressing of a
cache (dense, or through a block table), the geometry of the two block layouts, and the device-side
check of the index data.

On CUDA nothing may synchronise the host, so the index data is checked on the device, once per call,
by _check_sequences_kernel: a sequence whose lengths, query offsets, budget or block ids are out of
range is marked invalid, and every later kernel treats it as a sequence without keys or queries, so
nothing of it is read or written through its indices (its outputs are NaN / -1 instead). Valid
sequences only read table entries [0, ceil(N_b / block_size)), all checked to be block ids.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHECK_BLOCK = 128  # table entries (or query rows) per step of the check


@triton.jit
def row_offsets(
    block_table_ptr,
    stride_table,
    seq,
    slots,
    mask,
    stride_block,
    stride_slot,
    PAGED: tl.constexpr,
    CACHE_BLOCK: tl.constexpr,
):
    """Element offsets of the rows at logical slots `slots` of sequence `seq` (one KV head's rows: the
    head's offset is the caller's). Dense: sequence `seq` is block `seq`, one block of all its slots.
    Paged: slot j is entry j % CACHE_BLOCK of block block_table[seq, j // CACHE_BLOCK], read where
    `mask` holds."""
    if PAGED:
        table_row = block_table_ptr + seq.to(tl.int64) * stride_table
        block = tl.load(table_row + slots // CACHE_BLOCK, mask=mask, other=0)
        entry = slots % CACHE_BLOCK
    else:
        block = seq
        entry = slots
    return block.to(tl.int64) * stride_block + entry.to(tl.int64) * stride_slot


def cache_geometry(cache: torch.Tensor, layout: str) -> tuple[int, int, int, int, int]:
    """(block_size, Hkv, stride_block, stride_slot, stride_head) of a paged cache: NHD is
    [num_blocks, block_size, Hkv, D] (vLLM), HND is [num_blocks, Hkv, block_size, D] (FlashInfer)."""
    if layout == "NHD":
        return cache.shape[1], cache.shape[2], cache.stride(0), cache.stride(1), cache.stride(2)
    return cache.shape[2], cache.shape[1], cache.stride(0), cache.stride(2), cache.stride(1)


@triton.jit
def _check_sequences_kernel(
    seq_ok_ptr,
    row_ok_ptr,
    block_table_ptr,
    seq_lens_ptr,
    num_scored_ptr,
    q_offsets_ptr,
    budgets_ptr,
    max_blocks,
    num_blocks,
    score_width,
    query_rows,
    num_sink,
    CACHE_BLOCK: tl.constexpr,
    HAS_QUERIES: tl.constexpr,
    HAS_BUDGETS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """seq_ok[b] = 1 if sequence b's index data is in range, else 0. HAS_QUERIES: also its query
    offsets, and row_ok[r] = seq_ok[b] for the rows r of the sequence's in-range query rows (rows of
    no such sequence keep the caller's 0). HAS_BUDGETS: also its budget (docs/ops.md §6)."""
    b = tl.program_id(0)
    n = tl.load(seq_lens_ptr + b)
    s = tl.load(num_scored_ptr + b)
    ok = (s >= 1) & (s <= n) & (n <= max_blocks * CACHE_BLOCK) & (s <= score_width)
    used_blocks = tl.where(ok, tl.cdiv(n, CACHE_BLOCK), 0)  # table reads stay in row b
    table_row = block_table_ptr + b.to(tl.int64) * max_blocks
    bad_ids = 0
    for start in range(0, used_blocks, BLOCK):
        entry = start + tl.arange(0, BLOCK)
        ids = tl.load(table_row + entry, mask=entry < used_blocks, other=0)
        bad_ids += tl.sum(((ids < 0) | (ids >= num_blocks)).to(tl.int32), axis=0)
    ok = ok & (bad_ids == 0)
    if HAS_BUDGETS:
        budget = tl.load(budgets_ptr + b)
        protected = tl.minimum(s, num_sink) + n - s
        ok = ok & (budget >= 1) & ((budget >= n) | (budget >= protected))
    if HAS_QUERIES:
        first = tl.load(q_offsets_ptr + b)
        end = tl.load(q_offsets_ptr + b + 1)
        rows_in_range = (first >= 0) & (first < end) & (end <= query_rows)
        ok = ok & rows_in_range & (end - first <= n)
        end = tl.where(rows_in_range, end, first)
        for start in range(first, end, BLOCK):
            row = start + tl.arange(0, BLOCK)
            tl.store(row_ok_ptr + row, ok.to(tl.int32) + tl.zeros_like(row), mask=row < end)
    tl.store(seq_ok_ptr + b, ok.to(tl.int32))


def check_sequences(
    block_table,
    seq_lens,
    num_scored,
    num_blocks,
    block_size,
    score_width,
    *,
    q_offsets=None,
    query_rows=0,
    budgets=None,
    num_sink=0,
):
    """Device-side index checks: seq_ok [B] int32 and, with q_offsets (of q's `query_rows` rows),
    row_ok [query_rows] int32. score_width bounds num_scored (the scores' width, or the capacity)."""
    B, max_blocks = block_table.shape
    device = block_table.device
    seq_ok = torch.empty(B, dtype=torch.int32, device=device)
    row_ok = None if q_offsets is None else torch.zeros(query_rows, dtype=torch.int32, device=device)
    _check_sequences_kernel[(B,)](
        seq_ok,
        row_ok,
        block_table,
        seq_lens,
        num_scored,
        q_offsets,
        budgets,
        max_blocks,
        num_blocks,
        score_width,
        query_rows,
        num_sink,
        CACHE_BLOCK=block_size,
        HAS_QUERIES=q_offsets is not None,
        HAS_BUDGETS=budgets is not None,
        BLOCK=CHECK_BLOCK,
    )
    return seq_ok, row_ok
