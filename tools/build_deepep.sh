#!/usr/bin/env bash
# Build the peer library DeepEP (v1) for the side-by-side benchmark: its intranode-only
# extension (no NVSHMEM), sm_90, with torch's CUDA extension, into TARGET.
#
#   tools/build_deepep.sh [TARGET]        # default /tmp/deepep_site
#   PYTHONPATH=TARGET python3 -m deepcomm.launch --standalone --nproc-per-node 2 tools/bench_deepep.py
#
# Opt-in, DEEPEP_WITH_NVSHMEM=1: the full extension (intranode, internode and low-latency
# kernels) linked against NVSHMEM from the pip wheel nvidia-nvshmem-cu13, for
# `tools/bench_deepep.py --mode low-latency`. Build it into its own TARGET:
#
#   DEEPEP_WITH_NVSHMEM=1 tools/build_deepep.sh [TARGET]      # default /tmp/deepep_ll_site
#   PYTHONPATH=TARGET python3 -m deepcomm.launch --standalone --nproc-per-node 2 \
#       tools/bench_deepep.py --mode low-latency --preset decode
#
# It fails soft: it builds in a scratch folder and replaces TARGET only on success; on any
# failure it says so on its last line ("deepep: NVSHMEM build FAILED: ...") and exits 0,
# leaving TARGET (and any intranode build elsewhere) as it was.
# On a machine without an RDMA NIC NVSHMEM reaches the peers over NVLink (P2P) only and its
# IBGDA transport stays uninitialised (no QPs): DeepEP's low-latency dispatch asserts on the
# device that each peer has a QP per local expert even when it only stores over NVLink. The
# NVSHMEM build therefore drops that one device assertion (any assertion whose text names
# num_rc_per_pe; all others stay); DEEPEP_LL_QP_CHECK=1 keeps it.
#
# DeepEP's source is never part of this repo: it is carried to the GPU machine in the
# git-ignored folder .peer/DeepEP. Without it this script says so and succeeds.
# Needs torch with CUDA, nvcc, ninja (torch's device-link step only exists on its ninja path).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD/.peer/DeepEP
WITH_NVSHMEM=${DEEPEP_WITH_NVSHMEM:-0}
if [ "$WITH_NVSHMEM" = 1 ]; then
  TARGET=${1:-/tmp/deepep_ll_site}
else
  TARGET=${1:-/tmp/deepep_site}
fi
PYTHON=${PYTHON:-python3}
if [ ! -f "$SRC/setup.py" ]; then
  echo "deepep: not carried (.peer/DeepEP missing); nothing built"
  exit 0
fi

# A failure: the intranode build stops with status 1; the NVSHMEM build says so and succeeds,
# TARGET untouched (it is only replaced once the new module built and, with a GPU, imported).
fail() {
  if [ "$WITH_NVSHMEM" = 1 ]; then
    echo "deepep: NVSHMEM build FAILED: $*; $TARGET left as it was (an intranode build elsewhere is unaffected)"
    exit 0
  fi
  echo "deepep: build FAILED: $*"
  exit 1
}

export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export TORCH_CUDA_ARCH_LIST=9.0
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
# CUDA 13 moved cuda/std, cub and thrust under include/cccl; nvcc finds them itself, g++ does not.
# (NVSHMEM's headers include cuda/std/...: the NVSHMEM build also names the folder to nvcc.)
CCCL=$CUDA_HOME/include/cccl
export CPLUS_INCLUDE_PATH=$CCCL${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}
# torch's ATen/cuda headers include the cuSPARSE/cuBLAS/cuSOLVER headers. A minimal toolkit
# (nvcc + cudart only) lacks them; the nvidia-* wheels that torch depends on carry them.
site=$("$PYTHON" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))') \
  || fail "$PYTHON cannot import torch"
