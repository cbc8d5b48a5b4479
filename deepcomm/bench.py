"""Dispatch/combine microbenchmark: ``python -m deepcomm.bench``.

Standalone, it starts ``--nproc`` local processes joined by gloo; under
``torchrun`` it uses the process group torchrun describes (NCCL when every rank
has its own GPU, gloo otherwise). Each stage is timed the same way on every
rank (on a GPU: CUDA events around back-to-back calls after one barrier; on
CPU: barrier, run, wall clock), warm-up first, and the median of the timed
runs is taken; the table shows the slowest rank's median. Every stage is
checked for correctness on its own outputs before timing.

Bandwidth is counted as DeepEP counts it: bytes of the token rows a rank
receives (dispatch) or sends back (combine), over the stage's time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from deepcomm import _ext, cpu_binding, fp8
from deepcomm.bench_low_latency import low_latency_rows
from deepcomm.bench_floor import copy_floor_us, peer_copy_floor_us, ranks_have_own_gpu, rows_kept_local
from deepcomm.checks import expected_round_trip
from deepcomm.communicator import MAX_TIMEOUT_S, TRANSPORTS, Communicator
from deepcomm.events import EventHandle
from deepcomm.intranode import BufferConfig
from deepcomm.launch import destroy_distributed, init_distributed, spawn_local
from deepcomm.layout import get_dispatch_layout
from deepcomm.routing import node_limited_topk
from deepcomm.traffic import boundary_rows

PRESETS = {
    # ../shared/BENCHMARKS.md: the prefill and decode workloads.
    "prefill": dict(tokens=4096, hidden=7168, topk=8, experts=256),
    "decode": dict(tokens=128, hidden=7168, topk=8, experts=288),
    # Small enough for a 2-core CPU over gloo in seconds.
    "small": dict(tokens=512, hidden=2048, topk=8, experts=64),
}


@dataclass
class Row:
    device: str
    path: str
    dtype: str
    stage: str
    tokens: int
    hidden: int
    topk: int
    experts: int
    ranks: int
    ranks_per_node: int
    sms: int | None
    us: float
    gbps: float | None
    bytes_per_rank: int
    floor_us: float | None
    check: str
    note: str = ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deepcomm.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=4, help="local processes when not under torchrun")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="workload; default prefill on GPU, small on CPU")
    parser.add_argument("--tokens", type=int, help="tokens per rank (overrides the preset)")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--topk", type=int)
    parser.add_argument("--experts", type=int)
    parser.add_argument("--ranks-per-node", type=int, default=None)
    parser.add_argument("--routing", choices=("uniform", "node-limited"), default="uniform")
    parser.add_argument("--max-nodes", type=int, default=2, help="M for --routing node-limited")
    parser.add_argument("--dtypes", default="bf16,fp8", help="comma list of bf16, fp8")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--backend", choices=("auto", "intranode", "internode", "reference"), default="auto",
                        help="auto: the kernels and the reference path in the same run on GPU, reference on CPU; "
                             "with --ranks-per-node below the world size: internode, the flat intranode path on "
                             "the same ranks, and the reference path")
    parser.add_argument("--transport", choices=TRANSPORTS, default="auto",
                        help="inter-node leg of the internode path")
    parser.add_argument("--sms", default="24", help="comma list of SM counts to sweep for the kernels")
    parser.add_argument("--overlap", action="store_true", help="also time a matmul alongside dispatch+combine")
    parser.add_argument("--combine", choices=("auto", "pull", "push"), default="auto",
                        help="intranode combine: rows pulled by the SMs, pushed by the copy engines, or "
                             "BufferConfig's default (pull)")
    parser.add_argument("--mode", choices=("normal", "low-latency", "both"), default="normal",
                        help="normal dispatch/combine, the low-latency mode (deepcomm.bench_low_latency), or both")
    parser.add_argument("--plain-launch", action="store_true",
                        help="launch the low-latency kernels plainly (LowLatencyConfig(early_launch=False)), to "
                             "measure what launching them early gains")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", default=None, help="write every row to this file")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a silent peer is an error")
    args = parser.parse_args(argv)
    # Checked here, once, rather than failing inside every spawned rank (or after a long run).
    for name in ("nproc", "tokens", "hidden", "topk", "experts", "ranks_per_node", "max_nodes", "iters"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
    if args.warmup < 0:
        parser.error(f"--warmup: must be >= 0, got {args.warmup}")
    if not 0 < args.timeout <= MAX_TIMEOUT_S:
        parser.error(f"--timeout: must be a positive number of seconds up to {MAX_TIMEOUT_S:g}, got {args.timeout}")
    try:
        sms = [int(v) for v in str(args.sms).split(",")]
    except ValueError:
        parser.error(f"--sms: expected a comma list of SM counts, got {args.sms!r}")
    if min(sms) < 1:
        parser.error(f"--sms: SM counts must be >= 1, got {args.sms!r}")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or not set(dtypes) <= {"bf16", "fp8"}:
        parser.error(f"--dtypes: expected a comma list of bf16, fp8, got {args.dtypes!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    # The workload as the ranks will resolve it (preset, then overrides), checked here rather than as a
    # traceback from every rank.
    shape = workload(args, args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()))
    world = int(os.environ.get("WORLD_SIZE", args.nproc))
    if shape["topk"] > shape["experts"]:
        parser.error(f"--topk: {shape['topk']} exceeds the {shape['experts']} experts (--experts)")
    if shape["experts"] % world:
        parser.error(f"--experts: {shape['experts']} is not a multiple of the {world} ranks")
    if args.ranks_per_node is not None and world % args.ranks_per_node:
        parser.error(f"--ranks-per-node: {args.ranks_per_node} does not divide the {world} ranks")
    if "fp8" in dtypes and shape["hidden"] % 128:
        parser.error(f"--hidden: fp8 rows need a multiple of 128 channels, got {shape['hidden']} (or --dtypes bf16)")
    if args.json_path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.json_path))):
        parser.error(f"--json: the folder of {args.json_path} does not exist")
    return args


def workload(args: argparse.Namespace, on_cuda: bool) -> dict[str, int]:
    shape = dict(PRESETS[args.preset or ("prefill" if on_cuda else "small")])
    for key in shape:
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    return shape


def make_routing(args, shape, topology, generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, experts, topk = shape["tokens"], shape["experts"], shape["topk"]
    if args.routing == "uniform":
        topk_idx = torch.rand(tokens, experts, generator=generator).topk(topk, dim=1).indices
        topk_weights = torch.rand(tokens, topk, generator=generator)
    else:
        logits = torch.randn(tokens, experts, generator=generator)
        topk_idx, topk_weights = node_limited_topk(
            logits, topk, topology.num_nodes, min(args.max_nodes, topology.num_nodes)
        )
    return topk_idx.to(device), topk_weights.to(device)


class Timer:
    """Times a callable the same way on every rank; returns the slowest rank's median in µs.

    On a GPU: CUDA events around each call on the caller's stream, the calls
    back to back after one barrier (a collective call keeps the ranks in step
    by itself; a barrier before every call would add the ranks' exit skew from
    it to every sample). The interval still counts any time the device idles
    waiting for the host. On CPU: wall clock, a barrier before each call.
    """

    def __init__(self, device: torch.device, warmup: int, iters: int) -> None:
        self.device, self.warmup, self.iters = device, warmup, iters

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        samples = self._device_samples(fn) if self.device.type == "cuda" else self._host_samples(fn)
        median = torch.tensor([statistics.median(samples)], dtype=torch.float64)
        return float(reduce_host(median, dist.ReduceOp.MAX))

    def _device_samples(self, fn: Callable[[], object]) -> list[float]:
        torch.cuda.synchronize(self.device)
        dist.barrier()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self.iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(self.device)
        return [start.elapsed_time(end) * 1e3 for start, end in events]

    def _host_samples(self, fn: Callable[[], object]) -> list[float]:
        samples = []
        for _ in range(self.iters):
            dist.barrier()
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e6)
        return samples


def reduce_host(values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a small CPU tensor over any backend (NCCL only takes CUDA tensors)."""
    if dist.get_backend() == "nccl":
        values = values.cuda()
    dist.all_reduce(values, op=op)
    return values.cpu()


