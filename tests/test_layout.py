"""The torch layout against per-token loops (the kernel is checked against it in test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from cases import ROUTINGS, random_topk
from deepcomm.layout import get_dispatch_layout, send_positions
from deepcomm.topology import Topology


def naive_layout(topk_idx: torch.Tensor, num_experts: int, topo: Topology):
    experts_per_rank = num_experts // topo.world_size
    per_rank = [0] * topo.world_size
    per_node = [0] * topo.num_nodes
    per_expert = [0] * num_experts
    mask = []
    for row in topk_idx.tolist():
        experts = [e for e in row if e >= 0]
        for e in experts:
            per_expert[e] += 1
        ranks = {e // experts_per_rank for e in experts}
        for r in ranks:
            per_rank[r] += 1
        for n in {topo.node_of(r) for r in ranks}:
            per_node[n] += 1
        mask.append([r in ranks for r in range(topo.world_size)])
    return per_rank, per_node, per_expert, mask


@pytest.mark.parametrize("world_size,ranks_per_node", [(1, 1), (4, 2), (8, 4), (8, 1), (16, 8)])
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("num_tokens", [0, 1, 97])
def test_layout_counts_each_token_once_per_rank_and_node(world_size, ranks_per_node, routing, num_tokens):
    topo = Topology(0, world_size, ranks_per_node)
    num_experts = 4 * world_size if world_size > 1 else 8
    generator = torch.Generator().manual_seed(num_tokens + world_size)
    topk_idx = random_topk(generator, num_tokens, min(6, num_experts), num_experts, routing, topo.num_nodes)
    layout = get_dispatch_layout(topk_idx, num_experts, topo)
    per_rank, per_node, per_expert, mask = naive_layout(topk_idx, num_experts, topo)
    assert layout.num_tokens_per_rank.tolist() == per_rank
    assert layout.num_tokens_per_node.tolist() == per_node
    assert layout.num_tokens_per_expert.tolist() == per_expert
    assert layout.is_token_in_rank.tolist() == mask
    assert layout.num_tokens_per_rank.dtype == torch.int32


def test_layout_rejects_out_of_range_experts():
    with pytest.raises(ValueError, match="topk_idx"):
        get_dispatch_layout(torch.tensor([[0, 8]]), 8, Topology(0, 2, 1))
    with pytest.raises(ValueError, match="topk_idx"):
        get_dispatch_layout(torch.tensor([[0, -2]]), 8, Topology(0, 2, 1))
    with pytest.raises(ValueError, match="num_experts"):
        get_dispatch_layout(torch.tensor([[0, 1]]), 7, Topology(0, 2, 1))
    with pytest.raises(TypeError, match="topk_idx"):
        get_dispatch_layout(torch.tensor([[0, 1]], dtype=torch.int32), 8, Topology(0, 2, 1))
    # validate=False skips only the range check (the dtype still is checked); ids outside [0, E) are then
    # ignored, as the kernel ignores them.
    with pytest.raises(TypeError, match="topk_idx"):
        get_dispatch_layout(torch.tensor([[0, 1]], dtype=torch.int32), 8, Topology(0, 2, 1), validate=False)
    layout = get_dispatch_layout(torch.tensor([[0, 8], [12, 5]]), 8, Topology(0, 2, 1), validate=False)
    assert layout.num_tokens_per_expert.tolist() == [1, 0, 0, 0, 0, 1, 0, 0]
    assert layout.num_tokens_per_rank.tolist() == [1, 1]


def test_send_positions_count_earlier_tokens_per_rank():
    mask = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    expected = [[0, 0, 0], [1, 0, 1], [2, 1, 1], [2, 2, 2]]
    assert send_positions(mask).tolist() == expected
    assert send_positions(mask).dtype == torch.int32
