"""``python -m deepcomm.ray_launch``: the ranks as Ray actors across a Ray cluster, instead of torchrun.

    python -m deepcomm.ray_launch --address auto --nproc 16 -m deepcomm.bench --preset prefill --json rows.json
    python -m deepcomm.ray_launch --nproc 4 --gpus-per-rank 0 script.py [args]     # CPU ranks: the reference path

torchrun starts the ranks of one host and needs a command on every host; on a Ray cluster one command
places them all. One actor per rank, each holding ``--gpus-per-rank`` GPUs (1: a GPU of its own; 0: none,
CPU and gloo), in one placement group packed so that a host's ranks sit together. The actors report where
they landed; ranks are then numbered host after host (deepcomm's topology takes a host's ranks to be
consecutive, and as many on every host), rank 0's actor picks the rendezvous port, and each actor starts
the script or module in a process of its own with torchrun's rank variables (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), in the directory
the launcher was started from where that exists on the host. A script written for torchrun or
:mod:`deepcomm.launch` (``deepcomm.launch.init_distributed``) runs unchanged; deepcomm, and the script (at
the same path) or module, must be importable on every host.

GPUs: Ray narrows each actor's ``CUDA_VISIBLE_DEVICES`` to its own GPU, but CUDA IPC between the ranks of a
host needs each to see the others' GPUs. So Ray is asked to leave it alone, and every rank of a host gets
the same list, that host's assigned GPUs in local-rank order (PCI bus order, as Ray counts them): local
rank i uses the i-th, the one Ray gave it (:func:`deepcomm.launch.local_device`). Ranks sharing a GPU (MPS)
are :mod:`deepcomm.launch`'s job, on one host; here each rank has a GPU or none.

As torchrun does, the first rank to fail stops the others (after ``--grace`` seconds, so that they may
report too); every failing rank is named with the end of its error output, and the launcher exits with the
first failure's status (124 when ``--timeout`` ran out).
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

# Ray would set each actor's CUDA_VISIBLE_DEVICES to its own GPU (see the module's docstring).
NOSET_VISIBLE_DEVICES = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"
TAIL_LINES = 40  # of a failing rank's error output, printed by the launcher
# A rank's standard output goes back to the launcher, which prints it (Ray's log forwarding loses what it has not
# sent when the run ends). Past this many characters only the end is kept.
OUTPUT_CHARS = 4 << 20
TIMED_OUT = 124  # as timeout(1)


@dataclass(frozen=True)
class Placement:
    """Where Ray put one actor."""

    host: str              # the node's IP address
    gpus: tuple[str, ...]  # the GPUs Ray assigned it (indices, or UUIDs where the node lists those); none: a CPU rank


def _gpu_key(gpu: str) -> tuple[int, int | str]:
    return (0, int(gpu)) if gpu.isdigit() else (1, gpu)


def rank_order(placements: list[Placement]) -> list[int]:
    """Actor indices in rank order: hosts in the order they first appear, within a host by GPU."""
    hosts = list(dict.fromkeys(p.host for p in placements))
    return sorted(range(len(placements)),
                  key=lambda a: (hosts.index(placements[a].host), [_gpu_key(g) for g in placements[a].gpus], a))


def rank_environments(placements: list[Placement], master_port: int) -> list[dict[str, str]]:
    """Each actor's rank variables (indexed as ``placements``), ranks in :func:`rank_order`.

    Raises ValueError when hosts got different numbers of ranks: deepcomm's topology needs as many on each.
    """
    if not placements:
        raise ValueError("placements: no actor to give an environment")
    if not 0 < master_port < 65536:
        raise ValueError(f"master_port: expected a TCP port, got {master_port}")
    order = rank_order(placements)
    rank_of = {actor: rank for rank, actor in enumerate(order)}
    hosts = list(dict.fromkeys(placements[a].host for a in order))
    per_host = collections.Counter(p.host for p in placements)
    if len(set(per_host.values())) > 1:
        raise ValueError(f"placements: the cluster placed different numbers of ranks on its hosts ({dict(per_host)}); "
                         "deepcomm needs as many on each (choose --nproc and free GPUs to match)")
    environments: list[dict[str, str]] = [{} for _ in placements]
    for host_index, host in enumerate(hosts):
        local = [a for a in order if placements[a].host == host]
        visible = ",".join(gpu for a in local for gpu in placements[a].gpus)
        for local_rank, actor in enumerate(local):
            environments[actor] = {
                "RANK": str(rank_of[actor]),
                "WORLD_SIZE": str(len(placements)),
                "LOCAL_RANK": str(local_rank),
                "LOCAL_WORLD_SIZE": str(len(local)),
                "GROUP_RANK": str(host_index),
                "MASTER_ADDR": placements[order[0]].host,
                "MASTER_PORT": str(master_port),
                # CPU ranks see no GPU: the target takes the CPU path (gloo, the reference backend).
                "CUDA_VISIBLE_DEVICES": visible,
                "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            }
    return environments


class RankActor:
    """One rank: reports where it landed, then runs the target in a process of its own.

    A process, not this actor's interpreter: the rank's environment is in place before anything can
    initialise CUDA, a crash or ``os._exit`` gives a status instead of a dead actor, and ``stop`` (which
    runs beside ``run``: the actor takes two calls at once) can end it.
    """

    def __init__(self) -> None:
        self._child: subprocess.Popen | None = None
        self._stopped = False
        self._lock = threading.Lock()  # run and stop may meet: a stop must not miss a child starting

    def placement(self) -> Placement:
        import ray

        return Placement(ray.util.get_node_ip_address(), tuple(str(gpu) for gpu in ray.get_gpu_ids()))

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def run(self, environment: dict[str, str], command: list[str], cwd: str) -> tuple[int, list[str], str]:
        """The target's exit status (a signal's as 128 + its number), the end of its error output, and its
        standard output (for the launcher to print: Ray's forwarding may drop the last of it)."""
        with self._lock:
            if self._stopped:
                return 128 + signal.SIGTERM, ["stopped before it started"], ""
            self._child = subprocess.Popen(
                [sys.executable, *command], env={**os.environ, **environment}, cwd=cwd if os.path.isdir(cwd) else None,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
        output: list[str] = []
        reader = threading.Thread(target=_read_capped, args=(self._child.stdout, output), daemon=True)
        reader.start()
        tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        for line in self._child.stderr:  # passed on as it comes (Ray forwards it), the end kept
            sys.stderr.write(line)
            tail.append(line.rstrip("\n"))
        status = self._child.wait()
        reader.join()
        sys.stderr.flush()
        return (128 - status if status < 0 else status), list(tail), "".join(output)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            child = self._child
        if child is not None and child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)


def _read_capped(stream, output: list[str]) -> None:
    """All of ``stream`` into ``output``, keeping the last OUTPUT_CHARS characters (and saying so)."""
    kept, dropped = collections.deque(), 0
    size = 0
    for line in stream:
        kept.append(line)
        size += len(line)
        while size > OUTPUT_CHARS and len(kept) > 1:
            size -= len(kept.popleft())
            dropped += 1
    if dropped:
        output.append(f"[deepcomm.ray_launch: the first {dropped} lines of this rank's output were dropped]\n")
    output.extend(kept)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deepcomm.ray_launch", allow_abbrev=False,
        usage="%(prog)s --nproc N [options] (script.py | -m module) [args]", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, required=True, help="ranks (actors) in all")
    parser.add_argument("--gpus-per-rank", type=int, choices=(0, 1), default=None,
                        help="1: every rank holds a GPU; 0: CPU ranks (default: 1 when the cluster has a GPU)")
    parser.add_argument("--cpus-per-rank", type=float, default=1.0, help="CPUs Ray reserves for each rank")
    parser.add_argument("--address", default=None,
                        help="the Ray cluster to join, as ray.init takes it ('auto': the one this host belongs to; "
                             "ray://...); default: RAY_ADDRESS, else a Ray instance of this run's own on this host")
    parser.add_argument("--placement-timeout", type=float, default=300.0,
                        help="seconds to wait for the cluster to place every rank")
    parser.add_argument("--timeout", type=float, default=None, help="seconds the ranks may run (default: no limit)")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds the other ranks get, after the first one failed, before they are stopped")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The launcher's options, then the target: the first word that is not one of them (a script), or
    ``-m MODULE``; everything after the target is the target's, whatever it looks like."""
    parser = _parser()
    takes_value = {name for action in parser._actions if action.nargs != 0 for name in action.option_strings}
    ours, i = [], 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "--" and not argv[i].startswith("-m"):
        width = 2 if argv[i] in takes_value else 1  # "--name=value" is one word
        ours.extend(argv[i : i + width])
        i += width
    args = parser.parse_args(ours)
    target = argv[i + 1 :] if i < len(argv) and argv[i] == "--" else argv[i:]
    if target[:1] and target[0].startswith("-m") and target[0] != "-m":  # python's -mMODULE
        target = ["-m", target[0][2:], *target[1:]]
    if target[:1] == ["-m"]:
        if len(target) < 2:
            parser.error("-m: expected a module name")
        args.command = target
    elif target:
        # Absolute: the ranks may start elsewhere (on other hosts the script must be at the same path).
        if not os.path.isfile(target[0]):
            parser.error(f"target: no script at {target[0]}")
        args.command = [os.path.abspath(target[0]), *target[1:]]
    else:
        parser.error("target: a script to run, or -m MODULE")
    if args.nproc < 1:
        parser.error(f"--nproc: must be >= 1, got {args.nproc}")
    for name in ("cpus_per_rank", "placement_timeout", "timeout"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            parser.error(f"--{name.replace('_', '-')}: must be a number > 0, got {value}")
    if not (math.isfinite(args.grace) and args.grace >= 0):
        parser.error(f"--grace: must be a number >= 0, got {args.grace}")
    return args


def _connect(args: argparse.Namespace) -> None:
    import ray

    if args.address is None and not os.environ.get("RAY_ADDRESS"):
        # This run's own instance, even where `ray start` left a cluster to attach to: logical CPUs for
        # every rank's share whatever the cores.
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(args.nproc * args.cpus_per_rank)),
                 include_dashboard=False)
    else:
        ray.init(address=args.address)


