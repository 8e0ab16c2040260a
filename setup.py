"""Build driver: setuptools runs CMake (CMakeLists.txt) to build the native modules.

Environment switches:
  LOOKAHEADKV_CUDA        auto (default: build _C_cuda when nvcc is found) | 1 (require it) | 0 (skip it)
  LOOKAHEADKV_CUDA_ARCHS  CUDA architectures, default "80;90"
  LOOKAHEADKV_CPU_ARCH    target of the CPU kernels. Default "dispatch": on x86-64, the kernels are
                          built for x86-64-v2 (SSE4.2), x86-64-v3 (AVX2, FMA) and x86-64-v4 (AVX-512)
                          and each call runs the best level the CPU supports, so a wheel runs on any
                          x86-64-v2 CPU (elsewhere: the compiler's default target). Any other value is
                          one -march for all of them: "native" (only for CPUs like the building one),
                          "x86-64-v3", ...; empty: the compiler's default. At run time
                          LOOKAHEADKV_CPU_ISA=x86_64_v2|x86_64_v3|x86_64_v4 forces a level.
  LOOKAHEADKV_BUILD_JOBS  parallel build jobs, default: CPU count
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
BUILD_LOG = ROOT / "build" / "native-build.log"


def find_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


def want_cuda():
    mode = os.environ.get("LOOKAHEADKV_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise RuntimeError(f"LOOKAHEADKV_CUDA must be auto, 0 or 1, got {mode!r}")
    nvcc = find_nvcc()
    if mode == "1" and nvcc is None:
        raise RuntimeError("LOOKAHEADKV_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
    return (mode != "0" and nvcc is not None), nvcc


class CMakeExtension(Extension):
    """One CMake target of CMakeLists.txt, named like the Python module it produces."""

    def __init__(self, name):
        super().__init__(name, sources=[])
        self.target = name.rsplit(".", 1)[-1]


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        # The module lands where setuptools expects it (next to __init__.py for editable installs).
        extdir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)
        import pybind11

        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DLOOKAHEADKV_CPU_ARCH={os.environ.get('LOOKAHEADKV_CPU_ARCH', 'dispatch')}",
            f"-DLOOKAHEADKV_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
        ]
        if with_cuda:
            args += [
                f"-DCMAKE_CUDA_COMPILER={nvcc}",
                f"-DLOOKAHEADKV_CUDA_ARCHS={os.environ.get('LOOKAHEADKV_CUDA_ARCHS', '80;90')}",
            ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        jobs = os.environ.get("LOOKAHEADKV_BUILD_JOBS", str(os.cpu_count() or 1))
        print(f"lookaheadkv_kernels: building {ext.target}", flush=True)
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_temp, check=True)
        build = subprocess.run(
            ["cmake", "--build", ".", "--target", ext.target, "-j", jobs],
            cwd=build_temp,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        # pip hides build output unless -v; keep it (ptxas register/spill report included) in a file.
        BUILD_LOG.parent.mkdir(exist_ok=True)
        with BUILD_LOG.open("a") as log:
            log.write(build.stdout)
        print(build.stdout, flush=True)
        if build.returncode:
            raise RuntimeError(f"building {ext.target} failed (log: {BUILD_LOG})")


with_cuda, nvcc = want_cuda()
BUILD_LOG.unlink(missing_ok=True)
setup(
    ext_modules=[CMakeExtension("lookaheadkv_kernels._C_cpu")]
    + ([CMakeExtension("lookaheadkv_kernels._C_cuda")] if with_cuda else []),
    cmdclass={"build_ext": CMakeBuild},
)
