"""Argument checks of the four ops (docs/ops.md), shared by every backend and by the fake kernels.

Each `check_<op>` raises ValueError / TypeError naming the offending argument, and returns the
arguments normalised for the backends: negative-bit views resolved, last dims made contiguous, small
qproj parameters and select_compact's scores converted to float32. Only shapes, dtypes, layouts,
devices and int/float arguments are inspected (never data), so the checks also run on fake tensors
under torch.compile.
"""

from __future__ import annotations

import math

import torch

from ..backends.reference import paged_geometry

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GQA_REDUCES = ("mean", "max")
QUERY_REDUCES = ("mean", "max")
POOL_TYPES = ("max", "avg")
MAX_HEAD_DIM = 256
MAX_POOL_KERNEL = 31
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _dtype_names(dtypes):
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_dense(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided or t.is_nested:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")


def check_tensor(name, t, ndim, dtypes=FLOAT_DTYPES):
    check_dense(name, t)
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in ({_dtype_names(dtypes)}), got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")


def check_same_device(**tensors):
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}: all tensors must share one device"
            )


def check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value > INT64_MAX:  # the kernels and torch.ops take int64
        raise ValueError(f"{name} must be <= {INT64_MAX} (int64), got {value}")


def check_finite(name, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a finite float, got {value!r}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int beyond float range
        finite = False
    if not finite:
        raise ValueError(f"{name} must be a finite float, got {value!r}")


def check_arguments(arguments, values):
    """The argument types of an op's schema, checked before torch.ops parses them (its own errors dump the
    schema without naming the argument). `arguments`: (name, kind, optional) per schema argument, kind
    one of "tensor", "int", "float", "str"."""
    for (name, kind, optional), value in zip(arguments, values):
        if value is None and optional:
            continue
        if kind == "tensor":
            check_dense(name, value)
        elif kind == "int":
            check_int(name, value, INT64_MIN)
        elif kind == "float":
            check_finite(name, value)
        elif kind == "str" and not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def last_dim_contiguous(t):
    """The kernels index every dim by stride except the last, which must be dense. A negative-bit view
    (x.conj().imag) is materialised, as the dispatcher does before torch.ops kernels: kernels read raw memory."""
    if t is None:
        return t
    t = t.resolve_neg()
    if t.stride(-1) == 1 or t.shape[-1] == 1:
        return t
    return t.contiguous()


def as_float32(t):
    return None if t is None else t.resolve_neg().to(torch.float32).contiguous()


def _check_small_param(name, t, shape):
    if t is None:
        return
    check_tensor(name, t, len(shape), FLOAT_DTYPES + (torch.float64,))
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_lookahead_qproj(x, weight, bias, lora_a, lora_b, lora_scale, cos, sin, num_heads, norm_weight, eps):
    check_tensor("x", x, 2)
    check_tensor("weight", weight, 2)
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    T, hidden = x.shape
    if weight.shape[1] != hidden:
        raise ValueError(
            f"weight must have shape [num_heads*head_dim, {hidden}] (x's hidden size), got {tuple(weight.shape)}"
        )
    check_int("num_heads", num_heads, 1)
    if weight.shape[0] % num_heads:
        raise ValueError(f"weight's first dim {weight.shape[0]} is not a multiple of num_heads={num_heads}")
    D = weight.shape[0] // num_heads
    if D % 2:
        raise ValueError(f"head_dim (weight rows / num_heads) must be even for RoPE, got {D}")
    _check_small_param("bias", bias, (weight.shape[0],))
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must be given together (or neither)")
    if lora_a is not None:
        check_tensor("lora_a", lora_a, 2, FLOAT_DTYPES + (torch.float64,))
        rank = lora_a.shape[0]
        _check_small_param("lora_a", lora_a, (rank, hidden))
        _check_small_param("lora_b", lora_b, (weight.shape[0], rank))
    check_finite("lora_scale", lora_scale)
    _check_small_param("cos", cos, (T, D))
    _check_small_param("sin", sin, (T, D))
    if cos is None or sin is None:
        raise ValueError("cos and sin are required, shape [T, head_dim]")
    _check_small_param("norm_weight", norm_weight, (D,))
    check_finite("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    check_same_device(
        x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, cos=cos, sin=sin, norm_weight=norm_weight
    )
    return (
        last_dim_contiguous(x),
        last_dim_contiguous(weight),
        as_float32(bias),
        as_float32(lora_a),
        as_float32(lora_b),
        float(lora_scale),
        as_float32(cos),
        as_float32(sin),
        num_heads,
        as_float32(norm_weight),
        float(eps),
    )


def check_attention(q, k, v, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce="mean"):
    """Checks of attention_scores (v is None) and lookahead_attention."""
    check_tensor("q", q, 4)
    check_tensor("k", k, 4)
    if k.dtype != q.dtype:
        raise TypeError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
    B, Hq, Tq, D = q.shape
    Bk, Hkv, N, Dk = k.shape
    if Bk != B:
        raise ValueError(f"k's batch {Bk} differs from q's batch {B}")
    if Dk != D:
        raise ValueError(f"k's head_dim {Dk} differs from q's head_dim {D}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be <= {MAX_HEAD_DIM}, got {D}")
    if Hq % Hkv:
        raise ValueError(f"q's heads ({Hq}) must be a multiple of k's heads ({Hkv}) (GQA)")
    if Tq > N:
        raise ValueError(f"q has {Tq} queries but k only {N} keys: the queries are the last Tq positions, so Tq <= N")
    if v is not None:
        check_tensor("v", v, 4)
        if v.dtype != k.dtype or v.shape != k.shape:
            raise ValueError(
                f"v must match k (shape {tuple(k.shape)}, dtype {k.dtype}), got {tuple(v.shape)}, {v.dtype}"
            )
    check_int("num_scored", num_scored, 1)
    if num_scored > N:
        raise ValueError(f"num_scored must be in [1, N={N}], got {num_scored}")
    check_finite("scale", scale)
    check_choice("gqa_reduce", gqa_reduce, GQA_REDUCES)
    check_int("pool_kernel", pool_kernel, 1)
    if pool_kernel % 2 == 0 or pool_kernel > MAX_POOL_KERNEL:
        raise ValueError(f"pool_kernel must be odd and <= {MAX_POOL_KERNEL}, got {pool_kernel}")
    check_choice("pool_type", pool_type, POOL_TYPES)
    check_choice("query_reduce", query_reduce, QUERY_REDUCES)
    check_same_device(q=q, k=k, v=v)
    return (
        last_dim_contiguous(q),
        last_dim_contiguous(k),
        last_dim_contiguous(v),
        num_scored,
        float(scale),
        gqa_reduce,
        pool_kernel,
        pool_type,
        query_reduce,
    )


def protected_count(num_keys, num_scored, num_sink):
    """Positions select_compact always keeps: the sinks and the unscored tail."""
    return min(num_sink, num_scored) + (num_keys - num_scored)


def check_select_compact(scores, k, v, budget, num_sink):
    check_tensor("scores", scores, 3)
    check_tensor("k", k, 4)
    check_tensor("v", v, 4)
    if v.dtype != k.dtype or v.shape != k.shape:
        raise ValueError(f"v must match k (shape {tuple(k.shape)}, dtype {k.dtype}), got {tuple(v.shape)}, {v.dtype}")
    B, Hkv, N, _ = k.shape
    if tuple(scores.shape[:2]) != (B, Hkv):
        raise ValueError(f"scores must have shape [{B}, {Hkv}, S] (k's batch and heads), got {tuple(scores.shape)}")
    S = scores.shape[2]
    if S > N:
        raise ValueError(f"scores cover {S} positions but k has only N={N}")
    check_int("budget", budget, 1)
    check_int("num_sink", num_sink, 0)
    protected = protected_count(N, S, num_sink)
    if budget < N and budget < protected:
        raise ValueError(
            f"budget={budget} is smaller than the {protected} always-kept positions "
            f"({min(num_sink, S)} sinks + {N - S} unscored tail): raise budget or lower num_sink/the window"
        )
    check_same_device(scores=scores, k=k, v=v)
    return scores.resolve_neg().to(torch.float32), last_dim_contiguous(k), last_dim_contiguous(v), budget, num_sink


def check_attention_scores(q, k, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce="mean"):
    q, k, _, *rest = check_attention(q, k, None, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce)
    return (q, k, *rest)


def check_lookahead_attention(q, k, v, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce="mean"):
    if v is None:  # check_attention reads a missing v as attention_scores
        raise TypeError("v must be a torch.Tensor, got NoneType: lookahead_attention needs the values")
    return check_attention(q, k, v, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce)


# ---- paged ops -------------------------------------------------------------------------------------

LAYOUTS = ("NHD", "HND")
INDEX_DTYPES = (torch.int32, torch.int64)


def check_index(name, t, ndim):
    """An index tensor (block table, lengths, offsets, budgets): int32 or int64, read as int32."""
    check_tensor(name, t, ndim, INDEX_DTYPES)
    return t.to(torch.int32).contiguous()


def _check_caches(k_cache, v_cache, layout):
    check_choice("layout", layout, LAYOUTS)
    check_tensor("k_cache", k_cache, 4)
    if v_cache is not None:
        check_tensor("v_cache", v_cache, 4)
        if v_cache.dtype != k_cache.dtype or v_cache.shape != k_cache.shape:
            raise ValueError(
                f"v_cache must match k_cache (shape {tuple(k_cache.shape)}, dtype {k_cache.dtype}), "
                f"got {tuple(v_cache.shape)}, {v_cache.dtype}"
            )
    return paged_geometry(k_cache, layout)


def _check_sequences(block_table, seq_lens, num_scored):
    block_table = check_index("block_table", block_table, 2)
    seq_lens = check_index("seq_lens", seq_lens, 1)
    num_scored = check_index("num_scored", num_scored, 1)
    B = block_table.shape[0]
    for name, t in (("seq_lens", seq_lens), ("num_scored", num_scored)):
        if t.shape[0] != B:
            raise ValueError(f"{name} must have shape [{B}] (block_table's sequences), got {tuple(t.shape)}")
    return block_table, seq_lens, num_scored


def check_paged_attention(
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
    """Checks of paged_attention_scores (v_cache is None) and paged_lookahead_attention."""
    block_size, Hkv, D = _check_caches(k_cache, v_cache, layout)
    check_tensor("q", q, 3)
    if q.dtype != k_cache.dtype:
        raise TypeError(f"q must have k_cache's dtype {k_cache.dtype}, got {q.dtype}")
    _, Hq, Dq = q.shape
    if Dq != D:
        raise ValueError(f"q's head_dim {Dq} differs from k_cache's head_dim {D}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be <= {MAX_HEAD_DIM}, got {D}")
    if Hq % Hkv:
        raise ValueError(f"q's heads ({Hq}) must be a multiple of k_cache's heads ({Hkv}) (GQA)")
    block_table, seq_lens, num_scored = _check_sequences(block_table, seq_lens, num_scored)
    q_offsets = check_index("q_offsets", q_offsets, 1)
    if q_offsets.shape[0] != block_table.shape[0] + 1:
        raise ValueError(
            f"q_offsets must have shape [{block_table.shape[0] + 1}] (sequences + 1), got {tuple(q_offsets.shape)}"
        )
    check_finite("scale", scale)
    check_choice("gqa_reduce", gqa_reduce, GQA_REDUCES)
    check_int("pool_kernel", pool_kernel, 1)
    if pool_kernel % 2 == 0 or pool_kernel > MAX_POOL_KERNEL:
        raise ValueError(f"pool_kernel must be odd and <= {MAX_POOL_KERNEL}, got {pool_kernel}")
    check_choice("pool_type", pool_type, POOL_TYPES)
    check_choice("query_reduce", query_reduce, QUERY_REDUCES)
    check_same_device(
        q=q,
        q_offsets=q_offsets,
        k_cache=k_cache,
        v_cache=v_cache,
        block_table=block_table,
        seq_lens=seq_lens,
        num_scored=num_scored,
    )
    return (
        last_dim_contiguous(q),
        q_offsets,
        last_dim_contiguous(k_cache),
        last_dim_contiguous(v_cache),
        block_table,
        seq_lens,
        num_scored,
        float(scale),
        gqa_reduce,
        pool_kernel,
        pool_type,
        query_reduce,
        layout,
    )


def check_paged_attention_scores(
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
    query_reduce="mean",
    layout="NHD",
):
    q, q_offsets, k_cache, _, *rest = check_paged_attention(
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
    )
    return (q, q_offsets, k_cache, *rest)


def check_paged_select_compact(
    scores, k_cache, v_cache, block_table, seq_lens, num_scored, budgets, num_sink, layout="NHD"
):
    _check_caches(k_cache, v_cache, layout)
    if v_cache is None:
        raise ValueError("v_cache is required")
    check_tensor("scores", scores, 3)
    block_table, seq_lens, num_scored = _check_sequences(block_table, seq_lens, num_scored)
    budgets = check_index("budgets", budgets, 1)
    B = block_table.shape[0]
    Hkv = paged_geometry(k_cache, layout)[1]
    if tuple(scores.shape[:2]) != (B, Hkv):
        raise ValueError(
            f"scores must have shape [{B}, {Hkv}, S] (sequences, k_cache's heads), got {tuple(scores.shape)}"
        )
    if budgets.shape[0] != B:
        raise ValueError(f"budgets must have shape [{B}] (block_table's sequences), got {tuple(budgets.shape)}")
    check_int("num_sink", num_sink, 0)
    check_same_device(
        scores=scores,
        k_cache=k_cache,
        v_cache=v_cache,
        block_table=block_table,
        seq_lens=seq_lens,
        num_scored=num_scored,
        budgets=budgets,
    )
    if k_cache.is_neg() or v_cache.is_neg():
        raise ValueError("k_cache and v_cache are compacted in place: pass the caches, not negative-bit views of them")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache are compacted in place, so their last dim must be contiguous")
    return (
        scores.resolve_neg().to(torch.float32),
        k_cache,
        v_cache,
        block_table,
        seq_lens,
        num_scored,
        budgets,
        num_sink,
        layout,
    )


def check_paged_data(
    block_table,
    seq_lens,
    num_scored,
    num_blocks,
    block_size,
    *,
    q_offsets=None,
    budgets=None,
    num_sink=0,
    score_width=None,
):
    """The checks of the paged ops that read index data: run on CPU tensors, where they cost no
    device synchronisation. On CUDA the kernels guard every index they read instead (docs/ops.md)."""
    B, max_blocks = block_table.shape
    capacity = max_blocks * block_size
    n = seq_lens.long()
    s = num_scored.long()
    bad = lambda mask: int(mask.nonzero()[0, 0])  # noqa: E731 - first failing sequence
    if (n < 1).any() or (n > capacity).any():
        b = bad((n < 1) | (n > capacity))
        raise ValueError(
            f"seq_lens[{b}]={int(n[b])} must be in [1, {capacity}] (block_table holds {max_blocks} blocks of {block_size})"
        )
    if (s < 1).any() or (s > n).any():
        b = bad((s < 1) | (s > n))
        raise ValueError(f"num_scored[{b}]={int(s[b])} must be in [1, seq_lens[{b}]={int(n[b])}]")
    if score_width is not None and (s > score_width).any():
        b = bad(s > score_width)
        raise ValueError(f"num_scored[{b}]={int(s[b])} exceeds the scores' width {score_width}")
    used = (torch.arange(max_blocks, device=block_table.device)[None, :] * block_size) < n[:, None]
    ids = block_table.long()
    out_of_range = used & ((ids < 0) | (ids >= num_blocks))
    if out_of_range.any():
        b, j = (int(x) for x in out_of_range.nonzero()[0])
        raise ValueError(f"block_table[{b}, {j}]={int(ids[b, j])} is not a block id in [0, {num_blocks})")
    if q_offsets is not None:
        offsets = q_offsets.long()
        tq = offsets[1:] - offsets[:-1]
        if int(offsets[0]) != 0:
            raise ValueError(f"q_offsets[0] must be 0, got {int(offsets[0])}")
        if (tq < 1).any() or (tq > n).any():
            b = bad((tq < 1) | (tq > n))
            raise ValueError(
                f"sequence {b} has {int(tq[b])} queries (q_offsets[{b + 1}] - q_offsets[{b}]): "
                f"need 1 <= queries <= seq_lens[{b}]={int(n[b])}"
            )
    if budgets is not None:
        budget = budgets.long()
        protected = torch.clamp(s, max=num_sink) + (n - s)
        short = (budget < 1) | ((budget < n) & (budget < protected))
        if short.any():
            b = bad(short)
            raise ValueError(
                f"budgets[{b}]={int(budget[b])} is below the {int(protected[b])} always-kept positions of sequence "
                f"{b} ({min(num_sink, int(s[b]))} sinks + {int(n[b] - s[b])} unscored tail); raise it, or use >= 1"
            )
        # In-place compaction rewrites a compacted sequence's slots: a block of it that another slot
        # (of any sequence) also maps would see its entries overwritten. Untouched sequences may share.
        compacted = used & (budget < n)[:, None]
        counts = torch.bincount(ids[used], minlength=num_blocks)
        shared = compacted & (counts[ids.clamp(0, num_blocks - 1)] > 1)
        if shared.any():
            b = bad(shared.any(1))
            raise ValueError(
                f"sequence {b} is compacted in place but one of its blocks is also mapped by another slot of "
                "block_table (shared prefix or repeated id): give it its own blocks first"
            )


def check_paged_lookahead_attention(
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
    query_reduce="mean",
    layout="NHD",
):
    if v_cache is None:
        raise ValueError("v_cache is required (paged_attention_scores scores without values)")
    return check_paged_attention(
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


def check_data(op, args):
    """check_paged_data for the (already checked) arguments of a paged op."""
    if op == "paged_select_compact":
        scores, k_cache, _, block_table, seq_lens, num_scored, budgets, num_sink, layout = args
        block_size = paged_geometry(k_cache, layout)[0]
        check_paged_data(
            block_table,
            seq_lens,
            num_scored,
            k_cache.shape[0],
            block_size,
            budgets=budgets,
            num_sink=num_sink,
            score_width=scores.shape[2],
        )
        return
    q_offsets, k_cache = args[1], args[2]
    block_table, seq_lens, num_scored = args[-9:-6]
    block_size = paged_geometry(k_cache, args[-1])[0]
    check_paged_data(block_table, seq_lens, num_scored, k_cache.shape[0], block_size, q_offsets=q_offsets)
    if int(q_offsets[-1]) != args[0].shape[0]:
        raise ValueError(f"q_offsets[-1]={int(q_offsets[-1])} must equal q's rows {args[0].shape[0]}")


CHECKS = {
    "lookahead_qproj": check_lookahead_qproj,
    "attention_scores": check_attention_scores,
    "lookahead_attention": check_lookahead_attention,
    "select_compact": check_select_compact,
    "paged_attention_scores": check_paged_attention_scores,
    "paged_lookahead_attention": check_paged_lookahead_attention,
    "paged_select_compact": check_paged_select_compact,
}
PAGED_OPS = ("paged_attention_scores", "paged_lookahead_attention", "paged_select_compact")
