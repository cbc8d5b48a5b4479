"""The floor a benchmark row is compared with: the bytes it moves, through a plain copy kernel.

Ranks sharing one GPU move every byte through that GPU's memory, so the floor
is a local copy of all of them on the same SMs. Ranks with a GPU each move the
bytes bound for other GPUs over NVLink, and a plain kernel storing those bytes
into a peer GPU's memory on the same SMs is the floor; the rows a rank keeps
(sent to itself, or forwarded to itself) stay local and copy an order of
magnitude faster, so they are left out of it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from deepcomm import _ext
from deepcomm.ipc import PeerTensor, export_tensor
from deepcomm.topology import Topology


def ranks_have_own_gpu(world_size: int) -> bool:
    """One host, one GPU per rank (the benchmark runs on one host)."""
    return torch.cuda.is_available() and torch.cuda.device_count() >= world_size


def rows_kept_local(tokens_to_rank: torch.Tensor, topology: Topology, hierarchical: bool) -> int:
    """Rows this rank's dispatch writes into its own memory.

    ``tokens_to_rank[s, d]``: rows rank s sends rank d (every rank's layout).
    Flat paths keep what a rank sends itself; the hierarchy also keeps the rows
    it forwards to itself for its partners on other nodes.
    """
    me = topology.rank
    kept = int(tokens_to_rank[me, me])
    if hierarchical:
        kept += sum(int(tokens_to_rank[topology.peer_on_node(n), me])
                    for n in range(topology.num_nodes) if n != topology.node)
    return kept


def _align(nbytes: int) -> int:
    return max(16, nbytes // 16 * 16)


def copy_floor_us(timer: Callable, nbytes: int, num_sms: int, device: torch.device) -> float:
    """``nbytes`` through a plain copy kernel on ``num_sms`` SMs of this GPU, all ranks at once."""
    nbytes = _align(nbytes)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    core = _ext.extension()
    return timer(lambda: core.copy(dst.data_ptr(), src.data_ptr(), nbytes, num_sms,
                                   torch.cuda.current_stream(device).cuda_stream))


def peer_copy_floor_us(timer: Callable, nbytes: int, num_sms: int, device: torch.device) -> float:
    """``nbytes`` stored into the next rank's GPU by a plain copy kernel on ``num_sms`` SMs, all ranks at once.

    Every rank sends and receives at the same time, as in an all-to-all; on
    two GPUs the ring is exactly the pairwise exchange.
    """
    nbytes = _align(nbytes)
    largest = torch.tensor([nbytes], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        largest = largest.cuda()
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    landing = torch.empty(int(largest), dtype=torch.uint8, device=device)
    handles = [None] * dist.get_world_size()
    dist.all_gather_object(handles, export_tensor(landing))
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    core = _ext.extension()
    with PeerTensor(handles[(dist.get_rank() + 1) % dist.get_world_size()], device) as peer:
        dst = peer.tensor.data_ptr()
        us = timer(lambda: core.copy(dst, src.data_ptr(), nbytes, num_sms,
                                     torch.cuda.current_stream(device).cuda_stream))
        torch.cuda.synchronize(device)
        dist.barrier()  # nobody frees its landing buffer while a peer still writes to it
    return us
