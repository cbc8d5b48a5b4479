"""Backward of dispatch is combine and vice versa, checked exactly on several processes over gloo."""

from __future__ import annotations

import pytest
import torch

import deepcomm
from cases import make_inputs
from deepcomm import autograd
from deepcomm.layout import token_rank_mask
from dist import run_ranks


def _upstream(rank: int, num_tokens: int, hidden: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + rank)
    return torch.randint(-4, 5, (num_tokens, hidden), generator=generator).to(torch.bfloat16)


def _gradient_worker(rank: int, world_size: int, ranks_per_node: int) -> None:
    comm = deepcomm.Communicator(ranks_per_node=ranks_per_node, backend="reference")
    num_experts = 4 * world_size
    for seed, routing in enumerate(("uniform", "minus_one", "skewed")):
        inputs = make_inputs(seed, rank, 17 + rank, 128, 4, num_experts, routing, comm.topology.num_nodes)
        x = inputs.x.clone().requires_grad_()
        weights = inputs.topk_weights.clone().requires_grad_()
        out = autograd.dispatch(comm, x, inputs.topk_idx, weights, num_experts)

        # Each rank scales what it received by 2**rank (exact in bf16) and uses its local weights.
        scaled = out.x * (2.0**rank)
        y = autograd.combine(comm, scaled, out.handle)
        upstream = _upstream(rank, y.shape[0], y.shape[1])
        loss = (y.float() * upstream.float()).sum() + (out.topk_weights * (out.topk_idx >= 0)).sum()
        loss.backward()

        # d loss / d x[t] = upstream[t] * sum of 2**r over the ranks r that received t.
        mask = token_rank_mask(inputs.topk_idx, num_experts, world_size).float()
        factor = (mask * (2.0 ** torch.arange(world_size)).float()).sum(dim=1, keepdim=True)
        assert torch.equal(x.grad.float(), upstream.float() * factor), f"{routing}: grad x"
        # d loss / d w[t, k] = 1 for every real expert (held by exactly one rank), 0 for -1.
        assert torch.equal(weights.grad, (inputs.topk_idx >= 0).float()), f"{routing}: grad weights"

        # Combine's backward alone: each received row gets its source token's gradient.
        rows = out.x.detach().clone().requires_grad_()
        y = autograd.combine(comm, rows, out.handle)
        (y.float() * upstream.float()).sum().backward()
        # Every rank can rebuild every rank's upstream gradient (seeded by rank, 17 + r tokens).
        start = 0
        for source, count in enumerate(out.num_recv_tokens_per_rank):
            source_upstream = _upstream(source, 17 + source, y.shape[1])
            src_idx = out.handle.recv_src_idx[start : start + count]
            assert torch.equal(rows.grad[start : start + count], source_upstream[src_idx]), f"{routing}: grad rows"
            start += count


@pytest.mark.parametrize("world_size,ranks_per_node", [(2, 2), (4, 2)])
def test_dispatch_and_combine_gradients_are_exact(world_size, ranks_per_node):
    run_ranks(_gradient_worker, world_size, ranks_per_node)


def test_autograd_refuses_backends_without_it():
    class KernelBackend:
        backend = "intranode"
        _impl = object()

    with pytest.raises(ValueError, match="^comm:"):
        autograd.combine(KernelBackend(), torch.zeros(1, 8, dtype=torch.bfloat16), None)
