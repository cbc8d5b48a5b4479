"""Dispatch layout: where each token goes, counted per rank, node and expert.

``get_dispatch_layout`` runs the CUDA kernel (``csrc/kernels/layout.cu``) for
CUDA tensors when the extension is built, and the torch implementation
otherwise; both return identical tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepcomm import _ext
from deepcomm.topology import Topology
from deepcomm.validation import check_num_experts, check_topk_idx


@dataclass(frozen=True)
class DispatchLayout:
    """Counts for one rank's tokens (all int32, on the device of ``topk_idx``).

    num_tokens_per_rank:   ``[world_size]`` tokens with at least one expert on each rank
    num_tokens_per_node:   ``[num_nodes]`` tokens with at least one expert on each node
    num_tokens_per_expert: ``[num_experts]`` (token, k) entries naming each expert
    is_token_in_rank:      ``[num_tokens, world_size]`` bool, token → destination rank mask
    """

    num_tokens_per_rank: torch.Tensor
    num_tokens_per_node: torch.Tensor
    num_tokens_per_expert: torch.Tensor
    is_token_in_rank: torch.Tensor


def rank_of_expert(topk_idx: torch.Tensor, num_experts: int, world_size: int) -> torch.Tensor:
    """Owning rank of each entry of ``topk_idx``; ``-1`` for ``-1`` and for ids outside ``[0, num_experts)``
    (which the layout kernel ignores too)."""
    experts_per_rank = num_experts // world_size
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    return torch.where(valid, topk_idx.div(experts_per_rank, rounding_mode="floor"), -1)


def token_rank_mask(topk_idx: torch.Tensor, num_experts: int, world_size: int) -> torch.Tensor:
    """``[T, world_size]`` bool: does the token have an expert on the rank."""
    ranks = rank_of_expert(topk_idx, num_experts, world_size)
    mask = torch.zeros(topk_idx.shape[0], world_size + 1, dtype=torch.bool, device=topk_idx.device)
    # Column world_size collects the -1 entries and is dropped.
    mask.scatter_(1, torch.where(ranks >= 0, ranks, world_size), True)
    return mask[:, :world_size]


def dispatch_layout_torch(topk_idx: torch.Tensor, num_experts: int, topology: Topology) -> DispatchLayout:
    """The layout in plain torch (the oracle for the kernel, and the CPU path)."""
    world_size = topology.world_size
    in_rank = token_rank_mask(topk_idx, num_experts, world_size)
    in_node = in_rank.view(-1, topology.num_nodes, topology.ranks_per_node).any(dim=-1)
    valid = topk_idx[(topk_idx >= 0) & (topk_idx < num_experts)]
    return DispatchLayout(
        num_tokens_per_rank=in_rank.sum(dim=0, dtype=torch.int32),
        num_tokens_per_node=in_node.sum(dim=0, dtype=torch.int32),
        num_tokens_per_expert=torch.bincount(valid, minlength=num_experts).to(torch.int32),
        is_token_in_rank=in_rank.contiguous(),
    )


def launch_dispatch_layout(
    topk_idx: torch.Tensor,
    num_experts: int,
    topology: Topology,
    num_blocks: int,
    stream: int,
    per_rank: int,
    per_node: int,
    per_expert: int,
    in_rank: int,
    num_invalid: int = 0,
    send_pos: int = 0,
) -> None:
    """Launch the layout kernel on ``stream`` (a ``cudaStream_t`` as an int) into device pointers.

    ``per_rank`` ``[world_size]``, ``per_node`` ``[num_nodes]``, ``per_expert`` ``[num_experts]``
    int32 counts; ``in_rank`` ``[T, world_size]`` bool; ``num_invalid`` (``[1]`` int32, or 0) the
    count of ids outside ``[-1, num_experts)``, which the kernel skips; ``send_pos``
    (``[T, world_size]`` int32, or 0) :func:`send_positions`. Counters laid out back to back
    (rank, node, expert counts, invalid count) are zeroed in one memset.
    """
    _ext.extension().dispatch_layout(
        topk_idx.data_ptr(), topk_idx.shape[0], topk_idx.shape[1], num_experts, topology.world_size,
        topology.ranks_per_node, per_rank, per_node, per_expert, in_rank, num_blocks, stream, num_invalid, send_pos,
    )


def dispatch_layout_cuda(
    topk_idx: torch.Tensor,
    num_experts: int,
    topology: Topology,
    num_blocks: int = 132,
    num_invalid: torch.Tensor | None = None,
    send_pos: torch.Tensor | None = None,
    stream: torch.cuda.Stream | None = None,
) -> DispatchLayout:
    """The layout from the CUDA kernel, launched on ``stream`` (default: the current stream).

    ``num_invalid`` (``[1]`` int32 on the device), if given, receives the count
    of ids outside ``[-1, num_experts)``, which the kernel skips. ``send_pos``
    (``[T, world_size]`` int32), if given, receives :func:`send_positions`.
    """
    with torch.cuda.device(topk_idx.device):  # the launch goes to the current device: make it topk_idx's
        world_size, num_nodes = topology.world_size, topology.num_nodes
        device = topk_idx.device
        per_rank = torch.empty(world_size, dtype=torch.int32, device=device)
        per_node = torch.empty(num_nodes, dtype=torch.int32, device=device)
        per_expert = torch.empty(num_experts, dtype=torch.int32, device=device)
        in_rank = torch.empty(topk_idx.shape[0], world_size, dtype=torch.bool, device=device)
        launch_dispatch_layout(
            topk_idx, num_experts, topology, num_blocks,
            (stream if stream is not None else torch.cuda.current_stream(device)).cuda_stream,
            per_rank.data_ptr(), per_node.data_ptr(), per_expert.data_ptr(), in_rank.data_ptr(),
            num_invalid.data_ptr() if num_invalid is not None else 0,
            send_pos.data_ptr() if send_pos is not None else 0,
        )
        return DispatchLayout(per_rank, per_node, per_expert, in_rank)


def send_positions(is_token_in_rank: torch.Tensor) -> torch.Tensor:
    """``[T, W]`` int32: for each token and rank, how many earlier tokens go to that rank.

    Token t's row for rank r lands at this index among this rank's rows at r
    (received order: by source rank, then token).
    """
    as_int = is_token_in_rank.to(torch.int32)
    return as_int.cumsum(0, dtype=torch.int32).sub_(as_int)


def get_dispatch_layout(
    topk_idx: torch.Tensor,
    num_experts: int,
    topology: Topology,
    validate: bool = True,
) -> DispatchLayout:
    """Layout of ``topk_idx`` ``[T, K]`` int64 (``-1`` = no expert) over ``topology``.

    Uses the CUDA kernel for CUDA tensors when the extension is available.
    ``validate`` also checks the expert ids' range on the host (one device sync); type, shape and
    contiguity are always checked (the kernel reads int64). Without it, ids outside
    ``[0, num_experts)`` are ignored here as by the kernel.
    """
    check_num_experts(num_experts, topology.world_size)
    check_topk_idx(topk_idx, None, num_experts, None, check_values=validate)
    if topk_idx.is_cuda and _ext.available():
        return dispatch_layout_cuda(topk_idx, num_experts, topology)
    return dispatch_layout_torch(topk_idx, num_experts, topology)
