"""Overlap report: torch traces and nsys SQLite exports, written here, give the same exact Report."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from deepcomm.trace_analysis import (
    COMM,
    COMPUTE,
    KernelRecord,
    OverlapStats,
    StageStats,
    after_peer_arrival,
    analyze,
    exposed_spans,
    launch_leads,
    lead_by_stage,
    load_nsys_sqlite,
    load_torch_trace,
    load_trace,
    split_by_process,
)

TOOL = Path(__file__).resolve().parents[1] / "tools" / "overlap_report.py"
_spec = importlib.util.spec_from_file_location("overlap_report", TOOL)
overlap_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(overlap_report)

GEMM = "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64"
ELEMENTWISE = "void at::native::vectorized_elementwise_kernel<4, at::native::AddFunctor<float> >(int)"
DISPATCH = "void deepcomm::intranode::(anonymous namespace)::dispatch_kernel<(deepcomm::intranode::Payload)0>()"
COMBINE = "void deepcomm::intranode::(anonymous namespace)::combine_kernel(deepcomm::intranode::Context)"
INTERNODE_COMBINE = "void deepcomm::internode::(anonymous namespace)::combine_kernel<int>(int)"
NCCL = "ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)"

PID = 4242
THREADS = (4242, 4250)  # CPU thread ids; THREADS[0] is the main thread


@dataclass
class Spec:
    """A trace's content in µs: ranges (thread, name, start, end); kernels
    (name, start, end, stream, launch thread, launch time or None when the launch was not recorded)."""

    ranges: list[tuple[int, str, int, int]]
    kernels: list[tuple[str, int, int, int, int, int | None]]


# Layer 0: a dispatch kernel spans two compute kernels of two micro-batches (130 of 150 µs hidden).
# Layer 1: combine alone (0 hidden), then NCCL half under layer 2's experts (50 of 200 hidden).
# Layer 2: compute only. Outside any range: a combine 30 of 40 µs under an unattributed kernel.
MAIN = Spec(
    ranges=[
        (0, "L0/mb0/attention", 0, 100),
        (0, "L0/mb0/dispatch", 100, 200),
        (0, "L0/mb1/attention", 200, 300),
        (0, "L1/mb0/combine", 300, 400),
        (0, "L1/mb1/dispatch", 400, 500),
        (0, "L2/mb0/experts", 500, 600),
    ],
    kernels=[
        (GEMM, 1000, 1100, 7, 0, 10),
        (DISPATCH, 1050, 1200, 20, 0, 110),
        (ELEMENTWISE, 1100, 1180, 7, 0, 210),
        (COMBINE, 1300, 1400, 20, 0, 310),
        (NCCL, 1400, 1500, 21, 0, 410),
        (GEMM, 1450, 1600, 7, 0, 510),
        (ELEMENTWISE, 1700, 1750, 7, 0, 700),
        (INTERNODE_COMBINE, 1720, 1760, 20, 0, 710),
    ],
)


def stats(comm, hidden, compute, span, kernels, stages=None) -> OverlapStats:
    """OverlapStats from µs values."""
    stages = {name: StageStats(c * 1000, h * 1000) for name, (c, h) in (stages or {}).items()}
    return OverlapStats(comm * 1000, hidden * 1000, compute * 1000, span * 1000, kernels, stages)


MAIN_LAYERS = {
    0: stats(150, 130, 180, 200, 3, {"dispatch": (150, 130)}),
    1: stats(200, 50, 0, 200, 2, {"combine": (100, 0), "dispatch": (100, 50)}),
    2: stats(0, 0, 150, 150, 1),
}
MAIN_UNATTRIBUTED = stats(40, 30, 50, 60, 2)
MAIN_TOTAL = stats(390, 210, 380, 760, 8, {"combine": (100, 0), "dispatch": (250, 180)})


def write_torch_trace(path: Path, spec: Spec, base_us: int = 1_700_000_000_000) -> Path:
    """A Chrome trace laid out as kineto writes one: CPU events on (pid, tid), kernels on
    (device, stream), linked by args.correlation and ac2g flows; plus events that must be ignored."""
    events = [{"ph": "M", "name": "process_name", "pid": PID, "tid": 0, "args": {"name": "python"}}]
    for thread, name, start, end in spec.ranges:
        events.append({"ph": "X", "cat": "user_annotation", "name": name, "pid": PID, "tid": THREADS[thread],
                       "ts": base_us + start, "dur": end - start, "args": {"External id": len(events)}})
    for correlation, (name, start, end, stream, thread, launch) in enumerate(spec.kernels, start=1):
        events.append({"ph": "X", "cat": "kernel", "name": name, "pid": 0, "tid": stream,
                       "ts": base_us + start, "dur": end - start,
                       "args": {"device": 0, "stream": stream, "correlation": correlation}})
        if launch is None:
            continue
        events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": PID,
                       "tid": THREADS[thread], "ts": base_us + launch, "dur": 3,
                       "args": {"cbid": 211, "correlation": correlation}})
        events.append({"ph": "s", "id": correlation, "pid": PID, "tid": THREADS[thread],
                       "ts": base_us + launch, "cat": "ac2g", "name": "ac2g"})
        events.append({"ph": "f", "id": correlation, "pid": 0, "tid": stream, "ts": base_us + start,
                       "cat": "ac2g", "name": "ac2g", "bp": "e"})
    # A copy across the whole trace and the GPU-side copy of a range: neither is a kernel or a launch context.
    events.append({"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pageable -> Device)", "pid": 0, "tid": 7,
                   "ts": base_us, "dur": 5000, "args": {"device": 0, "stream": 7, "correlation": 999}})
    events.append({"ph": "X", "cat": "gpu_user_annotation", "name": "L9/mb0/dispatch", "pid": 0, "tid": 7,
                   "ts": base_us, "dur": 5000, "args": {}})
    path.write_text(json.dumps({"schemaVersion": 1, "traceEvents": events}))
    return path


NSYS_SCHEMA = """
CREATE TABLE StringIds (id INTEGER PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE CUPTI_ACTIVITY_KIND_KERNEL (start INTEGER NOT NULL, end INTEGER NOT NULL, deviceId INTEGER NOT NULL,
    contextId INTEGER NOT NULL, streamId INTEGER NOT NULL, correlationId INTEGER, globalPid INTEGER,
    demangledName INTEGER NOT NULL, shortName INTEGER NOT NULL, mangledName INTEGER);
CREATE TABLE CUPTI_ACTIVITY_KIND_RUNTIME (start INTEGER NOT NULL, end INTEGER NOT NULL, eventClass INTEGER NOT NULL,
    globalTid INTEGER, correlationId INTEGER, nameId INTEGER NOT NULL, returnValue INTEGER NOT NULL);
CREATE TABLE NVTX_EVENTS (start INTEGER NOT NULL, end INTEGER, eventType INTEGER NOT NULL, rangeId INTEGER,
    category INTEGER, color INTEGER, text TEXT, globalTid INTEGER, endGlobalTid INTEGER, textId INTEGER,
    domainId INTEGER);
"""


def global_id(pid: int, tid: int = 0) -> int:
    return (pid << 24) | tid


def write_nsys_sqlite(path: Path, spec: Spec, base_ns: int = 5_000_000, pid: int = PID,
                      correlation_base: int = 0) -> Path:
    """An nsys-style SQLite export of the same content; names go through StringIds, NVTX ranges
    alternate between inline text (push/pop) and registered strings (start/end)."""
    db = sqlite3.connect(path)
    if not db.execute("SELECT name FROM sqlite_master WHERE name = 'StringIds'").fetchone():
        db.executescript(NSYS_SCHEMA)

    def string_id(value: str) -> int:
        row = db.execute("SELECT id FROM StringIds WHERE value = ?", (value,)).fetchone()
        return row[0] if row else db.execute("INSERT INTO StringIds (value) VALUES (?)", (value,)).lastrowid

    for index, (thread, name, start, end) in enumerate(spec.ranges):
        tid = global_id(pid, THREADS[thread])
        if index % 2 == 0:
            row = (base_ns + start * 1000, base_ns + end * 1000, 59, name, tid, None)
        else:
            row = (base_ns + start * 1000, base_ns + end * 1000, 60, None, tid, string_id(name))
        db.execute("INSERT INTO NVTX_EVENTS (start, end, eventType, text, globalTid, textId) VALUES (?,?,?,?,?,?)", row)
    # An NVTX mark (no end) with a range-like name is not a range.
    db.execute("INSERT INTO NVTX_EVENTS (start, end, eventType, text, globalTid) VALUES (?, NULL, 34, ?, ?)",
               (base_ns, "L9/mb0/dispatch", global_id(pid, THREADS[0])))
    launch_name = string_id("cudaLaunchKernel_v7000")
    for index, (name, start, end, stream, thread, launch) in enumerate(spec.kernels, start=1):
        correlation = correlation_base + index
        db.execute("INSERT INTO CUPTI_ACTIVITY_KIND_KERNEL VALUES (?,?,?,?,?,?,?,?,?,?)",
                   (base_ns + start * 1000, base_ns + end * 1000, 0, 1, stream, correlation, global_id(pid),
                    string_id(name), string_id(name.split("(")[0].split("::")[-1]), None))
        if launch is not None:
            db.execute("INSERT INTO CUPTI_ACTIVITY_KIND_RUNTIME VALUES (?,?,?,?,?,?,?)",
                       (base_ns + launch * 1000, base_ns + launch * 1000 + 3000, 1,
                        global_id(pid, THREADS[thread]), correlation, launch_name, 0))
    db.commit()
    db.close()
    return path


WRITERS = {
    "torch": lambda tmp_path, spec: write_torch_trace(tmp_path / "trace.json", spec),
    "nsys": lambda tmp_path, spec: write_nsys_sqlite(tmp_path / "trace.sqlite", spec),
}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_synthetic_shares_per_layer(tmp_path, fmt):
    report = analyze(load_trace(WRITERS[fmt](tmp_path, MAIN)))
    assert report.layers == MAIN_LAYERS
    assert report.unattributed == MAIN_UNATTRIBUTED
    assert report.total == MAIN_TOTAL
    assert report.layers[0].share == pytest.approx(130 / 150)
    assert report.layers[1].share == pytest.approx(50 / 200)
    assert report.layers[2].share is None
    assert report.total.share == pytest.approx(210 / 390)
    assert [label for label, _ in report.rows()] == ["L0", "L1", "L2", "none", "all"]


def test_torch_and_nsys_give_the_same_records_and_report(tmp_path):
    torch_records = load_torch_trace(write_torch_trace(tmp_path / "t.json", MAIN))
    nsys_records = load_nsys_sqlite(write_nsys_sqlite(tmp_path / "t.sqlite", MAIN))

    def relative(records):
        origin = records[0].start_ns
        return [(r.name, r.start_ns - origin, r.end_ns - origin, r.stream, r.device, r.kind, r.layer,
                 r.microbatch, r.stage, r.launch_ns - origin) for r in records]

    assert relative(torch_records) == relative(nsys_records)
    assert analyze(torch_records) == analyze(nsys_records)
    dispatch = next(r for r in torch_records if r.name == DISPATCH)
    assert (dispatch.kind, dispatch.layer, dispatch.microbatch, dispatch.stage) == (COMM, 0, 0, "dispatch")
    assert [r.kind for r in torch_records if r.name in (GEMM, ELEMENTWISE)] == [COMPUTE] * 4


def test_gzipped_torch_trace(tmp_path):
    plain = write_torch_trace(tmp_path / "t.json", MAIN)
    packed = tmp_path / "t.json.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert analyze(load_trace(packed)) == analyze(load_trace(plain))


NESTED = Spec(
    ranges=[
        (0, "L3/mb0/experts", 0, 100),
        (0, "L3/mb1/combine.backward", 20, 60),
        (0, "L4/mb0/dispatch", 30, 40),
        (1, "L5/mb0/attention", 100, 200),  # another thread: does not cover thread 0's launches
    ],
    kernels=[
        (COMBINE, 1000, 1010, 20, 0, 35),
        (COMBINE, 1010, 1020, 20, 0, 50),
        (COMBINE, 1020, 1030, 20, 0, 60),  # at the inner range's end: still inside (ends inclusive)
        (COMBINE, 1030, 1040, 20, 0, 80),
        (COMBINE, 1040, 1050, 20, 0, 150),
        (COMBINE, 1050, 1060, 20, 1, 150),
        (COMBINE, 1060, 1070, 20, 0, None),  # launch not recorded
    ],
)


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_innermost_range_on_the_launching_thread_wins(tmp_path, fmt):
    records = load_trace(WRITERS[fmt](tmp_path, NESTED))
    assert [(r.layer, r.microbatch, r.stage) for r in records] == [
        (4, 0, "dispatch"),
        (3, 1, "combine.backward"),
        (3, 1, "combine.backward"),
        (3, 0, "experts"),
        (None, None, None),
        (5, 0, "attention"),
        (None, None, None),
    ]
    report = analyze(records)
    assert report.unattributed.comm_ns == 20_000
    assert report.total.comm_ns == 70_000
    assert report.total.share == 0.0
    assert report.layers[3].stages == {"combine.backward": StageStats(20_000, 0), "experts": StageStats(10_000, 0)}


def test_correlation_ids_repeat_across_processes_in_one_nsys_report(tmp_path):
    # Two ranks in one report: both number their launches from 1; the process keeps them apart.
    path = tmp_path / "two_ranks.sqlite"
    write_nsys_sqlite(path, Spec([(0, "L0/mb0/dispatch", 0, 100)], [(DISPATCH, 1000, 1100, 20, 0, 50)]), pid=100)
    write_nsys_sqlite(path, Spec([(0, "L7/mb1/combine", 0, 100)], [(COMBINE, 1000, 1100, 20, 0, 50)]), pid=200)
    records = load_nsys_sqlite(path)
    assert sorted((r.name, r.layer, r.microbatch, r.stage) for r in records) == sorted(
        [(DISPATCH, 0, 0, "dispatch"), (COMBINE, 7, 1, "combine")])


def record(kind, start, end, stream=0, device=0, layer=None, name="k", microbatch=0, stage="dispatch") -> KernelRecord:
    return KernelRecord(name, start, end, stream, device, kind, layer, None if layer is None else microbatch,
                        None if layer is None else stage)


def test_comm_kernel_spanning_several_compute_kernels_on_other_streams():
    records = [
        record(COMM, 0, 100, stream=2, layer=0),
        record(COMPUTE, 10, 30, stream=1),
        record(COMPUTE, 20, 50, stream=3),  # overlaps the previous one: counted once
        record(COMPUTE, 70, 80, stream=1),
        record(COMPUTE, 90, 200, stream=1),  # sticks out past the comm kernel
        record(COMPUTE, 0, 100, stream=1, device=1),  # another GPU hides nothing here
    ]
    report = analyze(records)
    assert (report.layers[0].comm_ns, report.layers[0].hidden_ns) == (100, 40 + 10 + 10)
    assert report.total.compute_ns == 40 + 10 + 110 + 100
    assert report.total.span_ns == 200


def test_comm_kernels_start_when_the_last_rank_arrives():
    """Rank 0 launches each call early and spins until rank 1's part starts; what is left after that,
    and how much of it compute covers, is the same call on both ranks."""
    rank0 = [record(COMM, 0, 100, layer=0, name="dispatch_kernel"), record(COMPUTE, 0, 70),
             record(COMM, 200, 260, layer=0, name="combine_kernel"), record(COMPUTE, 230, 250)]
    rank1 = [record(COMM, 60, 110, layer=0, name="dispatch_kernel"), record(COMPUTE, 0, 80),
             record(COMM, 150, 265, layer=0, name="combine_kernel")]
    net0, net1 = after_peer_arrival([rank0, rank1])
    assert sorted((r.start_ns, r.end_ns) for r in net0 if r.kind == COMM) == [(60, 100), (200, 260)]
    assert sorted((r.start_ns, r.end_ns) for r in net1 if r.kind == COMM) == [(60, 110), (200, 265)]
    assert [r for r in net0 if r.kind == COMPUTE] == [r for r in rank0 if r.kind == COMPUTE]
    before, after = analyze(rank0).total, analyze(net0).total
    assert (before.comm_ns, before.hidden_ns) == (160, 70 + 20)
    assert (after.comm_ns, after.hidden_ns) == (40 + 60, 10 + 20)
    # A kernel that ended before the last rank's part started (skewed clocks) is left with no time.
    early = [record(COMM, 0, 50, name="dispatch_kernel"), record(COMM, 100, 120, name="combine_kernel")]
    net_early, _ = after_peer_arrival([early, rank1])
    assert sorted((r.start_ns, r.end_ns) for r in net_early) == [(50, 50), (120, 120)]


def test_ranks_whose_comm_kernels_do_not_pair_up_give_none():
    one = [record(COMM, 0, 10, name="dispatch_kernel")]
    assert after_peer_arrival([one, one + [record(COMM, 20, 30, name="combine_kernel")]]) is None
    assert after_peer_arrival([one, [record(COMM, 0, 10, name="combine_kernel")]]) is None
    assert after_peer_arrival([[], []]) == [[], []]


def test_same_step_with_traces_whose_comm_kernels_do_not_pair_up(tmp_path, capsys):
    fewer = Spec(MAIN.ranges, [k for k in MAIN.kernels if k[0] != DISPATCH])
    paths = [write_torch_trace(tmp_path / "r0.json", MAIN), write_torch_trace(tmp_path / "r1.json", fewer)]
    overlap_report.main([str(p) for p in paths] + ["--same-step", "--json", str(tmp_path / "o.json")])
    assert "--same-step: the traces' comm kernels do not pair up" in capsys.readouterr().out
    assert json.loads((tmp_path / "o.json").read_text())["min_share_after_peer_arrival"] is None


def test_no_comm_kernels_gives_no_share(tmp_path, capsys):
    spec = Spec([(0, "L0/mb0/attention", 0, 100)], [(GEMM, 1000, 1100, 7, 0, 10)])
    report = analyze(load_trace(write_torch_trace(tmp_path / "t.json", spec)))
    assert report.layers[0].share is None and report.total.share is None
    assert report.total.compute_ns == 100_000
    assert analyze([]).total == OverlapStats(0, 0, 0, 0, 0)
    overlap_report.main([str(tmp_path / "t.json"), "--png", str(tmp_path / "t.png")])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split() for line in lines[2:4]] == [["L0", "0.0", "0.0", "-", "100.0"],
                                                     ["all", "0.0", "0.0", "-", "100.0"]]


def test_comm_pattern_override(tmp_path):
    path = write_torch_trace(tmp_path / "t.json", MAIN)
    records = load_trace(path, comm_pattern="gemm")
    assert {r.name for r in records if r.kind == COMM} == {GEMM}


# The host's lead: a dispatch queued 900 µs ahead, a combine launched 5 µs before it started (its stream had
# waited for the host), a comm kernel whose launch the trace lost, and a compute kernel (not counted).
LATE = Spec(
    ranges=[(0, "L0/mb0/dispatch", 0, 50), (0, "L0/mb0/combine", 900, 1000), (0, "L0/mb1/dispatch", 1000, 1100)],
    kernels=[
        (DISPATCH, 900, 950, 20, 0, 0),
        (GEMM, 905, 990, 7, 0, 10),
        (COMBINE, 1000, 1050, 20, 0, 995),
        (DISPATCH, 1060, 1070, 20, 0, None),
        (DISPATCH, 1080, 1090, 20, 0, 1030),
    ],
)


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_launch_leads_say_where_the_stream_waited_for_the_host(tmp_path, fmt):
    records = load_trace(WRITERS[fmt](tmp_path, LATE))
    leads = [(r.stage, (r.start_ns - r.launch_ns) // 1000) for r in launch_leads(records)]
    assert leads == [("combine", 5), ("dispatch", 50), ("dispatch", 900)]  # shortest first; no launch: left out
    by_stage = lead_by_stage(records, short_ns=20_000)
    assert list(by_stage) == ["dispatch", "combine"]  # in the order the stages' kernels first started
    assert dataclasses.astuple(by_stage["dispatch"]) == (2, 50_000, 900_000, 0)
    assert dataclasses.astuple(by_stage["combine"]) == (1, 5_000, 5_000, 1)
    assert [r.name for r in launch_leads(records, kind=COMPUTE)] == [GEMM]
    assert lead_by_stage([], short_ns=1) == {}


def test_cli_lists_the_host_lead_of_comm_kernels(tmp_path, capsys):
    path = str(write_torch_trace(tmp_path / "t.json", LATE))
    overlap_report.main([path, "--launches", "1", "--json", str(tmp_path / "o.json")])
    out = capsys.readouterr().out
    assert "host lead of comm kernels (start - launch; under 20 µs the stream waited for the host)" in out
    section = out[out.index("host lead"):].splitlines()
    assert [line.split() for line in section[2:4]] == [["dispatch", "2", "50.0", "900.0", "0"],
                                                       ["combine", "1", "5.0", "5.0", "1"]]
    assert out.rstrip().endswith("5.0         100.0  L0/mb0/combine")  # the one launched latest, at 1000 µs
    saved = json.loads((tmp_path / "o.json").read_text())["traces"][0]["launch_leads"]
    assert saved["combine"] == {"kernels": 1, "min_ns": 5000, "median_ns": 5000, "short": 1}
    overlap_report.main([path, "--launches", "0", "--short-lead", "60"])
    out = capsys.readouterr().out
    assert "under 60 µs" in out and "lead µs" not in out  # the table without the list
    for bad in (["--launches", "-1"], ["--launches", "1", "--short-lead", "0"]):
        with pytest.raises(SystemExit):
            overlap_report.main([path, *bad])
    spec = Spec([(0, "L0/mb0/attention", 0, 100)], [(GEMM, 1000, 1100, 7, 0, 10)])
    overlap_report.main([str(write_torch_trace(tmp_path / "c.json", spec)), "--launches", "3"])
    assert "no comm kernel with a recorded launch" in capsys.readouterr().out


def test_bad_inputs_raise_clear_errors(tmp_path):
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(ValueError, match="not a torch profiler Chrome trace"):
        load_trace(tmp_path / "x.json")
    with pytest.raises(ValueError, match="nsys export --type sqlite"):
        load_trace(tmp_path / "x.nsys-rep")
    sqlite3.connect(tmp_path / "empty.sqlite").execute("CREATE TABLE t (a)").connection.close()
    with pytest.raises(ValueError, match="not an nsys SQLite export"):
        load_trace(tmp_path / "empty.sqlite")
    with pytest.raises(ValueError, match="kind"):
        KernelRecord("k", 0, 1, 0, 0, "copy")


def test_cli_table_json_png_for_two_ranks(tmp_path, capsys):
    torch_path = write_torch_trace(tmp_path / "r0.json", MAIN)
    # The nsys export on the torch trace's clock, as if both came from one host's step.
    nsys_path = write_nsys_sqlite(tmp_path / "r1.sqlite", MAIN, base_ns=1_700_000_000_000_000)
    png, out_json = tmp_path / "overlap.png", tmp_path / "overlap.json"
    overlap_report.main([str(torch_path), str(nsys_path), "--rank-label", "r0", "r1", "--same-step",
                         "--png", str(png), "--json", str(out_json)])
    out = capsys.readouterr().out
    assert out.count("share %") == 4  # a layer table and a stage table per rank
    assert "L0" in out and f"min share over traces: {100 * 210 / 390:.1f}% (r0)" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(out_json.read_text())
    assert [t["label"] for t in saved["traces"]] == ["r0", "r1"]
    assert saved["traces"][0]["layers"]["L0"]["share"] == pytest.approx(130 / 150)
    assert saved["traces"][0]["layers"]["all"]["stages"]["dispatch"]["comm_ns"] == 250_000
    assert saved["min_share"]["share"] == pytest.approx(210 / 390)
    # The two traces are the same step launched at the same times: nobody waited for a peer.
    assert f"last rank arriving: {100 * 210 / 390:.1f}% (r0)" in out
    for label in ("r0", "r1"):
        assert f"  {label}: {100 * 210 / 390:.1f}% counted from the last rank's arrival" in out
    assert saved["min_share_after_peer_arrival"]["share"] == pytest.approx(210 / 390)


def test_same_step_refuses_traces_on_different_clocks(tmp_path, capsys):
    # A torch trace (host clock) beside an nsys export counting from its session's start.
    paths = [write_torch_trace(tmp_path / "r0.json", MAIN), write_nsys_sqlite(tmp_path / "r1.sqlite", MAIN)]
    overlap_report.main([str(p) for p in paths] + ["--same-step", "--json", str(tmp_path / "o.json")])
    assert "--same-step: the traces do not share a clock" in capsys.readouterr().out
    assert json.loads((tmp_path / "o.json").read_text())["min_share_after_peer_arrival"] is None


def test_one_rank_s_compute_hides_none_of_another_rank_s_comm():
    """Two processes on one GPU (ranks under MPS) in one nsys report: each rank's share is its own."""
    comm_rank = [KernelRecord("dispatch_kernel", 0, 100, 1, 0, COMM, 0, 0, "dispatch", process=100)]
    compute_rank = [KernelRecord("gemm", 0, 100, 2, 0, COMPUTE, 0, 0, "experts", process=200)]
    assert analyze(comm_rank + compute_rank).total.share == 0.0
    assert [s.start_ns for s in exposed_spans(comm_rank + compute_rank)] == [0]
    assert split_by_process(compute_rank + comm_rank) == {100: comm_rank, 200: compute_rank}


def test_an_nsys_report_of_two_ranks_gives_a_table_each(tmp_path, capsys):
    path = tmp_path / "two_ranks.sqlite"
    write_nsys_sqlite(path, MAIN, pid=100)
    write_nsys_sqlite(path, MAIN, pid=200, correlation_base=1000)
    overlap_report.main([str(path)])
    out = capsys.readouterr().out
    assert f"== {path} pid 100" in out and f"== {path} pid 200" in out
    assert f"min share over traces: {100 * 210 / 390:.1f}%" in out


def test_png_limited_to_layers_or_window(tmp_path):
    path = str(write_torch_trace(tmp_path / "t.json", MAIN))
    for limit in (["--layers", "1:2"], ["--window", "300:"]):
        png = tmp_path / f"{limit[0][2:]}.png"
        overlap_report.main([path, "--png", str(png), *limit])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="no kernels in the layers"):
        overlap_report.main([path, "--png", str(tmp_path / "none.png"), "--layers", "40:50"])
    with pytest.raises(SystemExit):
        overlap_report.main([path, "--layers", "5:2"])