def gather_host(values: torch.Tensor) -> torch.Tensor:
    """Every rank's copy of a small CPU tensor, stacked in rank order."""
    on = values.cuda() if dist.get_backend() == "nccl" else values
    parts = [torch.empty_like(on) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, on)
    return torch.stack(parts).cpu()


def all_ok(ok: bool) -> str:
    failed = int(reduce_host(torch.tensor([0 if ok else 1])))
    return "ok" if failed == 0 else f"FAILED on {failed} rank(s)"


def mean_over_ranks(value: float) -> float:
    return float(reduce_host(torch.tensor([value], dtype=torch.float64))) / dist.get_world_size()


def choose_paths(args: argparse.Namespace, on_cuda: bool) -> list[str]:
    if args.backend != "auto":
        return [args.backend]
    if not (on_cuda and _ext.available()):
        return ["reference"]
    multi_node = args.ranks_per_node is not None and args.ranks_per_node < dist.get_world_size()
    return ["internode", "intranode", "reference"] if multi_node else ["intranode", "reference"]


KERNEL_PATHS = ("intranode", "internode")


def make_communicator(path: str, args: argparse.Namespace, shape: dict, num_sms: int) -> Communicator:
    """The communicator of one path; the flat intranode path treats all ranks as one node."""
    push = {"pull": {"push_combine_min_bytes": None}, "push": {"push_combine_min_bytes": 0}}.get(args.combine, {})
    buffer = BufferConfig(shape["tokens"], shape["hidden"], shape["topk"], **push) if path in KERNEL_PATHS else None
    ranks_per_node = dist.get_world_size() if path == "intranode" else args.ranks_per_node
    return Communicator(num_sms=num_sms, ranks_per_node=ranks_per_node, backend=path, buffer=buffer,
                        timeout_s=args.timeout, transport=args.transport if path == "internode" else "auto")


