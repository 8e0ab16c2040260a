"""The paged ops (docs/ops.md §5-6) against the dense ops on each sequence gathered out of the cache.

Every case builds a ragged batch in a paged cache whose block ids are shuffled, with the entries
that belong to no sequence poisoned with NaN: scoring that reads them gives NaN scores, and
compaction must leave them (and every entry outside the compacted slots) bit for bit as they were.
"""

import pytest
import torch
from op_testing import DTYPES, backend_cases, require
from paged_testing import PagedBatch, compaction_case, output_tolerance, score_tolerance, seed_of

import lookaheadkv_kernels as lk
from lookaheadkv_kernels.backends import reference

LAYOUTS = ("NHD", "HND")


# (lens, tq, Hq, Hkv, D, block_size, num_scored offset from the end)
SCORING_CASES = [
    ((1, 16, 37, 100), (1, 4, 8, 3), 4, 4, 64, 16, 0),  # GQA 1, length 1, an exact block, partial blocks
    ((50, 9, 130), (8, 9, 32), 6, 2, 64, 16, 8),  # GQA 3, Tq = N, a window left unscored
    ((64, 300), (5, 7), 8, 2, 128, 32, 4),  # GQA 4, D 128, block 32, several key blocks
    ((33, 7), (2, 7), 8, 1, 64, 64, 0),  # GQA 8, block 64
]


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(SCORING_CASES)))
def test_paged_scores_and_outputs_match_the_dense_ops(backend, device, layout, dtype, case):
    require(backend, device)
    lens, tq, Hq, Hkv, D, block_size, window = SCORING_CASES[case]
    batch = PagedBatch(
        lens, tq, Hq, Hkv, D, block_size, layout, dtype, seed_of(case, layout, str(dtype)), device=device
    )
    num_scored = torch.tensor([max(1, n - window) for n in lens], dtype=torch.int32, device=device)
    kwargs = dict(gqa_reduce="max" if case % 2 else "mean", pool_kernel=5, pool_type="avg", query_reduce="max")
    out, scores = lk.paged_lookahead_attention(
        batch.q, batch.q_offsets, batch.k, batch.v, batch.block_table, batch.seq_lens,
        num_scored=num_scored, layout=layout, backend=backend, **kwargs,
    )  # fmt: skip
    only_scores = lk.paged_attention_scores(
        batch.q, batch.q_offsets, batch.k, batch.block_table, batch.seq_lens,
        num_scored=num_scored, layout=layout, backend=backend, **kwargs,
    )  # fmt: skip
    capacity = batch.block_table.shape[1] * block_size
    assert scores.shape == (len(lens), Hkv, capacity) and scores.dtype == torch.float32
    assert torch.equal(only_scores, scores), "paged_attention_scores differs from paged_lookahead_attention's scores"
    for b in range(len(lens)):
        S = int(num_scored[b])
        q = batch.queries(b).double()
        want_out, want = reference.lookahead_attention(
            q, batch.dense_k[b][None].double(), batch.dense_v[b][None].double(), S, D**-0.5,
            kwargs["gqa_reduce"], 5, "avg", "max",
        )  # fmt: skip
        torch.testing.assert_close(scores[b, :, :S].cpu().double(), want[0], **score_tolerance(backend, device, dtype))
        assert torch.isneginf(scores[b, :, S:]).all(), "scores past num_scored must be -inf"
        got_out = out[batch.q_offsets[b] : batch.q_offsets[b + 1]].transpose(0, 1).cpu().double()
        torch.testing.assert_close(got_out, want_out[0], **output_tolerance(dtype))


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_sink", [0, 4])
@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_select_compact_in_place(backend, device, layout, dtype, num_sink, block_size):
    require(backend, device)
    seed = seed_of(layout, str(dtype), num_sink, block_size)
    batch, scores, num_scored, budgets = compaction_case(
        backend, device, layout, dtype, num_sink, seed, block_size=block_size
    )
    k_before, v_before = batch.k.clone(), batch.v.clone()
    want_k, want_v = batch.k.cpu().clone(), batch.v.cpu().clone()
    want_lens, want_kept = reference.paged_select_compact(
        scores.cpu(), want_k, want_v, batch.block_table.cpu(), batch.seq_lens.cpu(), num_scored.cpu(),
        budgets.cpu(), num_sink, layout,
    )  # fmt: skip
    new_lens, kept = lk.paged_select_compact(
        scores, batch.k, batch.v, batch.block_table, batch.seq_lens, budgets,
        num_scored=num_scored, num_sink=num_sink, layout=layout, backend=backend,
    )  # fmt: skip
    assert new_lens.dtype == torch.int32 and kept.dtype == torch.int32
    assert torch.equal(new_lens.cpu(), want_lens) and torch.equal(kept.cpu(), want_kept)
    # Bitwise (NaN-poisoned spare entries included): the compacted slots hold the kept rows,
    # everything else is as it was.
    assert torch.equal(batch.k.cpu().view(torch.uint8), want_k.view(torch.uint8))
    assert torch.equal(batch.v.cpu().view(torch.uint8), want_v.view(torch.uint8))
    for b, n in enumerate(batch.lens):
        M = int(want_lens[b])
        assert M == min(int(budgets[b]), n)
        rows = reference.gather_sequence(batch.k.cpu(), batch.block_table[b].cpu(), M, layout)
        index = want_kept[b, :, :M].long()[..., None].expand(-1, -1, rows.shape[-1])
        assert torch.equal(rows, batch.dense_k[b].gather(1, index))
    untouched = batch.spare.long()
    assert torch.equal(batch.k.cpu()[untouched].view(torch.uint8), k_before.cpu()[untouched].view(torch.uint8))
    assert torch.equal(batch.v.cpu()[untouched].view(torch.uint8), v_before.cpu()[untouched].view(torch.uint8))
    first = batch.block_table[0, 0].long().cpu()  # sequence 0 keeps everything: bit for bit
    assert torch.equal(batch.k.cpu()[first].view(torch.uint8), k_before.cpu()[first].view(torch.uint8))


