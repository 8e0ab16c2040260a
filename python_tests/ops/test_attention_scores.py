"""attention_scores and lookahead_attention against the float64 reference (docs/ops.md §2-3)."""

import zlib

import pytest
import torch
from op_testing import DTYPES, backend_cases, randn, require, strided_last_dims, tf32_like

import lookaheadkv_kernels as lk
from lookaheadkv_kernels.backends import reference

# (B, Hq, Hkv, Tq, N, D, S, gqa_reduce, pool_kernel, pool_type, query_reduce)
CASES = [
    (1, 1, 1, 1, 1, 64, 1, "mean", 1, "max", "mean"),  # N = 1
    (1, 1, 1, 1, 1, 64, 1, "mean", 1, "max", "max"),  # N = 1, max over the queries
    (2, 4, 4, 5, 37, 64, 37, "max", 7, "max", "mean"),  # GQA 1, SnapKV pooling
    (1, 6, 2, 8, 50, 64, 42, "mean", 5, "avg", "mean"),  # GQA 3, S < N (window left unscored)
    (1, 9, 3, 32, 60, 64, 60, "mean", 17, "avg", "max"),  # LookaheadKV's scoring on SmolLM2's heads
    (1, 8, 2, 16, 16, 128, 16, "mean", 7, "max", "max"),  # GQA 4, Tq = N
    (1, 8, 1, 7, 130, 128, 100, "max", 5, "avg", "max"),  # GQA 8, several key blocks
    (1, 2, 1, 3, 20, 256, 3, "mean", 7, "avg", "mean"),  # largest head dim, pool wider than S
]


def score_tolerance(backend, device, dtype):
    """Scores are float32 computed from exactly-representable inputs: float32-level accuracy,
    except tf32 logits (Triton float32 on GPU), whose ~5e-4 relative logit error moves
    probabilities by ~1e-2 relative."""
    if tf32_like(backend, device, dtype):
        return dict(rtol=1e-2, atol=1e-5)
    return dict(rtol=1e-3 if dtype != torch.float32 else 2e-4, atol=1e-7)


def output_tolerance(backend, device, dtype):
    """The attention output is rounded to q's dtype once (and may use P rounded to that dtype for
    the P·V product on tensor cores): a few units of the dtype's epsilon."""
    if dtype == torch.bfloat16:
        return dict(rtol=2e-2, atol=1e-2)
    if dtype == torch.float16:
        return dict(rtol=4e-3, atol=2e-3)
    if tf32_like(backend, device, dtype):
        return dict(rtol=1e-2, atol=1e-3)
    return dict(rtol=1e-4, atol=1e-5)


def make_inputs(case, dtype, device, seed):
    B, Hq, Hkv, Tq, N, D, *_ = case
    g = torch.Generator().manual_seed(seed)
    q = randn(B, Hq, Tq, D, dtype=dtype, device=device, generator=g)
    k = randn(B, Hkv, N, D, dtype=dtype, device=device, generator=g)
    v = randn(B, Hkv, N, D, dtype=dtype, device=device, generator=g)
    return q, k, v


def op_kwargs(case):
    *_, S, reduce, pool_kernel, pool_type, query_reduce = case
    return dict(
        num_scored=S, gqa_reduce=reduce, pool_kernel=pool_kernel, pool_type=pool_type, query_reduce=query_reduce
    )