def leg_note(moved: dict[str, int], stage: str, flat_boundary: dict[str, int] | None) -> str:
    """Bytes per leg of one internode call (MB), and what a path without the hierarchy would send across."""
    mb = {k: v / 1e6 for k, v in moved.items()}
    if stage == "dispatch":
        note = (f"boundary {mb['dispatch_boundary']:.2f} MB, nvlink {mb['dispatch_nvlink_direct']:.2f} direct + "
                f"{mb['dispatch_nvlink_forward']:.2f} forwarded MB")
        if flat_boundary:
            note += (f"; flat boundary rows/node-limited rows: per rank {flat_boundary['per_rank_ratio']:.2f}x, "
                     f"per expert {flat_boundary['per_expert_ratio']:.2f}x")
        return note
    return f"boundary {mb['combine_boundary']:.2f} MB, nvlink {mb['combine_nvlink']:.2f} MB"


def run(args: argparse.Namespace) -> list[Row]:
    on_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    shape = workload(args, on_cuda)
    paths = choose_paths(args, on_cuda)
    sms_values = [int(v) for v in str(args.sms).split(",")]
    comms = {path: make_communicator(path, args, shape, sms_values[0]) for path in paths}
    topo = comms["reference"].topology if "reference" in comms else comms[paths[0]].topology
    generator = torch.Generator().manual_seed(args.seed * 1000 + topo.rank)
    x = torch.randn(shape["tokens"], shape["hidden"], generator=generator).to(device, torch.bfloat16)
    topk_idx, topk_weights = make_routing(args, shape, topo, generator, device)
    timer = Timer(device, args.warmup, args.iters)
    device_name = torch.cuda.get_device_name(device) if on_cuda else "cpu"

    def row(path, dtype, stage, sms, us, bytes_per_rank, floor_us, check, note="") -> Row:
        gbps = bytes_per_rank / (us * 1e-6) / 1e9 if us > 0 and bytes_per_rank else None
        ranks_per_node = topo.world_size if path == "intranode" else topo.ranks_per_node
        return Row(device_name, path, dtype, stage, shape["tokens"], shape["hidden"], shape["topk"], shape["experts"],
                   topo.world_size, ranks_per_node, sms, us, gbps, bytes_per_rank, floor_us, check, note)

    rows: list[Row] = []
    layout = get_dispatch_layout(topk_idx, shape["experts"], topo)
    counts_ok = int(layout.num_tokens_per_rank.sum()) == int(layout.is_token_in_rank.sum())
    # tokens_to_rank[s, d]: rows rank s sends rank d; a rank receives its column.
    tokens_to_rank = gather_host(layout.num_tokens_per_rank.to(torch.int64).cpu())
    expected_recv = int(tokens_to_rank[:, topo.rank].sum())
    own_gpu = on_cuda and topo.world_size > 1 and ranks_have_own_gpu(topo.world_size)
    us = timer(lambda: get_dispatch_layout(topk_idx, shape["experts"], topo, validate=False))
    rows.append(row(paths[0] if on_cuda else "reference", "-", "layout", None, us, 0, None, all_ok(counts_ok)))
    flat = None
    if topo.is_multi_node:
        saved = boundary_rows(topk_idx, shape["experts"], topo)
        totals = reduce_host(torch.tensor([saved["per_node"], saved["per_rank"], saved["per_expert"]],
                                          dtype=torch.float64))
        flat = {"per_rank_ratio": float(totals[1] / max(totals[0], 1)),
                "per_expert_ratio": float(totals[2] / max(totals[0], 1))}

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()] if args.mode != "low-latency" else []
    for dtype in dtypes:
        if dtype == "bf16":
            payload, scales, reference_x = x, None, x
        else:  # fp8 (parse_args allows only these two)
            payload, scales = fp8.quantize_fp8(x)
            reference_x = fp8.dequantize_fp8(payload, scales)
        for path in paths:
            comm = comms[path]
            for sms in sms_values if path in KERNEL_PATHS else [None]:
                def dispatch():
                    return comm.dispatch(payload, topk_idx, topk_weights, shape["experts"], x_scales=scales,
                                         num_sms=sms)

                result = dispatch()
                expert_out = result.x if dtype == "bf16" else fp8.dequantize_fp8(result.x, result.x_scales)
                combined = comm.combine(expert_out, result.handle, num_sms=sms)
                expected = expected_round_trip(reference_x, topk_idx, shape["experts"], comm.topology)
                check = all_ok(torch.equal(combined, expected) and result.x.shape[0] == expected_recv)
                row_bytes = payload.shape[1] * payload.element_size() + (scales.shape[1] * 4 if scales is not None else 0)
                recv_bytes = result.x.shape[0] * row_bytes
                combine_bytes = expert_out.shape[0] * expert_out.shape[1] * 2
                floor_sms = sms if sms is not None else sms_values[0]
                dispatch_note = combine_note = ""
                if path == "internode":
                    # The floor is a copy of every byte the hierarchy moves, on both legs.
                    before = comm.traffic()
                    result = dispatch()
                    expert_out = result.x if dtype == "bf16" else fp8.dequantize_fp8(result.x, result.x_scales)
                    middle = comm.traffic()
                    comm.combine(expert_out, result.handle, num_sms=sms)
                    after = comm.traffic()
                    dispatch_moved = {k: middle[k] - before[k] for k in before}
                    combine_moved = {k: after[k] - middle[k] for k in before}
                    recv_bytes = sum(v for k, v in dispatch_moved.items() if k.startswith("dispatch"))
                    combine_bytes = sum(v for k, v in combine_moved.items() if k.startswith("combine"))
                    dispatch_note = leg_note(dispatch_moved, "dispatch", flat)
                    combine_note = leg_note(combine_moved, "combine", None)
                dispatch_floor = combine_floor = None
                if own_gpu:  # only the bytes bound for other GPUs count, stored over NVLink
                    kept = rows_kept_local(tokens_to_rank, comm.topology, path == "internode")
                    dispatch_floor = peer_copy_floor_us(timer, recv_bytes - kept * row_bytes, floor_sms, device)
                    combine_floor = peer_copy_floor_us(timer, combine_bytes - kept * payload.shape[1] * 2,
                                                       floor_sms, device)
                elif on_cuda:
                    dispatch_floor = copy_floor_us(timer, recv_bytes, floor_sms, device)
                    combine_floor = copy_floor_us(timer, combine_bytes, floor_sms, device)
                rows.append(row(path, dtype, "dispatch", sms, timer(dispatch), int(mean_over_ranks(recv_bytes)),
                                dispatch_floor, check, dispatch_note))
                if path == "intranode":  # DeepEP's "cached" mode: the routing of an earlier dispatch reused
                    first = dispatch()
                    # Other bytes than the slot it lands in holds (first's): rows not written would show.
                    changed = payload.view(torch.uint8).flip(1).contiguous().view(payload.dtype)
                    fresh = comm.dispatch(changed, topk_idx, topk_weights, shape["experts"], x_scales=scales,
                                          num_sms=sms)
                    again = comm.dispatch(changed, topk_idx, topk_weights, shape["experts"], x_scales=scales,
                                          num_sms=sms, handle=first.handle)
                    same = torch.equal(again.x.view(torch.uint8), fresh.x.view(torch.uint8)) and (
                        scales is None or torch.equal(again.x_scales, fresh.x_scales))
                    rows.append(row(path, dtype, "dispatch(reused handle)", sms,
                                    timer(lambda: comm.dispatch(payload, topk_idx, topk_weights, shape["experts"],
                                                                x_scales=scales, num_sms=sms, handle=first.handle)),
                                    int(mean_over_ranks(recv_bytes)), dispatch_floor, all_ok(same), "no layout, no counts"))
                # Received rows live until the next dispatches reuse their slot: take a fresh result. The
                # expert outputs sit where combine reads them (as MoELayer.experts leaves them).
                result = dispatch()
                expert_out = result.x
                if dtype != "bf16":
                    expert_out = comm.combine_input(result.handle)
                    expert_out.copy_(fp8.dequantize_fp8(result.x, result.x_scales))
                inputs = [("combine" if dtype == "bf16" else f"combine({dtype} dispatch)", expert_out)]
                if dtype == "bf16" and path in KERNEL_PATHS:  # what the copy into registered memory costs
                    inputs.append(("combine(copied in)", expert_out.clone()))
                if path == "intranode":
                    combine_note = "pushed (copy engines)" if comm._impl.push_plan(result.handle) else "pulled"
                for stage, rows_in in inputs:
                    combine_ok = all_ok(torch.equal(comm.combine(rows_in, result.handle, num_sms=sms), expected))
                    rows.append(row(path, "bf16", stage, sms,
                                    timer(lambda: comm.combine(rows_in, result.handle, num_sms=sms)),
                                    int(mean_over_ranks(combine_bytes)), combine_floor, combine_ok, combine_note))
    if on_cuda and "intranode" in comms and args.overlap:
        rows += overlap_rows(comms["intranode"], x, topk_idx, topk_weights, shape, timer, row, device)
    if args.mode != "normal":
        rows += low_latency_rows(args, shape, topo, x, topk_idx, topk_weights, timer, row, device, own_gpu, sms_values,
                                 all_ok, mean_over_ranks)
    return rows


