"""python -m deepcomm.ray_launch: ranks as Ray actors, numbered host after host, with torchrun's rank variables;
the first failing rank stops the others and is named with its error."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from deepcomm.ray_launch import Placement, parse_args, rank_environments, rank_order

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")


def test_ranks_are_numbered_host_after_host_and_by_gpu_within_a_host():
    # Ray may hand actors out interleaved across hosts and GPUs in any order.
    placements = [Placement("10.0.0.2", ("3",)), Placement("10.0.0.1", ("1",)), Placement("10.0.0.2", ("0",)),
                  Placement("10.0.0.1", ("0",))]
    assert rank_order(placements) == [2, 0, 3, 1]  # host 10.0.0.2 first seen: its GPU 0, then GPU 3
    envs = rank_environments(placements, 29500)
    by_rank = sorted(envs, key=lambda e: int(e["RANK"]))
    assert [(e["GROUP_RANK"], e["LOCAL_RANK"]) for e in by_rank] == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    for env in envs:
        assert env["WORLD_SIZE"] == "4" and env["LOCAL_WORLD_SIZE"] == "2"
        assert env["MASTER_ADDR"] == "10.0.0.2" and env["MASTER_PORT"] == "29500"
        assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # Ray's numbering
    # Every rank of a host sees that host's GPUs in local-rank order: local rank i's is the i-th, its own.
    for actor, env in enumerate(envs):
        visible = env["CUDA_VISIBLE_DEVICES"].split(",")
        assert visible[int(env["LOCAL_RANK"])] == placements[actor].gpus[0]
    assert envs[0]["CUDA_VISIBLE_DEVICES"] == "0,3" and envs[1]["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_gpus_sort_as_numbers_and_uuids_as_text():
    assert rank_order([Placement("h", ("10",)), Placement("h", ("9",))]) == [1, 0]
    uuids = [Placement("h", ("GPU-bb",)), Placement("h", ("GPU-aa",))]
    assert rank_order(uuids) == [1, 0]
    assert rank_environments(uuids, 1)[0]["CUDA_VISIBLE_DEVICES"] == "GPU-aa,GPU-bb"


def test_cpu_ranks_see_no_gpu():
    envs = rank_environments([Placement("h", ()), Placement("h", ())], 1234)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["", ""]
    assert [e["RANK"] for e in envs] == ["0", "1"]


@pytest.mark.parametrize("placements, port, message", [
    ([], 1, "^placements: no actor"),
    ([Placement("h", ())], 0, "^master_port:"),
    ([Placement("a", ()), Placement("a", ()), Placement("b", ())], 1, "^placements: .*different numbers of ranks"),
])
def test_bad_placements_are_refused_by_name(placements, port, message):
    with pytest.raises(ValueError, match=message):
        rank_environments(placements, port)


def test_the_target_and_everything_after_it_are_the_targets(tmp_path):
    script = tmp_path / "job.py"
    script.write_text("")
    args = parse_args(["--nproc", "2", "--gpus-per-rank=0", str(script), "--nproc", "7", "-m", "x"])
    assert (args.nproc, args.gpus_per_rank) == (2, 0)
    assert args.command == [str(script), "--nproc", "7", "-m", "x"]
    args = parse_args(["--nproc", "3", "--grace", "1", "-m", "deepcomm.bench", "--preset", "prefill", "-h"])
    assert args.command == ["-m", "deepcomm.bench", "--preset", "prefill", "-h"] and args.grace == 1
    assert parse_args(["--nproc", "1", "-mdeepcomm.bench"]).command == ["-m", "deepcomm.bench"]  # as python takes it
    assert parse_args(["--nproc", "1", "--", "-m", "m"]).command == ["-m", "m"]


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "0", "-m", "m"], "--nproc: must be >= 1"),
    (["--nproc", "2"], "target: a script to run, or -m MODULE"),
    (["--nproc", "2", "-m"], "-m: expected a module name"),
    (["--nproc", "2", "no_such_script.py"], "target: no script at no_such_script.py"),
    (["--nproc", "2", "--cpus-per-rank", "0", "-m", "m"], "--cpus-per-rank: must be a number > 0"),
    (["--nproc", "2", "--cpus-per-rank", "inf", "-m", "m"], "--cpus-per-rank: must be a number > 0"),
    (["--nproc", "2", "--timeout", "-1", "-m", "m"], "--timeout: must be a number > 0"),
    (["--nproc", "2", "--grace", "-1", "-m", "m"], "--grace: must be a number >= 0"),
    (["--nproc", "2", "--gpus-per-rank", "2", "-m", "m"], "--gpus-per-rank"),
    (["--np", "2", "-m", "m"], "--nproc"),  # no abbreviations: a target's options never pass for ours
])
def test_bad_launcher_options_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def _launch(tmp_path, *argv, timeout=240):
    """The launcher with a Ray instance of its own (never a cluster this machine may run)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "deepcomm.ray_launch", *argv]
    start = time.monotonic()
    out = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=timeout, env=env)
    return out, time.monotonic() - start


