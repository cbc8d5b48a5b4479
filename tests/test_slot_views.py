"""kernel_common.SlotViews: each field of a dispatch result, one as_strided into its receive slot."""

from __future__ import annotations

import pytest
import torch

from deepcomm import _ext, fp8
from deepcomm.kernel_common import PAYLOAD_BF16, PAYLOAD_BF16_TO_FP8, PAYLOAD_FP8, SlotViews, recv_row_shape

pytestmark = pytest.mark.skipif(not _ext.available(), reason="extension not built (recv_layout)")


def explicit(region: torch.Tensor, offset: int, dtype: torch.dtype, rows: int, cols: int) -> torch.Tensor:
    """What the field must be: the bytes at ``offset`` reinterpreted, contiguous [rows, cols]."""
    return region[offset : offset + rows * cols * dtype.itemsize].view(dtype).view(rows, cols)


def same_view(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return (actual.data_ptr() == expected.data_ptr() and actual.shape == expected.shape
            and actual.stride() == expected.stride() and actual.dtype == expected.dtype
            and actual.untyped_storage().data_ptr() == expected.untyped_storage().data_ptr())


@pytest.mark.parametrize("payload", [PAYLOAD_BF16, PAYLOAD_FP8, PAYLOAD_BF16_TO_FP8])
@pytest.mark.parametrize("rows", [0, 1, 37, 300])
def test_every_field_is_the_slot_bytes_its_layout_names(payload, rows):
    hidden, num_topk, slot_bytes, num_slots, start = 512, 6, 1 << 20, 3, 4096
    buffer = torch.zeros(start + num_slots * slot_bytes, dtype=torch.uint8)
    slots = SlotViews.of_slots(buffer, start, slot_bytes, num_slots)
    row_bytes, scale_cols = recv_row_shape(payload, hidden)
    layout = _ext.extension().intranode.recv_layout(rows, row_bytes, scale_cols, num_topk)
    per_expert = torch.zeros(4, dtype=torch.int32)
    for index, slot in enumerate(slots):
        region = buffer[start + index * slot_bytes : start + (index + 1) * slot_bytes]
        result = slot.result(layout, rows, hidden, num_topk, payload, per_expert)
        x_dtype = torch.bfloat16 if payload == PAYLOAD_BF16 else fp8.FP8_DTYPE
        assert same_view(result.x, explicit(region, layout["x"], x_dtype, rows, hidden))
        if payload == PAYLOAD_BF16:
            assert result.x_scales is None
        else:
            assert same_view(result.x_scales, explicit(region, layout["scales"], torch.float32, rows, scale_cols))
        assert same_view(result.topk_idx, explicit(region, layout["topk_idx"], torch.int64, rows, num_topk))
        assert same_view(result.topk_weights, explicit(region, layout["topk_weights"], torch.float32, rows, num_topk))
        assert result.num_tokens_per_expert is per_expert
        # Writes land in the slot's bytes (the kernels' view of them).
        result.topk_idx.fill_(index + 7)
        first_id = int(region[layout["topk_idx"] : layout["topk_idx"] + 8].view(torch.int64))
        assert first_id == (index + 7 if rows > 0 else 0)


def test_a_region_it_cannot_alias_is_refused():
    buffer = torch.empty(4096, dtype=torch.uint8)
    with pytest.raises(ValueError, match="^region:"):
        SlotViews(buffer[8 : 8 + 1024])  # not 16-byte aligned
    with pytest.raises(ValueError, match="^region:"):
        SlotViews(buffer[:1000])  # not a multiple of 16 bytes
    with pytest.raises(ValueError, match="^region:"):
        SlotViews(buffer.view(torch.int32))
