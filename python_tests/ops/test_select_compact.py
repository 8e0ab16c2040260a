"""select_compact against the reference: kept positions bit-identical, K/V rows copied exactly."""

import pytest
import torch
from op_testing import DTYPES, backend_cases, require, strided_last_dims

import lookaheadkv_kernels as lk
from lookaheadkv_kernels.backends import reference

# (B, Hkv, N, D, S, budget, num_sink)
CASES = [
    (1, 1, 1, 64, 1, 1, 0),  # N = 1
    (2, 3, 40, 64, 40, 10, 0),  # plain top-k
    (1, 2, 50, 128, 42, 20, 4),  # sinks + unscored window
    (1, 2, 50, 64, 42, 12, 4),  # budget = protected count (4 + 8)
    (1, 2, 30, 64, 30, 64, 4),  # budget >= N keeps everything
    (1, 2, 30, 64, 20, 30, 2),  # budget == N
    (2, 2, 300, 64, 268, 100, 8),  # several blocks
    (1, 1, 20, 32, 16, 16, 10),  # most scored positions are sinks: pick 2 of 6
]


def make_scores(B, H, S, kind, generator):
    if kind == "random":
        return torch.randn(B, H, S, generator=generator)
    if kind == "ties":  # few distinct values, +0.0 and -0.0 among them
        values = torch.tensor([1.0, 0.5, 0.0, -0.0, -2.0])
        return values[torch.randint(0, 5, (B, H, S), generator=generator)]
    if kind == "nan_inf":
        s = torch.randn(B, H, S, generator=generator)
        u = torch.rand(B, H, S, generator=generator)
        s[u < 0.2] = float("nan")
        s[(u >= 0.2) & (u < 0.3)] = float("-inf")
        s[(u >= 0.3) & (u < 0.35)] = float("inf")
        return s
    raise ValueError(kind)


def run_case(backend, device, case, dtype, kind, seed, layout="contiguous", score_dtype=torch.float32):
    B, H, N, D, S, budget, num_sink = case
    g = torch.Generator().manual_seed(seed)
    scores = make_scores(B, H, S, kind, g).to(score_dtype).to(device)
    k = torch.randn(B, H, N, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, H, N, D, generator=g).to(device=device, dtype=dtype)
    k, v = strided_last_dims(k, layout), strided_last_dims(v, layout)
    k_out, v_out, kept = lk.select_compact(scores, k, v, budget, num_sink=num_sink, backend=backend)
    ref_kept = reference.kept_positions(scores.float().cpu(), N, budget, num_sink)
    M = min(budget, N)
    assert kept.dtype == torch.int64 and kept.shape == (B, H, M)
    assert torch.equal(kept.cpu(), ref_kept), f"kept differs:\n{kept.cpu()}\nvs\n{ref_kept}"
    index = ref_kept.to(device)[..., None].expand(-1, -1, -1, D)
    assert k_out.dtype == dtype and k_out.is_contiguous() and v_out.is_contiguous()
    assert torch.equal(k_out, k.gather(2, index)) and torch.equal(v_out, v.gather(2, index))


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_random_scores(backend, device, dtype, case):
    require(backend, device)
    run_case(backend, device, case, dtype, "random", seed=sum(case))


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("kind", ["ties", "nan_inf"])
@pytest.mark.parametrize("case", CASES[1:4] + CASES[6:7], ids=lambda c: "x".join(map(str, c)))
def test_ties_nan_and_infinities(backend, device, kind, case):
    require(backend, device)
    run_case(backend, device, case, torch.float16, kind, seed=11)


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("layout", ["transposed", "padded"])
def test_non_contiguous_kv_and_half_scores(backend, device, layout):
    require(backend, device)
    run_case(
        backend,
        device,
        (2, 3, 45, 64, 40, 17, 2),
        torch.bfloat16,
        "random",
        seed=5,
        layout=layout,
        score_dtype=torch.bfloat16,
    )


def test_order_rules_on_a_hand_written_row():
    scores = torch.tensor([[[3.0, float("nan"), 5.0, 5.0, -0.0, 0.0, float("-inf"), 1.0]]])
    k = torch.arange(8.0).view(1, 1, 8, 1).expand(1, 1, 8, 2).contiguous()
    _, _, kept = lk.select_compact(scores, k, k.clone(), 5, num_sink=0)
    # 5.0 (pos 2), 5.0 (pos 3), 3.0 (pos 0), 1.0 (pos 7), then -0.0 == 0.0: lower position (4) first
    assert kept.tolist() == [[[0, 2, 3, 4, 7]]]
    _, _, kept = lk.select_compact(scores, k, k.clone(), 7, num_sink=0)
    assert kept.tolist() == [[[0, 2, 3, 4, 5, 6, 7]]]  # -inf still ranks above NaN


def test_sinks_and_window_always_kept():
    scores = torch.full((1, 1, 12), -1e9)
    scores[..., 5] = 10
    k = torch.randn(1, 1, 16, 4)
    _, _, kept = lk.select_compact(scores, k, k, 7, num_sink=2)
    assert kept.tolist() == [[[0, 1, 5, 12, 13, 14, 15]]]


def test_budget_too_small_raises():
    scores, k = torch.randn(1, 2, 40), torch.randn(1, 2, 50, 8)
    with pytest.raises(ValueError, match="budget=13 is smaller than the 14 always-kept"):
        lk.select_compact(scores, k, k, 13, num_sink=4)


BAD_INPUTS = [
    (dict(scores=(1, 2)), "scores must have 3 dims"),
    (dict(scores=(1, 3, 40)), r"scores must have shape \[1, 2, S\]"),
    (dict(scores=(1, 2, 51)), "scores cover 51 positions"),
    (dict(v=(1, 2, 49, 8)), "v must match k"),
    (dict(budget=0), "budget must be >= 1"),
    (dict(budget=2.5), "budget"),  # rejected by the schema (RuntimeError naming budget)
    (dict(num_sink=-1), "num_sink must be >= 0"),
    (dict(k_dtype=torch.int8), "k must have dtype"),
]


@pytest.mark.parametrize("change,message", BAD_INPUTS, ids=lambda x: str(x)[:40])
def test_bad_inputs_raise_naming_the_argument(change, message):
    scores = torch.randn(*change.get("scores", (1, 2, 40)))
    k = torch.randn(1, 2, 50, 8).to(change.get("k_dtype", torch.float32))
    v = torch.randn(*change.get("v", (1, 2, 50, 8))).to(k.dtype)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
        lk.select_compact(scores, k, v, change.get("budget", 20), num_sink=change.get("num_sink", 0))


def test_mixed_devices_raise():
    with pytest.raises(ValueError, match="share one device"):
        lk.select_compact(torch.randn(1, 2, 40), torch.randn(1, 2, 50, 8), torch.randn(1, 2, 50, 8, device="meta"), 20)
