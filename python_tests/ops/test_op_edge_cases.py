"""The public ops at their edges, the same on every path (torch.ops and every named backend): autograd,
a missing v, ints beyond int64, sparse tensors, float64, negative-bit views."""

import pytest
import torch
from op_testing import backend_cases, require

import lookaheadkv_kernels as lk

D = 16


def inputs(device, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device)

    T, hidden, H = 3, 32, 2
    qproj = dict(x=r(T, hidden), weight=r(H * D, hidden), cos=r(T, D), sin=r(T, D), bias=r(H * D))
    qproj.update(lora_a=r(4, hidden), lora_b=r(H * D, 4), norm_weight=r(D))
    return qproj, r(1, 4, 3, D), r(1, 2, 12, D), r(1, 2, 12, D), r(1, 2, 10)


def call(op, args, backend):
    """One op on named tensors, with fixed non-tensor arguments."""
    if op == "lookahead_qproj":
        x, weight, cos, sin = (args.pop(n) for n in ("x", "weight", "cos", "sin"))
        return lk.lookahead_qproj(x, weight, cos, sin, 2, lora_scale=2.0, backend=backend, **args)
    if op == "attention_scores":
        return lk.attention_scores(args["q"], args["k"], num_scored=10, pool_kernel=3, backend=backend)
    if op == "lookahead_attention":
        return lk.lookahead_attention(args["q"], args["k"], args["v"], num_scored=10, pool_kernel=3, backend=backend)
    return lk.select_compact(args["scores"], args["k"], args["v"], 6, num_sink=1, backend=backend)


def op_args(device):
    qproj, q, k, v, scores = inputs(device)
    return {
        "lookahead_qproj": qproj,
        "attention_scores": dict(q=q, k=k),
        "lookahead_attention": dict(q=q, k=k, v=v),
        "select_compact": dict(scores=scores, k=k, v=v),
    }


OPS = ("lookahead_qproj", "attention_scores", "lookahead_attention", "select_compact")
PATHS = [pytest.param("auto", "cpu", id="auto-cpu")] + backend_cases()


def combined_loss(backend, device, leaves):
    """A loss through all four ops, as a training step would build it."""
    qproj, q, k, v = leaves
    q_rows = call("lookahead_qproj", dict(qproj), backend)  # [T, H, D]
    q = q + q_rows.sum(0)[None, :, None].repeat(1, 2, 1, 1)
    out, scores = call("lookahead_attention", dict(q=q, k=k, v=v), backend)
    alone = call("attention_scores", dict(q=q, k=k), backend)
    k_out, v_out, _ = call("select_compact", dict(scores=scores.detach(), k=k, v=v), backend)
    return out.sin().sum() + (scores * alone).sum() + (k_out * v_out).sum()


