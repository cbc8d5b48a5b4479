"""Rank → node placement, explicit or from host names."""

from __future__ import annotations

import pytest

from deepcomm.topology import Topology, detect_topology, ranks_per_host


def test_node_and_local_rank():
    topo = Topology(rank=5, world_size=8, ranks_per_node=4)
    assert (topo.num_nodes, topo.node, topo.local_rank, topo.is_multi_node) == (2, 1, 1, True)
    assert list(topo.ranks_of_node(0)) == [0, 1, 2, 3]
    assert topo.peer_on_node(0) == 1
    assert [topo.node_of(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_one_node_is_not_multi_node():
    assert not Topology(0, 4, 4).is_multi_node


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rank=0, world_size=6, ranks_per_node=4), "ranks_per_node"),
        (dict(rank=0, world_size=4, ranks_per_node=0), "ranks_per_node"),
        (dict(rank=4, world_size=4, ranks_per_node=2), "rank"),
        (dict(rank=0, world_size=0, ranks_per_node=1), "world_size"),
    ],
)
def test_invalid_topologies(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Topology(**kwargs)


def test_ranks_per_node_out_of_range():
    with pytest.raises(ValueError, match="node"):
        Topology(0, 4, 2).ranks_of_node(2)


def test_ranks_per_host_from_names():
    assert ranks_per_host(["a", "a", "b", "b"]) == 2
    assert ranks_per_host(["a"] * 8) == 8
    assert ranks_per_host(["a", "b", "c"]) == 1


@pytest.mark.parametrize("names", [["a", "b", "a", "b"], ["a", "a", "b"], ["a", "a", "a", "b"], []])
def test_ranks_per_host_rejects_irregular_placement(names):
    with pytest.raises(ValueError, match="hostnames"):
        ranks_per_host(names)


def test_detect_topology_on_one_rank(single_rank_group):
    topo = detect_topology(single_rank_group)
    assert (topo.rank, topo.world_size, topo.ranks_per_node, topo.single_host) == (0, 1, 1, True)
    assert Topology(0, 1, 1).single_host is None  # made by hand: the hosts are not known


@pytest.mark.parametrize("name", ["rank", "world_size", "ranks_per_node"])
def test_bools_are_not_ints(name):
    kwargs = dict(rank=0, world_size=2, ranks_per_node=1) | {name: True}
    with pytest.raises(TypeError, match=f"^{name}: expected an int, got a bool"):
        Topology(**kwargs)


def _hosts_worker(rank: int, world_size: int) -> None:
    """Two hosts of two ranks each (host names faked): ranks_per_node may split a host, never join two."""
    import socket

    import torch.distributed as dist

    socket.gethostname = lambda: f"host{rank // 2}"
    assert detect_topology(dist.group.WORLD).ranks_per_node == 2
    assert detect_topology(dist.group.WORLD, ranks_per_node=2).single_host is False
    assert detect_topology(dist.group.WORLD, ranks_per_node=1).num_nodes == 4
    for joined in (4, 3):
        with pytest.raises(ValueError, match=f"^ranks_per_node: must divide the 2 ranks each host holds .* got {joined}"):
            detect_topology(dist.group.WORLD, ranks_per_node=joined)


def test_ranks_per_node_never_joins_hosts():
    from dist import run_ranks

    run_ranks(_hosts_worker, 4)
