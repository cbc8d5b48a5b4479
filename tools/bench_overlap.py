"""Step time of one MoE transformer block, plain against two overlapped micro-batches.

    python -m deepcomm.launch --standalone --nproc-per-node 2 --sm-share 50 tools/bench_overlap.py \
        --json block.json --trace-dir traces/

Each rank runs a DeepSeek-V3-width block (hidden 7168, 256 experts top-8, expert width 2048,
one shared expert; attention is plain multi-head attention, not MLA) on a prefill batch. --experts
changes the routed experts' count (16 on 2 ranks: DeepSeek-V3's 8 experts per rank at EP32, whose
weights the grouped GEMM no longer spends its time reading), --split the micro-batches' sizes. Rows,
all timed the same way (slowest rank's median, deepcomm.bench.Timer):

- plain: ``block.forward`` on the whole batch (communication waits for compute and back);
- overlapped: two micro-batches through deepcomm.overlap's scheduler, matmuls capped at
  --compute-sms SMs so the communication kernels find theirs;
- compute only: the same two micro-batches' attention, routing, shared and routed experts and
  residuals, with the dispatched rows and combined outputs taken from an earlier run, on every SM;
- communication only: the same two micro-batches' dispatch and combine, nothing else.

--decode runs an inference step through the low-latency mode instead (``TransformerBlock.decode``: no
host wait; the two micro-batches' results in its two receive areas): --tokens new tokens a rank, one a
sequence unless --seq says otherwise, attention over them alone (no KV cache). Each call only sends
when its stage runs and its receive is queued by the stage that reads it (receive hooks: no SM waits for
the peers in between); --no-hooks sends and receives in one kernel. --decode-experts packed runs the
experts on the received rows only (``MoEConfig.decode_experts``; padded: over whole receive regions).

Then --trace-steps overlapped steps are recorded with the torch profiler, and
deepcomm.trace_analysis says which share of the communication kernels' time ran under compute
kernels, in the median step (the same step on every rank), also counted from each call's last
rank arriving.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket

import torch
import torch.distributed as dist

from deepcomm import autograd, moe, overlap, trace_analysis
from deepcomm.bench import Timer
from deepcomm.communicator import Communicator
from deepcomm.intranode import BufferConfig
from deepcomm.low_latency import LowLatencyConfig
from deepcomm.launch import destroy_distributed, init_distributed, mps_running


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per rank (batch x sequence; default 4096, with --decode 128)")
    parser.add_argument("--seq", type=int, default=None,
                        help="sequence length; batch = tokens / seq (default 1024, with --decode 1)")
    parser.add_argument("--decode", action="store_true", help="an inference step through the low-latency mode")
    parser.add_argument("--no-hooks", dest="recv_hooks", action="store_false",
                        help="with --decode: each call sends and receives in one kernel")
    parser.add_argument("--decode-experts", choices=moe.DECODE_EXPERTS, default="padded",
                        help="with --decode: the experts over every row of their receive regions, or over the "
                             "received rows only (MoEConfig.decode_experts)")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--small", action="store_true", help="test-size widths instead of DeepSeek-V3's")
    parser.add_argument("--experts", type=int, default=None,
                        help="routed experts over all ranks (default: the config's, 256 for DeepSeek-V3); "
                             "16 on 2 ranks gives each rank DeepSeek-V3's 8 experts at EP32")
    parser.add_argument("--split", default=None,
                        help="sequences per micro-batch, e.g. 3,1 (default: as even as possible, larger first)")
    parser.add_argument("--dispatch-dtype", choices=("bf16", "fp8"), default="bf16")
    parser.add_argument("--sms", type=int, default=24, help="SMs of each communication kernel")
    parser.add_argument("--compute-sms", type=int, default=None,
                        help="SMs matmuls may use in the overlapped step (default: the device's SMs, under MPS "
                             "the client's share, minus --sms; 0: no cap)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--trace-dir", default=None, help="write each rank's torch profiler trace here")
    parser.add_argument("--trace-steps", type=int, default=3,
                        help="profiled overlapped steps; the ranks keep the one whose lowest share is the median")
    parser.add_argument("--trace-rows", action="store_true",
                        help="also trace one run of every row and write per-kernel totals (trace-dir/kernels_rank*.txt)")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    if args.tokens is None:
        args.tokens = 128 if args.decode else 4096
    if args.seq is None:
        args.seq = 1 if args.decode else 1024
    if not args.recv_hooks and not args.decode:
        parser.error("--no-hooks: only with --decode")
    if args.decode_experts != "padded" and not args.decode:
        parser.error("--decode-experts: only with --decode")
    for name in ("seq", "layers", "iters", "trace_steps", "sms"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be >= 1")
    if args.tokens < args.seq or args.tokens % args.seq:
        parser.error(f"--tokens: must be a multiple of --seq ({args.seq}), got {args.tokens}")
    if args.experts is not None and args.experts < 1:
        parser.error(f"--experts: must be >= 1, got {args.experts}")
    batch = args.tokens // args.seq
    if args.split is None:
        args.split = overlap.split_sizes(batch)
    else:
        try:
            args.split = [int(part) for part in args.split.split(",")]
        except ValueError:
            parser.error(f"--split: expected two comma-separated sequence counts, got {args.split!r}")
        if len(args.split) != 2 or min(args.split) < 0 or sum(args.split) != batch:
            parser.error(f"--split: expected two non-negative sequence counts summing to the batch ({batch}), "
                         f"got {args.split}")
    return args


def block_config(args) -> moe.BlockConfig:
    config = moe.tiny() if args.small else moe.deepseek_v3()
    experts = config.moe.num_experts if args.experts is None else args.experts
    return dataclasses.replace(config, moe=dataclasses.replace(config.moe, dispatch_dtype=args.dispatch_dtype,
                                                               num_experts=experts, decode_experts=args.decode_experts))


def main() -> None:
    args = parse_args()
    try:
        config = block_config(args)
    except ValueError as error:  # e.g. fewer experts than each token's top-k
        raise SystemExit(f"--experts: {error}") from None
    args.experts = config.moe.num_experts  # the report and the JSON name what ran
    init_distributed()
    # Without a GPU the same steps run on the reference path (a smoke test of the bench, not a benchmark).
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    hidden = config.moe.hidden
    low_latency = (LowLatencyConfig(max_tokens_per_rank=args.tokens, hidden=hidden, num_experts=config.moe.num_experts,
                                    num_topk=config.moe.num_topk) if args.decode else None)
    comm = Communicator(num_sms=args.sms, backend=args.backend, low_latency=low_latency,
                        buffer=BufferConfig(args.tokens, hidden, config.moe.num_topk))
    blocks = [moe.TransformerBlock(config, comm, dtype=torch.bfloat16, device=device, seed=layer)
              for layer in range(args.layers)]
    batch = args.tokens // args.seq
    generator = torch.Generator(device=device).manual_seed(dist.get_rank())
    x = torch.randn(batch, args.seq, hidden, device=device, dtype=torch.bfloat16, generator=generator)
    sizes = args.split
    device_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None
    if device_sms is None or args.compute_sms == 0:
        compute_sms = None
    else:
        compute_sms = device_sms - args.sms if args.compute_sms is None else args.compute_sms
        if not 1 <= compute_sms <= device_sms:
            raise SystemExit(f"--compute-sms: {compute_sms} is not in [1, {device_sms}] (the SMs this rank sees; "
                             f"the default is those minus --sms {args.sms})")
    timer = Timer(device, args.warmup, args.iters)

    with torch.no_grad():
        steps = step_rows(blocks, x, sizes, compute_sms, args)
        plain, overlapped = steps["plain"], steps["overlapped"]
        assert torch.allclose(plain().float(), overlapped().float(), atol=0.1, rtol=0.05), "overlapped != plain"
        rows = {name: timer(fn) for name, fn in steps.items()}
        share = traced_share(overlapped, args.trace_dir, args.trace_steps)
        if args.trace_rows:
            write_kernel_totals(steps, args.trace_dir or "/tmp")

    if dist.get_rank() == 0:
        report(args, comm, rows, share, sizes, device_sms, compute_sms)
    comm.close()
    dist.barrier()  # nobody tears the group down while a peer still reports (close() does not, on the reference path)
    destroy_distributed()


def step_rows(blocks, x, sizes, compute_sms, args) -> dict:
    """The four rows of the module's docstring: a normal-mode step, or with --decode an inference step
    through the low-latency mode."""
    parts, block = torch.split(x, sizes), blocks[0]
    layer = block.moe
    if args.decode:
        run_block, overlap_mode = (lambda b, y: b.decode(y)), dict(low_latency=True, recv_hooks=args.recv_hooks)
        dispatch, experts = layer.decode_dispatch, layer.decode_experts

        def combine(expert_out, handle):
            return layer.decode_combine(expert_out, handle)[0]

        def kept(received):  # the rows sit in a receive area the next dispatches reuse: keep copies
            scales = received.x_scales
            return dataclasses.replace(received, x=received.x.clone(), handle=None,
                                       x_scales=None if scales is None else scales.clone(),
                                       num_tokens_per_expert=received.num_tokens_per_expert.clone())

        def combine_input(received, expert_out):  # the owners' sums read the outputs from any memory
            return expert_out
    else:
        run_block, overlap_mode = (lambda b, y: b(y)), {}
        dispatch, experts = layer.dispatch, layer.experts

        def combine(expert_out, handle):
            return layer.combine(expert_out, handle)[0]

        def kept(received):  # a receive slot that later dispatches reuse: copies, without the handle (the
            # experts then write a new tensor, as many bytes as into the slot)
            return dataclasses.replace(received, x=received.x.clone(), topk_weights=received.topk_weights.clone(),
                                       handle=None)

        def combine_input(received, expert_out):  # read where the experts leave rows; their values do not matter
            return autograd.combine_input(layer.comm, received.handle)

    def plain():
        y = x
        for b in blocks:
            y = run_block(b, y)
        return y

    def overlapped():
        return overlap.run_overlapped(blocks, x, sizes=sizes, compute_sms=compute_sms, **overlap_mode)[0]

    # What the compute-only and communication-only rows replay: one block's inputs per micro-batch.
    cached = []
    for part in parts:
        h = block.attend(part)
        moe_in = block.moe_input(h)
        topk_idx, topk_weights = layer.route(moe_in)
        received = dispatch(moe_in, topk_idx, topk_weights)
        expert_out = experts(received)
        routed = combine(expert_out, received.handle)
        cached.append(dict(moe_in=moe_in, topk_idx=topk_idx, topk_weights=topk_weights, received=kept(received),
                           expert_out=expert_out, routed=routed))

    def compute_only():
        for _ in blocks:
            for part, c in zip(parts, cached):
                h = block.attend(part)
                moe_in = block.moe_input(h)
                layer.route(moe_in)
                shared = layer.shared(moe_in)
                experts(c["received"])
                block.finish(h, c["routed"], shared)

    def communication_only():
        for _ in blocks:
            for c in cached:
                received = dispatch(c["moe_in"], c["topk_idx"], c["topk_weights"])
                combine(combine_input(received, c["expert_out"]), received.handle)

    return {"plain": plain, "overlapped": overlapped, "compute only": compute_only,
            "communication only": communication_only}


_HOST_GROUP = None


def host_barrier() -> None:
    """A barrier that launches no GPU kernel (on NCCL runs an NCCL barrier kernel would land in the
    trace and count as communication)."""
    global _HOST_GROUP
    if dist.get_backend() != "nccl":
        dist.barrier()
        return
    if _HOST_GROUP is None:
        _HOST_GROUP = dist.new_group(backend="gloo")
    dist.barrier(group=_HOST_GROUP)


def trace_step(step, path: str) -> None:
    """One run of ``step`` under the torch profiler, every rank starting together, exported to ``path``."""
    on_cuda = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        # Profiler start-up takes each rank a different time: without this, the first collective
        # of the early rank spins until the late one arrives, and the trace counts that as communication.
        if on_cuda:
            torch.cuda.synchronize()
        host_barrier()
        step()
        if on_cuda:
            torch.cuda.synchronize()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    prof.export_chrome_trace(path)


def traced_share(step, trace_dir: str | None, steps: int) -> dict:
    """Hidden shares of one of ``steps`` profiled overlapped steps, the same step on every rank.

    One traced step is a noisy sample (a rank delayed once shows its peer waiting for
    milliseconds), so the ranks keep the step whose lowest share over ranks is the median;
    each rank's trace of it stays as overlap_rank{r}.json. Per rank it reports (comm µs,
    hidden µs, share) of the comm kernels, and the same with each comm kernel counted from the
    moment the last rank's part of that call started (trace_analysis.after_peer_arrival): the
    difference is time a rank spun waiting for a peer that ran behind.
    """
    directory, rank, world = trace_dir or "/tmp", dist.get_rank(), dist.get_world_size()
    path = os.path.join(directory, f"overlap_rank{rank}.json")
    trace_step(step, path)  # a first profiled run pays the profiler's own initialisation
    candidates = [os.path.join(directory, f".overlap_rank{rank}_step{index}.json") for index in range(steps)]
    samples = []  # per step: this rank's (comm µs, hidden µs, share), as measured and after peer arrival
    hosts = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    one_clock = len(set(hosts)) == 1  # the profiler's timestamps are the host's: comparable on one host only
    try:
        for candidate in candidates:
            trace_step(step, candidate)
            records = trace_analysis.load_torch_trace(candidate)
            comm = [None] * world
            dist.all_gather_object(comm, [r for r in records if r.kind == trace_analysis.COMM])
            per_rank = [records if r == rank else comm[r] for r in range(world)]
            try:  # the clock check may fail on one rank only (it sees the others' comm kernels alone)
                arrived = trace_analysis.after_peer_arrival(per_rank) if one_clock else None
            except ValueError:
                arrived = None
            samples.append(tuple(_triple(trace_analysis.analyze(recs).total) if recs is not None else None
                                 for recs in (records, None if arrived is None else arrived[rank])))
        everyone = [None] * world
        dist.all_gather_object(everyone, samples)
        lowest = [_lowest(step_samples[0] for step_samples in per_step) for per_step in zip(*everyone)]
        order = sorted(range(steps), key=lambda i: -1.0 if lowest[i] is None else lowest[i])
        chosen = order[len(order) // 2]
        os.replace(candidates[chosen], path)
    finally:
        for candidate in candidates:
            if os.path.exists(candidate):
                os.remove(candidate)
    per_rank = [rank_samples[chosen][0] for rank_samples in everyone]
    arrived = [rank_samples[chosen][1] for rank_samples in everyone]
    return {"per_rank": per_rank, "min_share": _lowest(per_rank),
            "after_peer_arrival": {"per_rank": arrived, "min_share": _lowest(arrived)},
            "step": chosen, "trace": path}


def _triple(total: trace_analysis.OverlapStats) -> tuple[float, float, float | None]:
    return total.comm_ns / 1e3, total.hidden_ns / 1e3, total.share


def _lowest(triples) -> float | None:
    shares = [t[2] for t in triples if t is not None and t[2] is not None]
    return min(shares) if shares else None


def write_kernel_totals(rows: dict, trace_dir: str) -> None:
    """Per row, this rank's kernels by total time: where a row's step time goes."""
    lines = []
    for name, fn in rows.items():
        path = os.path.join(trace_dir, "rows", f"{name.replace(' ', '_')}_rank{dist.get_rank()}.json")
        trace_step(fn, path)
        records = trace_analysis.load_torch_trace(path)
        if not records:
            continue
        span_us = (max(r.end_ns for r in records) - min(r.start_ns for r in records)) / 1e3
        totals: dict[str, list[float]] = {}
        for record in records:
            entry = totals.setdefault(f"{record.kind}: {record.name[:90]}", [0.0, 0])
            entry[0] += (record.end_ns - record.start_ns) / 1e3
            entry[1] += 1
        lines.append(f"== {name}: {len(records)} kernels, span {span_us:.0f} µs")
        for kernel, (us, count) in sorted(totals.items(), key=lambda item: -item[1][0])[:15]:
            lines.append(f"{us:12.0f} µs {count:5d}x  {kernel}")
    with open(os.path.join(trace_dir, f"kernels_rank{dist.get_rank()}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def mps_state() -> str:
    if not torch.cuda.is_available():
        return "-"
    if mps_running():
        return "yes"
    return "no" if dist.get_world_size() <= torch.cuda.device_count() else "NO (ranks sharing a GPU are time-sliced)"


def decode_mode(args) -> str:
    return f"decode (low-latency, {'receive hooks' if args.recv_hooks else 'no hooks'}, {args.decode_experts} experts)"


def report(args, comm, rows: dict, share: dict, sizes: list[int], device_sms: int | None,
           compute_sms: int | None) -> None:
    compute = rows["compute only"]
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"deepcomm block bench: device={device_name} ranks={dist.get_world_size()} "
          f"backend={comm.backend} tokens/rank={args.tokens} micro-batches={sizes} (sequences) "
          f"layers={args.layers} experts={args.experts} sms={args.sms} dispatch={args.dispatch_dtype} "
          f"mode={decode_mode(args) if args.decode else 'normal'} "
          f"MPS share={os.environ.get('CUDA_MPS_ACTIVE_THREAD_PERCENTAGE', '-')}% "
          f"MPS daemon={mps_state()} "
          f"SMs reported={device_sms} overlapped matmuls on={compute_sms or 'all'}")
    print(f"{'step':<22}{'ms':>10}{'x compute only':>16}")
    for name, us in rows.items():
        print(f"{name:<22}{us / 1e3:>10.2f}{us / compute:>16.2f}")
    def percent(value):
        return '-' if value is None else f'{100 * value:.0f}%'

    arrived = share["after_peer_arrival"]
    print(f"communication kernel time under compute kernels (trace, lowest rank): {percent(share['min_share'])}; "
          f"per rank (comm µs, hidden µs, share): {share['per_rank']}")
    print(f"  the same from each call's last rank arriving (spinning for a peer left out): "
          f"{percent(arrived['min_share'])}; per rank: {arrived['per_rank']}")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"rows_us": rows, "share": share, "sizes": sizes, "args": vars(args),
                       "device": device_name, "device_sms": device_sms,
                       "compute_sms": compute_sms}, f, indent=1)


if __name__ == "__main__":
    main()