def test_cpu_profiler_trace_loads_with_no_kernels(tmp_path, capsys):
    x = torch.randn(64, 64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for layer in range(2):
            for stage in ("attention", "dispatch"):
                with torch.profiler.record_function(f"L{layer}/mb0/{stage}"):
                    x = torch.tanh(x @ x)
    path = tmp_path / "cpu.json"
    prof.export_chrome_trace(str(path))
    records = load_torch_trace(path)
    assert records == []
    report = analyze(records)
    assert report.layers == {} and report.unattributed is None and report.total.share is None
    overlap_report.main([str(path), "--png", str(tmp_path / "cpu.png")])
    assert (tmp_path / "cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "all" in capsys.readouterr().out


@pytest.mark.gpu
def test_cuda_trace_kernel_on_a_second_stream_overlaps_matmuls(tmp_path):
    # torch.cuda._sleep's spin_kernel stands in for a comm kernel: it holds one block for a fixed
    # number of cycles while matmuls on another stream fill the rest of the GPU.
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    comm_stream, compute_stream = torch.cuda.Stream(), torch.cuda.Stream()
    (a @ a).sum().item()  # cuBLAS set up before the trace
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        with torch.cuda.stream(comm_stream), torch.profiler.record_function("L0/mb1/dispatch"):
            torch.cuda._sleep(20_000_000)
        with torch.cuda.stream(compute_stream), torch.profiler.record_function("L0/mb0/attention"):
            for _ in range(20):
                a @ a
        torch.cuda.synchronize()
    path = tmp_path / "cuda.json"
    prof.export_chrome_trace(str(path))
    records = load_torch_trace(path, comm_pattern="spin_kernel")
    comm = [r for r in records if r.kind == COMM]
    assert len(comm) == 1 and (comm[0].layer, comm[0].microbatch, comm[0].stage) == (0, 1, "dispatch")
    assert any(r.kind == COMPUTE and r.stage == "attention" for r in records)
    report = analyze(records)
    assert report.layers[0].share > 0


def test_comm_pattern_matches_demangled_and_nvcc_static_names_only():
    import re

    from deepcomm.trace_analysis import COMM_PATTERN

    comm = [
        COMBINE, INTERNODE_COMBINE,
        "__nv_static_34__91b1375f_12_intranode_cu_d0a16e5b__ZN8deepcomm9intranode45_GLOBAL__N__91b1375f_12_"
        "intranode_cu_d0a16e5b15dispatch_kernelILNS0_7PayloadE0EEEvNS0_7ContextENS0_12DispatchArgsE",
        "__nv_static_34__91b1375f_12_internode_cu_d0a16e5b__ZN8deepcomm9internode45_GLOBAL__N__91b1375f_12_"
        "internode_cu_d0a16e5b13notify_kernelENS0_7ContextENS0_10NotifyArgsE",
        "ncclDevKernel_AllToAll_RING_LL(ncclDevKernelArgsStorage<4096ul>)",
        # The low-latency mode's, both forms.
        "_ZN8deepcomm11low_latency47_GLOBAL__N__f15305fc_14_low_latency_cu_6a66627215dispatch_kernelILNS_9"
        "intranode7PayloadE0ELb1ELb0EEEvNS0_7ContextENS0_12DispatchArgsENS1_8ChunkingES6_",
        "_ZN8deepcomm11low_latency47_GLOBAL__N__f15305fc_14_low_latency_cu_6a66627220combine_owner_kernelILb1ELb0E"
        "ELb0EEEvNS0_7ContextENS0_11CombineArgsENS1_8ChunkingES5_",
        "void deepcomm::low_latency::(anonymous namespace)::combine_recv_kernel<true, false>(x)",
        "void deepcomm::low_latency::(anonymous namespace)::combine_send_kernel(deepcomm::low_latency::Context, int)",
        "void deepcomm::low_latency::(anonymous namespace)::stage_outputs_kernel(x)",
    ]
    compute = [
        "__nv_static_30__7f6c90fb_9_layout_cu_10cbbe38__ZN8deepcomm41_GLOBAL__N__7f6c90fb_9_layout_cu_10cbbe38"
        "22dispatch_layout_kernelENS_18DispatchLayoutArgsE",
        "nvjet_sm90_tst_128x256_64x4_4x2_h_bz_coopA_NNN",
        "void other::combine_kernel(int)",
        "void other::low_latency::combine_owner_kernel(int)",
    ]
    assert all(re.search(COMM_PATTERN, name) for name in comm)
    assert not any(re.search(COMM_PATTERN, name) for name in compute)


def test_exposed_spans_name_the_comm_kernel_and_the_compute_around_it():
    records = [
        record(COMPUTE, 0, 40, layer=0, microbatch=1, stage="attention"),
        record(COMM, 10, 100, stream=2, layer=0, microbatch=0, stage="dispatch"),
        record(COMPUTE, 50, 60, layer=0, microbatch=0, stage="experts"),
        record(COMM, 90, 130, stream=3, layer=0, microbatch=1, stage="dispatch"),  # continues the first's stretch
        record(COMPUTE, 140, 150, layer=0, microbatch=1, stage="experts"),
        record(COMM, 200, 230, stream=2, layer=0, microbatch=1, stage="combine"),  # nothing after it
        record(COMPUTE, 0, 300, device=1),  # another GPU covers nothing here
    ]
    spans = exposed_spans(records)
    assert [(s.start_ns, s.end_ns) for s in spans] == [(60, 130), (200, 230), (40, 50)]
    assert [(s.comm.stage, s.comm.microbatch) for s in spans] == [("dispatch", 0), ("combine", 1), ("dispatch", 0)]
    assert [(s.before.stage, s.after and s.after.stage) for s in spans] == [
        ("experts", "experts"), ("experts", None), ("attention", "experts")]
    assert exposed_spans([r for r in records if r.kind == COMPUTE]) == []
    covered = [record(COMM, 10, 20), record(COMPUTE, 0, 30)]
    assert exposed_spans(covered) == []


def test_cli_lists_exposed_stretches_and_stage_times(tmp_path, capsys):
    paths = [write_torch_trace(tmp_path / "r0.json", MAIN), write_torch_trace(tmp_path / "r1.json", MAIN)]
    overlap_report.main([str(p) for p in paths] + ["--rank-label", "r0", "r1", "--same-step",
                                                   "--exposed", "2", "--stage-times"])
    out = capsys.readouterr().out
    # MAIN exposes 390 - 210 = 180 µs of comm: layer 1's combine and NCCL's first half back to back
    # (150), the dispatch after the elementwise kernel (20) and the unattributed combine's tail (10).
    assert out.count("exposed comm: 3 stretches, 180.0 µs; longest 2:") == 2
    lines = out.splitlines()
    top = lines.index(next(line for line in lines
                           if line.startswith("== r0 (each comm kernel from its call's last rank arriving): exposed")))
    assert lines[top + 2].split() == ["150.0", "300.0", "L1/mb0/combine", "L0/mb1/attention", "L2/mb0/experts"]
    assert lines[top + 3].split() == ["20.0", "180.0", "L0/mb0/dispatch", "L0/mb1/attention", "L2/mb0/experts"]
    assert "compute µs" in out and ["L0/mb0/attention", "100.0", "100.0"] in [line.split() for line in lines]
    with pytest.raises(SystemExit):
        overlap_report.main([str(paths[0]), "--exposed", "-1"])
