"""The launcher's decisions, environment and failure messages (no GPU needed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from deepcomm import launch


def test_one_rank_per_gpu_needs_no_mps():
    plan = launch.plan_launch(8, 8, None, mps_already_running=False)
    assert not plan.start_mps and "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in plan.env


def test_ranks_outnumbering_gpus_start_mps(monkeypatch):
    monkeypatch.setattr(launch.shutil, "which", lambda name: "/usr/bin/" + name)
    plan = launch.plan_launch(4, 1, None, mps_already_running=False)
    assert plan.start_mps


def test_running_mps_is_reused(monkeypatch):
    monkeypatch.setattr(launch.shutil, "which", lambda name: None)
    assert not launch.plan_launch(4, 1, None, mps_already_running=True).start_mps


def test_sm_share_sets_the_mps_thread_percentage(monkeypatch):
    monkeypatch.setattr(launch.shutil, "which", lambda name: "/usr/bin/" + name)
    plan = launch.plan_launch(2, 1, 50, mps_already_running=False)
    assert plan.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50" and plan.start_mps


@pytest.mark.parametrize("share", [0, 101])
def test_sm_share_out_of_range(share):
    with pytest.raises(SystemExit, match="--sm-share"):
        launch.plan_launch(2, 1, share, mps_already_running=False)


def test_missing_mps_binary_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(launch.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="need CUDA MPS.*time-sliced"):
        launch.plan_launch(4, 1, None, mps_already_running=False)


def test_daemon_that_fails_to_start_is_a_clear_error(monkeypatch, tmp_path):
    fake = tmp_path / launch.MPS_CONTROL
    fake.write_text("#!/bin/sh\necho 'permission denied' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    daemon = launch.MpsDaemon()
    with pytest.raises(SystemExit, match="could not start CUDA MPS.*permission denied"):
        daemon.start()
    assert not os.path.exists(daemon.root)  # its private folders go with it (no context exit runs after this)


@pytest.mark.parametrize("visible, count", [("-1", 0), ("", 0), ("0,1", 2), ("1, 0", 2), ("0,-1,1", 1),
                                            ("GPU-8f2b,GPU-1c3d", 2), ("MIG-5e1a", 1)])
def test_visible_gpus_are_counted_as_cuda_reads_the_list(monkeypatch, visible, count):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert launch.visible_gpu_count() == count


def test_daemon_is_started_with_private_folders_and_stopped(monkeypatch, tmp_path):
    calls = tmp_path / "calls"
    fake = tmp_path / launch.MPS_CONTROL
    # A stand-in daemon: "-d" creates the control socket and a pid file (of a live process: this
    # one), "quit" on stdin is recorded.
    fake.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "-d" ]; then touch "$CUDA_MPS_PIPE_DIRECTORY/control"; '
        f'echo {os.getpid()} > "$CUDA_MPS_PIPE_DIRECTORY/{launch.MPS_PID_FILE}"; echo start >> {calls}; '
        f"else cat >> {calls}; fi\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with launch.MpsDaemon() as daemon:
        pipe = daemon.env["CUDA_MPS_PIPE_DIRECTORY"]
        assert launch.mps_running(pipe) and pipe.startswith(daemon.root)
    assert calls.read_text().split() == ["start", "quit"]
    assert not os.path.exists(daemon.root)


def test_daemon_that_does_not_quit_is_terminated_instead_of_hanging(monkeypatch, tmp_path, capsys):
    # The stand-in daemon: a sleeping process that is not our child (so it is reaped when it ends).
    pid = int(subprocess.check_output(["sh", "-c", "sleep 60 > /dev/null 2>&1 & echo $!"], text=True))
    fake = tmp_path / launch.MPS_CONTROL
    fake.write_text('#!/bin/sh\nif [ "$1" = "-d" ]; then touch "$CUDA_MPS_PIPE_DIRECTORY/control"; '
                    f'echo {pid} > "$CUDA_MPS_PIPE_DIRECTORY/{launch.MPS_PID_FILE}"; else exec sleep 30; fi\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    daemon = launch.MpsDaemon()
    daemon.start()
    try:
        daemon.stop(timeout_s=0.5)  # "quit" hangs
        assert "did not quit within 0.5s; terminated it" in capsys.readouterr().err
        assert not launch.mps_running(daemon.env["CUDA_MPS_PIPE_DIRECTORY"])
        assert not os.path.exists(daemon.root)
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def test_a_control_socket_left_by_a_daemon_that_quit_is_not_a_running_daemon(tmp_path):
    assert not launch.mps_running(str(tmp_path))  # nothing there
    (tmp_path / "control").touch()
    pid_file = tmp_path / launch.MPS_PID_FILE
    pid_file.write_text(f"{os.getpid()}\n")  # a live process
    assert launch.mps_running(str(tmp_path))
    pid_file.unlink()  # the daemon quit: its control socket stays behind, its pid file goes
    assert not launch.mps_running(str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid_file.write_text(dead.stdout)  # a pid file whose process is gone
    assert not launch.mps_running(str(tmp_path))


def test_spawn_local_rejects_a_process_count_below_one():
    with pytest.raises(ValueError, match="nproc"):
        launch.spawn_local(print, 0)


def test_arguments_pass_through_to_torchrun():
    ours, rest = launch.split_arguments(["--sm-share", "25", "--nproc-per-node", "4", "--max-restarts", "0", "x.py", "-a"])
    assert ours.sm_share == 25 and ours.nproc_per_node == 4
    assert rest == ["--nproc-per-node", "4", "--max-restarts", "0", "x.py", "-a"]
    assert launch.split_arguments(["--nproc_per_node=3", "y.py"])[0].nproc_per_node == 3


def test_torchruns_named_process_counts(monkeypatch):
    monkeypatch.setattr(launch, "visible_gpu_count", lambda: 2)
    assert launch.split_arguments(["--nproc-per-node", "gpu", "x.py"])[0].nproc_per_node == 2
    assert launch.split_arguments(["--nproc-per-node=auto", "x.py"])[0].nproc_per_node == 2
    assert launch.split_arguments(["--nproc-per-node", "cpu", "x.py"])[0].nproc_per_node == (os.cpu_count() or 1)
    monkeypatch.setattr(launch, "visible_gpu_count", lambda: 0)
    assert launch.split_arguments(["--nproc-per-node", "auto", "x.py"])[0].nproc_per_node == (os.cpu_count() or 1)
    with pytest.raises(SystemExit, match="--nproc-per-node: expected a count, gpu, auto or cpu, got 'many'"):
        launch.split_arguments(["--nproc-per-node", "many", "x.py"])


def test_launch_runs_the_benchmark_on_cpu(tmp_path):
    """End to end through torchrun on a machine without GPUs: 2 ranks, gloo, reference path."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "deepcomm.launch", "--standalone", "--nproc-per-node", "2",
               "-m", "deepcomm.bench", "--device", "cpu", "--tokens", "32", "--hidden", "128", "--experts", "8",
               "--topk", "2", "--iters", "1", "--warmup", "0", "--dtypes", "bf16"]
    out = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ranks=2" in out.stdout and "FAILED" not in out.stdout


