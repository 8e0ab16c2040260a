"""Native CPU backend specifics (csrc/cpu/): code paths the shared op tests do not reach.

- attention: several key chunks (combined in chunk order), many query rows, groups in several
  waves of stored logits and groups too large to store them, results independent of the thread
  count, NaN rows;
- select_compact: the sampled sparse path (long rows, small budgets) with ties, NaN and infinities,
  and its fallback when the sample bound lets too few keys through;
- rounding of the half-precision outputs, bit for bit against torch.
"""

import pytest
import torch
from op_testing import randn

from lookaheadkv_kernels.backends import cpu, reference

pytestmark = pytest.mark.skipif(not cpu.available()[0], reason="native CPU module not built")


def with_threads(n, fn):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(saved)


# ---- attention -------------------------------------------------------------------------------

# (B, Hq, Hkv, Tq, N, D, S, gqa_reduce, pool_kernel, pool_type, query_reduce)
LONG_CASES = [
    (1, 8, 2, 32, 5000, 64, 4968, "mean", 7, "max", "mean"),  # several 1536-key chunks, GQA 4
    (1, 9, 3, 32, 5000, 64, 5000, "mean", 17, "avg", "max"),  # LookaheadKV's scoring on SmolLM2's heads
    (2, 3, 1, 5, 3100, 128, 3000, "max", 5, "avg", "max"),  # GQA 3, Tq not a multiple of 16
    (1, 4, 4, 700, 1800, 32, 1800, "mean", 1, "max", "mean"),  # many query rows (44 lane tiles), Tq ~ N
    (1, 3, 3, 1000, 2500, 32, 2500, "mean", 3, "avg", "max"),  # 10 MiB of stored logits per group: waves of 2, 1
    (1, 1, 1, 2000, 3400, 32, 3300, "mean", 1, "max", "mean"),  # 25.6 MiB per group: over the cap, logits recomputed
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", LONG_CASES, ids=lambda c: "x".join(map(str, c)))
def test_long_sequences_against_float64_reference(dtype, case):
    B, Hq, Hkv, Tq, N, D, S, reduce, pool_kernel, pool_type, query_reduce = case
    g = torch.Generator().manual_seed(N)
    q = randn(B, Hq, Tq, D, dtype=dtype, generator=g, scale=2.0)
    k = randn(B, Hkv, N, D, dtype=dtype, generator=g)
    v = randn(B, Hkv, N, D, dtype=dtype, generator=g)
    args = (S, D**-0.5, reduce, pool_kernel, pool_type, query_reduce)
    ref_out, ref_scores = reference.lookahead_attention(q.double(), k.double(), v.double(), *args)
    out, scores = cpu.lookahead_attention(q, k, v, *args)
    assert torch.equal(scores, cpu.attention_scores(q, k, *args))
    torch.testing.assert_close(
        scores,
        ref_scores,
        rtol=1e-3 if dtype == torch.bfloat16 else 2e-4,
        atol=1e-8,
        check_dtype=False,
        check_device=False,
    )
    tol = dict(rtol=2e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, ref_out, **tol, check_dtype=False, check_device=False)


def test_results_do_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(0)
    q = randn(2, 8, 32, 64, generator=g)
    k = randn(2, 2, 4000, 64, generator=g)
    v = randn(2, 2, 4000, 64, generator=g)
    args = (3968, 0.125, "mean", 7, "max", "max")
    one = with_threads(1, lambda: cpu.lookahead_attention(q, k, v, *args))
    for threads in (2, 3):
        many = with_threads(threads, lambda: cpu.lookahead_attention(q, k, v, *args))
        assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@pytest.mark.parametrize("query_reduce", ["mean", "max"])
def test_nan_query_row_matches_torch_softmax(query_reduce):
    """A NaN logit makes torch's softmax row all NaN, masked keys included: the reference's (and
    these kernels') scores are NaN for every key of that head's group, for a mean or a max over
    the queries."""
    g = torch.Generator().manual_seed(1)
    q = randn(1, 4, 3, 64, generator=g)
    k = randn(1, 2, 300, 64, generator=g)
    q[0, 1, 2, 5] = float("nan")
    args = (290, 0.125, "mean", 3, "avg", query_reduce)
    scores = cpu.attention_scores(q, k, *args)
    expected = reference.attention_scores(q.double(), k.double(), *args)
    assert torch.equal(torch.isnan(scores), torch.isnan(expected))
    finite = ~torch.isnan(expected)
    torch.testing.assert_close(
        scores[finite], expected[finite], rtol=2e-4, atol=1e-8, check_dtype=False, check_device=False
    )


# ---- select_compact ----------------------------------------------------------------------------


def make_scores(kind, B, H, S, generator):
    scores = torch.randn(B, H, S, generator=generator)
    if kind == "ties":
        scores = (scores * 2).round() / 2  # few distinct values: long runs of equal scores
    elif kind == "special":
        pick = torch.rand(B, H, S, generator=generator)
        scores[pick < 0.05] = float("nan")
        scores[(pick >= 0.05) & (pick < 0.08)] = float("inf")
        scores[(pick >= 0.08) & (pick < 0.1)] = -float("inf")
        scores[(pick >= 0.1) & (pick < 0.2)] = 0.0
        scores[(pick >= 0.2) & (pick < 0.3)] = -0.0
    return scores


@pytest.mark.parametrize("kind", ["random", "ties", "special"])
@pytest.mark.parametrize("budget,num_sink", [(40, 4), (100, 0), (1000, 8), (3500, 4)])  # sparse, sparse, dense, dense
def test_select_long_rows_against_reference(kind, budget, num_sink):
    g = torch.Generator().manual_seed(budget)
    B, H, N, D, S = 2, 3, 5000, 16, 4968
    scores = make_scores(kind, B, H, S, g)
    k = torch.randn(B, H, N, D, generator=g).to(torch.bfloat16)
    v = torch.randn(B, H, N, D, generator=g).to(torch.bfloat16)
    k_out, v_out, kept = cpu.select_compact(scores, k, v, budget, num_sink)
    want_k, want_v, want_kept = reference.select_compact(scores, k, v, budget, num_sink)
    assert torch.equal(kept, want_kept)
    assert torch.equal(k_out, want_k) and torch.equal(v_out, want_v)


def test_select_falls_back_when_the_sample_bound_is_too_high():
    """Every 32nd candidate (the sampled ones) outranks all others, so the sampled lower bound lets
    too few keys through and the selection must run on all of them."""
    g = torch.Generator().manual_seed(5)
    S = N = 8192
    scores = torch.rand(1, 1, S, generator=g)
    scores[..., ::32] += 10.0
    k = torch.randn(1, 1, N, 8, generator=g)
    budget = 100  # n_pick * 64 <= S: the sparse path is tried first
    _, _, kept = cpu.select_compact(scores, k, k, budget, 0)
    assert torch.equal(kept, reference.kept_positions(scores, N, budget, 0))


def test_select_strided_scores_and_heads():
    g = torch.Generator().manual_seed(6)
    wide = torch.randn(2, 4, 6000, generator=g)
    scores = wide[:, ::2, 100:5100]  # strided heads, offset rows
    k = torch.randn(2, 2, 5100, 8, generator=g)
    v = torch.randn(2, 2, 5100, 8, generator=g)
    budget = 4 + 100 + 60  # sinks, the unscored tail [5000, 5100), 60 picks
    got = cpu.select_compact(scores, k, v, budget, 4)
    want = reference.select_compact(scores, k, v, budget, 4)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# ---- lookahead_qproj ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_qproj_wide_hidden_and_partial_tiles(dtype):
    """hidden = 600: several 256-column conversion chunks of half-precision W, the last partial;
    head_dim = 40: a partial last tile of W rows; T = 33: a partial lane tile."""
    T, hidden, heads, D, rank = 33, 600, 3, 40, 4
    g = torch.Generator().manual_seed(8)
    x = randn(T, hidden, dtype=dtype, generator=g)
    weight = randn(heads * D, hidden, dtype=dtype, generator=g, scale=hidden**-0.5)
    bias = randn(heads * D, generator=g)
    lora_a = randn(rank, hidden, generator=g, scale=hidden**-0.5)
    lora_b = randn(heads * D, rank, generator=g, scale=0.1)
    cos, sin = randn(T, D, generator=g), randn(T, D, generator=g)
    norm_weight = randn(D, generator=g)
    args = (bias, lora_a, lora_b, 2.0, cos, sin, heads, norm_weight, 1e-6)
    out = cpu.lookahead_qproj(x, weight, *args)
    expected = reference.lookahead_qproj(
        x.double(), weight.double(), *[a.double() if torch.is_tensor(a) else a for a in args]
    )
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol, check_dtype=False, check_device=False)


