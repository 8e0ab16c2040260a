"""The ops as torch operators: opcheck, torch.compile, autograd."""

import pytest
import torch

import lookaheadkv_kernels as lk
from lookaheadkv_kernels.backends import reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def sample_args(device, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device).requires_grad_(requires_grad)  # noqa: E731
    T, hidden, H, D = 4, 32, 2, 16
    qproj = (r(T, hidden), r(H * D, hidden), r(H * D), r(4, hidden), r(H * D, 4), 2.0, r(T, D), r(T, D), H, r(D), 1e-6)
    q, k, v = r(1, 4, 3, D), r(1, 2, 12, D), r(1, 2, 12, D)
    attention = (q, k, 10, 0.25, "mean", 5, "avg", "max")
    lookahead = (q, k, v, 12, 0.25, "max", 3, "max", "mean")
    select = (torch.randn(1, 2, 10, generator=g).to(device), k, v, 6, 1)
    return {
        "lookahead_qproj": qproj,
        "attention_scores": attention,
        "lookahead_attention": lookahead,
        "select_compact": select,
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["lookahead_qproj", "attention_scores", "lookahead_attention", "select_compact"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
def test_opcheck(device, op, requires_grad):
    args = sample_args(device, requires_grad)[op]
    torch.library.opcheck(getattr(torch.ops.lookaheadkv, op).default, args)


def test_torch_compile_fullgraph_eviction():
    """A whole eviction step compiles into one graph (fake kernels give every output shape)."""

    def evict(x, weight, cos, sin, k, v):
        q = lk.lookahead_qproj(x, weight, cos, sin, 4).transpose(0, 1).unsqueeze(0)
        _, scores = lk.lookahead_attention(q, k, v, num_scored=k.shape[2] - 2, pool_kernel=5)
        return lk.select_compact(scores, k, v, 8, num_sink=1)

    args = sample_args("cpu")["lookahead_qproj"]
    x, weight, cos, sin = torch.randn(4, 32), torch.randn(64, 32), args[6], args[7]
    k, v = torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    compiled = torch.compile(evict, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x, weight, cos, sin, k, v), evict(x, weight, cos, sin, k, v)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("query_reduce", ["mean", "max"])
def test_gradients_match_float64_reference(query_reduce):
    """Training the lookahead module differentiates through lookahead_qproj and lookahead_attention."""
    args = sample_args("cpu", requires_grad=True)
    x, weight, bias, lora_a, lora_b, scale, cos, sin, H, norm, eps = args["lookahead_qproj"]
    k, v = args["lookahead_attention"][1:3]

    def loss(op_qproj, op_attention, cast):
        q = op_qproj(
            cast(x),
            cast(weight),
            cast(bias),
            cast(lora_a),
            cast(lora_b),
            scale,
            cast(cos),
            cast(sin),
            H,
            cast(norm),
            eps,
        )
        q = q.transpose(0, 1).unsqueeze(0)
        out, scores = op_attention(q, cast(k), cast(v), 12, 0.25, "mean", 1, "max", query_reduce)
        return out.sin().sum() + (scores * torch.arange(12, dtype=scores.dtype)).sum()

    leaves = [x, lora_a, lora_b, k, v]
    got = torch.autograd.grad(
        loss(torch.ops.lookaheadkv.lookahead_qproj, torch.ops.lookaheadkv.lookahead_attention, lambda t: t), leaves
    )
    want = torch.autograd.grad(
        loss(reference.lookahead_qproj, reference.lookahead_attention, lambda t: t.double()), leaves
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-5)
