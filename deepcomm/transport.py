"""Host side of the inter-node transport (DESIGN.md decision 7).

A transport owns one region per rank with the same layout on every rank
(``_C.internode.transport_layout``) and tells the kernels how to reach the
peers' regions. The kernels (csrc/kernels/internode.cu) are templated on the
device side of the same interface (csrc/kernels/transport.cuh).

- ``IpcTransport``: CUDA-IPC peer memory standing in for the NIC, for "nodes"
  carved out of one host or one GPU. With ``staged=True`` senders write local
  staging that each put copies, the access pattern of a NIC.
- ``NvshmemTransport``: the NVSHMEM symmetric heap: plain stores into the
  peers NVSHMEM maps here (GPUs of this host, NVLink), staging + put-with-signal
  to the others (RDMA across hosts); ``staged=True`` puts to every peer, the
  NIC's path on one host. The extension initialises NVSHMEM itself from
  a unique id broadcast over the torch group: its device code must run against
  the same NVSHMEM host state that allocated the heap (docs/design.md).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from deepcomm import _ext
from deepcomm.ipc import close_peers, open_peer_buffers
from deepcomm.topology import Topology

TRANSPORTS = ("ipc", "nvshmem")


class IpcTransport:
    name = "ipc"

    def __init__(self, group, topology: Topology, nbytes: int, device: torch.device, staged: bool = False) -> None:
        self.staged = staged
        self.buffer = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        torch.cuda.synchronize(device)
        self._peers, self.regions = open_peer_buffers(self.buffer, group, topology.rank, range(topology.world_size))

    def close(self) -> None:
        close_peers(self._peers)
        self._peers = []


class NvshmemTransport:
    name = "nvshmem"

    def __init__(self, group, topology: Topology, nbytes: int, device: torch.device, staged: bool = False) -> None:
        self.staged = staged
        core = _ext.extension()
        if not hasattr(core, "nvshmem"):
            raise ValueError("transport: this build has no NVSHMEM (install nvidia-nvshmem-cu13 and rebuild)")
        self._nvshmem = core.nvshmem
        if not self._nvshmem.initialized():
            # The heap must hold the region; NVSHMEM reads this once, at init.
            os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(nbytes + (256 << 20)))
            ids: list = [None]
            if topology.rank == 0:
                ids[0] = self._nvshmem.unique_id()
            dist.broadcast_object_list(ids, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
            self._nvshmem.init(ids[0], topology.rank, topology.world_size)
        if self._nvshmem.n_pes() != topology.world_size or self._nvshmem.my_pe() != topology.rank:
            raise ValueError("group: NVSHMEM was initialised for a different set of ranks than this group")
        self._ptr = self._nvshmem.malloc(nbytes)
        # Peers NVSHMEM maps here (GPUs of this host) are written by plain stores unless staged; 0: puts only.
        self.regions = [self._nvshmem.peer_pointer(self._ptr, pe) for pe in range(topology.world_size)]

    def close(self) -> None:
        if self._ptr:
            self._nvshmem.free(self._ptr)
            self._ptr = 0


def make_transport(name: str, group, topology: Topology, nbytes: int, device: torch.device, staged: bool = False):
    if name == "ipc":
        return IpcTransport(group, topology, nbytes, device, staged)
    if name == "nvshmem":
        return NvshmemTransport(group, topology, nbytes, device, staged)
    raise ValueError(f"transport: expected one of {TRANSPORTS}, got {name!r}")
