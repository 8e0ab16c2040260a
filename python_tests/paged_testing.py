"""Shared by the paged-op tests: a ragged batch in a paged cache with shuffled blocks and
NaN-poisoned spare entries, tolerances, and the compaction case."""

import math

import torch
from op_testing import tf32_like


def seed_of(*parts):
    """A seed fixed by the case's parameters (stable across processes, unlike hash())."""
    return sum((i + 1) * ord(c) for i, c in enumerate(repr(parts))) % (2**31)


class PagedBatch:
    """Sequences of the given lengths in a paged cache with shuffled blocks and NaN-poisoned spare
    entries; queries are the last Tq_b positions of each sequence."""

    def __init__(self, lens, tq, Hq, Hkv, D, block_size, layout, dtype, seed, spare_blocks=3, device="cpu"):
        g = torch.Generator().manual_seed(seed)
        self.layout, self.block_size, self.lens = layout, block_size, list(lens)
        blocks_per_seq = [math.ceil(n / block_size) for n in lens]
        max_blocks = max(blocks_per_seq) + 1  # a spare column: the table is wider than any sequence
        num_blocks = sum(blocks_per_seq) + spare_blocks
        shape = (num_blocks, block_size, Hkv, D) if layout == "NHD" else (num_blocks, Hkv, block_size, D)
        self.k = torch.full(shape, float("nan"), dtype=dtype)
        self.v = torch.full(shape, float("nan"), dtype=dtype)
        order = torch.randperm(num_blocks, generator=g)
        table = torch.full((len(lens), max_blocks), num_blocks - 1, dtype=torch.int32)  # unused entries
        self.dense_k, self.dense_v = [], []
        used = 0
        for b, n in enumerate(lens):
            ids = order[used : used + blocks_per_seq[b]]
            used += blocks_per_seq[b]
            table[b, : len(ids)] = ids.int()
            k = torch.randn(Hkv, n, D, generator=g).to(dtype)
            v = torch.randn(Hkv, n, D, generator=g).to(dtype)
            self._write(ids, k, self.k)
            self._write(ids, v, self.v)
            self.dense_k.append(k)
            self.dense_v.append(v)
        self.spare = order[used:]
        self.block_table = table
        self.seq_lens = torch.tensor(lens, dtype=torch.int32)
        self.q_offsets = torch.tensor([0, *torch.tensor(tq).cumsum(0).tolist()], dtype=torch.int32)
        self.q = torch.randn(sum(tq), Hq, D, generator=g).to(dtype)
        self.k, self.v, self.block_table = self.k.to(device), self.v.to(device), self.block_table.to(device)
        self.seq_lens, self.q_offsets, self.q = self.seq_lens.to(device), self.q_offsets.to(device), self.q.to(device)

    def _write(self, ids, rows, cache):
        for j in range(rows.shape[1]):
            block, slot = int(ids[j // self.block_size]), j % self.block_size
            if self.layout == "NHD":
                cache[block, slot] = rows[:, j]
            else:
                cache[block, :, slot] = rows[:, j]

    def queries(self, b):
        return self.q[self.q_offsets[b] : self.q_offsets[b + 1]].transpose(0, 1)[None].cpu()


def score_tolerance(backend, device, dtype):
    if tf32_like(backend, device, dtype):
        return dict(rtol=1e-2, atol=1e-5)
    return dict(rtol=1e-3 if dtype != torch.float32 else 2e-4, atol=1e-7)


def output_tolerance(dtype):
    return {
        torch.bfloat16: dict(rtol=2e-2, atol=1e-2),
        torch.float16: dict(rtol=4e-3, atol=2e-3),
        torch.float32: dict(rtol=1e-4, atol=1e-5),
    }[dtype]


def compaction_case(backend, device, layout, dtype, num_sink, seed, lens=(1, 40, 97, 16, 130), block_size=16):
    Hkv, D = 3, 64
    batch = PagedBatch(lens, [1] * len(lens), Hkv, Hkv, D, block_size, layout, dtype, seed, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    window = 8
    num_scored = torch.tensor([max(1, n - window) for n in lens], dtype=torch.int32)
    scores = torch.randn(len(lens), Hkv, batch.block_table.shape[1] * block_size, generator=g)
    scores[torch.rand(scores.shape, generator=g) < 0.1] = float("nan")
    scores[:, :, ::7] = 0.5  # ties
    protected = [min(num_sink, int(s)) + n - int(s) for n, s in zip(lens, num_scored)]
    # budget >= N (untouched), budget == protected count, an ordinary budget, budget == N
    choices = [lens[0] + 3, protected[1], max(protected[2], 20), lens[3], max(protected[4], 64)]
    budgets = torch.tensor(choices, dtype=torch.int32)
    return batch, scores.to(device), num_scored.to(device), budgets.to(device)