def reference_outputs(q, k, v, kwargs):
    scale = q.shape[-1] ** -0.5
    return reference.lookahead_attention(
        q.double().cpu(),
        k.double().cpu(),
        v.double().cpu(),
        kwargs["num_scored"],
        scale,
        kwargs["gqa_reduce"],
        kwargs["pool_kernel"],
        kwargs["pool_type"],
        kwargs["query_reduce"],
    )


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_against_float64_reference(backend, device, dtype, case):
    require(backend, device)
    q, k, v = make_inputs(case, dtype, device, seed=zlib.crc32(repr((case, str(dtype))).encode()))
    kwargs = op_kwargs(case)
    ref_out, ref_scores = reference_outputs(q, k, v, kwargs)

    scores = lk.attention_scores(q, k, backend=backend, **kwargs)
    assert scores.dtype == torch.float32 and scores.device.type == device
    torch.testing.assert_close(
        scores, ref_scores, **score_tolerance(backend, device, dtype), check_dtype=False, check_device=False
    )

    out, fused_scores = lk.lookahead_attention(q, k, v, backend=backend, **kwargs)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(
        out, ref_out, **output_tolerance(backend, device, dtype), check_dtype=False, check_device=False
    )
    torch.testing.assert_close(
        fused_scores, ref_scores, **score_tolerance(backend, device, dtype), check_dtype=False, check_device=False
    )


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("layout", ["transposed", "padded"])
def test_non_contiguous_inputs(backend, device, layout):
    require(backend, device)
    case = (2, 6, 2, 4, 33, 64, 30, "mean", 5, "avg", "max")
    q, k, v = make_inputs(case, torch.float32, device, seed=7)
    kwargs = op_kwargs(case)
    ref_out, ref_scores = reference_outputs(q, k, v, kwargs)
    qs, ks, vs = (strided_last_dims(t, layout) for t in (q, k, v))
    assert not qs.is_contiguous()
    out, scores = lk.lookahead_attention(qs, ks, vs, backend=backend, **kwargs)
    torch.testing.assert_close(
        scores, ref_scores, **score_tolerance(backend, device, torch.float32), check_dtype=False, check_device=False
    )
    torch.testing.assert_close(
        out, ref_out, **output_tolerance(backend, device, torch.float32), check_dtype=False, check_device=False
    )


@pytest.mark.parametrize("backend,device", backend_cases())
def test_scores_identical_with_and_without_output(backend, device):
    require(backend, device)
    case = (1, 8, 2, 6, 70, 64, 64, "max", 7, "max", "max")
    q, k, v = make_inputs(case, torch.bfloat16, device, seed=3)
    kwargs = op_kwargs(case)
    alone = lk.attention_scores(q, k, backend=backend, **kwargs)
    _, fused = lk.lookahead_attention(q, k, v, backend=backend, **kwargs)
    torch.testing.assert_close(alone, fused, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize(
    "gqa_reduce,pool_kernel,pool_type,query_reduce",
    [
        ("mean", 1, "max", "mean"),
        ("max", 3, "max", "mean"),
        ("mean", 3, "avg", "mean"),
        ("mean", 1, "max", "max"),
        ("max", 3, "avg", "max"),
    ],
)
def test_nan_query_poisons_only_the_keys_it_sees(backend, device, gqa_reduce, pool_kernel, pool_type, query_reduce):
    """docs/ops.md: NaN propagates like softmax over the visible keys, then through the reduces
    (torch amax/mean) and the pooling (torch max_pool1d/avg_pool1d propagate NaN)."""
    require(backend, device)
    case = (1, 4, 2, 4, 24, 64, 24, gqa_reduce, pool_kernel, pool_type, query_reduce)
    q, k, v = make_inputs(case, torch.float32, device, seed=9)
    q[0, 1, 0, 5] = float("nan")  # first query of head 1 (KV head 0) sees keys 0..20 only
    kwargs = op_kwargs(case)
    _, ref_scores = reference_outputs(q, k, v, kwargs)
    for scores in (
        lk.attention_scores(q, k, backend=backend, **kwargs),
        lk.lookahead_attention(q, k, v, backend=backend, **kwargs)[1],
    ):
        scores = scores.cpu()
        assert torch.equal(torch.isnan(scores), torch.isnan(ref_scores)), f"NaN pattern {torch.isnan(scores)}"
        finite = ~torch.isnan(ref_scores)
        assert finite[0, 0].any() and torch.isnan(ref_scores[0, 0]).any()
        torch.testing.assert_close(
            scores[finite],
            ref_scores[finite],
            **score_tolerance(backend, device, torch.float32),
            check_dtype=False,
            check_device=False,
        )


def test_scores_are_a_distribution_without_pooling():
    """Each query's probabilities sum to 1, so with mean reduce and no pooling the scores over all
    N keys sum to 1 per (batch, KV head)."""
    q, k, _ = make_inputs((2, 4, 2, 5, 40, 64), torch.float32, "cpu", seed=1)
    scores = lk.attention_scores(q, k)
    torch.testing.assert_close(scores.sum(-1), torch.ones(2, 2), rtol=1e-5, atol=1e-5)


def test_default_scale_and_num_scored():
    q, k, _ = make_inputs((1, 2, 1, 3, 12, 64), torch.float32, "cpu", seed=2)
    scores = lk.attention_scores(q, k)
    expected = reference.attention_scores(q.double(), k.double(), 12, 64**-0.5, "mean", 1, "max", "mean")
    torch.testing.assert_close(scores, expected, rtol=2e-4, atol=1e-7, check_dtype=False, check_device=False)


def test_query_max_scores_each_key_by_the_query_that_attends_to_it_most():
    q, k, _ = make_inputs((1, 2, 1, 4, 30, 64), torch.float32, "cpu", seed=5)
    probs = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * 64**-0.5 + causal_bias(4, 30), dim=-1)
    scores = lk.attention_scores(q, k, query_reduce="max")
    torch.testing.assert_close(
        scores, probs.amax(dim=2).mean(dim=1, keepdim=True), rtol=2e-4, atol=1e-7, check_dtype=False, check_device=False
    )
    one = q[:, :, -1:]  # a single query: its max is its mean
    torch.testing.assert_close(lk.attention_scores(one, k, query_reduce="max"), lk.attention_scores(one, k))