@needs_ray
def test_the_benchmark_runs_on_ray_actors_and_checks_itself(tmp_path):
    """The main job under Ray: three CPU ranks run the reference path over gloo, checked as under torchrun."""
    out, _ = _launch(tmp_path, "--nproc", "3", "--gpus-per-rank", "0", "-m", "deepcomm.bench", "--device", "cpu",
                     "--tokens", "32", "--hidden", "128", "--experts", "12", "--topk", "4", "--iters", "2",
                     "--warmup", "1", "--dtypes", "bf16", "--json", "rows.json")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    rows = json.loads((tmp_path / "rows.json").read_text())  # relative: the ranks ran where the launcher did
    assert [(r["stage"], r["dtype"]) for r in rows] == [("layout", "-"), ("dispatch", "bf16"), ("combine", "bf16")]
    assert all(r["check"] == "ok" and r["ranks"] == 3 and r["path"] == "reference" for r in rows)
    assert "deepcomm bench: device=cpu ranks=3" in out.stdout  # rank 0's table reaches the launcher's output


@needs_ray
def test_every_line_a_rank_prints_reaches_the_launchers_output(tmp_path):
    """Ray's log forwarding drops what it has not sent when the run ends: the ranks' output comes back with their
    status instead, all of it, right after the run."""
    (tmp_path / "chatty.py").write_text(
        "import os\nfor i in range(300):\n    print(f\"rank {os.environ['RANK']} line {i}\")\n")
    out, _ = _launch(tmp_path, "--nproc", "2", "--gpus-per-rank", "0", "chatty.py")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    for rank in (0, 1):
        assert [line for line in out.stdout.splitlines() if line.startswith(f"rank {rank} ")] == [
            f"rank {rank} line {i}" for i in range(300)]


@needs_ray
@pytest.mark.multigpu
def test_the_kernels_run_between_ray_ranks_with_a_gpu_each(tmp_path):
    """Ranks placed by Ray, a GPU each: CUDA IPC between them works (every rank sees its host's GPUs), so the
    intranode and low-latency kernels run and check themselves against the reference path of the same run."""
    out, _ = _launch(tmp_path, "--nproc", "2", "--gpus-per-rank", "1", "--timeout", "300", "-m", "deepcomm.bench",
                     "--preset", "small", "--mode", "both", "--iters", "3", "--warmup", "1", "--dtypes", "bf16,fp8",
                     "--json", "rows.json", timeout=420)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    paths = {r["path"] for r in rows}
    assert paths == {"intranode", "low_latency", "reference"}, paths
    assert all(r["check"] == "ok" and r["ranks"] == 2 and r["device"] != "cpu" for r in rows), rows


BUNDLE = os.path.join(os.path.dirname(__file__), "..", "tools", "ray_bundle.sh")


def _python_tag() -> str:
    return f"cp{sys.version_info[0]}{sys.version_info[1]}"


