"""Closed-form expectations used by the benchmark's self-check and the tests."""

from __future__ import annotations

import torch

from deepcomm.layout import token_rank_mask
from deepcomm.topology import Topology


def expected_round_trip(x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, topology: Topology) -> torch.Tensor:
    """``combine(dispatch(x).x)`` for bf16 ``x``, from this rank's inputs alone.

    Each rank that receives a token returns the row unchanged, so the node
    partial is ``bf16(count_in_node * x)`` and the result sums the partials in
    node order (the combine contract, deepcomm.reference).
    """
    in_rank = token_rank_mask(topk_idx, num_experts, topology.world_size)
    per_node = in_rank.view(-1, topology.num_nodes, topology.ranks_per_node).sum(dim=-1)
    acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    started = torch.zeros(x.shape[0], 1, dtype=torch.bool, device=x.device)
    for node in range(topology.num_nodes):
        count = per_node[:, node : node + 1]
        value = (x.float() * count).to(torch.bfloat16).float()
        has = count > 0
        acc = torch.where(has & ~started, value, torch.where(has, acc + value, acc))
        started |= has
    return acc.to(torch.bfloat16)
