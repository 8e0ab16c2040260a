"""Helpers shared by the Triton kernels: interpreter detection, autotune configs, device facts and
the small @triton.jit building blocks every kernel uses."""

from __future__ import annotations

from functools import cache

import torch
import triton
import triton.language as tl
from triton import knobs

# TRITON_INTERPRET is read when a kernel is decorated, so this is the mode every kernel of this
# package runs in.
INTERPRETING = bool(knobs.runtime.interpret)

# Programs a launch should have to fill the GPU (two per SM keeps every SM busy while one program
# waits on memory). Under the interpreter a small number still exercises the multi-program paths
# (key splits, split-K) on the tests' small shapes.
PROGRAMS_PER_SM = 2
INTERPRETER_SMS = 2


@cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs a launch on `device` needs to keep every SM busy."""
    if device.type != "cuda" or INTERPRETING:
        return PROGRAMS_PER_SM * INTERPRETER_SMS
    return PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def autotune(gpu_configs: list[triton.Config], interpreter_config: triton.Config, key: list[str]):
    """triton.autotune over `gpu_configs` (chosen for sm_90) on a GPU; under the interpreter one small
    config, so nothing is benchmarked there."""
    return triton.autotune(configs=[interpreter_config] if INTERPRETING else gpu_configs, key=key)


def dot_upcast(dtype: torch.dtype) -> bool:
    """The interpreter multiplies bfloat16 tiles as raw uint16 bits; widening them to float32 first is
    exact (bf16 x bf16 products fit float32, and the accumulator is float32 anyway)."""
    return INTERPRETING and dtype == torch.bfloat16


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(n)


@triton.jit
def max_propagate_nan(a, b):
    """max that returns NaN when either side is NaN (torch.amax / max_pool semantics); tl.max may drop NaN."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def dot_acc(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b with a float32 accumulator (see dot_upcast for UPCAST)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)
