"""Where a low-latency call's time goes: host work, each kernel, and the call end to end.

    python -m deepcomm.launch --standalone --nproc-per-node 2 tools/profile_low_latency.py \
        --tokens 128 --hidden 7168 --experts 288 --trace /tmp/ll_trace.json

Per rank, for a dispatch and for a dispatch + combine (a dispatch is combined once): the host
time of one call (perf_counter around calls queued back to back, the GPU left to run behind),
the device time of each kernel (torch profiler), and the time per call end to end on the GPU
(CUDA events around back-to-back calls, as deepcomm.bench times them).
When the host time is the larger, the host sets the pace; else the kernels do.
With --phases, the kernels also stamp each phase of every call (deepcomm.low_latency_phases): when
the first and the last block got to it, from the call's start. --host-functions N names the Python
and native functions the host time goes to (cProfile, rank 0).
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections import defaultdict

import torch
import torch.distributed as dist

import deepcomm
from deepcomm.launch import destroy_distributed, init_distributed
from deepcomm.low_latency_phases import format_phase_times, phase_times
from deepcomm.profiling import host_function_table


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=288)
    parser.add_argument("--num-sms", type=int, default=24)
    parser.add_argument("--fp8", action="store_true", help="quantise to fp8 in dispatch")
    parser.add_argument("--hook", action="store_true",
                        help="dispatch with a receive hook (called at once): the send and the receive as two "
                             "launches, timed apart")
    parser.add_argument("--owner-sums", action="store_true",
                        help="send the weights with the dispatch, so that the combine sums at the owners")
    parser.add_argument("--phases", action="store_true",
                        help="also time each phase of the kernels (their phase clock), per rank")
    parser.add_argument("--host-functions", type=int, default=0, metavar="N",
                        help="also print cProfile's N functions with the most host time (rank 0's calls)")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--trace", default=None, help="write rank 0's Chrome trace here")
    return parser.parse_args(argv)


def host_us(fn, iters: int) -> float:
    """Median host µs per call, calls queued back to back (the GPU may run behind)."""
    samples = []
    for _ in range(iters):
        start = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - start) / 1e3)
    torch.cuda.synchronize()
    return statistics.median(samples)


def device_us(fn, iters: int) -> float:
    """Median µs per call between CUDA events around back-to-back calls."""
    torch.cuda.synchronize()
    dist.barrier()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in events)


def kernel_name(name: str) -> str:
    """``dispatch_send_kernel`` out of a kernel's name as the profiler gives it (demangled, or mangled
    as for kernels in an anonymous namespace: ``..._cu_6a66627220dispatch_send_kernelILN...``)."""
    found = re.findall(r"([a-z_]+_kernel)", name)
    base = found[0] if found else name[:40]
    # dispatch_kernel<payload, send, receive>: a launch of one phase (a receive hook) is named for it.
    flags = re.search(r"Lb([01])ELb([01])E", name) or re.search(r"(true|false), (true|false)>", name)
    if base == "dispatch_kernel" and flags:
        send, receive = (flag in ("1", "true") for flag in flags.groups())
        base += {(True, False): " (send)", (False, True): " (receive)"}.get((send, receive), "")
    return base


def kernel_us(fn, iters: int, trace: str | None) -> dict[str, float]:
    """Device µs per call of each kernel (torch profiler), by kernel name: the median launch times the
    launches per call. Not the mean: the ranks' profilers start at different times, so a rank's first
    kernel can spin milliseconds for a peer still starting its own (seen as 2-56 ms "kernels")."""
    torch.cuda.synchronize()
    dist.barrier()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    durations: dict[str, list[float]] = defaultdict(list)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            durations[kernel_name(event.name)].append(event.device_time)
    if trace:
        prof.export_chrome_trace(trace)
    return per_call_us(durations, iters)


def per_call_us(durations: dict[str, list[float]], iters: int) -> dict[str, float]:
    """Per kernel name, its median launch (µs) times its launches per call."""
    return {name: statistics.median(times) * len(times) / iters for name, times in durations.items()}


def phases_of(comm, fn, iters: int) -> list:
    """The phase clock's medians over ``iters`` back-to-back calls of ``fn`` (one slot per call)."""
    kernels = comm._low_latency_impl()
    torch.cuda.synchronize()
    dist.barrier()
    clock = kernels.record_phases(iters + 2)  # the two areas' epochs may differ by one: n calls span n + 2 slots
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    stamps = clock.cpu().numpy()
    kernels.record_phases(0)
    return phase_times(stamps, list(kernels.kernels.PHASES))


def main(argv=None) -> None:
    args = parse_args(argv)
    init_distributed(600)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", torch.cuda.current_device())
        config = deepcomm.LowLatencyConfig(args.tokens, args.hidden, args.experts, args.topk)
        comm = deepcomm.Communicator(num_sms=args.num_sms, low_latency=config)
        generator = torch.Generator().manual_seed(rank)
        x = torch.randn(args.tokens, args.hidden, generator=generator).to(device, torch.bfloat16)
        topk_idx = torch.rand(args.tokens, args.experts, generator=generator).topk(args.topk, dim=1).indices.to(device)
        weights = torch.rand(args.tokens, args.topk, generator=generator).to(device)

        def dispatch():
            result = comm.low_latency_dispatch(x, topk_idx, args.experts, quantize_fp8=args.fp8,
                                               return_recv_hook=args.hook,
                                               topk_weights=weights if args.owner_sums else None)
            if args.hook:
                result.hook()
            return result

        def round_trip():  # a dispatch is combined once: combine is timed with its dispatch
            out = dispatch()  # its bf16 view of the area is combine's input in place (fp8 rows read as bf16 here)
            return comm.low_latency_combine(comm.low_latency_combine_input(out.handle),
                                            None if args.owner_sums else weights, out.handle)

        rows = {}
        for name, fn in (("dispatch", dispatch), ("round trip", round_trip)):
            for _ in range(5):
                fn()
            rows[name] = (host_us(fn, args.iters), device_us(fn, args.iters),
                          kernel_us(fn, args.iters, args.trace if rank == 0 and name == "dispatch" else None),
                          phases_of(comm, fn, args.iters) if args.phases else [])
        tables = []
        for name, fn in (("dispatch", dispatch), ("round trip", round_trip)) if args.host_functions else ():
            tables.append(host_function_table(fn, args.iters, args.host_functions, rank == 0, name))
            torch.cuda.synchronize()
        everyone: list = [None] * world
        dist.all_gather_object(everyone, rows)
        if rank == 0:
            print(f"low-latency call, {args.tokens} tokens x {args.hidden} hidden, top-{args.topk} of "
                  f"{args.experts}, {world} ranks, {args.num_sms} SMs, {'fp8' if args.fp8 else 'bf16'} (µs, medians)")
            for name in ("dispatch", "round trip"):
                for r, per_rank in enumerate(everyone):
                    host, wall, kernels, _ = per_rank[name]
                    listed = ", ".join(f"{k} {v:.1f}" for k, v in sorted(kernels.items(), key=lambda kv: -kv[1]))
                    print(f"{name:<10} rank {r}: host {host:6.1f}  on the GPU per call {wall:6.1f}  kernels: {listed}")
            for name in ("dispatch", "round trip") if args.phases else ():
                for r, per_rank in enumerate(everyone):
                    print(f"\nphases, {name}, rank {r} (from the call's first block start, medians):")
                    print(format_phase_times(per_rank[name][3]))
            for table in tables:
                print("\n" + table)
        comm.close()
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
