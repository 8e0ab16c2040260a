"""Pure-PyTorch reference of every op (docs/ops.md), written for clarity, not speed.

Float64 inputs are computed in float64 (the tests' ground truth); every other dtype is computed in
float32, like the kernels. Works on any device. Also the backward of the differentiable ops
(ops/library.py differentiates through these functions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def available(device: torch.device | None = None) -> tuple[bool, str | None]:
    return True, None


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def rotate_half(q: torch.Tensor) -> torch.Tensor:
    half = q.shape[-1] // 2
    return torch.cat((-q[..., half:], q[..., :half]), dim=-1)


def lookahead_qproj(x, weight, bias, lora_a, lora_b, lora_scale, cos, sin, num_heads, norm_weight, eps):
    cd = _compute_dtype(x)
    xf = x.to(cd)
    q = xf @ weight.to(cd).T
    if bias is not None:
        q = q + bias.to(cd)
    if lora_a is not None:
        q = q + lora_scale * ((xf @ lora_a.to(cd).T) @ lora_b.to(cd).T)
    q = q.view(x.shape[0], num_heads, -1)
    if norm_weight is not None:
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.to(cd)
    cos_, sin_ = cos.to(cd)[:, None, :], sin.to(cd)[:, None, :]
    return (q * cos_ + rotate_half(q) * sin_).to(x.dtype)


def _grouped_probabilities(q, k, scale):
    """Causal softmax probabilities [B, Hkv, G, Tq, N] of the queries (grouped by KV head)."""
    B, Hq, Tq, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    cd = _compute_dtype(q)
    qg = q.to(cd).reshape(B, Hkv, Hq // Hkv, Tq, D)
    logits = torch.einsum("bhgtd,bhnd->bhgtn", qg, k.to(cd)) * scale
    query_pos = torch.arange(N - Tq, N, device=q.device)
    key_pos = torch.arange(N, device=q.device)
    hidden = key_pos[None, :] > query_pos[:, None]
    # Zeroing the hidden keys after the softmax keeps them at exactly 0 even when a visible logit
    # is NaN (the contract: a NaN row poisons only the keys it sees).
    return torch.softmax(logits.masked_fill(hidden, float("-inf")), dim=-1).masked_fill(hidden, 0.0)


def _pool(raw, pool_kernel, pool_type):
    if pool_kernel == 1:
        return raw
    B, Hkv, S = raw.shape
    flat = raw.reshape(B * Hkv, 1, S)
    if pool_type == "max":
        pooled = F.max_pool1d(flat, pool_kernel, stride=1, padding=pool_kernel // 2)
    else:
        pooled = F.avg_pool1d(flat, pool_kernel, stride=1, padding=pool_kernel // 2, count_include_pad=True)
    return pooled.reshape(B, Hkv, S)


def _scores(probs, num_scored, gqa_reduce, pool_kernel, pool_type, query_reduce):
    visible = probs[..., :num_scored]
    # over the Tq queries of each head: [B, Hkv, G, S] (hidden keys are 0, so they never win a max)
    per_head = visible.mean(dim=3) if query_reduce == "mean" else visible.amax(dim=3)
    raw = per_head.mean(dim=2) if gqa_reduce == "mean" else per_head.amax(dim=2)
    return _pool(raw, pool_kernel, pool_type)


def _score_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def attention_scores(q, k, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce):
    probs = _grouped_probabilities(q, k, scale)
    return _scores(probs, num_scored, gqa_reduce, pool_kernel, pool_type, query_reduce).to(_score_dtype(q))


def lookahead_attention(q, k, v, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce):
    probs = _grouped_probabilities(q, k, scale)
    out = torch.einsum("bhgtn,bhnd->bhgtd", probs, v.to(probs.dtype)).reshape(q.shape).to(q.dtype)
    scores = _scores(probs, num_scored, gqa_reduce, pool_kernel, pool_type, query_reduce).to(_score_dtype(q))
    return out, scores


def kept_positions(scores, num_keys, budget, num_sink):
    """The ascending kept positions [B, Hkv, M] of select_compact (contract rules for ties and NaN)."""
    B, Hkv, S = scores.shape
    N = num_keys
    device = scores.device
    if budget >= N:
        return torch.arange(N, device=device).expand(B, Hkv, N).contiguous()
    sink = min(num_sink, S)
    n_pick = budget - sink - (N - S)
    candidates = scores[..., sink:].to(torch.float32)  # the contract compares scores as float32
    is_nan = torch.isnan(candidates)
    # Stable sorts give the total order: by score descending (equal scores keep position order),
    # then NaN after every number (a second stable sort on the NaN flag).
    order = torch.sort(candidates.masked_fill(is_nan, 0.0), dim=-1, descending=True, stable=True).indices
    nan_last = torch.sort(is_nan.gather(-1, order).to(torch.uint8), dim=-1, stable=True).indices
    chosen = order.gather(-1, nan_last)[..., :n_pick] + sink
    protected = torch.cat((torch.arange(sink, device=device), torch.arange(S, N, device=device))).expand(B, Hkv, -1)
    return torch.sort(torch.cat((protected, chosen), dim=-1), dim=-1).values


def select_compact(scores, k, v, budget, num_sink):
    kept = kept_positions(scores, k.shape[2], budget, num_sink)
    index = kept[..., None].expand(-1, -1, -1, k.shape[-1])
    return k.gather(2, index), v.gather(2, index), kept


# ---- paged ops: each sequence gathered out of the block cache, then the dense ops ------------------


def paged_geometry(cache, layout):
    """(block_size, Hkv, D) of a paged cache: NHD is [num_blocks, block_size, Hkv, D] (vLLM),
    HND is [num_blocks, Hkv, block_size, D] (FlashInfer)."""
    _, a, b, D = cache.shape
    return (a, b, D) if layout == "NHD" else (b, a, D)


def _logical_slots(block_table_row, count, block_size):
    """(block id, offset in block) of logical slots 0..count-1 of one sequence."""
    slots = torch.arange(count, device=block_table_row.device)
    return block_table_row.long()[slots // block_size], slots % block_size


def gather_sequence(cache, block_table_row, length, layout):
    """One sequence's [Hkv, length, D] out of a paged cache (NHD or HND blocks)."""
    blocks, offsets = _logical_slots(block_table_row, length, paged_geometry(cache, layout)[0])
    rows = cache[blocks, offsets] if layout == "NHD" else cache[blocks, :, offsets]  # [length, Hkv, D]
    return rows.transpose(0, 1)


