"""tools/peer_copy_rates.py and the bulk copy it times: what can be checked without a GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import peer_copy_rates  # noqa: E402

from deepcomm import _ext  # noqa: E402


def test_arguments_are_checked_by_name():
    args = peer_copy_rates.parse_args(["--sms", "16,24", "--megabytes", "8"])
    assert args.sms == [16, 24] and args.megabytes == 8
    for bad in (["--sms", "24,x"], ["--sms", "0"], ["--megabytes", "0"], ["--iters", "0"], ["--warmup", "-1"],
                ["--json", "/no/such/folder/rows.json"]):
        with pytest.raises(SystemExit):
            peer_copy_rates.parse_args(bad)


def test_every_way_is_timed_and_each_checks_the_rank_that_wrote_or_was_read():
    cpu = torch.device("cpu")
    landing = peer_copy_rates.source_bytes(2, 4096, cpu)
    # Pushing ways: the previous rank wrote here; pulling ways: this rank read the next rank's bytes.
    assert peer_copy_rates.landed_ok("store", 3, 4, landing, cpu)
    assert peer_copy_rates.landed_ok("copy engine", 3, 4, landing, cpu)
    assert peer_copy_rates.landed_ok("bulk load", 1, 4, landing, cpu)
    assert not peer_copy_rates.landed_ok("load", 3, 4, landing, cpu)
    assert peer_copy_rates.landed_ok("load", 0, 3, peer_copy_rates.source_bytes(1, 4096, cpu), cpu)
    landing[100] ^= 1  # one byte that did not land
    assert not peer_copy_rates.landed_ok("store", 3, 4, landing, cpu)
    calls = peer_copy_rates.ways(None, *(torch.empty(16, dtype=torch.uint8),) * 4, stream=0)
    assert tuple(calls) == peer_copy_rates.WAYS


def test_bulk_copy_refuses_bad_sizes_and_addresses_by_name():
    if not _ext.available() or not hasattr(_ext.extension(), "bulk_copy"):
        pytest.skip("extension not built with CUDA")
    core = _ext.extension()
    with pytest.raises(ValueError, match="^bytes"):
        core.bulk_copy(4096, 8192, 15, 24, 0)
    with pytest.raises(ValueError, match="^num_blocks"):
        core.bulk_copy(4096, 8192, 16, 0, 0)
    with pytest.raises(ValueError, match="^dst"):
        core.bulk_copy(4100, 8192, 16, 24, 0)
    with pytest.raises(ValueError, match="^src"):
        core.bulk_copy(4096, 8200, 16, 24, 0)
