"""Triton-specific checks: the kernels' internal paths (key splits, row blocks, split-K, chunk and
block edges of the selection) that the shared op tests reach only by chance, NaN propagation, the
backend's availability rules, and that every kernel compiles for sm_90 (the interpreter runs
programs the compiler would reject)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from op_testing import HAS_CUDA

import lookaheadkv_kernels as lk
from lookaheadkv_kernels.backends import reference

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
DEVICE = "cuda" if HAS_CUDA else "cpu"
ON_GPU = DEVICE == "cuda"


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


def attention_modules():
    """The kernel module, for its sizing helpers (the package attribute of that name is the op)."""
    import lookaheadkv_kernels.backends.triton  # noqa: F401  (registers the submodule)

    return sys.modules["lookaheadkv_kernels.backends.triton.attention_scores"]


# (B, Hq, Hkv, Tq, N, D, S, gqa_reduce, pool_kernel, pool_type); each runs with both query_reduce
ATTENTION_PATHS = [
    (1, 4, 2, 150, 150, 64, 140, "max", 3, "max"),  # Tq > rows per block: query chunks, per-head partials
    (1, 16, 1, 12, 90, 32, 90, "mean", 5, "avg"),  # G·Tq > rows per block: head blocks
    (1, 3, 1, 1, 300, 80, 290, "mean", 1, "max"),  # Tq = 1, G = 3, D not a power of two, several splits
    (1, 2, 2, 3, 40, 8, 37, "max", 7, "avg"),  # D below the dot's minimum width
    (2, 8, 2, 5, 60, 16, 60, "max", 1, "max"),  # G = 4, Tq = 5 (padded rows), direct unpooled write
    (1, 2, 1, 140, 140, 16, 130, "mean", 1, "max"),  # query chunks, GQA mean, unpooled
]


@pytest.mark.parametrize("query_reduce", ["mean", "max"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ATTENTION_PATHS, ids=lambda c: "x".join(map(str, c)))
def test_attention_paths_against_reference(case, dtype, query_reduce):
    B, Hq, Hkv, Tq, N, D, S, reduce, pool_kernel, pool_type = case
    q = randn(B, Hq, Tq, D, dtype=dtype, seed=1)
    k = randn(B, Hkv, N, D, dtype=dtype, seed=2)
    v = randn(B, Hkv, N, D, dtype=dtype, seed=3)
    kwargs = dict(
        num_scored=S, gqa_reduce=reduce, pool_kernel=pool_kernel, pool_type=pool_type, query_reduce=query_reduce
    )
    ref_out, ref_scores = reference.lookahead_attention(
        q.double().cpu(), k.double().cpu(), v.double().cpu(), S, D**-0.5, reduce, pool_kernel, pool_type, query_reduce
    )
    out, scores = lk.lookahead_attention(q, k, v, backend="triton", **kwargs)
    alone = lk.attention_scores(q, k, backend="triton", **kwargs)
    torch.testing.assert_close(alone, scores, rtol=0, atol=0)
    score_tol = dict(rtol=1e-2, atol=1e-5) if ON_GPU and dtype == torch.float32 else dict(rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(scores, ref_scores, **score_tol, check_dtype=False, check_device=False)
    out_tol = dict(rtol=2e-2, atol=1e-2) if dtype == torch.bfloat16 or ON_GPU else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, ref_out, **out_tol, check_dtype=False, check_device=False)


def test_attention_cases_reach_every_path():
    """The cases above must exercise several key splits, query chunks and head blocks."""
    module = attention_modules()
    device = torch.device(DEVICE)
    shapes = [module._row_blocking(Hq // Hkv, Tq) for _, Hq, Hkv, Tq, *_ in ATTENTION_PATHS]
    assert any(-(-Tq // block_tq) > 1 for (block_h, block_tq), (_, _, _, Tq, *_) in zip(shapes, ATTENTION_PATHS))
    assert any(-(-(Hq // Hkv) // block_h) > 1 for (block_h, _), (_, Hq, Hkv, *_) in zip(shapes, ATTENTION_PATHS))
    if not ON_GPU:
        B, Hq, Hkv, Tq, N = ATTENTION_PATHS[2][:5]
        assert module._key_splits(N, B * Hkv, device)[0] > 1


def test_scores_and_output_variants_share_one_autotune_entry(monkeypatch):
    """On a GPU the config decides the logits' MMA shapes and the summation order, so the scores of
    attention_scores and lookahead_attention are bit-identical only if both variants of the
    probability kernel resolve to the same autotune key (Triton's: the key args plus every
    tensor argument's dtype)."""
    tuner = attention_modules()._probabilities_kernel
    keys, run = [], tuner.run

    def recording_run(*args, **kwargs):
        named = {k: v for k, v in {**dict(zip(tuner.arg_names, args)), **kwargs}.items() if k in tuner.arg_names}
        dtypes = tuple(str(v.dtype) for v in named.values() if hasattr(v, "dtype"))
        keys.append(tuple(named[k] for k in tuner.keys) + dtypes)
        return run(*args, **kwargs)

    monkeypatch.setattr(tuner, "run", recording_run)
    q, k = randn(1, 4, 8, 64, dtype=torch.bfloat16, seed=1), randn(1, 2, 40, 64, dtype=torch.bfloat16, seed=2)
    lk.attention_scores(q, k, backend="triton")
    lk.lookahead_attention(q, k, k, backend="triton")
    assert len(keys) == 2 and keys[0] == keys[1]


@pytest.mark.parametrize("query_reduce", ["mean", "max"])
@pytest.mark.parametrize("Tq", [6, 140], ids=lambda t: f"Tq{t}")  # 140: query chunks, partials combined
@pytest.mark.parametrize("where", ["query", "key"])
def test_nan_logits_make_their_rows_nan_like_the_reference(where, Tq, query_reduce):
    B, Hq, Hkv, D = 1, 4, 2, 64
    N = Tq + 34
    q, k, v = randn(B, Hq, Tq, D, seed=4), randn(B, Hkv, N, D, seed=5), randn(B, Hkv, N, D, seed=6)
    if where == "query":
        q[0, 1, 2, 5] = float("nan")  # one query row of head 1 (group 0)
    else:
        k[0, 1, N - 4, 0] = float("nan")  # a key seen only by the last queries of group 1
    out, scores = lk.lookahead_attention(
        q, k, v, num_scored=N, gqa_reduce="max", query_reduce=query_reduce, backend="triton"
    )
    ref_out, ref_scores = reference.lookahead_attention(
        q.double().cpu(), k.double().cpu(), v.double().cpu(), N, D**-0.5, "max", 1, "max", query_reduce
    )
    assert torch.equal(torch.isnan(scores.cpu()), torch.isnan(ref_scores))
    assert torch.equal(torch.isnan(out.cpu()), torch.isnan(ref_out))
    finite = ~torch.isnan(ref_scores)
    assert finite.any()
    torch.testing.assert_close(scores.cpu()[finite].double(), ref_scores[finite], rtol=1e-3, atol=1e-6)


# (T, hidden, num_heads, D, rank)
QPROJ_PATHS = [
    (70, 600, 3, 96, 16),  # several row blocks, split-K with a ragged last slice, D/2 not a power of 2
    (2, 1000, 1, 16, 1),  # many slices, rank 1
]


@pytest.mark.parametrize("case", QPROJ_PATHS, ids=lambda c: "x".join(map(str, c)))
def test_qproj_paths_against_reference(case):
    T, hidden, H, D, rank = case
    x = randn(T, hidden, dtype=torch.float16, seed=7)
    weight = randn(H * D, hidden, dtype=torch.float16, seed=8, scale=hidden**-0.5)
    bias, norm = randn(H * D, seed=9), 1 + 0.1 * randn(D, seed=10)
    lora_a, lora_b = randn(rank, hidden, seed=11, scale=hidden**-0.5), randn(H * D, rank, seed=12, scale=0.1)
    cos, sin = randn(T, D, seed=13).cos(), randn(T, D, seed=14).sin()
    q = lk.lookahead_qproj(
        x,
        weight,
        cos,
        sin,
        H,
        bias=bias,
        lora_a=lora_a,
        lora_b=lora_b,
        lora_scale=2.0,
        norm_weight=norm,
        eps=1e-6,
        backend="triton",
    )
    d = lambda t: t.double().cpu()  # noqa: E731
    expected = reference.lookahead_qproj(
        d(x), d(weight), d(bias), d(lora_a), d(lora_b), 2.0, d(cos), d(sin), H, d(norm), 1e-6
    )
    torch.testing.assert_close(q, expected, rtol=2e-3, atol=2e-3, check_dtype=False, check_device=False)


@pytest.mark.parametrize("kind", ["all_equal", "two_values", "nan_and_signed_zero"])
@pytest.mark.parametrize("budget", [13, 64, 140, 200])  # 13 = the protected count, 200 ≥ N
def test_selection_ties_across_chunks_and_blocks(kind, budget):
    """Ties spanning many compaction chunks and radix-select blocks must be taken lowest position
    first, bit-identical to the reference."""
    B, H, N, D, S, num_sink = 2, 2, 160, 24, 150, 3
    g = torch.Generator().manual_seed(budget)
    if kind == "all_equal":
        scores = torch.full((B, H, S), 0.25)
    elif kind == "two_values":
        scores = torch.tensor([1.0, 2.0])[torch.randint(0, 2, (B, H, S), generator=g)]
    else:
        scores = torch.tensor([float("nan"), 0.0, -0.0, float("-inf")])[torch.randint(0, 4, (B, H, S), generator=g)]
    scores = scores.transpose(1, 2).contiguous().transpose(1, 2).to(DEVICE)  # non-contiguous rows
    k, v = randn(B, H, N, D, dtype=torch.bfloat16, seed=15), randn(B, H, N, D, dtype=torch.bfloat16, seed=16)
    k_out, v_out, kept = lk.select_compact(scores, k, v, budget, num_sink=num_sink, backend="triton")
    expected = reference.kept_positions(scores.cpu(), N, budget, num_sink)
    assert torch.equal(kept.cpu(), expected)
    index = expected.to(DEVICE)[..., None].expand(-1, -1, -1, D)
    assert torch.equal(k_out, k.gather(2, index)) and torch.equal(v_out, v.gather(2, index))


def test_available_follows_the_device():
    from lookaheadkv_kernels.backends import triton as backend

    assert backend.available() == (True, None)
    assert backend.available(torch.device("cpu"))[0] == (os.environ.get("TRITON_INTERPRET") == "1")
    ok, reason = backend.available(torch.device("meta"))
    assert not ok and "meta" in reason
    assert backend.available(torch.device("cuda"))[0] == HAS_CUDA


@pytest.mark.skipif(ON_GPU, reason="on a GPU the kernels are compiled by the tests themselves")
def test_every_kernel_compiles_for_sm90():
    script = Path(__file__).resolve().parents[1] / "triton_sm90_compile.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
