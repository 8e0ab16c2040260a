"""Op benchmark: every backend of each op against the eager PyTorch composite a user would write
without this package, at the SmolLM2 and Llama-3.1-8B shapes, in one run.

    lookaheadkv bench [--device cpu|cuda] [--ops ...] [--lengths 4096,16384,32768] [--quick]
    python -m lookaheadkv_kernels.bench ...

Reports median times, the speed-up over the composite (ratio), peak extra memory, and the physical
floor: max(bytes that must move / measured copy bandwidth, FLOPs / measured matmul rate), with the
fraction of it each implementation reaches. Writes a CSV under bench/results/ (or --csv).
"""

from __future__ import annotations

import csv
import datetime
import math
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import ops
from .argtypes import CommandParser, choice_list, int_list, positive_int
from .backends.reference import gather_sequence, scatter_sequence
from .ops import dispatch
from .provenance import provenance

SHAPES = {  # name: (Hq, Hkv, D, hidden)
    "smollm2": (9, 3, 64, 576),
    "llama8b": (32, 8, 128, 4096),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NUM_QUERIES = 32  # lookahead tokens
POOL_KERNEL = 7
PAGED_BLOCK_SIZE = 16
PAGED_LENGTHS = (1024, 32768)  # the paged cases' sequences: lengths drawn uniformly in this range


# ---- the eager composites (what a user writes without this package) ---------------------------


def composite_attention(q, k, v, num_scored, pool_kernel):
    """kvpress/SnapKV-style eager scoring: grouped matmul, causal mask, fp32 softmax, mean, pool."""
    B, Hq, Tq, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    qg = q.view(B, Hkv, Hq // Hkv, Tq, D)
    logits = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)) / math.sqrt(D)
    mask = torch.ones(Tq, N, dtype=torch.bool, device=q.device).triu(N - Tq + 1)
    probs = logits.masked_fill(mask, float("-inf")).softmax(dim=-1, dtype=torch.float32)
    raw = probs[..., :num_scored].mean(dim=3).mean(dim=2)
    scores = F.max_pool1d(raw, pool_kernel, stride=1, padding=pool_kernel // 2)
    out = None if v is None else torch.matmul(probs.to(v.dtype), v.unsqueeze(2)).view(B, Hq, Tq, D)
    return scores, out


def composite_select(scores, k, v, budget, num_sink):
    """topk + sort + gather, protecting the sinks and the unscored tail."""
    B, H, S = scores.shape
    N = k.shape[2]
    top = scores[..., num_sink:].topk(budget - num_sink - (N - S), dim=-1).indices + num_sink
    keep = torch.cat(
        (
            torch.arange(num_sink, device=k.device).expand(B, H, -1),
            top,
            torch.arange(S, N, device=k.device).expand(B, H, -1),
        ),
        dim=-1,
    )
    keep = keep.sort(dim=-1).values
    index = keep[..., None].expand(-1, -1, -1, k.shape[-1])
    return k.gather(2, index), v.gather(2, index), keep


def composite_paged_attention(q, q_offsets, k_cache, v_cache, block_table, seq_lens, num_scored, pool_kernel):
    """What an engine runs without paged ops: each sequence gathered dense, then the dense op
    (lookahead_attention when v_cache is given, else attention_scores)."""
    results = []
    for b in range(block_table.shape[0]):
        n, s = int(seq_lens[b]), int(num_scored[b])
        k = gather_sequence(k_cache, block_table[b], n, "NHD").contiguous()[None]
        qb = q[int(q_offsets[b]) : int(q_offsets[b + 1])].transpose(0, 1)[None]
        if v_cache is None:
            results.append(ops.attention_scores(qb, k, num_scored=s, pool_kernel=pool_kernel))
        else:
            v = gather_sequence(v_cache, block_table[b], n, "NHD").contiguous()[None]
            results.append(ops.lookahead_attention(qb, k, v, num_scored=s, pool_kernel=pool_kernel))
    return results


def composite_paged_select(scores, k_cache, v_cache, block_table, seq_lens, num_scored, budgets, num_sink):
    """Each sequence gathered dense, select_compact, and the kept rows scattered back into its blocks."""
    for b in range(block_table.shape[0]):
        n, s, budget = int(seq_lens[b]), int(num_scored[b]), int(budgets[b])
        if budget >= n:
            continue
        k = gather_sequence(k_cache, block_table[b], n, "NHD")[None]
        v = gather_sequence(v_cache, block_table[b], n, "NHD")[None]
        k_out, v_out, _ = ops.select_compact(scores[b : b + 1, :, :s], k, v, budget, num_sink=num_sink)
        scatter_sequence(k_cache, block_table[b], k_out[0], "NHD")
        scatter_sequence(v_cache, block_table[b], v_out[0], "NHD")


def composite_qproj(x, weight, lora_a, lora_b, lora_scale, cos, sin, num_heads):
    q = F.linear(x, weight) + lora_scale * F.linear(F.linear(x, lora_a.to(x.dtype)), lora_b.to(x.dtype))
    q = q.view(x.shape[0], num_heads, -1)
    half = q.shape[-1] // 2
    rotated = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
    return q * cos[:, None].to(x.dtype) + rotated * sin[:, None].to(x.dtype)


# ---- measurement -------------------------------------------------------------------------------


def _set_malloc_mode(measuring_memory):
    """glibc serves allocations below its mmap threshold from a heap it keeps after frees, which
    hides a call's temporaries from the resident set. While measuring memory the threshold is
    64 KiB and the heap is trimmed first (every large temporary is mapped and unmapped, so it shows
    in the RSS peak; before the trim, free heap left by the timing runs served native kernels'
    buffers without a trace); while
    timing, the thresholds are glibc's own upper bounds (mmap 32 MiB, trim 64 MiB), close to
    what its dynamic tuning settles on in a long-running process."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, (64 << 10) if measuring_memory else (32 << 20))  # M_MMAP_THRESHOLD
        libc.mallopt(-1, (128 << 10) if measuring_memory else (64 << 20))  # M_TRIM_THRESHOLD
        if measuring_memory:
            libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_memory(fn, device):
    """Peak memory above the starting level during one call: the CUDA allocator's peak on GPUs;
    on CPUs the resident set sampled every 0.2 ms by a thread (native scratch included)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    _set_malloc_mode(measuring_memory=True)
    start, peak, done = _rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
        _set_malloc_mode(measuring_memory=False)
    return max(0, max(peak[0], _rss_bytes()) - start)


def _elapsed(fn, device):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_time(fn, device, repeats, warmup=2):
    return median_times({"fn": fn}, device, repeats, warmup)["fn"]


def median_times(runners, device, repeats, warmup=2):
    """Median time of each runner, the runners taking turns within every repeat, so that a change
    in the machine's load moves them all alike and their ratios stay meaningful."""
    for _ in range(warmup):
        for fn in runners.values():
            fn()
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            times[name].append(_elapsed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


@dataclass
class Ceilings:
    """Measured copy bandwidth (bytes/s, read+write) and matmul rate (FLOP/s) per dtype."""

    bandwidth: float
    matmul: dict = field(default_factory=dict)

    @classmethod
    def measure(cls, device, dtypes):
        n = (256 << 20) if device.type == "cuda" else (64 << 20)
        src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
        dst = torch.empty_like(src)
        copy_time = median_time(lambda: dst.copy_(src), device, repeats=10)
        ceilings = cls(bandwidth=2 * n / copy_time)
        size = 8192 if device.type == "cuda" else 1024
        for dtype in dtypes:
            a = torch.randn(size, size, device=device).to(dtype)
            t = median_time(lambda: a @ a, device, repeats=5)
            ceilings.matmul[dtype] = 2 * size**3 / t
        return ceilings

    def floor(self, bytes_moved, flops, dtype):
        return max(bytes_moved / self.bandwidth, flops / self.matmul[dtype])


# ---- cases -------------------------------------------------------------------------------------


@dataclass
class Case:
    op: str
    shape: str
    dtype: str
    N: int
    budget: int | None
    bytes_moved: float
    flops: float
    runners: dict  # name -> zero-arg callable
    cleanup: object = None  # called once the case is measured (frees its inputs)
    compacted_bytes: float = 0.0  # KV bytes of the sequences an in-place op compacts


def _backends_for(device, requested):
    names = [b for b in requested if dispatch.unavailable_reason(b, device) is None]
    return names


def paged_batch(Hq, Hkv, D, dtype, device, num_sequences, gen):
    """A ragged batch in a paged NHD cache with shuffled blocks: (q, q_offsets, k_cache, v_cache,
    block_table, seq_lens, num_scored), NUM_QUERIES queries per sequence."""
    lens = torch.randint(PAGED_LENGTHS[0], PAGED_LENGTHS[1] + 1, (num_sequences,), generator=gen)
    blocks = (lens + PAGED_BLOCK_SIZE - 1) // PAGED_BLOCK_SIZE
    max_blocks, num_blocks = int(blocks.max()), int(blocks.sum())
    order = torch.randperm(num_blocks, generator=gen).int()
    table = torch.zeros(num_sequences, max_blocks, dtype=torch.int32)
    starts = torch.cat((torch.zeros(1, dtype=torch.long), blocks.cumsum(0)[:-1]))
    for b in range(num_sequences):
        table[b, : blocks[b]] = order[starts[b] : starts[b] + blocks[b]]
    cache_shape = (num_blocks, PAGED_BLOCK_SIZE, Hkv, D)
    k_cache = torch.randn(cache_shape, generator=gen).to(device, dtype)
    v_cache = torch.randn(cache_shape, generator=gen).to(device, dtype)
    q = torch.randn(num_sequences * NUM_QUERIES, Hq, D, generator=gen).to(device, dtype)
    q_offsets = torch.arange(0, (num_sequences + 1) * NUM_QUERIES, NUM_QUERIES, dtype=torch.int32)
    seq_lens = lens.int()
    to = lambda t: t.to(device)  # noqa: E731
    return q, to(q_offsets), k_cache, v_cache, to(table), to(seq_lens), to(seq_lens - NUM_QUERIES)


def build_paged_cases(args, device, backends, shape_name, dtype_name, gen):
    """Scoring and compaction of a ragged batch in a paged cache, against the dense op on the same
    sequences pre-gathered ("<backend>-dense") and the gather composite an engine would run without
    paged ops."""
    Hq, Hkv, D, _ = SHAPES[shape_name]
    dtype = DTYPES[dtype_name]
    esize = torch.empty((), dtype=dtype).element_size()
    q, q_offsets, k_cache, v_cache, table, seq_lens, num_scored = paged_batch(
        Hq, Hkv, D, dtype, device, args.paged_sequences, gen
    )
    total = int(seq_lens.sum())
    lens_label = f"{args.paged_sequences}x{PAGED_LENGTHS[0]}-{PAGED_LENGTHS[1]}"
    for op in ("paged_attention_scores", "paged_lookahead_attention"):
        if op not in args.ops:
            continue
        values = v_cache if op == "paged_lookahead_attention" else None
        paged_op, dense_op = getattr(ops, op), getattr(ops, op.removeprefix("paged_"))
        cache_args = (k_cache,) if values is None else (k_cache, values)
        runners = {
            b: (
                lambda b=b: paged_op(
                    q,
                    q_offsets,
                    *cache_args,
                    table,
                    seq_lens,
                    num_scored=num_scored,
                    pool_kernel=POOL_KERNEL,
                    backend=b,
                )
            )
            for b in backends
        }
        dense = [
            (
                q[int(q_offsets[b]) : int(q_offsets[b + 1])].transpose(0, 1)[None],
                *(gather_sequence(c, table[b], int(seq_lens[b]), "NHD").contiguous()[None] for c in cache_args),
            )
            for b in range(table.shape[0])
        ]
        for b in backends:
            runners[f"{b}-dense"] = lambda b=b: [
                dense_op(*tensors, num_scored=int(num_scored[i]), pool_kernel=POOL_KERNEL, backend=b)
                for i, tensors in enumerate(dense)
            ]
        runners["composite"] = lambda values=values: composite_paged_attention(
            q, q_offsets, k_cache, values, table, seq_lens, num_scored, POOL_KERNEL
        )
        reads = len(cache_args)
        yield Case(op, shape_name, dtype_name, lens_label, None, reads * total * Hkv * D * esize,
                   reads * 2 * Hq * NUM_QUERIES * total * D, runners, cleanup=dense.clear)  # fmt: skip
    if "paged_select_compact" in args.ops:
        budget = args.budgets[0]
        scores = torch.randn(table.shape[0], Hkv, table.shape[1] * PAGED_BLOCK_SIZE, generator=gen).to(device)
        budgets = torch.full_like(seq_lens, budget)
        # Compaction rewrites the caches in place: each run compacts what the last one left, the
        # same work (the same budgets over the same lengths).
        runners = {
            b: (
                lambda b=b: ops.paged_select_compact(
                    scores, k_cache, v_cache, table, seq_lens, budgets, num_scored=num_scored, num_sink=4, backend=b
                )
            )
            for b in backends
        }
        runners["composite"] = lambda: composite_paged_select(
            scores, k_cache, v_cache, table, seq_lens, num_scored, budgets, 4
        )
        kept = table.shape[0] * min(budget, PAGED_LENGTHS[0])
        moved = table.shape[0] * Hkv * int(num_scored.max()) * 4 + 2 * 2 * Hkv * kept * D * esize
        yield Case("paged_select_compact", shape_name, dtype_name, lens_label, budget, moved, 0.0, runners,
                   compacted_bytes=2 * Hkv * total * D * esize)  # fmt: skip


def build_cases(args, device, backends):
    gen = torch.Generator(device="cpu").manual_seed(0)
    for shape_name in args.shapes:
        Hq, Hkv, D, hidden = SHAPES[shape_name]
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            esize = torch.empty((), dtype=dtype).element_size()
            if "lookahead_qproj" in args.ops:
                x = torch.randn(NUM_QUERIES, hidden, generator=gen).to(device, dtype)
                w = (torch.randn(Hq * D, hidden, generator=gen) * hidden**-0.5).to(device, dtype)
                la = (torch.randn(8, hidden, generator=gen) * hidden**-0.5).to(device)
                lb = (torch.randn(Hq * D, 8, generator=gen) * 0.1).to(device)
                cos, sin = torch.randn(NUM_QUERIES, D).to(device), torch.randn(NUM_QUERIES, D).to(device)
                runners = {
                    b: (
                        lambda b=b: ops.lookahead_qproj(
                            x, w, cos, sin, Hq, lora_a=la, lora_b=lb, lora_scale=4.0, backend=b
                        )
                    )
                    for b in backends
                }
                runners["composite"] = lambda: composite_qproj(x, w, la, lb, 4.0, cos, sin, Hq)
                yield Case(
                    "lookahead_qproj",
                    shape_name,
                    dtype_name,
                    NUM_QUERIES,
                    None,
                    bytes_moved=w.numel() * esize,
                    flops=2 * NUM_QUERIES * w.numel(),
                    runners=runners,
                )
            for N in args.lengths:
                q = torch.randn(1, Hq, NUM_QUERIES, D, generator=gen).to(device, dtype)
                k = torch.randn(1, Hkv, N, D, generator=gen).to(device, dtype)
                v = torch.randn(1, Hkv, N, D, generator=gen).to(device, dtype)
                kv_bytes = k.numel() * esize
                qk_flops = 2 * Hq * NUM_QUERIES * N * D
                S = N - NUM_QUERIES  # the lookahead keys themselves are not scored
                for op in ("attention_scores", "lookahead_attention"):
                    if op not in args.ops:
                        continue
                    with_v = op == "lookahead_attention"
                    runners = {}
                    for b in backends:
                        if with_v:
                            runners[b] = lambda b=b: ops.lookahead_attention(
                                q, k, v, num_scored=S, pool_kernel=POOL_KERNEL, backend=b
                            )
                        else:
                            runners[b] = lambda b=b: ops.attention_scores(
                                q, k, num_scored=S, pool_kernel=POOL_KERNEL, backend=b
                            )
                    runners["composite"] = lambda with_v=with_v: composite_attention(
                        q, k, v if with_v else None, S, POOL_KERNEL
                    )
                    yield Case(
                        op,
                        shape_name,
                        dtype_name,
                        N,
                        None,
                        bytes_moved=kv_bytes * (2 if with_v else 1),
                        flops=qk_flops * (2 if with_v else 1),
                        runners=runners,
                    )
                if "select_compact" in args.ops:
                    scores = torch.randn(1, Hkv, S, generator=gen).to(device)
                    for budget in args.budgets:
                        if budget >= N:
                            continue
                        runners = {
                            b: (
                                lambda b=b, budget=budget: ops.select_compact(
                                    scores, k, v, budget, num_sink=4, backend=b
                                )
                            )
                            for b in backends
                        }
                        runners["composite"] = lambda budget=budget: composite_select(scores, k, v, budget, 4)
                        # Read the scores once, read and write the kept K and V rows.
                        moved = scores.numel() * 4 + 2 * 2 * Hkv * budget * D * esize
                        yield Case("select_compact", shape_name, dtype_name, N, budget, moved, 0.0, runners)
            if any(op.startswith("paged_") for op in args.ops):
                yield from build_paged_cases(args, device, backends, shape_name, dtype_name, gen)


def run(args):
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    backends = _backends_for(device, args.backends)
    dtypes = [DTYPES[d] for d in args.dtypes]
    if device.type == "cpu":
        _set_malloc_mode(measuring_memory=False)
    ceilings = Ceilings.measure(device, dtypes)
    print(
        f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
        f"copy {ceilings.bandwidth / 1e9:.1f} GB/s, matmul "
        + ", ".join(f"{str(d).replace('torch.', '')} {r / 1e12:.2f} TFLOP/s" for d, r in ceilings.matmul.items())
    )
    print(f"backends: {', '.join(backends)} vs the eager composite")
    header = [
        "op",
        "shape",
        "dtype",
        "N",
        "budget",
        "impl",
        "median_ms",
        "speedup_vs_composite",
        "peak_extra_MiB",
        "floor_ms",
        "fraction_of_floor",
        "peak_extra_pct_of_kv",
    ]
    rows = []
    print(" | ".join(header))
    for case in build_cases(args, device, backends):
        floor = ceilings.floor(case.bytes_moved, case.flops, DTYPES[case.dtype])
        timings = median_times(case.runners, device, args.repeats)
        for name, fn in case.runners.items():
            peak = peak_extra_memory(fn, device)
            row = [
                case.op,
                case.shape,
                case.dtype,
                case.N,
                case.budget or "",
                name,
                f"{timings[name] * 1e3:.3f}",
                f"{timings['composite'] / timings[name]:.2f}",
                f"{peak / 2**20:.1f}",
                f"{floor * 1e3:.3f}",
                f"{floor / timings[name]:.3f}",
                f"{100 * peak / case.compacted_bytes:.2f}" if case.compacted_bytes else "",
            ]
            rows.append(row)
            print(" | ".join(map(str, row)), flush=True)
        if case.cleanup:
            case.cleanup()
    out = (
        Path(args.csv)
        if args.csv
        else Path("bench/results") / (f"ops_{device.type}_{datetime.date.today().isoformat()}.csv")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        command = "lookaheadkv bench " + " ".join(args.argv)
        f.writelines(f"# {line}\n" for line in provenance(str(out), command).splitlines())
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    print(f"wrote {out}")
    return rows


def parse_args(argv=None):
    p = CommandParser(prog="lookaheadkv bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="device of the inputs (default: %(default)s)"
    )
    p.add_argument(
        "--ops",
        default=",".join(dispatch.OPS),
        type=choice_list(dispatch.OPS, "ops"),
        help="comma-separated ops to time (default: %(default)s)",
    )
    p.add_argument(
        "--shapes",
        default="smollm2,llama8b",
        type=choice_list(SHAPES, "shapes"),
        help=f"model shapes (heads, KV heads, head dim, hidden), from {', '.join(SHAPES)} (default: %(default)s)",
    )
    p.add_argument(
        "--dtypes",
        default="float32,bfloat16",
        type=choice_list(DTYPES, "dtypes"),
        help=f"input dtypes, from {', '.join(DTYPES)} (default: %(default)s)",
    )
    p.add_argument(
        "--lengths", default="4096,16384,32768", type=int_list(1), help="KV lengths N in tokens (default: %(default)s)"
    )
    p.add_argument(
        "--budgets", default="128,512,2048", type=int_list(1), help="select_compact budgets (default: %(default)s)"
    )
    p.add_argument(
        "--backends",
        default="cpu,cuda,triton",
        type=choice_list(dispatch.BACKENDS, "backends"),
        help=f"backends timed against the eager composite, from {', '.join(dispatch.BACKENDS)}; those the device "
        "lacks are skipped (default: %(default)s)",
    )
    p.add_argument(
        "--repeats", default=5, type=positive_int, help="timed runs per case, median reported (default: %(default)s)"
    )
    p.add_argument(
        "--paged-sequences",
        default=64,
        type=positive_int,
        help=f"sequences of the paged cases, lengths drawn in {PAGED_LENGTHS} (default: %(default)s)",
    )
    p.add_argument("--csv", default=None, help="CSV path (default bench/results/ops_<device>_<date>.csv)")
    p.add_argument("--quick", action="store_true", help="one small length and budget, for a smoke run")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.lengths, args.budgets, args.repeats = [2048], [128], 3
    return args


def main(argv=None):
    run(parse_args(argv))


if __name__ == "__main__":
    main()
