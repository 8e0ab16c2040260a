"""The CPU kernels built for several x86-64 instruction-set levels (CMakeLists.txt,
csrc/cpu_dispatch.cpp): every level this CPU supports computes what the reference computes, and
LOOKAHEADKV_CPU_ISA forces a level or is refused with a clear error. Each case runs in its own
process, since the level is chosen once per process. (That the baseline level holds no AVX code is
checked by the build itself: cmake/check_no_avx.cmake.)"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lookaheadkv_kernels.backends import cpu

LEVELS = ("x86_64_v2", "x86_64_v3", "x86_64_v4")
# What each level's -march may use beyond the previous level, as /proc/cpuinfo names the flags.
LEVEL_FLAGS = {
    "x86_64_v2": {"sse4_2", "popcnt", "ssse3", "cx16"},
    "x86_64_v3": {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"},
    "x86_64_v4": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
}

CHECK = """
import torch
import lookaheadkv_kernels as lk

torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    q, k, v = (torch.randn(2, h, n, 64).to(dtype) for h, n in ((8, 16), (4, 300), (4, 300)))
    for pool_type, query_reduce in (("max", "mean"), ("avg", "max")):
        options = dict(num_scored=284, pool_kernel=5, pool_type=pool_type, query_reduce=query_reduce)
        got = lk.attention_scores(q, k, backend="cpu", **options)
        torch.testing.assert_close(got, lk.attention_scores(q, k, backend="reference", **options), rtol=1e-4, atol=1e-5)
    out, scores = lk.lookahead_attention(q, k, v, num_scored=284, backend="cpu")
    out_ref, _ = lk.lookahead_attention(q, k, v, num_scored=284, backend="reference")
    torch.testing.assert_close(out.float(), out_ref.float(), rtol=1e-2, atol=1e-2)
    selected = lk.select_compact(scores, k, v, 64, num_sink=4, backend="cpu")
    for got, want in zip(selected, lk.select_compact(scores, k, v, 64, num_sink=4, backend="reference")):
        assert torch.equal(got, want)
    x, weight = torch.randn(32, 256).to(dtype), (torch.randn(8 * 64, 256) / 16).to(dtype)
    cos, sin = torch.randn(32, 64).to(dtype), torch.randn(32, 64).to(dtype)
    got = lk.lookahead_qproj(x, weight, cos, sin, 8, backend="cpu")
    want = lk.lookahead_qproj(x, weight, cos, sin, 8, backend="reference")
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
print("ok")
"""


def run_with_level(level: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LOOKAHEADKV_CPU_ISA": level}
    return subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)


def built_levels() -> list[str]:
    """The levels this build of _C_cpu holds, as its refusal of an unknown level lists them."""
    result = run_with_level("no-such-level")
    match = re.search(r"not a level of this build \(([^)]*)\)", result.stderr)
    assert match, result.stderr
    return match.group(1).split(", ")


def cpu_supports(level: str) -> bool:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split()) if "flags" in text else set()
    needed = set().union(*(LEVEL_FLAGS[name] for name in LEVELS[: LEVELS.index(level) + 1]))
    return needed <= flags


pytestmark = pytest.mark.skipif(not cpu.available()[0], reason="the native CPU module is not built")


@pytest.fixture(scope="module")
def levels():
    names = built_levels()
    if names != list(reversed(LEVELS)):
        pytest.skip(f"not a multi-level build (levels {names}; LOOKAHEADKV_CPU_ARCH was set)")
    if not Path("/proc/cpuinfo").exists():
        pytest.skip("no /proc/cpuinfo to tell which levels this CPU supports")
    return names


@pytest.mark.parametrize("level", LEVELS)
def test_every_level_the_cpu_supports_matches_the_reference(level, levels):
    result = run_with_level(level)
    if cpu_supports(level):
        assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    else:
        assert f"LOOKAHEADKV_CPU_ISA={level}: this CPU does not support it" in result.stderr, result.stderr


def test_the_default_is_the_best_level_the_cpu_supports(levels):
    result = run_with_level("")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_an_unknown_level_is_refused_naming_the_built_ones(levels):
    result = run_with_level("avx9000")
    assert result.returncode != 0
    assert "LOOKAHEADKV_CPU_ISA=avx9000: not a level of this build (x86_64_v4, x86_64_v3, x86_64_v2)" in result.stderr
