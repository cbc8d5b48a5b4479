"""``python -m deepcomm.launch``: torchrun plus what ranks sharing a GPU need.

    python -m deepcomm.launch --nproc-per-node 4 [--sm-share 50] [--cpu-bind cores|none] script.py [args]

Every torchrun argument passes through (this is ``torch.distributed.run``).
Ranks are placed on the visible GPUs round-robin (scripts call
:func:`local_device`). When ranks outnumber GPUs, the CUDA MPS control daemon
is started with private pipe and log folders and stopped again on exit, also
on failure; ``--sm-share P`` gives each rank P % of the SMs
(``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``) so one GPU behaves like several
smaller ones. If MPS cannot start, the launch fails: without MPS, ranks on one
GPU are time-sliced and every spin-wait becomes thousands of times slower.

Each local rank runs on CPU cores of its own (``--cpu-bind cores``, the
default: an equal share of the cores each, at most ``--cores-per-rank N``;
:mod:`deepcomm.cpu_binding` says why); ``--cpu-bind none`` leaves placement to
the OS.

With plain ``torchrun``, start MPS yourself first (docs/design.md, "Ranks on
one GPU"); :func:`mps_running` tells whether one answers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

from deepcomm import cpu_binding

MPS_CONTROL = "nvidia-cuda-mps-control"
MPS_PID_FILE = MPS_CONTROL + ".pid"  # the control daemon's, in its pipe folder while it runs
DEFAULT_MPS_PIPE_DIRECTORY = "/tmp/nvidia-mps"


@dataclass
class LaunchPlan:
    """What the launcher will do before handing over to torchrun."""

    nproc_per_node: int
    num_gpus: int
    start_mps: bool
    env: dict[str, str] = field(default_factory=dict)


def mps_running(pipe_directory: str | None = None) -> bool:
    """Whether an MPS control daemon listens in ``pipe_directory`` (default: the environment's).

    The daemon's control socket outlives it (seen on H100 after ``quit``): a stale one
    would make the ranks start without MPS, time-sliced. The daemon's pid file goes
    with it, so the socket counts only beside the pid file of a live process.
    """
    directory = pipe_directory or os.environ.get("CUDA_MPS_PIPE_DIRECTORY", DEFAULT_MPS_PIPE_DIRECTORY)
    if not os.path.exists(os.path.join(directory, "control")):
        return False
    try:
        with open(os.path.join(directory, MPS_PID_FILE)) as f:
            pid = int(f.read().strip())
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except PermissionError:  # it exists, as another user's (a system daemon)
        return True
    except (OSError, ValueError):  # no pid file, no such process, or not a pid
        return False
    return True


def visible_gpu_count() -> int:
    """GPUs this process may use, without creating a CUDA context (nvidia-smi, else torch)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        # As CUDA reads it: the entries up to the first invalid one (-1 hides every GPU).
        count = 0
        for entry in (d.strip() for d in visible.split(",")):
            if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
                break
            count += 1
        return count
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        if out.returncode == 0:
            return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
    import torch

    return torch.cuda.device_count()


def plan_launch(nproc_per_node: int, num_gpus: int, sm_share: int | None, mps_already_running: bool,
                cpu_bind: str = "cores", cores_per_rank: int | None = None) -> LaunchPlan:
    """Decide MPS and environment; raises SystemExit with the reason when the launch cannot work."""
    if nproc_per_node < 1:
        raise SystemExit("--nproc-per-node: must be >= 1")
    if sm_share is not None and not 1 <= sm_share <= 100:
        raise SystemExit(f"--sm-share: a percentage in [1, 100], got {sm_share}")
    if cpu_bind not in cpu_binding.BIND_MODES:
        raise SystemExit(f"--cpu-bind: one of {', '.join(cpu_binding.BIND_MODES)}, got {cpu_bind!r}")
    if cores_per_rank is not None and (cores_per_rank < 1 or cpu_bind == "none"):
        raise SystemExit(f"--cores-per-rank: a positive count with --cpu-bind cores, got {cores_per_rank}")
    shared = num_gpus > 0 and nproc_per_node > num_gpus
    needs_mps = shared or sm_share is not None
    plan = LaunchPlan(nproc_per_node, num_gpus, start_mps=needs_mps and not mps_already_running)
    if sm_share is not None:
        plan.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(sm_share)
    plan.env[cpu_binding.BIND_ENV] = cpu_bind
    if cores_per_rank is not None:
        plan.env[cpu_binding.CORES_PER_RANK_ENV] = str(cores_per_rank)
    if plan.start_mps and shutil.which(MPS_CONTROL) is None:
        raise SystemExit(
            f"deepcomm.launch: {nproc_per_node} ranks on {num_gpus} GPU(s) need CUDA MPS, but {MPS_CONTROL} is not "
            "on PATH. Without MPS the ranks would be time-sliced and spin-waits crawl; install the MPS binaries "
            "(part of the CUDA driver package) or use at most one rank per GPU."
        )
    return plan


class MpsDaemon:
    """Starts the MPS control daemon with private folders; ``stop()`` (or the context exit) quits it."""

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="deepcomm-mps-")
        self.env = {
            "CUDA_MPS_PIPE_DIRECTORY": os.path.join(self.root, "pipe"),
            "CUDA_MPS_LOG_DIRECTORY": os.path.join(self.root, "log"),
        }
        for path in self.env.values():
            os.makedirs(path, exist_ok=True)

    def start(self) -> None:
        env = {**os.environ, **self.env}
        result = subprocess.run([MPS_CONTROL, "-d"], env=env, capture_output=True, text=True)
        deadline = time.monotonic() + 10
        while result.returncode == 0 and not mps_running(self.env["CUDA_MPS_PIPE_DIRECTORY"]):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if result.returncode != 0 or not mps_running(self.env["CUDA_MPS_PIPE_DIRECTORY"]):
            log = os.path.join(self.env["CUDA_MPS_LOG_DIRECTORY"], "control.log")
            detail = open(log).read()[-2000:] if os.path.exists(log) else result.stderr.strip()
            # The context's exit does not run after a failed start: a daemon that came up late, and the
            # private folders, go now.
            self._terminate(wait_s=2.0)
            shutil.rmtree(self.root, ignore_errors=True)
            raise SystemExit(
                "deepcomm.launch: could not start CUDA MPS (it needs permission to run the daemon, usually root, "
                f"and a GPU in a compute mode that allows it): {detail or 'no output'}"
            )

    def stop(self, timeout_s: float = 30.0) -> None:
        env = {**os.environ, **self.env}
        try:
            subprocess.run([MPS_CONTROL], input="quit\n", env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            # Seen on H100 after profiled runs: "quit" never returns although every client has exited.
            # The daemon is ours (started in our private folder): terminate it rather than hang or leak it.
            if not self._terminate():
                print(f"deepcomm.launch: the MPS daemon neither quit within {timeout_s:g}s nor ended on SIGTERM; "
                      f"it is left running (quit it with: CUDA_MPS_PIPE_DIRECTORY="
                      f"{self.env['CUDA_MPS_PIPE_DIRECTORY']} {MPS_CONTROL} <<< quit)", file=sys.stderr)
                return
            print(f"deepcomm.launch: the MPS daemon did not quit within {timeout_s:g}s; terminated it",
                  file=sys.stderr)
        shutil.rmtree(self.root, ignore_errors=True)

    def _terminate(self, wait_s: float = 5.0) -> bool:
        """SIGTERM to the daemon this object started; whether it is gone within ``wait_s``."""
        try:
            with open(os.path.join(self.env["CUDA_MPS_PIPE_DIRECTORY"], MPS_PID_FILE)) as f:
                pid = int(f.read().strip())
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            return False
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.05)
        return False

    def __enter__(self) -> "MpsDaemon":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _our_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deepcomm.launch", add_help=False, allow_abbrev=False)
    parser.add_argument("--sm-share", type=int, default=None)
    parser.add_argument("--cpu-bind", default="cores")
    parser.add_argument("--cores-per-rank", type=int, default=None)
    return parser


