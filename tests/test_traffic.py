"""Rows per leg of the hierarchical path, from routing alone, against brute-force counting."""

from __future__ import annotations

import pytest
import torch

from cases import random_topk
from deepcomm.topology import Topology
from deepcomm.traffic import boundary_rows, leg_rows


def _owner_node(expert: int, num_experts: int, topo: Topology) -> int:
    return topo.node_of(expert // (num_experts // topo.world_size))


def _brute_force_boundary(topk_idx: torch.Tensor, num_experts: int, topo: Topology) -> dict[str, int]:
    per_node = per_rank = per_expert = 0
    for row in topk_idx.tolist():
        experts = [e for e in row if e >= 0]
        ranks = {e // (num_experts // topo.world_size) for e in experts}
        per_node += len({topo.node_of(r) for r in ranks} - {topo.node})
        per_rank += sum(1 for r in ranks if topo.node_of(r) != topo.node)
        per_expert += sum(1 for e in experts if _owner_node(e, num_experts, topo) != topo.node)
    return {"per_node": per_node, "per_rank": per_rank, "per_expert": per_expert}


@pytest.mark.parametrize("world_size,ranks_per_node", [(4, 2), (8, 4), (8, 2), (6, 3)])
@pytest.mark.parametrize("routing", ["uniform", "minus_one", "node_limited_1", "node_limited_2", "skewed"])
def test_boundary_rows_match_brute_force(world_size, ranks_per_node, routing):
    num_experts = 8 * world_size
    generator = torch.Generator().manual_seed(world_size * 10 + ranks_per_node)
    for rank in range(world_size):
        topo = Topology(rank, world_size, ranks_per_node)
        topk_idx = random_topk(generator, 40, 6, num_experts, routing, topo.num_nodes)
        assert boundary_rows(topk_idx, num_experts, topo) == _brute_force_boundary(topk_idx, num_experts, topo)


def test_node_limited_routing_bounds_the_boundary_rows():
    topo = Topology(0, 8, 2)  # 4 nodes
    generator = torch.Generator().manual_seed(0)
    topk_idx = random_topk(generator, 200, 8, 64, "node_limited_1", topo.num_nodes)
    rows = boundary_rows(topk_idx, 64, topo)
    assert rows["per_node"] <= 200  # at most one other node per token with M = 1
    assert rows["per_node"] <= rows["per_rank"] <= rows["per_expert"]


def test_leg_rows_forward_what_partners_send_and_return_one_partial_per_token_and_node():
    world_size, ranks_per_node, num_experts = 4, 2, 32
    generator = torch.Generator().manual_seed(1)
    all_topk = [random_topk(generator, 30, 4, num_experts, "uniform", 2) for _ in range(world_size)]
    for rank in range(world_size):
        topo = Topology(rank, world_size, ranks_per_node)
        rows = leg_rows(all_topk, num_experts, topo)
        partner = topo.peer_on_node(1 - topo.node)
        own = list(topo.ranks_of_node(topo.node))
        forwarded_rows = forwarded_tokens = 0
        for row in all_topk[partner].tolist():
            ranks = {e // (num_experts // world_size) for e in row if e >= 0} & set(own)
            forwarded_rows += len(ranks)
            forwarded_tokens += bool(ranks)
        direct = sum(len({e // (num_experts // world_size) for e in row if e >= 0} & set(own))
                     for row in all_topk[rank].tolist())
        assert rows == {
            "dispatch_boundary": boundary_rows(all_topk[rank], num_experts, topo)["per_node"],
            "dispatch_nvlink_direct": direct,
            "dispatch_nvlink_forward": forwarded_rows,
            "combine_boundary": forwarded_tokens,
            "combine_nvlink": forwarded_rows + direct,
        }


def test_boundary_rows_reject_bad_arguments_by_name():
    topo = Topology(0, 2, 1)
    with pytest.raises(ValueError, match="^topk_idx: expert ids must lie"):
        boundary_rows(torch.tensor([[0, 8]]), 8, topo)
    with pytest.raises(ValueError, match="^num_experts:"):
        boundary_rows(torch.tensor([[0, 1]]), 7, topo)
