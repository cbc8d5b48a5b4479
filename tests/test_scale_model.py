"""tools/scale_model.py: routing statistics against closed forms, and the node-limited saving."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import scale_model  # noqa: E402


@pytest.mark.parametrize("nodes,gpus,experts,topk", [(4, 8, 256, 8), (2, 4, 64, 6), (8, 8, 256, 8)])
def test_simulated_ranks_per_token_match_the_closed_form_without_node_limit(nodes, gpus, experts, topk):
    stats = scale_model.simulate_routing(nodes, gpus, experts, topk, max_nodes=nodes, tokens=16384)
    assert stats.ranks_per_token == pytest.approx(scale_model.uniform_distinct(nodes * gpus, experts, topk), rel=0.02)
    assert stats.nodes_per_token == pytest.approx(scale_model.uniform_distinct(nodes, experts, topk), rel=0.02)


def test_node_limit_bounds_nodes_and_saves_boundary_bytes():
    limited = scale_model.simulate_routing(8, 8, 256, 8, max_nodes=2)
    assert limited.nodes_per_token <= 2.0 + 1e-9
    cluster = scale_model.Cluster(8, 8, 50.0, 160.0)
    prediction = scale_model.predict(cluster, limited, 4096, 2 * 7168)
    assert prediction["rdma_MB"] < prediction["flat_rdma_MB"]
    assert prediction["total_us"] >= max(prediction["rdma_us"], prediction["nvlink_us"])


def test_single_node_has_no_rdma_leg():
    stats = scale_model.simulate_routing(1, 8, 64, 8, max_nodes=1)
    prediction = scale_model.predict(scale_model.Cluster(1, 8, 50.0, 160.0), stats, 1024, 2 * 4096)
    assert prediction["rdma_MB"] == 0 and prediction["rdma_us"] == 0 and prediction["nvlink_MB"] > 0