def overlap_rows(comm, x, topk_idx, topk_weights, shape, timer, row, device) -> list[Row]:
    """A matmul on the caller's stream alongside dispatch + combine on the communication stream."""
    size = 4096
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)

    def matmuls():
        for _ in range(4):
            torch.matmul(a, b)

    def communication():
        result = comm.dispatch(x, topk_idx, topk_weights, shape["experts"])
        comm.combine(result.x, result.handle)

    def both():
        start = EventHandle.record(device)
        matmuls()  # queued on the caller's stream, running while the host goes on
        result = comm.dispatch_async(x, topk_idx, topk_weights, shape["experts"], previous_event=start)
        comm.combine_async(result.x, result.handle, previous_event=result.event)

    t_mm, t_comm, t_both = timer(matmuls), timer(communication), timer(both)
    hidden_share = (t_mm + t_comm - t_both) / min(t_mm, t_comm)
    both_row = row("intranode", "bf16", "matmul || dispatch+combine", comm.num_sms, t_both, 0, None, "ok")
    both_row.note = f"hides {100 * hidden_share:.0f}% of the shorter one"
    return [row("intranode", "bf16", "matmul alone", comm.num_sms, t_mm, 0, None, "ok"),
            row("intranode", "bf16", "dispatch+combine alone", comm.num_sms, t_comm, 0, None, "ok"),
            both_row]


