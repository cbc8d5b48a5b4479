"""Predict dispatch/combine time on real clusters from routing statistics, link speeds and measured runs.

    python tools/scale_model.py                        # DeepSeek-V3-sized EP32 .. EP256 table
    python tools/scale_model.py --ep 16 64 --nic-gbps 50 --nvlink-gbps 160
    python tools/scale_model.py --calibrate            # the fit behind the defaults, row by row

Model (hierarchical, node-limited dispatch as deepcomm's internode path does it):
- every token crosses the node boundary once per *remote* destination node (RDMA leg);
- inside a destination node it is forwarded to each other rank that holds one of its experts
  (NVLink leg), and tokens for ranks of the sender's own node go over NVLink directly;
- the two legs run concurrently; a plain copy would take max(RDMA, NVLink) at what the links give a
  copy, deepcomm's kernels reach ``efficiency`` of that copy, and every call costs ``fixed_us`` more.
Combine moves the same rows back (bf16), so its bytes equal bf16 dispatch's. One node uses the flat
intranode path (every row straight over NVLink) and its own calibration.

Routing statistics (expected distinct nodes and ranks per token) come from simulating
deepcomm.routing.node_limited_topk on random logits; the tests check them against closed forms and
against the byte counters of the measured internode runs.

Calibration: ``efficiency`` and ``fixed_us`` per (path, stage) are fitted on the benchmark rows of
``CALIBRATION_RUNS`` in docs/data (see :func:`calibrate`), measured in one session on one H200 with the
current kernels. Those runs shared the GPU between ranks (MPS), so their absolute GB/s do not
transfer; what does is how close the kernels come to a plain copy of their bytes, and the per-call
cost. What a copy reaches on a real link is not measurable on one GPU: ``ASSUMPTIONS`` keeps
published figures for it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deepcomm.routing import node_limited_topk

DATA_DIR = Path(__file__).resolve().parent.parent / "docs" / "data"
# One session on one H200 with the current kernels (docs/benchmarks.md, "Scale model"): three internode
# layouts, each with the flat intranode path on the same ranks, and the intranode prefill sweep over SMs.
CALIBRATION_RUNS = ("cal_h200_inter_2x2.json", "cal_h200_inter_2x4.json", "cal_h200_inter_4x2.json",
                    "cal_h200_prefill_2ranks.json", "cal_h200_prefill_4ranks.json")
INTERNODE_CALIBRATION_RUNS = frozenset(name for name in CALIBRATION_RUNS if "_inter_" in name)
KERNEL_PATHS = ("intranode", "internode")
# Combine of a fresh tensor (not rows in the receive slot), which first copies it into registered memory
# (kernel_common.combine_source_offset); the bench times it as "combine(copied in)".
COPIED_COMBINE = "combine, copied in"
# Bench stage names (with their dtype for dispatch) -> calibrated stage. "combine(fp8 dispatch)" is the
# combine after an fp8 dispatch, its rows in the receive slot like plain "combine".
BENCH_STAGES = {"combine": "combine", "combine(fp8 dispatch)": "combine", "combine(copied in)": COPIED_COMBINE}
# Calls of the table's size; at 128 tokens the ~400 µs of host work per call is not hidden behind the
# kernels (docs/benchmarks.md, "Where the time goes"), so a fixed cost fitted there would not hold
# (every row of CALIBRATION_RUNS is a 4096-token call).
FIT_TOKENS = 4096
BENCH_MAX_NODES = 2  # --max-nodes of the recorded internode runs (docs/benchmarks.md)


@dataclass(frozen=True)
class StageCost:
    fixed_us: float  # per call: host work, notify, launches
    efficiency: float  # of a plain copy of the same bytes over the same links, at most 1
    rows: int  # measured rows its efficiency was fitted on ...
    files: frozenset[str]  # ... and their files in docs/data

    @property
    def source(self) -> str:
        return f"{self.rows} row{'s' if self.rows > 1 else ''} of {', '.join(sorted(self.files))}"


# Fitted by calibrate() (`--calibrate` prints the fit, row by row); a test refits and checks these
# still match. An efficiency of 1.00 sits at its bound: there the data show no per-byte cost beyond
# a copy's, and the whole gap to the copy is per call.
CALIBRATED = {
    ("intranode", "dispatch bf16"): StageCost(51.0, 1.00, 11, frozenset(CALIBRATION_RUNS)),
    ("internode", "dispatch bf16"): StageCost(51.0, 1.00, 3, INTERNODE_CALIBRATION_RUNS),
    ("intranode", "dispatch fp8"): StageCost(166.0, 1.00, 11, frozenset(CALIBRATION_RUNS)),
    ("internode", "dispatch fp8"): StageCost(166.0, 1.00, 3, INTERNODE_CALIBRATION_RUNS),
    ("intranode", "combine"): StageCost(64.0, 1.00, 22, frozenset(CALIBRATION_RUNS)),
    ("internode", "combine"): StageCost(64.0, 1.00, 6, INTERNODE_CALIBRATION_RUNS),
    ("intranode", COPIED_COMBINE): StageCost(76.0, 0.56, 11, frozenset(CALIBRATION_RUNS)),
    ("internode", COPIED_COMBINE): StageCost(76.0, 0.62, 3, INTERNODE_CALIBRATION_RUNS),
}
CALIBRATION_METHOD = (
    f"calibrate(): us = fixed_us + copy floor us / efficiency over the {FIT_TOKENS}-token kernel rows of docs/data, "
    "least squares of the relative error; one fixed_us per stage shared by both paths, one efficiency per path, "
    "fixed_us >= 0, efficiency <= 1; a combine after an fp8 dispatch (rows in the receive slot) counts as combine"
)
# What a plain copy reaches of each link's nominal speed: not measurable on one GPU, so assumed from
# published figures.
ASSUMPTIONS = {
    "nvlink_efficiency": (0.96, ("DeepEP v1 reached 153-158 GB/s per H800 of its 160 GB/s NVLink (published); on "
                                 "an H200, SM-driven stores reached 334 of 478 GB/s, 0.70 (../shared/BENCHMARKS.md)")),
    "nic_efficiency": (0.90, ("DeepEP v1 reached 43-58 GB/s per GPU on 50 GB/s InfiniBand (published); kept from "
                              "the uncalibrated model")),
}


@dataclass(frozen=True)
class RoutingStats:
    nodes_per_token: float  # distinct destination nodes
    remote_nodes_per_token: float  # distinct destination nodes other than the sender's
    ranks_per_token: float  # distinct destination ranks
    local_ranks_per_token: float  # destination ranks on the sender's node
    remote_experts_per_token: float  # (token, expert) pairs on other nodes: rows without node dedup


def uniform_distinct(groups: int, experts: int, topk: int) -> float:
    """Expected distinct groups hit by top-k of ``experts`` chosen uniformly (groups of equal size)."""
    per_group = experts // groups
    miss = math.comb(experts - per_group, topk) / math.comb(experts, topk)
    return groups * (1.0 - miss)


def simulate_routing(nodes: int, gpus_per_node: int, experts: int, topk: int, max_nodes: int,
                     tokens: int = 8192, seed: int = 0) -> RoutingStats:
    """Routing statistics of the node-limited router on random logits, seen from rank 0."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=generator)
    topk_idx, _ = node_limited_topk(logits, topk, nodes, max_nodes)
    ranks = topk_idx // (experts // (nodes * gpus_per_node))
    mask = torch.zeros(tokens, nodes * gpus_per_node, dtype=torch.bool)
    mask.scatter_(1, ranks, True)
    node_mask = mask.view(tokens, nodes, gpus_per_node).any(-1)
    return RoutingStats(
        nodes_per_token=float(node_mask.sum(1).float().mean()),
        remote_nodes_per_token=float(node_mask[:, 1:].sum(1).float().mean()),
        ranks_per_token=float(mask.sum(1).float().mean()),
        local_ranks_per_token=float(mask[:, :gpus_per_node].sum(1).float().mean()),
        remote_experts_per_token=float((ranks >= gpus_per_node).sum(1).float().mean()),
    )