def _ended(ref) -> tuple[int, list[str]]:
    """A rank's status and error tail; its standard output is printed here, as each rank ends."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    try:
        status, tail, output = ray.get(ref)
    except RayActorError as error:
        return 1, [f"its actor died: {error}"]
    except RayTaskError as error:  # the actor's own code failed (not the rank's)
        return 1, [f"its actor failed: {error}"]
    sys.stdout.write(output)
    sys.stdout.flush()
    return status, tail


def _wait_for_ranks(actors, runs, ranks: list[int], args: argparse.Namespace) -> int:
    """Collect every rank's end; the first failure (or the timeout) stops the others after the grace."""
    import ray

    pending = dict(zip(runs, range(len(runs))))
    failures: list[tuple[int, int, list[str]]] = []  # (rank, status, tail), in the order they ended
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    stop_at = None
    while pending:
        limits = [t for t in (deadline, stop_at) if t is not None]
        wait_s = max(0.0, min(limits) - time.monotonic()) if limits else None
        done, _ = ray.wait(list(pending), num_returns=1, timeout=wait_s)
        for ref in done:
            actor = pending.pop(ref)
            status, tail = _ended(ref)
            if status != 0:
                failures.append((ranks[actor], status, tail))
                stop_at = stop_at or time.monotonic() + args.grace
        now = time.monotonic()
        expired = deadline is not None and now >= deadline
        if pending and (expired or (stop_at is not None and now >= stop_at)):
            why = f"the {args.timeout:g} s --timeout ran out" if expired else f"rank {failures[0][0]} failed"
            for actor in pending.values():
                print(f"deepcomm.ray_launch: stopping rank {ranks[actor]}: {why}", file=sys.stderr)
            ray.get([actors[actor].stop.remote() for actor in pending.values()])
            for ref, actor in pending.items():
                status, tail = _ended(ref)
                failures.append((ranks[actor], TIMED_OUT if expired else status, tail))
            pending.clear()
    for rank, status, tail in failures:
        print(f"deepcomm.ray_launch: rank {rank} exited with status {status}", file=sys.stderr)
        for line in tail:
            print(f"  [rank {rank}] {line}", file=sys.stderr)
    return failures[0][1] if failures else 0