@pytest.mark.parametrize("backend,device", PATHS)
def test_every_backend_carries_autograd(backend, device):
    """Gradients through the four ops equal torch.ops' (auto) on every backend (none is silently detached)."""
    if backend != "auto":
        require(backend, device)

    def grads(path):
        qproj, q, k, v, _ = inputs(device)
        leaves = ({n: t.requires_grad_() for n, t in qproj.items()}, q.requires_grad_(), k.requires_grad_(), v)
        v.requires_grad_()
        combined_loss(path, device, leaves).backward()
        return [t.grad for t in (*leaves[0].values(), q, k, v)]

    for got, want in zip(grads(backend), grads("auto")):
        assert got is not None and want is not None
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backend,device", PATHS)
def test_select_compact_gradient_is_the_gather(backend, device):
    if backend != "auto":
        require(backend, device)
    _, _, k, v, scores = inputs(device)
    k.requires_grad_()
    k_out, _, kept = lk.select_compact(scores, k, v, 6, num_sink=1, backend=backend)
    weight = torch.randn(k_out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    (k_out * weight).sum().backward()
    want = torch.zeros_like(k).scatter(2, kept[..., None].expand(-1, -1, -1, D), weight)
    assert torch.equal(k.grad, want)


def test_select_compact_passes_opcheck_with_gradients():
    _, _, k, v, scores = inputs("cpu")
    args = (scores, k.requires_grad_(), v.requires_grad_(), 6, 1)
    torch.library.opcheck(torch.ops.lookaheadkv.select_compact.default, args)


@pytest.mark.parametrize("backend,device", PATHS)
def test_lookahead_attention_requires_v(backend, device):
    _, q, k, _, _ = inputs(device)
    with pytest.raises(TypeError, match="^v must be a torch.Tensor, got NoneType"):
        lk.lookahead_attention(q, k, None, backend=backend)


@pytest.mark.parametrize("backend,device", PATHS)
@pytest.mark.parametrize(
    "name,value",
    [("budget", 2**63), ("budget", 2**100), ("num_sink", 2**64), ("num_scored", 2**63), ("pool_kernel", 2**65 + 1)],
)
def test_ints_beyond_int64_are_named(backend, device, name, value):
    _, q, k, v, scores = inputs(device)
    with pytest.raises(ValueError, match=rf"^{name} must be <= 9223372036854775807 \(int64\), got {value}$"):
        if name in ("budget", "num_sink"):
            lk.select_compact(scores, k, v, **{"budget": 6, name: value}, backend=backend)
        else:
            lk.attention_scores(q, k, **{name: value}, backend=backend)


@pytest.mark.parametrize("backend,device", PATHS)
def test_largest_int64_budget_keeps_everything(backend, device):
    if backend != "auto":
        require(backend, device)
    _, _, k, v, scores = inputs(device)
    k_out, _, kept = lk.select_compact(scores, k, v, 2**63 - 1, num_sink=2**63 - 1, backend=backend)
    assert torch.equal(k_out, k) and kept[0, 0].tolist() == list(range(12))


@pytest.mark.parametrize("backend,device", PATHS)
def test_bad_scalars_are_named(backend, device):
    _, q, k, _, _ = inputs(device)
    with pytest.raises(ValueError, match="^scale must be a finite float"):
        lk.attention_scores(q, k, scale=2**2000, backend=backend)
    with pytest.raises(ValueError, match="^scale must be a finite float"):
        lk.attention_scores(q, k, scale=float("nan"), backend=backend)
    with pytest.raises((TypeError, ValueError), match="^gqa_reduce must be"):
        lk.attention_scores(q, k, gqa_reduce=3, backend=backend)
    with pytest.raises(TypeError, match="^num_scored must be an int, got float"):
        lk.attention_scores(q, k, num_scored=4.0, backend=backend)


@pytest.mark.parametrize("backend,device", PATHS)
@pytest.mark.parametrize("op", OPS)
def test_sparse_tensors_are_named(backend, device, op):
    for name in op_args(device)[op]:
        args = op_args(device)[op]
        args[name] = args[name].to_sparse()
        with pytest.raises(
            TypeError, match=f"^{name} must be a dense \\(strided\\) tensor, got layout torch.sparse_coo"
        ):
            call(op, args, backend)


FLOAT64_ALLOWED = {"bias", "lora_a", "lora_b", "cos", "sin", "norm_weight"}  # small qproj parameters, read as float32


@pytest.mark.parametrize("backend,device", PATHS)
@pytest.mark.parametrize("op", OPS)
def test_float64_is_rejected_by_name_or_converted(backend, device, op):
    if backend != "auto":
        require(backend, device)
    for name in op_args(device)[op]:
        args = op_args(device)[op]
        args[name] = args[name].double()
        if name in FLOAT64_ALLOWED:
            want = call(op, op_args(device)[op], backend)
            got = call(op, args, backend)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            with pytest.raises(TypeError, match=f"^{name} must have .*dtype.*, got torch.float64"):
                call(op, args, backend)


def negative_view(t):
    """t's values behind a pending negation: -(x.conj().imag) where x.imag = -t; a real tensor with is_neg()."""
    view = torch.complex(torch.zeros_like(t), -t).conj().imag
    assert view.is_neg()
    return view


@pytest.mark.parametrize("backend,device", PATHS)
@pytest.mark.parametrize("op", OPS)
def test_negative_bit_views_read_as_their_values(backend, device, op):
    if backend != "auto":
        require(backend, device)
    want = call(op, op_args(device)[op], backend)
    for name in op_args(device)[op]:
        args = op_args(device)[op]
        args[name] = negative_view(args[name])
        got = call(op, args, backend)
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert torch.equal(g, w), name
