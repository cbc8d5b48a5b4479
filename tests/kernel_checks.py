"""Checks shared by the kernel tests (intranode, internode)."""

from __future__ import annotations

import pytest
import torch

from deepcomm import _ext, fp8
from deepcomm.launch import mps_running


def require_ranks(world_size: int) -> None:
    if not _ext.available():
        pytest.skip("extension not built")
    if world_size > torch.cuda.device_count() and not mps_running():
        pytest.skip("ranks outnumber GPUs and no CUDA MPS daemon answers (use tools/gpu_check.sh)")


def same_bits(actual: torch.Tensor | None, expected: torch.Tensor | None, what: str) -> None:
    if expected is None:
        assert actual is None, what
        return
    actual, expected = actual.cpu(), expected.cpu()
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{what}: {actual.dtype}{tuple(actual.shape)} != {expected.dtype}{tuple(expected.shape)}")
    same = torch.equal(actual.contiguous().view(torch.uint8), expected.contiguous().view(torch.uint8))
    assert same, f"{what}: differs in {int((actual.float() != expected.float()).sum())} elements"


def dispatch_both(comm, inputs, mode: str, num_experts: int, num_sms: int):
    kwargs = {}
    x = inputs.x
    if mode == "fp8":
        x, kwargs["x_scales"] = fp8.quantize_fp8(inputs.x)
    elif mode.startswith("quantize"):
        kwargs.update(quantize_fp8=True, power_of_two_scales=mode.endswith("pow2"))
    ours = comm.dispatch(x, inputs.topk_idx, inputs.topk_weights, num_experts, num_sms=num_sms, **kwargs)
    theirs = comm.reference.dispatch(x, inputs.topk_idx, inputs.topk_weights, num_experts, **kwargs)
    return ours, theirs
