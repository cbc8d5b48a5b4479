"""``python -m deepcomm.ray_launch``: the ranks as Ray actors across a Ray cluster, instead of torchrun.

    python -m deepcomm.ray_launch --nproc 16 [--address auto] -m deepcomm.bench --preset prefill --json rows.json
    python -m deepcomm.ray_launch --nproc 4 --gpus-per-rank 0 script.py [args]     # CPU ranks: the reference path

torchrun starts the ranks of one host and needs a command on every host; on a Ray cluster one command
places them all. One actor per rank, each holding ``--gpus-per-rank`` GPUs (1: a GPU of its own; 0: none,
CPU and gloo), in one placement group packed so that a host's ranks sit together. The actors report where
they landed; ranks are then numbered host after host (deepcomm's topology takes a host's ranks to be
consecutive), rank 0's actor picks the rendezvous port, and every actor gets torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) and runs the script or module as ``__main__``. A script written for torchrun or
:mod:`deepcomm.launch` (``deepcomm.launch.init_distributed``) runs unchanged.

GPUs: Ray narrows each actor's ``CUDA_VISIBLE_DEVICES`` to its own GPU, but CUDA IPC between the ranks of a
host needs each to see the others' GPUs. So Ray is asked to leave it alone, and every actor of a host gets
the same list, that host's assigned GPUs in local-rank order: local rank i uses the i-th, the one Ray gave
it (:func:`deepcomm.launch.local_device`). Ranks sharing a GPU (MPS) are :mod:`deepcomm.launch`'s job, on one
host; here each rank has a GPU or none.

The exit status is the first failing rank's (each failing rank is named), 0 when every rank succeeded.
"""

from __future__ import annotations

import argparse
import os
import runpy
import socket
import sys
import traceback
from dataclasses import dataclass

# Ray would set each actor's CUDA_VISIBLE_DEVICES to its own GPU (see the module's docstring).
NOSET_VISIBLE_DEVICES = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


@dataclass(frozen=True)
class Placement:
    """Where Ray put one actor."""

    host: str              # the node's IP address
    gpus: tuple[int, ...]  # the GPUs Ray assigned it (none for a CPU rank)


def rank_order(placements: list[Placement]) -> list[int]:
    """Actor indices in rank order: hosts in the order they first appear, within a host by GPU."""
    hosts = list(dict.fromkeys(p.host for p in placements))
    return sorted(range(len(placements)), key=lambda a: (hosts.index(placements[a].host), placements[a].gpus, a))


def rank_environments(placements: list[Placement], master_port: int) -> list[dict[str, str]]:
    """torchrun's environment for each actor (indexed as ``placements``), ranks in :func:`rank_order`."""
    if not placements:
        raise ValueError("placements: no actor to give an environment")
    if not 0 < master_port < 65536:
        raise ValueError(f"master_port: expected a TCP port, got {master_port}")
    order = rank_order(placements)
    hosts = list(dict.fromkeys(placements[a].host for a in order))
    environments: list[dict[str, str]] = [{} for _ in placements]
    for host_index, host in enumerate(hosts):
        local = [a for a in order if placements[a].host == host]
        visible = ",".join(str(gpu) for a in local for gpu in placements[a].gpus)
        for local_rank, actor in enumerate(local):
            environments[actor] = {
                "RANK": str(order.index(actor)),
                "WORLD_SIZE": str(len(placements)),
                "LOCAL_RANK": str(local_rank),
                "LOCAL_WORLD_SIZE": str(len(local)),
                "GROUP_RANK": str(host_index),
                "MASTER_ADDR": placements[order[0]].host,
                "MASTER_PORT": str(master_port),
                # CPU ranks see no GPU: the target takes the CPU path (gloo, the reference backend).
                "CUDA_VISIBLE_DEVICES": visible,
            }
    return environments


def exit_code(error: SystemExit) -> int:
    """The status a script's ``SystemExit`` means, as the interpreter would exit with it."""
    if error.code is None:
        return 0
    return error.code if isinstance(error.code, int) else 1


