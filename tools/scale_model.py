"""Predict dispatch/combine time on real clusters from routing statistics and link speeds.

    python tools/scale_model.py                       # DeepSeek-V3-sized EP32 .. EP256 table
    python tools/scale_model.py --nodes 8 --gpus-per-node 8 --nic-gbps 50 --nvlink-gbps 160

Model (hierarchical, node-limited dispatch as deepcomm's internode path does it):
- every token crosses the node boundary once per *remote* destination node (RDMA leg);
- inside a destination node it is forwarded once to each other rank that holds one of its experts
  (NVLink leg), and tokens for ranks of the sender's own node go over NVLink directly;
- the two legs run concurrently, so a call takes max(RDMA, NVLink) / efficiency + a fixed cost.
Combine moves the same rows back (bf16), so its bytes equal bf16 dispatch's.

Routing statistics (expected distinct nodes and ranks per token) come from simulating
deepcomm.routing.node_limited_topk on random logits; for unrestricted uniform top-k they also have a
closed form, which the tests check the simulation against. Efficiencies and the fixed cost are
parameters; their defaults and where they come from are listed in ASSUMPTIONS.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

from deepcomm.routing import node_limited_topk

ASSUMPTIONS = {
    "nvlink_efficiency": (0.70, "SM-driven 16-byte stores reached 334 of 478 GB/s per H200 (BENCHMARKS.md)"),
    "nic_efficiency": (0.90, "DeepEP v1 reached 43-58 GB/s per GPU on 50 GB/s InfiniBand (published)"),
    "fixed_us": (60.0, "layout + notify + launch on the GPU for a 4096-token call, deepcomm on H100 (profile)"),
}


@dataclass(frozen=True)
class RoutingStats:
    nodes_per_token: float  # distinct destination nodes
    remote_nodes_per_token: float  # distinct destination nodes other than the sender's
    ranks_per_token: float  # distinct destination ranks
    local_ranks_per_token: float  # destination ranks on the sender's node
    remote_experts_per_token: float  # (token, expert) pairs on other nodes: rows without node dedup


def uniform_distinct(groups: int, experts: int, topk: int) -> float:
    """Expected distinct groups hit by top-k of ``experts`` chosen uniformly (groups of equal size)."""
    per_group = experts // groups
    miss = math.comb(experts - per_group, topk) / math.comb(experts, topk)
    return groups * (1.0 - miss)


def simulate_routing(nodes: int, gpus_per_node: int, experts: int, topk: int, max_nodes: int,
                     tokens: int = 8192, seed: int = 0) -> RoutingStats:
    """Routing statistics of the node-limited router on random logits, seen from rank 0."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=generator)
    topk_idx, _ = node_limited_topk(logits, topk, nodes, max_nodes)
    ranks = topk_idx // (experts // (nodes * gpus_per_node))
    mask = torch.zeros(tokens, nodes * gpus_per_node, dtype=torch.bool)
    mask.scatter_(1, ranks, True)
    node_mask = mask.view(tokens, nodes, gpus_per_node).any(-1)
    return RoutingStats(
        nodes_per_token=float(node_mask.sum(1).float().mean()),
        remote_nodes_per_token=float(node_mask[:, 1:].sum(1).float().mean()),
        ranks_per_token=float(mask.sum(1).float().mean()),
        local_ranks_per_token=float(mask[:, :gpus_per_node].sum(1).float().mean()),
        remote_experts_per_token=float((ranks >= gpus_per_node).sum(1).float().mean()),
    )


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    nic_gbps: float  # per GPU, one direction
    nvlink_gbps: float  # per GPU, one direction


def predict(cluster: Cluster, stats: RoutingStats, tokens: int, row_bytes: int,
            nvlink_efficiency: float = ASSUMPTIONS["nvlink_efficiency"][0],
            nic_efficiency: float = ASSUMPTIONS["nic_efficiency"][0],
            fixed_us: float = ASSUMPTIONS["fixed_us"][0]) -> dict[str, float]:
    """Per-rank bytes on each leg and the predicted µs of one dispatch (or combine)."""
    rdma_bytes = tokens * stats.remote_nodes_per_token * row_bytes
    # Own-node destinations other than self, plus forwarding of arriving tokens (by symmetry a rank
    # forwards as many rows as it sends across, to the other ranks each node-visit reaches).
    ranks_per_node_visit = stats.ranks_per_token / max(stats.nodes_per_token, 1e-9)
    local_sends = tokens * max(stats.local_ranks_per_token - 1.0 / cluster.gpus_per_node, 0.0) * row_bytes
    forwards = rdma_bytes * max(ranks_per_node_visit - 1.0 / cluster.gpus_per_node, 0.0)
    nvlink_bytes = local_sends + forwards
    rdma_us = rdma_bytes / (cluster.nic_gbps * 1e3 * nic_efficiency) if cluster.nodes > 1 else 0.0
    nvlink_us = nvlink_bytes / (cluster.nvlink_gbps * 1e3 * nvlink_efficiency)
    flat_rdma_bytes = tokens * stats.remote_experts_per_token * row_bytes
    return {
        "rdma_MB": rdma_bytes / 1e6,
        "nvlink_MB": nvlink_bytes / 1e6,
        "rdma_us": rdma_us,
        "nvlink_us": nvlink_us,
        "total_us": max(rdma_us, nvlink_us) + fixed_us,
        "flat_rdma_MB": flat_rdma_bytes / 1e6,
    }


def table(args: argparse.Namespace) -> str:
    lines = [
        f"tokens/rank={args.tokens} hidden={args.hidden} top-{args.topk} of {args.experts}, "
        f"at most {args.max_nodes} nodes per token, {args.gpus_per_node} GPUs/node, "
        f"NIC {args.nic_gbps} GB/s/GPU, NVLink {args.nvlink_gbps} GB/s/GPU",
        "| EP | nodes | nodes/token | ranks/token | RDMA MB/rank | without node dedup | NVLink MB/rank "
        "| dispatch bf16 µs | dispatch fp8 µs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for ep in args.ep:
        nodes = ep // args.gpus_per_node
        stats = simulate_routing(nodes, args.gpus_per_node, args.experts, args.topk, min(args.max_nodes, nodes))
        cluster = Cluster(nodes, args.gpus_per_node, args.nic_gbps, args.nvlink_gbps)
        bf16 = predict(cluster, stats, args.tokens, 2 * args.hidden)
        fp8 = predict(cluster, stats, args.tokens, args.hidden + 4 * (args.hidden // 128))
        lines.append(f"| {ep} | {nodes} | {stats.nodes_per_token:.2f} | {stats.ranks_per_token:.2f} | "
                     f"{bf16['rdma_MB']:.1f} | {bf16['flat_rdma_MB']:.1f} | {bf16['nvlink_MB']:.1f} | {bf16['total_us']:.0f} | {fp8['total_us']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ep", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--max-nodes", type=int, default=4)
    parser.add_argument("--nic-gbps", type=float, default=50.0)
    parser.add_argument("--nvlink-gbps", type=float, default=160.0)
    args = parser.parse_args()
    print(table(args))
    print("\nassumptions:")
    for name, (value, source) in ASSUMPTIONS.items():
        print(f"  {name} = {value}: {source}")


if __name__ == "__main__":
    main()
