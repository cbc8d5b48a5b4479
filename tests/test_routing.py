"""Node-limited top-k routing: the properties DeepSeek-V3's router promises."""

from __future__ import annotations

import pytest
import torch

from deepcomm.routing import expert_load, node_limited_topk, update_expert_bias

CASES = [  # (experts, nodes, max_nodes, topk)
    (64, 8, 4, 8),
    (256, 8, 4, 8),
    (64, 4, 1, 6),
    (32, 2, 2, 8),
    (16, 16, 3, 3),
]


@pytest.mark.parametrize("num_experts,num_nodes,max_nodes,num_topk", CASES)
@pytest.mark.parametrize("seed", range(3))
def test_tokens_reach_at_most_max_nodes(num_experts, num_nodes, max_nodes, num_topk, seed):
    logits = torch.randn(500, num_experts, generator=torch.Generator().manual_seed(seed))
    topk_idx, topk_weights = node_limited_topk(logits, num_topk, num_nodes, max_nodes)
    assert topk_idx.dtype == torch.int64 and topk_weights.dtype == torch.float32
    nodes = topk_idx // (num_experts // num_nodes)
    distinct_nodes = torch.tensor([len(set(row)) for row in nodes.tolist()])
    assert int(distinct_nodes.max()) <= max_nodes
    assert all(len(set(row)) == num_topk for row in topk_idx.tolist()), "experts of a token are distinct"


