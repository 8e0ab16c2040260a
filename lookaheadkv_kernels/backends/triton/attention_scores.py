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
Everything is sized from shapes and int arguments only: no host synchronisation.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import INTERPRETING, autotune, dot_acc, dot_upcast, max_propagate_nan, next_pow2, target_programs

LOG2E = math.log2(math.e)
ROWS_PER_BLOCK = 128  # query rows of one program: 128 × D fp32 P·V accumulators still fit registers
MIN_DOT_ROWS = 16  # tl.dot needs at least 16 rows
BLOCK_D_MIN = 16  # and a reduction dim of at least 16
SPLIT_ALIGN = 16 if INTERPRETING else 128  # key splits start on a multiple of every BLOCK_N used
MIN_SPLIT_KEYS = 4 * SPLIT_ALIGN  # a split reloads its Q rows and adds a partial to every row's combine
POOL_BLOCK = 64 if INTERPRETING else 512
SUM_BLOCK = 64 if INTERPRETING else 1024

_STATS_CONFIGS = [
    triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n in (64, 128) for w in (4, 8) for s in (2, 3)
]
# Pass 2 runs 8 warps: with 4, the 128 × D float32 P·V accumulator of the WITH_OUT variant spills
# at D = 128 (ptxas, sm_90: python_tests/triton_sm90_compile.py). Scores must be bit-identical with
# and without the output, and the logits' MMA shapes and the reduction order of the per-head sums
# depend on the config, so both variants share one autotune entry: WITH_OUT is not in the key, and
# both pass tensors of the same dtypes (the key includes them), whichever variant runs first tunes.
_PROB_CONFIGS = [triton.Config({"BLOCK_N": n}, num_warps=8, num_stages=s) for n in (32, 64) for s in (2, 3)]
_INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)
_KEY = ["HEAD_DIM", "BLOCK_H", "BLOCK_TQ"]


@triton.jit
def _row_block(pid_rows, q_chunks, G, Tq, BLOCK_H: tl.constexpr, BLOCK_TQ: tl.constexpr):
    """Head index (within the group), query index and validity of each row of row block pid_rows."""
    head_block = pid_rows // q_chunks
    q_chunk = pid_rows % q_chunks
    r = tl.arange(0, BLOCK_H * BLOCK_TQ)
    head = head_block * BLOCK_H + r // BLOCK_TQ
    query = q_chunk * BLOCK_TQ + r % BLOCK_TQ
    return head, query, (head < G) & (query < Tq)


