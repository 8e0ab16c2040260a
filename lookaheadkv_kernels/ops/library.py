"""Every schema of torch.ops.lookaheadkv, in one place, with its device, fake and autograd kernels.

Device kernels (CPU, CUDA, and any other device through the reference) validate the arguments and
hand them to the backend chosen by ops/dispatch.py. Fake kernels validate too (shapes, dtypes,
devices only) and allocate outputs, so the ops trace under torch.compile. Autograd of the
differentiable ops recomputes the backward through the reference (used for training the lookahead
module; the forward still runs the fast kernels); select_compact's is the gather's (into k and v;
the scores only choose). `run_differentiable` gives calls that name a backend the same autograd.
"""

from __future__ import annotations

import functools

import torch

from ..backends import reference
from . import dispatch
from .validation import CHECKS, PAGED_OPS, check_data, paged_geometry

NAMESPACE = "lookaheadkv"

SCHEMAS = {
    "lookahead_qproj": (
        "(Tensor x, Tensor weight, Tensor? bias, Tensor? lora_a, Tensor? lora_b, float lora_scale, "
        "Tensor cos, Tensor sin, int num_heads, Tensor? norm_weight, float eps) -> Tensor"
    ),
    "attention_scores": (
        "(Tensor q, Tensor k, int num_scored, float scale, str gqa_reduce, int pool_kernel, str pool_type, "
        'str query_reduce="mean") -> Tensor'
    ),
    "lookahead_attention": (
        "(Tensor q, Tensor k, Tensor v, int num_scored, float scale, str gqa_reduce, int pool_kernel, "
        'str pool_type, str query_reduce="mean") -> (Tensor, Tensor)'
    ),
    "select_compact": "(Tensor scores, Tensor k, Tensor v, int budget, int num_sink) -> (Tensor, Tensor, Tensor)",
    "paged_attention_scores": (
        "(Tensor q, Tensor q_offsets, Tensor k_cache, Tensor block_table, Tensor seq_lens, Tensor num_scored, "
        'float scale, str gqa_reduce, int pool_kernel, str pool_type, str query_reduce="mean", str layout="NHD") '
        "-> Tensor"
    ),
    "paged_lookahead_attention": (
        "(Tensor q, Tensor q_offsets, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, "
        "Tensor num_scored, float scale, str gqa_reduce, int pool_kernel, str pool_type, "
        'str query_reduce="mean", str layout="NHD") -> (Tensor, Tensor)'
    ),
    "paged_select_compact": (
        "(Tensor scores, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor block_table, Tensor seq_lens, "
        'Tensor num_scored, Tensor budgets, int num_sink, str layout="NHD") -> (Tensor, Tensor)'
    ),
}


def run(op: str, backend: str, *args):
    """Validate `args` of `op` and run it on `backend` ("auto" = the device's default)."""
    checked = CHECKS[op](*args)
    device = checked[0].device
    if op in PAGED_OPS and device.type == "cpu":
        check_data(op, checked)
    return getattr(dispatch.resolve(op, device, backend), op)(*checked)


# ---- fake kernels: output shapes from input shapes and int arguments only ----------------------


