"""tools/scale_model.py: routing statistics against closed forms and byte counters, the node-limited saving, and
the calibration on the measured runs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
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


def test_one_gpu_per_node_sends_nothing_over_nvlink():
    stats = scale_model.simulate_routing(4, 1, 64, 8, max_nodes=4)
    prediction = scale_model.predict(scale_model.Cluster(4, 1, 50.0, 160.0), stats, 1024, 2 * 4096)
    assert prediction["nvlink_MB"] == 0 and prediction["rdma_MB"] > 0


def synthetic_rows(stage, path, floors, fixed_us, efficiency):
    return [scale_model.Measurement("synthetic.json", path, stage, 4, 2, 24, scale_model.FIT_TOKENS, 7168, 8, 256,
                                    fixed_us + floor / efficiency, floor, "") for floor in floors]


def test_fit_recovers_known_costs_from_synthetic_rows():
    rows = (synthetic_rows("dispatch bf16", "intranode", [200.0, 450.0, 900.0], 120.0, 0.9)
            + synthetic_rows("dispatch bf16", "internode", [600.0, 1800.0], 120.0, 0.7)
            + synthetic_rows("combine", "intranode", [300.0, 700.0], 80.0, 0.5)
            + synthetic_rows("combine", "internode", [1000.0], 80.0, 0.6))
    calibration = scale_model.calibrate(rows)
    expected = {("intranode", "dispatch bf16"): (120.0, 0.9), ("internode", "dispatch bf16"): (120.0, 0.7),
                ("intranode", "combine"): (80.0, 0.5), ("internode", "combine"): (80.0, 0.6)}
    assert set(calibration) == set(expected)
    for key, (fixed_us, efficiency) in expected.items():
        assert calibration[key].fixed_us == pytest.approx(fixed_us, rel=1e-9)
        assert calibration[key].efficiency == pytest.approx(efficiency, rel=1e-9)
    assert calibration[("internode", "combine")].rows == 1


def test_fit_never_beats_a_copy_nor_gives_time_back():
    # Rows faster than their copy floor (an untight floor, as with 8 ranks on one GPU): efficiency
    # stays at 1 and the fixed cost at 0 rather than going past what a real link allows.
    faster = synthetic_rows("dispatch bf16", "intranode", [500.0, 1000.0, 2000.0], -100.0, 1.25)
    cost = scale_model.calibrate(faster)[("intranode", "dispatch bf16")]
    assert cost.efficiency == 1.0 and cost.fixed_us == 0.0


@pytest.fixture(scope="module")
def measured():
    measurements = scale_model.load_measurements()
    return measurements, scale_model.calibrate(measurements)


def test_committed_costs_are_what_the_measured_runs_give(measured):
    _, calibration = measured
    assert set(calibration) == set(scale_model.CALIBRATED)
    for key, committed in scale_model.CALIBRATED.items():
        assert calibration[key].fixed_us == pytest.approx(committed.fixed_us, abs=1.0), key
        assert calibration[key].efficiency == pytest.approx(committed.efficiency, abs=0.01), key
        assert (calibration[key].rows, calibration[key].files) == (committed.rows, committed.files), key


def test_calibrated_costs_are_in_a_sane_range(measured):
    _, calibration = measured
    for key, cost in calibration.items():
        assert 50.0 <= cost.fixed_us <= 500.0, key  # per call: host work, notify, launches
        assert 0.5 <= cost.efficiency <= 1.0, key


def test_only_small_calls_and_the_combine_before_unrolling_are_left_out(measured):
    measurements, _ = measured
    reasons = [(m.source, m.path, m.stage, scale_model.exclusion(m)) for m in measurements]
    assert all(reason is None for source, _, _, reason in reasons if source.startswith("prefill"))
    assert all(reason == "host-bound small call" for source, _, _, reason in reasons if source.startswith("decode"))
    left_out_internode = [(source, stage) for source, path, stage, reason in reasons if path == "internode" and reason]
    assert len(left_out_internode) == 6
    assert all(stage.startswith("combine") and "unrolled" not in source for source, stage in left_out_internode)


def test_model_reproduces_the_measured_rows(measured):
    """Tolerance: rms 15 % over all fitted rows, every row within 35 % (8 ranks on one GPU make the copy
    floor loose), the internode rows that the cluster table rests on within 15 %."""
    measurements, calibration = measured
    kept = [m for m in measurements if scale_model.exclusion(m) is None]
    errors = np.array(scale_model.relative_errors(kept, calibration))
    assert np.sqrt(np.mean(errors ** 2)) <= 0.15
    assert np.max(np.abs(errors)) <= 0.35
    internode = [m for m in kept if m.path == "internode"]
    assert np.max(np.abs(scale_model.relative_errors(internode, calibration))) <= 0.15


def test_simulated_router_predicts_the_internode_byte_counters(measured):
    """Within 2 %: the counters also carry ~100 bytes of metadata per row (0.7 %), and each run is one
    4096-token draw of the router."""
    measurements, _ = measured
    checks = scale_model.counter_checks(measurements)
    internode_files = scale_model.INTERNODE_RUNS | scale_model.UNROLLED_RUN
    assert {m.layout for m, *_ in checks} == {"2x2", "2x4", "4x2"} and len(checks) == 3 * len(internode_files)
    for m, leg, counted_mb, predicted_mb in checks:
        assert predicted_mb == pytest.approx(counted_mb, rel=0.02), (m.source, leg)


def test_calibration_report_covers_every_measured_row(measured):
    measurements, calibration = measured
    report = scale_model.calibration_report(measurements, calibration)
    assert report.count(".json |") == len(measurements) + len(scale_model.counter_checks(measurements))