def test_ranks_are_bound_to_cores_by_default_and_can_opt_out():
    assert launch.plan_launch(2, 2, None, False).env == {"DEEPCOMM_CPU_BIND": "cores"}
    assert launch.plan_launch(2, 2, None, False, "none").env == {"DEEPCOMM_CPU_BIND": "none"}
    plan = launch.plan_launch(2, 2, None, False, "cores", 1)
    assert plan.env == {"DEEPCOMM_CPU_BIND": "cores", "DEEPCOMM_CORES_PER_RANK": "1"}
    ours, rest = launch.split_arguments(["--cpu-bind", "none", "--nproc-per-node", "2", "x.py"])
    assert ours.cpu_bind == "none" and ours.cores_per_rank is None and rest == ["--nproc-per-node", "2", "x.py"]


def test_the_scripts_own_options_stay_the_scripts():
    """Only the launcher's part of the command line is searched, and no abbreviations are taken."""
    argv = ["--nproc-per-node", "2", "--cores-per-rank=2", "--standalone", "-m", "train", "--cores", "4", "--cpu-bind",
            "none", "--sm-share", "9"]
    ours, rest = launch.split_arguments(argv)
    assert (ours.cores_per_rank, ours.cpu_bind, ours.sm_share, ours.nproc_per_node) == (2, "cores", None, 2)
    assert rest == ["--nproc-per-node", "2", "--standalone", "-m", "train", "--cores", "4", "--cpu-bind", "none",
                    "--sm-share", "9"]
    # A torchrun option's value is not the script, even when it looks like a word.
    ours, rest = launch.split_arguments(["--rdzv-backend", "c10d", "--sm-share", "50", "x.py", "--sm-share", "1"])
    assert ours.sm_share == 50 and rest == ["--rdzv-backend", "c10d", "x.py", "--sm-share", "1"]
    # An abbreviation of ours is not ours: it passes to torchrun, which rejects it.
    ours, rest = launch.split_arguments(["--cpu", "none", "x.py"])
    assert ours.cpu_bind == "cores" and rest == ["--cpu", "none", "x.py"]


