"""Compile every Triton kernel launch of the backend for sm_90 (H100/H200) without a GPU.

The interpreter runs kernels as NumPy code, so it accepts programs the compiler rejects (type
unification across branches, constexpr rules, layouts) and says nothing about registers or shared
memory. This script drives the backend's real host code on CPU tensors at GPU-like shapes with the
kernel launches intercepted, then compiles each recorded launch — with the exact arguments,
constexprs and every autotune config the host would use — for GPUTarget("cuda", 90) through ptxas,
and reports registers, spills and shared memory per config.

    python python_tests/triton_sm90_compile.py [--all]

Must run without TRITON_INTERPRET (the kernels are decorated as compiled ones at import). Exits
non-zero if a launch fails to compile, or if every config of a launch spills registers.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the kernels must be decorated as compiled kernels")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import lookaheadkv_kernels.backends.triton as backend  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
POINTER_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
}


class Launch:
    def __init__(self, fn: JITFunction, args, kwargs, configs):
        self.fn, self.configs = fn, configs
        self.bound = dict(zip(fn.arg_names, args))
        self.bound.update({k: v for k, v in kwargs.items() if k in fn.arg_names})

    def source(self, config: triton.Config):
        """ASTSource with Triton's launch-time specialisation: ints equal to 1 become constexprs,
        pointers (torch allocations) and ints divisible by 16 carry that divisibility."""
        values = {**self.bound, **config.kwargs}
        signature, constexprs, attrs = {}, {}, {}
        for index, param in enumerate(self.fn.params):
            name, value = param.name, values[param.name]
            specialised = value is None or isinstance(value, bool) or (isinstance(value, int) and value == 1)
            if param.is_constexpr or specialised:
                signature[name] = "constexpr"
                constexprs[name] = value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + POINTER_TYPES[value.dtype]
                attrs[(index,)] = [["tt.divisibility", 16]]
            elif isinstance(value, int):
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(index,)] = [["tt.divisibility", 16]]
            elif isinstance(value, float):
                signature[name] = "fp32"
            else:
                raise TypeError(f"{self.fn.__name__}: unhandled argument {name}={value!r}")
        return ASTSource(self.fn, signature, constexprs, attrs)

    def describe(self):
        flags = {p.name: self.bound[p.name] for p in self.fn.params if p.is_constexpr and p.name in self.bound}
        tensors = [v for v in self.bound.values() if isinstance(v, torch.Tensor)]
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors})
        return f"{self.fn.__name__} {flags} {dtypes}"


def record_launches(drive):
    """The launches `drive()` makes, without running them."""
    launches = []
    jit_run, tuner_run = JITFunction.run, Autotuner.run

    def record_jit(self, *args, **kwargs):
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        launches.append(Launch(self, args, kwargs, [triton.Config({}, **options)]))

    def record_tuner(self, *args, **kwargs):
        launches.append(Launch(self.fn, args, kwargs, self.configs))

    JITFunction.run, Autotuner.run = record_jit, record_tuner
    try:
        drive()
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuner_run
    return launches


def resource_usage(ptx: str) -> dict:
    """ptxas -v's registers and spill bytes of the kernel (with the ptxas Triton itself uses)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        command = [get_ptxas(TARGET.arch).path, "-v", "--gpu-name=sm_90a", str(src), "-o", str(Path(tmp) / "out.cubin")]
        text = subprocess.run(command, capture_output=True, text=True).stderr
    if "Used" not in text:
        raise RuntimeError(f"ptxas -v failed: {text}")
    numbers = dict(
        registers=r"Used (\d+) registers",
        spill_stores=r"(\d+) bytes spill stores",
        spill_loads=r"(\d+) bytes spill loads",
    )
    return {name: int(re.search(pattern, text).group(1)) for name, pattern in numbers.items()}


