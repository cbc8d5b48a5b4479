"""The received (row, k) pairs in the order the grouped GEMM runs them: by local expert, then by place.

``local_idx`` ``[R, K]`` holds a local expert id per place (``-1``: another rank's expert). The result
is ``order`` ``[P]``, the places ``r * K + k`` of the P pairs with an id, sorted by id and, within an
id, by place (a stable sort), ``rows = order // K``, and where each id's pairs end in ``order``.

On CUDA with the extension built, a counting sort in two launches (``csrc/kernels/expert_order.cu``);
elsewhere (and for more than ``MAX_SORTED_EXPERTS`` local experts) torch's stable argsort on 16-bit
keys (:func:`expert_order_torch`, the oracle). Both give the same order: a stable sort has one answer.
"""

from __future__ import annotations

import torch

from deepcomm import _ext


def expert_order_torch(local_idx: torch.Tensor, num_experts: int,
                       num_pairs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # The -1 entries sort first and are cut off. Sorted as 16-bit keys where the ids fit: a radix sort
    # makes one pass per key byte, 2 instead of 8 (the order is the same: the sort is stable).
    ids = local_idx.flatten()
    order = torch.argsort(ids.to(torch.int16 if num_experts < 2**15 else torch.int32), stable=True)
    order = order[ids.numel() - num_pairs:]
    # Counted by scatter, not bincount: bincount on CUDA reads the ids' range on the host.
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(0, torch.where(ids >= 0, ids, num_experts), torch.ones_like(ids, dtype=torch.int32))
    return order, order // local_idx.shape[1], counts[:num_experts].cumsum(0, dtype=torch.int32)


def expert_order(local_idx: torch.Tensor, num_experts: int,
                 num_pairs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(order, rows, ends)``: ``order`` and ``rows`` ``[num_pairs]`` int64, ``ends`` ``[num_experts]``
    int32 (where each expert's pairs end in ``order``: the grouped GEMM's offsets).

    ``num_pairs`` is the count of ids in ``[0, num_experts)``. Ids are ``-1`` or in that range (as
    dispatch delivers them); the kernel skips others, the torch path would sort them in.
    """
    if isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or not 0 <= num_pairs <= local_idx.numel():
        raise ValueError(f"num_pairs: expected an int in [0, {local_idx.numel()}] (the ids in range), got {num_pairs!r}")
    if not (local_idx.is_cuda and _ext.available() and local_idx.dtype == torch.int64 and local_idx.is_contiguous()
            and local_idx.dim() == 2 and local_idx.shape[1] > 0 and 0 < local_idx.numel() < 2**31
            and 0 < num_experts <= _ext.extension().MAX_SORTED_EXPERTS):
        return expert_order_torch(local_idx, num_experts, num_pairs)
    extension = _ext.extension()
    num_places = local_idx.numel()
    device = local_idx.device
    block_counts = torch.empty(extension.expert_order_blocks(num_places), num_experts, dtype=torch.int32,
                               device=device)
    order = torch.empty(num_pairs, dtype=torch.int64, device=device)
    rows = torch.empty(num_pairs, dtype=torch.int64, device=device)
    ends = torch.empty(num_experts, dtype=torch.int32, device=device)
    with torch.cuda.device(device):
        extension.expert_order(local_idx.data_ptr(), num_places, local_idx.shape[1], num_experts,
                               block_counts.data_ptr(), num_pairs, order.data_ptr(), rows.data_ptr(), ends.data_ptr(),
                               torch.cuda.current_stream(device).cuda_stream)
    return order, rows, ends
