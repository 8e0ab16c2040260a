import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

# Without a GPU, the Triton kernels run in the interpreter on CPU tensors. Must be set before
# triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu need a CUDA device: skipped without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


BUILD_LOG = Path(__file__).resolve().parent.parent / "build" / "native-build.log"


def _ptxas_report(log_text):
    """One line per compiled CUDA kernel: architecture, registers, shared memory, stack, spills."""
    rows, kernel, stack = [], None, None
    for line in log_text.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'", line):
            kernel, stack = m.groups(), ""
        elif kernel and (
            m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        ):
            stack = m.groups()
        elif kernel and (m := re.search(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?", line)):
            rows.append((kernel[1], kernel[0], m.group(1), m.group(2) or "0", *(stack or ("?", "?", "?"))))
            kernel = None
    if rows and shutil.which("c++filt"):
        names = subprocess.run(
            ["c++filt"], input="\n".join(r[1] for r in rows), capture_output=True, text=True
        ).stdout.split("\n")
        short = [re.sub(r"^void |\(anonymous namespace\)::|lookaheadkv::cuda::|\(.*$", "", n) for n in names]
        rows = [(r[0], n) + r[2:] for r, n in zip(rows, short)]
    return rows


def pytest_report_header(config):
    """CI's build log carries the ptxas report; show it (and flag spills) where CI prints tests."""
    if not BUILD_LOG.exists():
        return None
    rows = _ptxas_report(BUILD_LOG.read_text())
    if not rows:
        return None
    spilling = [r for r in rows if r[4:] != ("0", "0", "0")]
    lines = [
        f"CUDA build ({BUILD_LOG}): {len(rows)} kernel compilations, {len(spilling)} with stack frame or spills",
        "  arch   regs  smem  stack spill-st spill-ld  kernel",
    ]
    lines += [f"  {a:<6} {r:>4} {s:>5} {st:>6} {ss:>8} {sl:>8}  {k}" for a, k, r, s, st, ss, sl in rows]
    return lines