for header in cusparse.h cublas_v2.h cublasLt.h cusolverDn.h cusolver_common.h; do
  [ -f "$CUDA_HOME/include/$header" ] && continue
  found=$(ls "$site"/nvidia/*/include/"$header" 2>/dev/null | head -1 || true)
  if [ -n "$found" ]; then
    case ":$CPLUS_INCLUDE_PATH:" in *":${found%/*}:"*) ;; *) CPLUS_INCLUDE_PATH+=":${found%/*}" ;; esac
  else
    echo "deepep: warning: $header is in neither $CUDA_HOME/include nor $site/nvidia/*/include"
  fi
done
# Set, NVSHMEM_DIR turns DeepEP's NVSHMEM build on with an unversioned libnvshmem_host.so, which
# the wheel lacks. Unset, its setup.py finds the wheel itself (importlib) and links the wheel's
# versioned host library by name (-l:libnvshmem_host.so.N) and libnvshmem_device.a, with an rpath
# to the wheel's lib/: no symlinks needed. The intranode build hides the wheel from it instead.
unset NVSHMEM_DIR
NVSHMEM_HOME="" nvshmem_version=""
if [ "$WITH_NVSHMEM" = 1 ]; then
  NVSHMEM_HOME=$("$PYTHON" -c 'import importlib.util as u; s = u.find_spec("nvidia.nvshmem"); print(list(s.submodule_search_locations)[0])' 2>/dev/null || true)
  [ -n "$NVSHMEM_HOME" ] || fail "no NVSHMEM wheel for $PYTHON (pip install nvidia-nvshmem-cu13)"
  [ -f "$NVSHMEM_HOME/include/nvshmem.h" ] || fail "no include/nvshmem.h in $NVSHMEM_HOME"
  [ -f "$NVSHMEM_HOME/lib/libnvshmem_device.a" ] || fail "no lib/libnvshmem_device.a in $NVSHMEM_HOME"
  ls "$NVSHMEM_HOME"/lib/libnvshmem_host.so* > /dev/null 2>&1 || fail "no lib/libnvshmem_host.so* in $NVSHMEM_HOME"
  [ -d "$CCCL/cuda/std" ] || echo "deepep: warning: no $CCCL/cuda/std (NVSHMEM's headers include cuda/std/...)"
  nvshmem_version=$(awk '/#define NVSHMEM_VENDOR_(MAJOR|MINOR|PATCH)_VERSION /{v = v (v == "" ? "" : ".") $3} END {print v}' \
    "$NVSHMEM_HOME/include/non_abi/nvshmem_version.h" 2>/dev/null || true)
fi
# Stop setup.py's `git rev-parse` from reading our repo's HEAD as DeepEP's version.
export GIT_CEILING_DIRECTORIES=$PWD/.peer

# Without ninja torch compiles each file on its own and skips the device-link step added below.
if ! "$PYTHON" -c 'import sys; from torch.utils.cpp_extension import is_ninja_available as ok; sys.exit(not ok())'; then
  fail "ninja not found (pip install ninja)"
fi
commit=$(cat "$SRC/PEER_COMMIT" 2>/dev/null | cut -c1-7 || true)
mkdir -p "$TARGET"
TARGET=$(cd "$TARGET" && pwd)
BUILD_TMP=$(mktemp -d /tmp/deepep-build.XXXXXX)
trap 'rm -rf "$BUILD_TMP"' EXIT
# The intranode build writes into TARGET; the NVSHMEM build into a scratch folder first.
BUILD_LIB=$TARGET
[ "$WITH_NVSHMEM" = 1 ] && BUILD_LIB=$BUILD_TMP/site && mkdir -p "$BUILD_LIB"

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

# NVSHMEM build: DeepEP and NVSHMEM's IBGDA headers include <infiniband/mlx5dv.h> (rdma-core's
# libibverbs-dev; headers only, nothing links against it). A machine without a NIC rarely has
# it and the GPU machine cannot fetch it: take it from a libibverbs-dev .deb carried in
# .peer/debs/ (here: apt-get download libibverbs-dev) or named by DEEPEP_IBVERBS_DEB.
unpack_deb() {  # DEB DIR: with dpkg-deb where there is one, else with ar and tar
  if command -v dpkg-deb > /dev/null; then
    dpkg-deb -x "$1" "$2"
    return
  fi
  local member
  member=$(ar t "$1" | grep '^data\.tar') || return 1
  mkdir -p "$2"
  case $member in
    *.xz) ar p "$1" "$member" | tar -xJ -C "$2" ;;
    *.zst) ar p "$1" "$member" | tar --zstd -x -C "$2" ;;
    *.gz) ar p "$1" "$member" | tar -xz -C "$2" ;;
    *) ar p "$1" "$member" | tar -x -C "$2" ;;
  esac
}
EXTRA_NVCC_INCLUDES=""
if [ "$WITH_NVSHMEM" = 1 ]; then
  EXTRA_NVCC_INCLUDES=$CCCL
  if ! echo '#include <infiniband/mlx5dv.h>' | g++ -E -x c++ - > /dev/null 2>&1; then
    deb=${DEEPEP_IBVERBS_DEB:-$(ls "$PWD"/.peer/debs/libibverbs-dev_*.deb 2>/dev/null | head -1 || true)}
    [ -n "$deb" ] && [ -f "$deb" ] || fail "no <infiniband/mlx5dv.h>: apt-get install libibverbs-dev, or carry its .deb in .peer/debs/ (apt-get download libibverbs-dev)"
    unpack_deb "$deb" "$BUILD_TMP/ibverbs" || fail "could not unpack $deb"
    CPLUS_INCLUDE_PATH+=":$BUILD_TMP/ibverbs/usr/include"
    EXTRA_NVCC_INCLUDES+=":$BUILD_TMP/ibverbs/usr/include"
    echo '#include <infiniband/mlx5dv.h>' | g++ -E -x c++ - > /dev/null 2>&1 \
      || fail "<infiniband/mlx5dv.h> from $deb does not preprocess (g++ -E)"
    echo "deepep: <infiniband/mlx5dv.h> from ${deb##*/}"
  fi
