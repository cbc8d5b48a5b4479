"""Differentiable dispatch and combine: the backward of dispatch is combine, and vice versa.

    out = deepcomm.autograd.dispatch(comm, x, topk_idx, topk_weights, num_experts)
    y = deepcomm.autograd.combine(comm, expert_out, out.handle)

Gradients flow to ``x`` (summed over the ranks that received each token, in
combine's fixed order) and to ``topk_weights`` (each entry from the rank that
holds its expert), and from ``y`` back to ``expert_out`` (each received row gets
its token's gradient). Runs on the reference backend; the kernel backends get
their cached-layout backward with the MoE layer.
"""

from __future__ import annotations

import torch

from deepcomm.results import DispatchResult


def _reference(comm):
    impl = getattr(comm, "_impl", comm)
    if not hasattr(impl, "reduce_rows"):
        raise ValueError(f"comm: autograd runs on the reference backend for now, got backend {comm.backend!r}")
    return impl


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, holder: dict, x, topk_weights, topk_idx, num_experts):
        result = impl.dispatch(x.detach(), topk_idx, topk_weights.detach(), num_experts)
        holder["result"] = result
        ctx.impl, ctx.handle = impl, result.handle
        ctx.save_for_backward(result.topk_idx)
        return result.x, result.topk_weights

    @staticmethod
    def backward(ctx, grad_x, grad_weights):
        (local_idx,) = ctx.saved_tensors
        grad_input = ctx.impl.reduce_rows(grad_x.contiguous(), ctx.handle) if grad_x is not None else None
        grad_topk_weights = None
        if grad_weights is not None:
            # Entries for experts elsewhere were zeros, not weights: they pass no gradient.
            local_grad = torch.where(local_idx >= 0, grad_weights, torch.zeros_like(grad_weights))
            grad_topk_weights = ctx.impl.reduce_rows(local_grad.float().contiguous(), ctx.handle)
        return None, None, grad_input, grad_topk_weights, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, handle, expert_out):
        ctx.impl, ctx.handle = impl, handle
        return impl.combine(expert_out.detach(), handle)

    @staticmethod
    def backward(ctx, grad_y):
        return None, None, ctx.impl.scatter_rows(grad_y.contiguous(), ctx.handle)


def dispatch(comm, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
             num_experts: int) -> DispatchResult:
    """:meth:`Communicator.dispatch` (bf16 ``x``) recorded for autograd: ``result.x`` and
    ``result.topk_weights`` carry gradients back to ``x`` and ``topk_weights``."""
    holder: dict = {}
    recv_x, recv_weights = _Dispatch.apply(_reference(comm), holder, x, topk_weights, topk_idx, num_experts)
    result = holder["result"]
    result.x, result.topk_weights = recv_x, recv_weights
    return result


def combine(comm, expert_out: torch.Tensor, handle) -> torch.Tensor:
    """:meth:`Communicator.combine` recorded for autograd (gradient to ``expert_out``)."""
    return _Combine.apply(_reference(comm), handle, expert_out)
