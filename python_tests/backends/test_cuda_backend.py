"""Tests specific to the CUDA backend (csrc/cuda/, backends/cuda.py).

Two groups:
- emulated: the kernels' exact source compiled for the host (cuda_emulator.h) runs on CPU tensors
  through backends/cuda.py's launch path, against the float64 reference. Covers every kernel path
  (tensor-core and FMA fallbacks, split-K, several row blocks and key chunks, head segments,
  unaligned rows, short and long select rows) on machines without a GPU. Outputs and workspace are
  poisoned (NaN / 0xff) so an element nothing wrote fails.
- gpu: what only a real device shows: CUDA-graph capture and replay of a whole eviction, no host
  synchronisation, side streams, run-to-run determinism, large shapes. Skipped without a GPU.
The op tests (test_<op>.py) also run the cuda backend on GPU machines.
"""

import cuda_emulator
import pytest
import torch
from op_testing import randn

from lookaheadkv_kernels.backends import cuda as cuda_backend
from lookaheadkv_kernels.backends import reference
from lookaheadkv_kernels.ops.validation import CHECKS

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
DTYPES = (F32, F16, BF16)


class PoisonedLaunch(cuda_backend.Launch):
    """Outputs and workspace start as NaN / 0xff bytes."""

    def empty(self, shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        if t.numel():
            t.view(torch.uint8).fill_(0xFF)  # NaN in every float dtype, -1 in integers
        return t


@pytest.fixture(scope="module")
def emulated():
    reason = cuda_emulator.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return cuda_emulator.load()


def launches(module):
    # 4 multiprocessors: few key chunks / K splits; 132 (H100/H200): many
    return [PoisonedLaunch(module, 0, 4), PoisonedLaunch(module, 0, 132)]


def qproj_tolerance(dtype):
    return {BF16: dict(rtol=1.6e-2, atol=1.6e-2), F16: dict(rtol=2e-3, atol=2e-3), F32: dict(rtol=2e-5, atol=2e-5)}[
        dtype
    ]


def score_tolerance(dtype):
    return dict(rtol=1e-3 if dtype != F32 else 2e-4, atol=1e-7)


def output_tolerance(dtype):
    return {BF16: dict(rtol=2e-2, atol=1e-2), F16: dict(rtol=4e-3, atol=2e-3), F32: dict(rtol=1e-4, atol=1e-5)}[dtype]


# ---- lookahead_qproj ----------------------------------------------------------------------------


def qproj_inputs(T, hidden, H, D, rank, with_bias, with_norm, dtype, g, x_pad=0, w_pad=0):
    x = randn(T, hidden + x_pad, dtype=dtype, generator=g)[:, :hidden]
    w = randn(H * D, hidden + w_pad, dtype=dtype, generator=g, scale=hidden**-0.5)[:, :hidden]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    angles = torch.arange(100, 100 + T).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    return (
        x,
        w,
        randn(H * D, generator=g) if with_bias else None,
        randn(rank, hidden, generator=g, scale=hidden**-0.5) if rank else None,
        randn(H * D, rank, generator=g, scale=0.1) if rank else None,
        4.0 if rank else 1.0,
        emb.cos(),
        emb.sin(),
        H,
        (1 + 0.1 * randn(D, generator=g)) if with_norm else None,
        1e-6,
    )


QPROJ_CASES = [
    # (T, hidden, H, D, rank, bias, norm, x_pad, w_pad)
    (1, 64, 1, 64, 0, False, False, 0, 0),  # one row
    (32, 256, 2, 128, 8, False, True, 0, 0),  # 32 lookahead rows, q_norm, LoRA
    (7, 200, 4, 32, 4, True, True, 0, 0),  # hidden % 32 != 0: partial last chunk
    (40, 1024, 3, 64, 8, True, True, 0, 0),  # two token tiles, K split over blocks
    (5, 97, 2, 64, 8, True, False, 0, 0),  # hidden % 8 != 0: FMA path for every dtype
    (6, 128, 2, 64, 0, False, True, 1, 0),  # x rows not 16-byte aligned: FMA path
    (6, 128, 2, 64, 0, True, False, 0, 3),  # W rows not 16-byte aligned: FMA path
    (3, 64, 70, 2, 0, False, True, 0, 0),  # head_dim 2, 70 heads: several row tiles
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", QPROJ_CASES, ids=lambda c: "x".join(map(str, c)))
def test_emulated_qproj(emulated, dtype, case):
    g = torch.Generator().manual_seed(sum(case[:5]))
    args = CHECKS["lookahead_qproj"](*qproj_inputs(*case[:7], dtype, g, x_pad=case[7], w_pad=case[8]))
    d = lambda t: t.double() if isinstance(t, torch.Tensor) else t  # noqa: E731
    want = reference.lookahead_qproj(*(d(a) for a in args))
    for launch in launches(emulated):
        got = cuda_backend.run_lookahead_qproj(launch, *args)
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(
            got,
            want,
            **qproj_tolerance(dtype),
            check_dtype=False,
            check_device=False,
            msg=lambda m: f"q (num_sms={launch.num_sms}): {m}",
        )


# ---- attention_scores / lookahead_attention -----------------------------------------------------

ATTENTION_CASES = [
    # (B, Hq, Hkv, Tq, N, D, S, gqa_reduce, pool_kernel, pool_type)
    (1, 1, 1, 1, 1, 64, 1, "mean", 1, "max"),  # N = 1
    (2, 4, 4, 5, 37, 64, 37, "max", 7, "max"),  # GQA 1, pooling
    (1, 6, 2, 8, 50, 64, 42, "mean", 5, "avg"),  # S < N
    (1, 8, 2, 16, 16, 128, 16, "mean", 7, "max"),  # Tq = N
    (1, 8, 1, 7, 130, 128, 100, "max", 5, "avg"),  # GQA 8, several key tiles
    (1, 2, 1, 3, 20, 256, 3, "mean", 7, "avg"),  # D = 256, pool wider than S
    (1, 8, 2, 40, 300, 96, 280, "max", 3, "max"),  # 3 m-tiles per head: two row blocks per group
    (1, 2, 1, 150, 160, 64, 150, "max", 5, "avg"),  # Tq > 128: a head spans two row blocks
    (2, 4, 2, 4, 70, 20, 66, "mean", 31, "max"),  # D % 8 != 0: element-wise tile loads; widest pool
]


def attention_inputs(case, dtype, g):
    B, Hq, Hkv, Tq, N, D = case[:6]
    return tuple(randn(*shape, dtype=dtype, generator=g) for shape in ((B, Hq, Tq, D), (B, Hkv, N, D), (B, Hkv, N, D)))


def attention_args(case, query_reduce="mean"):
    *_, D, S, reduce, pool_kernel, pool_type = case
    return S, D**-0.5, reduce, pool_kernel, pool_type, query_reduce


def expected_scores(q, k, case, query_reduce):
    """Float64 scores written out here (independent of reference._scores): per-head mean/max over the
    Tq query rows, GQA mean/max, then the reference's pooling."""
    *_, D, S, reduce, pool_kernel, pool_type = case
    probs = reference._grouped_probabilities(q.double(), k.double(), D**-0.5)[..., :S]  # [B, Hkv, G, Tq, S]
    per_head = probs.mean(dim=3) if query_reduce == "mean" else probs.amax(dim=3)
    raw = per_head.mean(dim=2) if reduce == "mean" else per_head.amax(dim=2)
    return reference._pool(raw, pool_kernel, pool_type)


# query_reduce = "max": Tq = 1, GQA 1/3/8, pooled and unpooled, head segments, several key chunks
QUERY_MAX_CASES = [
    (1, 1, 1, 1, 1, 64, 1, "mean", 1, "max"),  # N = 1, Tq = 1
    (2, 4, 1, 1, 90, 64, 90, "max", 1, "max"),  # Tq = 1, GQA 4, unpooled
    (2, 4, 4, 5, 37, 64, 37, "max", 7, "max"),  # GQA 1, pooling
    (1, 6, 2, 8, 50, 64, 42, "mean", 5, "avg"),  # GQA 3, S < N
    (1, 8, 1, 7, 130, 128, 100, "max", 5, "avg"),  # GQA 8, several key tiles
    (1, 2, 1, 3, 20, 256, 3, "mean", 7, "avg"),  # D = 256, pool wider than S
    (1, 8, 2, 40, 300, 96, 280, "mean", 3, "max"),  # 3 m-tiles per head: two row blocks per group
    (1, 2, 1, 150, 160, 64, 150, "max", 1, "avg"),  # Tq > 128: a head spans two row blocks (segments)
    (1, 4, 2, 150, 170, 32, 160, "mean", 5, "max"),  # segments, GQA mean
    (2, 4, 2, 4, 70, 20, 66, "mean", 31, "max"),  # D % 8 != 0: element-wise tile loads; widest pool
]


def check_attention_case(module, dtype, case, query_reduce):
    q, k, v = attention_inputs(case, dtype, torch.Generator().manual_seed(len(case) + case[4]))
    args = CHECKS["lookahead_attention"](q, k, v, *attention_args(case, query_reduce))
    want_out, want_scores = reference.lookahead_attention(q.double(), k.double(), v.double(), *args[3:])
    torch.testing.assert_close(
        want_scores,
        expected_scores(q, k, case, query_reduce),
        rtol=1e-12,
        atol=0,
        check_dtype=False,
        check_device=False,
    )
    for launch in launches(module):
        out, scores = cuda_backend.run_attention(launch, *args)
        _, alone = cuda_backend.run_attention(launch, args[0], args[1], None, *args[3:])
        what = f"(query_reduce={query_reduce}, num_sms={launch.num_sms})"
        torch.testing.assert_close(
            scores,
            want_scores,
            **score_tolerance(dtype),
            check_dtype=False,
            check_device=False,
            msg=lambda m: f"scores {what}: {m}",
        )
        torch.testing.assert_close(
            out,
            want_out,
            **output_tolerance(dtype),
            check_dtype=False,
            check_device=False,
            msg=lambda m: f"out {what}: {m}",
        )
        assert torch.equal(alone, scores), "attention_scores differs from lookahead_attention's scores"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "x".join(map(str, c)))
def test_emulated_attention(emulated, dtype, case):
    check_attention_case(emulated, dtype, case, "mean")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", QUERY_MAX_CASES, ids=lambda c: "x".join(map(str, c)))
def test_emulated_attention_query_max(emulated, dtype, case):
    check_attention_case(emulated, dtype, case, "max")


def test_emulated_attention_query_reduce_is_per_head():
    """Guards the test data: with several query rows, max and mean over them give different scores."""
    case = QUERY_MAX_CASES[4]
    q, k, _ = attention_inputs(case, F32, torch.Generator().manual_seed(len(case) + case[4]))
    assert not torch.allclose(expected_scores(q, k, case, "max"), expected_scores(q, k, case, "mean"))


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("layout", ["transposed", "row_stride_plus_1"])
def test_emulated_attention_strided(emulated, dtype, layout):
    case = (2, 6, 2, 4, 33, 64, 30, "mean", 5, "avg")
    q, k, v = attention_inputs(case, dtype, torch.Generator().manual_seed(5))
    if layout == "transposed":
        views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    else:  # rows one element apart from 16-byte alignment: the element-wise tile loader
        views = []
        for t in (q, k, v):
            wide = torch.zeros(*t.shape[:-1], t.shape[-1] + 1, dtype=dtype)
            wide[..., :-1] = t
            views.append(wide[..., :-1])
    args = CHECKS["lookahead_attention"](*views, *attention_args(case))
    want_out, want_scores = reference.lookahead_attention(q.double(), k.double(), v.double(), *args[3:])
    for launch in launches(emulated):
        out, scores = cuda_backend.run_attention(launch, *args)
        torch.testing.assert_close(scores, want_scores, **score_tolerance(dtype), check_dtype=False, check_device=False)
        torch.testing.assert_close(out, want_out, **output_tolerance(dtype), check_dtype=False, check_device=False)


@pytest.mark.parametrize("query_reduce", ["mean", "max"])
@pytest.mark.parametrize("Tq", [4, 150])
def test_emulated_attention_nan_row(emulated, query_reduce, Tq):
    """docs/ops.md: a row whose logits contain NaN yields NaN scores for the keys it touches. Query
    row 0 of head 1 sees keys 0..N-Tq; every other row is finite, so under max reduce the keys
    after N-Tq (touched only by later rows) stay finite. Tq = 150: the NaN row is in the first of
    two segments of its head, a later row (in the second segment) in the other case."""
    B, Hq, Hkv, N, D = 1, 2, 1, Tq + 20, 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (randn(*s, dtype=BF16, generator=g) for s in ((B, Hq, Tq, D), (B, Hkv, N, D), (B, Hkv, N, D)))
    q[0, 1, 0, 3] = float("nan")
    args = CHECKS["lookahead_attention"](q, k, v, N, D**-0.5, "max", 1, "max", query_reduce)
    for launch in launches(emulated):
        out, scores = cuda_backend.run_attention(launch, *args)
        assert torch.isnan(scores[0, 0, : N - Tq + 1]).all()
        assert torch.isfinite(scores[0, 0, N - Tq + 1 :]).all()
        assert (
            torch.isnan(out[0, 1, 0]).all() and torch.isfinite(out[0, 0]).all() and torch.isfinite(out[0, 1, 1:]).all()
        )
    if Tq > 128:  # a NaN row in the second segment of head 0
        q[0, 1, 0, 3] = 0.0
        q[0, 0, 140, 3] = float("nan")
        args = CHECKS["lookahead_attention"](q, k, v, N, D**-0.5, "max", 1, "max", query_reduce)
        _, scores = cuda_backend.run_attention(PoisonedLaunch(emulated, 0, 4), *args)
        assert torch.isnan(scores[0, 0, : N - Tq + 141]).all()
        assert torch.isfinite(scores[0, 0, N - Tq + 141 :]).all()


# ---- select_compact -----------------------------------------------------------------------------

SELECT_CASES = [
    # (B, Hkv, N, D, S, budget, num_sink)
    (1, 1, 1, 64, 1, 1, 0),  # N = 1
    (2, 3, 40, 64, 40, 10, 0),  # plain top-k
    (1, 2, 50, 128, 42, 20, 4),  # sinks + unscored window
    (1, 2, 50, 64, 42, 12, 4),  # budget = protected count: nothing picked
    (1, 2, 30, 64, 30, 64, 4),  # budget > N keeps everything
    (1, 1, 20, 32, 16, 16, 10),  # mostly sinks
    (1, 2, 9000, 64, 8900, 700, 4),  # > 8192 candidates: multi-block radix select
    (1, 1, 9000, 8, 8999, 8999, 0),  # long row, pick all candidates but one
    (2, 1, 5000, 16, 4900, 6000, 0),  # budget > N over two tiles
    (1, 1, 40000, 8, 100, 39950, 4),  # few candidates, long unscored tail: multi-block path
]


def select_scores(B, H, S, kind, g):
    if kind == "random":
        return torch.randn(B, H, S, generator=g)
    if kind == "ties":  # few distinct values, +0.0 and -0.0 among them
        return torch.tensor([1.0, 0.5, 0.0, -0.0, -2.0])[torch.randint(0, 5, (B, H, S), generator=g)]
    s = torch.randn(B, H, S, generator=g)  # NaN and infinities
    u = torch.rand(B, H, S, generator=g)
    s[u < 0.2] = float("nan")
    s[(u >= 0.2) & (u < 0.3)] = float("-inf")
    s[(u >= 0.3) & (u < 0.35)] = float("inf")
    return s


def check_select(module, case, kind, dtype, seed, layout="contiguous"):
    B, H, N, D, S, budget, num_sink = case
    g = torch.Generator().manual_seed(seed)
    scores = select_scores(B, H, S, kind, g)
    k = torch.randn(B, H, N, D, generator=g).to(dtype)
    v = torch.randn(B, H, N, D, generator=g).to(dtype)
    if layout == "strided":  # scores' last dim strided; K/V rows off 16-byte alignment
        scores = scores.transpose(1, 2).contiguous().transpose(1, 2)
        k = torch.cat([k, k[..., :1]], dim=-1)[..., :D]
        v = torch.cat([v, v[..., :1]], dim=-1)[..., :D]
    args = CHECKS["select_compact"](scores, k, v, budget, num_sink)
    want = reference.kept_positions(scores, N, budget, num_sink)
    index = want[..., None].expand(-1, -1, -1, D)
    k_out, v_out, kept = cuda_backend.run_select_compact(PoisonedLaunch(module, 0, 4), *args)
    assert torch.equal(kept, want), f"kept differs:\n{kept}\nvs\n{want}"
    assert k_out.is_contiguous() and torch.equal(k_out, k.gather(2, index)) and torch.equal(v_out, v.gather(2, index))


@pytest.mark.parametrize("kind", ["random", "ties", "nan_inf"])
@pytest.mark.parametrize("case", SELECT_CASES, ids=lambda c: "x".join(map(str, c)))
def test_emulated_select(emulated, case, kind):
    check_select(emulated, case, kind, BF16, seed=sum(case))


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
@pytest.mark.parametrize("case", [SELECT_CASES[2], SELECT_CASES[6]], ids=lambda c: "x".join(map(str, c)))
def test_emulated_select_strided(emulated, case, dtype):
    check_select(emulated, case, "ties", dtype, seed=3, layout="strided")


# ---- on a GPU -----------------------------------------------------------------------------------

gpu = pytest.mark.gpu


def eviction(x, weight, cos, sin, k, v, lora_a, lora_b):
    """lookahead_qproj -> lookahead_attention -> select_compact, as the runtime chains them."""
    q = cuda_backend.lookahead_qproj(x, weight, None, lora_a, lora_b, 2.0, cos, sin, 32, None, 1e-6)
    q = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, T, D], strided
    out, scores = cuda_backend.lookahead_attention(q, k, v, k.shape[2] - 32, 128**-0.5, "mean", 7, "max", "mean")
    k_out, v_out, kept = cuda_backend.select_compact(scores, k, v, 512, 4)
    return q, out, scores, k_out, v_out, kept


