"""Each local rank on CPU cores of its own.

A dispatch's host path spins on a mailbox while its peers launch their half of
the count exchange, so a rank should not share a core with another: two ranks
on one CPU of ``nvidia-h200-x2`` took a millisecond per decode-size dispatch
(one spins while the other, whose launch it waits for, is not running), against
about 0.1 ms apart; with the wait now yielding early, 0.27 ms. Bound, a rank's
threads also stay on its own share instead of moving wherever the scheduler
puts them. Binding does not make every launch
equally fast on those lent VMs: bound or not, and for DeepEP alike, some launches
run a decode dispatch at half the speed of others (docs/benchmarks.md, "Decode
size: where the ranks run").

:func:`bind_from_environment` applies what ``python -m deepcomm.launch``
asked for (``--cpu-bind``, ``--cores-per-rank``) to every thread of the
process; :func:`deepcomm.launch.init_distributed` calls it before the process
group starts, so the group's threads inherit it too.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, MutableMapping, Sequence

BIND_ENV = "DEEPCOMM_CPU_BIND"  # "cores" or "none" from the launcher; "bound" once applied
CORES_PER_RANK_ENV = "DEEPCOMM_CORES_PER_RANK"  # optional: fewer cores than an even share
BIND_MODES = ("cores", "none")
BOUND = "bound"


def physical_cores(cpus: Sequence[int], siblings_of=None) -> list[tuple[int, ...]]:
    """``cpus`` grouped by physical core (hyperthreads together), in order of each core's first CPU.

    ``siblings_of(cpu)`` gives the CPUs sharing ``cpu``'s core (default: sysfs); a CPU
    whose siblings cannot be read is a core of its own.
    """
    siblings_of = siblings_of or _sysfs_siblings
    allowed = set(cpus)
    cores: dict[tuple[int, ...], None] = {}
    for cpu in sorted(allowed):
        core = tuple(sorted(c for c in siblings_of(cpu) if c in allowed)) or (cpu,)
        cores.setdefault(core, None)
    return sorted(cores, key=lambda core: core[0])


def cpus_for_local_rank(
    cores: Sequence[tuple[int, ...]], local_rank: int, local_world_size: int, cores_per_rank: int | None = None
) -> list[int] | None:
    """The CPUs of ``local_rank``: its contiguous part of ``cores``, an equal share each.

    Contiguous, so that on the usual numbering a rank's cores are neighbours (one socket, shared
    caches). GPUs are not consulted: with one rank per GPU and GPUs numbered socket by socket
    the shares line up with them, otherwise they need not. ``None`` when there are fewer cores
    than local ranks: sharing a core is the slow case, so no binding is better than a forced one.
    """
    if local_world_size < 1:
        raise ValueError(f"local_world_size: expected a positive int, got {local_world_size}")
    if not 0 <= local_rank < local_world_size:
        raise ValueError(f"local_rank: expected 0 <= local_rank < {local_world_size}, got {local_rank}")
    share = len(cores) // local_world_size
    if cores_per_rank is not None:
        if cores_per_rank < 1:
            raise ValueError(f"cores_per_rank: expected a positive int, got {cores_per_rank}")
        share = min(share, cores_per_rank)
    if share == 0:
        return None
    mine = cores[local_rank * share : (local_rank + 1) * share]
    return sorted(cpu for core in mine for cpu in core)


def bind_from_environment(environ: MutableMapping[str, str] = os.environ) -> list[int] | None:
    """Bind every thread of this process to its local rank's CPUs if the launcher asked to; the CPUs, or None.

    The share is cut from the CPUs this process may use, so launches given disjoint CPU sets
    (``taskset``, cgroups) stay apart; two launches given the same set would bind their ranks to
    the same cores (use ``--cpu-bind none`` or separate sets). Once applied, ``DEEPCOMM_CPU_BIND``
    reads ``bound``: a second call, or a child process inheriting both, leaves the binding as it
    is (a share of the share would halve it again).
    """
    mode = environ.get(BIND_ENV, "none")
    if mode not in BIND_MODES + (BOUND,):
        raise ValueError(f"{BIND_ENV}: expected one of {BIND_MODES}, got {mode!r}")
    if mode != "cores" or not hasattr(os, "sched_setaffinity"):
        return None
    local_rank = _int_from(environ, "LOCAL_RANK", 0)
    local_world_size = _int_from(environ, "LOCAL_WORLD_SIZE", _int_from(environ, "WORLD_SIZE", 1))
    cores = physical_cores(sorted(os.sched_getaffinity(0)))
    cpus = cpus_for_local_rank(cores, local_rank, local_world_size, _int_from(environ, CORES_PER_RANK_ENV, None))
    if cpus is None:
        warnings.warn(f"deepcomm: {len(cores)} CPU cores for {local_world_size} local ranks; the ranks are left "
                      "unbound (a core each is the least; --cpu-bind none silences this)", stacklevel=2)
        return None
    for thread in _threads():
        try:
            os.sched_setaffinity(thread, cpus)
        except OSError:  # the thread ended meanwhile
            pass
    environ[BIND_ENV] = BOUND
    return cpus


def _int_from(environ: Mapping[str, str], name: str, default: int | None) -> int | None:
    value = environ.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {value!r}") from None


def _threads() -> list[int]:
    """Ids of this process's threads (sched_setaffinity binds one thread; those started later inherit it)."""
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return [0]  # the calling thread


def _sysfs_siblings(cpu: int) -> list[int]:
    path = f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
    try:
        with open(path) as f:
            return parse_cpu_list(f.read())
    except OSError:
        return [cpu]


def parse_cpu_list(text: str) -> list[int]:
    """``"0-3,8,10-11"`` → ``[0, 1, 2, 3, 8, 10, 11]`` (the kernel's CPU list format)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus
