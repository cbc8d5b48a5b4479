"""How much communication-kernel time ran concurrently with compute kernels, per layer.

Two trace formats feed one analysis:

* a torch profiler Chrome trace (``prof.export_chrome_trace``, ``.json`` or ``.json.gz``);
* an Nsight Systems SQLite export (``nsys export --type sqlite``).

Each loader turns its trace into the same list of :class:`KernelRecord`. A kernel belongs to the
layer, micro-batch and stage of the innermost range named ``L{layer}/mb{m}/{stage}`` that was open
on the CPU thread that launched it (record_function ranges in torch traces, NVTX ranges in nsys).
We attribute through the launch rather than through the kernel's own time because comm and compute
of different micro-batches run at the same time on the GPU: only the host side says which
micro-batch a kernel belongs to. :func:`analyze` then measures, per layer and overall, the union of
comm-kernel intervals and the part of it covered by compute kernels on the same device.
"""

from __future__ import annotations

import dataclasses
import gzip
import heapq
import json
import re
import sqlite3
from collections import defaultdict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

# deepcomm's kernels live in (anonymous namespaces inside) deepcomm::intranode / deepcomm::internode /
# deepcomm::low_latency; matching the namespace keeps other libraries' "combine_kernel"s out. NCCL kernels
# are extern names. Profilers show them demangled ("deepcomm::intranode::(anonymous namespace)::combine_kernel(...)")
# or, for kernels in anonymous namespaces, as nvcc's static mangled names ("__nv_static_..._ZN8deepcomm9intranode
# ..._GLOBAL__N__...14combine_kernelE..."): both forms count.
_NORMAL_KERNELS = r"(?:notify|dispatch|combine(?:_ready)?)_kernel"
_LOW_LATENCY_KERNELS = r"(?:dispatch|combine_(?:send|recv|owner)|stage_outputs)_kernel"
COMM_PATTERN = (
    rf"deepcomm::(?:intra|inter)node::.*?\b{_NORMAL_KERNELS}\b"
    rf"|deepcomm::low_latency::.*?\b{_LOW_LATENCY_KERNELS}\b"
    rf"|_ZN8deepcomm9(?:intra|inter)node.*?\d{_NORMAL_KERNELS}"
    rf"|_ZN8deepcomm11low_latency.*?\d{_LOW_LATENCY_KERNELS}"
    r"|^(?:void )?nccl(?:Dev)?Kernel"
)

# The scheduler's range names: L{layer}/mb{microbatch}/{stage}, stage e.g. "dispatch.backward".
RANGE_NAME = re.compile(r"L(\d+)/mb(\d+)/(.+)")

COMM, COMPUTE = "comm", "compute"

# nsys NVTX_EVENTS.eventType of push/pop and start/end ranges (marks and domain events are not ranges).
_NVTX_RANGE_TYPES = (59, 60)


@dataclass(frozen=True)
class KernelRecord:
    """One GPU kernel execution, attributed to the range that launched it (None outside any range).

    ``process``: the launching process (an nsys report may hold several ranks; a torch trace is one, 0):
    one rank's compute never hides another's communication, even on a shared GPU. ``launch_ns``: when the
    host called the launch, on the kernels' clock (None where the trace has no launch for it).
    """

    name: str
    start_ns: int
    end_ns: int
    stream: int
    device: int
    kind: str
    layer: int | None = None
    microbatch: int | None = None
    stage: str | None = None
    process: int = 0
    launch_ns: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in (COMM, COMPUTE):
            raise ValueError(f"KernelRecord.kind must be {COMM!r} or {COMPUTE!r}, got {self.kind!r}")
        if self.end_ns < self.start_ns:
            raise ValueError(f"kernel {self.name!r} ends ({self.end_ns}) before it starts ({self.start_ns})")


@dataclass(frozen=True)
class StageStats:
    """Comm time of one stage and the part of it that compute covered."""

    comm_ns: int
    hidden_ns: int

    @property
    def share(self) -> float | None:
        """hidden / comm, None without comm time (0/0 is not 0% hidden)."""
        return self.hidden_ns / self.comm_ns if self.comm_ns else None


