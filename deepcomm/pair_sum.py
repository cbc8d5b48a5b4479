"""The MoE layer's last step on a rank: each received row as the weighted sum of its experts' outputs.

Row ``r`` of the result is the sum over ``k`` (ascending) of ``weights[r, k] * values[pair (r, k)]``,
in float32, rounded to the output dtype once. ``order[p] = r * K + k`` names the place of pair ``p``
(the expert-sorted order the grouped GEMM ran in); a row may have fewer than ``K`` pairs (entries
naming other ranks' experts), a missing pair adding zero.

On CUDA bf16 with the extension built, one kernel (``csrc/kernels/pair_sum.cu``) reads each pair once
and writes each row once, into ``out`` when given (the receive slot, where combine reads it). Elsewhere
torch ops do the same operations in the same order (:func:`pair_sum_torch`): the kernel's oracle,
equal to it bit for bit, and five passes over float32 pairs where the kernel makes one over bf16.
"""

from __future__ import annotations

import torch

from deepcomm import _ext


def sum_in_k_order(values: torch.Tensor, rows: torch.Tensor, ks: torch.Tensor, num_rows: int,
                   num_topk: int) -> torch.Tensor:
    """``[num_rows, C]``: row r sums the ``values`` of its pairs ``(r, k)`` in ascending k (a fixed order).

    ``values`` ``[P, C]`` belongs to pairs ``(rows[p], ks[p])``, each at most once, in any order.
    """
    # slot[r, k]: the pair's index in values, or P, a zero row, where (r, k) has none.
    num_pairs = values.shape[0]
    slot = torch.full((num_rows, num_topk), num_pairs, dtype=torch.int64, device=values.device)
    slot[rows, ks] = torch.arange(num_pairs, device=values.device)
    padded = torch.cat([values, values.new_zeros(1, values.shape[1])])
    total = padded[slot[:, 0]]
    for k in range(1, num_topk):
        total = total + padded[slot[:, k]]
    return total


def pair_sum_torch(values: torch.Tensor, weights: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The float32 ``[R, H]`` sums in torch ops (differentiable by autograd)."""
    num_rows, num_topk = weights.shape
    rows, ks = order // num_topk, order % num_topk
    weighted = values.float() * weights[rows, ks].unsqueeze(1)
    return sum_in_k_order(weighted, rows, ks, num_rows, num_topk)


def pair_of(order: torch.Tensor, num_rows: int, num_topk: int) -> torch.Tensor:
    """``[R, K]`` int64: the pair holding ``(r, k)``, or -1 where there is none."""
    pairs = torch.full((num_rows * num_topk,), -1, dtype=torch.int64, device=order.device)
    pairs[order] = torch.arange(order.numel(), device=order.device)
    return pairs.view(num_rows, num_topk)


def _kernel_applies(values: torch.Tensor, weights: torch.Tensor, order: torch.Tensor,
                    out: torch.Tensor | None) -> bool:
    """Whether the kernel reads these as it must: bf16 rows of 16-byte units, float32 weights, one device."""
    def rows_ok(t: torch.Tensor) -> bool:
        return t.dtype == torch.bfloat16 and t.is_contiguous() and t.data_ptr() % 16 == 0
    return (values.is_cuda and values.shape[1] % 8 == 0 and rows_ok(values)
            and weights.dtype == torch.float32 and weights.device == values.device and order.device == values.device
            and (out is None or (rows_ok(out) and out.device == values.device
                                 and out.shape == (weights.shape[0], values.shape[1])))
            and _ext.available())


def _launch(values: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    num_rows, num_topk = weights.shape
    weights = weights.contiguous()
    pairs = pair_of(order, num_rows, num_topk)
    with torch.cuda.device(values.device):  # launched in the context of the tensors' device
        stream = torch.cuda.current_stream(values.device).cuda_stream
        _ext.extension().pair_sum(out.data_ptr(), values.data_ptr(), pairs.data_ptr(), weights.data_ptr(), num_rows,
                                  num_topk, values.shape[1], stream)
    return out


class _PairSum(torch.autograd.Function):
    """The kernel's forward into a new tensor; the backward of :func:`pair_sum_torch` (torch ops)."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, weights: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(values, weights, order)
        out = values.new_empty(weights.shape[0], values.shape[1])
        return _launch(values, weights, order, out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        values, weights, order = ctx.saved_tensors
        num_topk = weights.shape[1]
        rows, ks = order // num_topk, order % num_topk
        # Each pair is one term of one row's sum: its gradient is that row's, in float32 as the sum ran.
        grad_terms = grad_out.float()[rows]
        grad_values = grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_values = (grad_terms * weights[rows, ks].unsqueeze(1)).to(values.dtype)
        if ctx.needs_input_grad[1]:
            grad_weights = torch.zeros_like(weights)
            grad_weights[rows, ks] = (grad_terms * values.float()).sum(dim=1)
        return grad_values, grad_weights, None


def weighted_pair_sum(values: torch.Tensor, weights: torch.Tensor, order: torch.Tensor,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """``[R, H]`` in ``values``' dtype (or written into ``out``, returned): see the module docstring.

    ``values`` ``[P, H]``, ``weights`` ``[R, K]`` float32, ``order`` ``[P]`` int64 (distinct places).
    Differentiable in ``values`` and ``weights``; when a gradient is wanted the kernel writes a new
    tensor that ``out`` then copies (autograd records the copy, as for any in-place write).
    """
    if not _kernel_applies(values, weights, order, out):
        summed = pair_sum_torch(values, weights, order)
        return summed.to(values.dtype) if out is None else out.copy_(summed)
    if torch.is_grad_enabled() and (values.requires_grad or weights.requires_grad):
        summed = _PairSum.apply(values, weights, order)
        return summed if out is None else out.copy_(summed)
    if out is None:
        out = values.new_empty(weights.shape[0], values.shape[1])
    return _launch(values, weights, order, out)