class RankActor:
    """One rank: reports where it landed, then runs the target with its rank's environment."""

    def placement(self) -> Placement:
        import ray

        return Placement(ray.util.get_node_ip_address(), tuple(int(gpu) for gpu in ray.get_gpu_ids()))

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def run(self, environment: dict[str, str], module: str | None, path: str | None, argv: list[str]) -> int:
        # Before anything initialises CUDA in this process (an actor's first task runs in a fresh worker).
        os.environ.update(environment)
        sys.argv = [module or path, *argv]
        try:
            if module is not None:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
                runpy.run_path(path, run_name="__main__")
        except SystemExit as error:
            return exit_code(error)
        except Exception:  # the launcher names the rank; the traceback goes to this actor's log (the driver's)
            traceback.print_exc()
            return 1
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deepcomm.ray_launch", usage="%(prog)s --nproc N [options] (script.py | -m module) [args]",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, required=True, help="ranks (actors) in all")
    parser.add_argument("--gpus-per-rank", type=int, choices=(0, 1), default=None,
                        help="1: every rank holds a GPU; 0: CPU ranks (default: 1 when the cluster has a GPU a rank)")
    parser.add_argument("--cpus-per-rank", type=float, default=1.0, help="CPUs Ray reserves for each rank")
    parser.add_argument("--address", default=None,
                        help="the Ray cluster (as ray.init takes it: 'auto', ray://...); default: RAY_ADDRESS, "
                             "else a Ray instance started on this host for the run")
    parser.add_argument("--placement-timeout", type=float, default=300.0,
                        help="seconds to wait for the cluster to place every rank")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The launcher's options, then the target: the first word that is not one of them (a script), or
    ``-m MODULE``; everything after the target is the target's, whatever it looks like."""
    parser = _parser()
    ours, i = [], 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] not in ("-m", "--"):
        takes_value = "=" not in argv[i] and argv[i] not in ("-h", "--help")
        ours.extend(argv[i : i + (2 if takes_value else 1)])
        i += 2 if takes_value else 1
    args = parser.parse_args(ours)
    target = argv[i + 1 :] if i < len(argv) and argv[i] == "--" else argv[i:]
    args.module = args.path = None
    if target[:1] == ["-m"]:
        if len(target) < 2:
            parser.error("-m: expected a module name")
        args.module, args.argv = target[1], target[2:]
    elif target:
        # Absolute: the actors need not start where this process did (on other hosts the script must be at
        # the same path, as under torchrun).
        args.path, args.argv = os.path.abspath(target[0]), target[1:]
        if not os.path.isfile(args.path):
            parser.error(f"target: no script at {target[0]}")
    else:
        parser.error("target: a script to run, or -m MODULE")
    if args.nproc < 1:
        parser.error(f"--nproc: must be >= 1, got {args.nproc}")
    if not args.cpus_per_rank > 0:
        parser.error(f"--cpus-per-rank: must be > 0, got {args.cpus_per_rank}")
    if not args.placement_timeout > 0:
        parser.error(f"--placement-timeout: must be > 0, got {args.placement_timeout}")
    return args


def launch(args: argparse.Namespace) -> int:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if args.address is None and not os.environ.get("RAY_ADDRESS"):
        # A Ray instance for this run alone: declare enough logical CPUs for every rank's share.
        ray.init(num_cpus=max(os.cpu_count() or 1, int(args.nproc * args.cpus_per_rank + 0.999)),
                 include_dashboard=False)
    else:
        ray.init(address=args.address)
    try:
        gpus = args.gpus_per_rank
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= args.nproc else 0
        bundle = {"CPU": args.cpus_per_rank, **({"GPU": gpus} if gpus else {})}
        group = placement_group([bundle] * args.nproc, strategy="PACK")
        ready, _ = ray.wait([group.ready()], timeout=args.placement_timeout)
        if not ready:
            raise SystemExit(f"deepcomm.ray_launch: the cluster did not place {args.nproc} ranks of {bundle} within "
                             f"{args.placement_timeout:g} s (resources: {ray.cluster_resources()})")
        actor_class = ray.remote(RankActor)
        actors = [
            actor_class.options(
                num_cpus=args.cpus_per_rank, num_gpus=gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
                runtime_env={"env_vars": {NOSET_VISIBLE_DEVICES: "1"}},
            ).remote()
            for i in range(args.nproc)
        ]
        placements = ray.get([actor.placement.remote() for actor in actors])
        order = rank_order(placements)
        port = ray.get(actors[order[0]].free_port.remote())
        environments = rank_environments(placements, port)
        codes = ray.get([actor.run.remote(env, args.module, args.path, args.argv)
                         for actor, env in zip(actors, environments)])
        failed = sorted((int(env["RANK"]), code) for env, code in zip(environments, codes) if code != 0)
        for rank, code in failed:
            print(f"deepcomm.ray_launch: rank {rank} exited with status {code}", file=sys.stderr)
        remove_placement_group(group)
        return failed[0][1] if failed else 0
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    sys.exit(launch(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