@dataclass(frozen=True)
class OverlapStats:
    """Overlap of one group of kernels (a layer, the unattributed ones, or all)."""

    comm_ns: int  # union of the group's comm kernels, summed over devices
    hidden_ns: int  # part of that union covered by any compute kernel on the same device
    compute_ns: int  # union of the group's compute kernels, summed over devices
    span_ns: int  # first kernel start to last kernel end of the group
    kernels: int
    stages: dict[str, StageStats] = field(default_factory=dict)

    @property
    def share(self) -> float | None:
        """hidden / comm, None without comm time."""
        return self.hidden_ns / self.comm_ns if self.comm_ns else None

    def to_dict(self) -> dict:
        return {
            "comm_ns": self.comm_ns,
            "hidden_ns": self.hidden_ns,
            "share": self.share,
            "compute_ns": self.compute_ns,
            "span_ns": self.span_ns,
            "kernels": self.kernels,
            "stages": {
                name: {"comm_ns": s.comm_ns, "hidden_ns": s.hidden_ns, "share": s.share}
                for name, s in self.stages.items()
            },
        }


@dataclass(frozen=True)
class Report:
    """Per-layer overlap, the kernels launched outside any range (None if there are none), and all."""

    layers: dict[int, OverlapStats]
    unattributed: OverlapStats | None
    total: OverlapStats

    def rows(self) -> list[tuple[str, OverlapStats]]:
        """(label, stats) in table order: L0, L1, ..., "none" (unattributed), "all"."""
        rows = [(f"L{layer}", stats) for layer, stats in self.layers.items()]
        if self.unattributed is not None:
            rows.append(("none", self.unattributed))
        rows.append(("all", self.total))
        return rows

    def to_dict(self) -> dict:
        return {label: stats.to_dict() for label, stats in self.rows()}


# --------------------------------------------------------------------------------------------------
# Interval arithmetic (exact, integer nanoseconds)


