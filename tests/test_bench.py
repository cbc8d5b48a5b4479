"""The main job: python -m deepcomm.bench on CPU processes prints a checked table and JSON rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
