"""deepcomm.pair_sum: each received row as the weighted sum of its experts' outputs, in k order.

CPU: the torch path against a plain loop, and its gradients. GPU: the kernel against the torch
path bit for bit (random rows, rows with no pair, an empty call, written into a poisoned target),
and the kernel's backward against autograd's of the torch path.
"""

from __future__ import annotations

import pytest
import torch

import deepcomm
from deepcomm import _ext
from deepcomm.pair_sum import pair_of, pair_sum_torch, sum_in_k_order, weighted_pair_sum


def _pairs(num_rows: int, num_topk: int, keep: float, seed: int, device="cpu", hidden: int = 64,
           dtype=torch.bfloat16):
    """Random expert outputs for a random subset of the (row, k) places, in a shuffled (sorted-by-expert-like) order."""
    generator = torch.Generator().manual_seed(seed)
    places = torch.nonzero(torch.rand(num_rows * num_topk, generator=generator) < keep).flatten()
    order = places[torch.randperm(places.numel(), generator=generator)]
    values = torch.randn(order.numel(), hidden, generator=generator).to(dtype)
    weights = torch.rand(num_rows, num_topk, generator=generator)
    return values.to(device), weights.to(device), order.to(device)


def test_sum_in_k_order_adds_pairs_of_each_row():
    values = torch.tensor([[1.0], [2.0], [4.0], [8.0]])
    rows, ks = torch.tensor([2, 0, 2, 1]), torch.tensor([1, 0, 0, 2])
    assert sum_in_k_order(values, rows, ks, 4, 3).flatten().tolist() == [2.0, 8.0, 5.0, 0.0]


def test_pair_of_names_each_place_once_and_marks_the_rest():
    order = torch.tensor([5, 0, 3])
    assert pair_of(order, 3, 2).tolist() == [[1, -1], [-1, 2], [-1, 0]]


@pytest.mark.parametrize("keep", [0.0, 0.4, 1.0])
def test_torch_path_matches_a_loop_over_k(keep):
    values, weights, order = _pairs(37, 8, keep, seed=3, dtype=torch.float32)
    expected = torch.zeros(37, values.shape[1])
    for p, place in enumerate(order.tolist()):
        expected[place // 8] += weights[place // 8, place % 8] * values[p]
    torch.testing.assert_close(pair_sum_torch(values, weights, order), expected)
    # A row without pairs is exactly zero; the result takes values' dtype; a target is written and returned.
    assert weighted_pair_sum(values, weights, order).dtype == torch.float32
    target = torch.full((37, values.shape[1]), float("nan"))
    assert weighted_pair_sum(values, weights, order, target) is target
    torch.testing.assert_close(target, expected)


def test_torch_path_is_differentiable_in_values_and_weights():
    values, weights, order = _pairs(9, 4, 0.6, seed=5, dtype=torch.float32, hidden=3)
    values.requires_grad_(True)
    weights.requires_grad_(True)
    grad = torch.randn(9, 3)
    weighted_pair_sum(values, weights, order).backward(grad)
    rows, ks = order // 4, order % 4
    torch.testing.assert_close(values.grad, grad[rows] * weights.detach()[rows, ks].unsqueeze(1))
    expected = torch.zeros(9, 4)
    expected[rows, ks] = (grad[rows] * values.detach()).sum(dim=1)
    torch.testing.assert_close(weights.grad, expected)


# -- the kernel ------------------------------------------------------------------------------


def _needs_kernel():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not _ext.available():
        pytest.skip(f"extension not built: {deepcomm.features()['extension_error']}")


@pytest.mark.gpu
@pytest.mark.parametrize("num_rows,num_topk,keep,hidden", [
    (0, 8, 1.0, 7168), (1, 1, 1.0, 8), (300, 8, 0.3, 7168), (1000, 8, 1.0, 128), (513, 6, 0.05, 2056),
])
def test_kernel_equals_the_torch_path_bit_for_bit(num_rows, num_topk, keep, hidden):
    _needs_kernel()
    values, weights, order = _pairs(num_rows, num_topk, keep, seed=num_rows + hidden, device="cuda", hidden=hidden)
    expected = pair_sum_torch(values, weights, order).to(torch.bfloat16)
    target = torch.full((num_rows, hidden), float("nan"), dtype=torch.bfloat16, device="cuda")  # poisoned
    with torch.no_grad():
        assert weighted_pair_sum(values, weights, order, target) is target
    assert torch.equal(target.view(torch.int16), expected.view(torch.int16))


@pytest.mark.gpu
def test_kernel_backward_equals_autograd_of_the_torch_path():
    _needs_kernel()
    values, weights, order = _pairs(200, 8, 0.5, seed=11, device="cuda", hidden=256)
    grad = torch.randn(200, 256, device="cuda").to(torch.bfloat16)
    results = []
    for fused in (True, False):
        v, w = values.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        out = weighted_pair_sum(v, w, order) if fused else pair_sum_torch(v, w, order).to(torch.bfloat16)
        out.backward(grad)
        results.append((out.detach(), v.grad, w.grad))
    for fused, plain in zip(*results):
        assert torch.equal(fused, plain)


@pytest.mark.gpu
def test_kernel_writes_into_a_target_under_autograd():
    _needs_kernel()
    values, weights, order = _pairs(64, 4, 0.7, seed=2, device="cuda", hidden=64)
    values.requires_grad_(True)
    target = torch.zeros(64, 64, dtype=torch.bfloat16, device="cuda")
    out = weighted_pair_sum(values, weights, order, target)
    out.float().sum().backward()
    assert torch.equal(target, pair_sum_torch(values.detach(), weights, order).to(torch.bfloat16))
    rows, ks = order // 4, order % 4
    assert torch.equal(values.grad, weights[rows, ks].unsqueeze(1).expand(-1, 64).to(torch.bfloat16))


@pytest.mark.gpu
def test_inputs_the_kernel_cannot_read_take_the_torch_path():
    """Misaligned rows, non-float32 weights or a target of another shape: the same sums, by torch ops."""
    _needs_kernel()
    values, weights, order = _pairs(50, 4, 0.8, seed=9, device="cuda", hidden=64)
    expected = pair_sum_torch(values, weights, order).to(torch.bfloat16)
    storage = torch.empty(values.numel() + 1, dtype=torch.bfloat16, device="cuda")
    misaligned = storage[1:].view_as(values).copy_(values)  # 2 bytes past a 16-byte boundary
    with torch.no_grad():
        assert torch.equal(weighted_pair_sum(misaligned, weights, order), expected)
        as_double = weighted_pair_sum(values, weights.double(), order)
        assert as_double.dtype == torch.bfloat16 and as_double.shape == expected.shape
        with pytest.raises(RuntimeError):  # a target of the wrong shape is not written past its end
            weighted_pair_sum(values, weights, order, torch.empty(49, 64, dtype=torch.bfloat16, device="cuda"))
