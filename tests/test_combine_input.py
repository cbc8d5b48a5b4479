"""Where combine finds the expert outputs in registered memory (deepcomm.kernel_common), on plain tensors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from deepcomm import SlotReusedError
from deepcomm.kernel_common import combine_input_view, combine_source_offset

HEADER, SLOT, SLOTS = 64, 4096, 2
COMBINE = HEADER + SLOTS * SLOT  # the combine area follows the slots, as in the kernel backends


def _buffer() -> torch.Tensor:
    return torch.zeros(COMBINE + SLOT, dtype=torch.uint8)


def _handle(rows: int = 8, hidden: int = 64) -> SimpleNamespace:
    return SimpleNamespace(num_recv_tokens=rows, hidden=hidden)


def _source(buffer, rows_in, slot, since=0):
    return combine_source_offset(buffer, rows_in, COMBINE, HEADER + slot * SLOT, SLOT, since, SLOTS)


def test_outputs_written_into_combine_input_are_read_in_place():
    buffer = _buffer()
    rows_in = combine_input_view(buffer, HEADER + SLOT, SLOT, _handle(), 0, SLOTS)
    assert rows_in.shape == (8, 64) and rows_in.dtype == torch.bfloat16 and rows_in.grad_fn is None
    rows_in.copy_(torch.arange(8 * 64, dtype=torch.float32).view(8, 64))
    assert _source(buffer, rows_in, slot=1) == HEADER + SLOT
    assert torch.all(buffer[COMBINE:] == 0), "nothing copied into the combine area"
    # A round trip of rows later in the same slot (received x after its routing fields) is in place too.
    assert _source(buffer, buffer[HEADER + SLOT + 1024 : HEADER + SLOT + 2048].view(torch.bfloat16), slot=1) \
        == HEADER + SLOT + 1024


def test_rows_outside_the_buffer_are_copied_into_the_combine_area():
    buffer = _buffer()
    rows_in = torch.randn(8, 64).to(torch.bfloat16)
    assert _source(buffer, rows_in, slot=0) == COMBINE
    assert torch.equal(buffer[COMBINE : COMBINE + rows_in.numel() * 2].view(torch.bfloat16).view(8, 64), rows_in)
    assert _source(buffer, torch.empty(0, 64, dtype=torch.bfloat16), slot=0) == COMBINE  # nothing to move


def test_rows_in_another_dispatchs_slot_or_a_reused_one_are_refused():
    buffer = _buffer()
    other = combine_input_view(buffer, HEADER, SLOT, _handle(), 0, SLOTS)  # slot 0
    with pytest.raises(ValueError, match="^expert_out: it lies in this communicator's buffer but not in the"):
        _source(buffer, other, slot=1)
    straddling = buffer[HEADER + SLOT - 64 : HEADER + SLOT + 64].view(torch.bfloat16)
    with pytest.raises(ValueError, match="^expert_out:"):
        _source(buffer, straddling, slot=0)
    with pytest.raises(SlotReusedError, match="^expert_out: 2 dispatches ran since"):
        _source(buffer, other, slot=0, since=2)
    assert _source(buffer, other, slot=0, since=1) == HEADER


def test_combine_input_of_a_reused_slot_or_too_many_rows_is_refused():
    buffer = _buffer()
    with pytest.raises(SlotReusedError, match="^handle: 2 dispatches ran since"):
        combine_input_view(buffer, HEADER, SLOT, _handle(), 2, SLOTS)
    with pytest.raises(ValueError, match="^handle: 40 rows of 64 bf16 do not fit a receive slot"):
        combine_input_view(buffer, HEADER, SLOT, _handle(rows=40), 0, SLOTS)
