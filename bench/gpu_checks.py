"""Checks of the CUDA backend that need a GPU; bench/device_check.sh runs each mode.

    python bench/gpu_checks.py graph      CUDA-graph capture + replay of a whole eviction
                                          (lookahead_qproj -> lookahead_attention -> select_compact)
                                          equals eager execution bit for bit
    python bench/gpu_checks.py timing     median times of each CUDA kernel path and of the whole
                                          eviction (eager, graph replay) at Llama-3.1-8B shapes,
                                          against the floor max(bytes / copy bandwidth,
                                          FLOPs / bf16 matmul rate), both measured here
    python bench/gpu_checks.py sanitize   one small case of every kernel path, for compute-sanitizer

Inputs are random (never zeros) and every timed op rotates among input sets larger than L2.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from lookaheadkv_kernels.backends import cuda as kernels
from lookaheadkv_kernels.backends import reference

HQ, HKV, D, HIDDEN, T, RANK = 32, 8, 128, 4096, 32, 8  # Llama-3.1-8B, 32 lookahead rows, LoRA rank 8


def randn(*shape, dtype=torch.bfloat16, scale=1.0, gen=None):
    return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(dtype)


def qproj_inputs(dtype=torch.bfloat16, gen=None, N=4096):
    x, weight = randn(T, HIDDEN, dtype=dtype, gen=gen), randn(HQ * D, HIDDEN, dtype=dtype, scale=HIDDEN**-0.5, gen=gen)
    lora_a = randn(RANK, HIDDEN, dtype=torch.float32, scale=0.01, gen=gen)
    lora_b = randn(HQ * D, RANK, dtype=torch.float32, scale=0.1, gen=gen)
    angles = torch.arange(N, N + T, device="cuda").float()[:, None] / (
        10000 ** (torch.arange(D // 2, device="cuda") / (D // 2))
    )
    emb = torch.cat((angles, angles), dim=-1)
    return x, weight, None, lora_a, lora_b, 2.0, emb.cos(), emb.sin(), HQ, None, 1e-6


def eviction(qproj_args, k, v, budget, num_sink=4):
    q = kernels.lookahead_qproj(*qproj_args).transpose(0, 1).unsqueeze(0)  # [1, Hq, T, D]
    out, scores = kernels.lookahead_attention(
        q, k, v, k.shape[2] - T, D**-0.5, "mean", 17, "avg", "max"
    )  # LookaheadKV's scoring
    return (q, out, scores) + kernels.select_compact(scores, k, v, budget, num_sink)


def check_graph(N=32768, budget=2048):
    gen = torch.Generator(device="cuda").manual_seed(0)
    qproj_args = qproj_inputs(gen=gen, N=N)
    k, v = randn(1, HKV, N, D, gen=gen), randn(1, HKV, N, D, gen=gen)
    eager = eviction(qproj_args, k, v, budget)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eviction(qproj_args, k, v, budget)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = eviction(qproj_args, k, v, budget)
    ok = True
    for replay in range(3):
        graph.replay()
        torch.cuda.synchronize()
        for name, got, want in zip(("q", "out", "scores", "k_out", "v_out", "kept"), captured, eager):
            if not torch.equal(got, want):
                ok = False
                print(
                    f"graph replay {replay}: {name} differs from eager (max |diff| "
                    f"{(got.double() - want.double()).abs().max().item():.3e})"
                )
    # the replayed eviction also matches the float64 reference's kept positions on these scores
    want_kept = reference.kept_positions(captured[2], N, budget, 4)
    ok &= torch.equal(captured[5], want_kept)
    print(
        f"graph: capture + 3 replays of the eviction at N={N}, budget={budget}: {'bit-identical to eager' if ok else 'MISMATCH'}"
    )
    return ok


def median_ms(fn, inputs, reps=30):
    """Median of per-call times (CUDA events), rotating through `inputs` (each larger than L2 in
    total) after two warm-up passes."""
    for args in inputs * 2:
        fn(*args)
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        args = inputs[i % len(inputs)]
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def ceilings():
    n = 1 << 30
    src, dst = (
        torch.empty(n, dtype=torch.uint8, device="cuda").random_(),
        torch.empty(n, dtype=torch.uint8, device="cuda"),
    )
    copy_ms = median_ms(lambda: dst.copy_(src), [()], reps=10)
    a, b = randn(8192, 8192), randn(8192, 8192)
    mm_ms = median_ms(lambda: a @ b, [()], reps=10)
    return 2 * n / copy_ms / 1e9, 2 * 8192**3 / mm_ms / 1e9  # TB/s (read + write), TFLOP/s


def timing():
    bw, rate = ceilings()
    print(f"ceilings measured here: copy {bw:.2f} TB/s (read+write), bf16 matmul {rate:.0f} TFLOP/s")
    rows = []

    def report(name, ms, bytes_moved, flops):
        floor = max(bytes_moved / (bw * 1e12), flops / (rate * 1e12)) * 1e3
        rows.append((name, ms, floor))

    gen = torch.Generator(device="cuda").manual_seed(1)
    for dtype in (torch.bfloat16, torch.float32):
        sets = [qproj_inputs(dtype=dtype, gen=gen) for _ in range(4)]  # 4 x W: 128 MiB bf16 > L2
        ms = median_ms(kernels.lookahead_qproj, sets)
        es = sets[0][0].element_size()
        report(
            f"lookahead_qproj {str(dtype)[6:]} T=32 4096x4096 LoRA", ms, es * HQ * D * HIDDEN, 2 * T * HQ * D * HIDDEN
        )
    for dtype in (torch.bfloat16, torch.float32):
        for N in (8192, 32768):
            sets = [
                (
                    randn(1, HQ, T, D, dtype=dtype, gen=gen),
                    randn(1, HKV, N, D, dtype=dtype, gen=gen),
                    randn(1, HKV, N, D, dtype=dtype, gen=gen),
                )
                for _ in range(2)
            ]
            es = sets[0][1].element_size()
            qk_flops = 2 * HQ * T * N * D
            ms = median_ms(
                lambda q, k, v: kernels.attention_scores(q, k, N - T, D**-0.5, "mean", 7, "max", "mean"), sets
            )
            report(f"attention_scores {str(dtype)[6:]} N={N}", ms, es * HKV * N * D, qk_flops)
            ms = median_ms(
                lambda q, k, v: kernels.lookahead_attention(q, k, v, N - T, D**-0.5, "mean", 17, "avg", "max"), sets
            )
            report(f"lookahead_attention {str(dtype)[6:]} N={N}", ms, 2 * es * HKV * N * D, 2 * qk_flops)
    for N in (8192, 32768, 131072):
        for budget in (512, 2048):
            sets = [
                (
                    torch.randn(1, HKV, N - T, device="cuda", generator=gen),
                    randn(1, HKV, N, D, gen=gen),
                    randn(1, HKV, N, D, gen=gen),
                )
                for _ in range(2)
            ]
            ms = median_ms(lambda s, k, v: kernels.select_compact(s, k, v, budget, 4), sets)
            report(
                f"select_compact bf16 N={N} budget={budget}", ms, 4 * HKV * (N - T) + 2 * 2 * 2 * HKV * budget * D, 0
            )
    for N in (8192, 32768):
        qproj_args = qproj_inputs(gen=gen, N=N)
        k, v = randn(1, HKV, N, D, gen=gen), randn(1, HKV, N, D, gen=gen)
        ms = median_ms(lambda: eviction(qproj_args, k, v, 2048), [()])
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            eviction(qproj_args, k, v, 2048)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            eviction(qproj_args, k, v, 2048)
        graph_ms = median_ms(graph.replay, [()])
        bytes_moved = 2 * HQ * D * HIDDEN + 2 * 2 * HKV * N * D
        flops = 2 * T * HQ * D * HIDDEN + 4 * HQ * T * N * D
        report(f"eviction bf16 N={N} budget=2048 (eager)", ms, bytes_moved, flops)
        report(f"eviction bf16 N={N} budget=2048 (graph replay)", graph_ms, bytes_moved, flops)
    print(f"{'case':<52} {'median ms':>10} {'floor ms':>9} {'floor/time':>10}")
    for name, ms, floor in rows:
        print(f"{name:<52} {ms:>10.4f} {floor:>9.4f} {floor / ms:>10.1%}")


def sanitize():
    """One small launch of every kernel path (compute-sanitizer instruments each launch)."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    for dtype in (torch.bfloat16, torch.float32):  # tensor-core / FMA projection, LoRA, q_norm
        x, w = randn(5, 96, dtype=dtype, gen=gen), randn(3 * 64, 96, dtype=dtype, gen=gen)
        cos, sin = randn(5, 64, dtype=torch.float32, gen=gen), randn(5, 64, dtype=torch.float32, gen=gen)
        la, lb = randn(4, 96, dtype=torch.float32, gen=gen), randn(3 * 64, 4, dtype=torch.float32, gen=gen)
        kernels.lookahead_qproj(x, w, None, la, lb, 2.0, cos, sin, 3, randn(64, dtype=torch.float32, gen=gen), 1e-6)
    x = randn(5, 97, gen=gen)  # bf16 with unaligned rows: FMA path
    kernels.lookahead_qproj(x, randn(128, 97, gen=gen), None, None, None, 1.0, cos, sin, 2, None, 1e-6)
    cases = [  # (dtype, Hq, Hkv, Tq, N, D)
        (torch.bfloat16, 8, 2, 16, 200, 128),
        (torch.float16, 4, 1, 5, 90, 64),
        (torch.bfloat16, 2, 1, 3, 70, 256),
        (torch.float32, 6, 2, 8, 100, 64),
        (torch.float32, 2, 1, 3, 40, 256),
        (torch.bfloat16, 2, 1, 150, 160, 64),
        (torch.bfloat16, 4, 2, 4, 70, 20),  # D % 8 != 0: element-wise tile loads
    ]
    for dtype, Hq, Hkv, Tq, N, D_ in cases:
        q, k, v = (
            randn(1, Hq, Tq, D_, dtype=dtype, gen=gen),
            randn(1, Hkv, N, D_, dtype=dtype, gen=gen),
            randn(1, Hkv, N, D_, dtype=dtype, gen=gen),
        )
        kernels.lookahead_attention(q, k, v, N - 2, D_**-0.5, "max", 5, "avg", "max")
        kernels.attention_scores(q, k, N, D_**-0.5, "mean", 7, "max", "mean")
    for N, S, budget in ((300, 268, 100), (9000, 8900, 700), (5000, 4900, 6000)):  # short, long, keep-all rows
        k, v = randn(1, 2, N, 64, gen=gen), randn(1, 2, N, 64, gen=gen)
        kernels.select_compact(torch.randn(1, 2, S, device="cuda", generator=gen), k, v, budget, 4)
    torch.cuda.synchronize()
    print("sanitize workload: done")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["graph", "timing", "sanitize"])
    mode = parser.parse_args(argv).mode
    ok = kernels.available()
    if not ok[0]:
        raise SystemExit(f"CUDA backend unavailable: {ok[1]}")
    if mode == "graph":
        return 0 if check_graph() else 1
    if mode == "timing":
        timing()
    else:
        sanitize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