def causal_bias(Tq, N):
    """-inf where key j is after query i (the queries are the last Tq of N positions)."""
    hidden = torch.arange(N)[None, :] > torch.arange(N - Tq, N)[:, None]
    return torch.zeros(Tq, N, dtype=torch.float64).masked_fill(hidden, float("-inf"))


BAD_INPUTS = [
    (dict(q=(4, 3, 8)), "q must have 4 dims"),
    (dict(k_dtype=torch.float16), "k must have q's dtype"),
    (dict(k=(2, 2, 10, 8)), "batch"),
    (dict(k=(1, 3, 10, 8)), "multiple of k's heads"),
    (dict(k=(1, 2, 10, 16)), "head_dim"),
    (dict(k=(1, 2, 2, 8)), "Tq <= N"),
    (dict(num_scored=0), "num_scored"),
    (dict(num_scored=11), "num_scored"),
    (dict(pool_kernel=4), "pool_kernel"),
    (dict(pool_kernel=0), "pool_kernel"),
    (dict(gqa_reduce="sum"), "gqa_reduce"),
    (dict(pool_type="min"), "pool_type"),
    (dict(query_reduce="sum"), "query_reduce"),
    (dict(q_dtype=torch.float64), "q must have dtype"),
    (dict(q_dtype=torch.int32), "q must have dtype"),
    (dict(scale=float("nan")), "scale"),
]


@pytest.mark.parametrize("change,message", BAD_INPUTS, ids=lambda x: str(x)[:40])
def test_bad_inputs_raise_naming_the_argument(change, message):
    q_shape, k_shape = change.get("q", (1, 4, 3, 8)), change.get("k", (1, 2, 10, 8))
    q = torch.randn(*q_shape).to(change.get("q_dtype", torch.float32))
    k = torch.randn(*k_shape).to(change.get("k_dtype", q.dtype if q.is_floating_point() else torch.float32))
    kwargs = {
        n: change[n]
        for n in ("num_scored", "pool_kernel", "gqa_reduce", "pool_type", "scale", "query_reduce")
        if n in change
    }
    with pytest.raises((ValueError, TypeError), match=message):
        lk.attention_scores(q, k, **kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        lk.lookahead_attention(q, k, k, **kwargs)


def test_mismatched_v_raises():
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match="v must match k"):
        lk.lookahead_attention(q, k, torch.randn(1, 2, 9, 8))


def test_unknown_backend_raises():
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 10, 8)
    with pytest.raises(RuntimeError, match="backend must be one of"):
        lk.attention_scores(q, k, backend="numpy")