def counted_rows_per_token(stats: RoutingStats) -> dict[str, float]:
    """Rows per token on each leg of a hierarchical dispatch as the kernels' byte counters count them
    (rows a rank writes to itself included)."""
    return {
        "boundary": stats.remote_nodes_per_token,
        "nvlink direct": stats.local_ranks_per_token,
        "nvlink forwarded": stats.ranks_per_token - stats.local_ranks_per_token,
    }


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    nic_gbps: float  # per GPU, one direction, nominal
    nvlink_gbps: float  # per GPU, one direction, nominal
    nic_efficiency: float = ASSUMPTIONS["nic_efficiency"][0]
    nvlink_efficiency: float = ASSUMPTIONS["nvlink_efficiency"][0]

    @property
    def path(self) -> str:
        return "internode" if self.nodes > 1 else "intranode"


def predict(cluster: Cluster, stats: RoutingStats, tokens: int, row_bytes: int, stage: str = "dispatch bf16",
            calibration: dict[tuple[str, str], StageCost] = CALIBRATED) -> dict[str, float]:
    """Per-rank bytes on each leg and the predicted µs of one call of ``stage`` (a key of ``calibration``)."""
    cost = calibration[(cluster.path, stage)]
    rdma_bytes = tokens * stats.remote_nodes_per_token * row_bytes
    # Each (token, destination rank) row crosses NVLink once, sent by the sender on its own node or
    # forwarded by the rank that received it over RDMA, unless that rank is the destination itself; by
    # symmetry a given rank is one of the h ranks a token reaches on a node with probability h / gpus_per_node.
    nvlink_bytes = tokens * stats.ranks_per_token * (1.0 - 1.0 / cluster.gpus_per_node) * row_bytes
    rdma_us = rdma_bytes / (cluster.nic_gbps * 1e3 * cluster.nic_efficiency) if cluster.nodes > 1 else 0.0
    nvlink_us = nvlink_bytes / (cluster.nvlink_gbps * 1e3 * cluster.nvlink_efficiency)
    flat_rdma_bytes = tokens * stats.remote_experts_per_token * row_bytes
    return {
        "rdma_MB": rdma_bytes / 1e6,
        "nvlink_MB": nvlink_bytes / 1e6,
        "rdma_us": rdma_us,
        "nvlink_us": nvlink_us,
        "total_us": max(rdma_us, nvlink_us) / cost.efficiency + cost.fixed_us,
        "flat_rdma_MB": flat_rdma_bytes / 1e6,
    }


