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
    assert total == _ext.extension().intranode.DATA_OFFSET + 2 * config.slot_bytes(world) + rows * 2 * 7168
    assert 0.6e9 < total < 0.8e9  # ≈ 0.7 GB per rank, as docs/api.md says


@needs_extension
def test_receive_layout_fields_are_aligned_and_disjoint():
    layout = _ext.extension().intranode.recv_layout(1000, 7168, 56, 8)
    starts = [layout[k] for k in ("x", "scales", "topk_idx", "topk_weights", "src_idx")]
    assert starts == sorted(starts) and all(s % 256 == 0 for s in starts)
    assert layout["scales"] >= 1000 * 7168 and layout["total_bytes"] >= layout["src_idx"] + 1000 * 8
