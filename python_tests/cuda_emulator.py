"""The CUDA module compiled for the host (python_tests/cuda_emulator.h): the kernels' exact source
runs on CPU tensors, one fiber per CUDA thread, so their logic is tested on machines without a GPU.

`load()` compiles csrc/cuda_bindings.cpp and csrc/cuda/*.cu with the host C++ compiler (cached under
build/cuda_emulator/ by a hash of the sources) and returns the module, which has the same functions
as lookaheadkv_kernels._C_cuda; pointers are host pointers and the stream argument is ignored.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = Path(__file__).with_name("cuda_emulator.h")
FLAGS = [
    "-std=c++17",
    "-O1",
    "-fPIC",
    "-ffp-contract=off",
    "-fno-strict-aliasing",
    # the fibers _longjmp between stacks, which fortified longjmp rejects
    "-U_FORTIFY_SOURCE",
    "-D_FORTIFY_SOURCE=0",
]


def _cuda_include():
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(str(Path(nvcc).resolve().parents[1]))
    for home in homes:
        if home and (Path(home) / "include" / "cuda_runtime.h").exists():
            return Path(home) / "include"
    return None


def _sources():
    return [ROOT / "csrc" / "cuda_bindings.cpp", *sorted((ROOT / "csrc" / "cuda").glob("*.cu"))]


def unavailable_reason():
    if shutil.which("g++") is None:
        return "no host C++ compiler (g++)"
    if _cuda_include() is None:
        return "no CUDA headers (cuda_runtime.h) for the emulated build"
    if importlib.util.find_spec("pybind11") is None:
        return "pybind11 is not installed (pip install pybind11) for the emulated build"
    return None


def _compile(command):
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"emulated CUDA build failed: {' '.join(command[-4:])}\n{done.stderr[-6000:]}")


@functools.cache
def load():
    import pybind11

    inputs = [
        HEADER,
        *sorted((ROOT / "csrc").glob("*.h")),
        *sorted((ROOT / "csrc" / "cuda").glob("*.cuh")),
        *_sources(),
    ]
    digest = hashlib.sha256(" ".join(FLAGS).encode())
    for path in inputs:
        digest.update(path.read_bytes())
    out_dir = ROOT / "build" / "cuda_emulator" / digest.hexdigest()[:16]
    target = out_dir / ("_C_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))
    if not target.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="build-", dir=out_dir))
        includes = [
            f"-I{ROOT / 'csrc'}",
            f"-I{_cuda_include()}",
            f"-I{pybind11.get_include()}",
            f"-I{sysconfig.get_paths()['include']}",
        ]
        objects = []
        for src in _sources():
            obj = scratch / (src.name + ".o")
            _compile(["g++", *FLAGS, *includes, "-include", str(HEADER), "-x", "c++", "-c", str(src), "-o", str(obj)])
            objects.append(str(obj))
        module = scratch / target.name
        _compile(["g++", "-shared", *objects, "-o", str(module)])
        os.replace(module, target)  # atomic: concurrent builders each install a complete module
        shutil.rmtree(scratch, ignore_errors=True)
    spec = importlib.util.spec_from_file_location("_C_cuda", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
