from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist import free_port


def cuda_available() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_multi = pytest.mark.skip(reason="needs several CUDA GPUs")
    for item in items:
        if "gpu" in item.keywords and not cuda_available():
            item.add_marker(skip_gpu)
        if "multigpu" in item.keywords and (not cuda_available() or torch.cuda.device_count() < 2):
            item.add_marker(skip_multi)


@pytest.fixture(scope="session")
def single_rank_group():
    """A one-rank gloo world in the test process, for checks that need a group but no peers."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield dist.group.WORLD
