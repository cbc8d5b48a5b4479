"""Backward of dispatch is combine and vice versa, checked exactly on several processes over gloo.

Both backward paths run here: the reference backend's own, and the kernel backends' (combine,
dispatch again, return_to_sources), driven on the CPU through the reference path behind the
kernel backends' interface.
"""

from __future__ import annotations

import gc

import pytest
import torch
import torch.distributed as dist

import deepcomm
from cases import make_inputs
from deepcomm import autograd, fp8
from deepcomm.kernel_common import combine_input_view
from deepcomm.layout import token_rank_mask
from dist import run_ranks


class KernelInterface:
    """The reference path behind only the interface autograd sees on the kernel backends."""

    def __init__(self, reference) -> None:
        self.reference, self.topology, self.group = reference, reference.topology, reference.group

    def run_dispatch(self, *args, **kwargs):
        return self.reference.run_dispatch(*args, **kwargs)

    def run_combine(self, *args, **kwargs):
        return self.reference.run_combine(*args, **kwargs)

    def combine_input(self, handle):
        # As the kernel backends hand it out: a detached bf16 view into a uint8 buffer.
        rows_bytes = handle.num_recv_tokens * handle.hidden * 2
        buffer = torch.empty(64 + rows_bytes, dtype=torch.uint8)
        return combine_input_view(buffer, 64, rows_bytes, handle, 0, 2)


def _communicator(ranks_per_node: int, path: str):
    comm = deepcomm.Communicator(ranks_per_node=ranks_per_node, backend="reference")
    return comm if path == "reference" else KernelInterface(comm.reference)


def _upstream(rank: int, num_tokens: int, hidden: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + rank)
    return torch.randint(-4, 5, (num_tokens, hidden), generator=generator).to(torch.bfloat16)


def _gradient_worker(rank: int, world_size: int, ranks_per_node: int) -> None:
    for path in ("reference", "kernel"):
        comm = _communicator(ranks_per_node, path)
        for seed, routing in enumerate(("uniform", "minus_one", "skewed")):
            where = f"{path}/{routing}"
            inputs = make_inputs(seed, rank, 17 + rank, 128, 4, 4 * world_size, routing, comm.topology.num_nodes)
            _check_exact_gradients(comm, rank, world_size, inputs, where)
            _check_fp8_is_straight_through(comm, rank, world_size, inputs, where)
            _check_float32_rows(comm, rank, world_size, inputs, where, path)
            _check_return_to_sources(comm, world_size, inputs, where)
        if path == "kernel":
            _check_kernel_path_handles(comm, world_size)


def _check_exact_gradients(comm, rank: int, world_size: int, inputs, where: str) -> None:
    num_experts = 4 * world_size
    x = inputs.x.clone().requires_grad_()
    weights = inputs.topk_weights.clone().requires_grad_()
    out = autograd.dispatch(comm, x, inputs.topk_idx, weights, num_experts)

    # Each rank scales what it received by 2**rank (exact in bf16) and uses its local weights.
    scaled = out.x * (2.0**rank)
    y, event = autograd.combine(comm, scaled, out.handle)
    assert isinstance(event, deepcomm.EventHandle) and event.query()
    upstream = _upstream(rank, y.shape[0], y.shape[1])
    loss = (y.float() * upstream.float()).sum() + (out.topk_weights * (out.topk_idx >= 0)).sum()
    loss.backward()

    # d loss / d x[t] = upstream[t] * sum of 2**r over the ranks r that received t.
    mask = token_rank_mask(inputs.topk_idx, num_experts, world_size).float()
    factor = (mask * (2.0 ** torch.arange(world_size)).float()).sum(dim=1, keepdim=True)
    assert torch.equal(x.grad.float(), upstream.float() * factor), f"{where}: grad x"
    # d loss / d w[t, k] = 1 for every real expert (held by exactly one rank), 0 for -1.
    assert torch.equal(weights.grad, (inputs.topk_idx >= 0).float()), f"{where}: grad weights"

    # Combine's backward alone: each received row gets its source token's gradient.
    rows = out.x.detach().clone().requires_grad_()
    y, _ = autograd.combine(comm, rows, out.handle, async_finish=True)
    (y.float() * upstream.float()).sum().backward()
    # Every rank can rebuild every rank's upstream gradient (seeded by rank, 17 + r tokens).
    src_idx = _received_source_tokens(comm, inputs, num_experts)
    start = 0
    for source, count in enumerate(out.num_recv_tokens_per_rank):
        source_upstream = _upstream(source, 17 + source, y.shape[1])
        assert torch.equal(rows.grad[start : start + count], source_upstream[src_idx[start : start + count]]), (
            f"{where}: grad rows")
        start += count


def _received_source_tokens(comm, inputs, num_experts: int) -> torch.Tensor:
    reference = getattr(comm, "reference", None) or comm._impl
    return reference.dispatch(inputs.x, inputs.topk_idx, inputs.topk_weights, num_experts).handle.recv_src_idx


