"""Python API of the four ops, with keyword defaults and `backend=` selection (docs/ops.md).

`backend="auto"` goes through torch.ops.lookaheadkv (device dispatch, torch.compile-friendly);
any other backend name validates the arguments the same way and calls that backend directly, with
the same autograd.
"""

from __future__ import annotations

import math

import torch

from .library import ARGUMENTS, run_differentiable
from .validation import check_arguments


def _call(op, backend, *args):
    if backend == "auto":
        if not torch.compiler.is_compiling():  # traced calls get fake-kernel checks (and may hold SymInts)
            check_arguments(ARGUMENTS[op], args)
        return getattr(torch.ops.lookaheadkv, op)(*args)
    return run_differentiable(op, backend, *args)


def lookahead_qproj(
    x: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    *,
    bias: torch.Tensor | None = None,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    lora_scale: float = 1.0,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """Query projection of the lookahead rows, with LoRA, optional q-norm and RoPE fused.

    q = x·Wᵀ (+ bias) + lora_scale·(x·Aᵀ)·Bᵀ, viewed [T, num_heads, D]; RMSNorm over D with
    `norm_weight` if given (Qwen3 q_norm); RoPE in the HF rotate_half layout with cos/sin [T, D].
    Returns q [T, num_heads, D] in x's dtype.
    """
    return _call(
        "lookahead_qproj", backend, x, weight, bias, lora_a, lora_b, lora_scale, cos, sin, num_heads, norm_weight, eps
    )


def _attention_defaults(q, k, num_scored, scale):
    return (k.shape[2] if num_scored is None else num_scored), (
        1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    )


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    num_scored: int | None = None,
    scale: float | None = None,
    gqa_reduce: str = "mean",
    pool_kernel: int = 1,
    pool_type: str = "max",
    query_reduce: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Importance of each of the first `num_scored` keys for the queries q (the last Tq positions).

    q [B, Hq, Tq, D], k [B, Hkv, N, D]. Causal softmax(scale·q·kᵀ), reduced over the Tq queries of
    each head (`query_reduce` "mean", or "max": a key counts as much as the one query that attends
    to it most), GQA reduce ("mean"/"max") over each KV head's query heads, then 1-D pooling (odd
    `pool_kernel`, "max" or "avg"). Returns float32 scores [B, Hkv, num_scored]. Defaults:
    num_scored = N, scale = 1/sqrt(D).
    """
    num_scored, scale = _attention_defaults(q, k, num_scored, scale)
    return _call("attention_scores", backend, q, k, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce)


def lookahead_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_scored: int | None = None,
    scale: float | None = None,
    gqa_reduce: str = "mean",
    pool_kernel: int = 1,
    pool_type: str = "max",
    query_reduce: str = "mean",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention output [B, Hq, Tq, D] of q over (k, v) and, from the same pass, the scores of
    `attention_scores` with the same arguments."""
    num_scored, scale = _attention_defaults(q, k, num_scored, scale)
    return _call(
        "lookahead_attention", backend, q, k, v, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce
    )


def select_compact(
    scores: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    budget: int,
    *,
    num_sink: int = 0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep min(budget, N) cache entries per (batch, KV head): the first `num_sink` positions, the
    unscored tail [S, N), and the best-scoring rest (ties: lower position; NaN last). Returns
    (k_out, v_out, kept) with kept ascending int64 [B, Hkv, M] and k_out[..., m, :] = k[..., kept[m], :].
    """
    return _call("select_compact", backend, scores, k, v, budget, num_sink)


def _paged_defaults(q, seq_lens, num_scored, scale):
    return (seq_lens if num_scored is None else num_scored), (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)


def paged_attention_scores(
    q: torch.Tensor,
    q_offsets: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    num_scored: torch.Tensor | None = None,
    scale: float | None = None,
    gqa_reduce: str = "mean",
    pool_kernel: int = 1,
    pool_type: str = "max",
    query_reduce: str = "mean",
    layout: str = "NHD",
    backend: str = "auto",
) -> torch.Tensor:
    """`attention_scores` of a ragged batch whose keys live in a paged cache.

    q [sum Tq_b, Hq, D] packs every sequence's queries (the last Tq_b of its seq_lens[b] positions),
    q_offsets [B+1] their row offsets; k_cache [num_blocks, block_size, Hkv, D] ("NHD", vLLM) or
    [num_blocks, Hkv, block_size, D] ("HND", FlashInfer); block_table [B, max_blocks] the block of each
    logical block; num_scored [B] (default: seq_lens). Returns float32 scores
    [B, Hkv, max_blocks * block_size], -inf past each sequence's num_scored.
    """
    num_scored, scale = _paged_defaults(q, seq_lens, num_scored, scale)
    return _call(
        "paged_attention_scores",
        backend,
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
    )


def paged_lookahead_attention(
    q: torch.Tensor,
    q_offsets: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    num_scored: torch.Tensor | None = None,
    scale: float | None = None,
    gqa_reduce: str = "mean",
    pool_kernel: int = 1,
    pool_type: str = "max",
    query_reduce: str = "mean",
    layout: str = "NHD",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention output [sum Tq_b, Hq, D] of the packed queries over their paged (k, v) and,
    from the same pass, the scores of `paged_attention_scores` with the same arguments."""
    num_scored, scale = _paged_defaults(q, seq_lens, num_scored, scale)
    return _call(
        "paged_lookahead_attention",
        backend,
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


def paged_select_compact(
    scores: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    budgets: torch.Tensor,
    *,
    num_scored: torch.Tensor | None = None,
    num_sink: int = 0,
    layout: str = "NHD",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`select_compact` of each sequence of a paged cache, in place: per sequence and KV head the
    kept positions (sinks, the unscored tail [num_scored_b, seq_lens_b), the best-scoring rest) move,
    in order, to logical slots [0, M_b) of the sequence's own blocks, M_b = min(budgets_b, seq_lens_b)
    for every head. Returns (new_lens [B] int32 = M_b, kept [B, Hkv, max_blocks * block_size] int32,
    ascending, -1 past M_b). A sequence with budgets_b >= seq_lens_b is left untouched. The caller
    frees the blocks past ceil(M_b / block_size)."""
    num_scored = seq_lens if num_scored is None else num_scored
    return _call(
        "paged_select_compact",
        backend,
        scores,
        k_cache,
        v_cache,
        block_table,
        seq_lens,
        num_scored,
        budgets,
        num_sink,
        layout,
    )


__all__ = [
    "lookahead_qproj",
    "attention_scores",
    "lookahead_attention",
    "select_compact",
    "paged_attention_scores",
    "paged_lookahead_attention",
    "paged_select_compact",
]
