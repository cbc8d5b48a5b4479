"""deepcomm.expert_order: the received pairs by expert, then place (a stable sort).

CPU: the torch path against a sort written out by hand. GPU: the counting-sort kernel against the
torch path, element for element, on skewed, empty and one-expert routings, and sizes across blocks.
"""

from __future__ import annotations

import pytest
import torch

import deepcomm
from deepcomm import _ext
from deepcomm.expert_order import expert_order, expert_order_torch


def _local_idx(num_rows: int, num_topk: int, num_experts: int, routing: str, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, num_experts, (num_rows, num_topk), generator=generator)
    if routing == "skewed":  # most pairs on expert 0
        ids = torch.where(torch.rand(num_rows, num_topk, generator=generator) < 0.8, 0, ids)
    elif routing == "empty_experts":  # only even experts
        ids = torch.where(ids >= 0, ids - ids % 2, ids)
    elif routing == "none":
        ids.fill_(-1)
    elif routing == "one_expert":
        ids.fill_(num_experts - 1)
    return ids


def _by_hand(local_idx: torch.Tensor) -> list[int]:
    places = [(int(e), p) for p, e in enumerate(local_idx.flatten().tolist()) if e >= 0]
    return [p for _, p in sorted(places)]


@pytest.mark.parametrize("routing", ["uniform", "skewed", "empty_experts", "none", "one_expert"])
def test_torch_path_sorts_by_expert_then_place(routing):
    local_idx = _local_idx(37, 4, 8, routing, seed=1)
    num_pairs = int((local_idx >= 0).sum())
    order, rows, ends = expert_order_torch(local_idx, 8, num_pairs)
    assert order.tolist() == _by_hand(local_idx)
    assert torch.equal(rows, order // 4)
    counts = [int((local_idx == e).sum()) for e in range(8)]
    assert ends.dtype == torch.int32 and ends.tolist() == torch.tensor(counts).cumsum(0).tolist()
    assert expert_order(local_idx, 8, num_pairs)[0].tolist() == order.tolist()  # CPU: the same path


@pytest.mark.gpu
@pytest.mark.parametrize("num_rows,num_topk,num_experts", [(0, 8, 4), (1, 1, 1), (300, 8, 128), (5000, 8, 16),
                                                           (20000, 6, 1024), (4096, 8, 2),
                                                           (70000, 8, 64)])  # 560k places: runs beyond 2048
@pytest.mark.parametrize("routing", ["uniform", "skewed", "empty_experts", "none", "one_expert"])
def test_kernel_equals_the_torch_path(num_rows, num_topk, num_experts, routing):
    if not (torch.cuda.is_available() and _ext.available()):
        pytest.skip(f"needs a CUDA GPU and the extension ({deepcomm.features()['extension_error']})")
    local_idx = _local_idx(num_rows, num_topk, num_experts, routing, seed=num_rows).cuda()
    num_pairs = int((local_idx >= 0).sum())
    expected = expert_order_torch(local_idx, num_experts, num_pairs)
    for actual, wanted in zip(expert_order(local_idx, num_experts, num_pairs), expected, strict=True):
        assert actual.dtype == wanted.dtype and torch.equal(actual, wanted)


@pytest.mark.parametrize("num_pairs", [-1, 7, True, 2.0])
def test_a_pair_count_outside_the_ids_is_refused(num_pairs):
    # Too many would pull -1 places into the order, too few drop pairs that ends still counts.
    local_idx = torch.tensor([[0, -1], [1, 0], [-1, 1]])
    with pytest.raises(ValueError, match=r"^num_pairs: expected an int in \[0, 6\]"):
        expert_order(local_idx, 2, num_pairs)
