"""deepcomm.affinity: which CPUs a rank is bound to (the sysfs and sched parts run on GPU hosts)."""

from __future__ import annotations

import pytest

from deepcomm import launch
from deepcomm.affinity import BIND_ENV, parse_cpulist, share_of


def test_parse_cpulist_reads_ranges_and_singles():
    assert parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpulist("5") == [5]
    assert parse_cpulist("") == []


def test_ranks_on_one_gpu_split_its_cpus_into_disjoint_runs():
    cpus = list(range(16))
    # 4 local ranks over 2 GPUs: ranks 0 and 2 on GPU 0, 1 and 3 on GPU 1.
    assert share_of(cpus, 0, 4, 2) == list(range(8))
    assert share_of(cpus, 2, 4, 2) == list(range(8, 16))
    assert share_of(cpus, 1, 4, 2) == list(range(8))  # GPU 1's first rank (its own CPU list in practice)
    # One rank per GPU keeps them all; more ranks than CPUs get one each.
    assert share_of(cpus, 0, 1, 1) == cpus
    assert share_of([4, 5], 2, 3, 1) == [4]
    with pytest.raises(ValueError, match="local_rank"):
        share_of(cpus, 4, 4, 2)
    with pytest.raises(ValueError, match="cpus"):
        share_of([], 0, 1, 1)


def test_the_launcher_binds_unless_told_not_to():
    assert launch.plan_launch(2, 2, None, False).env[BIND_ENV] == "1"
    assert launch.plan_launch(2, 2, None, False, bind_cpus="none").env[BIND_ENV] == "0"
    assert launch.plan_launch(2, 0, None, False).env[BIND_ENV] == "0"  # no GPU: nothing to be near
    with pytest.raises(SystemExit, match="--bind-cpus"):
        launch.plan_launch(2, 2, None, False, bind_cpus="numa")
    ours, rest = launch.split_arguments(["--bind-cpus", "none", "--nproc-per-node", "2", "x.py"])
    assert ours.bind_cpus == "none" and rest == ["--nproc-per-node", "2", "x.py"]
