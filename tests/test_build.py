"""The build: the extension compiles where nvcc exists, links no libcuda, and the
package degrades to pure Python (saying why) where the extension is missing."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import deepcomm
from deepcomm import _ext

ROOT = Path(__file__).resolve().parent.parent
NVCC_PRESENT = shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")
PURE_PYTHON = os.environ.get("DEEPCOMM_NO_EXTENSION") == "1"

needs_extension = pytest.mark.skipif(not _ext.available(), reason="extension not built in this install")


@pytest.mark.skipif(not NVCC_PRESENT or PURE_PYTHON, reason="no CUDA compiler, or pure-Python install asked for")
def test_extension_is_built_where_nvcc_exists():
    assert _ext.available(), deepcomm.features()["extension_error"]


@needs_extension
def test_build_info_describes_the_build():
    build = deepcomm.features()["build"]
    assert build["version"] == deepcomm.__version__
    assert build["cuda_archs"] == os.environ.get("DEEPCOMM_CUDA_ARCHS", "90a")
    assert build["cuda_compiled"].startswith("13.") or build["cuda_compiled"].startswith("12.")


@needs_extension
def test_nvshmem_headers_match_the_installed_library():
    build = deepcomm.features()["build"]
    if not build["nvshmem"]:
        pytest.skip("built without NVSHMEM")
    assert build["nvshmem"] == build["nvshmem_linked"]
    assert importlib.metadata.version("nvidia-nvshmem-cu13").startswith(build["nvshmem"])


@needs_extension
@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf not installed")
def test_extension_has_no_link_time_libcuda_dependency():
    module = _ext.extension().__file__
    dynamic = subprocess.run(["readelf", "-d", module], capture_output=True, text=True, check=True).stdout
    needed = [line for line in dynamic.splitlines() if "NEEDED" in line]
    assert needed, dynamic
    assert not any("libcuda.so" in line for line in needed), needed


@needs_extension
def test_queries_work_without_a_gpu():
    core = _ext.extension()
    count = core.device_count()
    assert count >= 0
    if count == 0:
        assert core.driver_version() == 0
        with pytest.raises(ValueError, match="device"):
            core.device_info(0)
    assert core.runtime_version() > 0


@needs_extension
def test_nvshmem_calls_before_init_raise():
    core = _ext.extension()
    if not hasattr(core, "nvshmem"):
        pytest.skip("built without NVSHMEM")
    assert not core.nvshmem.initialized()
    with pytest.raises(RuntimeError, match="not initialised"):
        core.nvshmem.my_pe()
    with pytest.raises(RuntimeError, match="^peer_pointer: NVSHMEM is not initialised"):
        core.nvshmem.peer_pointer(0, 0)


@needs_extension
def test_bad_ipc_handle_is_rejected():
    with pytest.raises(ValueError, match="handle"):
        _ext.extension().ipc_open(b"short", 0)


def test_pure_python_install_reports_what_is_missing():
    """With deepcomm._C unimportable, the package imports, says why, and the reference path works."""
    script = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "deepcomm._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
import torch, deepcomm
f = deepcomm.features()
assert f["extension"] is False and "blocked for the test" in f["extension_error"], f
assert f["reference"] is True
try:
    deepcomm._ext.extension()
except deepcomm.FeatureUnavailable as e:
    assert "pip install" in str(e)
else:
    raise AssertionError("extension() should raise")
layout = deepcomm.layout.get_dispatch_layout(torch.tensor([[0, 3]]), 4, deepcomm.topology.Topology(0, 2, 1))
assert layout.num_tokens_per_rank.tolist() == [1, 1]
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT / "tests")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_setup_skips_the_extension_without_a_cuda_compiler(tmp_path):
    """setup.py's decision, run against an empty PATH and no CUDA_HOME."""
    script = f"""
import os, sys
os.environ["PATH"] = "/nonexistent"
os.environ.pop("CUDA_HOME", None)
os.environ.pop("CUDACXX", None)
sys.argv = ["setup.py", "--version"]
import runpy, importlib.util
spec = importlib.util.spec_from_file_location("deepcomm_setup", {str(ROOT / "setup.py")!r})
module = importlib.util.module_from_spec(spec)
import setuptools
setuptools.setup = lambda **kw: None   # load the helpers without running a build
spec.loader.exec_module(module)
import os.path
real_isfile = os.path.isfile
os.path.isfile = lambda p: False if p.endswith("nvcc") else real_isfile(p)
print(module.find_nvcc())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None"


def test_kernel_error_vocabulary_matches_python():
    """The codes the kernels write into the mailbox are the ones Python turns into messages."""
    from deepcomm import kernel_common as kc

    if not _ext.available():
        pytest.skip("extension not built")
    errors = _ext.extension().intranode.ERRORS
    assert errors == {"timeout": kc.ERROR_TIMEOUT, "size_mismatch": kc.ERROR_SIZE_MISMATCH,
                      "invalid_ids": kc.ERROR_INVALID_IDS, "mode_mismatch": kc.ERROR_MODE_MISMATCH,
                      "shape_mismatch": kc.ERROR_SHAPE_MISMATCH,
                      "combine_mode_mismatch": kc.ERROR_COMBINE_MODE_MISMATCH}
    core = _ext.extension()
    for name, stage in {**core.intranode.STAGES, **core.low_latency.STAGES}.items():
        assert kc.STAGE_NAMES[stage] == name
    words = np.zeros(8, dtype=np.int64)
    words[:3] = (kc.ERROR_MODE_MISMATCH, 1, 3)
    failure = kc.mailbox_failure(words, 0, 1.0, np.zeros(2, dtype=np.int64))
    assert failure is not None and "disagree on reusing a handle" in str(failure) and "rank 3" in str(failure)
    words[:3] = (kc.ERROR_SHAPE_MISMATCH, 1, 2)
    failure = kc.mailbox_failure(words, 0, 1.0, np.zeros(2, dtype=np.int64))
    assert failure.peer == 2 and failure.stage == "notify" and "rank 2's dispatch differs" in str(failure)


def test_a_call_shape_word_tells_every_field_apart():
    """Every field the intranode notify compares changes the word; how fp8 rows were made does not."""
    from deepcomm import kernel_common as kc

    base = dict(hidden=7168, num_topk=8, payload=kc.PAYLOAD_BF16, num_experts=256, num_blocks=24)
    word = kc.call_shape(**base)
    changes = [dict(hidden=7169), dict(num_topk=9), dict(payload=kc.PAYLOAD_FP8), dict(num_experts=257),
               dict(num_blocks=25), dict(hidden=(1 << 24) - 1), dict(num_blocks=(1 << 15) - 1)]
    words = {kc.call_shape(**(base | change)) for change in changes}
    assert word not in words and len(words) == len(changes)
    fp8_words = {kc.call_shape(**(base | dict(payload=p)))
                 for p in (kc.PAYLOAD_FP8, kc.PAYLOAD_BF16_TO_FP8, kc.PAYLOAD_BF16_TO_FP8_POW2)}
    assert len(fp8_words) == 1
    with pytest.raises(ValueError, match="^hidden size: 16777216 does not fit"):
        kc.call_shape(**(base | dict(hidden=1 << 24)))
    with pytest.raises(ValueError, match="^num_sms: -1 does not fit"):
        kc.call_shape(**(base | dict(num_blocks=-1)))


@needs_extension
def test_read_counts_gives_what_the_numpy_views_of_the_mailbox_give():
    """intranode.read_counts (host memory only): the counts a dispatch reads after its notify wait."""
    from deepcomm.kernel_common import invalid_ids_error

    kernels = _ext.extension().intranode
    max_ranks, world, rank, experts_per_rank = kernels.MAX_RANKS, 4, 2, 32
    words = np.zeros(kernels.MAILBOX_BYTES // 8, dtype=np.int64)
    rng = np.random.default_rng(0)
    matrix = words[kernels.MAILBOX_TOKENS_MATRIX :][: max_ranks * max_ranks].reshape(max_ranks, max_ranks)
    matrix[:] = rng.integers(0, 1000, matrix.shape)  # beyond the world too: must be left out
    per_expert = words[kernels.MAILBOX_RECV_PER_EXPERT :][: kernels.MAX_EXPERTS]
    per_expert[:] = rng.integers(0, 50, per_expert.shape)
    invalid = words[kernels.MAILBOX_INVALID_IDS :][:max_ranks]
    invalid[world:] = 7  # outside the world: not a culprit
    address = words.ctypes.data

    culprit, count, totals, from_ranks, experts = kernels.read_counts(address, world, rank, experts_per_rank)
    assert (culprit, count) == (-1, 0)
    assert totals == matrix[:world, :world].sum(axis=0).tolist()
    assert from_ranks == matrix[:world, rank].tolist()
    assert experts == per_expert[:experts_per_rank].tolist()

    invalid[1], invalid[3] = 5, 2
    culprit, count, *_ = kernels.read_counts(address, world, rank, experts_per_rank)
    assert (culprit, count) == (1, 5)
    assert "rank 1 passed 5 invalid ids" in str(invalid_ids_error(culprit, count, 256))
    bad = (((0, 0, 1), "num_ranks"), ((max_ranks + 1, 0, 1), "num_ranks"), ((world, world, 1), "rank"),
           ((world, 0, -1), "experts_per_rank"), ((world, 0, kernels.MAX_EXPERTS + 1), "experts_per_rank"))
    for args, name in bad:
        with pytest.raises(ValueError, match=name):
            kernels.read_counts(address, *args)
    with pytest.raises(ValueError, match="mailbox"):
        kernels.read_counts(0, world, rank, experts_per_rank)
