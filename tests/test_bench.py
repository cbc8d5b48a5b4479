"""The main job: python -m deepcomm.bench on CPU processes prints a checked table and JSON rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_bench_runs_on_cpu_processes_and_checks_itself(tmp_path):
    json_path = tmp_path / "rows.json"
    command = [
        sys.executable, "-m", "deepcomm.bench", "--nproc", "4", "--device", "cpu", "--tokens", "64",
        "--hidden", "256", "--experts", "16", "--topk", "4", "--ranks-per-node", "2", "--iters", "2",
        "--warmup", "1", "--routing", "node-limited", "--max-nodes", "1", "--json", str(json_path),
    ]
    out = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "deepcomm bench: device=cpu ranks=4 ranks_per_node=2" in out.stdout
    rows = json.loads(json_path.read_text())
    stages = [(r["stage"], r["dtype"]) for r in rows]
    assert stages == [
        ("layout", "-"), ("dispatch", "bf16"), ("combine", "bf16"), ("dispatch", "fp8"),
        ("combine(fp8 dispatch)", "bf16"),
    ]
    for row in rows:
        assert row["check"] == "ok" and row["path"] == "reference"
        assert row["us"] > 0
        assert {"device", "path", "tokens", "hidden", "topk", "experts", "ranks", "sms", "gbps", "floor_us"} <= row.keys()
    dispatch_bf16 = rows[1]
    # node-limited to 1 of 2 nodes, top-4 of 16: each token reaches 1 or 2 ranks.
    assert 64 * 256 * 2 <= dispatch_bf16["bytes_per_rank"] <= 2 * 64 * 256 * 2


def test_bench_rejects_unknown_dtype(tmp_path):
    command = [sys.executable, "-m", "deepcomm.bench", "--nproc", "1", "--device", "cpu", "--tokens", "8",
               "--hidden", "128", "--experts", "8", "--iters", "1", "--warmup", "0", "--dtypes", "fp4"]
    out = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode != 0
    assert "--dtypes" in out.stderr


@pytest.mark.parametrize("flags,message", [
    (["--iters", "0"], "--iters: must be >= 1"),
    (["--tokens", "-1"], "--tokens: must be >= 1"),
    (["--topk", "9", "--experts", "8"], "--topk: 9 exceeds the 8 experts (--experts)"),
    (["--topk", "100"], "--topk: 100 exceeds the"),  # the preset's experts
    (["--experts", "63", "--nproc", "2"], "--experts: 63 is not a multiple of the 2 ranks"),
    (["--ranks-per-node", "3", "--nproc", "2"], "--ranks-per-node: 3 does not divide the 2 ranks"),
    (["--hidden", "100"], "--hidden: fp8 rows need a multiple of 128 channels, got 100"),
    (["--sms", "abc"], "--sms: expected a comma list"),
    (["--sms", "24,0"], "--sms: SM counts must be >= 1"),
    (["--timeout", "0"], "--timeout: must be a positive number"),
    (["--dtypes", "bf16,xx"], "--dtypes: expected a comma list of bf16, fp8"),
    (["--json", "/nonexistent/x.json"], "--json: the folder of"),
])
def test_bench_flags_are_checked_before_any_rank_starts(flags, message, capsys):
    from deepcomm import bench

    with pytest.raises(SystemExit):
        bench.parse_args(flags)
    assert message in capsys.readouterr().err


def test_rows_kept_local_counts_own_rows_and_rows_forwarded_to_self():
    import torch

    from deepcomm.bench_floor import rows_kept_local
    from deepcomm.topology import Topology

    # 4 ranks as 2 nodes x 2; tokens_to_rank[s, d] = 10 * s + d + 1 (all distinct).
    matrix = torch.tensor([[10 * s + d + 1 for d in range(4)] for s in range(4)])
    topo = Topology(rank=1, world_size=4, ranks_per_node=2)
    assert rows_kept_local(matrix, topo, hierarchical=False) == matrix[1, 1]
    # Rank 1's partner on node 1 is rank 3: its rows for rank 1 arrive across and stay with rank 1.
    assert rows_kept_local(matrix, topo, hierarchical=True) == matrix[1, 1] + matrix[3, 1]
    two_by_one = Topology(rank=0, world_size=2, ranks_per_node=1)
    assert rows_kept_local(matrix[:2, :2], two_by_one, hierarchical=True) == matrix[0, 0] + matrix[1, 0]


def _ab_table(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "ab_table.py"), *args], capture_output=True,
                          text=True, timeout=60)


def _row(stage: str, us: float, floor_us: float | None, check: str = "ok", sms: int | None = 24) -> dict:
    return {"device": "gpu", "path": "internode", "dtype": "fp8", "stage": stage, "tokens": 4096, "hidden": 7168,
            "topk": 8, "experts": 256, "ranks": 4, "ranks_per_node": 2, "sms": sms, "us": us, "gbps": None,
            "bytes_per_rank": 1, "floor_us": floor_us, "check": check, "note": ""}


def test_ab_table_pairs_rows_of_two_builds_and_takes_medians(tmp_path):
    runs = {
        "base_1": [_row("layout", 60.0, None, sms=None), _row("dispatch", 900.0, 300.0)],
        "base_2": [_row("layout", 70.0, None, sms=None), _row("dispatch", 1000.0, 400.0)],
        "this_1": [_row("dispatch", 500.0, 250.0), _row("combine", 10.0, 5.0)],
        "this_2": [_row("dispatch", 700.0, 350.0, check="FAILED on 1 rank(s)")],
    }
    for name, rows in runs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(rows))
    out = _ab_table("--base", str(tmp_path / "base_1.json"), str(tmp_path / "base_2.json"),
                    "--this", str(tmp_path / "this_1.json"), str(tmp_path / "this_2.json"),
                    "--json", str(tmp_path / "ab.json"))
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "ab.json").read_text())
    assert len(rows) == 1  # combine and layout were measured by one build only
    row = rows[0]
    assert row["stage"] == "dispatch" and row["base_us"] == 950.0 and row["this_us"] == 600.0
    assert abs(row["this_over_base"] - 600.0 / 950.0) < 1e-12
    assert abs(row["base_floor_ratio"] - (3.0 + 2.5) / 2) < 1e-12 and row["this_floor_ratio"] == 2.0
    assert row["runs"] == "2/2" and row["checks"] == "FAILED"
    assert "internode" in out.stdout and "FAILED" in out.stdout

    (tmp_path / "only_layout.json").write_text(json.dumps([_row("layout", 1.0, None, sms=None)]))
    (tmp_path / "only_combine.json").write_text(json.dumps([_row("combine", 1.0, None)]))
    empty = _ab_table("--base", str(tmp_path / "only_layout.json"), "--this", str(tmp_path / "only_combine.json"))
    assert empty.returncode != 0 and "no row in common" in empty.stderr


def test_ab_table_spread_gives_each_rows_fastest_median_and_slowest_run(tmp_path):
    runs = [[_row("dispatch", us, 20.0), _row("combine", us / 2, 20.0)] for us in (100.0, 190.0, 110.0)]
    runs[1][1]["check"] = "FAILED on 1 rank(s)"
    paths = []
    for i, rows in enumerate(runs):
        paths.append(str(tmp_path / f"decode_{i}.json"))
        (tmp_path / f"decode_{i}.json").write_text(json.dumps(rows))
    out = _ab_table("--spread", *paths, "--json", str(tmp_path / "spread.json"))
    assert out.returncode == 0, out.stderr
    dispatch, combine = json.loads((tmp_path / "spread.json").read_text())
    assert (dispatch["min_us"], dispatch["median_us"], dispatch["max_us"]) == (100.0, 110.0, 190.0)
    assert dispatch["max_over_min"] == 1.9 and dispatch["runs"] == 3 and dispatch["checks"] == "ok"
    assert combine["checks"] == "FAILED" and "FAILED" in out.stdout.splitlines()[2]
    both = _ab_table("--spread", paths[0], "--base", paths[1])
    assert both.returncode != 0 and "--spread" in both.stderr
    neither = _ab_table("--this", paths[0])
    assert neither.returncode != 0 and "--base and --this" in neither.stderr


def test_ab_table_reads_the_benchmarks_own_rows(tmp_path):
    paths = []
    for side in ("base", "this"):
        path = tmp_path / f"{side}.json"
        command = [sys.executable, "-m", "deepcomm.bench", "--nproc", "2", "--device", "cpu", "--tokens", "16",
                   "--hidden", "128", "--experts", "8", "--topk", "2", "--iters", "1", "--warmup", "0",
                   "--json", str(path)]
        out = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        paths.append(str(path))
    out = _ab_table("--base", paths[0], "--this", paths[1])
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1 + 5  # header + layout, dispatch and combine for bf16 and fp8
    assert all(line.endswith("ok") for line in lines[1:])


def test_bench_low_latency_mode_on_cpu_processes(tmp_path):
    """--mode low-latency on CPU: the reference path's low-latency rows, each checked (the kernels' rows, the
    graph replays among them, need a GPU)."""
    json_path = tmp_path / "rows.json"
    command = [
        sys.executable, "-m", "deepcomm.bench", "--nproc", "2", "--device", "cpu", "--tokens", "32",
        "--hidden", "256", "--experts", "8", "--topk", "4", "--iters", "2", "--warmup", "1",
        "--mode", "low-latency", "--plain-launch", "--json", str(json_path),
    ]
    out = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(json_path.read_text())
    assert [(r["stage"], r["dtype"]) for r in rows] == [
        ("layout", "-"), ("ll_dispatch", "bf16"), ("ll_dispatch(weights)", "bf16"), ("ll_dispatch", "fp8"),
        ("ll_dispatch(weights)", "fp8"), ("ll_combine", "bf16"), ("ll_round_trip", "bf16"),
        ("ll_round_trip(owners)", "bf16"),
    ]
    for row in rows:
        assert row["check"] == "ok" and row["path"] == "reference", row
    dispatch_bf16 = rows[1]
    # One row per (token, expert), top-4 of 8 experts on 2 ranks: each rank receives about half of 2 x 32 x 4.
    assert 0 < dispatch_bf16["bytes_per_rank"] <= 2 * 32 * 4 * 256 * 2
    # The combine is derived (round trip less dispatch): its note says so, and says when the difference is noise.
    combine = rows[5]
    assert combine["note"].startswith("weighted; round trip - dispatch")
    assert (combine["us"] > 0) == ("not a time" not in combine["note"])
    # --dtypes holds in this mode too: bf16 only, no fp8 rows.
    out = subprocess.run(command + ["--dtypes", "bf16"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert {r["dtype"] for r in json.loads(json_path.read_text())} == {"-", "bf16"}


def test_the_low_latency_kernels_rows_say_how_they_were_launched():
    from deepcomm.bench import Row
    from deepcomm.bench_low_latency import _noting

    def row(path, dtype, stage, sms, us, bytes_per_rank, floor_us, check, note=""):
        return Row("cpu", path, dtype, stage, 8, 16, 2, 4, 2, 2, sms, us, None, bytes_per_rank, floor_us, check, note)

    noted = _noting(row, "low_latency", "kernels launched early")
    assert noted("low_latency", "bf16", "ll_dispatch", 24, 1.0, 0, None, "ok").note == "kernels launched early"
    assert noted("low_latency", "bf16", "ll_dispatch", 24, 1.0, 0, None, "ok", "no host wait").note == \
        "no host wait; kernels launched early"
    assert noted("reference", "bf16", "ll_dispatch", None, 1.0, 0, None, "ok", "x").note == "x"
