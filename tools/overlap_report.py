"""Share of communication-kernel time hidden behind compute kernels, per layer, plus a timeline PNG.

    python tools/overlap_report.py trace_rank0.json --png overlap.png --json overlap.json
    python tools/overlap_report.py dc.sqlite --layers 10:14
    python tools/overlap_report.py r0.json.gz r1.json.gz --rank-label r0 r1

A trace is a torch profiler Chrome trace (.json, .json.gz) or an Nsight Systems SQLite export
(.sqlite, from `nsys export --type sqlite`); both go through deepcomm.trace_analysis. Several traces
(one per rank) print one table each and the smallest share among them. docs/profiling.md,
"Overlap report", says how to record the traces and what the numbers mean.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sqlite3
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from deepcomm.trace_analysis import (  # noqa: E402
    COMM,
    COMM_PATTERN,
    KernelRecord,
    Report,
    after_peer_arrival,
    analyze,
    compute_time_by_stage,
    exposed_spans,
    launch_leads,
    lead_by_stage,
    load_trace,
    split_by_process,
)

# One hatch per micro-batch (cycled beyond six); colour is taken by the stage.
MB_HATCHES = ("", "///", "\\\\\\", "xxx", "...", "+++")
OUTSIDE_COLOR = "0.6"  # kernels launched outside any L{layer}/mb{m}/{stage} range
MAX_LAYER_LABELS = 30  # beyond this, label every k-th layer boundary so the labels stay legible


def _us(ns: int) -> str:
    return f"{ns / 1000:.1f}"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}"


def format_table(report: Report) -> str:
    """Per-layer table and, below it, comm time per stage over all layers."""
    lines = [f"{'layer':<6} {'comm µs':>11} {'hidden µs':>11} {'share %':>8} {'compute µs':>11}"]
    for label, stats in report.rows():
        lines.append(f"{label:<6} {_us(stats.comm_ns):>11} {_us(stats.hidden_ns):>11} "
                     f"{_percent(stats.share):>8} {_us(stats.compute_ns):>11}")
    lines.append(f"span of all kernels: {_us(report.total.span_ns)} µs, {report.total.kernels} kernels")
    if report.total.stages:
        lines.append(f"{'stage':<24} {'comm µs':>11} {'hidden µs':>11} {'share %':>8}")
        for stage, stats in report.total.stages.items():
            lines.append(f"{stage:<24} {_us(stats.comm_ns):>11} {_us(stats.hidden_ns):>11} "
                         f"{_percent(stats.share):>8}")
    return "\n".join(lines)


def _label(record: KernelRecord | None) -> str:
    if record is None:
        return "-"
    if record.stage is None:
        return "(outside ranges)"
    return f"L{record.layer}/mb{record.microbatch}/{record.stage}"


def format_exposed(records: list[KernelRecord], count: int) -> str:
    """The ``count`` longest comm stretches no compute covered, with the compute kernels around them."""
    spans = exposed_spans(records)
    if not spans:
        return "no exposed comm time"
    origin = min(r.start_ns for r in records)
    lines = [f"exposed comm: {len(spans)} stretches, {_us(sum(s.end_ns - s.start_ns for s in spans))} µs; "
             f"longest {min(count, len(spans))}:",
             f"{'µs':>9} {'at µs':>10}  {'comm':<22} {'compute before':<22} {'compute after':<22}"]
    for span in spans[:count]:
        lines.append(f"{_us(span.end_ns - span.start_ns):>9} {_us(span.start_ns - origin):>10}  "
                     f"{_label(span.comm):<22} {_label(span.before):<22} {_label(span.after):<22}")
    return "\n".join(lines)


def format_stage_times(labels: list[str], records: list[list[KernelRecord]]) -> str:
    """Compute-kernel µs per (layer, micro-batch, stage), one column per trace."""
    totals = [compute_time_by_stage(recs) for recs in records]
    keys = sorted({key for t in totals for key in t}, key=lambda k: (k[0] is None, k[0] or 0, k[1] or 0, k[2] or ""))
    width = max(12, *(len(label) for label in labels))
    lines = [f"{'compute µs':<22} " + " ".join(f"{label[-width:]:>{width}}" for label in labels)]
    for layer, microbatch, stage in keys:
        name = "(outside ranges)" if stage is None else f"L{layer}/mb{microbatch}/{stage}"
        lines.append(f"{name:<22} " + " ".join(f"{_us(t.get((layer, microbatch, stage), 0)):>{width}}"
                                              for t in totals))
    return "\n".join(lines)


def format_leads(records: list[KernelRecord], count: int, short_us: float) -> str:
    """The host's lead over the GPU for comm kernels: per stage, then the ``count`` launched latest."""
    short_ns = round(short_us * 1000)
    by_stage = lead_by_stage(records, short_ns)
    if not by_stage:
        return "no comm kernel with a recorded launch"
    lines = [f"host lead of comm kernels (start - launch; under {short_us:g} µs the stream waited for the host):",
             f"{'stage':<24} {'kernels':>8} {'min µs':>10} {'median µs':>10} {'under':>6}"]
    for stage, stats in by_stage.items():
        lines.append(f"{stage:<24} {stats.kernels:>8} {_us(stats.min_ns):>10} {_us(stats.median_ns):>10} "
                     f"{stats.short:>6}")
    if count:
        origin = min(r.start_ns for r in records)
        lines.append(f"{'lead µs':>9} {'starts at µs':>13}  kernel")
        for r in launch_leads(records)[:count]:
            lines.append(f"{_us(r.start_ns - r.launch_ns):>9} {_us(r.start_ns - origin):>13}  {_label(r)}")
    return "\n".join(lines)


