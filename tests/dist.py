"""Run a function on several local processes joined by a gloo process group.

Workers assert inside themselves; torch.multiprocessing.spawn re-raises a
worker's exception (with its traceback) in the test process.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, args: tuple, timeout_s: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args, timeout_s: float = 120.0) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes over gloo."""
    mp.spawn(_entry, args=(fn, world_size, free_port(), args, timeout_s), nprocs=world_size, join=True)