def launch(args: argparse.Namespace) -> int:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # the ranks' lines differ by little: keep each (read at import)
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    _connect(args)
    group, actors = None, []
    try:
        gpus = args.gpus_per_rank
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
            print(f"deepcomm.ray_launch: {args.nproc} ranks, {'a GPU' if gpus else 'no GPU'} each", file=sys.stderr)
        bundle = {"CPU": args.cpus_per_rank, **({"GPU": gpus} if gpus else {})}
        group = placement_group([bundle] * args.nproc, strategy="PACK")
        ready, _ = ray.wait([group.ready()], timeout=args.placement_timeout)
        if not ready:
            raise SystemExit(f"deepcomm.ray_launch: the cluster did not place {args.nproc} ranks of {bundle} within "
                             f"{args.placement_timeout:g} s (resources: {ray.cluster_resources()})")
        actor_class = ray.remote(RankActor)
        actors = [
            actor_class.options(
                num_cpus=args.cpus_per_rank, num_gpus=gpus, max_concurrency=2,  # run, and stop beside it
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
                runtime_env={"env_vars": {NOSET_VISIBLE_DEVICES: "1"}},
            ).remote()
            for i in range(args.nproc)
        ]
        try:
            placements = ray.get([actor.placement.remote() for actor in actors], timeout=args.placement_timeout)
        except ray.exceptions.GetTimeoutError:
            raise SystemExit(f"deepcomm.ray_launch: the ranks' actors did not start within {args.placement_timeout:g} s")
        for placement in placements:
            if len(placement.gpus) != gpus:
                raise SystemExit(f"deepcomm.ray_launch: a rank on {placement.host} got GPUs {placement.gpus}, "
                                 f"expected {gpus}")
        order = rank_order(placements)
        port = ray.get(actors[order[0]].free_port.remote())
        try:
            environments = rank_environments(placements, port)
        except ValueError as error:
            raise SystemExit(f"deepcomm.ray_launch: {error}") from None
        runs = [actor.run.remote(env, args.command, os.getcwd()) for actor, env in zip(actors, environments)]
        return _wait_for_ranks(actors, runs, [int(env["RANK"]) for env in environments], args)
    finally:
        # Interrupted (Ctrl-C) or failed in between: no rank's process outlives the run holding its GPU. The
        # ranks run in sessions of their own, which ending their actors would not end.
        if actors:
            try:
                ray.get([actor.stop.remote() for actor in actors], timeout=30)
            except Exception as error:  # the run's end matters more than a stop that failed
                print(f"deepcomm.ray_launch: stopping the ranks failed: {error}", file=sys.stderr)
        if group is not None:
            remove_placement_group(group)
        ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    # Ctrl-C, and SIGTERM (ray.init makes it a SystemExit), end through launch's cleanup, which stops the ranks.
    sys.exit(launch(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
