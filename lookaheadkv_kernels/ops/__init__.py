"""Python API of the four ops, with keyword defaults and `backend=` selection (docs/ops.md).

`backend="auto"` goes through torch.ops.lookaheadkv (device dispatch, torch.compile-friendly);
any other backend name validates the arguments the same way and calls that backend directly.
"""

from __future__ import annotations

import math

import torch

from .library import run


def _call(op, backend, *args):
    if backend == "auto":
        return getattr(torch.ops.lookaheadkv, op)(*args)
    return run(op, backend, *args)


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


__all__ = ["lookahead_qproj", "attention_scores", "lookahead_attention", "select_compact"]
