"""Profile dispatch + combine with the torch profiler: kernel times and a trace.

    python -m deepcomm.launch --standalone --nproc-per-node 2 tools/profile_dispatch.py \
        --tokens 128 --trace /tmp/dispatch_trace.json
    python -m deepcomm.launch --standalone --nproc-per-node 4 tools/profile_dispatch.py \
        --tokens 4096 --ranks-per-node 2 --dtype fp8 --num-sms 24     # internode, 2 nodes x 2

Rank 0 prints the per-kernel device times (layout, notify, dispatch, combine)
next to the wall-clock time of the whole call, which separates kernel time
from host-side overhead, and writes a Chrome trace (open in Perfetto).

``--host-split`` instead times dispatch calls back to back on the host and
splits each at the notify wait: host work before it (checks, allocations,
launches), the wait, host work after it (result views, handle, events), per
rank (medians). On the intranode backend a second run of calls stamps every
step and prints each stretch per rank. It also prints what single torch calls
the dispatch path makes cost on this host (every rank), which is what decides
how far that host work can shrink, and each piece of the path timed alone.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist

import deepcomm
from deepcomm import _ext, fp8
from deepcomm.events import EventHandle
from deepcomm.intranode import IntranodeHandle
from deepcomm.kernel_common import (DispatchScratch, RoutingSource, check_capacity, check_invalid_ids,
                                    check_slot_sizes, payload_of, recv_layout, recv_row_shape)
from deepcomm.layout import launch_dispatch_layout
from deepcomm.launch import destroy_distributed, init_distributed
from deepcomm.profiling import host_function_table
from deepcomm.routing import node_limited_topk
from deepcomm.streams import CallerStream, CommStreamScope, hand_back
from deepcomm.validation import check_dispatch_inputs


def host_split(stamps: list[tuple[int, int, int, int]]) -> dict[str, float]:
    """Medians in µs over calls of (start, wait entered, wait left, end) perf_counter_ns stamps."""
    if not stamps:
        raise ValueError("stamps: no calls were timed")
    parts = {"before": (0, 1), "wait": (1, 2), "after": (2, 3), "call": (0, 3)}
    return {name: statistics.median(s[b] - s[a] for s in stamps) / 1e3 for name, (a, b) in parts.items()}


def time_each(ops: dict[str, Callable[[], object]], iters: int) -> dict[str, float]:
    """µs per call of each callable, called ``iters`` times back to back after 10 warm-up calls."""
    costs = {}
    for name, op in ops.items():
        for _ in range(10):
            op()
        start = time.perf_counter_ns()
        for _ in range(iters):
            op()
        costs[name] = (time.perf_counter_ns() - start) / iters / 1e3
    return costs


def time_host_ops(device: torch.device, rows: int, world_size: int, iters: int = 2000) -> dict[str, float]:
    """µs per call of the torch operations a dispatch makes on the host, on ``device``."""
    small = torch.empty(64, dtype=torch.int32, device=device)
    region = torch.empty(1 << 20, dtype=torch.uint8, device=device)
    ops = {
        "empty [64] int32": lambda: torch.empty(64, dtype=torch.int32, device=device),
        f"empty [{rows}, {world_size}] int32": lambda: torch.empty(rows, world_size, dtype=torch.int32, device=device),
        "slice": lambda: small[8:16],
        "byte slice + dtype view + shape view": lambda: region[4096:8192].view(torch.int64).view(64, 8),
        "as_strided": lambda: small.as_strided((4, 8), (8, 1), 16),
        "data_ptr": small.data_ptr,
    }
    if device.type == "cuda":
        stream = torch.cuda.Stream(device)
        ops |= {
            "current_stream": lambda: torch.cuda.current_stream(device),
            "record_stream": lambda: small.record_stream(stream),
            "Event() + record": lambda: torch.cuda.Event().record(stream),
            "wait_stream": lambda: stream.wait_stream(torch.cuda.current_stream(device)),
        }
    costs = time_each(ops, iters)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return costs


def time_dispatch_parts(comm, payload, scales, topk_idx, weights, num_experts: int,
                        iters: int = 2000) -> dict[str, float]:
    """µs per call of each piece of an intranode dispatch's host work, run alone on this rank's real inputs.

    The pieces, in the order a call runs them; none of them launches a communication kernel (the
    layout kernel only), so one rank can time them without its peers.
    """
    impl, topology, extension = comm._impl, comm.topology, _ext.extension()
    world, rank, device = topology.world_size, topology.rank, payload.device
    stream, num_tokens, hidden = impl._stream, payload.shape[0], payload.shape[1]
    num_topk = topk_idx.shape[1]
    scratch = DispatchScratch(device, num_tokens, world, topology.num_nodes, num_experts, with_node_rows=False)
    kind = payload_of(payload, False, False)
    row_bytes, scale_cols = recv_row_shape(kind, hidden)
    totals = [num_tokens] * world
    layout = recv_layout(num_tokens, row_bytes, scale_cols, num_topk)

    def scope():  # a synchronous call's: inputs unmarked
        with CommStreamScope(stream, None, (payload, scales, topk_idx, weights), async_finish=False):
            pass

    def counts():
        impl.kernels.read_counts(impl._mailbox_address, world, rank, num_experts // world)

    # How the counts were read before read_counts (numpy views of the mailbox), for comparison in one process.
    numpy_per_expert = impl._mailbox_words[impl.kernels.MAILBOX_RECV_PER_EXPERT :][: impl.kernels.MAX_EXPERTS]

    def counts_numpy():
        matrix = impl._tokens_matrix[:world, :world]
        check_invalid_ids(impl._invalid_ids[:world], num_experts)
        matrix.sum(axis=0).tolist(), matrix[:, rank].tolist()
        numpy_per_expert[: num_experts // world].tolist()

    def finish():
        caller = CallerStream(device.index)
        hand_back((scratch.recv_per_expert,), device, stream, caller, False)

    parts = {
        "check_errors": impl.check_errors,
        "check_dispatch_inputs": lambda: check_dispatch_inputs(payload, scales, topk_idx, weights, num_experts, world,
                                                               device, check_values=False),
        "payload_of + check_capacity": lambda: (payload_of(payload, False, False),
                                                check_capacity(num_tokens, hidden, num_topk, impl.config)),
        "CommStreamScope enter + exit": scope,
        "DispatchScratch": lambda: DispatchScratch(device, num_tokens, world, topology.num_nodes, num_experts, False),
        "layout launch": lambda: launch_dispatch_layout(
            topk_idx, num_experts, topology, 8, stream.cuda_stream, scratch.ptr["per_rank"], scratch.ptr["per_node"],
            scratch.ptr["layout_per_expert"], scratch.ptr["is_token_in_rank"], scratch.ptr["num_invalid"],
            scratch.ptr["send_pos"]),
        # A stream ordered after itself returns at once: the cost of crossing into the extension.
        "an extension call (no work)": lambda: extension.order_streams(stream.cuda_stream, stream.cuda_stream),
        "counts from the mailbox (read_counts)": counts,
        "the same by numpy views (before read_counts)": counts_numpy,
        "check_slot_sizes": lambda: check_slot_sizes(totals, kind, hidden, num_topk, impl.slot_bytes, rank),
        "result views": lambda: impl._views(0, layout, num_tokens, hidden, num_topk, kind, scratch.recv_per_expert),
        "RoutingSource + handle": lambda: IntranodeHandle(num_tokens, hidden, num_tokens, scratch, 1, id(impl),
                                                          RoutingSource.of(topk_idx, num_experts, 1), None),
        "hand_back (record_stream, event, order)": finish,
        "EventHandle.record alone": lambda: EventHandle.record(device, stream),
    }
    costs = time_each(parts, iters)
    torch.cuda.synchronize(device)
    return costs


# What --host-split stamps inside an intranode dispatch: methods of the communicator, the names its
# module calls, and the kernel launches of its extension context (entry and exit of each).
STAMPED_METHODS = ("_take_scratch", "_new_scratch", "_wait_notify", "_views", "_finish")
STAMPED_FUNCTIONS = ("launch_dispatch_layout", "hand_back", "check_slot_sizes")
STAMPED_LAUNCHES = ("notify", "dispatch")


class _StampedContext:
    """The extension context with its kernel launches stamped; everything else passes through."""

    def __init__(self, ctx, stamped: Callable) -> None:
        self._ctx, self._stamped = ctx, stamped

    def __getattr__(self, name: str):
        attr = getattr(self._ctx, name)
        return self._stamped(name, attr) if name in STAMPED_LAUNCHES else attr


def segments(marks: list[tuple[str, int]]) -> dict[str, int]:
    """ns between consecutive (name, perf_counter_ns) marks of one call, named by what ran there.

    A mark is ``name`` at a function's entry and ``name + " end"`` at its exit: the stretch from
    the one to the other is that function (``"X"``); any other stretch is the Python between two
    stamped points (``"X end … Y"``). A name repeated within a call gets its count appended.
    """
    out: dict[str, int] = {}
    for (first, t0), (second, t1) in zip(marks, marks[1:]):
        name = first if second == first + " end" else f"{first} … {second}"
        key, n = name, 1
        while key in out:
            n += 1
            key = f"{name} #{n}"
        out[key] = t1 - t0
    return out


def run_host_split(comm, payload, scales, topk_idx, weights, num_experts: int,
                   iters: int) -> tuple[dict[str, float], dict[str, float]]:
    """Dispatch ``iters`` times back to back, twice: stamped around the notify wait only (the split,
    ``host_split``), then, on the intranode backend, around every step in STAMPED_* too (the median µs
    of each stretch, ``segments``, in call order; empty on other backends). Two passes, because each
    stamp costs host time that the split should not count.
    """
    import deepcomm.intranode as intranode_module

    detailed = isinstance(comm._impl, intranode_module.IntranodeCommunicator)
    calls = _stamped_calls(comm, (payload, topk_idx, weights, num_experts, scales), iters, detailed=False)
    stamps = []
    for marks in calls:
        waits = [t for name, t in marks if name.startswith("_wait_notify")]
        if len(waits) == 2:
            stamps.append((marks[0][1], waits[0], waits[1], marks[-1][1]))
    stretches: dict[str, list[int]] = {}
    if detailed:
        for marks in _stamped_calls(comm, (payload, topk_idx, weights, num_experts, scales), iters, detailed=True):
            for name, ns in segments(marks).items():
                stretches.setdefault(name, []).append(ns)
    # Over the calls that had the stretch (a call that found a spare scratch skips one allocation).
    return host_split(stamps), {name: statistics.median(ns) / 1e3 for name, ns in stretches.items()}


def _stamped_calls(comm, args: tuple, iters: int, detailed: bool) -> list[list[tuple[str, int]]]:
    """The (name, perf_counter_ns) marks of ``iters`` dispatch calls: around the notify wait, and with
    ``detailed`` around every STAMPED_* step of the intranode backend. Everything is restored after."""
    import deepcomm.intranode as intranode_module

    impl, marks = comm._impl, []
    payload, topk_idx, weights, num_experts, scales = args

    def stamped(name: str, fn: Callable) -> Callable:
        def wrapper(*a, **kw):
            marks.append((name, time.perf_counter_ns()))
            try:
                return fn(*a, **kw)
            finally:
                marks.append((name + " end", time.perf_counter_ns()))
        return wrapper

    methods = STAMPED_METHODS if detailed else ("_wait_notify",)
    functions = STAMPED_FUNCTIONS if detailed else ()
    saved_methods = {name: vars(impl).get(name) for name in methods}
    saved_functions = {name: getattr(intranode_module, name) for name in functions}
    saved_ctx = impl.ctx if detailed else None
    calls = []
    try:
        for name in methods:
            setattr(impl, name, stamped(name, getattr(impl, name)))
        for name, fn in saved_functions.items():
            setattr(intranode_module, name, stamped(name, fn))
        if detailed:
            impl.ctx = _StampedContext(saved_ctx, stamped)
        for _ in range(iters):
            marks.clear()
            marks.append(("call", time.perf_counter_ns()))
            comm.dispatch(payload, topk_idx, weights, num_experts, x_scales=scales)
            marks.append(("return", time.perf_counter_ns()))
            calls.append(list(marks))
    finally:
        for name, before in saved_methods.items():
            if before is None:
                vars(impl).pop(name, None)  # the class's method again
            else:
                setattr(impl, name, before)
        for name, fn in saved_functions.items():
            setattr(intranode_module, name, fn)
        if detailed:
            impl.ctx = saved_ctx
    return calls


def profile_host_functions(comm, payload, scales, topk_idx, weights, num_experts: int, iters: int, top: int,
                           profiled: bool) -> str:
    """cProfile's table (self time) of ``iters`` dispatch calls: where the host time goes.

    Every rank dispatches; only the ``profiled`` one runs under cProfile.
    """
    return host_function_table(lambda: comm.dispatch(payload, topk_idx, weights, num_experts, x_scales=scales),
                               iters, top, profiled, "dispatch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--ranks-per-node", type=int, default=None,
                        help="below the world size: the internode path, node-limited routing to 2 nodes")
    parser.add_argument("--dtype", choices=("bf16", "fp8"), default="bf16", help="dispatch payload")
    parser.add_argument("--num-sms", type=int, default=None)
    parser.add_argument("--trace", default=None)
    parser.add_argument("--host-split", action="store_true",
                        help="split dispatch's host time at the notify wait, and per step (intranode); time single "
                             "torch calls and the path's pieces")
    parser.add_argument("--host-functions", type=int, default=0, metavar="N",
                        help="with --host-split: also the N Python and native functions of dispatch that take "
                             "the most host time (cProfile over the timed calls; rank 0)")
    args = parser.parse_args()
    init_distributed()
    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device())
    sms = {} if args.num_sms is None else {"num_sms": args.num_sms}
    comm = deepcomm.Communicator(buffer=deepcomm.BufferConfig(args.tokens, args.hidden, args.topk),
                                 ranks_per_node=args.ranks_per_node, **sms)
    x = torch.randn(args.tokens, args.hidden, device=device).to(torch.bfloat16)
    if comm.topology.is_multi_node:
        logits = torch.randn(args.tokens, args.experts, device=device)
        topk_idx, weights = node_limited_topk(logits, args.topk, comm.topology.num_nodes, 2)
    else:
        topk_idx = torch.rand(args.tokens, args.experts, device=device).topk(args.topk, dim=1).indices
        weights = torch.rand(args.tokens, args.topk, device=device)
    payload, scales = fp8.quantize_fp8(x) if args.dtype == "fp8" else (x, None)

    def step():
        with torch.profiler.record_function("deepcomm.dispatch"):
            result = comm.dispatch(payload, topk_idx, weights, args.experts, x_scales=scales)
        expert_out = result.x if scales is None else fp8.dequantize_fp8(result.x, result.x_scales)
        with torch.profiler.record_function("deepcomm.combine"):
            comm.combine(expert_out, result.handle)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    dist.barrier()
    if args.host_split:
        split, steps = run_host_split(comm, payload, scales, topk_idx, weights, args.experts, max(args.iters, 100))
        if args.host_functions:
            table = profile_host_functions(comm, payload, scales, topk_idx, weights, args.experts,
                                           max(args.iters, 100), args.host_functions, profiled=rank == 0)
            if rank == 0:
                print(table)
        torch.cuda.synchronize()
        parts = (time_dispatch_parts(comm, payload, scales, topk_idx, weights, args.experts)
                 if comm.backend == "intranode" else {})
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, (split, time_host_ops(device, args.tokens, dist.get_world_size()), steps))
        if rank == 0:
            print(f"backend={comm.backend} ranks={dist.get_world_size()} tokens={args.tokens} dispatch={args.dtype}: "
                  "host µs per dispatch, back to back (medians)")
            for r, (split, _, _) in enumerate(per_rank):
                print(f"  rank {r}: call {split['call']:.1f} = before {split['before']:.1f} + wait "
                      f"{split['wait']:.1f} + after {split['after']:.1f}")
            if per_rank[0][2]:
                ranks = " / ".join(str(r) for r in range(len(per_rank)))
                print(f"host µs per stretch of those calls (medians), rank {ranks}; \"X\" is inside X, "
                      "\"X end … Y\" the Python between:")
                for name in per_rank[0][2]:
                    print(f"  {name:<52} " + " / ".join(f"{steps.get(name, 0.0):.2f}" for _, _, steps in per_rank))
            if parts:
                print(f"host µs per piece of the dispatch path, each alone (rank 0; {sum(parts.values()):.1f} in all):")
                for name, us in parts.items():
                    print(f"  {name:<40} {us:7.2f}")
            # Every rank's column: a rank whose plain torch calls are slower runs on a slower CPU.
            print("host µs per torch call, rank " + " / ".join(str(r) for r in range(len(per_rank))) + ":")
            for name in per_rank[0][1]:
                print(f"  {name:<40} " + " / ".join(f"{ops[name]:.2f}" for _, ops, _ in per_rank))
        dist.barrier()
        destroy_distributed()
        return
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.iters):
            step()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - start) / args.iters * 1e6
    if rank == 0:
        print(f"backend={comm.backend} ranks={dist.get_world_size()} tokens={args.tokens} dispatch={args.dtype}: "
              f"{wall_us:.1f} µs per dispatch+combine (wall clock)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14))
        if args.trace:
            prof.export_chrome_trace(args.trace)
    dist.barrier()
    destroy_distributed()


if __name__ == "__main__":
    main()