def scatter_sequence(cache, block_table_row, rows, layout):
    """Writes rows [Hkv, M, D] into logical slots 0..M-1 of one sequence."""
    blocks, offsets = _logical_slots(block_table_row, rows.shape[1], paged_geometry(cache, layout)[0])
    if layout == "NHD":
        cache[blocks, offsets] = rows.transpose(0, 1).to(cache.dtype)
    else:
        cache[blocks, :, offsets] = rows.transpose(0, 1).to(cache.dtype)


def _paged_attention(
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
    B = block_table.shape[0]
    capacity = block_table.shape[1] * paged_geometry(k_cache, layout)[0]
    scores = torch.full(
        (B, paged_geometry(k_cache, layout)[1], capacity),
        float("-inf"),
        dtype=_score_dtype(q),
        device=q.device,
    )
    out = None if v_cache is None else torch.empty_like(q)
    for b in range(B):
        n, s = int(seq_lens[b]), int(num_scored[b])
        q0, q1 = int(q_offsets[b]), int(q_offsets[b + 1])
        qb = q[q0:q1].transpose(0, 1)[None]
        kb = gather_sequence(k_cache, block_table[b], n, layout)[None]
        if v_cache is None:
            sb = attention_scores(qb, kb, s, scale, gqa_reduce, pool_kernel, pool_type, query_reduce)
        else:
            vb = gather_sequence(v_cache, block_table[b], n, layout)[None]
            ob, sb = lookahead_attention(qb, kb, vb, s, scale, gqa_reduce, pool_kernel, pool_type, query_reduce)
            out[q0:q1] = ob[0].transpose(0, 1)
        scores[b, :, :s] = sb[0]
    return out, scores


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
    return _paged_attention(
        q,
        q_offsets,
        k_cache,
        None,
        block_table,
        seq_lens,
        num_scored,
        scale,
        gqa_reduce,
        pool_kernel,
        pool_type,
        query_reduce,
        layout,
    )[1]


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
    return _paged_attention(
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
    )


def paged_select_compact(scores, k_cache, v_cache, block_table, seq_lens, num_scored, budgets, num_sink, layout):
    B, Hkv = scores.shape[:2]
    capacity = block_table.shape[1] * paged_geometry(k_cache, layout)[0]
    new_lens = torch.empty(B, dtype=torch.int32, device=scores.device)
    kept = torch.full((B, Hkv, capacity), -1, dtype=torch.int32, device=scores.device)
    for b in range(B):
        n, s, budget = int(seq_lens[b]), int(num_scored[b]), int(budgets[b])
        if budget >= n:  # nothing to evict: the sequence is left as it is
            new_lens[b] = n
            kept[b, :, :n] = torch.arange(n, dtype=torch.int32, device=scores.device)
            continue
        positions = kept_positions(scores[b : b + 1, :, :s], n, budget, num_sink)[0]  # [Hkv, M]
        index = positions.to(k_cache.device)[..., None].expand(-1, -1, k_cache.shape[-1])
        for cache in (k_cache, v_cache):
            rows = gather_sequence(cache, block_table[b], n, layout).gather(1, index)
            scatter_sequence(cache, block_table[b], rows, layout)
        new_lens[b] = positions.shape[1]
        kept[b, :, : positions.shape[1]] = positions.to(torch.int32)
    return new_lens, kept