# ---- rounding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_outputs_round_like_torch(dtype):
    """With W = I, no extras and sin = 0, q = x·cos computed in fp32, then rounded once: the
    kernels' float->half conversion must give torch's bits (round to nearest even, overflow to
    inf, subnormals)."""
    T, heads, D = 16, 2, 64
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(T, heads * D, generator=g) * 4).to(dtype)
    weight = torch.eye(heads * D, dtype=dtype)
    cos = torch.randn(T, D, generator=g) * torch.logspace(-9, 5, D)  # tiny to overflowing
    sin = torch.zeros(T, D)
    out = cpu.lookahead_qproj(x, weight, None, None, None, 0.0, cos, sin, heads, None, 0.0)
    expected = (x.float().view(T, heads, D) * cos[:, None, :]).to(dtype)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


def test_stored_logits_stay_within_their_cap_and_show_in_the_bench_memory_column():
    """4 KV heads of 16.8 MB of logits each (128 rows × 32K keys): one wave per head, so the call's
    extra memory stays near one head's logits, not 4×; the op bench sees it even after timing runs
    whose freed heap could serve it without new pages."""
    from lookaheadkv_kernels.bench import median_time, peak_extra_memory

    g = torch.Generator().manual_seed(3)
    q = randn(1, 16, 32, 64, generator=g)
    k = randn(1, 4, 32768, 64, generator=g)
    device = torch.device("cpu")
    run = lambda: cpu.attention_scores(q, k, 32768, 0.125, "mean", 1, "max", "mean")  # noqa: E731
    median_time(run, device, repeats=2)
    extra_mib = peak_extra_memory(run, device) / 2**20
    assert 14 < extra_mib < 24 + 4  # one head's 16 MiB of logits + small buffers; the cap is 24 MiB