@triton.jit
def _load_queries(
    q_ptr, b, hq0, head, query, valid, stride_qb, stride_qh, stride_qt, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr
):
    d = tl.arange(0, BLOCK_D)
    rows = q_ptr + b.to(tl.int64) * stride_qb + (hq0 + head).to(tl.int64) * stride_qh + query.to(tl.int64) * stride_qt
    return tl.load(rows[:, None] + d[None, :], mask=valid[:, None] & (d < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _logits(
    q,
    k_base,
    keys,
    key_hi,
    query_pos,
    stride_kn,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """scale·log2(e)·q·kᵀ for the keys `keys`, -inf where a key is causally hidden or ≥ key_hi."""
    d = tl.arange(0, BLOCK_D)
    k_t = tl.load(
        k_base + keys[None, :].to(tl.int64) * stride_kn + d[:, None],
        mask=(keys < key_hi)[None, :] & (d < HEAD_DIM)[:, None],
        other=0.0,
    )
    s = dot_acc(q, k_t, tl.zeros((q.shape[0], keys.shape[0]), tl.float32), UPCAST) * qk_scale
    visible = (keys[None, :] <= query_pos[:, None]) & (keys < key_hi)[None, :]
    return tl.where(visible, s, float("-inf"))


@autotune(_STATS_CONFIGS, _INTERPRETER_CONFIG, key=_KEY)
@triton.jit
def _softmax_stats_kernel(
    q_ptr,
    k_ptr,
    m_ptr,
    l_ptr,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kn,
    Hkv,
    G,
    Tq,
    N,
    q_chunks,
    num_splits,
    split_len,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_TQ: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
):
    bg = tl.program_id(0)
    split = tl.program_id(1)
    b = bg // Hkv
    g = bg % Hkv
    head, query, valid = _row_block(tl.program_id(2), q_chunks, G, Tq, BLOCK_H, BLOCK_TQ)
    q = _load_queries(q_ptr, b, g * G, head, query, valid, stride_qb, stride_qh, stride_qt, HEAD_DIM, BLOCK_D)
    query_pos = N - Tq + query
    k_base = k_ptr + b.to(tl.int64) * stride_kb + g.to(tl.int64) * stride_kh

    key_lo = split * split_len
    # Keys past the row block's last query are hidden from all of its rows: skip them.
    key_hi = tl.minimum(key_lo + split_len, N - Tq + tl.max(tl.where(valid, query, 0)) + 1)
    m = tl.full((BLOCK_H * BLOCK_TQ,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_H * BLOCK_TQ,), tl.float32)
    for start in range(key_lo, key_hi, BLOCK_N):
        logits = _logits(
            q, k_base, start + tl.arange(0, BLOCK_N), key_hi, query_pos, stride_kn, qk_scale, HEAD_DIM, BLOCK_D, UPCAST
        )
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        # A row with no visible key yet keeps m = -inf; subtracting 0 instead avoids -inf - -inf.
        base = tl.where(m_new == float("-inf"), 0.0, m_new)
        # A NaN logit makes l NaN (exp2(NaN) is NaN whatever the max did with it): the row's
        # probabilities all become NaN, as in torch.softmax.
        l = l * tl.exp2(m - base) + tl.sum(tl.exp2(logits - base[:, None]), axis=1)
        m = m_new
    stat = (bg * num_splits + split) * (G * Tq) + head * Tq + query
    tl.store(m_ptr + stat, m, mask=valid)
    tl.store(l_ptr + stat, l, mask=valid)


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
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    Hkv,
    G,
    Tq,
    N,
    S,
    q_chunks,
    num_splits,
    split_len,
    key_limit,
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
):
    """A head's per-key value is its probabilities' mean over the Tq queries, or their max with
    QUERY_MAX (rows outside the block's heads/queries are 0 and probabilities are ≥ 0, so they never
    win; NaN propagates like torch.amax).
    REDUCE_GROUP: this row block is the whole group; write raw[b, g, j], the GQA-reduced per-head
    value (the scores themselves when there is no pooling). Otherwise write, per query chunk and
    head, the head's probabilities summed over the chunk's queries and divided by Tq (their max with
    QUERY_MAX): raw[b, g, q_chunk, head, j], which _reduce_pool_kernel reduces.
    WITH_OUT: also write this split's part of P·V for these rows: parts[split, b, hq, query, :]."""
    bg = tl.program_id(0)
    split = tl.program_id(1)
    pid_rows = tl.program_id(2)
    b = bg // Hkv
    g = bg % Hkv
    head, query, valid = _row_block(pid_rows, q_chunks, G, Tq, BLOCK_H, BLOCK_TQ)
    q = _load_queries(q_ptr, b, g * G, head, query, valid, stride_qb, stride_qh, stride_qt, HEAD_DIM, BLOCK_D)
    query_pos = N - Tq + query

    # Softmax statistics of each row over all keys, from the splits' partial ones (fixed order).
    stat = bg * num_splits * (G * Tq) + head * Tq + query
    m = tl.full((BLOCK_H * BLOCK_TQ,), float("-inf"), tl.float32)
    for part in range(num_splits):
        m = tl.maximum(m, tl.load(m_ptr + stat + part * (G * Tq), mask=valid, other=0.0))
    base = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros((BLOCK_H * BLOCK_TQ,), tl.float32)
    for part in range(num_splits):
        l += tl.load(l_ptr + stat + part * (G * Tq), mask=valid, other=1.0) * tl.exp2(
            tl.load(m_ptr + stat + part * (G * Tq), mask=valid, other=0.0) - base
        )
    inv_l = 1.0 / l
    inv_tq = 1.0 / Tq

    k_base = k_ptr + b.to(tl.int64) * stride_kb + g.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + g.to(tl.int64) * stride_vh
    d = tl.arange(0, BLOCK_D)
    head_of_block = (pid_rows // q_chunks) * BLOCK_H + tl.arange(0, BLOCK_H)
    key_lo = split * split_len
    key_hi = tl.minimum(key_lo + split_len, key_limit)
    acc = tl.zeros((BLOCK_H * BLOCK_TQ, BLOCK_D), tl.float32)
    for start in range(key_lo, key_hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        logits = _logits(q, k_base, keys, key_hi, query_pos, stride_kn, qk_scale, HEAD_DIM, BLOCK_D, UPCAST)
        # Hidden keys are exactly 0 even in a row whose statistics are NaN (docs/ops.md).
        visible = valid[:, None] & (keys[None, :] <= query_pos[:, None]) & (keys < key_hi)[None, :]
        p = tl.where(visible, tl.exp2(logits - base[:, None]) * inv_l[:, None], 0.0)
        if WITH_OUT:
            v = tl.load(
                v_base + keys[:, None].to(tl.int64) * stride_vn + d[None, :],
                mask=(keys < key_hi)[:, None] & (d < HEAD_DIM)[None, :],
                other=0.0,
            )
            acc = dot_acc(p.to(v.dtype), v, acc, UPCAST)
        if QUERY_MAX:
            # p is in [0, 1] or NaN: NaN → +inf for a plain tl.max (one fast reduction, also in the
            # interpreter, where tl.reduce with a combine function runs element by element), then
            # back, so NaN propagates like torch.amax.
            per_head = tl.max(tl.reshape(tl.where(p != p, float("inf"), p), (BLOCK_H, BLOCK_TQ, BLOCK_N)), axis=1)
            per_head = tl.where(per_head == float("inf"), float("nan"), per_head)
        else:
            per_head = tl.sum(tl.reshape(p, (BLOCK_H, BLOCK_TQ, BLOCK_N)), axis=1) * inv_tq
        scored = keys < tl.minimum(key_hi, S)
        if REDUCE_GROUP:
            if GQA_MAX:
                raw = tl.reduce(tl.where((head_of_block < G)[:, None], per_head, float("-inf")), 0, max_propagate_nan)
            else:
                raw = tl.sum(per_head, axis=0) / G
            tl.store(raw_ptr + bg.to(tl.int64) * S + keys, raw, mask=scored)
        else:
            q_chunk = pid_rows % q_chunks
            row = (bg * q_chunks + q_chunk) * G + head_of_block
            tl.store(
                raw_ptr + row[:, None].to(tl.int64) * S + keys[None, :],
                per_head,
                mask=(head_of_block < G)[:, None] & scored[None, :],
            )
    if WITH_OUT:
        out_row = ((split * tl.num_programs(0) + bg) * G + head).to(tl.int64) * Tq + query
        tl.store(out_ptr + out_row[:, None] * HEAD_DIM + d[None, :], acc, mask=valid[:, None] & (d < HEAD_DIM)[None, :])


@triton.jit
def _reduce_pool_kernel(
    sums_ptr,
    scores_ptr,
    S,
    heads_in,
    chunks_in,
    POOL: tl.constexpr,
    POOL_MAX: tl.constexpr,
    GQA_MAX: tl.constexpr,
    QUERY_MAX: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """scores[bg, j] = pool over j' in the window of R_h (C_c sums[bg, c, h, j']), C = sum, or max
    with QUERY_MAX (the chunks' partials are ≥ 0 or NaN, so a max started from 0 is exact).
    heads_in = chunks_in = 1 when pass 2 already reduced the group (sums is then raw)."""
    bg = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    base = sums_ptr + bg.to(tl.int64) * chunks_in * heads_in * S
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
                part = tl.load(base + (c * heads_in + h) * S + pos, mask=inside, other=0.0)
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
    tl.store(scores_ptr + bg.to(tl.int64) * S + j, pooled, mask=j < S)


@triton.jit
def _sum_splits_kernel(parts_ptr, out_ptr, numel, num_splits, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    part = parts_ptr + i
    acc = tl.zeros((BLOCK,), tl.float32)
    for _ in range(num_splits):
        acc += tl.load(part, mask=i < numel, other=0.0)
        part += numel
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


def _run(q, k, v, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce):
    B, Hq, Tq, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    S = num_scored
    device = q.device
    with_out = v is not None
    block_h, block_tq = _row_blocking(G, Tq)
    q_chunks = triton.cdiv(Tq, block_tq)
    row_blocks = triton.cdiv(G, block_h) * q_chunks
    num_splits, split_len = _key_splits(N, B * Hkv * row_blocks, device)
    grid = (B * Hkv, num_splits, row_blocks)
    shapes = dict(
        HEAD_DIM=D,
        BLOCK_D=max(next_pow2(D), BLOCK_D_MIN),
        BLOCK_H=block_h,
        BLOCK_TQ=block_tq,
        UPCAST=dot_upcast(q.dtype),
    )
    qk_scale = scale * LOG2E

    m = torch.empty(B * Hkv * num_splits * G * Tq, dtype=torch.float32, device=device)
    l = torch.empty_like(m)
    _softmax_stats_kernel[grid](
        q,
        k,
        m,
        l,
        *q.stride()[:3],
        *k.stride()[:3],
        Hkv,
        G,
        Tq,
        N,
        q_chunks,
        num_splits,
        split_len,
        qk_scale,
        **shapes,
    )

    reduce_group = row_blocks == 1
    scores = torch.empty(B, Hkv, S, dtype=torch.float32, device=device)
    direct = reduce_group and pool_kernel == 1
    sums = (
        scores
        if direct
        else torch.empty(B * Hkv * (1 if reduce_group else q_chunks * G) * S, dtype=torch.float32, device=device)
    )
    if with_out:
        out = torch.empty(B, Hq, Tq, D, dtype=q.dtype, device=device)
        out_parts = torch.empty(num_splits, B, Hq, Tq, D, dtype=torch.float32, device=device)
        v_arg, v_strides = v, v.stride()[:3]
    else:  # unused stand-ins of the same dtypes: the variants share one autotune key
        out = None
        out_parts, v_arg, v_strides = m, k, (0, 0, 0)
    _probabilities_kernel[grid](
        q,
        k,
        v_arg,
        m,
        l,
        sums,
        out_parts,
        *q.stride()[:3],
        *k.stride()[:3],
        *v_strides,
        Hkv,
        G,
        Tq,
        N,
        S,
        q_chunks,
        num_splits,
        split_len,
        N if with_out else S,
        qk_scale,
        **shapes,
        GQA_MAX=gqa_reduce == "max",
        QUERY_MAX=query_reduce == "max",
        REDUCE_GROUP=reduce_group,
        WITH_OUT=with_out,
    )
    if not direct:
        _reduce_pool_kernel[(B * Hkv, triton.cdiv(S, POOL_BLOCK))](
            sums,
            scores,
            S,
            1 if reduce_group else G,
            1 if reduce_group else q_chunks,
            POOL=pool_kernel,
            POOL_MAX=pool_type == "max",
            GQA_MAX=gqa_reduce == "max",
            QUERY_MAX=query_reduce == "max",
            BLOCK_S=POOL_BLOCK,
        )
    if with_out:
        _sum_splits_kernel[(triton.cdiv(out.numel(), SUM_BLOCK),)](
            out_parts, out, out.numel(), num_splits, BLOCK=SUM_BLOCK
        )
    return out, scores


def attention_scores(q, k, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce):
    return _run(q, k, None, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce)[1]


def lookahead_attention(q, k, v, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce):
    return _run(q, k, v, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce)