# ---- calibration on measured runs ------------------------------------------------------------------

@dataclass(frozen=True)
class Measurement:
    """One timed kernel call of a benchmark run (a row of docs/data/*.json)."""
    source: str  # file name
    path: str  # intranode | internode
    stage: str  # dispatch bf16 | dispatch fp8 | combine | COPIED_COMBINE
    ranks: int
    ranks_per_node: int
    sms: int
    tokens: int
    hidden: int
    topk: int
    experts: int
    us: float
    floor_us: float  # a plain copy of the same bytes on the same SMs, all ranks at once, same run
    note: str

    @property
    def layout(self) -> str:
        return f"{self.ranks // self.ranks_per_node}x{self.ranks_per_node}"


def stage_of(row: dict) -> str | None:
    """The calibrated stage a benchmark row times, or None for rows without bytes (layout, matmul)."""
    if row["stage"] == "dispatch":
        return f"dispatch {row['dtype']}"
    return BENCH_STAGES.get(row["stage"])


def load_measurements(files: tuple[str, ...] = CALIBRATION_RUNS, data_dir: Path = DATA_DIR) -> list[Measurement]:
    """The kernel rows of the benchmark files that have a copy floor."""
    measurements = []
    for name in files:
        for row in json.loads((data_dir / name).read_text()):
            stage = stage_of(row)
            if row["path"] not in KERNEL_PATHS or stage is None or not row["floor_us"]:
                continue
            measurements.append(Measurement(
                name, row["path"], stage, row["ranks"], row["ranks_per_node"], row["sms"], row["tokens"],
                row["hidden"], row["topk"], row["experts"], row["us"], row["floor_us"], row["note"]))
    return measurements


