"""Named ranges that show up in both torch profiler traces and Nsight Systems timelines.

Every stage the overlap scheduler runs is wrapped in ``stage_range``; the name
``L{layer}/mb{micro_batch}/{stage}`` is what ``deepcomm.trace_analysis`` (and
``tools/overlap_report.py``) read back to attribute kernels to layers,
micro-batches and stages. Streams get names too (``name_stream``), so a
timeline says which row is compute and which is communication.
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import pstats
from typing import Callable

import torch
import torch.distributed as dist


def stage_name(layer: int, micro_batch: int, stage: str, backward: bool = False) -> str:
    return f"L{layer}/mb{micro_batch}/{stage}{'.backward' if backward else ''}"


@contextlib.contextmanager
def stage_range(name: str):
    """A ``record_function`` range (torch profiler) and, on a GPU, an NVTX range (nsys) of the same name."""
    nvtx = torch.cuda.is_available() and torch.cuda.is_initialized()
    with torch.profiler.record_function(name):
        if nvtx:
            torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            if nvtx:
                torch.cuda.nvtx.range_pop()


def name_stream(stream: torch.cuda.Stream | None, name: str) -> None:
    """Label a CUDA stream in Nsight Systems (NVTX); a no-op without the extension or a stream."""
    from deepcomm import _ext

    if stream is not None and _ext.available():
        _ext.extension().name_stream(stream.cuda_stream, name)


def host_function_table(call: Callable[[], object], iters: int, top: int, profiled: bool, what: str) -> str:
    """cProfile's table (self time, ``top`` rows) of ``iters`` calls of ``call``: where the host time goes.

    Collective: every rank makes the calls (after a barrier); only where ``profiled`` do they run under
    cProfile, and only there is the table returned ("" elsewhere).
    """
    profile = cProfile.Profile()
    dist.barrier()
    if profiled:
        profile.enable()
    for _ in range(iters):
        call()
    if not profiled:
        return ""
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(top)
    return f"host functions of {iters} {what} calls (cProfile; its own cost inflates every row):\n" + out.getvalue()
