"""Profile dispatch + combine with the torch profiler: kernel times and a trace.

    python -m deepcomm.launch --standalone --nproc-per-node 2 tools/profile_dispatch.py \
        --tokens 128 --trace /tmp/dispatch_trace.json
    python -m deepcomm.launch --standalone --nproc-per-node 4 tools/profile_dispatch.py \
        --tokens 4096 --ranks-per-node 2 --dtype fp8 --num-sms 24     # internode, 2 nodes x 2

Rank 0 prints the per-kernel device times (layout, notify, dispatch, combine)
next to the wall-clock time of the whole call, which separates kernel time
from host-side overhead, and writes a Chrome trace (open in Perfetto).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

import deepcomm
from deepcomm import fp8
from deepcomm.launch import destroy_distributed, init_distributed
from deepcomm.routing import node_limited_topk


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
