"""What the node-limited hierarchy saves: rows per leg, computed from routing alone.

The internode kernels count the bytes they move (``Communicator.traffic()``);
these functions say what those counts must be, and what a path without the
hierarchy would put across the node boundary, so tests check the counters
exactly and the benchmark reports the saving.
"""

from __future__ import annotations

import torch

from deepcomm.layout import rank_of_expert, token_rank_mask
from deepcomm.topology import Topology
from deepcomm.validation import check_num_experts, check_topk_idx


def boundary_rows(topk_idx: torch.Tensor, num_experts: int, topology: Topology) -> dict[str, int]:
    """Rows one rank's tokens put across its node boundary, under three policies.

    ``per_node``: one per (token, other node it has an expert on): the hierarchical path.
    ``per_rank``: one per (token, rank on another node): a flat all-to-all.
    ``per_expert``: one per (token, expert entry on another node): no deduplication at all.
    """
    check_num_experts(num_experts, topology.world_size)
    check_topk_idx(topk_idx, None, num_experts, None)
    topo = topology
    in_rank = token_rank_mask(topk_idx, num_experts, topo.world_size)
    remote = torch.ones(topo.world_size, dtype=torch.bool)
    remote[list(topo.ranks_of_node(topo.node))] = False
    remote = remote.to(in_rank.device)
    in_node = in_rank.view(-1, topo.num_nodes, topo.ranks_per_node).any(dim=-1)
    owners = rank_of_expert(topk_idx, num_experts, topo.world_size)
    remote_entries = (owners >= 0) & (owners // topo.ranks_per_node != topo.node)
    return {
        "per_node": int(in_node.sum()) - int(in_node[:, topo.node].sum()),
        "per_rank": int((in_rank & remote).sum()),
        "per_expert": int(remote_entries.sum()),
    }


def leg_rows(topk_idx_of_rank: list[torch.Tensor], num_experts: int, topology: Topology) -> dict[str, int]:
    """Rows ``topology.rank`` moves on each leg of one hierarchical dispatch + combine.

    ``topk_idx_of_rank[r]``: rank r's routing (every rank's is needed: this
    rank forwards its partners' tokens). Keys match ``Communicator.traffic()``.
    """
    topo = topology
    masks = [token_rank_mask(idx, num_experts, topo.world_size) for idx in topk_idx_of_rank]
    own_node = list(topo.ranks_of_node(topo.node))
    direct = int(masks[topo.rank][:, own_node].sum())
    forwarded_tokens = forwarded_rows = 0
    for node in range(topo.num_nodes):
        if node == topo.node:
            continue
        partner_mask = masks[topo.peer_on_node(node)][:, own_node]
        reached = partner_mask.any(dim=1)
        forwarded_tokens += int(reached.sum())
        forwarded_rows += int(partner_mask.sum())
    return {
        "dispatch_boundary": boundary_rows(topk_idx_of_rank[topo.rank], num_experts, topo)["per_node"],
        "dispatch_nvlink_direct": direct,
        "dispatch_nvlink_forward": forwarded_rows,
        "combine_boundary": forwarded_tokens,
        "combine_nvlink": forwarded_rows + direct,
    }
