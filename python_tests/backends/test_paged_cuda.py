"""The CUDA kernels of the paged ops (csrc/cuda/attention_scores.cu, select_compact.cu) in the host
emulator, through backends/cuda.py's launch path, against the reference on ragged batches in paged
caches (test_paged_ops.PagedBatch: shuffled block ids, NaN-poisoned spare blocks, a table wider than
any sequence). Outputs and workspace start poisoned (NaN floats, 0x5A5A5A5A integers), so anything
a kernel fails to write shows. Index data is passed to the kernels unchecked, as on a GPU: a
sequence with an invalid block id, length or offset must come out NaN / -1, nothing else touched.
"""

import pytest
import torch
from paged_testing import PagedBatch, compaction_case, seed_of
from test_cuda_backend import PoisonedLaunch, emulated, output_tolerance, score_tolerance  # noqa: F401

from lookaheadkv_kernels.backends import cuda as cuda_backend
from lookaheadkv_kernels.backends import reference

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
DTYPES = (F32, F16, BF16)
LAYOUTS = ("NHD", "HND")


class IndexPoisonedLaunch(PoisonedLaunch):
    """PoisonedLaunch whose integer outputs start as 0x5A5A5A5A, not -1 (a value the kernels write)."""

    def empty(self, shape, dtype, device):
        t = super().empty(shape, dtype, device)
        if not t.is_floating_point() and t.dtype != torch.uint8 and t.numel():
            t.view(torch.uint8).fill_(0x5A)
        return t


def assert_close(got, want, what, **tolerance):
    torch.testing.assert_close(got, want, **tolerance, check_dtype=False, msg=lambda m: f"{what}: {m}")


def launches(module):
    # 4 multiprocessors: few key chunks; 132 (H100/H200): many, most past the short sequences' keys
    return [IndexPoisonedLaunch(module, 0, 4), IndexPoisonedLaunch(module, 0, 132)]


# ---- paged_attention_scores / paged_lookahead_attention -------------------------------------------

# (lens, tq, Hq, Hkv, D, block_size, unscored window, gqa_reduce, pool_kernel, pool_type, query_reduce)
SCORING_CASES = [
    # GQA 1; length 1, an exact block, partial last blocks
    ((1, 16, 37, 100), (1, 4, 8, 3), 4, 4, 64, 16, 0, "mean", 5, "avg", "max"),
    # GQA 3, Tq = N, a window left unscored
    ((50, 9, 130), (8, 9, 32), 6, 2, 64, 16, 8, "max", 3, "max", "mean"),
    # GQA 4, D 128, block 32: several key chunks, the short sequence's end before the last ones
    ((64, 300), (5, 7), 8, 2, 128, 32, 4, "mean", 1, "max", "max"),
    # a sequence with more row blocks than the grid plans (the mean Tq is 11) and one whose head
    # spans two segments of row tiles (Tq 150 > 128)
    ((60, 5, 3, 170), (40, 1, 1, 150), 8, 2, 64, 16, 2, "max", 7, "avg", "mean"),
    # rows of 20 elements: not 16-byte aligned in 16-bit types, the element-wise tile loads
    ((30, 7), (3, 2), 4, 2, 20, 16, 1, "mean", 3, "max", "max"),
]


def scoring_inputs(case, layout, dtype):
    lens, tq, Hq, Hkv, D, block_size, window, *_ = case
    batch = PagedBatch(lens, tq, Hq, Hkv, D, block_size, layout, dtype, seed_of(lens, layout, str(dtype)))
    num_scored = torch.tensor([max(1, n - window) for n in lens], dtype=torch.int32)
    return batch, num_scored


def scoring_args(batch, num_scored, case, layout, with_v=True):
    *_, D, _, _, gqa_reduce, pool_kernel, pool_type, query_reduce = case
    tail = (batch.block_table, batch.seq_lens, num_scored, D**-0.5, gqa_reduce, pool_kernel, pool_type, query_reduce)
    return (batch.q, batch.q_offsets, batch.k, batch.v if with_v else None, *tail, layout)


def expected_sequence(batch, num_scored, case, b):
    *_, D, _, _, gqa_reduce, pool_kernel, pool_type, query_reduce = case
    S = int(num_scored[b])
    out, scores = reference.lookahead_attention(
        batch.queries(b).double(), batch.dense_k[b][None].double(), batch.dense_v[b][None].double(), S, D**-0.5,
        gqa_reduce, pool_kernel, pool_type, query_reduce,
    )  # fmt: skip
    return out[0], scores[0]


def sequence_out(batch, out, b):
    return out[batch.q_offsets[b] : batch.q_offsets[b + 1]].transpose(0, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", range(len(SCORING_CASES)))
def test_emulated_paged_attention(emulated, case, layout, dtype):  # noqa: F811
    case = SCORING_CASES[case]
    batch, num_scored = scoring_inputs(case, layout, dtype)
    k_before, v_before = batch.k.clone(), batch.v.clone()
    capacity = batch.block_table.shape[1] * batch.block_size
    args = scoring_args(batch, num_scored, case, layout)
    for launch in launches(emulated):
        out, scores = cuda_backend.run_paged_attention(launch, *args)
        _, alone = cuda_backend.run_paged_attention(launch, *scoring_args(batch, num_scored, case, layout, False))
        assert scores.shape == (len(batch.lens), case[3], capacity) and out.shape == batch.q.shape
        assert torch.equal(alone, scores), "paged_attention_scores differs from paged_lookahead_attention's scores"
        for b in range(len(batch.lens)):
            S = int(num_scored[b])
            want_out, want_scores = expected_sequence(batch, num_scored, case, b)
            what = f"sequence {b} (num_sms={launch.num_sms})"
            assert_close(scores[b, :, :S], want_scores, what=f"scores of {what}", **score_tolerance(dtype))
            assert torch.isneginf(scores[b, :, S:]).all(), f"scores of {what} past num_scored must be -inf"
            assert_close(sequence_out(batch, out, b), want_out, what=f"out of {what}", **output_tolerance(dtype))
    # Scoring only reads the caches, the NaN spare blocks included.
    assert torch.equal(batch.k.view(torch.uint8), k_before.view(torch.uint8))
    assert torch.equal(batch.v.view(torch.uint8), v_before.view(torch.uint8))


def corrupt(batch, num_scored, what):
    """Index data a GPU caller could pass (the Python path rejects it on CPU), and which sequence it
    invalidates: -1 for none, None when q_offsets as a whole is malformed."""
    table, lens, scored, offsets = (t.clone() for t in (batch.block_table, batch.seq_lens, num_scored, batch.q_offsets))
    bad = 1
    if what == "block id":
        table[2, 3] = 10_000
        bad = 2
    elif what == "negative block id":
        table[1, 0] = -1
    elif what == "block id past the length":  # an entry the sequence does not use: never read
        table[1, 1] = 10_000
        bad = -1
    elif what == "length past the table":
        lens[1] = table.shape[1] * batch.block_size + 1
    elif what == "num_scored past the length":
        scored[1] = lens[1] + 1
    elif what == "more queries than keys":
        lens[1] = int(offsets[2] - offsets[1]) - 1
        scored[1] = 1
    elif what == "decreasing q_offsets":
        offsets[1], offsets[2] = offsets[2], offsets[1]
        bad = None
    elif what == "q_offsets past q's rows":
        offsets[-1] += 1
        bad = None
    return table, lens, scored, offsets, bad


@pytest.mark.parametrize(
    "what",
    [
        "block id",
        "negative block id",
        "block id past the length",
        "length past the table",
        "num_scored past the length",
        "more queries than keys",
        "decreasing q_offsets",
        "q_offsets past q's rows",
    ],
)
def test_emulated_paged_attention_guards_index_data(emulated, what):  # noqa: F811
    case = SCORING_CASES[1]
    batch, num_scored = scoring_inputs(case, "NHD", BF16)
    table, lens, scored, offsets, bad = corrupt(batch, num_scored, what)
    *_, gqa_reduce, pool_kernel, pool_type, query_reduce = case
    tail = (case[4] ** -0.5, gqa_reduce, pool_kernel, pool_type, query_reduce, "NHD")
    k_before = batch.k.clone()
    out, scores = cuda_backend.run_paged_attention(
        IndexPoisonedLaunch(emulated, 0, 4), batch.q, offsets, batch.k, batch.v, table, lens, scored, *tail
    )
    assert torch.equal(batch.k.view(torch.uint8), k_before.view(torch.uint8))
    for b in range(len(batch.lens)):
        rows = sequence_out(batch, out, b)
        if bad is None or b == bad:
            assert torch.isnan(scores[b]).all(), f"sequence {b}: scores must be NaN"
            assert torch.isnan(rows).all(), f"sequence {b}: out rows must be NaN"
            continue
        S = int(num_scored[b])
        want_out, want_scores = expected_sequence(batch, num_scored, case, b)
        assert_close(scores[b, :, :S], want_scores, what=f"scores of sequence {b}", **score_tolerance(BF16))
        assert torch.isneginf(scores[b, :, S:]).all()
        assert_close(rows, want_out, what=f"out of sequence {b}", **output_tolerance(BF16))


# ---- paged_select_compact -------------------------------------------------------------------------


def check_compaction(module, batch, scores, num_scored, budgets, num_sink, layout):
    """The kernel against the reference on copies: new lengths, kept positions, and both caches bit
    for bit (the compacted slots hold the kept rows; every other entry, spare blocks included, is
    as it was)."""
    want_k, want_v = batch.k.clone(), batch.v.clone()
    want_lens, want_kept = reference.paged_select_compact(
        scores, want_k, want_v, batch.block_table, batch.seq_lens, num_scored, budgets, num_sink, layout
    )
    new_lens, kept = cuda_backend.run_paged_select_compact(
        IndexPoisonedLaunch(module, 0, 4), scores, batch.k, batch.v, batch.block_table, batch.seq_lens, num_scored,
        budgets, num_sink, layout,
    )  # fmt: skip
    assert torch.equal(new_lens, want_lens), f"new_lens {new_lens.tolist()} != {want_lens.tolist()}"
    assert torch.equal(kept, want_kept), "kept differs"
    assert torch.equal(batch.k.view(torch.uint8), want_k.view(torch.uint8)), "k_cache differs"
    assert torch.equal(batch.v.view(torch.uint8), want_v.view(torch.uint8)), "v_cache differs"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("num_sink", [0, 4])
@pytest.mark.parametrize("block_size", [16, 32])
def test_emulated_paged_select_compact(emulated, block_size, num_sink, layout, dtype):  # noqa: F811
    """Lengths 1, 40, 97, 16, 130 with budgets >= N (bitwise untouched), == the protected count, an
    ordinary budget, == N and one above the protected count; NaN scores and ties."""
    seed = seed_of("cuda", layout, str(dtype), num_sink, block_size)
    batch, scores, num_scored, budgets = compaction_case(
        "cuda", "cpu", layout, dtype, num_sink, seed, block_size=block_size
    )
    check_compaction(emulated, batch, scores, num_scored, budgets, num_sink, layout)


@pytest.mark.parametrize("dtype,D", [(F16, 8), (BF16, 6), (F32, 5)], ids=str)
def test_emulated_paged_select_long_row(emulated, dtype, D):  # noqa: F811
    """A row with more candidates than one register tile (8192): the radix passes re-read the scores,
    and the moves run over several rounds; beside it a short sequence. Rows of 16 bytes move as
    vectors, rows of 12 and 20 bytes element by element."""
    lens = (9000, 20)
    batch = PagedBatch(lens, (1, 1), 1, 1, D, 16, "HND", dtype, seed=9)
    g = torch.Generator().manual_seed(9)
    capacity = batch.block_table.shape[1] * 16
    scores = torch.randn(2, 1, capacity, generator=g)
    scores[:, :, ::5] = 0.25  # ties across tiles
    num_scored = torch.tensor([8990, 20], dtype=torch.int32)
    budgets = torch.tensor([3000, 8], dtype=torch.int32)
    check_compaction(emulated, batch, scores, num_scored, budgets, 4, "HND")


@pytest.mark.parametrize("what", ["block id", "length past the table", "num_scored past the length", "budget"])
def test_emulated_paged_select_guards_index_data(emulated, what):  # noqa: F811
    """The sequence with invalid data gets new_len -1 and kept -1 and its blocks stay as they were;
    the others are compacted as usual."""
    batch, scores, num_scored, budgets = compaction_case("cuda", "cpu", "NHD", BF16, 4, seed=21)
    table, lens = batch.block_table.clone(), batch.seq_lens.clone()
    bad = 2
    if what == "block id":
        table[bad, 2] = batch.k.shape[0]
    elif what == "length past the table":
        lens[bad] = table.shape[1] * batch.block_size + 1
    elif what == "num_scored past the length":
        num_scored[bad] = lens[bad] + 1
    else:  # below the always-kept positions (sinks + unscored tail)
        budgets[bad] = int(lens[bad] - num_scored[bad])
    valid = [b for b in range(len(batch.lens)) if b != bad]
    want_k, want_v = batch.k.clone(), batch.v.clone()
    want_lens, want_kept = reference.paged_select_compact(
        scores[valid], want_k, want_v, batch.block_table[valid], batch.seq_lens[valid], num_scored[valid],
        budgets[valid], 4, "NHD",
    )  # fmt: skip
    new_lens, kept = cuda_backend.run_paged_select_compact(
        IndexPoisonedLaunch(emulated, 0, 4), scores, batch.k, batch.v, table, lens, num_scored, budgets, 4, "NHD"
    )
    assert new_lens[bad] == -1 and (kept[bad] == -1).all()
    assert torch.equal(new_lens[valid], want_lens) and torch.equal(kept[valid], want_kept)
    assert torch.equal(batch.k.view(torch.uint8), want_k.view(torch.uint8))
    assert torch.equal(batch.v.view(torch.uint8), want_v.view(torch.uint8))


def test_emulated_paged_ops_take_the_cpu_modules_arguments(emulated):  # noqa: F811
    from lookaheadkv_kernels.backends._native import native_module

    cpu = native_module("_C_cpu")
    for op in ("paged_attention_scores", "paged_lookahead_attention", "paged_select_compact"):
        names = [getattr(m, op).__doc__.split("(", 1)[1].split(")", 1)[0] for m in (cpu, emulated)]
        cpu_names, cuda_names = ([a.split(":")[0].strip() for a in n.split(",")] for n in names)
        assert cuda_names[: len(cpu_names) - 1] == cpu_names[:-1], op  # then the launch context


# ---- on a GPU -------------------------------------------------------------------------------------

gpu = pytest.mark.gpu


@gpu
def test_gpu_paged_eviction_without_host_sync_and_in_a_graph():
    """Scoring then in-place compaction of a ragged batch: no host synchronisation (the index data
    stays on the device), CUDA-graph capture and replay equal to eager, eager equal to the reference."""
    lens, tq, D = (3000, 700, 1, 4096), (32, 32, 1, 32), 128
    batch = PagedBatch(lens, tq, 32, 8, D, 16, "NHD", BF16, seed=4, device="cuda")
    num_scored = torch.tensor([n - t + 1 for n, t in zip(lens, tq)], dtype=torch.int32, device="cuda")
    budgets = torch.tensor([512, 512, 512, 5000], dtype=torch.int32, device="cuda")
    index = (batch.block_table, batch.seq_lens, num_scored)

    def evict(k, v):
        _, scores = cuda_backend.paged_lookahead_attention(
            batch.q, batch.q_offsets, k, v, *index, D**-0.5, "mean", 7, "max", "max", "NHD"
        )
        return (scores, *cuda_backend.paged_select_compact(scores, k, v, *index, budgets, 4, "NHD"))

    k, v = batch.k.clone(), batch.v.clone()
    eager = evict(k, v)
    want_k, want_v = batch.k.clone(), batch.v.clone()
    want_lens, want_kept = reference.paged_select_compact(eager[0], want_k, want_v, *index, budgets, 4, "NHD")
    assert torch.equal(eager[1], want_lens) and torch.equal(eager[2], want_kept)
    assert torch.equal(k.view(torch.uint8), want_k.view(torch.uint8))
    for b in range(len(lens)):
        S = int(num_scored[b])
        _, want = reference.lookahead_attention(
            batch.queries(b).cuda().double(), batch.dense_k[b][None].cuda().double(),
            batch.dense_v[b][None].cuda().double(), S, D**-0.5, "mean", 7, "max", "max",
        )  # fmt: skip
        assert_close(eager[0][b, :, :S], want[0], what=f"scores of sequence {b}", **score_tolerance(BF16))

    k, v = batch.k.clone(), batch.v.clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        evict(k, v)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    k, v = batch.k.clone(), batch.v.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on the capture stream
        evict(k, v)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = evict(k, v)
    k.copy_(batch.k)
    v.copy_(batch.v)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, eager):
        assert torch.equal(got, want)
    assert torch.equal(k.view(torch.uint8), want_k.view(torch.uint8))
    assert torch.equal(v.view(torch.uint8), want_v.view(torch.uint8))