def _check_fp8_is_straight_through(comm, rank: int, world_size: int, inputs, where: str) -> None:
    """fp8 rows arrive dequantised to bf16; x's gradient is the bf16 path's (quantisation = identity)."""
    num_experts = 4 * world_size
    grads = []
    for quantize in (False, True):
        x = inputs.x.clone().requires_grad_()
        out = autograd.dispatch(comm, x, inputs.topk_idx, inputs.topk_weights, num_experts, quantize_fp8=quantize,
                                async_finish=quantize)
        out.event.wait()
        if quantize:
            assert out.x.dtype == torch.bfloat16 and out.x_scales is None, where
            sent = fp8.dequantize_fp8(*fp8.quantize_fp8(inputs.x))
            expected = autograd.dispatch(comm, sent, inputs.topk_idx, inputs.topk_weights, num_experts).x
            assert torch.equal(out.x, expected), f"{where}: fp8 rows"
        (out.x.float() * 2.0**rank).sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1]), f"{where}: fp8 gradient"


def _check_float32_rows(comm, rank: int, world_size: int, inputs, where: str, path: str) -> None:
    """float32 rows on the reference backend: moved as they are, combined in float32; bf16 elsewhere."""
    num_experts = 4 * world_size
    x = inputs.x.float().requires_grad_()
    if path != "reference":
        with pytest.raises(TypeError, match="^x: float32"):
            autograd.dispatch(comm, x, inputs.topk_idx, inputs.topk_weights, num_experts)
        return
    assert autograd.row_dtypes(comm) == (torch.bfloat16, torch.float32)
    out = autograd.dispatch(comm, x, inputs.topk_idx, inputs.topk_weights, num_experts)
    as_bf16 = autograd.dispatch(comm, inputs.x, inputs.topk_idx, inputs.topk_weights, num_experts)
    assert out.x.dtype == torch.float32 and torch.equal(out.x, as_bf16.x.float()), f"{where}: float32 rows"
    y, _ = autograd.combine(comm, out.x / 3, out.handle)  # not exact in bf16: float32 must survive
    factor = token_rank_mask(inputs.topk_idx, num_experts, world_size).sum(dim=1, keepdim=True)
    assert y.dtype == torch.float32 and torch.allclose(y, x.detach() / 3 * factor, rtol=1e-6, atol=0), where
    upstream = _upstream(rank, y.shape[0], y.shape[1]).float()
    (y * upstream).sum().backward()
    assert torch.allclose(x.grad, upstream * factor / 3, rtol=1e-6, atol=0), f"{where}: float32 grad x"


def _check_return_to_sources(comm, world_size: int, inputs, where: str) -> None:
    """The kernel backends' weight-gradient return equals the reference's reduction, bit for bit."""
    reference = getattr(comm, "reference", None) or comm._impl
    num_experts = 4 * world_size
    out = reference.dispatch(inputs.x, inputs.topk_idx, inputs.topk_weights, num_experts)
    values = torch.randn(out.topk_idx.shape) * (out.topk_idx >= 0)
    in_rank = token_rank_mask(inputs.topk_idx, num_experts, world_size)
    returned = autograd.return_to_sources(values, out.num_recv_tokens_per_rank, in_rank, reference.group)
    assert torch.equal(returned, reference.reduce_rows(values, out.handle)), f"{where}: return_to_sources"


def _check_kernel_path_handles(comm, world_size: int) -> None:
    """combine needs a handle from autograd.dispatch there; the kept routing goes with the handle."""
    inputs = make_inputs(7, dist.get_rank(), 5, 128, 2, 2 * world_size, "uniform", 1)
    plain = comm.reference.dispatch(inputs.x, inputs.topk_idx, inputs.topk_weights, 2 * world_size)
    with pytest.raises(ValueError, match="^handle:"):
        autograd.combine(comm, plain.x, plain.handle)
    gc.collect()
    assert not autograd._ROUTES, "routing outlived its handles"


@pytest.mark.parametrize("world_size,ranks_per_node", [(2, 2), (4, 2)])
def test_dispatch_and_combine_gradients_are_exact(world_size, ranks_per_node):
    run_ranks(_gradient_worker, world_size, ranks_per_node)


def test_autograd_refuses_what_is_not_a_communicator():
    with pytest.raises(TypeError, match="^comm:"):
        autograd.combine(object(), torch.zeros(1, 8, dtype=torch.bfloat16), None)


def test_return_to_sources_rejects_bad_input(single_rank_group):
    in_rank = torch.ones(3, 1, dtype=torch.bool)
    values = torch.zeros(3, 2)
    with pytest.raises(TypeError, match="^values:"):
        autograd.return_to_sources(values.to(torch.bfloat16), [3], in_rank)
    with pytest.raises(ValueError, match="^num_recv_tokens_per_rank: unknown"):
        autograd.return_to_sources(values, None, in_rank)
    with pytest.raises(ValueError, match="^num_recv_tokens_per_rank:"):
        autograd.return_to_sources(values, [2], in_rank)
    with pytest.raises(ValueError, match="^is_token_in_rank:"):
        autograd.return_to_sources(values, [3], torch.ones(3, 2, dtype=torch.bool))
    assert torch.equal(autograd.return_to_sources(values + 1, [3], in_rank), values + 1)
