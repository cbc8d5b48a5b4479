"""Train a small MoE transformer with expert parallelism, with and without two-micro-batch overlap.

    python tools/train_moe.py --nproc 4 --steps 300 --png docs/img/train_moe_loss.png     # CPU, gloo
    python -m deepcomm.launch --standalone --nproc-per-node 2 tools/train_moe.py --steps 300   # GPU ranks

Each rank holds E / world experts of every layer and its own token stream (data parallel for
everything else: attention, router, shared expert and head gradients are averaged across ranks).
The task needs attention and the experts: predict, for every position, the causal running mean of
a fixed random nonlinear map of the inputs. Both runs start from the same weights and see the same
batches; the overlapped one splits every batch into two micro-batches scheduled by
deepcomm.overlap and runs the backward stage by stage. The two loss curves must agree.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from deepcomm import moe, overlap
from deepcomm.communicator import Communicator
from deepcomm.intranode import BufferConfig
from deepcomm.launch import destroy_distributed, spawn_local


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=4, help="local processes when not under torchrun")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank and step")
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--ranks-per-node", type=int, default=None, help="split the ranks into nodes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", default=None, help="both loss curves")
    parser.add_argument("--png", default=None, help="draw both loss curves")
    args = parser.parse_args(argv)
    for name in ("nproc", "steps", "layers", "batch", "seq"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: must be >= 1")
    return args


class Model(torch.nn.Module):
    """MoE transformer blocks and a linear head; ``run`` goes plain or through the overlap scheduler."""

    def __init__(self, config: moe.BlockConfig, layers: int, comm, dtype, device, seed: int) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(moe.TransformerBlock(config, comm, dtype=dtype, device=device,
                                                               seed=seed + layer) for layer in range(layers))
        self.head = torch.nn.Linear(config.moe.hidden, config.moe.hidden, device=device, dtype=dtype)
        torch.nn.init.eye_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def loss(self, x: torch.Tensor, target: torch.Tensor, overlapped: bool) -> torch.Tensor:
        """Forward and backward of one step; returns the loss."""
        if not overlapped:
            y = x
            for block in self.blocks:
                y = block(y)
            loss = torch.nn.functional.mse_loss(self.head(y).float(), target)
            loss.backward()
            return loss.detach()
        y, schedule = overlap.run_overlapped(list(self.blocks), x)
        loss = torch.nn.functional.mse_loss(self.head(y).float(), target)
        loss.backward()  # the head, and the gradient of the blocks' output
        schedule.backward()  # the blocks, stage by stage, both micro-batches interleaved
        return loss.detach()


def is_expert_parameter(name: str) -> bool:
    """Routed experts are sharded over the ranks; everything else is replicated."""
    return ".experts." in f".{name}." or name.rsplit(".", 1)[-1] in moe.EXPERT_PARAMETERS


def average_gradients(model: torch.nn.Module) -> None:
    """Gradients of the mean of the ranks' losses. A replicated parameter's are averaged over the ranks; an
    expert's already hold every rank's loss (through the all-to-all's backward), summed: divided by the ranks."""
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if not is_expert_parameter(name):
            dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()


def batches(args, hidden: int, device, dtype):
    """The same stream of (x, target) for both runs: per rank, from the seed."""
    generator = torch.Generator().manual_seed(1000 * args.seed + dist.get_rank())
    teacher = torch.Generator().manual_seed(args.seed)  # one task for every rank
    mix = torch.randn(hidden, hidden, generator=teacher) / hidden ** 0.5
    for _ in range(args.steps):
        x = torch.randn(args.batch, args.seq, hidden, generator=generator)
        mapped = torch.tanh(2 * x @ mix)
        target = mapped.cumsum(dim=1) / torch.arange(1, args.seq + 1).view(1, -1, 1)
        yield x.to(device, dtype), target.to(device)


def train(args, overlapped: bool) -> list[float]:
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    config = moe.tiny()
    buffer = BufferConfig(args.batch * args.seq, config.moe.hidden, config.moe.num_topk) if on_gpu else None
    comm = Communicator(ranks_per_node=args.ranks_per_node, buffer=buffer)
    torch.manual_seed(args.seed)
    model = Model(config, args.layers, comm, dtype, device, args.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    losses = []
    for x, target in batches(args, config.moe.hidden, device, dtype):
        optimizer.zero_grad(set_to_none=True)
        loss = model.loss(x, target, overlapped)
        average_gradients(model)
        optimizer.step()
        total = loss.reshape(1).double()  # on the GPU under NCCL, on the CPU under gloo
        dist.all_reduce(total)
        losses.append(float(total) / dist.get_world_size())
    comm.close()  # collective: every rank's kernels are done with the peers' buffers before any is freed
    return losses


def run(args) -> dict:
    plain = train(args, overlapped=False)
    overlapped = train(args, overlapped=True)
    return {"plain": plain, "overlapped": overlapped, "world_size": dist.get_world_size(),
            "backend": "gpu" if torch.cuda.is_available() else "cpu", "args": vars(args)}


def report(args, result: dict) -> None:
    plain, over = result["plain"], result["overlapped"]
    worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(plain, over))
    print(f"train_moe: {result['world_size']} ranks on {result['backend']}, {len(plain)} steps: loss "
          f"{plain[0]:.4f} -> {plain[-1]:.4f} plain, {over[0]:.4f} -> {over[-1]:.4f} overlapped; "
          f"largest relative difference between the curves {worst:.2e}")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f)
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(plain, label="plain", linewidth=2.5, alpha=0.6)
        ax.plot(over, label="two micro-batches, overlapped", linewidth=1, linestyle="--")
        ax.set(xlabel="step", ylabel="loss (mean over ranks)", yscale="log",
               title=f"MoE transformer, {result['world_size']} expert-parallel ranks ({result['backend']})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)


def _spawned(args) -> None:
    """One of --nproc processes spawned without torchrun (deepcomm.launch.spawn_local)."""
    torch.set_num_threads(1)
    result = run(args)
    if dist.get_rank() == 0:
        report(args, result)


def main(argv=None) -> None:
    args = parse_args(argv)
    if "RANK" in os.environ:  # under torchrun / deepcomm.launch
        from deepcomm.launch import init_distributed

        init_distributed()
        result = run(args)
        if dist.get_rank() == 0:
            report(args, result)
        dist.barrier()
        destroy_distributed()
        return
    spawn_local(_spawned, args.nproc, args)


if __name__ == "__main__":
    main()