@pytest.mark.parametrize("backend,device", backend_cases())
def test_score_then_compact_equals_dense_select_compact(backend, device):
    """The whole eviction on a paged cache keeps, per sequence, what select_compact keeps dense."""
    require(backend, device)
    lens, Hq, Hkv, D = (300, 1, 77), 6, 2, 64
    batch = PagedBatch(lens, (4, 1, 4), Hq, Hkv, D, 16, "NHD", torch.float32, 11, device=device)
    num_scored = torch.tensor([296, 1, 73], dtype=torch.int32, device=device)
    scores = lk.paged_attention_scores(
        batch.q, batch.q_offsets, batch.k, batch.block_table, batch.seq_lens, num_scored=num_scored,
        pool_kernel=7, backend=backend,
    )  # fmt: skip
    budgets = torch.tensor([64, 64, 24], dtype=torch.int32, device=device)
    new_lens, kept = lk.paged_select_compact(
        scores, batch.k, batch.v, batch.block_table, batch.seq_lens, budgets, num_scored=num_scored, num_sink=4,
        backend=backend,
    )  # fmt: skip
    for b in range(len(lens)):
        S = int(num_scored[b])
        dense = lk.attention_scores(
            batch.queries(b), batch.dense_k[b][None], num_scored=S, pool_kernel=7, backend="reference"
        )
        want_k, want_v, want_kept = lk.select_compact(
            dense, batch.dense_k[b][None], batch.dense_v[b][None], int(budgets[b]), num_sink=4, backend="reference"
        )
        M = want_kept.shape[2]
        assert int(new_lens[b]) == M and torch.equal(kept[b, :, :M].cpu().long(), want_kept[0])
        got_k = reference.gather_sequence(batch.k.cpu(), batch.block_table[b].cpu(), M, "NHD")
        assert torch.equal(got_k, want_k[0])


def test_ragged_batch_up_to_32k():
    """One batch with lengths from 1 to 32K (small heads, so the float64 reference stays cheap)."""
    lens, tq = (1, 3, 1000, 4096, 32768), (1, 2, 8, 8, 8)
    batch = PagedBatch(lens, tq, 2, 1, 64, 16, "NHD", torch.bfloat16, 5)
    num_scored = torch.tensor([1, 1, 992, 4088, 32760], dtype=torch.int32)
    scores = lk.paged_attention_scores(
        batch.q, batch.q_offsets, batch.k, batch.block_table, batch.seq_lens, num_scored=num_scored,
        pool_kernel=7, pool_type="max", backend="cpu",
    )  # fmt: skip
    for b in range(len(lens)):
        S = int(num_scored[b])
        want = reference.attention_scores(
            batch.queries(b).double(), batch.dense_k[b][None].double(), S, 0.125, "mean", 7, "max", "mean"
        )
        torch.testing.assert_close(scores[b, :, :S].double(), want[0], rtol=1e-3, atol=1e-7)
    budgets = torch.tensor([128] * len(lens), dtype=torch.int32)
    new_lens, _ = lk.paged_select_compact(
        scores, batch.k, batch.v, batch.block_table, batch.seq_lens, budgets, num_scored=num_scored, num_sink=4
    )
    assert new_lens.tolist() == [1, 3, 128, 128, 128]


