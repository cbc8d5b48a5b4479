"""Which CPUs each local rank gets, and that the binding really applies (no GPU needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from deepcomm import cpu_binding


def hyperthreads(num_cores: int):
    """A host numbering first threads 0..n-1 and their siblings n..2n-1 (the usual x86 layout)."""
    return lambda cpu: [cpu % num_cores, cpu % num_cores + num_cores]


def test_hyperthreads_of_a_core_stay_together_and_ranks_get_distinct_cores():
    cores = cpu_binding.physical_cores(range(8), hyperthreads(4))
    assert cores == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert cpu_binding.cpus_for_local_rank(cores, 0, 2) == [0, 1, 4, 5]
    assert cpu_binding.cpus_for_local_rank(cores, 1, 2) == [2, 3, 6, 7]


def test_only_allowed_cpus_are_used():
    # The process may use CPUs 1, 2, 5 only: CPU 1's sibling 5 is allowed, 2's sibling 6 is not.
    cores = cpu_binding.physical_cores([5, 2, 1], hyperthreads(4))
    assert cores == [(1, 5), (2,)]


def test_an_even_share_each_and_the_rest_left_unused():
    cores = [(c,) for c in range(7)]
    shares = [cpu_binding.cpus_for_local_rank(cores, r, 3) for r in range(3)]
    assert shares == [[0, 1], [2, 3], [4, 5]]
    assert cpu_binding.cpus_for_local_rank(cores, 2, 3, cores_per_rank=1) == [2]
    assert cpu_binding.cpus_for_local_rank(cores, 0, 1, cores_per_rank=100) == list(range(7))


def test_fewer_cores_than_ranks_binds_nothing():
    assert cpu_binding.cpus_for_local_rank([(0,), (1,)], 2, 3) is None


@pytest.mark.parametrize("rank, world, per_rank, match", [(2, 2, None, "local_rank"), (0, 0, None, "local_world_size"),
                                                          (0, 2, 0, "cores_per_rank")])
def test_bad_arguments_name_themselves(rank, world, per_rank, match):
    with pytest.raises(ValueError, match=match):
        cpu_binding.cpus_for_local_rank([(0,), (1,)], rank, world, per_rank)


def test_cpu_list_format():
    assert cpu_binding.parse_cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert cpu_binding.parse_cpu_list("5") == [5]


def test_an_unknown_mode_is_an_error_and_none_binds_nothing():
    with pytest.raises(ValueError, match=cpu_binding.BIND_ENV):
        cpu_binding.bind_from_environment({cpu_binding.BIND_ENV: "numa"})
    assert cpu_binding.bind_from_environment({}) is None
    assert cpu_binding.bind_from_environment({cpu_binding.BIND_ENV: "bound"}) is None  # applied before


@pytest.mark.parametrize("name", ["LOCAL_RANK", "LOCAL_WORLD_SIZE", cpu_binding.CORES_PER_RANK_ENV])
def test_a_bad_number_in_the_environment_names_its_variable(name):
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("needs sched_setaffinity (Linux)")
    with pytest.raises(ValueError, match=name):
        cpu_binding.bind_from_environment({cpu_binding.BIND_ENV: "cores", name: "two"})


def test_too_few_cores_leaves_the_ranks_unbound_and_says_so():
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("needs sched_setaffinity (Linux)")
    environ = {cpu_binding.BIND_ENV: "cores", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": str(os.cpu_count() * 2 + 1)}
    with pytest.warns(UserWarning, match="left unbound"):
        assert cpu_binding.bind_from_environment(environ) is None
    assert environ[cpu_binding.BIND_ENV] == "cores"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity (Linux)")
def test_binding_applies_to_every_thread_once():
    allowed = sorted(os.sched_getaffinity(0))
    if len(cpu_binding.physical_cores(allowed)) < 2:
        pytest.skip("needs two physical cores")
    # A thread that exists before the binding, one started after, and a second call (nothing to do).
    code = (
        "import json, os, threading; from deepcomm import cpu_binding\n"
        "go = threading.Event(); seen = {}\n"
        "def early(): go.wait(); seen['early'] = sorted(os.sched_getaffinity(0))\n"
        "t = threading.Thread(target=early); t.start()\n"
        "cpus = cpu_binding.bind_from_environment()\n"
        "go.set(); t.join()\n"
        "late = threading.Thread(target=lambda: seen.setdefault('late', sorted(os.sched_getaffinity(0))))\n"
        "late.start(); late.join()\n"
        "again = cpu_binding.bind_from_environment()\n"
        "print(json.dumps([cpus, sorted(os.sched_getaffinity(0)), seen['early'], seen['late'], again,\n"
        "                  os.environ['DEEPCOMM_CPU_BIND']]))\n"
    )
    env = {**os.environ, "DEEPCOMM_CPU_BIND": "cores", "DEEPCOMM_CORES_PER_RANK": "1", "LOCAL_RANK": "1",
           "LOCAL_WORLD_SIZE": "2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    cpus, process, early, late, again, mode = json.loads(out)
    expected = cpu_binding.cpus_for_local_rank(cpu_binding.physical_cores(allowed), 1, 2, 1)
    assert cpus == process == early == late == expected
    assert again is None and mode == "bound"