def _torchrun_options() -> dict[str, bool]:
    """torchrun's option strings, each with whether it takes a value."""
    from torch.distributed.run import get_args_parser

    return {name: action.nargs != 0 for action in get_args_parser()._actions for name in action.option_strings}


def split_arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Separate deepcomm's own options from torchrun's, which pass through untouched.

    Only the launcher's part of the command line is searched: it ends at the script (or module, or
    command), the first word that is neither an option nor an option's value, so a script's own
    ``--cpu-bind`` or ``--sm-share`` stays the script's. deepcomm's options may sit anywhere before it.
    """
    ours_names = {name for action in _our_parser()._actions for name in action.option_strings}
    torchrun = _torchrun_options()
    ours, rest, i = [], [], 0
    while i < len(argv):
        word = argv[i]
        name = word.split("=", 1)[0]
        if not word.startswith("-") or word == "--":
            break  # the script: it and everything after it are the script's
        takes_value = name in ours_names or torchrun.get(name, False)
        width = 2 if takes_value and "=" not in word and i + 1 < len(argv) else 1
        (ours if name in ours_names else rest).extend(argv[i : i + width])
        i += width
    launcher, rest = rest, rest + argv[i:]
    parsed = _our_parser().parse_args(ours)
    parsed.nproc_per_node = 1
    for i, word in enumerate(launcher):
        if word in ("--nproc-per-node", "--nproc_per_node") and i + 1 < len(launcher):
            parsed.nproc_per_node = _local_world_size(launcher[i + 1])
        elif word.startswith(("--nproc-per-node=", "--nproc_per_node=")):
            parsed.nproc_per_node = _local_world_size(word.split("=", 1)[1])
    parsed.torchrun_binds = any(w.split("=", 1)[0] in ("--numa-binding", "--numa_binding") for w in launcher)
    return parsed, rest


def _local_world_size(value: str) -> int:
    """torchrun's --nproc-per-node: a count, or gpu / auto (the visible GPUs, else CPUs for auto) / cpu."""
    if value == "gpu" or (value == "auto" and visible_gpu_count() > 0):
        return visible_gpu_count()
    if value in ("auto", "cpu"):
        return os.cpu_count() or 1
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"--nproc-per-node: expected a count, gpu, auto or cpu, got {value!r}") from None


