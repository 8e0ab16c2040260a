"""Triton kernels of attention_scores and lookahead_attention (docs/ops.md §2-3): one kernel family,
the P·V output is a constexpr flag of the same probability kernel.

Work decomposition. A program owns one (batch, KV head) pair, one row block of that group's queries
and one split of the key axis:
  - a row block packs BLOCK_H query heads × BLOCK_TQ queries of one GQA group as the M dimension of
    the tensor-core dot (row r = head·BLOCK_TQ + query), so each K/V tile is loaded once for all of
    them and K is never repeated per query head. With G·Tq ≤ ROWS_PER_BLOCK (LookaheadKV: 32
    queries, G ≤ 4) the whole group is one row block;
  - the key axis is split so that one long sequence still fills the GPU (target_programs).
Passes:
  1. _softmax_stats_kernel: per row and split, the running max and sum of exp2 of the logits.
  2. _probabilities_kernel: combines the splits' statistics (fixed order: deterministic), recomputes
     the logits, normalises them into probabilities and, per key, reduces them over the queries of
     each head (mean, or max with QUERY_MAX); with one row block per group it also reduces over the
     GQA group (mean/max) and writes the raw score of each key once. With WITH_OUT it accumulates
     P·V as well.
  3. _reduce_pool_kernel (only when needed): the pooling, as a tiny second kernel rather than a halo
     recompute — a pooled score needs its neighbours' raw scores, which live in other key tiles and
     other splits; the kernel reads the raw scores (S floats per KV head, cache-resident) pool_kernel
     times, which costs far less than recomputing logits of halo keys. When the group spans several
     row blocks (large Tq or G), pass 2 writes per-(query chunk, head) partials instead (sums over
     the chunk's queries divided by Tq, or maxima) and this kernel combines the chunks (sum or max)
     and does the GQA reduce.
  4. _sum_splits_kernel (only with WITH_OUT): adds the splits' float32 partial P·V in fixed order
     and rounds to q's dtype once.
Paged ops (docs/ops.md §5) run the same kernels with PAGED: key and value rows are read through the
sequence's block table (_paged.row_offsets; a dense batch is one block per sequence), and each
sequence's length, num_scored and query offsets are read in the kernels (after _paged's device-side
check of the index data). The grid is sized from shapes alone: every sequence gets key splits of the
capacity and the head blocks of a row block sized by the mean query count; programs past a
sequence's keys or queries do nothing. A sequence with more queries than one row block goes to a
second launch of each pass (MULTI_CHUNK) whose programs loop over its query chunks: the loop costs
registers the common case should not pay. _reduce_pool_kernel always runs for a paged batch: it
writes -inf past each sequence's num_scored and NaN over an invalid sequence.
Everything is sized from shapes and int arguments only: no host synchronisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from ._common import INTERPRETING, autotune, dot_acc, dot_upcast, max_propagate_nan, next_pow2, target_programs
from ._paged import cache_geometry, check_sequences, row_offsets

LOG2E = math.log2(math.e)
ROWS_PER_BLOCK = 128  # query rows of one program: 128 × D fp32 P·V accumulators still fit registers
MIN_DOT_ROWS = 16  # tl.dot needs at least 16 rows
BLOCK_D_MIN = 16  # and a reduction dim of at least 16
SPLIT_ALIGN = 16 if INTERPRETING else 128  # key splits start on a multiple of every BLOCK_N used
MIN_SPLIT_KEYS = 4 * SPLIT_ALIGN  # a split reloads its Q rows and adds a partial to every row's combine
POOL_BLOCK = 64 if INTERPRETING else 512
SUM_BLOCK = 64 if INTERPRETING else 1024

# 8 warps first: the sm_90 compile check compiles each launch's first config, and with 4 warps the
# float32 MULTI_CHUNK variant (a loop over query chunks around the key loop) spills.
_STATS_CONFIGS = [
    triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n in (64, 128) for w in (8, 4) for s in (2, 3)
]
# Pass 2 runs 8 warps: with 4, the 128 × D float32 P·V accumulator of the WITH_OUT variant spills
# at D = 128 (ptxas, sm_90: python_tests/triton_sm90_compile.py). Scores must be bit-identical with
# and without the output, and the logits' MMA shapes and the reduction order of the per-head sums
# depend on the config, so both variants share one autotune entry: WITH_OUT is not in the key, and
# both pass tensors of the same dtypes (the key includes them), whichever variant runs first tunes.
_PROB_CONFIGS = [triton.Config({"BLOCK_N": n}, num_warps=8, num_stages=s) for n in (32, 64) for s in (2, 3)]
_INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)
_KEY = ["HEAD_DIM", "BLOCK_H", "BLOCK_TQ", "CACHE_BLOCK", "MULTI_CHUNK"]


@triton.jit
def _sequence(
    b,
    N,
    S,
    Tq,
    q_ptr,
    stride_qb,
    stride_qt,
    seq_lens_ptr,
    num_scored_ptr,
    q_offsets_ptr,
    seq_ok_ptr,
    Hq,
    chunk_queries,
    PAGED: tl.constexpr,
    MULTI_CHUNK: tl.constexpr,
):
    """(N, S, Tq, its queries' base pointer, its first query row) of sequence b: the call's ints in a
    dense batch; read from the index tensors when paged. Paged, a launch takes only the sequences of
    its kind (MULTI_CHUNK: more than chunk_queries queries); the others, and invalid sequences
    (_paged.py), read as sequences without keys or queries, so nothing of them is touched. Query rows
    (index of the softmax statistics and of the output rows): [B, Hq, Tq] dense, [sum Tq, Hq] paged."""
    if PAGED:
        q_start = tl.load(q_offsets_ptr + b)
        Tq = tl.load(q_offsets_ptr + b + 1) - q_start
        taken = (tl.load(seq_ok_ptr + b) != 0) & ((Tq > chunk_queries) == MULTI_CHUNK)
        N = tl.where(taken, tl.load(seq_lens_ptr + b), 0)
        S = tl.where(taken, tl.load(num_scored_ptr + b), 0)
        Tq = tl.where(taken, Tq, 0)
        return N, S, Tq, q_ptr + q_start.to(tl.int64) * stride_qt, q_start * Hq
    else:
        return N, S, Tq, q_ptr + b.to(tl.int64) * stride_qb, b * Hq * Tq


@triton.jit
def _query_row(first_row, hq, query, Hq, Tq, PAGED: tl.constexpr):
    """Row index of (query head hq, query) among all query rows of the call."""
    if PAGED:
        return first_row + query * Hq + hq
    else:
        return first_row + hq * Tq + query


@triton.jit
def _row_block(head_block, q_chunk, G, Tq, BLOCK_H: tl.constexpr, BLOCK_TQ: tl.constexpr):
    """Head index (within the group), query index and validity of each row of a row block."""
    r = tl.arange(0, BLOCK_H * BLOCK_TQ)
    head = head_block * BLOCK_H + r // BLOCK_TQ
    query = q_chunk * BLOCK_TQ + r % BLOCK_TQ
    return head, query, (head < G) & (query < Tq)


@triton.jit
def _load_queries(q_seq, hq0, head, query, valid, stride_qh, stride_qt, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    rows = q_seq + (hq0 + head).to(tl.int64) * stride_qh + query.to(tl.int64) * stride_qt
    return tl.load(rows[:, None] + d[None, :], mask=valid[:, None] & (d < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _logits(
    q,
    k_head,
    k_rows,
    keys,
    key_hi,
    query_pos,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """scale·log2(e)·q·kᵀ for the keys `keys` (rows k_head + k_rows), -inf where a key is causally
    hidden or ≥ key_hi."""
    d = tl.arange(0, BLOCK_D)
    k_t = tl.load(
        k_head + k_rows[None, :] + d[:, None],
        mask=(keys < key_hi)[None, :] & (d < HEAD_DIM)[:, None],
        other=0.0,
    )
    s = dot_acc(q, k_t, tl.zeros((q.shape[0], keys.shape[0]), tl.float32), UPCAST) * qk_scale
    visible = (keys[None, :] <= query_pos[:, None]) & (keys < key_hi)[None, :]
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _chunk_softmax_stats(
    q_seq,
    k_head,
    m_ptr,
    l_ptr,
    block_table_ptr,
    b,
    g,
    split,
    head_block,
    q_chunk,
    first_row,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kn,
    stride_table,
    G,
    Tq,
    N,
    Hq,
    split_len,
    query_rows,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_TQ: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    PAGED: tl.constexpr,
    CACHE_BLOCK: tl.constexpr,
):
    """Per row of one row block: the running max and sum of exp2 of its logits over this split's keys."""
    head, query, valid = _row_block(head_block, q_chunk, G, Tq, BLOCK_H, BLOCK_TQ)
    q = _load_queries(q_seq, g * G, head, query, valid, stride_qh, stride_qt, HEAD_DIM, BLOCK_D)
    query_pos = N - Tq + query
    key_lo = split * split_len
    # Keys past the row block's last query are hidden from all of its rows: skip them.
    key_hi = tl.minimum(key_lo + split_len, N - Tq + tl.max(tl.where(valid, query, 0)) + 1)
    m = tl.full((BLOCK_H * BLOCK_TQ,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_H * BLOCK_TQ,), tl.float32)
    for start in range(key_lo, key_hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k_rows = row_offsets(
            block_table_ptr, stride_table, b, keys, keys < key_hi, stride_kb, stride_kn, PAGED, CACHE_BLOCK
        )
        logits = _logits(q, k_head, k_rows, keys, key_hi, query_pos, qk_scale, HEAD_DIM, BLOCK_D, UPCAST)
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        # A row with no visible key yet keeps m = -inf; subtracting 0 instead avoids -inf - -inf.
        base = tl.where(m_new == float("-inf"), 0.0, m_new)
        # A NaN logit makes l NaN (exp2(NaN) is NaN whatever the max did with it): the row's
        # probabilities all become NaN, as in torch.softmax.
        l = l * tl.exp2(m - base) + tl.sum(tl.exp2(logits - base[:, None]), axis=1)
        m = m_new
    stat = split * query_rows + _query_row(first_row, g * G + head, query, Hq, Tq, PAGED)
    tl.store(m_ptr + stat, m, mask=valid)
    tl.store(l_ptr + stat, l, mask=valid)


@autotune(_STATS_CONFIGS, _INTERPRETER_CONFIG, key=_KEY)
@triton.jit
def _softmax_stats_kernel(
    q_ptr,
    k_ptr,
    m_ptr,
    l_ptr,
    block_table_ptr,
    seq_lens_ptr,
    num_scored_ptr,
    q_offsets_ptr,
    seq_ok_ptr,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_table,
    Hkv,
    G,
    Tq,
    N,
    S,
    q_chunks,
    split_len,
    query_rows,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_TQ: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    PAGED: tl.constexpr,
    CACHE_BLOCK: tl.constexpr,
    MULTI_CHUNK: tl.constexpr,
):
    bg = tl.program_id(0)
    split = tl.program_id(1)
    pid_rows = tl.program_id(2)
    b = bg // Hkv
    g = bg % Hkv
    Hq = Hkv * G
    N, S, Tq, q_seq, first_row = _sequence(
        b,
        N,
        S,
        Tq,
        q_ptr,
        stride_qb,
        stride_qt,
        seq_lens_ptr,
        num_scored_ptr,
        q_offsets_ptr,
        seq_ok_ptr,
        Hq,
        BLOCK_TQ,
        PAGED,
        MULTI_CHUNK,
    )
    k_head = k_ptr + g.to(tl.int64) * stride_kh
    if MULTI_CHUNK:  # every query chunk of the sequence (paged: q_chunks = 1, a program per head block)
        chunks = tl.cdiv(Tq, BLOCK_TQ)
    else:
        chunks = 1
    for q_chunk in range(0, chunks):
        _chunk_softmax_stats(
            q_seq,
            k_head,
            m_ptr,
            l_ptr,
            block_table_ptr,
            b,
            g,
            split,
            pid_rows // q_chunks,
            pid_rows % q_chunks + q_chunk,
            first_row,
            stride_qh,
            stride_qt,
            stride_kb,
            stride_kn,
            stride_table,
            G,
            Tq,
            N,
            Hq,
            split_len,
            query_rows,
            qk_scale,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_H,
            BLOCK_TQ,
            BLOCK_N,
            UPCAST,
            PAGED,
            CACHE_BLOCK,
        )


@triton.jit
def _query_chunk(
    q_seq,
    m_ptr,
    l_ptr,
    g,
    head_block,
    q_chunk,
    first_row,
    stride_qh,
    stride_qt,
    G,
    Tq,
    Hq,
    num_splits,
    query_rows,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_TQ: tl.constexpr,
    PAGED: tl.constexpr,
):
    """The rows of one row block: (query, valid, q, row, base, inv_l), base and inv_l being each row's
    softmax statistics over all keys, combined from the splits' partial ones (fixed order)."""
    head, query, valid = _row_block(head_block, q_chunk, G, Tq, BLOCK_H, BLOCK_TQ)
    q = _load_queries(q_seq, g * G, head, query, valid, stride_qh, stride_qt, HEAD_DIM, BLOCK_D)
    row = _query_row(first_row, g * G + head, query, Hq, Tq, PAGED)
    m = tl.full((BLOCK_H * BLOCK_TQ,), float("-inf"), tl.float32)
    for part in range(num_splits):
        m = tl.maximum(m, tl.load(m_ptr + part * query_rows + row, mask=valid, other=0.0))
    base = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros((BLOCK_H * BLOCK_TQ,), tl.float32)
    for part in range(num_splits):
        l += tl.load(l_ptr + part * query_rows + row, mask=valid, other=1.0) * tl.exp2(
            tl.load(m_ptr + part * query_rows + row, mask=valid, other=0.0) - base
        )
    return query, valid, q, row, base, 1.0 / l


@triton.jit
def _probabilities(
    q,
    query,
    valid,
    base,
    inv_l,
    k_head,
    k_rows,
    keys,
    key_hi,
    N,
    Tq,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """The rows' softmax probabilities of the keys `keys`."""
    query_pos = N - Tq + query
    logits = _logits(q, k_head, k_rows, keys, key_hi, query_pos, qk_scale, HEAD_DIM, BLOCK_D, UPCAST)
    # Hidden keys are exactly 0 even in a row whose statistics are NaN (docs/ops.md).
    visible = valid[:, None] & (keys[None, :] <= query_pos[:, None]) & (keys < key_hi)[None, :]
    return tl.where(visible, tl.exp2(logits - base[:, None]) * inv_l[:, None], 0.0)


@triton.jit
def _reduce_queries(
    p, inv_tq, BLOCK_H: tl.constexpr, BLOCK_TQ: tl.constexpr, BLOCK_N: tl.constexpr, QUERY_MAX: tl.constexpr
):
    """Per head of the row block and key: the probabilities summed over the block's queries and
    divided by Tq, or their max with QUERY_MAX."""
    if QUERY_MAX:
        # p is in [0, 1] or NaN: NaN → +inf for a plain tl.max (one fast reduction, also in the
        # interpreter, where tl.reduce with a combine function runs element by element), then
        # back, so NaN propagates like torch.amax.
        per_head = tl.max(tl.reshape(tl.where(p != p, float("inf"), p), (BLOCK_H, BLOCK_TQ, BLOCK_N)), axis=1)
        return tl.where(per_head == float("inf"), float("nan"), per_head)
    else:
        return tl.sum(tl.reshape(p, (BLOCK_H, BLOCK_TQ, BLOCK_N)), axis=1) * inv_tq


@triton.jit
def _store_raw(
    raw_ptr,
    per_head,
    bg,
    q_slot,
    keys,
    scored,
    head_of_block,
    G,
    raw_width,
    GQA_MAX: tl.constexpr,
    REDUCE_GROUP: tl.constexpr,
):
    """REDUCE_GROUP: the per-head values are the whole group's; write raw[bg, j], their GQA reduce.
    Otherwise write them as raw[bg, q_slot, head, j], which _reduce_pool_kernel reduces."""
    if REDUCE_GROUP:
        if GQA_MAX:
            raw = tl.reduce(tl.where((head_of_block < G)[:, None], per_head, float("-inf")), 0, max_propagate_nan)
        else:
            raw = tl.sum(per_head, axis=0) / G
        tl.store(raw_ptr + bg.to(tl.int64) * raw_width + keys, raw, mask=scored)
    else:
        raw_row = q_slot * G + head_of_block
        tl.store(
            raw_ptr + raw_row[:, None].to(tl.int64) * raw_width + keys[None, :],
            per_head,
            mask=(head_of_block < G)[:, None] & scored[None, :],
        )


@triton.jit
def _accumulate_values(
    acc, p, v_head, v_rows, keys, key_hi, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr
):
    """acc + P·V over the keys `keys` (rows v_head + v_rows)."""
    d = tl.arange(0, BLOCK_D)
    v = tl.load(
        v_head + v_rows[:, None] + d[None, :],
        mask=(keys < key_hi)[:, None] & (d < HEAD_DIM)[None, :],
        other=0.0,
    )
    return dot_acc(p.to(v.dtype), v, acc, UPCAST)


@triton.jit
def _store_output_part(out_ptr, acc, split, row, valid, query_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """This split's float32 part of the rows' P·V: parts[split, row, :]."""
    d = tl.arange(0, BLOCK_D)
    out_row = (split * query_rows + row).to(tl.int64)
    tl.store(out_ptr + out_row[:, None] * HEAD_DIM + d[None, :], acc, mask=valid[:, None] & (d < HEAD_DIM)[None, :])


@autotune(_PROB_CONFIGS, _INTERPRETER_CONFIG, key=_KEY)
@triton.jit
def _probabilities_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    m_ptr,
    l_ptr,
    raw_ptr,
    out_ptr,
    block_table_ptr,
    seq_lens_ptr,
    num_scored_ptr,
    q_offsets_ptr,
    seq_ok_ptr,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_table,
    Hkv,
    G,
    Tq,
    N,
    S,
    q_chunks,
    num_splits,
    split_len,
    query_rows,
    raw_width,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_TQ: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    GQA_MAX: tl.constexpr,
    QUERY_MAX: tl.constexpr,
    REDUCE_GROUP: tl.constexpr,
    WITH_OUT: tl.constexpr,
    PAGED: tl.constexpr,
    CACHE_BLOCK: tl.constexpr,
    MULTI_CHUNK: tl.constexpr,
):
    """A head's per-key value is its probabilities' mean over the Tq queries, or their max with
    QUERY_MAX (rows outside the block's heads/queries are 0 and probabilities are ≥ 0, so they never
    win; NaN propagates like torch.amax). REDUCE_GROUP: this program sees the whole group; it writes
    the GQA-reduced value of each key (_store_raw). Otherwise, per query chunk and head, the head's
    probabilities summed over the chunk's queries and divided by Tq (their max with QUERY_MAX).
    WITH_OUT: also write this split's part of P·V for these rows (_store_output_part).
    MULTI_CHUNK (paged sequences with more queries than one row block): the program takes all the
    sequence's query chunks; a key's scores need all of them at once and each chunk's P·V needs its
    own accumulator, so the scores visit every chunk per key tile, and the P·V follows chunk by
    chunk."""
    bg = tl.program_id(0)
    split = tl.program_id(1)
    pid_rows = tl.program_id(2)
    b = bg // Hkv
    g = bg % Hkv
    Hq = Hkv * G
    N, S, Tq, q_seq, first_row = _sequence(
        b,
        N,
        S,
        Tq,
        q_ptr,
        stride_qb,
        stride_qt,
        seq_lens_ptr,
        num_scored_ptr,
        q_offsets_ptr,
        seq_ok_ptr,
        Hq,
        BLOCK_TQ,
        PAGED,
        MULTI_CHUNK,
    )
    head_block = pid_rows // q_chunks
    q_chunk = pid_rows % q_chunks
    if PAGED:
        inv_tq = 1.0 / tl.maximum(Tq, 1)  # Tq = 0: a sequence this launch leaves alone
    else:
        inv_tq = 1.0 / Tq
    k_head = k_ptr + g.to(tl.int64) * stride_kh
    v_head = v_ptr + g.to(tl.int64) * stride_vh
    head_of_block = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    key_lo = split * split_len
    key_hi = tl.minimum(key_lo + split_len, N if WITH_OUT else S)
    q_slot = bg * q_chunks + q_chunk

    if MULTI_CHUNK:
        chunks = tl.cdiv(Tq, BLOCK_TQ)
        for start in range(key_lo, key_hi, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            k_rows = row_offsets(
                block_table_ptr, stride_table, b, keys, keys < key_hi, stride_kb, stride_kn, PAGED, CACHE_BLOCK
            )
            per_head = tl.zeros((BLOCK_H, BLOCK_N), tl.float32)
            for c in range(0, chunks):
                query, valid, q, _, base, inv_l = _query_chunk(
                    q_seq,
                    m_ptr,
                    l_ptr,
                    g,
                    head_block,
                    c,
                    first_row,
                    stride_qh,
                    stride_qt,
                    G,
                    Tq,
                    Hq,
                    num_splits,
                    query_rows,
                    HEAD_DIM,
                    BLOCK_D,
                    BLOCK_H,
                    BLOCK_TQ,
                    PAGED,
                )
                p = _probabilities(
                    q,
                    query,
                    valid,
                    base,
                    inv_l,
                    k_head,
                    k_rows,
                    keys,
                    key_hi,
                    N,
                    Tq,
                    qk_scale,
                    HEAD_DIM,
                    BLOCK_D,
                    UPCAST,
                )
                # Per-head values are ≥ 0 or NaN: a max from 0 is exact.
                if QUERY_MAX:
                    per_head = max_propagate_nan(per_head, _reduce_queries(p, inv_tq, BLOCK_H, BLOCK_TQ, BLOCK_N, True))
                else:
                    per_head += _reduce_queries(p, inv_tq, BLOCK_H, BLOCK_TQ, BLOCK_N, False)
            scored = keys < tl.minimum(key_hi, S)
            _store_raw(raw_ptr, per_head, bg, q_slot, keys, scored, head_of_block, G, raw_width, GQA_MAX, REDUCE_GROUP)
        if WITH_OUT:
            for c in range(0, chunks):
                query, valid, q, row, base, inv_l = _query_chunk(
                    q_seq,
                    m_ptr,
                    l_ptr,
                    g,
                    head_block,
                    c,
                    first_row,
                    stride_qh,
                    stride_qt,
                    G,
                    Tq,
                    Hq,
                    num_splits,
                    query_rows,
                    HEAD_DIM,
                    BLOCK_D,
                    BLOCK_H,
                    BLOCK_TQ,
                    PAGED,
                )
                acc = tl.zeros((BLOCK_H * BLOCK_TQ, BLOCK_D), tl.float32)
                for start in range(key_lo, key_hi, BLOCK_N):
                    keys = start + tl.arange(0, BLOCK_N)
                    k_rows = row_offsets(
                        block_table_ptr,
                        stride_table,
                        b,
                        keys,
                        keys < key_hi,
                        stride_kb,
                        stride_kn,
                        PAGED,
                        CACHE_BLOCK,
                    )
                    v_rows = row_offsets(
                        block_table_ptr,
                        stride_table,
                        b,
                        keys,
                        keys < key_hi,
                        stride_vb,
                        stride_vn,
                        PAGED,
                        CACHE_BLOCK,
                    )
                    p = _probabilities(
                        q,
                        query,
                        valid,
                        base,
                        inv_l,
                        k_head,
                        k_rows,
                        keys,
                        key_hi,
                        N,
                        Tq,
                        qk_scale,
                        HEAD_DIM,
                        BLOCK_D,
                        UPCAST,
                    )
                    acc = _accumulate_values(acc, p, v_head, v_rows, keys, key_hi, HEAD_DIM, BLOCK_D, UPCAST)
                _store_output_part(out_ptr, acc, split, row, valid, query_rows, HEAD_DIM, BLOCK_D)
    else:
        query, valid, q, row, base, inv_l = _query_chunk(
            q_seq,
            m_ptr,
            l_ptr,
            g,
            head_block,
            q_chunk,
            first_row,
            stride_qh,
            stride_qt,
            G,
            Tq,
            Hq,
            num_splits,
            query_rows,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_H,
            BLOCK_TQ,
            PAGED,
        )
        acc = tl.zeros((BLOCK_H * BLOCK_TQ, BLOCK_D), tl.float32)
        for start in range(key_lo, key_hi, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            k_rows = row_offsets(
                block_table_ptr, stride_table, b, keys, keys < key_hi, stride_kb, stride_kn, PAGED, CACHE_BLOCK
            )
            p = _probabilities(
                q, query, valid, base, inv_l, k_head, k_rows, keys, key_hi, N, Tq, qk_scale, HEAD_DIM, BLOCK_D, UPCAST
            )
            if WITH_OUT:
                v_rows = row_offsets(
                    block_table_ptr, stride_table, b, keys, keys < key_hi, stride_vb, stride_vn, PAGED, CACHE_BLOCK
                )
                acc = _accumulate_values(acc, p, v_head, v_rows, keys, key_hi, HEAD_DIM, BLOCK_D, UPCAST)
            per_head = _reduce_queries(p, inv_tq, BLOCK_H, BLOCK_TQ, BLOCK_N, QUERY_MAX)
            scored = keys < tl.minimum(key_hi, S)
            _store_raw(raw_ptr, per_head, bg, q_slot, keys, scored, head_of_block, G, raw_width, GQA_MAX, REDUCE_GROUP)
        if WITH_OUT:
            _store_output_part(out_ptr, acc, split, row, valid, query_rows, HEAD_DIM, BLOCK_D)


@triton.jit
def _reduce_pool_kernel(
    sums_ptr,
    scores_ptr,
    num_scored_ptr,
    seq_ok_ptr,
    S,
    width,
    Hkv,
    heads_in,
    chunks_in,
    POOL: tl.constexpr,
    POOL_MAX: tl.constexpr,
    GQA_MAX: tl.constexpr,
    QUERY_MAX: tl.constexpr,
    PAGED: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """scores[bg, j] = pool over j' in the window of R_h (C_c sums[bg, c, h, j']), C = sum, or max
    with QUERY_MAX (the chunks' partials are ≥ 0 or NaN, so a max started from 0 is exact), for
    j < S; rows are `width` wide. heads_in = chunks_in = 1 when pass 2 already reduced the group (sums
    is then raw; with POOL = 1 it may be scores itself: each element is read, then written, by the
    same program). Paged: S is the sequence's, the row is -inf past it, NaN for an invalid sequence."""
    bg = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    if PAGED:
        valid = tl.load(seq_ok_ptr + bg // Hkv) != 0
        S = tl.where(valid, tl.load(num_scored_ptr + bg // Hkv), 0)
    base = sums_ptr + bg.to(tl.int64) * chunks_in * heads_in * width
    if POOL_MAX:
        pooled = tl.full((BLOCK_S,), float("-inf"), tl.float32)
    else:
        pooled = tl.zeros((BLOCK_S,), tl.float32)
    for t in tl.static_range(POOL):
        pos = j + (t - POOL // 2)
        inside = (pos >= 0) & (pos < S)
        if GQA_MAX:
            raw = tl.full((BLOCK_S,), float("-inf"), tl.float32)
        else:
            raw = tl.zeros((BLOCK_S,), tl.float32)
        for h in range(heads_in):
            per_head = tl.zeros((BLOCK_S,), tl.float32)
            for c in range(chunks_in):
                part = tl.load(base + (c * heads_in + h) * width + pos, mask=inside, other=0.0)
                if QUERY_MAX:
                    per_head = max_propagate_nan(per_head, part)
                else:
                    per_head += part
            if GQA_MAX:
                raw = max_propagate_nan(raw, per_head)
            else:
                raw += per_head
        if not GQA_MAX:
            raw = raw / heads_in
        if POOL_MAX:
            pooled = max_propagate_nan(pooled, tl.where(inside, raw, float("-inf")))
        else:
            pooled += tl.where(inside, raw, 0.0)
    if not POOL_MAX:
        pooled = pooled / POOL  # count_include_pad=True: padding counts as zeros
    if PAGED:
        pooled = tl.where(valid, tl.where(j < S, pooled, float("-inf")), float("nan"))
    tl.store(scores_ptr + bg.to(tl.int64) * width + j, pooled, mask=j < width)


@triton.jit
def _sum_splits_kernel(
    parts_ptr, out_ptr, row_ok_ptr, numel, num_splits, row_numel, PAGED: tl.constexpr, BLOCK: tl.constexpr
):
    """out = the splits' float32 parts summed in fixed order, rounded once. Paged: NaN in the rows of
    no valid sequence (row_ok, _paged.py)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    part = parts_ptr + i
    acc = tl.zeros((BLOCK,), tl.float32)
    for _ in range(num_splits):
        acc += tl.load(part, mask=i < numel, other=0.0)
        part += numel
    if PAGED:
        acc = tl.where(tl.load(row_ok_ptr + i // row_numel, mask=i < numel, other=0) != 0, acc, float("nan"))
    tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=i < numel)


def _row_blocking(G: int, Tq: int) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_TQ): the heads × queries of one row block."""
    block_tq = min(next_pow2(Tq), ROWS_PER_BLOCK)
    block_h = min(next_pow2(G), ROWS_PER_BLOCK // block_tq)
    return block_h, max(block_tq, MIN_DOT_ROWS // block_h)


def _key_splits(N: int, programs_without_split: int, device: torch.device) -> tuple[int, int]:
    """(num_splits, split_len): enough key splits to fill the GPU, each at least MIN_SPLIT_KEYS long."""
    wanted = triton.cdiv(target_programs(device), programs_without_split)
    splits = max(1, min(wanted, triton.cdiv(N, MIN_SPLIT_KEYS)))
    split_len = triton.cdiv(triton.cdiv(N, splits), SPLIT_ALIGN) * SPLIT_ALIGN
    return triton.cdiv(N, split_len), split_len


@dataclass
class _Batch:
    """The sequences of one call, as the kernels address them. Dense: B sequences of N keys whose
    last Tq are the queries, S scored. Paged: those values are per sequence, in the index tensors the
    kernels read (`tensors`); the ints here are then what sizes the launch: N = the capacity (every
    sequence's bound), Tq = the mean query count (sizes the row blocks), S unused."""

    B: int
    Hkv: int
    G: int
    N: int
    Tq: int
    S: int
    width: int  # the scores' last dim
    max_queries: int  # a bound on any sequence's query count
    query_rows: int  # (query, head) rows of q: the rows of the softmax statistics and of the output
    q_strides: tuple[int, int, int]  # sequence (dense), head, query
    k_strides: tuple[int, int, int]  # block (dense: sequence), head, slot
    v_strides: tuple[int, int, int] | None
    tensors: dict = field(default_factory=dict)  # paged: block_table, seq_lens, num_scored, q_offsets, seq_ok
    row_ok: torch.Tensor | None = None  # paged: whether each query row belongs to a valid sequence
    cache_block: int = 0  # paged: slots per cache block

    @property
    def paged(self) -> bool:
        return self.cache_block > 0


def _dense_batch(q, k, v, num_scored) -> _Batch:
    B, Hq, Tq, _ = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    return _Batch(
        B=B,
        Hkv=Hkv,
        G=Hq // Hkv,
        N=N,
        Tq=Tq,
        S=num_scored,
        width=num_scored,
        max_queries=Tq,
        query_rows=B * Hq * Tq,
        q_strides=q.stride()[:3],
        k_strides=k.stride()[:3],
        v_strides=None if v is None else v.stride()[:3],
    )


def _paged_batch(q, q_offsets, k_cache, v_cache, block_table, seq_lens, num_scored, layout) -> _Batch:
    rows, Hq, _ = q.shape
    B, max_blocks = block_table.shape
    block_size, Hkv, *k_strides = cache_geometry(k_cache, layout)
    capacity = max_blocks * block_size
    seq_ok, row_ok = check_sequences(
        block_table,
        seq_lens,
        num_scored,
        k_cache.shape[0],
        block_size,
        capacity,
        q_offsets=q_offsets,
        query_rows=rows,
    )

    def kernel_strides(cache):  # (block, slot, head) -> the kernels' (block, head, slot)
        stride_block, stride_slot, stride_head = cache_geometry(cache, layout)[2:]
        return stride_block, stride_head, stride_slot

    return _Batch(
        B=B,
        Hkv=Hkv,
        G=Hq // Hkv,
        N=capacity,
        Tq=triton.cdiv(rows, B),
        S=0,
        width=capacity,
        max_queries=min(rows - B + 1, capacity),  # every other sequence has at least one
        query_rows=rows * Hq,
        q_strides=(0, q.stride(1), q.stride(0)),
        k_strides=kernel_strides(k_cache),
        v_strides=None if v_cache is None else kernel_strides(v_cache),
        tensors=dict(
            block_table=block_table, seq_lens=seq_lens, num_scored=num_scored, q_offsets=q_offsets, seq_ok=seq_ok
        ),
        row_ok=row_ok,
        cache_block=block_size,
    )


def _run(batch: _Batch, q, k, v, scale, gqa_reduce, pool_kernel, pool_type, query_reduce):
    B, Hkv, G = batch.B, batch.Hkv, batch.G
    D = q.shape[-1]
    device = q.device
    with_out = v is not None
    block_h, block_tq = _row_blocking(G, batch.Tq)
    # Paged: a program's row block is one query chunk of a head block; sequences with more queries
    # than one chunk go to a second, MULTI_CHUNK launch (needed when any sequence could have more).
    q_chunks = 1 if batch.paged else triton.cdiv(batch.Tq, block_tq)
    multi_chunk_kinds = (False, True) if batch.paged and batch.max_queries > block_tq else (False,)
    row_blocks = triton.cdiv(G, block_h) * q_chunks
    num_splits, split_len = _key_splits(batch.N, B * Hkv * row_blocks, device)
    grid = (B * Hkv, num_splits, row_blocks)
    index = [batch.tensors.get(name) for name in ("block_table", "seq_lens", "num_scored", "q_offsets", "seq_ok")]
    shapes = dict(
        HEAD_DIM=D,
        BLOCK_D=max(next_pow2(D), BLOCK_D_MIN),
        BLOCK_H=block_h,
        BLOCK_TQ=block_tq,
        UPCAST=dot_upcast(q.dtype),
        PAGED=batch.paged,
        CACHE_BLOCK=batch.cache_block,
    )
    sizes = (Hkv, G, batch.Tq, batch.N, batch.S, q_chunks)
    qk_scale = scale * LOG2E
    stride_table = 0 if not batch.paged else batch.tensors["block_table"].stride(0)

    m = torch.empty(num_splits * batch.query_rows, dtype=torch.float32, device=device)
    l = torch.empty_like(m)
    for multi_chunk in multi_chunk_kinds:
        _softmax_stats_kernel[grid](
            q,
            k,
            m,
            l,
            *index,
            *batch.q_strides,
            *batch.k_strides,
            stride_table,
            *sizes,
            split_len,
            batch.query_rows,
            qk_scale,
            **shapes,
            MULTI_CHUNK=multi_chunk,
        )

    reduce_group = row_blocks == 1
    width = batch.width
    scores = torch.empty(B, Hkv, width, dtype=torch.float32, device=device)
    # Without pooling, a reduced group's raw scores are the scores (paged: filled in place past S_b).
    direct = reduce_group and pool_kernel == 1
    sums = (
        scores
        if direct
        else torch.empty(B * Hkv * (1 if reduce_group else q_chunks * G) * width, dtype=torch.float32, device=device)
    )
    if with_out:
        out = torch.empty(q.shape, dtype=q.dtype, device=device)
        out_parts = torch.empty(num_splits, batch.query_rows, D, dtype=torch.float32, device=device)
        v_arg, v_strides = v, batch.v_strides
    else:  # unused stand-ins of the same dtypes: the variants share one autotune key
        out = None
        out_parts, v_arg, v_strides = m, k, (0, 0, 0)
    for multi_chunk in multi_chunk_kinds:
        _probabilities_kernel[grid](
            q,
            k,
            v_arg,
            m,
            l,
            sums,
            out_parts,
            *index,
            *batch.q_strides,
            *batch.k_strides,
            *v_strides,
            stride_table,
            *sizes,
            num_splits,
            split_len,
            batch.query_rows,
            width,
            qk_scale,
            **shapes,
            GQA_MAX=gqa_reduce == "max",
            QUERY_MAX=query_reduce == "max",
            REDUCE_GROUP=reduce_group,
            WITH_OUT=with_out,
            MULTI_CHUNK=multi_chunk,
        )
    if not direct or batch.paged:
        _reduce_pool_kernel[(B * Hkv, triton.cdiv(width, POOL_BLOCK))](
            sums,
            scores,
            batch.tensors.get("num_scored"),
            batch.tensors.get("seq_ok"),
            batch.S,
            width,
            Hkv,
            1 if reduce_group else G,
            1 if reduce_group else q_chunks,
            POOL=pool_kernel,
            POOL_MAX=pool_type == "max",
            GQA_MAX=gqa_reduce == "max",
            QUERY_MAX=query_reduce == "max",
            PAGED=batch.paged,
            BLOCK_S=POOL_BLOCK,
        )
    if with_out:
        _sum_splits_kernel[(triton.cdiv(out.numel(), SUM_BLOCK),)](
            out_parts,
            out,
            batch.row_ok,
            out.numel(),
            num_splits,
            G * Hkv * D,
            PAGED=batch.paged,
            BLOCK=SUM_BLOCK,
        )
    return out, scores


def attention_scores(q, k, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce):
    batch = _dense_batch(q, k, None, num_scored)
    return _run(batch, q, k, None, scale, gqa_reduce, pool_kernel, pool_type, query_reduce)[1]


def lookahead_attention(q, k, v, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce):
    batch = _dense_batch(q, k, v, num_scored)
    return _run(batch, q, k, v, scale, gqa_reduce, pool_kernel, pool_type, query_reduce)


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
    batch = _paged_batch(q, q_offsets, k_cache, None, block_table, seq_lens, num_scored, layout)
    return _run(batch, q, k_cache, None, scale, gqa_reduce, pool_kernel, pool_type, query_reduce)[1]


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
    batch = _paged_batch(q, q_offsets, k_cache, v_cache, block_table, seq_lens, num_scored, layout)
    return _run(batch, q, k_cache, v_cache, scale, gqa_reduce, pool_kernel, pool_type, query_reduce)
