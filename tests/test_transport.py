"""deepcomm.transport on the host: which peer regions the kernels get (no GPU needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from deepcomm import transport
from deepcomm.topology import Topology

BASE = 0x7000_0000
MAPPED = {0: 0x1000_0000, 1: BASE, 2: 0x3000_0000, 3: 0}  # PE 3: another host, reached by puts only


class FakeNvshmem:
    """The extension's NVSHMEM host calls, as one of 4 PEs whose heap peers 0 and 2 map here."""

    def __init__(self) -> None:
        self.freed = []

    def initialized(self) -> bool:
        return True

    def n_pes(self) -> int:
        return 4

    def my_pe(self) -> int:
        return 1

    def malloc(self, nbytes: int) -> int:
        return BASE

    def peer_pointer(self, ptr: int, pe: int) -> int:
        assert ptr == BASE
        return MAPPED[pe]

    def free(self, ptr: int) -> None:
        self.freed.append(ptr)


@pytest.fixture
def fake_nvshmem(monkeypatch):
    fake = FakeNvshmem()
    monkeypatch.setattr(transport._ext, "extension", lambda: SimpleNamespace(nvshmem=fake))
    return fake


@pytest.mark.parametrize("staged", [False, True])
def test_nvshmem_regions_are_each_pe_mapped_here_or_zero_and_staged_is_kept(fake_nvshmem, staged):
    # The kernels store into a non-zero region directly unless staged, and put to a zero one.
    topology = Topology(rank=1, world_size=4, ranks_per_node=1)
    t = transport.make_transport("nvshmem", None, topology, 1 << 20, torch.device("cpu"), staged)
    assert t.name == "nvshmem" and t.staged is staged
    assert t.regions == [MAPPED[pe] for pe in range(4)] and t.regions[topology.rank] == BASE
    t.close()
    t.close()  # idempotent
    assert fake_nvshmem.freed == [BASE]


def test_nvshmem_refuses_a_group_it_was_not_initialised_for(fake_nvshmem):
    with pytest.raises(ValueError, match="^group: NVSHMEM was initialised for a different set of ranks"):
        transport.make_transport("nvshmem", None, Topology(rank=0, world_size=2, ranks_per_node=1), 1 << 20,
                                 torch.device("cpu"))


def test_unknown_transport_is_named():
    with pytest.raises(ValueError, match="^transport: expected one of"):
        transport.make_transport("rdma", None, Topology(rank=0, world_size=2, ranks_per_node=1), 1,
                                 torch.device("cpu"))