def _fake_lookahead_qproj(x, weight, bias, lora_a, lora_b, lora_scale, cos, sin, num_heads, norm_weight, eps):
    CHECKS["lookahead_qproj"](x, weight, bias, lora_a, lora_b, lora_scale, cos, sin, num_heads, norm_weight, eps)
    return x.new_empty(x.shape[0], num_heads, weight.shape[0] // num_heads)


def _fake_attention_scores(q, k, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce="mean"):
    CHECKS["attention_scores"](q, k, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce)
    return q.new_empty(q.shape[0], k.shape[1], num_scored, dtype=torch.float32)


def _fake_lookahead_attention(q, k, v, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce="mean"):
    CHECKS["lookahead_attention"](q, k, v, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce)
    return q.new_empty(q.shape), q.new_empty(q.shape[0], k.shape[1], num_scored, dtype=torch.float32)


def _fake_select_compact(scores, k, v, budget, num_sink):
    CHECKS["select_compact"](scores, k, v, budget, num_sink)
    B, H, N, D = k.shape
    M = min(budget, N)
    return k.new_empty(B, H, M, D), v.new_empty(B, H, M, D), k.new_empty(B, H, M, dtype=torch.int64)


def _capacity(block_table, k_cache, layout):
    return block_table.shape[1] * paged_geometry(k_cache, layout)[0]


def _fake_paged_attention_scores(
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
    CHECKS["paged_attention_scores"](
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
    Hkv = paged_geometry(k_cache, layout)[1]
    return q.new_empty(block_table.shape[0], Hkv, _capacity(block_table, k_cache, layout), dtype=torch.float32)


def _fake_paged_lookahead_attention(
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
    CHECKS["paged_lookahead_attention"](
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
    Hkv = paged_geometry(k_cache, layout)[1]
    scores = q.new_empty(block_table.shape[0], Hkv, _capacity(block_table, k_cache, layout), dtype=torch.float32)
    return q.new_empty(q.shape), scores


def _fake_paged_select_compact(
    scores, k_cache, v_cache, block_table, seq_lens, num_scored, budgets, num_sink, layout="NHD"
):
    CHECKS["paged_select_compact"](
        scores, k_cache, v_cache, block_table, seq_lens, num_scored, budgets, num_sink, layout
    )
    B, Hkv = scores.shape[:2]
    new_lens = scores.new_empty(B, dtype=torch.int32)
    return new_lens, scores.new_empty(B, Hkv, _capacity(block_table, k_cache, layout), dtype=torch.int32)


FAKES = {
    "lookahead_qproj": _fake_lookahead_qproj,
    "attention_scores": _fake_attention_scores,
    "lookahead_attention": _fake_lookahead_attention,
    "select_compact": _fake_select_compact,
    "paged_attention_scores": _fake_paged_attention_scores,
    "paged_lookahead_attention": _fake_paged_lookahead_attention,
    "paged_select_compact": _fake_paged_select_compact,
}


# ---- autograd: backward through the reference ---------------------------------------------------


def _setup_context(ctx, inputs, output):
    ctx.tensor_positions = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
    ctx.others = [None if isinstance(a, torch.Tensor) else a for a in inputs]
    ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_positions))


def _setup_select_compact(ctx, inputs, output):
    ctx.key_shape = inputs[1].shape
    ctx.save_for_backward(output[2])


def _backward_select_compact(ctx, grad_k, grad_v, _grad_kept):
    (kept,) = ctx.saved_tensors
    index = kept.unsqueeze(-1).expand(*kept.shape, ctx.key_shape[-1])

    def scatter(grad):  # kept positions are distinct, so scatter is the gather's adjoint
        return grad.new_zeros(ctx.key_shape).scatter(2, index, grad)

    return (
        None,
        scatter(grad_k) if ctx.needs_input_grad[1] else None,
        scatter(grad_v) if ctx.needs_input_grad[2] else None,
        None,
        None,
    )


def _make_backward(op: str):
    forward = getattr(reference, op)

    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        wanted = [i for i, p in enumerate(ctx.tensor_positions) if ctx.needs_input_grad[p]]

        def differentiable_forward(*diff):
            args = list(ctx.others)
            for slot, p in enumerate(ctx.tensor_positions):
                args[p] = saved[slot]
            for slot, d in zip(wanted, diff):
                args[ctx.tensor_positions[slot]] = d
            out = forward(*args)
            return out if isinstance(out, tuple) else (out,)

        # Unused outputs arrive as zeros (autograd materialises them), so grads is complete.
        _, vjp = torch.func.vjp(differentiable_forward, *(saved[i] for i in wanted))
        diff_grads = vjp(tuple(grads))
        result = [None] * len(ctx.others)
        for slot, g in zip(wanted, diff_grads):
            result[ctx.tensor_positions[slot]] = g
        return tuple(result)

    return backward


DIFFERENTIABLE = ("lookahead_qproj", "attention_scores", "lookahead_attention")


def _autograd(op: str):
    """(backward, setup_context) of a differentiable op, None for the others."""
    if op == "select_compact":
        return _backward_select_compact, _setup_select_compact
    if op in DIFFERENTIABLE:
        return _make_backward(op), _setup_context
    return None


@functools.cache
def _explicit_function(op: str, backend: str):
    backward, setup_context = _autograd(op)

    class Explicit(torch.autograd.Function):
        @staticmethod
        def forward(*args):
            return run(op, backend, *args)

    Explicit.setup_context = staticmethod(setup_context)
    Explicit.backward = staticmethod(backward)
    return Explicit


def run_differentiable(op: str, backend: str, *args):
    """`run` with the autograd torch.ops.lookaheadkv.<op> has, so a named backend's outputs carry gradients too."""
    wants_grad = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    if wants_grad and _autograd(op) is not None:
        return _explicit_function(op, backend).apply(*args)
    return run(op, backend, *args)


def _argument_kinds(schema) -> tuple[tuple[str, str, bool], ...]:
    """(name, kind, optional) per argument of a parsed schema, kind one of "tensor", "int", "float", "str"."""
    kinds = {"TensorType": "tensor", "IntType": "int", "FloatType": "float", "StringType": "str"}
    arguments = []
    for arg in schema.arguments:
        optional = arg.type.kind() == "OptionalType"
        kind = (arg.type.getElementType() if optional else arg.type).kind()
        arguments.append((arg.name, kinds[kind], optional))
    return tuple(arguments)


ARGUMENTS = {}  # per op: _argument_kinds of its schema, for validation.check_arguments


def _register():
    for op, schema in SCHEMAS.items():
        qualname = f"{NAMESPACE}::{op}"
        torch.library.define(qualname, schema)

        def device_kernel(*args, _op=op):
            return run(_op, "auto", *args)

        torch.library.impl(qualname, ("cpu", "cuda"), func=device_kernel)
        torch.library.register_fake(qualname)(FAKES[op])
        if _autograd(op) is not None:
            backward, setup_context = _autograd(op)
            torch.library.register_autograd(qualname, backward, setup_context=setup_context)
        ARGUMENTS[op] = _argument_kinds(getattr(torch.ops.lookaheadkv, op).default._schema)


_register()