@pytest.mark.skipif(shutil.which("xz") is None, reason="xz is not installed")
def test_a_ray_bundle_installs_where_it_is_asked(tmp_path):
    """tools/ray_bundle.sh install: the archive for this Python unpacked into the site folder given, the
    requirements from the bundle's own wheels only (none here); a stand-in Ray, as `make` needs the index."""
    tree, bundle, site = tmp_path / "tree", tmp_path / "bundle", tmp_path / "site"
    (tree / "ray").mkdir(parents=True)
    (tree / "ray" / "__init__.py").write_text('__version__ = "0.0.stand-in"\n')
    (bundle / "deps").mkdir(parents=True)
    (bundle / "requirements.txt").write_text("")
    subprocess.run(["tar", "-C", str(tree), "-cJf", str(bundle / f"ray-0.0-{_python_tag()}.tar.xz"), "ray"], check=True)
    env = {**os.environ, "PYTHON": sys.executable}  # this test's Python, whatever python3 is on PATH
    out = subprocess.run(["bash", BUNDLE, "install", str(bundle), str(site)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"ray 0.0.stand-in from {site}/ray/__init__.py" in out.stdout
    # No bundle for this Python: refused, naming what it looked for.
    (bundle / f"ray-0.0-{_python_tag()}.tar.xz").rename(bundle / "ray-0.0-cp27.tar.xz")
    out = subprocess.run(["bash", BUNDLE, "install", str(bundle), str(site)], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 1 and f"no Ray bundle for {_python_tag()} in {bundle}" in out.stderr
    assert subprocess.run(["bash", BUNDLE, "unpack", str(bundle)], capture_output=True).returncode == 2  # usage


PROBE = """
import json, os, sys, time
keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
        "CUDA_VISIBLE_DEVICES"]
seen = {k: os.environ.get(k) for k in keys}
seen["argv"] = sys.argv[1:]
with open(f"seen_{os.getpid()}.json", "w") as f:
    json.dump(seen, f)
"""


@needs_ray
def test_each_rank_gets_torchruns_rank_variables(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    out, _ = _launch(tmp_path, "--nproc", "3", "--gpus-per-rank", "0", "probe.py", "--flag", "value")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    seen = sorted((json.loads(p.read_text()) for p in tmp_path.glob("seen_*.json")), key=lambda s: s["RANK"])
    assert [s["RANK"] for s in seen] == ["0", "1", "2"]  # one process a rank, each its own rank
    assert [s["LOCAL_RANK"] for s in seen] == ["0", "1", "2"]
    assert {(s["WORLD_SIZE"], s["LOCAL_WORLD_SIZE"], s["GROUP_RANK"]) for s in seen} == {("3", "3", "0")}
    assert len({(s["MASTER_ADDR"], s["MASTER_PORT"]) for s in seen}) == 1
    assert seen[0]["MASTER_ADDR"] and seen[0]["MASTER_PORT"].isdigit()
    assert all(s["CUDA_VISIBLE_DEVICES"] == "" and s["argv"] == ["--flag", "value"] for s in seen)


@needs_ray
def test_the_first_failing_rank_stops_the_others_and_is_named_with_its_error(tmp_path):
    (tmp_path / "job.py").write_text(textwrap.dedent("""
        import os, time
        if os.environ["RANK"] == "1":
            raise ValueError("boom from rank 1")
        time.sleep(120)  # as a rank blocked in a collective its failed peer never joins
    """))
    out, elapsed = _launch(tmp_path, "--nproc", "3", "--gpus-per-rank", "0", "--grace", "1", "job.py")
    assert out.returncode == 1, (out.stdout + out.stderr)[-4000:]  # python's status for an uncaught exception
    assert elapsed < 90, "the other ranks were not stopped"
    assert "rank 1 exited with status 1" in out.stderr
    assert "[rank 1] ValueError: boom from rank 1" in out.stderr
    assert "stopping rank 0: rank 1 failed" in out.stderr and "stopping rank 2: rank 1 failed" in out.stderr


@needs_ray
def test_a_crash_gives_its_status_and_the_timeout_stops_every_rank(tmp_path):
    (tmp_path / "crash.py").write_text("import os\nos._exit(7 if os.environ['RANK'] == '0' else 0)\n")
    out, _ = _launch(tmp_path, "--nproc", "2", "--gpus-per-rank", "0", "crash.py")
    assert out.returncode == 7 and "rank 0 exited with status 7" in out.stderr, out.stderr[-4000:]
    (tmp_path / "sleep.py").write_text("import time\ntime.sleep(120)\n")
    out, elapsed = _launch(tmp_path, "--nproc", "2", "--gpus-per-rank", "0", "--timeout", "3", "sleep.py")
    assert out.returncode == 124 and elapsed < 90, out.stderr[-4000:]
    assert "stopping rank 0: the 3 s --timeout ran out" in out.stderr


@needs_ray
def test_interrupting_the_launcher_stops_every_ranks_process(tmp_path):
    (tmp_path / "wait.py").write_text(textwrap.dedent("""
        import os, time
        with open(f"pid_{os.environ['RANK']}", "w") as f:
            f.write(str(os.getpid()))
        time.sleep(300)
    """))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "deepcomm.ray_launch", "--nproc", "2", "--gpus-per-rank", "0", "wait.py"], cwd=tmp_path,
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("pid_*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        pids = [int(p.read_text()) for p in tmp_path.glob("pid_*")]
        assert len(pids) == 2, "the ranks did not start"
        launcher.send_signal(signal.SIGINT)
        launcher.wait(timeout=90)
    finally:
        launcher.kill()
    time.sleep(1)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the rank's process is gone (not left holding its GPU)