def format_table(rows: list[Row]) -> str:
    header = (f"{'path':<10}{'stage':<27}{'dtype':<6}{'SMs':>4}{'µs':>11}{'GB/s':>9}{'MB/rank':>9}"
              f"{'floor µs':>10}{'x floor':>8}  check")
    lines = [header, "-" * len(header)]
    for r in rows:
        gbps = f"{r.gbps:.1f}" if r.gbps is not None else "-"
        floor = f"{r.floor_us:.1f}" if r.floor_us is not None else "-"
        ratio = f"{r.us / r.floor_us:.2f}" if r.floor_us else "-"
        sms = str(r.sms) if r.sms is not None else "-"
        lines.append(f"{r.path:<10}{r.stage:<27}{r.dtype:<6}{sms:>4}{r.us:>11.1f}{gbps:>9}"
                     f"{r.bytes_per_rank / 1e6:>9.2f}{floor:>10}{ratio:>8}  {r.check} {r.note}".rstrip())
    return "\n".join(lines)


def report(args: argparse.Namespace, rows: list[Row]) -> None:
    first = rows[0]
    print(
        f"deepcomm bench: device={first.device} ranks={first.ranks} "
        f"ranks_per_node={first.ranks_per_node} tokens/rank={first.tokens} hidden={first.hidden} "
        f"topk={first.topk} experts={first.experts} routing={args.routing} "
        f"iters={args.iters} (median, slowest rank)"
    )
    print(format_table(rows))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
        print(f"rows written to {args.json_path}")


def _spawned(args: argparse.Namespace) -> None:
    """One of --nproc processes spawned without torchrun (deepcomm.launch.spawn_local)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    if args.device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    _run_and_report(args)


def _run_and_report(args: argparse.Namespace) -> None:
    rows = run(args)
    if dist.get_rank() == 0:
        report(args, rows)
    failed = [r for r in rows if r.check != "ok"]
    if failed:
        raise SystemExit(f"correctness check failed: {[f'{r.stage}/{r.dtype}' for r in failed]}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if args.device == "cpu":
            cpu_binding.bind_from_environment()  # what the launcher asked for (init_distributed does it otherwise)
            dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
        else:
            init_distributed(args.timeout)
        try:
            _run_and_report(args)
        finally:
            destroy_distributed()
        return
    if args.nproc < 1:
        raise SystemExit("--nproc: must be >= 1")
    spawn_local(_spawned, args.nproc, args, timeout_s=args.timeout)


if __name__ == "__main__":
    main()