def eviction_inputs(N=6000, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: randn(*s, dtype=BF16, device="cuda", generator=g, scale=scale)  # noqa: E731
    x, weight = r(32, 4096), r(32 * 128, 4096, scale=4096**-0.5)
    lora_a = randn(8, 4096, device="cuda", generator=g, scale=0.01)
    lora_b = randn(32 * 128, 8, device="cuda", generator=g, scale=0.1)
    angles = torch.arange(N, N + 32, device="cuda").float()[:, None] / (10000 ** (torch.arange(64, device="cuda") / 64))
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    return x, weight, cos, sin, r(1, 8, N, 128), r(1, 8, N, 128), lora_a, lora_b


@gpu
def test_gpu_eviction_graph_replay_matches_eager():
    inputs = eviction_inputs()
    eager = eviction(*inputs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on the capture stream
        eviction(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = eviction(*inputs)
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, eager):
        assert torch.equal(got, want)


@gpu
def test_gpu_no_host_synchronisation():
    inputs = eviction_inputs(N=3000)
    eviction(*inputs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eviction(*inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@gpu
def test_gpu_side_stream_and_determinism():
    inputs = eviction_inputs(N=4100, seed=1)
    first = eviction(*inputs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        second = eviction(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@gpu
@pytest.mark.parametrize("query_reduce", ["mean", "max"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_large_attention_and_select(dtype, query_reduce):
    """Many key chunks and long select rows at real sizes, against the float64 reference."""
    g = torch.Generator().manual_seed(2)
    B, Hq, Hkv, Tq, N, D = 1, 32, 8, 32, 20000, 128
    q, k, v = (
        randn(*s, dtype=dtype, device="cuda", generator=g) for s in ((B, Hq, Tq, D), (B, Hkv, N, D), (B, Hkv, N, D))
    )
    args = (N - Tq, D**-0.5, "max", 7, "max", query_reduce)
    out, scores = cuda_backend.lookahead_attention(q, k, v, *args)
    want_out, want_scores = reference.lookahead_attention(q.double(), k.double(), v.double(), *args)
    torch.testing.assert_close(scores, want_scores, **score_tolerance(dtype), check_dtype=False, check_device=False)
    torch.testing.assert_close(out, want_out, **output_tolerance(dtype), check_dtype=False, check_device=False)
    k_out, v_out, kept = cuda_backend.select_compact(scores, k, v, 1024, 4)
    want_kept = reference.kept_positions(scores, N, 1024, 4)
    assert torch.equal(kept, want_kept)
    index = want_kept[..., None].expand(-1, -1, -1, D)
    assert torch.equal(k_out, k.gather(2, index)) and torch.equal(v_out, v.gather(2, index))
