"""Which node each rank lives on (DESIGN.md decision 3).

A rank's node is ``rank // ranks_per_node``. ``ranks_per_node`` defaults to the
number of ranks sharing a host and may be set lower to treat one host (or one
GPU) as several nodes, so the inter-node path can be developed on one machine.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    """Placement of ``world_size`` ranks on ``world_size // ranks_per_node`` nodes; ``ranks_per_host``: the
    ranks each host holds, where known (:func:`detect_topology` reads the host names)."""

    rank: int
    world_size: int
    ranks_per_node: int
    ranks_per_host: int | None = None

    @property
    def single_host(self) -> bool | None:
        """Whether every rank is on one host (None where the hosts are not known)."""
        return None if self.ranks_per_host is None else self.ranks_per_host == self.world_size

    def __post_init__(self) -> None:
        for name in ("rank", "world_size", "ranks_per_node"):
            if isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected an int, got a bool")
        if not isinstance(self.world_size, int) or self.world_size <= 0:
            raise ValueError(f"world_size: must be a positive int, got {self.world_size!r}")
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank: must lie in [0, {self.world_size}), got {self.rank!r}")
        if (
            not isinstance(self.ranks_per_node, int)
            or self.ranks_per_node <= 0
            or self.world_size % self.ranks_per_node != 0
        ):
            raise ValueError(
                f"ranks_per_node: must be a positive divisor of world_size={self.world_size}, "
                f"got {self.ranks_per_node!r}"
            )

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    @property
    def node(self) -> int:
        return self.node_of(self.rank)

    @property
    def local_rank(self) -> int:
        """Index of this rank inside its node."""
        return self.rank % self.ranks_per_node

    @property
    def is_multi_node(self) -> bool:
        return self.num_nodes > 1

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def ranks_of_node(self, node: int) -> range:
        if not 0 <= node < self.num_nodes:
            raise ValueError(f"node: must lie in [0, {self.num_nodes}), got {node}")
        return range(node * self.ranks_per_node, (node + 1) * self.ranks_per_node)

    def peer_on_node(self, node: int) -> int:
        """The rank of ``node`` with this rank's local index (its inter-node partner)."""
        return self.ranks_of_node(node)[self.local_rank]


def ranks_per_host(hostnames: list[str]) -> int:
    """``ranks_per_node`` implied by each rank's host name, in rank order.

    Ranks of one host must be contiguous and every host must hold the same
    number of ranks; anything else cannot be described by ``rank // ranks_per_node``.
    """
    if not hostnames:
        raise ValueError("hostnames: empty")
    per_host = hostnames.count(hostnames[0])
    if len(hostnames) % per_host != 0:
        raise ValueError(f"hostnames: hosts hold unequal numbers of ranks ({hostnames})")
    for start in range(0, len(hostnames), per_host):
        block = hostnames[start : start + per_host]
        if len(set(block)) != 1 or hostnames.count(block[0]) != per_host:
            raise ValueError(
                "hostnames: ranks of one host must be contiguous and hosts must hold "
                f"equal numbers of ranks ({hostnames})"
            )
    return per_host


def detect_topology(group: dist.ProcessGroup | None = None, ranks_per_node: int | None = None) -> Topology:
    """Topology of ``group``; ``ranks_per_node=None`` groups ranks by host name. A given ``ranks_per_node`` may
    split a host into several nodes, never join hosts: a node's ranks reach each other by CUDA IPC."""
    rank = dist.get_rank(group)
    world_size = dist.get_world_size(group)
    hostnames: list[str] = [""] * world_size
    dist.all_gather_object(hostnames, socket.gethostname(), group=group)
    per_host = ranks_per_host(hostnames)
    if ranks_per_node is None:
        ranks_per_node = per_host
    elif isinstance(ranks_per_node, int) and not isinstance(ranks_per_node, bool) and ranks_per_node > 0 \
            and per_host % ranks_per_node != 0:
        raise ValueError(f"ranks_per_node: must divide the {per_host} ranks each host holds (a node never spans "
                         f"hosts), got {ranks_per_node}")
    return Topology(rank=rank, world_size=world_size, ranks_per_node=ranks_per_node, ranks_per_host=per_host)


def gpu_share(group, device: torch.device) -> tuple[int, int]:
    """``(ranks of group on this rank's GPU, that GPU's SMs)`` (collective): kernels whose blocks wait for
    other ranks' blocks need every sharing rank's grid resident at once."""
    props = torch.cuda.get_device_properties(device)
    gpus: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gpus, (socket.gethostname(), str(props.uuid)), group=group)
    return gpus.count(gpus[dist.get_rank(group)]), props.multi_processor_count
