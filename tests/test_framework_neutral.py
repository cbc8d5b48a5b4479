"""The C++/CUDA core is framework-neutral (design decision 1): it takes device pointers and streams as
integers, so a process that never imports torch drives it, here with cupy's arrays and streams.

Each check runs in a process of its own that loads ``deepcomm/_C`` by its path (not through the
``deepcomm`` package, which is torch's side) and fails if torch was imported along the way.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from deepcomm import _ext

needs_extension = pytest.mark.skipif(not _ext.available(), reason="extension not built in this install")

LOAD_CORE = """
import ctypes, importlib.machinery, importlib.util, os, sys
# As deepcomm._ext does: the NVSHMEM host library from its wheel first, where the build linked it.
spec = importlib.util.find_spec("nvidia.nvshmem")
for root in (spec.submodule_search_locations or []) if spec else []:
    if os.path.exists(os.path.join(root, "lib", "libnvshmem_host.so.3")):
        ctypes.CDLL(os.path.join(root, "lib", "libnvshmem_host.so.3"), mode=ctypes.RTLD_GLOBAL)
loader = importlib.machinery.ExtensionFileLoader("deepcomm._C", {path!r})
core = importlib.util.module_from_spec(importlib.util.spec_from_loader("deepcomm._C", loader))
loader.exec_module(core)
"""

TORCH_NEVER_IMPORTED = """
assert "torch" not in sys.modules, "torch was imported"
"""

# The layout kernel and the 16-byte copy kernel on cupy memory and a cupy stream, against numpy.
LAYOUT_WITH_CUPY = """
import json
import cupy as cp
import numpy as np

rng = np.random.default_rng(7)
stream = cp.cuda.Stream(non_blocking=True)
checked = []
# Above and below 256 tokens: the kernel's several-block and one-block paths.
for num_tokens, num_topk, num_experts, world, ranks_per_node in ((300, 6, 48, 4, 2), (100, 8, 32, 8, 4)):
    topk = rng.integers(0, num_experts, size=(num_tokens, num_topk)).astype(np.int64)
    topk[rng.random(topk.shape) < 0.2] = -1          # no expert
    topk[rng.random(topk.shape) < 0.02] = num_experts  # out of range: counted, otherwise skipped
    topk[rng.random(topk.shape) < 0.02] = -3           # so is a negative id other than -1
    topk[:20, :num_topk // 2] = 5                      # skewed: many tokens on one expert, repeated within a token
    valid = (topk >= 0) & (topk < num_experts)
    rank = np.where(valid, topk // (num_experts // world), world)
    in_rank = np.zeros((num_tokens, world + 1), bool)
    np.put_along_axis(in_rank, rank, True, axis=1)
    in_rank = in_rank[:, :world]
    expected = {
        "per_rank": in_rank.sum(0),
        "per_node": in_rank.reshape(num_tokens, -1, ranks_per_node).any(-1).sum(0),
        "per_expert": np.bincount(topk[valid], minlength=num_experts),
        "in_rank": in_rank,
        "invalid": np.array([((topk < -1) | (topk >= num_experts)).sum()]),
        "send_pos": np.cumsum(in_rank, 0) - in_rank,
    }
    with stream:
        d_topk = cp.asarray(topk)
        # Poisoned: every element must be written.
        out = {"per_rank": cp.full(world, -7, cp.int32), "per_node": cp.full(world // ranks_per_node, -7, cp.int32),
               "per_expert": cp.full(num_experts, -7, cp.int32), "in_rank": cp.ones((num_tokens, world), cp.bool_),
               "invalid": cp.full(1, -7, cp.int32), "send_pos": cp.full((num_tokens, world), -7, cp.int32)}
        core.dispatch_layout(d_topk.data.ptr, num_tokens, num_topk, num_experts, world, ranks_per_node,
                             out["per_rank"].data.ptr, out["per_node"].data.ptr, out["per_expert"].data.ptr,
                             out["in_rank"].data.ptr, 8, stream.ptr, out["invalid"].data.ptr, out["send_pos"].data.ptr)
    stream.synchronize()
    for name, want in expected.items():
        got = cp.asnumpy(out[name])
        assert np.array_equal(got, want.astype(got.dtype)), (num_tokens, name, got, want)
        checked.append(f"{name}/{num_tokens}")
with stream:
    src = cp.asarray(rng.integers(0, 255, size=(1 << 20) + 48, dtype=np.uint8))  # 1 MiB and 3 units: a partial last round
    dst = cp.zeros_like(src)
    core.copy(dst.data.ptr, src.data.ptr, src.nbytes, 4, stream.ptr)
stream.synchronize()
assert cp.array_equal(dst, src)
checked.append("copy")
print(json.dumps({"checked": checked, "device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode()}))
"""


def _run_without_torch(body: str) -> subprocess.CompletedProcess:
    script = LOAD_CORE.format(path=_ext.extension().__file__) + body + TORCH_NEVER_IMPORTED
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300)


@needs_extension
def test_the_core_loads_and_answers_without_torch():
    out = _run_without_torch('import json\nprint(json.dumps(core.build_info()))\n')
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["version"]


@needs_extension
@pytest.mark.gpu
def test_cupy_drives_the_layout_and_copy_kernels_without_torch():
    pytest.importorskip("cupy")
    out = _run_without_torch(LAYOUT_WITH_CUPY)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.splitlines()[-1])
    names = ["per_rank", "per_node", "per_expert", "in_rank", "invalid", "send_pos"]
    assert result["checked"] == [f"{n}/300" for n in names] + [f"{n}/100" for n in names] + ["copy"]
