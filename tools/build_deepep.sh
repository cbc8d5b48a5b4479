#!/usr/bin/env bash
# Build the peer library DeepEP (v1) for the side-by-side benchmark: its intranode-only
# extension (no NVSHMEM), sm_90, with torch's CUDA extension, into TARGET.
#
#   tools/build_deepep.sh [TARGET]        # default /tmp/deepep_site
#   PYTHONPATH=TARGET python3 -m deepcomm.launch --standalone --nproc-per-node 2 tools/bench_deepep.py
#
# DeepEP's source is never part of this repo: it is carried to the GPU machine in the
# git-ignored folder .peer/DeepEP. Without it this script says so and succeeds.
# Needs torch with CUDA, nvcc, ninja (torch's device-link step only exists on its ninja path).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD/.peer/DeepEP
TARGET=${1:-/tmp/deepep_site}
PYTHON=${PYTHON:-python3}
if [ ! -f "$SRC/setup.py" ]; then
  echo "deepep: not carried (.peer/DeepEP missing); nothing built"
  exit 0
fi

export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export TORCH_CUDA_ARCH_LIST=9.0
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
# CUDA 13 moved cuda/std, cub and thrust under include/cccl; nvcc finds them itself, g++ does not.
export CPLUS_INCLUDE_PATH=$CUDA_HOME/include/cccl${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}
# torch's ATen/cuda headers include the cuSPARSE/cuBLAS/cuSOLVER headers. A minimal toolkit
# (nvcc + cudart only) lacks them; the nvidia-* wheels that torch depends on carry them.
site=$("$PYTHON" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
for header in cusparse.h cublas_v2.h cublasLt.h cusolverDn.h cusolver_common.h; do
  [ -f "$CUDA_HOME/include/$header" ] && continue
  found=$(ls "$site"/nvidia/*/include/"$header" 2>/dev/null | head -1 || true)
  if [ -n "$found" ]; then
    case ":$CPLUS_INCLUDE_PATH:" in *":${found%/*}:"*) ;; *) CPLUS_INCLUDE_PATH+=":${found%/*}" ;; esac
  else
    echo "deepep: warning: $header is in neither $CUDA_HOME/include nor $site/nvidia/*/include"
  fi
done
unset NVSHMEM_DIR  # set, it would turn the NVSHMEM (internode, low-latency) build on
# Stop setup.py's `git rev-parse` from reading our repo's HEAD as DeepEP's version.
export GIT_CEILING_DIRECTORIES=$PWD/.peer

# Without ninja torch compiles each file on its own and skips the device-link step added below.
if ! "$PYTHON" -c 'import sys; from torch.utils.cpp_extension import is_ninja_available as ok; sys.exit(not ok())'; then
  echo "deepep: build FAILED: ninja not found (pip install ninja)"; exit 1
fi
commit=$(cat "$SRC/PEER_COMMIT" 2>/dev/null | cut -c1-7 || true)
mkdir -p "$TARGET"
TARGET=$(cd "$TARGET" && pwd)
BUILD_TMP=$(mktemp -d /tmp/deepep-build.XXXXXX)
trap 'rm -rf "$BUILD_TMP"' EXIT

# DeepEP links -lcuda. Driver installs often ship only libcuda.so.1 (no dev symlink):
# point the linker at the driver's library, else at the toolkit's stub.
ldconfig -p > "$BUILD_TMP/ld.so.cache.txt" 2>/dev/null || true
if ! grep -q 'libcuda\.so ' "$BUILD_TMP/ld.so.cache.txt"; then
  driver=$(awk '/libcuda\.so\.1 /{print $NF; exit}' "$BUILD_TMP/ld.so.cache.txt")
  mkdir -p "$BUILD_TMP/lib"
  if [ -n "$driver" ]; then
    ln -s "$driver" "$BUILD_TMP/lib/libcuda.so"
  elif [ -f "$CUDA_HOME/lib64/stubs/libcuda.so" ]; then
    ln -s "$CUDA_HOME/lib64/stubs/libcuda.so" "$BUILD_TMP/lib/libcuda.so"
  fi
  export LIBRARY_PATH=$BUILD_TMP/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
fi

# Its bindings call three low-latency mask-buffer entry points outside its DISABLE_NVSHMEM guards
# (commit 567632d), which an intranode-only build leaves undefined at import: define them here,
# raising if ever called (the side-by-side benchmark uses DeepEP's intranode mode only).
cat > "$BUILD_TMP/ll_mask_absent.cpp" <<'CPP'
#include <stdexcept>
#include <cuda_runtime_api.h>
namespace deep_ep::internode_ll {
[[noreturn]] static void absent() { throw std::runtime_error("DeepEP built intranode-only: no low-latency mask buffer"); }
void query_mask_buffer(int*, int, int*, cudaStream_t) { absent(); }
void update_mask_buffer(int*, int, bool, cudaStream_t) { absent(); }
void clean_mask_buffer(int*, int, cudaStream_t) { absent(); }
}  // namespace deep_ep::internode_ll
CPP

echo "deepep: building $SRC (commit ${commit:-unknown}) -> $TARGET (sm_90, intranode only, MAX_JOBS=$MAX_JOBS)"
# Three adjustments to DeepEP's setup.py, made from outside it:
#  - it turns NVSHMEM on whenever the nvidia-nvshmem wheel is importable (it is on the GPU
#    machine), with no switch to say no; hide the wheel from its find_spec call.
#  - for sm_90 it compiles with -rdc=true but adds the device-link step only with NVSHMEM;
#    without it the module fails to import (undefined __cudaRegisterLinkedBinary_*).
#  - the mask-buffer definitions above join its sources.
"$PYTHON" - "$SRC" "$TARGET" "$BUILD_TMP" <<'EOF'
import importlib.util
import os
import runpy
import sys

import setuptools

src, target, build_tmp = sys.argv[1:4]
real_find_spec = importlib.util.find_spec


def find_spec(name, *args, **kwargs):
    return None if name.startswith("nvidia.nvshmem") else real_find_spec(name, *args, **kwargs)


real_setup = setuptools.setup


def setup(**kwargs):
    for ext in kwargs.get("ext_modules", []):
        flags = ext.extra_compile_args
        if isinstance(flags, dict) and "-rdc=true" in flags.get("nvcc", []) and not flags.get("nvcc_dlink"):
            flags["nvcc_dlink"] = ["-dlink"]
        if isinstance(flags, dict) and "-DDISABLE_NVSHMEM" in flags.get("cxx", []):  # with NVSHMEM it defines them
            ext.sources.append(os.path.join(build_tmp, "ll_mask_absent.cpp"))
    return real_setup(**kwargs)


importlib.util.find_spec = find_spec
setuptools.setup = setup
os.chdir(src)
sys.path.insert(0, src)
sys.argv = ["setup.py", "build_ext", "--build-lib", target, "--build-temp", os.path.join(build_tmp, "obj")]
runpy.run_path("setup.py", run_name="__main__")
EOF
rm -rf "$TARGET/deep_ep"
cp -r "$SRC/deep_ep" "$TARGET/deep_ep"

# Import check where a GPU is present (the module needs the driver to load).
if "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  PYTHONPATH=$TARGET${PYTHONPATH:+:$PYTHONPATH} "$PYTHON" -c \
    "import deep_ep; print('deepep: built ${commit:-}, imports, sm90 features:', deep_ep.Buffer.is_sm90_compiled())"
else
  echo "deepep: built ${commit:-} into $TARGET (not imported: no GPU here)"
fi
