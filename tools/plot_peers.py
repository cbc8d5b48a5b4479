"""Side-by-side bars from benchmark rows: deepcomm, a peer (DeepEP), the reference path, the copy floor.

    python tools/plot_peers.py --sms 24 -o docs/img/x2_h200_prefill.png \\
        "deepcomm=docs/data/x2_h200_prefill_2ranks.json" \\
        "DeepEP=docs/data/x2_h200_deepep_prefill_2ranks.json"

Each ``LABEL=FILE`` holds rows of ``python -m deepcomm.bench --json`` or ``tools/bench_deepep.py
--json``. Per stage (dispatch bf16, dispatch fp8, combine bf16) a bar is drawn for every kernel
row of a file at ``--sms``, one for the first file's reference-path row (the baseline) and one for
the copy floor of the first kernel row. Bars show µs, the slowest rank's median.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

STAGES = (("dispatch", "bf16"), ("dispatch", "fp8"), ("combine", "bf16"))
KERNEL_PATHS = ("intranode", "internode", "deepep")
REFERENCE = "reference path (torch.distributed all_to_all)"
FLOOR = "copy floor"


def stage_of(row: dict) -> tuple[str, str] | None:
    """The (stage, dtype) a row belongs to, None for rows not drawn (layout, copied-in combine)."""
    stage = row["stage"]
    if stage.startswith("dispatch"):
        return ("dispatch", row["dtype"])
    if stage == "combine":
        return ("combine", "bf16")
    return None


def bars(series: list[tuple[str, list[dict]]], sms: int) -> dict[tuple[str, str], dict[str, float]]:
    """(stage, dtype) -> {bar name: µs}, in drawing order."""
    found: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    floors: dict[tuple[str, str], float] = {}
    for index, (label, rows) in enumerate(series):
        for row in rows:
            key = stage_of(row)
            if key is None or key not in STAGES:
                continue
            if row["path"] == "reference":
                if index > 0:  # one baseline: the first file's
                    continue
                name = REFERENCE
            elif row["path"] in KERNEL_PATHS and row["sms"] == sms:
                name = label if row["path"] == "deepep" or row["path"] == "intranode" else f"{label} {row['path']}"
                if "cached" in row["stage"]:
                    name += " (cached)"
                if row.get("floor_us"):
                    floors.setdefault(key, row["floor_us"])
            else:
                continue
            found[key].setdefault(name, row["us"])
    for key, floor in floors.items():
        found[key][FLOOR] = floor
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("series", nargs="+", metavar="LABEL=FILE")
    parser.add_argument("--sms", type=int, default=24, help="SMs per rank of the kernel rows drawn")
    parser.add_argument("--title", default=None)
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args(argv)
    series = []
    for spec in args.series:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            parser.error(f"series: expected LABEL=FILE, got {spec!r}")
        with open(path) as f:
            series.append((label, json.load(f)))
    found = bars(series, args.sms)
    if not any(name not in (REFERENCE, FLOOR) for bars_of_stage in found.values() for name in bars_of_stage):
        parser.error(f"no dispatch/combine rows at --sms {args.sms} in {args.series}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in STAGES if k in found]
    names = list(dict.fromkeys(name for k in keys for name in found[k]))
    fig, ax = plt.subplots(figsize=(4.5 + 0.5 * len(keys) * len(names), 4.2))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j, k in enumerate(keys) if name in found[k]]
        ys = [found[k][name] for k in keys if name in found[k]]
        drawn = ax.bar(xs, ys, width, label=name, hatch="//" if name == FLOOR else None,
                       color="white" if name == FLOOR else None, edgecolor="black", linewidth=0.5)
        ax.bar_label(drawn, fmt="%.0f", fontsize=6)
    ax.set_xticks(range(len(keys)), [f"{stage} {dtype}" for stage, dtype in keys])
    ax.set_ylabel("µs (median, slowest rank)")
    first = series[0][1][0]
    ax.set_title(args.title or f"{first['ranks']} ranks, {first['device']}, {first['tokens']} tokens × "
                 f"{first['hidden']}, top-{first['topk']} of {first['experts']}, {args.sms} SMs", fontsize=9)
    ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)


if __name__ == "__main__":
    main()