def _union(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint intervals covering the same time as ``intervals``."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _subtract(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of union ``a`` outside union ``b`` (both sorted and disjoint)."""
    left, j = [], 0
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        k, cursor = j, start
        while k < len(b) and b[k][0] < end:
            if b[k][0] > cursor:
                left.append((cursor, b[k][0]))
            cursor = max(cursor, b[k][1])
            k += 1
        if cursor < end:
            left.append((cursor, end))
    return left


def _length(merged: list[tuple[int, int]]) -> int:
    return sum(end - start for start, end in merged)


def _intersection_length(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> int:
    """Length of the intersection of two unions (each sorted and disjoint), by one sweep over both."""
    total, i, j = 0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        # Drop whichever interval ends first: it cannot meet anything later in the other list.
        if a[i][1] <= b[j][1]:
            i += 1
        else:
            j += 1
    return total


# --------------------------------------------------------------------------------------------------
# Analysis


def _by_device(records: Iterable[KernelRecord]) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """Intervals per (process, device): overlap counts within one rank's kernels on one GPU."""
    intervals: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for r in records:
        intervals[(r.process, r.device)].append((r.start_ns, r.end_ns))
    return intervals


def split_by_process(records: Iterable[KernelRecord]) -> dict[int, list[KernelRecord]]:
    """The records of each launching process (rank), in process order."""
    by_process: dict[int, list[KernelRecord]] = defaultdict(list)
    for r in records:
        by_process[r.process].append(r)
    return dict(sorted(by_process.items()))


def _comm_overlap(comm: list[KernelRecord], compute_union: dict[int, list]) -> StageStats:
    """Union of the comm kernels per (process, device) and how much of it any compute kernel there covers."""
    comm_ns = hidden_ns = 0
    for key, intervals in _by_device(comm).items():
        merged = _union(intervals)
        comm_ns += _length(merged)
        hidden_ns += _intersection_length(merged, compute_union.get(key, []))
    return StageStats(comm_ns, hidden_ns)


def _group_stats(group: list[KernelRecord], compute_union: dict[int, list]) -> OverlapStats:
    comm = [r for r in group if r.kind == COMM]
    overlap = _comm_overlap(comm, compute_union)
    compute_ns = sum(_length(_union(iv)) for iv in _by_device(r for r in group if r.kind == COMPUTE).values())
    span_ns = max(r.end_ns for r in group) - min(r.start_ns for r in group) if group else 0
    by_stage: dict[str, list[KernelRecord]] = defaultdict(list)
    for r in comm:
        if r.stage is not None:
            by_stage[r.stage].append(r)
    stages = {stage: _comm_overlap(by_stage[stage], compute_union) for stage in sorted(by_stage)}
    return OverlapStats(overlap.comm_ns, overlap.hidden_ns, compute_ns, span_ns, len(group), stages)


def analyze(records: Iterable[KernelRecord]) -> Report:
    """Overlap of comm with compute kernels per layer, for kernels outside any range, and overall.

    A layer's comm time counts as hidden where any compute kernel on the same device runs, whatever
    its layer: the two-micro-batch schedule hides one layer's combine behind the next layer's
    attention, and that is overlap we want to see credited.
    """
    records = list(records)
    compute_union = {d: _union(iv) for d, iv in _by_device(r for r in records if r.kind == COMPUTE).items()}
    by_layer: dict[int | None, list[KernelRecord]] = defaultdict(list)
    for r in records:
        by_layer[r.layer].append(r)
    numbered = sorted(layer for layer in by_layer if layer is not None)
    layers = {layer: _group_stats(by_layer[layer], compute_union) for layer in numbered}
    unattributed = _group_stats(by_layer[None], compute_union) if None in by_layer else None
    return Report(layers, unattributed, _group_stats(records, compute_union))


def after_peer_arrival(per_rank: list[list[KernelRecord]]) -> list[list[KernelRecord]] | None:
    """Every rank's kernels with each comm kernel cut to start when the last rank's part of the same
    call started; None when the ranks' comm kernels do not pair up (count or names differ).

    The i-th comm kernel of every rank belongs to the same call (every rank issues the same sequence).
    Until the last rank has launched its part the others can only spin: on ranks sharing a GPU that is
    mostly one client running behind the other, not data moving. ``analyze`` of the result tells how
    much of the rest compute covered. The traces must share a clock (one host: the profiler's
    timestamps are the host's); ValueError when their spans do not even overlap (different clocks, e.g.
    a torch trace beside an nsys export, whose times count from its session's start).
    """
    spans = [(min(r.start_ns for r in records), max(r.end_ns for r in records)) for records in per_rank if records]
    if spans and max(start for start, _ in spans) > min(end for _, end in spans):
        raise ValueError("the traces do not share a clock (their spans do not overlap): give one step of every "
                         "rank from the same kind of trace, on one host")
    comm = [sorted((r for r in records if r.kind == COMM), key=lambda r: r.start_ns) for records in per_rank]
    if len({len(kernels) for kernels in comm}) > 1:
        return None
    arrivals = []
    for call in zip(*comm):
        if len({r.name for r in call}) > 1:
            return None
        arrivals.append(max(r.start_ns for r in call))
    return [[r for r in records if r.kind == COMPUTE]
            + [dataclasses.replace(r, start_ns=min(max(r.start_ns, arrival), r.end_ns))
               for r, arrival in zip(kernels, arrivals)]
            for records, kernels in zip(per_rank, comm)]


@dataclass(frozen=True)
class ExposedSpan:
    """A stretch of comm time that no compute kernel covered, with what framed it.

    ``comm``: the comm kernel running then (the earliest started, if several); ``before`` /
    ``after``: the compute kernels that ended last before it and started first after it (None at the
    trace's edges) — together they say whether compute had run out, or only paused between kernels.
    """

    start_ns: int
    end_ns: int
    comm: KernelRecord
    before: KernelRecord | None
    after: KernelRecord | None


def exposed_spans(records: Iterable[KernelRecord]) -> list[ExposedSpan]:
    """Every maximal interval of comm time no compute kernel of the same rank and device covered, longest first."""
    records = list(records)
    spans = []
    for key, comm_intervals in _by_device(r for r in records if r.kind == COMM).items():
        here = [r for r in records if (r.process, r.device) == key]
        comm = sorted((r for r in here if r.kind == COMM), key=lambda r: r.start_ns)
        compute = sorted((r for r in here if r.kind == COMPUTE), key=lambda r: r.start_ns)
        for start, end in _subtract(_union(comm_intervals), _union((r.start_ns, r.end_ns) for r in compute)):
            owner = next(r for r in comm if r.start_ns <= start < r.end_ns)
            before = max((r for r in compute if r.end_ns <= start), key=lambda r: r.end_ns, default=None)
            after = min((r for r in compute if r.start_ns >= end), key=lambda r: r.start_ns, default=None)
            spans.append(ExposedSpan(start, end, owner, before, after))
    return sorted(spans, key=lambda s: s.start_ns - s.end_ns)


def compute_time_by_stage(records: Iterable[KernelRecord]) -> dict[tuple[int | None, int | None, str | None], int]:
    """Summed compute-kernel time per (layer, micro-batch, stage): which stage made one rank slower."""
    totals: dict[tuple[int | None, int | None, str | None], int] = defaultdict(int)
    for r in records:
        if r.kind == COMPUTE:
            totals[(r.layer, r.microbatch, r.stage)] += r.end_ns - r.start_ns
    return dict(totals)


@dataclass(frozen=True)
class LeadStats:
    """The host's lead over the GPU for one stage's kernels: how long before each started it was launched."""

    kernels: int
    min_ns: int
    median_ns: int
    short: int  # kernels launched less than the threshold before they started


def launch_leads(records: Iterable[KernelRecord], kind: str = COMM) -> list[KernelRecord]:
    """The ``kind`` kernels whose launch the trace recorded, the shortest lead (start - launch) first.

    A kernel queued well ahead starts when the GPU gets to it; one whose lead is about the launch latency
    (a few µs) found its stream idle, waiting for the host: there the host set the pace, and a slower host
    (or a profiler's overhead) delays it. Communication kernels launched that late start late on one rank
    and keep the others' kernels spinning.
    """
    return sorted(_launched(records, kind), key=lambda r: (r.start_ns - r.launch_ns, r.start_ns))


def _launched(records: Iterable[KernelRecord], kind: str) -> list[KernelRecord]:
    return [r for r in records if r.kind == kind and r.launch_ns is not None]


def lead_by_stage(records: Iterable[KernelRecord], short_ns: int, kind: str = COMM) -> dict[str, LeadStats]:
    """:class:`LeadStats` per stage name ("(outside ranges)" for the unattributed), in first-start order."""
    leads: dict[str, list[int]] = defaultdict(list)
    for r in sorted(_launched(records, kind), key=lambda r: r.start_ns):
        leads[r.stage if r.stage is not None else "(outside ranges)"].append(r.start_ns - r.launch_ns)
    stats = {}
    for stage, values in leads.items():
        ordered = sorted(values)
        stats[stage] = LeadStats(len(ordered), ordered[0], ordered[len(ordered) // 2],
                                 sum(v < short_ns for v in ordered))
    return stats


# --------------------------------------------------------------------------------------------------
# Attribution of launches to ranges (shared by both loaders)


@dataclass(frozen=True)
class _Range:
    start_ns: int
    end_ns: int
    layer: int
    microbatch: int
    stage: str


@dataclass(frozen=True)
class _Kernel:
    """A kernel as read from a trace, before attribution; ``launch`` keys its CPU-side launch."""

    name: str
    start_ns: int
    end_ns: int
    stream: int
    device: int
    launch: Hashable
    process: int = 0


def _parse_range(name: str, start_ns: int, end_ns: int) -> _Range | None:
    match = RANGE_NAME.fullmatch(name)
    if match is None:
        return None
    return _Range(start_ns, end_ns, int(match.group(1)), int(match.group(2)), match.group(3))


def _innermost(ranges: list[_Range], times: list[int]) -> list[_Range | None]:
    """For each time, the range with the latest start that contains it (ends inclusive).

    With nested ranges the latest-starting one is the innermost; on equal starts the shorter wins.
    One sweep over sorted times with a heap of open ranges keyed by (-start, end); ranges that ended
    are dropped lazily when they reach the top, which is enough because times only grow.
    """
    by_start = sorted(ranges, key=lambda r: (r.start_ns, -r.end_ns))
    found: list[_Range | None] = [None] * len(times)
    heap: list[tuple[int, int, int]] = []
    next_range = 0
    for index in sorted(range(len(times)), key=times.__getitem__):
        t = times[index]
        while next_range < len(by_start) and by_start[next_range].start_ns <= t:
            r = by_start[next_range]
            heapq.heappush(heap, (-r.start_ns, r.end_ns, next_range))
            next_range += 1
        while heap and heap[0][1] < t:
            heapq.heappop(heap)
        if heap:
            found[index] = by_start[heap[0][2]]
    return found


def _attribute(
    kernels: list[_Kernel],
    launches: dict[Hashable, tuple[Hashable, int]],
    ranges: dict[Hashable, list[_Range]],
    comm_pattern: str | re.Pattern,
) -> list[KernelRecord]:
    """KernelRecords from kernels, their launches (key -> (thread, time)) and ranges per thread."""
    pattern = re.compile(comm_pattern)
    times_by_thread: dict[Hashable, list[tuple[int, int]]] = defaultdict(list)
    for index, kernel in enumerate(kernels):
        if kernel.launch in launches:
            thread, time_ns = launches[kernel.launch]
            times_by_thread[thread].append((time_ns, index))
    enclosing: list[_Range | None] = [None] * len(kernels)
    for thread, timed in times_by_thread.items():
        found = _innermost(ranges.get(thread, []), [t for t, _ in timed])
        for (_, index), r in zip(timed, found):
            enclosing[index] = r
    records = [
        KernelRecord(
            k.name, k.start_ns, k.end_ns, k.stream, k.device,
            COMM if pattern.search(k.name) else COMPUTE,
            r.layer if r else None, r.microbatch if r else None, r.stage if r else None, k.process,
            launches[k.launch][1] if k.launch in launches else None,
        )
        for k, r in zip(kernels, enclosing)
    ]
    return sorted(records, key=lambda r: (r.start_ns, r.end_ns, r.device, r.stream, r.name))


# --------------------------------------------------------------------------------------------------
# torch profiler Chrome trace

_TORCH_LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")


def _us_to_ns(value: float) -> int:
    # Chrome traces give microseconds as floats with nanosecond decimals.
    return round(value * 1000)


def load_torch_trace(path: str | Path, comm_pattern: str | re.Pattern = COMM_PATTERN) -> list[KernelRecord]:
    """Kernels of a torch profiler Chrome trace (``.json`` or ``.json.gz``), attributed to ranges.

    Kernels (cat "kernel") find their launch (cat "cuda_runtime"/"cuda_driver") by
    ``args.correlation``; ranges are the CPU-side events named ``L{layer}/mb{m}/{stage}``
    (record_function), per (pid, tid). memcpy/memset events have other categories and are skipped.
    """
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    events = trace.get("traceEvents") if isinstance(trace, dict) else None
    if events is None:
        raise ValueError(f"{path}: not a torch profiler Chrome trace (no 'traceEvents')")
    kernels: list[_Kernel] = []
    launches: dict[Hashable, tuple[Hashable, int]] = {}
    ranges: dict[Hashable, list[_Range]] = defaultdict(list)
    for event in events:
        if event.get("ph") != "X":
            continue
        category, args = event.get("cat"), event.get("args", {})
        start_ns = _us_to_ns(event["ts"])
        end_ns = start_ns + _us_to_ns(event.get("dur", 0))
        if category == "kernel":
            # Kineto puts a kernel on pid = device, tid = stream; args carry both explicitly.
            kernels.append(_Kernel(event["name"], start_ns, end_ns, int(args.get("stream", event["tid"])),
                                   int(args.get("device", event["pid"])), args.get("correlation")))
        elif category in _TORCH_LAUNCH_CATEGORIES and "correlation" in args:
            launches[args["correlation"]] = ((event["pid"], event["tid"]), start_ns)
        elif category != "gpu_user_annotation":  # the GPU-side copy of a range is not a launch context
            r = _parse_range(event["name"], start_ns, end_ns)
            if r is not None:
                ranges[(event["pid"], event["tid"])].append(r)
    return _attribute(kernels, launches, ranges, comm_pattern)


# --------------------------------------------------------------------------------------------------
# Nsight Systems SQLite export


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    """Column names of a table, empty if nsys did not create it (tables are created lazily)."""
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def _process(global_id: int) -> int:
    # nsys serialises ids as ...|pid (bits 24-47)|tid (bits 0-23); correlation ids repeat across
    # processes, so a report holding several ranks needs the process in the join.
    return global_id >> 24


def load_nsys_sqlite(path: str | Path, comm_pattern: str | re.Pattern = COMM_PATTERN) -> list[KernelRecord]:
    """Kernels of an ``nsys export --type sqlite`` database, attributed to NVTX ranges.

    Kernels (CUPTI_ACTIVITY_KIND_KERNEL, demangled names, as in torch traces) find their launch in
    CUPTI_ACTIVITY_KIND_RUNTIME by (process, correlationId); ranges are NVTX push/pop and
    start/end ranges named ``L{layer}/mb{m}/{stage}`` on the launching thread (globalTid).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        if not _columns(db, "StringIds"):
            raise ValueError(f"{path}: not an nsys SQLite export (no StringIds table)")
        kernels = _nsys_kernels(db)
        launches = _nsys_launches(db)
        ranges = _nsys_ranges(db)
    finally:
        db.close()
    return _attribute(kernels, launches, ranges, comm_pattern)


def _nsys_kernels(db: sqlite3.Connection) -> list[_Kernel]:
    if not _columns(db, "CUPTI_ACTIVITY_KIND_KERNEL"):
        return []
    rows = db.execute(
        "SELECT s.value, k.start, k.end, k.streamId, k.deviceId, k.globalPid, k.correlationId "
        "FROM CUPTI_ACTIVITY_KIND_KERNEL AS k JOIN StringIds AS s ON s.id = k.demangledName"
    )
    return [_Kernel(name, start, end, stream, device, (_process(pid), corr), _process(pid))
            for name, start, end, stream, device, pid, corr in rows]


def _nsys_launches(db: sqlite3.Connection) -> dict[Hashable, tuple[Hashable, int]]:
    if not _columns(db, "CUPTI_ACTIVITY_KIND_RUNTIME"):
        return {}
    rows = db.execute("SELECT globalTid, correlationId, start FROM CUPTI_ACTIVITY_KIND_RUNTIME")
    return {(_process(tid), corr): (tid, start) for tid, corr, start in rows}


def _nsys_ranges(db: sqlite3.Connection) -> dict[Hashable, list[_Range]]:
    columns = _columns(db, "NVTX_EVENTS")
    if not columns:
        return {}
    # Registered strings (nvtxDomainRegisterString) put the name in StringIds instead of `text`.
    if "textId" in columns:
        query = ("SELECT COALESCE(e.text, s.value), e.start, e.end, e.globalTid FROM NVTX_EVENTS AS e "
                 "LEFT JOIN StringIds AS s ON s.id = e.textId")
    else:
        query = "SELECT e.text, e.start, e.end, e.globalTid FROM NVTX_EVENTS AS e"
    query += f" WHERE e.eventType IN {_NVTX_RANGE_TYPES} AND e.end IS NOT NULL"
    ranges: dict[Hashable, list[_Range]] = defaultdict(list)
    for name, start, end, tid in db.execute(query):
        r = _parse_range(name or "", start, end)
        if r is not None:
            ranges[tid].append(r)
    return ranges


def load_trace(path: str | Path, comm_pattern: str | re.Pattern = COMM_PATTERN) -> list[KernelRecord]:
    """Either loader, picked by suffix: ``.json``/``.json.gz`` (torch) or ``.sqlite`` (nsys)."""
    name = Path(path).name
    if name.endswith((".json", ".json.gz")):
        return load_torch_trace(path, comm_pattern)
    if name.endswith(".sqlite"):
        return load_nsys_sqlite(path, comm_pattern)
    raise ValueError(f"{path}: expected a torch trace (.json, .json.gz) or an nsys export (.sqlite); "
                     "convert an .nsys-rep with `nsys export --type sqlite`")
