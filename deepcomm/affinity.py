"""Bind each rank's process to the CPUs next to its GPU.

A dispatch's host waits on counts the GPU writes into pinned host memory, and a
small call is bound by how fast the host issues work: a rank the scheduler puts
on the other socket pays for every one of those trips across it, and two ranks
on the same cores slow each other. Measured on a two-GPU H200 host, unbound
decode-size calls fell into two groups between launches (≈ 90–110 µs and
≈ 160–190 µs a dispatch) with nothing else changed (docs/benchmarks.md).

``deepcomm.launch`` binds every rank (``--bind-cpus none`` turns it off): to the
CPUs of its GPU's NUMA node (sysfs ``local_cpulist``) that the process may use,
shared out among the ranks placed on that GPU so that they do not contend.
"""

from __future__ import annotations

import os

BIND_ENV = "DEEPCOMM_BIND_CPUS"  # "1": local_device() binds the rank (set by deepcomm.launch)


def parse_cpulist(text: str) -> list[int]:
    """``"0-3,8,10-11"`` → ``[0, 1, 2, 3, 8, 10, 11]`` (the kernel's cpulist format)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def share_of(cpus: list[int], local_rank: int, local_world: int, num_gpus: int) -> list[int]:
    """The part of ``cpus`` (a GPU's) for ``local_rank``, when local ranks go to GPUs round-robin.

    The ranks on one GPU split its CPUs into equal consecutive runs; with more ranks than CPUs,
    each still gets one (ranks then share).
    """
    if local_world < 1 or num_gpus < 1 or not 0 <= local_rank < local_world:
        raise ValueError(f"local_rank: {local_rank} is not one of {local_world} ranks over {num_gpus} GPUs")
    if not cpus:
        raise ValueError("cpus: empty")
    gpu = local_rank % num_gpus
    on_gpu = len(range(gpu, local_world, num_gpus))
    index = local_rank // num_gpus
    if on_gpu >= len(cpus):
        return [cpus[index % len(cpus)]]
    size = len(cpus) // on_gpu
    return cpus[index * size:(index + 1) * size]


def gpu_local_cpus(device_index: int) -> list[int]:
    """The CPUs of the GPU's NUMA node that this process may run on; all it may run on if unknown."""
    import torch

    allowed = sorted(os.sched_getaffinity(0))
    props = torch.cuda.get_device_properties(device_index)
    try:
        bus = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        with open(f"/sys/bus/pci/devices/{bus}/local_cpulist") as f:
            local = set(parse_cpulist(f.read()))
    except (AttributeError, OSError, ValueError):
        return allowed
    return [cpu for cpu in allowed if cpu in local] or allowed


def bind_rank(device_index: int, local_rank: int, local_world: int, num_gpus: int) -> list[int]:
    """Bind this process to its share of the CPUs next to GPU ``device_index``; returns them."""
    cpus = share_of(gpu_local_cpus(device_index), local_rank, local_world, num_gpus)
    os.sched_setaffinity(0, cpus)
    return cpus