# ---- bad input: a clear error naming the argument, before any kernel runs -------------------------


def bad_input_batch():
    batch = PagedBatch((20, 9), (2, 1), 4, 2, 16, 16, "NHD", torch.float32, 3)
    num_scored = torch.tensor([18, 9], dtype=torch.int32)
    return batch, num_scored


def paged_scores(batch, **changes):
    args = dict(
        q=batch.q, q_offsets=batch.q_offsets, k_cache=batch.k, block_table=batch.block_table,
        seq_lens=batch.seq_lens, num_scored=torch.tensor([18, 9], dtype=torch.int32),
    )  # fmt: skip
    args.update(changes)
    return lk.paged_attention_scores(
        args["q"], args["q_offsets"], args["k_cache"], args["block_table"], args["seq_lens"],
        num_scored=args["num_scored"],
    )  # fmt: skip


@pytest.mark.parametrize(
    "change,match",
    [
        (
            lambda b: dict(block_table=b.block_table.masked_fill(b.block_table == b.block_table[0, 0], 99)),
            "block_table",
        ),
        (
            lambda b: dict(block_table=b.block_table.masked_fill(b.block_table == b.block_table[0, 0], -1)),
            "block_table",
        ),
        (lambda b: dict(seq_lens=torch.tensor([20, 60], dtype=torch.int32)), "seq_lens"),  # beyond the table
        (lambda b: dict(num_scored=torch.tensor([21, 9], dtype=torch.int32)), "num_scored"),  # > length
        (lambda b: dict(num_scored=torch.tensor([0, 9], dtype=torch.int32)), "num_scored"),
        (lambda b: dict(q_offsets=torch.tensor([0, 3, 3], dtype=torch.int32)), "queries"),  # Tq = 0
        (lambda b: dict(q_offsets=torch.tensor([1, 2, 3], dtype=torch.int32)), "q_offsets"),
        (lambda b: dict(q_offsets=torch.tensor([0, 2], dtype=torch.int32)), "q_offsets"),  # too short
        (lambda b: dict(q=b.q[:, :3]), "heads"),  # 3 query heads over 2 KV heads
        (lambda b: dict(q=b.q.half()), "dtype"),
        (lambda b: dict(block_table=b.block_table.float()), "block_table"),
        (lambda b: dict(seq_lens=b.seq_lens[:1]), "seq_lens"),
        (lambda b: dict(k_cache=b.k[..., :8]), "head_dim"),
    ],
)
def test_paged_scoring_rejects_bad_input(change, match):
    batch, _ = bad_input_batch()
    with pytest.raises((ValueError, TypeError), match=match):
        paged_scores(batch, **change(batch))


def test_paged_select_compact_rejects_bad_input():
    batch, num_scored = bad_input_batch()
    scores = torch.rand(2, 2, batch.block_table.shape[1] * 16)

    def compact(**changes):
        args = dict(block_table=batch.block_table, budgets=torch.tensor([10, 9], dtype=torch.int32), num_sink=0)
        args.update(changes)
        return lk.paged_select_compact(
            scores, batch.k, batch.v, args["block_table"], batch.seq_lens, args["budgets"],
            num_scored=num_scored, num_sink=args["num_sink"],
        )  # fmt: skip

    with pytest.raises(ValueError, match="budgets"):
        compact(budgets=torch.tensor([1, 9], dtype=torch.int32))  # below the unscored tail of 2
    with pytest.raises(ValueError, match="budgets"):
        compact(budgets=torch.tensor([0, 9], dtype=torch.int32))
    shared = batch.block_table.clone()
    shared[1, 0] = shared[0, 0]  # sequence 1 reads sequence 0's first block (a shared prefix)
    with pytest.raises(ValueError, match="sequence"):
        compact(block_table=shared)
    with pytest.raises(ValueError, match="v_cache"):
        lk.paged_select_compact(scores, batch.k, batch.v[:1], batch.block_table, batch.seq_lens, num_scored)
    k_before = batch.k.clone()
    compact(block_table=shared, budgets=torch.tensor([20, 9], dtype=torch.int32))  # shared but untouched: allowed
    assert torch.equal(batch.k.view(torch.uint8), k_before.view(torch.uint8))


