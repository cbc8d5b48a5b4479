"""How fast a few SMs move bytes between GPUs, by each way a kernel can: a measurement for design choices.

    python -m deepcomm.launch --standalone --nproc-per-node 4 tools/peer_copy_rates.py --sms 16,24,32,48 \
        --json /tmp/peer_copy_rates.json

Every rank, at the same time, moves ``--megabytes`` between its GPU and the next rank's (rank r with
r + 1, so every GPU sends and receives at once, as in an all-to-all), on each SM count, in each way:

- ``store``: 16-byte loads here, 16-byte stores into the peer (`_C.copy`: the benchmark's copy floor);
- ``load``: 16-byte loads from the peer, stores here (what a pulling combine does);
- ``bulk store`` / ``bulk load``: the same bytes by bulk (TMA) copies through shared memory
  (`_C.bulk_copy`), which keep more bytes in flight per SM without registers (one 8 KiB piece a warp at
  a time, its load and store one after the other: the rate of this copy, not the most bulk copies give);
- ``copy engine``: ``cudaMemcpyAsync`` from here into the peer (no SM at all; the SM count is ignored).

It prints GB/s per GPU (the slowest rank's median) and checks, for each way and SM count, that every
byte landed (the target poisoned first). The 4-rank intranode combine runs at 1.11× the ``store`` floor on 24 SMs
(docs/benchmarks.md, fourteenth session): if a way moves clearly more on 24 SMs, the combine can too.
Needs two or more ranks, one GPU each.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from deepcomm import _ext
from deepcomm.bench import Timer
from deepcomm.ipc import PeerTensor, export_tensor
from deepcomm.launch import destroy_distributed, init_distributed

WAYS = ("store", "load", "bulk store", "bulk load", "copy engine")
POISON = 0xA5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sms", default="24", help="comma list of SM counts (blocks of 512 threads)")
    parser.add_argument("--megabytes", type=int, default=128, help="moved per rank and call (MiB)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", dest="json_path", default=None, help="write every row to this file")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        parser.error(f"--iters must be >= 1 and --warmup >= 0, got {args.iters} and {args.warmup}")
    if args.json_path and not Path(args.json_path).resolve().parent.is_dir():
        parser.error(f"--json: no folder {Path(args.json_path).resolve().parent}")
    try:
        args.sms = [int(v) for v in args.sms.split(",")]
    except ValueError:
        parser.error(f"--sms: expected a comma list of SM counts, got {args.sms!r}")
    if min(args.sms) < 1:
        parser.error(f"--sms: SM counts must be >= 1, got {args.sms}")
    if args.megabytes < 1:
        parser.error(f"--megabytes: must be >= 1, got {args.megabytes}")
    return args


def source_bytes(rank: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """Rank ``rank``'s bytes, the same wherever they are made (so a peer can check them)."""
    generator = torch.Generator(device=device).manual_seed(1000 + rank)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device, generator=generator)


def ways(core, here: torch.Tensor, landing: torch.Tensor, peer_src: torch.Tensor, peer_landing: torch.Tensor,
         stream: int) -> dict[str, Callable[[int], object]]:
    """Each way as a call on a given SM count: what it writes, and where."""
    n = here.numel()
    return {
        "store": lambda sms: core.copy(peer_landing.data_ptr(), here.data_ptr(), n, sms, stream),
        "load": lambda sms: core.copy(landing.data_ptr(), peer_src.data_ptr(), n, sms, stream),
        "bulk store": lambda sms: core.bulk_copy(peer_landing.data_ptr(), here.data_ptr(), n, sms, stream),
        "bulk load": lambda sms: core.bulk_copy(landing.data_ptr(), peer_src.data_ptr(), n, sms, stream),
        "copy engine": lambda sms: peer_landing.copy_(here, non_blocking=True),
    }


def landed_ok(way: str, rank: int, world: int, landing: torch.Tensor, device: torch.device) -> bool:
    """After one call of ``way`` on every rank: this rank's landing buffer holds the right peer's bytes."""
    pushed = way in ("store", "bulk store", "copy engine")  # the previous rank wrote here; else this rank read the next
    writer = (rank - 1) % world if pushed else (rank + 1) % world
    return bool(torch.equal(landing, source_bytes(writer, landing.numel(), device)))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    init_distributed(600)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world < 2:
        raise SystemExit("peer_copy_rates: needs two or more ranks (each moves bytes to the next one's GPU)")
    if not torch.cuda.is_available() or torch.cuda.device_count() < world:
        raise SystemExit(f"peer_copy_rates: needs one GPU per rank ({world} ranks, "
                         f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} GPUs)")
    device = torch.device("cuda", torch.cuda.current_device())
    core = _ext.extension()
    nbytes = args.megabytes << 20
    here = source_bytes(rank, nbytes, device)
    landing = torch.empty(nbytes, dtype=torch.uint8, device=device)
    exported = [None] * world
    dist.all_gather_object(exported, (export_tensor(here), export_tensor(landing)))
    timer = Timer(device, args.warmup, args.iters)
    rows = []
    with PeerTensor(exported[(rank + 1) % world][0], device) as peer_src, \
            PeerTensor(exported[(rank + 1) % world][1], device) as peer_landing:
        stream = torch.cuda.current_stream(device).cuda_stream
        calls = ways(core, here, landing, peer_src.tensor, peer_landing.tensor, stream)
        for way in WAYS:
            for sms in (args.sms if way != "copy engine" else [None]):
                def call():
                    return calls[way](sms)  # the copy engine ignores sms (None)

                # The poison goes in once no peer writes here any more (the timed calls before), and before
                # any peer writes the one checked call.
                torch.cuda.synchronize(device)
                dist.barrier()
                landing.fill_(POISON)
                torch.cuda.synchronize(device)
                dist.barrier()
                call()
                torch.cuda.synchronize(device)
                dist.barrier()
                ok = torch.tensor([int(landed_ok(way, rank, world, landing, device))], device=device)
                dist.all_reduce(ok, op=dist.ReduceOp.MIN)
                us = timer(call)
                rows.append({"way": way, "sms": sms, "ranks": world, "bytes": nbytes, "us": us,
                             "gbps": nbytes / us / 1e3, "check": "ok" if int(ok) else "FAILED"})
        torch.cuda.synchronize(device)
        dist.barrier()  # nobody unmaps or frees a buffer a peer still uses
    if rank == 0:
        print(f"peer copy rates: {world} ranks, one GPU each ({torch.cuda.get_device_name(device)}), "
              f"{args.megabytes} MiB a rank to the next rank's GPU, all at once (GB/s a GPU, slowest rank's median)")
        print(f"{'way':<12} {'SMs':>5} {'µs':>10} {'GB/s':>8}  check")
        for row in rows:
            print(f"{row['way']:<12} {row['sms'] if row['sms'] else '-':>5} {row['us']:>10.1f} {row['gbps']:>8.1f}  "
                  f"{row['check']}")
        if args.json_path:
            with open(args.json_path, "w") as out:
                json.dump(rows, out, indent=1)
    destroy_distributed()


if __name__ == "__main__":
    main()