def drive_all(all_shapes: bool):
    """Host calls at the shapes that matter: Llama-3.1-8B (Hq 32, Hkv 8, D 128, hidden 4096), 32
    lookahead rows, every flag combination; one KV head (several key splits); a group spanning
    several row blocks; with `all_shapes` also SmolLM2's (Hq 9, Hkv 3, D 64, hidden 576).
    float16 compiles like bfloat16."""
    g = torch.Generator().manual_seed(0)
    shapes = ((32, 8, 128, 4096), (9, 3, 64, 576)) if all_shapes else ((32, 8, 128, 4096),)
    for dtype in (torch.bfloat16, torch.float32):
        for Hq, Hkv, D, hidden in shapes:
            x = torch.randn(32, hidden, generator=g).to(dtype)
            w = torch.randn(Hq * D, hidden, generator=g).to(dtype)
            cos, sin = torch.randn(32, D, generator=g), torch.randn(32, D, generator=g)
            lora_a, lora_b = torch.randn(8, hidden, generator=g), torch.randn(Hq * D, 8, generator=g)
            backend.lookahead_qproj(x, w, None, lora_a, lora_b, 4.0, cos, sin, Hq, torch.ones(D), 1e-6)
            backend.lookahead_qproj(x, w, torch.zeros(Hq * D), None, None, 1.0, cos, sin, Hq, None, 1e-6)

            N = 4096
            q = torch.randn(1, Hq, 32, D, generator=g).to(dtype)
            k = torch.randn(1, Hkv, N, D, generator=g).to(dtype)
            for reduce, pool in (("mean", 7), ("max", 1)):
                for query_reduce in ("mean", "max"):
                    backend.attention_scores(q, k, N - 32, D**-0.5, reduce, pool, "max", query_reduce)
                    backend.lookahead_attention(q, k, k, N, D**-0.5, reduce, pool, "avg", query_reduce)
            scores = torch.rand(1, Hkv, N - 32, generator=g)
            for budget in (512, 4 + 32 + 1, N):  # n_pick = 476, 1 (an int 1 is specialised), all
                backend.select_compact(scores, k, k, budget, 4)
        # One KV head and one query (ints equal to 1 are specialised): several key splits.
        q_one = torch.randn(1, 1, 1, 128, generator=g).to(dtype)
        k_one = torch.randn(1, 1, 4096, 128, generator=g).to(dtype)
        backend.lookahead_attention(q_one, k_one, k_one, 4096, 0.1, "mean", 1, "max", "mean")
        w_one, rope_one = torch.randn(128, 128, generator=g).to(dtype), torch.randn(1, 128, generator=g)
        backend.lookahead_qproj(q_one[0, 0], w_one, None, None, None, 1.0, rope_one, rope_one, 1, None, 1e-6)
        q_long = torch.randn(1, 8, 256, 128, generator=g).to(dtype)  # G·Tq > 128 rows: several row blocks
        k_long = torch.randn(1, 2, 256, 128, generator=g).to(dtype)
        for query_reduce in ("mean", "max"):
            backend.attention_scores(q_long, k_long, 256, 0.1, "max", 7, "max", query_reduce)
            backend.lookahead_attention(q_long, k_long, k_long, 256, 0.1, "mean", 1, "max", query_reduce)
        # Paged ops, both block layouts: 4 sequences of 32 lookahead queries (Llama shapes, block size 16),
        # and a group of 8 heads (several head blocks).
        for layout in ("NHD", "HND"):
            for Hq, Hkv, D in ((32, 8, 128), (16, 2, 128)):
                B, block_size, max_blocks = 4, 16, 64
                num_blocks = B * max_blocks
                shape = (num_blocks, block_size, Hkv, D) if layout == "NHD" else (num_blocks, Hkv, block_size, D)
                cache = torch.randn(shape, generator=g).to(dtype)
                table = torch.arange(num_blocks, dtype=torch.int32).view(B, max_blocks)
                lens = torch.full((B,), max_blocks * block_size, dtype=torch.int32)
                q_paged = torch.randn(B * 32, Hq, D, generator=g).to(dtype)
                offsets = torch.arange(0, B * 32 + 1, 32, dtype=torch.int32)
                for reduce, pool, query_reduce in (("mean", 7, "max"), ("max", 1, "mean")):
                    args = (lens, lens, D**-0.5, reduce, pool, "max", query_reduce, layout)
                    backend.paged_attention_scores(q_paged, offsets, cache, table, *args)
                    backend.paged_lookahead_attention(q_paged, offsets, cache, cache, table, *args)
                scores = torch.rand(B, Hkv, max_blocks * block_size, generator=g)
                backend.paged_select_compact(scores, cache, cache, table, lens, lens, lens // 4, 4, layout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--all",
        action="store_true",
        help="every autotune config and the SmolLM2 shapes too (default: each launch's first config)",
    )
    args = parser.parse_args()
    launches = record_launches(lambda: drive_all(args.all))
    spills_of, failures = {}, []  # variant -> spilled bytes
    for launch in launches:
        configs = launch.configs if args.all else launch.configs[:1]
        spills = []
        for config in configs:
            src = launch.source(config)
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
            variant = (src.hash(), config.num_warps, config.num_stages)
            if variant not in spills_of:
                what = f"{launch.describe()} {config.kwargs} {options}"
                try:
                    compiled = triton.compile(src, target=TARGET, options=options)
                except Exception as exc:  # report every failing launch, not only the first
                    failures.append(f"FAILED {what}: {str(exc).splitlines()[-1] if str(exc) else type(exc).__name__}")
                    print(failures[-1], flush=True)
                    continue
                usage = resource_usage(compiled.asm["ptx"])
                spills_of[variant] = usage["spill_stores"] + usage["spill_loads"]
                print(
                    f"ok {what} regs={usage['registers']} smem={compiled.metadata.shared}"
                    + (f" SPILLS {spills_of[variant]} bytes" if spills_of[variant] else ""),
                    flush=True,
                )
            spills.append(spills_of[variant])
        if spills and min(spills) > 0:
            failures.append(f"every config spills: {launch.describe()}")
            print(failures[-1], flush=True)
    print(f"{len(spills_of)} kernel variants compiled for sm_90, {len(failures)} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