def _bounds(cast):
    """An argparse type for "A:B" with either side optional: (A, B), None for an open side."""

    def parse(text: str) -> tuple:
        parts = text.split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            low, high = (cast(p) if p else None for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected A:B (either side may be empty), got {text!r}")
        if low is not None and high is not None and high <= low:
            raise argparse.ArgumentTypeError(f"{text!r} is empty")
        return low, high

    return parse


Bounds = tuple[float | None, float | None]  # (low, high) from _bounds, None for an open side


def _window_ns(records: list[KernelRecord], window: Bounds | None, layers: Bounds | None) -> tuple[int, int]:
    """Absolute [start, end] of the plotted time: the whole trace, a window (µs) or some layers' kernels."""
    first = min(r.start_ns for r in records)
    last = max(r.end_ns for r in records)
    if window is not None:
        low, high = window
        return (first if low is None else first + round(low * 1000),
                last if high is None else first + round(high * 1000))
    if layers is not None:
        low, high = layers
        chosen = [r for r in records if r.layer is not None
                  and (low is None or r.layer >= low) and (high is None or r.layer < high)]
        if not chosen:
            raise ValueError("no kernels in the layers chosen with --layers")
        return min(r.start_ns for r in chosen), max(r.end_ns for r in chosen)
    return first, last


def _stream_rows(records: list[KernelRecord]) -> list[tuple[tuple[int, int], str]]:
    """((device, stream), majority kind by kernel time), compute rows first, then comm."""
    time_by_kind: dict[tuple[int, int], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in records:
        time_by_kind[(r.device, r.stream)][r.kind] += r.end_ns - r.start_ns
    rows = [(key, max(kinds, key=kinds.get)) for key, kinds in time_by_kind.items()]
    return sorted(rows, key=lambda row: (row[0][0], row[1] == COMM, row[0][1]))


def _layer_starts(records: list[KernelRecord]) -> dict[int, int]:
    starts: dict[int, int] = {}
    for r in records:
        if r.layer is not None:
            starts[r.layer] = min(starts.get(r.layer, r.start_ns), r.start_ns)
    return starts


def _draw(ax, title: str, records: list[KernelRecord], report: Report, colors: dict[str, tuple],
          window: Bounds | None, layers: Bounds | None) -> None:
    """One trace: a row per stream, bars coloured by stage and hatched by micro-batch."""
    if not records:
        ax.text(0.5, 0.5, "no kernels in this trace", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_yticks([])
        return
    origin = min(r.start_ns for r in records)
    low, high = _window_ns(records, window, layers)
    rows = _stream_rows(records)
    row_of = {key: y for y, (key, _) in enumerate(rows)}
    bars: dict[tuple[int, str | None, int | None], list[tuple[float, float]]] = defaultdict(list)
    for r in records:
        if r.end_ns >= low and r.start_ns <= high:
            bars[(row_of[(r.device, r.stream)], r.stage, r.microbatch)].append(
                ((r.start_ns - origin) / 1000, (r.end_ns - r.start_ns) / 1000))
    for (y, stage, microbatch), spans in bars.items():
        hatch = MB_HATCHES[microbatch % len(MB_HATCHES)] if microbatch is not None else ""
        ax.broken_barh(spans, (y - 0.4, 0.8), facecolors=colors.get(stage, OUTSIDE_COLOR),
                       edgecolor="black", linewidth=0.2, hatch=hatch)
    _mark_layers(ax, records, origin, low, high)
    ax.set_yticks(range(len(rows)), [f"dev{d} stream {s}\n{kind}" for (d, s), kind in rows], fontsize=8)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.invert_yaxis()
    ax.set_xlim((low - origin) / 1000, (high - origin) / 1000)
    ax.set_xlabel("µs since the first kernel")
    ax.set_title(f"{title}: {_percent(report.total.share)}% of comm time hidden behind compute "
                 f"({_us(report.total.comm_ns)} µs comm, all layers)", pad=14)


def _mark_layers(ax, records: list[KernelRecord], origin: int, low: int, high: int) -> None:
    """A dashed line where each layer's first kernel starts, labelled L{n} (every k-th when crowded)."""
    starts = sorted((t, layer) for layer, t in _layer_starts(records).items() if low <= t <= high)
    step = max(1, math.ceil(len(starts) / MAX_LAYER_LABELS))
    for index, (t, layer) in enumerate(starts):
        x = (t - origin) / 1000
        ax.axvline(x, color="black", linestyle="--", linewidth=0.6, alpha=0.6)
        if index % step == 0:
            ax.text(x, 1.0, f" L{layer}", transform=ax.get_xaxis_transform(), fontsize=7, va="bottom")


def _legend_handles(colors: dict[str, tuple], microbatches: list[int], outside: bool) -> list[Patch]:
    handles = [Patch(facecolor=color, label=stage) for stage, color in colors.items()]
    if outside:
        handles.append(Patch(facecolor=OUTSIDE_COLOR, label="outside ranges"))
    handles += [Patch(facecolor="white", edgecolor="black", hatch=MB_HATCHES[m % len(MB_HATCHES)], label=f"mb{m}")
                for m in microbatches]
    return handles


def plot_timelines(traces: list[tuple[str, list[KernelRecord], Report]], path: str,
                   window: Bounds | None = None, layers: Bounds | None = None) -> None:
    """One panel per (title, records, report), sharing stage colours and micro-batch hatches, as a PNG.

    ``window`` (µs since each trace's first kernel) or ``layers`` (A <= layer < B) limits the time shown.
    """
    all_records = [r for _, records, _ in traces for r in records]
    stages = sorted({r.stage for r in all_records if r.stage is not None})
    # tab10's colours are the most distinct; tab20 (pairs of shades) only when there are more stages.
    palette = plt.get_cmap("tab10" if len(stages) <= 10 else "tab20").colors
    colors = {stage: palette[i % len(palette)] for i, stage in enumerate(stages)}
    microbatches = sorted({r.microbatch for r in all_records if r.microbatch is not None})
    heights = [1.5 + 0.5 * max(1, len(_stream_rows(records))) for _, records, _ in traces]
    fig, axes = plt.subplots(len(traces), 1, figsize=(16, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (title, records, report) in zip(axes[:, 0], traces):
        _draw(ax, title, records, report, colors, window, layers)
    outside = any(r.stage is None for r in all_records)
    axes[0, 0].legend(handles=_legend_handles(colors, microbatches, outside), loc="upper left",
                      bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", nargs="+", metavar="TRACE", help=".json/.json.gz (torch) or .sqlite (nsys)")
    parser.add_argument("--png", help="write the timeline here")
    parser.add_argument("--json", help="write the reports here")
    parser.add_argument("--rank-label", nargs="+", metavar="LABEL",
                        help="one name per trace for tables and panels (default: the file names)")
    parser.add_argument("--same-step", action="store_true",
                        help="the traces are one step of every rank, on one host (tools/bench_overlap.py writes "
                             "them so): also count each comm kernel from its call's last rank arriving")
    parser.add_argument("--comm-pattern", default=COMM_PATTERN, metavar="REGEX",
                        help="kernels whose name this regex finds are communication (default: %(default)s)")
    parser.add_argument("--exposed", type=int, default=0, metavar="N",
                        help="list each trace's N longest stretches of comm time no compute covered (with "
                             "--same-step, counted from the peer's arrival)")
    parser.add_argument("--launches", type=int, default=None, metavar="N",
                        help="the host's lead over the GPU per comm stage (how long before a kernel started it "
                             "was launched) and the N comm kernels launched latest: is the host setting the pace?")
    parser.add_argument("--short-lead", type=float, default=20.0, metavar="US",
                        help="with --launches, a lead under this many µs counts as the stream waiting for the host "
                             "(default: %(default)s)")
    parser.add_argument("--stage-times", action="store_true",
                        help="compute-kernel time per layer, micro-batch and stage, one column per trace")
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument("--layers", metavar="A:B", type=_bounds(int),
                       help="plot only the time of layers A <= layer < B")
    limit.add_argument("--window", metavar="START:END", type=_bounds(float),
                       help="plot only this time, in µs since the first kernel")
    args = parser.parse_args(argv)
    try:
        re.compile(args.comm_pattern)
    except re.error as err:
        parser.error(f"--comm-pattern: {err}")
    if args.exposed < 0:
        parser.error(f"--exposed: must be >= 0, got {args.exposed}")
    if args.launches is not None and args.launches < 0:
        parser.error(f"--launches: must be >= 0, got {args.launches}")
    if not args.short_lead > 0:
        parser.error(f"--short-lead: must be a positive number of µs, got {args.short_lead}")
    if args.rank_label is None:
        args.rank_label = args.traces
    elif len(args.rank_label) != len(args.traces):
        parser.error(f"{len(args.traces)} traces but {len(args.rank_label)} --rank-label values")
    return args


def _min_share(reports: list[tuple[str, Report]]) -> tuple[str, float] | None:
    defined = [(report.total.share, label) for label, report in reports if report.total.share is not None]
    if not defined:
        return None
    share, label = min(defined)
    return label, share


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    traces = []
    paths = []
    for path, label in zip(args.traces, args.rank_label):
        try:
            loaded = load_trace(path, args.comm_pattern)
        except (OSError, ValueError, sqlite3.Error) as err:
            sys.exit(f"overlap_report: {path}: {err}")
        # An nsys report may hold several ranks: one table each, as one torch trace per rank gives.
        by_process = split_by_process(loaded)
        for process, records in by_process.items() if len(by_process) > 1 else [(None, loaded)]:
            name = label if process is None else f"{label} pid {process}"
            report = analyze(records)
            traces.append((name, records, report))
            paths.append(path)
            print(f"== {name}" + ("" if name == path else f" ({path})"))
            print(format_table(report))
    lowest = _min_share([(label, report) for label, _, report in traces])
    arrived_lowest, arrived = None, None
    if len(traces) > 1:
        print("min share over traces: " + ("- (no comm kernels)" if lowest is None
                                           else f"{_percent(lowest[1])}% ({lowest[0]})"))
    if args.same_step:
        # The ranks' traces of one step on one host (tools/bench_overlap.py keeps the same step on every rank).
        try:
            arrived = after_peer_arrival([records for _, records, _ in traces])
        except ValueError as err:
            arrived = None
            print(f"--same-step: {err}")
        else:
            if arrived is None:
                print("--same-step: the traces' comm kernels do not pair up (count or names differ)")
        if arrived is not None:
            for (label, _, _), records in zip(traces, arrived):
                share = analyze(records).total.share
                print(f"  {label}: " + ("- (no comm time left)" if share is None else f"{_percent(share)}%")
                      + " counted from the last rank's arrival")
            arrived_lowest = _min_share([(label, analyze(recs)) for (label, _, _), recs in zip(traces, arrived)])
            print("min share counting each comm kernel from its call's last rank arriving: "
                  + ("-" if arrived_lowest is None else f"{_percent(arrived_lowest[1])}% ({arrived_lowest[0]})"))
    if args.exposed:
        shown = arrived if arrived is not None else [records for _, records, _ in traces]
        # Spinning for a late peer is not exposed time here when the traces let it be cut off: say which count this is.
        counted = " (each comm kernel from its call's last rank arriving)" if arrived is not None else ""
        for (label, _, _), records in zip(traces, shown):
            print(f"== {label}{counted}: " + format_exposed(records, args.exposed))
    if args.launches is not None:
        for label, records, _ in traces:
            print(f"== {label}: " + format_leads(records, args.launches, args.short_lead))
    if args.stage_times:
        print(format_stage_times([label for label, _, _ in traces], [records for _, records, _ in traces]))
    if args.json:
        def labelled(found):
            return None if found is None else {"label": found[0], "share": found[1]}

        with open(args.json, "w") as f:
            short_ns = round(args.short_lead * 1000)
            json.dump({"traces": [{"label": label, "path": path, "layers": report.to_dict(),
                                   "launch_leads": {stage: dataclasses.asdict(stats) for stage, stats
                                                    in lead_by_stage(records, short_ns).items()}}
                                  for (label, records, report), path in zip(traces, paths)],
                       "min_share": labelled(lowest), "min_share_after_peer_arrival": labelled(arrived_lowest)},
                      f, indent=1)
    if args.png:
        try:
            plot_timelines(traces, args.png, args.window, args.layers)
        except ValueError as err:
            sys.exit(f"overlap_report: {err}")


if __name__ == "__main__":
    main()
