"""Dispatch/combine microbenchmark: ``python -m deepcomm.bench``.

Standalone, it starts ``--nproc`` local processes joined by gloo; under
``torchrun`` it uses the process group torchrun describes (NCCL when every rank
has its own GPU, gloo otherwise). Each stage is timed the same way on every
rank (barrier, run, wait for the device), warm-up first, and the median of the
timed runs is taken; the table shows the slowest rank's median. Every stage is
checked for correctness on its own outputs before timing.

Bandwidth is counted as DeepEP counts it: bytes of the token rows a rank
receives (dispatch) or sends back (combine), over the stage's time.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from deepcomm import fp8
from deepcomm.checks import expected_round_trip
from deepcomm.communicator import Communicator
from deepcomm.layout import get_dispatch_layout
from deepcomm.routing import node_limited_topk

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
    parser.add_argument("--num-sms", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", default=None, help="write every row to this file")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a silent peer is an error")
    return parser.parse_args(argv)


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
    """Times a callable the same way on every rank; returns the slowest rank's median in µs."""

    def __init__(self, device: torch.device, warmup: int, iters: int) -> None:
        self.device, self.warmup, self.iters = device, warmup, iters

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        samples = []
        for _ in range(self.iters):
            self._sync()
            dist.barrier()
            start = time.perf_counter()
            fn()
            self._sync()
            samples.append(time.perf_counter() - start)
        median = torch.tensor([statistics.median(samples) * 1e6], dtype=torch.float64)
        return float(reduce_host(median, dist.ReduceOp.MAX))


def reduce_host(values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a small CPU tensor over any backend (NCCL only takes CUDA tensors)."""
    if dist.get_backend() == "nccl":
        values = values.cuda()
    dist.all_reduce(values, op=op)
    return values.cpu()


def all_ok(ok: bool) -> str:
    failed = int(reduce_host(torch.tensor([0 if ok else 1])))
    return "ok" if failed == 0 else f"FAILED on {failed} rank(s)"


def mean_over_ranks(value: float) -> float:
    return float(reduce_host(torch.tensor([value], dtype=torch.float64))) / dist.get_world_size()


def run(args: argparse.Namespace) -> list[Row]:
    on_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    shape = workload(args, on_cuda)
    comm = Communicator(num_sms=args.num_sms, ranks_per_node=args.ranks_per_node, backend="reference")
    topo = comm.topology
    generator = torch.Generator().manual_seed(args.seed * 1000 + topo.rank)
    x = torch.randn(shape["tokens"], shape["hidden"], generator=generator).to(device, torch.bfloat16)
    topk_idx, topk_weights = make_routing(args, shape, topo, generator, device)
    timer = Timer(device, args.warmup, args.iters)
    device_name = torch.cuda.get_device_name(device) if on_cuda else "cpu"

    def row(dtype: str, stage: str, us: float, bytes_per_rank: int, check: str) -> Row:
        gbps = bytes_per_rank / (us * 1e-6) / 1e9 if us > 0 and bytes_per_rank else None
        return Row(device_name, comm.backend, dtype, stage, shape["tokens"], shape["hidden"], shape["topk"],
                   shape["experts"], topo.world_size, topo.ranks_per_node, None, us, gbps, bytes_per_rank, None, check)

    rows: list[Row] = []
    layout = get_dispatch_layout(topk_idx, shape["experts"], topo)
    counts_ok = int(layout.num_tokens_per_rank.sum()) == int(layout.is_token_in_rank.sum())
    # Rows this rank must receive: what every rank's layout sends it.
    tokens_to_rank = reduce_host(layout.num_tokens_per_rank.to(torch.int64).cpu())
    expected_recv = int(tokens_to_rank[topo.rank])
    us = timer(lambda: get_dispatch_layout(topk_idx, shape["experts"], topo, validate=False))
    rows.append(row("-", "layout", us, 0, all_ok(counts_ok)))

    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        if dtype == "bf16":
            payload, scales, reference_x = x, None, x
        elif dtype == "fp8":
            payload, scales = fp8.quantize_fp8(x)
            reference_x = fp8.dequantize_fp8(payload, scales)
        else:
            raise SystemExit(f"--dtypes: unknown dtype {dtype!r} (bf16, fp8)")

        def dispatch():
            return comm.dispatch(payload, topk_idx, topk_weights, shape["experts"], x_scales=scales)

        result = dispatch()
        expert_out = result.x if dtype == "bf16" else fp8.dequantize_fp8(result.x, result.x_scales)
        combined = comm.combine(expert_out, result.handle)
        expected = expected_round_trip(reference_x, topk_idx, shape["experts"], topo)
        check = all_ok(torch.equal(combined, expected) and result.x.shape[0] == expected_recv)
        row_bytes = payload.shape[1] * payload.element_size() + (scales.shape[1] * 4 if scales is not None else 0)
        dispatch_bytes = int(mean_over_ranks(result.x.shape[0] * row_bytes))
        rows.append(row(dtype, "dispatch", timer(dispatch), dispatch_bytes, check))
        combine_bytes = int(mean_over_ranks(expert_out.shape[0] * expert_out.shape[1] * 2))
        rows.append(row("bf16", f"combine({dtype} dispatch)" if dtype != "bf16" else "combine",
                        timer(lambda: comm.combine(expert_out, result.handle)), combine_bytes, check))
    return rows


def format_table(rows: list[Row]) -> str:
    header = f"{'stage':<22}{'dtype':<7}{'µs':>12}{'GB/s':>10}{'MB/rank':>10}  check"
    lines = [header, "-" * len(header)]
    for r in rows:
        gbps = f"{r.gbps:.2f}" if r.gbps is not None else "-"
        lines.append(f"{r.stage:<22}{r.dtype:<7}{r.us:>12.1f}{gbps:>10}{r.bytes_per_rank / 1e6:>10.2f}  {r.check}")
    return "\n".join(lines)


def report(args: argparse.Namespace, rows: list[Row]) -> None:
    first = rows[0]
    print(
        f"deepcomm bench: path={first.path} device={first.device} ranks={first.ranks} "
        f"ranks_per_node={first.ranks_per_node} tokens/rank={first.tokens} hidden={first.hidden} "
        f"topk={first.topk} experts={first.experts} routing={args.routing} "
        f"iters={args.iters} (median, slowest rank)"
    )
    print(format_table(rows))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
        print(f"rows written to {args.json_path}")


def _worker(rank: int, world_size: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=args.timeout))
    try:
        _run_and_report(args)
    finally:
        dist.destroy_process_group()


def _run_and_report(args: argparse.Namespace) -> None:
    rows = run(args)
    if dist.get_rank() == 0:
        report(args, rows)
    failed = [r for r in rows if r.check != "ok"]
    if failed:
        raise SystemExit(f"correctness check failed: {[f'{r.stage}/{r.dtype}' for r in failed]}")


def _init_under_torchrun(args: argparse.Namespace) -> None:
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = args.device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    # NCCL wants one GPU per rank; ranks sharing a GPU (MPS) bootstrap over gloo.
    one_gpu_per_rank = use_cuda and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    backend = "nccl" if one_gpu_per_rank else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        _init_under_torchrun(args)
        try:
            _run_and_report(args)
        finally:
            dist.destroy_process_group()
        return
    if args.nproc < 1:
        raise SystemExit("--nproc: must be >= 1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_worker, args=(args.nproc, port, args), nprocs=args.nproc, join=True)


if __name__ == "__main__":
    main()
