"""Checks shared by the kernel tests (intranode, internode)."""

from __future__ import annotations

import time
from typing import Callable

import pytest
import torch

from deepcomm import CommunicationError, _ext, fp8
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


def combine_from_combine_input(comm, handle, expert_out: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Rows written into ``comm.combine_input(handle)`` lie in registered memory (combine copies
    nothing in) and come back as the reference's combine of the same rows."""
    rows_in = comm.combine_input(handle)
    assert rows_in.dtype == torch.bfloat16 and rows_in.shape == expert_out.shape, what
    if rows_in.numel():  # an empty view's pointer means nothing
        buffer = comm._impl.buffer
        start = rows_in.data_ptr() - buffer.data_ptr()
        assert 0 <= start and start + rows_in.numel() * 2 <= buffer.numel(), f"{what}: not in the registered buffer"
    rows_in.copy_(expert_out)
    same_bits(comm.combine(rows_in, handle), expected, what)


def a_differing_dispatch(x: torch.Tensor, differs: str, num_sms: int) -> tuple[torch.Tensor, dict]:
    """x and the keyword arguments of a dispatch whose call shape differs from its peers' in one field."""
    if differs == "hidden":
        return x[:, : x.shape[1] // 2].contiguous(), {}  # within the buffer: the kernels would run, reading garbage
    if differs == "num_sms":
        return x, {"num_sms": num_sms}
    if differs == "row format":
        return x, {"quantize_fp8": True}
    raise ValueError(f"differs: {differs!r}")


def refused_at_notify(call: Callable[[], object], peers, received: torch.Tensor, what: str) -> None:
    """call raises CommunicationError at the notify, naming one of peers, well before the timeout, and nobody
    dispatched: received (the poisoned receive memory) still holds 0xFF everywhere."""
    start = time.monotonic()
    with pytest.raises(CommunicationError, match="dispatch differs from this rank's") as info:
        call()
    assert info.value.stage == "notify" and info.value.peer in peers, info.value
    assert time.monotonic() - start < 10, "raised only after the timeout"
    torch.cuda.synchronize()
    assert bool((received == 0xFF).all()), f"{what}: rows were written"
