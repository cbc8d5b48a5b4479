"""DeepEP v1's intranode kernels on deepcomm.bench's workloads, for a same-run comparison.

    tools/build_deepep.sh /tmp/deepep_site
    PYTHONPATH=/tmp/deepep_site python3 -m deepcomm.launch --standalone --nproc-per-node 2 \
        tools/bench_deepep.py --preset prefill --json deepep_prefill.json

Inputs are drawn exactly as ``python -m deepcomm.bench`` draws them (same seed, x first, then
the routing), timed with its Timer (slowest rank's median), counted with its bytes (received rows
for dispatch, rows sent back for combine) and set against its copy floor, so the two tables compare
row by row. DeepEP is only called through its public Python API; its source is not part of this
repo (tools/build_deepep.sh builds it from the git-ignored .peer/DeepEP).

Each stage is timed once per NVL chunk size of a small sweep and the fastest is reported, as
DeepEP's own test tunes it. "dispatch" is layout + dispatch from top-k ids (what deepcomm's
dispatch does); "dispatch(cached)" reuses the handle (no layout, no host wait for counts): the
mode DeepEP's test times and ../shared/BENCHMARKS.md quotes.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from functools import partial

import torch
import torch.distributed as dist

from deepcomm import _ext, bench, bench_floor, fp8
from deepcomm.checks import expected_round_trip
from deepcomm.launch import destroy_distributed, init_distributed
from deepcomm.layout import get_dispatch_layout
from deepcomm.topology import Topology

RECV_BUFFER_TOKENS = 256  # NVL ring slots per channel and peer, as in DeepEP's test and defaults
MAX_LOCAL_EXPERTS = 128  # DeepEP's notify kernel handles at most this many experts per rank


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(bench.PRESETS), default="prefill")
    for key in ("tokens", "hidden", "topk", "experts"):
        parser.add_argument(f"--{key}", type=int, help="overrides the preset")
    parser.add_argument("--routing", choices=("uniform",), default="uniform")
    parser.add_argument("--sms", type=int, default=24, help="SMs per rank (even)")
    parser.add_argument("--dispatch-chunks", default="4,8,12,16,20,24,28,32",
                        help="NVL send chunk sizes (tokens) swept for dispatch")
    parser.add_argument("--combine-chunks", default="1,2,4,6,8,10,12,16",
                        help="NVL send chunk sizes (tokens) swept for combine")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", default=None, help="write every row to this file")
    parser.add_argument("--timeout", type=float, default=300.0)
    return parser.parse_args(argv)


def sweep_note(chunk: int, chunks: list[int]) -> str:
    return f"NVL chunk {chunk} (best of {','.join(map(str, chunks))}), {RECV_BUFFER_TOKENS}-token ring"


def run(args: argparse.Namespace, deep_ep, group) -> list[bench.Row]:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device())
    shape = bench.workload(args, on_cuda=True)
    tokens, hidden, experts = shape["tokens"], shape["hidden"], shape["experts"]
    topo = Topology(rank=rank, world_size=world, ranks_per_node=world)
    # The same draws as deepcomm.bench.run, in the same order: the same tokens and routing.
    generator = torch.Generator().manual_seed(args.seed * 1000 + rank)
    x = torch.randn(tokens, hidden, generator=generator).to(device, torch.bfloat16)
    topk_idx, topk_weights = bench.make_routing(args, shape, topo, generator, device)
    ep_topk_idx = topk_idx.to(deep_ep.topk_idx_t)
    q, scales = fp8.quantize_fp8(x)
    ours = get_dispatch_layout(topk_idx, experts, topo)
    # tokens_to_rank[s, d]: rows rank s sends rank d; a rank receives its column.
    tokens_to_rank = bench.gather_host(ours.num_tokens_per_rank.to(torch.int64).cpu())
    expected_recv = int(tokens_to_rank[:, rank].sum())
    kept_rows = bench_floor.rows_kept_local(tokens_to_rank, topo, hierarchical=False)
    own_gpu = world > 1 and bench_floor.ranks_have_own_gpu(world)

    dispatch_chunks = [int(c) for c in args.dispatch_chunks.split(",")]
    combine_chunks = [int(c) for c in args.combine_chunks.split(",")]
    deep_ep.Buffer.set_num_sms(args.sms)
    configs = {c: deep_ep.Config(args.sms, c, RECV_BUFFER_TOKENS) for c in set(dispatch_chunks + combine_chunks)}
    nvl_bytes = max(cfg.get_nvl_buffer_size_hint(hidden * 2, world) for cfg in configs.values())
    buffer = deep_ep.Buffer(group, nvl_bytes, 0, explicitly_destroy=True)
    timer = bench.Timer(device, args.warmup, args.iters)
    device_name = torch.cuda.get_device_name(device)

    def floor_us(nbytes: int, row_bytes: int) -> float | None:
        """deepcomm.bench's floor for the same bytes: NVLink stores of the rows bound for other GPUs
        when ranks have a GPU each, else a local copy of all of them; same SMs."""
        if not _ext.available():
            return None
        if own_gpu:
            return bench_floor.peer_copy_floor_us(timer, nbytes - kept_rows * row_bytes, args.sms, device)
        return bench_floor.copy_floor_us(timer, nbytes, args.sms, device)

    def row(dtype, stage, us, nbytes, floor, check, note) -> bench.Row:
        nbytes = int(bench.mean_over_ranks(nbytes))
        gbps = nbytes / (us * 1e-6) / 1e9 if nbytes else None
        return bench.Row(device_name, "deepep", dtype, stage, tokens, hidden, shape["topk"], experts, world,
                         world, args.sms, us, gbps, nbytes, floor, check, note)

    def best(chunks, call):
        """(µs, chunk) of the fastest NVL chunk size; the same on every rank (Timer reduces over ranks)."""
        return min((timer(partial(call, configs[c])), c) for c in chunks)

    def layout():
        return buffer.get_dispatch_layout(ep_topk_idx, experts)

    def full_dispatch(payload, cfg):
        per_rank, _, per_expert, in_rank, _ = layout()
        return buffer.dispatch(payload, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                               num_tokens_per_expert=per_expert, topk_idx=ep_topk_idx,
                               topk_weights=topk_weights, config=cfg)

    def cached_dispatch(payload, handle, cfg):
        return buffer.dispatch(payload, handle=handle, config=cfg)

    def combine(recv_x, handle, cfg):
        return buffer.combine(recv_x, handle, config=cfg)

    per_rank, _, _, in_rank, _ = layout()
    layout_ok = (torch.equal(per_rank.cpu().to(torch.int64), ours.num_tokens_per_rank.cpu().to(torch.int64))
                 and torch.equal(in_rank.cpu(), ours.is_token_in_rank.cpu()))
    rows = [row("-", "layout", timer(layout), 0, None, bench.all_ok(layout_ok), "counts and mask equal ours")]

    first = configs[dispatch_chunks[0]]
    recv_bf16, _, _, _, handle, _ = full_dispatch(x, first)
    for dtype, payload in (("bf16", x), ("fp8", (q, scales))):
        recv, _, _, _, _, _ = full_dispatch(payload, first)
        if dtype == "bf16":
            ok, num_recv, row_bytes = recv.shape[0] == expected_recv, recv.shape[0], hidden * 2
        else:
            # Rows arrive in the same order either way, and quantising is per row: bit-exact.
            ref_q, ref_scales = fp8.quantize_fp8(recv_bf16)
            num_recv, row_bytes = recv[0].shape[0], hidden + scales.shape[1] * 4
            ok = (num_recv == expected_recv and torch.equal(recv[1], ref_scales)
                  and torch.equal(recv[0].view(torch.uint8), ref_q.view(torch.uint8)))
        check, nbytes = bench.all_ok(ok), num_recv * row_bytes
        floor = floor_us(nbytes, row_bytes)
        us, chunk = best(dispatch_chunks, partial(full_dispatch, payload))
        rows.append(row(dtype, "dispatch", us, nbytes, floor, check, sweep_note(chunk, dispatch_chunks)))
        us, chunk = best(dispatch_chunks, partial(cached_dispatch, payload, handle))
        rows.append(row(dtype, "dispatch(cached)", us, nbytes, floor, check,
                        sweep_note(chunk, dispatch_chunks) + ", handle reused"))

    # DeepEP's combine sums the returned copies unweighted: bf16(x * ranks the token went to).
    combined, _, _ = combine(recv_bf16, handle, configs[combine_chunks[0]])
    expected = expected_round_trip(x, topk_idx, experts, topo)
    check = bench.all_ok(torch.allclose(combined.float(), expected.float(), rtol=1e-2, atol=1e-2))
    us, chunk = best(combine_chunks, partial(combine, recv_bf16, handle))
    nbytes = recv_bf16.shape[0] * hidden * 2
    rows.append(row("bf16", "combine", us, nbytes, floor_us(nbytes, hidden * 2), check,
                    sweep_note(chunk, combine_chunks)))
    torch.cuda.synchronize()
    dist.barrier()
    buffer.destroy()
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        import deep_ep
    except ImportError as error:
        if rank0:
            print(f"deepep: not installed (tools/build_deepep.sh)\n  import deep_ep: {error}")
        return
    if "RANK" not in os.environ or not torch.cuda.is_available():
        raise SystemExit("deepep: needs GPUs and torchrun: python3 -m deepcomm.launch --standalone "
                         "--nproc-per-node N tools/bench_deepep.py")
    group = init_distributed(args.timeout)
    try:
        world, experts = dist.get_world_size(), bench.workload(args, on_cuda=True)["experts"]
        if experts // world > MAX_LOCAL_EXPERTS:
            if rank0:
                print(f"deepep bench: skipped: {experts // world} experts per rank; DeepEP's normal "
                      f"(intranode) mode takes at most {MAX_LOCAL_EXPERTS}")
            return
        rows = run(args, deep_ep, group)
    finally:
        destroy_distributed()
    if rank0:
        r = rows[0]
        print(f"deepep bench: device={r.device} ranks={r.ranks} tokens/rank={r.tokens} hidden={r.hidden} "
              f"topk={r.topk} experts={r.experts} routing={args.routing} iters={args.iters} (median, slowest rank)")
        print(bench.format_table(rows))
        if args.json_path:
            with open(args.json_path, "w") as f:
                json.dump([asdict(r) for r in rows], f, indent=1)
            print(f"rows written to {args.json_path}")
    failed = [f"{r.stage}/{r.dtype}" for r in rows if r.check != "ok"]
    if failed:
        raise SystemExit(f"deepep: correctness check failed: {failed}")


if __name__ == "__main__":
    main()
