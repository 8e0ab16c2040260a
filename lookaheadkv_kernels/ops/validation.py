"""Argument checks of the four ops (docs/ops.md), shared by every backend and by the fake kernels.

Each `check_<op>` raises ValueError / TypeError naming the offending argument, and returns the
arguments normalised for the backends: last dims made contiguous, small qproj parameters and
select_compact's scores converted to float32. Only shapes, dtypes, devices and int/float arguments
are inspected (never data), so the checks also run on fake tensors under torch.compile.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GQA_REDUCES = ("mean", "max")
QUERY_REDUCES = ("mean", "max")
POOL_TYPES = ("max", "avg")
MAX_HEAD_DIM = 256
MAX_POOL_KERNEL = 31


def _dtype_names(dtypes):
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name, t, ndim, dtypes=FLOAT_DTYPES):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
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


def check_finite(name, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite float, got {value!r}")


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def last_dim_contiguous(t):
    """The kernels index every dim by stride except the last, which must be dense."""
    if t is None or t.stride(-1) == 1 or t.shape[-1] == 1:
        return t
    return t.contiguous()


def as_float32(t):
    return None if t is None else t.to(torch.float32).contiguous()


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
    return scores.to(torch.float32), last_dim_contiguous(k), last_dim_contiguous(v), budget, num_sink


def check_attention_scores(q, k, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce="mean"):
    q, k, _, *rest = check_attention(q, k, None, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce)
    return (q, k, *rest)


CHECKS = {
    "lookahead_qproj": check_lookahead_qproj,
    "attention_scores": check_attention_scores,
    "lookahead_attention": check_attention,
    "select_compact": check_select_compact,
}