def exclusion(measurement: Measurement) -> str | None:
    """Why a measured row is left out of the fit, or None."""
    if measurement.tokens != FIT_TOKENS:
        return "host-bound small call"
    return None


def bounded_least_squares(design: np.ndarray, target: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """argmin |design @ params - target|² subject to params >= lower.

    The problem is convex, so its minimum is the unconstrained least-squares solution over some set of
    free parameters with the others held at their bounds; with the two or three parameters here,
    trying every such set is exact and short.
    """
    best, best_cost = lower.copy(), float(np.sum((design @ lower - target) ** 2))
    for held in itertools.product((False, True), repeat=design.shape[1]):
        free = ~np.array(held)
        if not free.any():
            continue
        params = lower.copy()
        rest = target - design[:, ~free] @ lower[~free]
        params[free] = np.linalg.lstsq(design[:, free], rest, rcond=None)[0]
        cost = float(np.sum((design @ params - target) ** 2))
        if np.all(params >= lower - 1e-12) and cost < best_cost:
            best, best_cost = params, cost
    return best


def fit_stage(measurements: list[Measurement]) -> dict[str, StageCost]:
    """One stage's cost per path: us = fixed_us + floor_us / efficiency[path].

    The fixed cost is host and launch work that both paths share; sharing it is an assumption (fitted
    apart on the cal_h200_* runs, bf16 dispatch gives 59 µs on the flat path and 0 µs on the internode
    path's three rows), which lets a path with few rows, or a single one, get an efficiency. Errors are
    relative, because the rows span 0.2 to 2.5 ms with a spread that grows with the time.
    """
    paths = sorted({m.path for m in measurements})
    # Unknowns: fixed_us and 1 / efficiency of each path.
    design = np.array([[1.0] + [m.floor_us if m.path == path else 0.0 for path in paths]
                       for m in measurements])
    measured = np.array([m.us for m in measurements])
    lower = np.array([0.0] + [1.0] * len(paths))
    params = bounded_least_squares(design / measured[:, None], np.ones(len(measurements)), lower)
    costs = {}
    for i, path in enumerate(paths):
        rows = [m for m in measurements if m.path == path]
        files = frozenset(m.source for m in rows)
        costs[path] = StageCost(float(params[0]), float(1.0 / params[1 + i]), len(rows), files)
    return costs


def calibrate(measurements: list[Measurement]) -> dict[tuple[str, str], StageCost]:
    """StageCost per (path, stage), fitted on the measurements that :func:`exclusion` keeps."""
    kept = [m for m in measurements if exclusion(m) is None]
    calibration = {}
    for stage in sorted({m.stage for m in kept}):
        for path, cost in fit_stage([m for m in kept if m.stage == stage]).items():
            calibration[(path, stage)] = cost
    return calibration


def predict_measured(measurement: Measurement, calibration: dict[tuple[str, str], StageCost]) -> float:
    """The model's µs on the measured setup, where the copy floor stands for both legs' links."""
    cost = calibration[(measurement.path, measurement.stage)]
    return cost.fixed_us + measurement.floor_us / cost.efficiency


def relative_errors(measurements: list[Measurement], calibration: dict[tuple[str, str], StageCost]) -> list[float]:
    """(predicted - measured) / measured per row."""
    return [predict_measured(m, calibration) / m.us - 1.0 for m in measurements]


def measured_leg_mb(measurement: Measurement) -> dict[str, float] | None:
    """Bytes per leg from an internode dispatch row's counters (its note), in MB."""
    found = re.match(r"boundary ([\d.]+) MB, nvlink ([\d.]+) direct \+ ([\d.]+) forwarded MB", measurement.note)
    if found is None:
        return None
    return dict(zip(("boundary", "nvlink direct", "nvlink forwarded"), map(float, found.groups())))


def predicted_leg_mb(measurement: Measurement) -> dict[str, float]:
    """What the simulated router predicts for those counters; payload bytes only (bf16 rows)."""
    nodes = measurement.ranks // measurement.ranks_per_node
    stats = simulate_routing(nodes, measurement.ranks_per_node, measurement.experts, measurement.topk,
                             min(BENCH_MAX_NODES, nodes))
    rows = counted_rows_per_token(stats)
    return {leg: measurement.tokens * per_token * 2 * measurement.hidden / 1e6 for leg, per_token in rows.items()}


def counter_checks(measurements: list[Measurement]) -> list[tuple[Measurement, str, float, float]]:
    """(row, leg, measured MB, predicted MB) for each bf16 internode dispatch row with counters."""
    checks = []
    for m in measurements:
        measured = measured_leg_mb(m) if m.stage == "dispatch bf16" else None
        if measured:
            predicted = predicted_leg_mb(m)
            checks += [(m, leg, measured[leg], predicted[leg]) for leg in measured]
    return checks


def rows_table(measurements: list[Measurement], calibration: dict[tuple[str, str], StageCost]) -> list[str]:
    columns = ("file", "path", "nodes x ranks", "SMs", "stage", "measured µs", "copy floor µs", "predicted µs",
               "error", "fitted")
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for m in measurements:
        # Left-out rows of a (path, stage) with no fitted rows at all have nothing to be predicted from.
        predicted = predict_measured(m, calibration) if (m.path, m.stage) in calibration else None
        shown = f"{predicted:.0f} | {predicted / m.us - 1:+.0%}" if predicted else "– | –"
        lines.append(f"| {m.source} | {m.path} | {m.layout} | {m.sms} | {m.stage} | {m.us:.0f} | {m.floor_us:.0f} | "
                     f"{shown} | {exclusion(m) or 'yes'} |")
    return lines


def fit_table(measurements: list[Measurement], calibration: dict[tuple[str, str], StageCost]) -> list[str]:
    lines = ["| path | stage | rows fitted | fixed µs | efficiency | rms error | largest error |",
             "|---|---|---|---|---|---|---|"]
    kept = [m for m in measurements if exclusion(m) is None]
    groups = {key: [m for m in kept if (m.path, m.stage) == key] for key in calibration}
    for (path, stage), rows in groups.items():
        cost = calibration[(path, stage)]
        # At its bound the data show no per-byte cost beyond a copy's; one row fixes its own efficiency.
        bound = " (bound)" if cost.efficiency > 1.0 - 1e-9 else ""
        quality = error_summary(relative_errors(rows, calibration)) if len(rows) > 1 else "exact: 1 row | –"
        lines.append(f"| {path} | {stage} | {len(rows)} | {cost.fixed_us:.0f} | {cost.efficiency:.2f}{bound} "
                     f"| {quality} |")
    lines.append(f"| all | | {len(kept)} | | | {error_summary(relative_errors(kept, calibration))} |")
    return lines


def error_summary(errors: list[float]) -> str:
    """'rms | largest' of relative errors."""
    magnitudes = np.abs(np.array(errors))
    return f"{np.sqrt(np.mean(magnitudes ** 2)):.0%} | {np.max(magnitudes):.0%}"


def counters_table(measurements: list[Measurement]) -> list[str]:
    lines = ["| file | nodes x ranks | leg | counted MB | predicted MB | error |", "|---|---|---|---|---|---|"]
    for m, leg, measured, predicted in counter_checks(measurements):
        lines.append(f"| {m.source} | {m.layout} | {leg} | {measured:.2f} | {predicted:.2f} "
                     f"| {predicted / measured - 1:+.1%} |")
    return lines


def calibration_report(measurements: list[Measurement], calibration: dict[tuple[str, str], StageCost]) -> str:
    return "\n".join(
        ["Every measured row against the model on its own setup (fixed_us + copy floor / efficiency):", ""]
        + rows_table(measurements, calibration)
        + ["", "Fitted costs and fit quality:", ""] + fit_table(measurements, calibration)
        + ["", "Byte counters of the internode runs against the simulated router (payload bytes only):", ""]
        + counters_table(measurements))


# ---- the cluster table -------------------------------------------------------------------------------

def table(args: argparse.Namespace) -> str:
    lines = [
        (f"tokens/rank={args.tokens} hidden={args.hidden} top-{args.topk} of {args.experts}, "
         f"at most {args.max_nodes} nodes per token, {args.gpus_per_node} GPUs/node, "
         f"NIC {args.nic_gbps} GB/s/GPU (a copy gets {args.nic_efficiency} of it), "
         f"NVLink {args.nvlink_gbps} GB/s/GPU (a copy gets {args.nvlink_efficiency})"),
        ("| EP | nodes | nodes/token | ranks/token | RDMA MB/rank | without node dedup | NVLink MB/rank | bound by "
         "| dispatch bf16 µs | dispatch fp8 µs | combine µs |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fp8_row_bytes = args.hidden + 4 * (args.hidden // 128)  # e4m3 payload + one float32 scale per 128 channels
    for ep in args.ep:
        nodes = ep // args.gpus_per_node
        stats = simulate_routing(nodes, args.gpus_per_node, args.experts, args.topk, min(args.max_nodes, nodes))
        cluster = Cluster(nodes, args.gpus_per_node, args.nic_gbps, args.nvlink_gbps, args.nic_efficiency,
                          args.nvlink_efficiency)
        bf16 = predict(cluster, stats, args.tokens, 2 * args.hidden, "dispatch bf16")
        fp8 = predict(cluster, stats, args.tokens, fp8_row_bytes, "dispatch fp8")
        combine = predict(cluster, stats, args.tokens, 2 * args.hidden, "combine")
        bound = "NIC" if bf16["rdma_us"] >= bf16["nvlink_us"] else "NVLink"
        lines.append(f"| {ep} | {nodes} | {stats.nodes_per_token:.2f} | {stats.ranks_per_token:.2f} | "
                     f"{bf16['rdma_MB']:.1f} | {bf16['flat_rdma_MB']:.1f} | {bf16['nvlink_MB']:.1f} | {bound} | "
                     f"{bf16['total_us']:.0f} | {fp8['total_us']:.0f} | {combine['total_us']:.0f} |")
    return "\n".join(lines)


def assumptions() -> str:
    lines = [f"  {name} = {value}: {source}" for name, (value, source) in ASSUMPTIONS.items()]
    lines += [f"  {path} {stage}: fixed_us = {cost.fixed_us:.0f}, efficiency = {cost.efficiency:.2f}, "
              f"from {cost.source}" for (path, stage), cost in CALIBRATED.items()]
    lines.append(f"  (fitted: {CALIBRATION_METHOD}; `--calibrate` shows the fit)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibrate", action="store_true", help="fit the costs on docs/data and print the fit")
    parser.add_argument("--ep", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--max-nodes", type=int, default=4)
    parser.add_argument("--nic-gbps", type=float, default=50.0)
    parser.add_argument("--nvlink-gbps", type=float, default=160.0)
    parser.add_argument("--nic-efficiency", type=float, default=ASSUMPTIONS["nic_efficiency"][0],
                        help="fraction of --nic-gbps that a plain transfer reaches")
    parser.add_argument("--nvlink-efficiency", type=float, default=ASSUMPTIONS["nvlink_efficiency"][0],
                        help="fraction of --nvlink-gbps that a plain copy reaches (0.70 measured on H200)")
    args = parser.parse_args()
    if args.calibrate:
        measurements = load_measurements()
        print(calibration_report(measurements, calibrate(measurements)))
        return
    print(table(args))
    print("\nassumptions:")
    print(assumptions())


if __name__ == "__main__":
    main()