def local_device():
    """Pick and set this rank's GPU: local rank round-robin over the visible GPUs."""
    import torch

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def init_distributed(timeout_s: float = 300.0):
    """Initialise the default group from torchrun's environment.

    NCCL when every local rank has its own GPU, gloo when ranks share one
    (NCCL wants one GPU per rank) or there is no GPU. First binds this rank to its
    CPU cores when the launcher asked for it, so the group's threads inherit them.
    """
    import torch
    import torch.distributed as dist

    cpu_binding.bind_from_environment()

    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    one_gpu_each = torch.cuda.is_available() and torch.cuda.device_count() >= local_ranks
    if torch.cuda.is_available():
        local_device()
    dist.init_process_group("nccl" if one_gpu_each else "gloo", timeout=timedelta(seconds=timeout_s))
    return dist.group.WORLD


def destroy_distributed() -> None:
    """Destroy the default process group, after freeing what only reference cycles keep alive.

    Cycles (autograd graphs, dispatch handles) can hold a communicator, and with it the process
    group, into interpreter shutdown; gloo's threads then abort the process ("terminate called
    without an active exception", seen in about 1 of 15 CPU runs of two ranks).
    """
    import gc

    import torch.distributed as dist

    gc.collect()
    dist.destroy_process_group()


def spawn_local(fn, nproc: int, *args, timeout_s: float = 300.0) -> None:
    """Run ``fn(*args)`` in ``nproc`` new processes of this host joined by a gloo group (no torchrun).

    ``fn`` must be picklable (module level). After it returns everywhere, a barrier (no rank
    tears the group down while a peer still works), then :func:`destroy_distributed`.
    """
    import socket

    import torch.multiprocessing

    if nproc < 1:
        raise ValueError(f"nproc: must be >= 1, got {nproc}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The ranks end with this process whatever ends it: torch's own tie (SIGINT to the children when the parent
    # dies) is lost where SIGINT is ignored (a job started with & from a script) or before a child is set up.
    with _exiting_on_termination():
        context = torch.multiprocessing.start_processes(_spawned, args=(nproc, port, timeout_s, fn, args),
                                                        nprocs=nproc, join=False)
        try:
            while not context.join():
                pass
        finally:
            _end_processes(context.processes)


def _end_processes(processes, wait_s: float = 5.0) -> None:
    """SIGTERM to every process still alive, then SIGKILL to any left after ``wait_s``."""
    alive = [p for p in processes if p.is_alive()]
    for process in alive:
        process.terminate()
    deadline = time.monotonic() + wait_s
    for process in alive:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def _spawned(rank: int, nproc: int, port: int, timeout_s: float, fn, args: tuple) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=nproc,
                            timeout=timedelta(seconds=timeout_s))
    try:
        fn(*args)
        dist.barrier()
    finally:
        destroy_distributed()


def main(argv: list[str] | None = None) -> None:
    ours, torchrun_args = split_arguments(sys.argv[1:] if argv is None else argv)
    if ours.torchrun_binds and ours.cpu_bind == "cores":
        # torchrun's --numa-binding places the ranks itself; cutting a share of its share would halve it again.
        ours.cpu_bind = "none"
        if ours.cores_per_rank is not None:
            raise SystemExit("--cores-per-rank: not with torchrun's --numa-binding, which places the ranks itself")
    plan = plan_launch(ours.nproc_per_node, visible_gpu_count(), ours.sm_share, mps_running(), ours.cpu_bind,
                       ours.cores_per_rank)
    os.environ.update(plan.env)
    from torch.distributed import run as torchrun

    if not plan.start_mps:
        torchrun.main(torchrun_args)
        return
    # torchrun installs handlers of its own only once its workers start (after MPS, and after the rendezvous).
    with _exiting_on_termination(), MpsDaemon() as daemon:
        os.environ.update(daemon.env)
        torchrun.main(torchrun_args)


@contextmanager
def _exiting_on_termination():
    """Inside, SIGTERM and SIGHUP raise SystemExit, so the context exits around it run (the MPS daemon is quit,
    spawned ranks ended); the handlers before are back afterwards. Python takes handlers in the main thread
    only: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum, frame):
        raise SystemExit(128 + signum)

    before = {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    main()
