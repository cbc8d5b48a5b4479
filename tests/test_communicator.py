"""Backend choice and buffer sizing (no GPU needed)."""

from __future__ import annotations

import pytest
import torch

import deepcomm
from deepcomm import _ext

needs_extension = pytest.mark.skipif(not _ext.available(), reason="extension not built")


def test_auto_falls_back_to_the_reference_without_a_gpu(single_rank_group, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    comm = deepcomm.Communicator(single_rank_group, buffer=deepcomm.BufferConfig(64, 256))
    assert comm.backend == "reference"
    assert deepcomm.Communicator(single_rank_group).backend == "reference"  # no buffer: reference


def test_intranode_needs_a_buffer(single_rank_group):
    with pytest.raises(ValueError, match="^buffer:"):
        deepcomm.Communicator(single_rank_group, backend="intranode")
    with pytest.raises(TypeError, match="^buffer:"):
        deepcomm.Communicator(single_rank_group, buffer={"max_tokens_per_rank": 4})
    with pytest.raises(ValueError, match="^timeout_s:"):
        deepcomm.Communicator(single_rank_group, timeout_s=0)


@pytest.mark.parametrize("field", ["max_tokens_per_rank", "hidden", "num_topk", "num_recv_slots"])
def test_buffer_config_rejects_non_positive_sizes(field):
    kwargs = dict(max_tokens_per_rank=8, hidden=128, num_topk=2, num_recv_slots=2)
    kwargs[field] = 0
    with pytest.raises(ValueError, match=f"^{field}:"):
        deepcomm.BufferConfig(**kwargs)


@needs_extension
def test_buffer_holds_the_worst_case_receive():
    config = deepcomm.BufferConfig(max_tokens_per_rank=4096, hidden=7168, num_topk=8)
    world = 4
    rows = 4096 * world  # every token of every rank to one rank
    bf16_rows = rows * 2 * 7168 + rows * 8 * (8 + 4) + rows * 8
    assert config.slot_bytes(world) >= bf16_rows
    total = config.total_bytes(world)
    assert config.landing_bytes(world) == 0  # combines pull: no landing area
    assert total == _ext.extension().intranode.DATA_OFFSET + 2 * config.slot_bytes(world) + rows * 2 * 7168
    assert 0.6e9 < total < 0.8e9  # ≈ 0.7 GB per rank, as docs/api.md says
    pushing = deepcomm.BufferConfig(max_tokens_per_rank=4096, hidden=7168, num_topk=8, push_combine_min_bytes=0)
    landing = 4096 * (world - 1) * 2 * 7168  # every peer's rows of this rank's tokens, pushed back
    assert pushing.landing_bytes(world) == landing and pushing.total_bytes(world) == total + landing


@needs_extension
def test_the_internode_path_refuses_to_push_a_combine():
    from deepcomm.internode import InternodeCommunicator
    from deepcomm.topology import Topology

    config = deepcomm.BufferConfig(max_tokens_per_rank=8, hidden=128, push_combine_min_bytes=0)
    with pytest.raises(ValueError, match="^push_combine_min_bytes: only the intranode path"):
        InternodeCommunicator(None, Topology(0, 4, 2), config, 24, 10.0)


@pytest.mark.parametrize("value", [-1, 1.5, True, "32M"])
def test_buffer_config_rejects_a_bad_push_threshold(value):
    with pytest.raises(ValueError, match="^push_combine_min_bytes:"):
        deepcomm.BufferConfig(max_tokens_per_rank=8, hidden=128, push_combine_min_bytes=value)


@needs_extension
def test_receive_layout_fields_are_aligned_and_disjoint():
    layout = _ext.extension().intranode.recv_layout(1000, 7168, 56, 8)
    starts = [layout[k] for k in ("x", "scales", "topk_idx", "topk_weights", "src_idx")]
    assert starts == sorted(starts) and all(s % 256 == 0 for s in starts)
    assert layout["scales"] >= 1000 * 7168 and layout["total_bytes"] >= layout["src_idx"] + 1000 * 8


@needs_extension
def test_slot_check_returns_this_ranks_layout_and_names_the_rank_that_overflows():
    from deepcomm.kernel_common import PAYLOAD_BF16, PAYLOAD_FP8, check_slot_sizes

    recv_layout = _ext.extension().intranode.recv_layout
    totals = [300, 0, 1200, 800]
    slot_bytes = recv_layout(1200, 2 * 7168, 0, 8)["total_bytes"]
    for rank in range(4):
        assert check_slot_sizes(totals, PAYLOAD_BF16, 7168, 8, slot_bytes, rank) == \
            recv_layout(totals[rank], 2 * 7168, 0, 8)
    assert check_slot_sizes(totals, PAYLOAD_FP8, 7168, 8, slot_bytes, 1) == recv_layout(0, 7168, 56, 8)
    with pytest.raises(ValueError, match="^x: rank 2 would receive 1200 rows"):
        check_slot_sizes(totals, PAYLOAD_BF16, 7168, 8, slot_bytes - 1, 0)


def test_internode_needs_a_buffer_and_a_known_transport(single_rank_group):
    with pytest.raises(ValueError, match="^buffer: the internode backend"):
        deepcomm.Communicator(single_rank_group, backend="internode")
    with pytest.raises(ValueError, match="^transport:"):
        deepcomm.Communicator(single_rank_group, transport="rdma")
    with pytest.raises(ValueError, match="^backend: byte counters"):
        deepcomm.Communicator(single_rank_group).traffic()


@needs_extension
def test_internode_rows_and_areas_hold_what_the_kernels_write():
    kernels = _ext.extension().internode
    hidden, topk, per_node = 7168, 8, 4
    bf16 = kernels.row_stride(2 * hidden, 0, per_node, topk)
    fp8_row = kernels.row_stride(hidden, hidden // 128, per_node, topk)
    # x, then source token, a destination row per rank of the node, expert ids and weights; 16-byte units.
    assert bf16 == -(-(2 * hidden + 4 + 4 * per_node + 8 * topk) // 16) * 16
    assert fp8_row >= hidden + 4 * (hidden // 128) + 4 + 4 * per_node + 8 * topk and fp8_row % 16 == 0
    layout = kernels.transport_layout(8, per_node, 4096, hidden, topk)
    assert layout["area_rows"] >= 4096 + kernels.MAX_CHANNELS - 1  # channels round their share up
    assert layout["dispatch_stride"] == max(bf16, fp8_row)
    two_nodes = 2 * layout["area_rows"]
    assert layout["combine_recv"] - layout["dispatch_recv"] >= 2 * two_nodes * layout["dispatch_stride"]
    assert layout["total_bytes"] >= layout["combine_recv"] + 2 * two_nodes * 2 * hidden
    assert kernels.num_channels(24) == 12 and kernels.num_channels(3) == 2
    assert kernels.slot_row_bytes(2 * hidden, 0, topk) == 2 * hidden + topk * 12 + 8


def test_kernel_payload_needs_rows_on_a_16_byte_boundary():
    from deepcomm.kernel_common import PAYLOAD_BF16, PAYLOAD_FP8, payload_of

    storage = torch.empty(4 * 128 + 8, dtype=torch.bfloat16)
    assert payload_of(storage[8:].view(4, 128), False, False) == PAYLOAD_BF16  # 16 bytes in: aligned
    with pytest.raises(ValueError, match=r"^x: must start at a 16-byte boundary .* storage offset 1\)"):
        payload_of(storage[1 : 1 + 4 * 128].view(4, 128), False, False)
    fp8_rows = torch.empty(2 * 128, dtype=torch.uint8).view(torch.float8_e4m3fn).view(2, 128)
    assert payload_of(fp8_rows, False, False) == PAYLOAD_FP8
    with pytest.raises(ValueError, match="^x: rows must be a multiple of 16 bytes"):
        payload_of(torch.empty(2, 4, dtype=torch.bfloat16), False, False)
