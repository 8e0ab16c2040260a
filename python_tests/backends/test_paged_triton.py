"""Triton-specific checks of the paged ops (docs/ops.md §5-6), beside the shared cases of
test_paged_ops.py: the kernels' paged paths (sequences with more queries than a row block, GQA groups
spanning several head blocks, in-place moves across many chunks and head-dim slices), table entries
past a sequence's blocks that are not block ids, and the device-side guards of the index data (as on
CUDA, where it is not checked on the host). The helpers take a backend name."""

import importlib.util
import sys

import pytest
import torch
from op_testing import HAS_CUDA
from paged_testing import PagedBatch, output_tolerance, score_tolerance, seed_of

import lookaheadkv_kernels as lk
from lookaheadkv_kernels.backends import reference
from lookaheadkv_kernels.ops import dispatch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
DEVICE = "cuda" if HAS_CUDA else "cpu"
LAYOUTS = ("NHD", "HND")


def unused_entries_invalid(batch):
    """Table entries past each sequence's blocks set to -1: kernels must never read them."""
    for b, n in enumerate(batch.lens):
        batch.block_table[b, -(-n // batch.block_size) :] = -1
    return batch


def bits(t):
    return t.view(torch.uint8)


def check_paged_attention(backend, device, batch, num_scored, options):
    """Both paged scoring ops against the reference, per sequence; the scores of the two ops are
    bit-identical and -inf past num_scored."""
    layout, D = batch.layout, batch.q.shape[-1]
    kwargs = dict(num_scored=num_scored, layout=layout, backend=backend, **options)
    out, scores = lk.paged_lookahead_attention(
        batch.q, batch.q_offsets, batch.k, batch.v, batch.block_table, batch.seq_lens, **kwargs
    )
    alone = lk.paged_attention_scores(batch.q, batch.q_offsets, batch.k, batch.block_table, batch.seq_lens, **kwargs)
    assert torch.equal(alone, scores), "paged_attention_scores differs from paged_lookahead_attention's scores"
    want_out, want = reference.paged_lookahead_attention(
        batch.q.double().cpu(), batch.q_offsets.cpu(), batch.k.double().cpu(), batch.v.double().cpu(),
        batch.block_table.cpu(), batch.seq_lens.cpu(), num_scored.cpu(), D**-0.5, options["gqa_reduce"],
        options["pool_kernel"], options["pool_type"], options["query_reduce"], layout,
    )  # fmt: skip
    dtype = batch.q.dtype
    for b, S in enumerate(num_scored.tolist()):
        torch.testing.assert_close(
            scores[b, :, :S].cpu().double(), want[b, :, :S], **score_tolerance(backend, device, dtype)
        )
        assert torch.isneginf(scores[b, :, S:]).all(), "scores past num_scored must be -inf"
    torch.testing.assert_close(out.cpu().double(), want_out, **output_tolerance(dtype))


def check_paged_compaction(backend, batch, scores, num_scored, budgets, num_sink):
    """paged_select_compact bit for bit like the reference, in place (NaN-poisoned spare entries and
    every entry outside the compacted slots included)."""
    want_k, want_v = batch.k.cpu().clone(), batch.v.cpu().clone()
    want_lens, want_kept = reference.paged_select_compact(
        scores.cpu(), want_k, want_v, batch.block_table.cpu(), batch.seq_lens.cpu(), num_scored.cpu(),
        budgets.cpu(), num_sink, batch.layout,
    )  # fmt: skip
    new_lens, kept = lk.paged_select_compact(
        scores, batch.k, batch.v, batch.block_table, batch.seq_lens, budgets,
        num_scored=num_scored, num_sink=num_sink, layout=batch.layout, backend=backend,
    )  # fmt: skip
    assert torch.equal(new_lens.cpu(), want_lens) and torch.equal(kept.cpu(), want_kept)
    assert torch.equal(bits(batch.k.cpu()), bits(want_k)) and torch.equal(bits(batch.v.cpu()), bits(want_v))


def attention_module():
    import lookaheadkv_kernels.backends.triton  # noqa: F401  (registers the submodule)

    return sys.modules["lookaheadkv_kernels.backends.triton.attention_scores"]


MEAN = dict(gqa_reduce="mean", pool_kernel=1, pool_type="max", query_reduce="mean")
# (lens, tq, Hq, Hkv, D, block_size, unscored window, options, dtype)
ATTENTION_PATHS = [
    # the row blocks are sized by the mean query count (14): the 40-query sequence has 3 chunks and
    # runs in the MULTI_CHUNK launch; LookaheadKV's scoring (query max, GQA mean)
    ((16, 50, 9), (1, 40, 2), 8, 2, 64, 16, 2, dict(MEAN, pool_kernel=3, query_reduce="max"), torch.bfloat16),
    # G·Tq = 8·32 rows exceed a row block: head blocks write per-head partials
    (
        (40, 33),
        (32, 32),
        8,
        1,
        64,
        16,
        3,
        dict(MEAN, gqa_reduce="max", query_reduce="max", pool_kernel=5),
        torch.float16,
    ),
    # GQA 1, block 32, length 1, Tq = N, no pooling: the scores are written in place by the fill
    ((64, 1, 33), (8, 1, 33), 2, 2, 64, 32, 0, MEAN, torch.float32),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", range(len(ATTENTION_PATHS)))
def test_paged_attention_paths_against_reference(case, layout):
    lens, tq, Hq, Hkv, D, block_size, window, options, dtype = ATTENTION_PATHS[case]
    batch = PagedBatch(lens, tq, Hq, Hkv, D, block_size, layout, dtype, seed_of(case, layout), device=DEVICE)
    num_scored = torch.tensor([max(1, n - window) for n in lens], dtype=torch.int32, device=DEVICE)
    check_paged_attention("triton", DEVICE, unused_entries_invalid(batch), num_scored, options)


def test_paged_attention_cases_reach_every_path():
    module = attention_module()
    plans = []
    for _, tq, Hq, Hkv, *_ in ATTENTION_PATHS:
        block_h, block_tq = module._row_blocking(Hq // Hkv, -(-sum(tq) // len(tq)))
        plans.append((max(tq) > block_tq, Hq // Hkv > block_h))
    assert any(multi_chunk for multi_chunk, _ in plans)
    assert any(head_blocks for _, head_blocks in plans)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_in_place_moves_across_many_chunks(layout, dtype):
    """Long sequences in shuffled blocks whose even positions score best: kept[m] ≈ 2m, so every
    chunk's rows land on slots an earlier chunk reads from (moves out of order would corrupt them)."""
    lens = (300, 45, 129)
    batch = unused_entries_invalid(PagedBatch(lens, (1, 1, 1), 2, 2, 64, 16, layout, dtype, 21, device=DEVICE))
    num_scored = torch.tensor([290, 45, 120], dtype=torch.int32, device=DEVICE)
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(len(lens), 2, batch.block_table.shape[1] * 16, generator=g)
    scores[..., ::2] += 1
    budgets = torch.tensor([150, 45, 70], dtype=torch.int32, device=DEVICE)  # 45: keeps all
    check_paged_compaction("triton", batch, scores.to(DEVICE), num_scored, budgets, num_sink=4)


def test_bad_index_data_is_guarded_on_the_device():
    """Index data the host checks would reject, given straight to the backend: each bad sequence
    gets NaN scores and output rows, new length -1 and kept -1, and its blocks are neither read nor
    written; the good sequence is scored as usual."""
    backend = dispatch.backend_module("triton")
    lens, tq = (20, 30, 17, 25, 9), (3, 2, 4, 1, 10)  # sequence 4: more queries than keys
    batch = PagedBatch(lens, tq, 4, 2, 64, 16, "NHD", torch.float32, 3, device=DEVICE)
    table, seq_lens = batch.block_table, batch.seq_lens
    table[1, 1] = batch.k.shape[0]  # an out-of-range block id
    table[2, 0] = -2  # a negative one
    seq_lens[3] = table.shape[1] * 16 + 1  # longer than the table holds
    num_scored = seq_lens.clone()
    args = (seq_lens, num_scored, 0.125, "mean", 3, "max", "mean", "NHD")
    scores = backend.paged_attention_scores(batch.q, batch.q_offsets, batch.k, table, *args)
    out, fused = backend.paged_lookahead_attention(batch.q, batch.q_offsets, batch.k, batch.v, table, *args)
    assert torch.isnan(scores[1:]).all() and torch.isnan(fused[1:]).all() and torch.isnan(out[3:]).all()
    assert torch.isneginf(scores[0, :, 20:]).all()
    want_out, want = reference.paged_lookahead_attention(
        batch.q[:3].double().cpu(), batch.q_offsets[:2].cpu(), batch.k.double().cpu(), batch.v.double().cpu(),
        table[:1].cpu(), seq_lens[:1].cpu(), num_scored[:1].cpu(), 0.125, "mean", 3, "max", "mean", "NHD",
    )  # fmt: skip
    torch.testing.assert_close(scores[0, :, :20].cpu().double(), want[0, :, :20], rtol=2e-4, atol=1e-7)
    torch.testing.assert_close(out[:3].cpu().double(), want_out, rtol=1e-4, atol=1e-5)

    k_before, v_before = batch.k.clone(), batch.v.clone()
    budgets = torch.tensor([2, 8, 8, 8, 9], dtype=torch.int32, device=DEVICE)  # sequence 4 keeps all
    num_scored[0] = 10  # sequence 0's budget is below its 10 unscored positions
    new_lens, kept = backend.paged_select_compact(
        torch.zeros(5, 2, 64, device=DEVICE), batch.k, batch.v, table, seq_lens, num_scored, budgets, 4, "NHD"
    )
    assert new_lens.tolist() == [-1, -1, -1, -1, 9]
    assert (kept[:4] == -1).all() and torch.equal(kept[4, :, :9].cpu(), torch.arange(9).expand(2, 9).int())
    assert torch.equal(bits(batch.k), bits(k_before)) and torch.equal(bits(batch.v), bits(v_before))
