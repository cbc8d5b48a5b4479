"""Before/after table from benchmark runs of two builds made in the same call; or the spread of one.

    python tools/ab_table.py --base out/ab/base_*.json --this out/ab/this_*.json
    python tools/ab_table.py --spread out/decode_*.json      # one build, several launches

Each file holds the rows of one ``deepcomm.bench --json`` run. Rows are matched
on what they measured (path, stage, dtype, SMs, ranks, ranks per node, tokens,
hidden); for each, the table gives the median µs over the base runs and over
this tree's runs, their ratio, each side's median ratio to its copy floor, and
whether every run's correctness check passed. Runs of the two builds should
alternate (base, this, base, this): on a shared GPU consecutive runs drift, and
only interleaved runs compare like with like.

``--spread`` gives, per row of one build's runs, the fastest, median and slowest run and the
slowest over the fastest: small calls on a shared host move between launches by more than most
changes move them (docs/benchmarks.md, "the spread between launches"), so a figure without its
spread says little.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

KEY_FIELDS = ("path", "stage", "dtype", "sms", "ranks", "ranks_per_node", "tokens", "hidden")


def load_runs(paths: list[str]) -> list[list[dict]]:
    return [json.loads(Path(p).read_text()) for p in paths]


def row_key(row: dict) -> tuple:
    return tuple(row.get(field) for field in KEY_FIELDS)


def summarize(runs: list[list[dict]]) -> dict[tuple, dict]:
    """Per measured row: median µs, median ratio to the floor, and whether all checks passed."""
    samples: dict[tuple, list[dict]] = {}
    for run in runs:
        for row in run:
            samples.setdefault(row_key(row), []).append(row)
    summary = {}
    for key, rows in samples.items():
        ratios = [r["us"] / r["floor_us"] for r in rows if r.get("floor_us")]
        summary[key] = {
            "us": statistics.median(r["us"] for r in rows),
            "min_us": min(r["us"] for r in rows),
            "max_us": max(r["us"] for r in rows),
            "floor_ratio": statistics.median(ratios) if ratios else None,
            "ok": all(r.get("check") == "ok" for r in rows),
            "runs": len(rows),
        }
    return summary


def ab_rows(base: dict[tuple, dict], this: dict[tuple, dict]) -> list[dict]:
    """Rows measured by both builds, in the order this tree's runs listed them."""
    rows = []
    for key, mine in this.items():
        theirs = base.get(key)
        if theirs is None:
            continue
        rows.append({
            **dict(zip(KEY_FIELDS, key)),
            "base_us": theirs["us"], "this_us": mine["us"], "this_over_base": mine["us"] / theirs["us"],
            "base_floor_ratio": theirs["floor_ratio"], "this_floor_ratio": mine["floor_ratio"],
            "runs": f"{theirs['runs']}/{mine['runs']}", "checks": "ok" if theirs["ok"] and mine["ok"] else "FAILED",
        })
    return rows


def format_table(rows: list[dict]) -> str:
    def ratio(value):
        return f"{value:.2f}" if value is not None else "-"

    lines = [f"{'path':10} {'stage':22} {'dtype':5} {'sms':>4} {'ranks':>5} {'base µs':>9} {'this µs':>9} "
             f"{'this/base':>9} {'base×floor':>10} {'this×floor':>10} {'runs':>5} checks"]
    for r in rows:
        lines.append(f"{r['path']:10} {r['stage']:22} {r['dtype']:5} {str(r['sms'] or '-'):>4} "
                     f"{str(r['ranks']):>2}/{str(r['ranks_per_node']):<2} {r['base_us']:9.1f} {r['this_us']:9.1f} "
                     f"{r['this_over_base']:9.2f} {ratio(r['base_floor_ratio']):>10} "
                     f"{ratio(r['this_floor_ratio']):>10} {r['runs']:>5} {r['checks']}")
    return "\n".join(lines)


def spread_rows(summary: dict[tuple, dict]) -> list[dict]:
    """Per measured row of one build: fastest, median and slowest run."""
    return [{**dict(zip(KEY_FIELDS, key)), "min_us": s["min_us"], "median_us": s["us"], "max_us": s["max_us"],
             "max_over_min": s["max_us"] / s["min_us"] if s["min_us"] else None, "runs": s["runs"],
             "checks": "ok" if s["ok"] else "FAILED"} for key, s in summary.items()]


def format_spread(rows: list[dict]) -> str:
    lines = [f"{'path':10} {'stage':22} {'dtype':5} {'sms':>4} {'ranks':>5} {'min µs':>9} {'median µs':>9} "
             f"{'max µs':>9} {'max/min':>7} {'runs':>4} checks"]
    for r in rows:
        spread = f"{r['max_over_min']:.2f}" if r["max_over_min"] is not None else "-"
        lines.append(f"{r['path']:10} {r['stage']:22} {r['dtype']:5} {str(r['sms'] or '-'):>4} "
                     f"{str(r['ranks']):>2}/{str(r['ranks_per_node']):<2} {r['min_us']:9.1f} {r['median_us']:9.1f} "
                     f"{r['max_us']:9.1f} {spread:>7} {r['runs']:>4} {r['checks']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", nargs="+", help="JSON rows of the base build's runs")
    parser.add_argument("--this", nargs="+", help="JSON rows of this tree's runs")
    parser.add_argument("--spread", nargs="+", help="JSON rows of one build's runs: min / median / max per row")
    parser.add_argument("--json", default=None, help="also write the table's rows here")
    args = parser.parse_args(argv)
    if args.spread:
        if args.base or args.this:
            parser.error("--spread: give one build's runs, without --base/--this")
        rows = spread_rows(summarize(load_runs(args.spread)))
        table = format_spread(rows)
    else:
        if not (args.base and args.this):
            parser.error("--base and --this: both builds' runs (or --spread for one build)")
        rows = ab_rows(summarize(load_runs(args.base)), summarize(load_runs(args.this)))
        if not rows:
            raise SystemExit("ab_table: the two builds measured no row in common")
        table = format_table(rows)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