def test_native_module_checks_index_data_itself():
    """A direct call of the CPU module with a bad block id raises instead of reading out of bounds."""
    from lookaheadkv_kernels.backends import cpu

    batch, num_scored = bad_input_batch()
    table = batch.block_table.clone()
    table[0, 1] = 10_000
    with pytest.raises(ValueError, match="block_table"):
        cpu.paged_attention_scores(
            batch.q, batch.q_offsets, batch.k, table, batch.seq_lens, num_scored, 0.25, "mean", 1, "max", "mean", "NHD"
        )
    scores = torch.rand(2, 2, table.shape[1] * 16)
    with pytest.raises(ValueError, match="block_table"):
        cpu.paged_select_compact(
            scores, batch.k, batch.v, table, batch.seq_lens, num_scored, torch.tensor([4, 4], dtype=torch.int32), 0,
            "NHD",
        )  # fmt: skip


# ---- torch.ops integration ------------------------------------------------------------------------


def test_opcheck_paged_ops():
    batch, num_scored = bad_input_batch()
    scoring = (batch.q, batch.q_offsets, batch.k, batch.block_table, batch.seq_lens, num_scored, 0.25, "mean", 3, "avg")
    torch.library.opcheck(torch.ops.lookaheadkv.paged_attention_scores.default, scoring)
    torch.library.opcheck(
        torch.ops.lookaheadkv.paged_lookahead_attention.default,
        (batch.q, batch.q_offsets, batch.k, batch.v, *scoring[3:], "max", "NHD"),
    )
    scores = torch.rand(2, 2, batch.block_table.shape[1] * 16)
    budgets = torch.tensor([10, 4], dtype=torch.int32)
    torch.library.opcheck(
        torch.ops.lookaheadkv.paged_select_compact.default,
        (scores, batch.k.clone(), batch.v.clone(), batch.block_table, batch.seq_lens, num_scored, budgets, 1),
    )


def test_torch_compile_fullgraph_paged_eviction():
    def evict(q, q_offsets, k, v, block_table, seq_lens, num_scored, budgets):
        _, scores = lk.paged_lookahead_attention(
            q, q_offsets, k, v, block_table, seq_lens, num_scored=num_scored, pool_kernel=5
        )
        return lk.paged_select_compact(scores, k, v, block_table, seq_lens, budgets, num_scored=num_scored, num_sink=1)

    batch, num_scored = bad_input_batch()
    budgets = torch.tensor([10, 4], dtype=torch.int32)
    k, v = batch.k.clone(), batch.v.clone()
    want = evict(batch.q, batch.q_offsets, k, v, batch.block_table, batch.seq_lens, num_scored, budgets)
    compiled = torch.compile(evict, fullgraph=True, backend="aot_eager")
    got = compiled(batch.q, batch.q_offsets, batch.k, batch.v, batch.block_table, batch.seq_lens, num_scored, budgets)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert torch.equal(batch.k.view(torch.uint8), k.view(torch.uint8))


def test_negative_bit_views():
    """A negative-bit view of the scores is read as its values; a negative-bit cache is refused."""
    batch, num_scored = bad_input_batch()
    scores = torch.rand(2, 2, batch.block_table.shape[1] * 16)
    budgets = torch.tensor([10, 4], dtype=torch.int32)
    negated = (-scores).to(torch.complex64).conj().imag  # values 0, a negative-bit view
    args = (batch.block_table, batch.seq_lens, budgets)
    k, v = batch.k.clone(), batch.v.clone()
    want = lk.paged_select_compact(torch.zeros_like(scores), k, v, *args, num_scored=num_scored)
    got = lk.paged_select_compact(negated, batch.k, batch.v, *args, num_scored=num_scored)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    negative_cache = torch.zeros(*batch.k.shape, dtype=torch.complex64).conj().imag
    with pytest.raises(ValueError, match="negative-bit"):
        lk.paged_select_compact(scores, negative_cache, negative_cache, *args, num_scored=num_scored, backend="cpu")
    with pytest.raises(RuntimeError, match="negation"):  # torch.ops refuses mutating such views itself
        lk.paged_select_compact(scores, negative_cache, negative_cache, *args, num_scored=num_scored)