@pytest.mark.parametrize("num_experts,num_nodes,max_nodes,num_topk", CASES)
def test_topk_are_the_best_experts_inside_the_chosen_nodes(num_experts, num_nodes, max_nodes, num_topk):
    logits = torch.randn(300, num_experts, generator=torch.Generator().manual_seed(7))
    bias = torch.randn(num_experts, generator=torch.Generator().manual_seed(8)) * 0.1
    topk_idx, _ = node_limited_topk(logits, num_topk, num_nodes, max_nodes, expert_bias=bias)
    selection = torch.sigmoid(logits) + bias
    experts_per_node = num_experts // num_nodes
    node_topk = max(1, num_topk // max_nodes)
    node_scores = selection.view(300, num_nodes, experts_per_node).topk(node_topk, -1).values.sum(-1)
    for token in range(300):
        allowed_nodes = set(node_scores[token].topk(max_nodes).indices.tolist())
        allowed = [e for e in range(num_experts) if e // experts_per_node in allowed_nodes]
        best = sorted(allowed, key=lambda e: -float(selection[token, e]))[:num_topk]
        assert set(topk_idx[token].tolist()) == set(best)


def test_weights_sum_to_one_and_come_from_unbiased_scores():
    logits = torch.randn(200, 64)
    bias = torch.randn(64)
    topk_idx, topk_weights = node_limited_topk(logits, 8, 8, 4, expert_bias=bias)
    assert torch.allclose(topk_weights.sum(-1), torch.ones(200), atol=1e-6)
    raw = torch.sigmoid(logits).gather(1, topk_idx)
    assert torch.allclose(topk_weights, raw / raw.sum(-1, keepdim=True), atol=1e-6)
    _, scaled = node_limited_topk(logits, 8, 8, 4, expert_bias=bias, routed_scaling_factor=2.5)
    assert torch.allclose(scaled.sum(-1), torch.full((200,), 2.5), atol=1e-5)
    _, unnormalized = node_limited_topk(logits, 8, 8, 4, expert_bias=bias, normalize=False)
    assert torch.allclose(unnormalized, raw)


def test_bias_steers_selection_only():
    logits = torch.zeros(10, 16)
    bias = torch.zeros(16)
    bias[3] = 10.0
    topk_idx, topk_weights = node_limited_topk(logits, 2, 4, 2, expert_bias=bias)
    assert bool((topk_idx == 3).any(dim=1).all())
    assert torch.allclose(topk_weights, torch.full((10, 2), 0.5))


def test_bias_update_balances_load_over_steps():
    generator = torch.Generator().manual_seed(0)
    skew = torch.linspace(2, -2, 32)  # expert 0 is far more attractive than expert 31
    bias = torch.zeros(32)
    first_imbalance = None
    for _ in range(300):
        logits = torch.randn(512, 32, generator=generator) + skew
        topk_idx, _ = node_limited_topk(logits, 4, 4, 2, expert_bias=bias)
        load = expert_load(topk_idx, 32)
        imbalance = float(load.max()) / float(load.float().mean())
        first_imbalance = first_imbalance or imbalance
        bias = update_expert_bias(bias, load, 0.01)
    assert imbalance < 0.5 * first_imbalance, (first_imbalance, imbalance)


def test_bias_update_direction():
    bias = update_expert_bias(torch.zeros(4), torch.tensor([10, 0, 5, 5]), 0.1)
    assert torch.allclose(bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))


def test_expert_load_ignores_minus_one():
    assert expert_load(torch.tensor([[0, -1], [0, 3]]), 4).tolist() == [2, 0, 0, 1]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_topk=8, num_nodes=5, max_nodes=2), "num_nodes"),
        (dict(num_topk=8, num_nodes=8, max_nodes=0), "max_nodes"),
        (dict(num_topk=8, num_nodes=8, max_nodes=9), "max_nodes"),
        (dict(num_topk=17, num_nodes=8, max_nodes=2), "num_topk"),
        (dict(num_topk=8, num_nodes=8, max_nodes=2, node_score_topk=9), "node_score_topk"),
        (dict(num_topk=8, num_nodes=8, max_nodes=2, expert_bias=torch.zeros(3)), "expert_bias"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        node_limited_topk(torch.randn(4, 64), **kwargs)


def test_bad_logits():
    with pytest.raises(TypeError, match="logits"):
        node_limited_topk(torch.zeros(4, 64, dtype=torch.int64), 8, 8, 2)
    with pytest.raises(ValueError, match="logits"):
        node_limited_topk(torch.zeros(64), 8, 8, 2)


def test_bad_routing_arguments_name_themselves():
    logits = torch.randn(4, 8)
    for kwargs, error, message in (
        (dict(num_topk=2.5), TypeError, "^num_topk: expected an int"),
        (dict(num_nodes=2.0), TypeError, "^num_nodes: expected an int"),
        (dict(max_nodes=True), TypeError, "^max_nodes: expected an int"),
        (dict(expert_bias=[0.0] * 8), TypeError, "^expert_bias: expected a torch.Tensor"),
        (dict(node_score_topk=1.0), TypeError, "^node_score_topk: expected an int"),
    ):
        args = dict(num_topk=2, num_nodes=2, max_nodes=1) | kwargs
        with pytest.raises(error, match=message):
            node_limited_topk(logits, **args)
    with pytest.raises(ValueError, match=r"^topk_idx: expert ids must lie in \[-1, 8\)"):
        expert_load(torch.tensor([[0, 9]]), 8)
    with pytest.raises(ValueError, match=r"^topk_idx: expert ids must lie in \[-1, 8\)"):
        expert_load(torch.tensor([[0, -2]]), 8)
    with pytest.raises(TypeError, match="^topk_idx: expected an int64"):
        expert_load(torch.tensor([[0, 1]], dtype=torch.int32), 8)
    with pytest.raises(ValueError, match=r"^expert_bias: expected \[E\]"):
        update_expert_bias(torch.zeros(2, 4), torch.zeros(2, 4), 0.1)
    # A bf16 bias would stop moving once |bias| >= 0.5 (steps of 1e-3 round away): refused, not silently stuck.
    with pytest.raises(TypeError, match="^expert_bias: expected float32"):
        update_expert_bias(torch.ones(4, dtype=torch.bfloat16), torch.tensor([10, 0, 0, 0]), 1e-3)
    with pytest.raises(TypeError, match="^expert_bias, expert_load: expected torch.Tensors"):
        update_expert_bias(torch.zeros(4), [1, 2, 3, 4], 0.1)


@pytest.mark.parametrize("bad", [float("-inf"), float("nan"), float("inf")])
def test_a_bias_that_is_not_finite_keeps_the_node_limit(bad):
    # -inf used to tie with the mask of the nodes not chosen (and NaN outranked everything): max_nodes did not hold.
    # Checked without reading the bias on the host (a sync in every routing): -inf and NaN rank an expert last
    # among its node's, +inf first.
    bias = torch.zeros(8)
    bias[[1, 3, 5, 7]] = bad
    logits = torch.randn(3, 8)
    idx, weights = node_limited_topk(logits, 2, 4, 1, expert_bias=bias)  # 4 nodes x 2 experts, 1 node a token
    assert ((idx // 2) == (idx[:, :1] // 2)).all()  # both experts of a token on one node
    assert torch.isfinite(weights).all()
    one, _ = node_limited_topk(logits, 1, 4, 1, expert_bias=bias)  # one expert: the biased ones lose (or win)
    assert ((one % 2) == (1 if bad == float("inf") else 0)).all()
