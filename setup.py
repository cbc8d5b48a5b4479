"""Builds deepcomm: the Python package plus the CMake-built extension deepcomm._C.

Environment:
  DEEPCOMM_CUDA_ARCHS    CUDA architectures (CMake syntax), default "90a" (Hopper)
  DEEPCOMM_NO_EXTENSION  "1": install as pure Python (reference path only)
  DEEPCOMM_WITH_NVSHMEM  "0": build without NVSHMEM even if the wheel is installed
  NVSHMEM_HOME           NVSHMEM root; default: the installed nvidia-nvshmem-cu13 wheel
  CUDA_HOME              CUDA toolkit root; default: nvcc on PATH, then /usr/local/cuda
  DEEPCOMM_BUILD_JOBS    parallel compile jobs, default: CPU count

Where no CUDA compiler is found the package installs as pure Python and says
which features are missing (deepcomm.features()). A build that is attempted
and fails stops the install: a broken toolchain is never hidden.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "deepcomm" / "_version.py").read_text()).group(1)


def find_nvcc() -> str | None:
    candidates = [os.environ.get("CUDACXX")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def find_nvshmem_home() -> str | None:
    if os.environ.get("DEEPCOMM_WITH_NVSHMEM") == "0":
        return None
    if os.environ.get("NVSHMEM_HOME"):
        return os.environ["NVSHMEM_HOME"]
    spec = importlib.util.find_spec("nvidia.nvshmem")
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def pybind11_cmake_dir() -> str:
    import pybind11

    return pybind11.get_cmake_dir()


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self) -> None:
        if os.environ.get("DEEPCOMM_NO_EXTENSION") == "1":
            print("deepcomm: DEEPCOMM_NO_EXTENSION=1, installing pure Python (reference path only)")
            return
        if find_nvcc() is None:
            print(
                "deepcomm: no CUDA compiler found (nvcc, CUDA_HOME, /usr/local/cuda); installing pure Python. "
                "Unavailable: deepcomm._C (layout kernel, IPC buffers, NVSHMEM transport). "
                "The reference path, routing and benchmarks on CPU work."
            )
            return
        super().run()

    def build_extension(self, ext: Extension) -> None:
        nvcc = find_nvcc()
        output_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={output_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11_cmake_dir()}",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DDEEPCOMM_CUDA_ARCHS={os.environ.get('DEEPCOMM_CUDA_ARCHS', '90a')}",
            f"-DDEEPCOMM_VERSION={VERSION}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        nvshmem_home = find_nvshmem_home()
        if nvshmem_home:
            args.append(f"-DNVSHMEM_HOME={nvshmem_home}")
        else:
            print("deepcomm: nvidia-nvshmem-cu13 not found; building without the NVSHMEM transport")
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        jobs = os.environ.get("DEEPCOMM_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)


setup(
    version=VERSION,
    ext_modules=[CMakeExtension("deepcomm._C")],
    cmdclass={"build_ext": CMakeBuild},
)