fi

# NVSHMEM build on a machine without a NIC: the IBGDA transport never initialises, so its device
# state reports 0 QPs per peer, and the low-latency dispatch's device assertion that there are at
# least as many QPs as local experts traps although every peer is reached over NVLink (the QPs
# are only used for peers without a P2P mapping). Pre-included into every CUDA source, this
# EP_DEVICE_ASSERT (DeepEP defines its own only #ifndef) skips a failed assertion whose text
# names num_rc_per_pe and keeps every other one.
PRE_INCLUDE=""
if [ "$WITH_NVSHMEM" = 1 ] && [ "${DEEPEP_LL_QP_CHECK:-0}" != 1 ]; then
  PRE_INCLUDE=$BUILD_TMP/ep_assert_p2p_only.cuh
  cat > "$PRE_INCLUDE" <<'CUH'
#pragma once
#include <cuda_runtime.h>
#include <cstdio>
__host__ __device__ inline bool ep_assert_names_qp_count(const char* text) {
    const char* key = "num_rc_per_pe";
    for (; *text; ++text) {
        int i = 0;
        while (key[i] and text[i] == key[i])
            ++i;
        if (not key[i])
            return true;
    }
    return false;
}
#define EP_DEVICE_ASSERT(cond)                                                             \
    do {                                                                                   \
        if (not(cond) and not ep_assert_names_qp_count(#cond)) {                           \
            printf("Assertion failed: %s:%d, condition: %s\n", __FILE__, __LINE__, #cond); \
            asm("trap;");                                                                  \
        }                                                                                  \
    } while (0)
CUH
fi

if [ "$WITH_NVSHMEM" = 1 ]; then
  qp_check=$([ -n "$PRE_INCLUDE" ] && echo "QP-count device check dropped" || echo "QP-count device check kept")
  echo "deepep: building $SRC (commit ${commit:-unknown}) -> $TARGET (sm_90, with NVSHMEM ${nvshmem_version:-?}" \
       "from $NVSHMEM_HOME, $qp_check, MAX_JOBS=$MAX_JOBS)"
else
  echo "deepep: building $SRC (commit ${commit:-unknown}) -> $TARGET (sm_90, intranode only, MAX_JOBS=$MAX_JOBS)"
fi
# Adjustments to DeepEP's setup.py, made from outside it:
#  - intranode build: it turns NVSHMEM on whenever the nvidia-nvshmem wheel is importable (it is
#    on the GPU machine), with no switch to say no; hide the wheel from its find_spec call.
#  - for sm_90 it compiles with -rdc=true but adds the device-link step only with NVSHMEM;
#    without it the module fails to import (undefined __cudaRegisterLinkedBinary_*).
#  - intranode build: the mask-buffer definitions above join its sources.
#  - NVSHMEM build: check it picked the wheel; CUDA 13's cccl folder, the rdma-core headers
#    where unpacked above, and the assertion header above join nvcc's flags.
if ! "$PYTHON" - "$SRC" "$BUILD_LIB" "$BUILD_TMP" "$WITH_NVSHMEM" "$NVSHMEM_HOME" "$PRE_INCLUDE" "$EXTRA_NVCC_INCLUDES" <<'EOF'
import importlib.util
import os
import runpy
import sys

import setuptools

src, build_lib, build_tmp, with_nvshmem, nvshmem_home, pre_include, extra_includes = sys.argv[1:8]
with_nvshmem = with_nvshmem == "1"
real_find_spec = importlib.util.find_spec


def find_spec(name, *args, **kwargs):
    return None if name.startswith("nvidia.nvshmem") else real_find_spec(name, *args, **kwargs)


real_setup = setuptools.setup


def setup(**kwargs):
    for ext in kwargs.get("ext_modules", []):
        flags = ext.extra_compile_args
        if with_nvshmem:
            wanted = os.path.realpath(os.path.join(nvshmem_home, "include"))
            if not isinstance(flags, dict) or "-DDISABLE_NVSHMEM" in flags.get("cxx", []) or \
                    wanted not in {os.path.realpath(d) for d in ext.include_dirs}:
                raise SystemExit(f"DeepEP's setup.py did not take NVSHMEM from {nvshmem_home}: "
                                 f"includes {ext.include_dirs}")
            for folder in filter(None, extra_includes.split(":")):
                flags["nvcc"] = flags["nvcc"] + ["-isystem", folder]
            if pre_include:
                flags["nvcc"] = flags["nvcc"] + ["--pre-include", pre_include]
        if isinstance(flags, dict) and "-rdc=true" in flags.get("nvcc", []) and not flags.get("nvcc_dlink"):
            flags["nvcc_dlink"] = ["-dlink"]
        if isinstance(flags, dict) and "-DDISABLE_NVSHMEM" in flags.get("cxx", []):  # with NVSHMEM it defines them
            ext.sources.append(os.path.join(build_tmp, "ll_mask_absent.cpp"))
    return real_setup(**kwargs)


if not with_nvshmem:
    importlib.util.find_spec = find_spec
setuptools.setup = setup
os.chdir(src)
sys.path.insert(0, src)
sys.argv = ["setup.py", "build_ext", "--build-lib", build_lib, "--build-temp", os.path.join(build_tmp, "obj")]
runpy.run_path("setup.py", run_name="__main__")
EOF
then
  fail "DeepEP's setup.py (compile or link; see above)"
fi
rm -rf "$BUILD_LIB/deep_ep"
cp -r "$SRC/deep_ep" "$BUILD_LIB/deep_ep"
if [ "$WITH_NVSHMEM" = 1 ]; then
  printf 'commit=%s\nnvshmem=%s\nnvshmem_home=%s\nqp_check=%s\n' "${commit:-unknown}" "${nvshmem_version:-unknown}" \
    "$NVSHMEM_HOME" "$([ -n "$PRE_INCLUDE" ] && echo dropped || echo kept)" > "$BUILD_LIB/deepep_build_info.txt"
fi

# Import check where a GPU is present (the module needs the driver to load).
if "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  PYTHONPATH=$BUILD_LIB${PYTHONPATH:+:$PYTHONPATH} "$PYTHON" -c \
    "import deep_ep; print('deepep: built ${commit:-}, imports, sm90 features:', deep_ep.Buffer.is_sm90_compiled())" \
    || fail "the built module does not import"
  imported=1
else
  imported=0
fi
if [ "$WITH_NVSHMEM" = 1 ]; then  # only now replace what TARGET held
  rm -rf "$TARGET/deep_ep" "$TARGET"/deep_ep_cpp*.so "$TARGET/deepep_build_info.txt"
  cp -r "$BUILD_LIB"/. "$TARGET"/
  echo "deepep: built ${commit:-} with NVSHMEM ${nvshmem_version:-} into $TARGET$([ "$imported" = 1 ] || echo ' (not imported: no GPU here)')"
elif [ "$imported" = 0 ]; then
  echo "deepep: built ${commit:-} into $TARGET (not imported: no GPU here)"
fi