def test_torchruns_numa_binding_turns_ours_off(monkeypatch):
    planned = []

    def plan_launch(*args):
        planned.append(args)
        raise SystemExit("planned")

    monkeypatch.setattr(launch, "plan_launch", plan_launch)
    monkeypatch.setattr(launch, "visible_gpu_count", lambda: 2)
    with pytest.raises(SystemExit, match="planned"):
        launch.main(["--nproc-per-node", "2", "--numa-binding", "node", "x.py"])
    assert planned[0][4] == "none"  # cpu_bind
    with pytest.raises(SystemExit, match="--cores-per-rank"):
        launch.main(["--nproc-per-node", "2", "--numa-binding=node", "--cores-per-rank", "2", "x.py"])


@pytest.mark.parametrize("bind, per_rank, match", [("numa", None, "--cpu-bind"), ("cores", 0, "--cores-per-rank"),
                                                   ("none", 2, "--cores-per-rank")])
def test_bad_cpu_binding_arguments(bind, per_rank, match):
    with pytest.raises(SystemExit, match=match):
        launch.plan_launch(2, 2, None, False, bind, per_rank)


def test_sigterm_before_the_ranks_start_still_quits_the_mps_daemon_it_started(tmp_path):
    """The launcher waits in torchrun's rendezvous for a second node that never comes; SIGTERM then ends it,
    and the MPS daemon it started (a stand-in here) is quit and its folders removed."""
    import signal
    import socket
    import time

    calls = tmp_path / "calls"
    fake = tmp_path / launch.MPS_CONTROL
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-d" ]; then touch "$CUDA_MPS_PIPE_DIRECTORY/control"; '
        f'echo $PPID > "$CUDA_MPS_PIPE_DIRECTORY/{launch.MPS_PID_FILE}"; echo "start $CUDA_MPS_PIPE_DIRECTORY" >> {calls}; '
        f"else cat >> {calls}; fi\n"
    )
    fake.chmod(0o755)
    (tmp_path / "rank.py").write_text("pass\n")
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": "0"}
    env.pop("CUDA_MPS_PIPE_DIRECTORY", None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = subprocess.Popen(
        [sys.executable, "-m", "deepcomm.launch", "--nnodes", "2", "--node-rank", "0", "--rdzv-backend", "c10d",
         "--rdzv-endpoint", f"127.0.0.1:{port}", "--nproc-per-node", "2", "rank.py"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (calls.exists() and calls.read_text().startswith("start")):
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.stderr.read()[-2000:]
            time.sleep(0.1)
        time.sleep(1.0)  # in the rendezvous now
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if launcher.poll() is None:
            launcher.kill()
    started, quit_ = calls.read_text().split("\n", 1)
    assert quit_.split() == ["quit"]
    assert not os.path.exists(os.path.dirname(started.split()[1]))


SLEEPERS = """
import os, sys, time
from deepcomm.launch import spawn_local

def sleeper(folder):
    open(os.path.join(folder, str(os.getpid())), "w").close()
    time.sleep(300)

if __name__ == "__main__":
    spawn_local(sleeper, 2, sys.argv[1])
"""


def test_spawned_ranks_end_with_a_terminated_parent_even_with_sigint_ignored(tmp_path):
    """A job started with & from a script ignores SIGINT, which is how torch ties its children to the parent: the
    ranks of spawn_local (python -m deepcomm.bench without a launcher) must still end with it."""
    import signal
    import time

    (tmp_path / "sleepers.py").write_text(SLEEPERS)
    folder = tmp_path / "pids"
    folder.mkdir()
    parent = subprocess.Popen(["sh", "-c", f'trap "" INT; exec "{sys.executable}" sleepers.py pids'], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(os.listdir(folder)) < 2:
            assert parent.poll() is None and time.monotonic() < deadline, parent.stderr.read()[-2000:]
            time.sleep(0.1)
        pids = [int(name) for name in os.listdir(folder)]
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) != 0
    finally:
        if parent.poll() is None:
            parent.kill()
    deadline = time.monotonic() + 15
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if os.path.exists(f"/proc/{pid}") and "zombie" not in
                 open(f"/proc/{pid}/status").read().lower()]
        time.sleep(0.2)
    for pid in alive:  # do not leave them behind whatever the outcome
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"ranks {alive} outlived their parent"


def test_termination_handlers_are_given_back():
    import signal

    before = signal.getsignal(signal.SIGTERM)
    with launch._exiting_on_termination():
        with pytest.raises(SystemExit) as ended:
            signal.raise_signal(signal.SIGTERM)
        assert ended.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
