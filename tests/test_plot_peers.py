"""tools/plot_peers.py: which rows become which bars (the PNG itself is only checked to exist)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import plot_peers  # noqa: E402


def row(path, stage, dtype, sms, us, floor_us=None):
    return {"device": "GPU", "path": path, "stage": stage, "dtype": dtype, "sms": sms, "us": us,
            "floor_us": floor_us, "ranks": 2, "tokens": 8, "hidden": 128, "topk": 2, "experts": 4}


OURS = [
    row("intranode", "layout", "-", None, 30.0),
    row("intranode", "dispatch", "bf16", 8, 400.0, 170.0),
    row("intranode", "dispatch", "bf16", 24, 250.0, 176.0),
    row("intranode", "combine", "bf16", 24, 200.0, 177.0),
    row("intranode", "combine(copied in)", "bf16", 24, 260.0, 177.0),
    row("reference", "dispatch", "bf16", None, 2500.0, 175.0),
    row("internode", "dispatch", "fp8", 24, 310.0, 96.0),
]
PEER = [
    row("deepep", "dispatch", "bf16", 24, 414.0, 180.0),
    row("deepep", "dispatch(cached)", "bf16", 24, 341.0, 180.0),
    row("deepep", "combine", "bf16", 24, 405.0, 181.0),
    row("reference", "dispatch", "bf16", None, 9999.0),  # only the first file's baseline is drawn
]


def test_bars_take_the_sm_count_asked_for_one_baseline_and_the_first_floor():
    found = plot_peers.bars([("ours", OURS), ("DeepEP", PEER)], sms=24)
    assert found[("dispatch", "bf16")] == {
        "ours": 250.0, "reference path (torch.distributed all_to_all)": 2500.0,
        "DeepEP": 414.0, "DeepEP (cached)": 341.0, "copy floor": 176.0}
    assert found[("combine", "bf16")] == {"ours": 200.0, "DeepEP": 405.0, "copy floor": 177.0}
    assert found[("dispatch", "fp8")] == {"ours internode": 310.0, "copy floor": 96.0}
    assert plot_peers.bars([("ours", OURS)], sms=8)[("dispatch", "bf16")]["ours"] == 400.0


def test_cli_writes_a_png_and_rejects_bad_series(tmp_path):
    pytest.importorskip("matplotlib")
    ours, peer = tmp_path / "ours.json", tmp_path / "peer.json"
    ours.write_text(json.dumps(OURS))
    peer.write_text(json.dumps(PEER))
    out = tmp_path / "bars.png"
    plot_peers.main([f"ours={ours}", f"DeepEP={peer}", "--sms", "24", "-o", str(out)])
    assert out.stat().st_size > 0
    with pytest.raises(SystemExit):
        plot_peers.main([str(ours), "-o", str(out)])
    with pytest.raises(SystemExit):
        plot_peers.main([f"ours={ours}", "--sms", "3", "-o", str(out)])
