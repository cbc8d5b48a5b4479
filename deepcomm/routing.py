"""Node-limited top-k gating as in DeepSeek-V3.

Affinities are sigmoids of the router logits. A per-expert bias, used only to
*select* experts (never to weight them), balances load without an auxiliary
loss; :func:`update_expert_bias` is its update rule. Each token first picks at
most ``max_nodes`` nodes, ranked by the sum of each node's
``node_score_topk`` highest biased affinities, then its top-K experts inside
those nodes. Weights are the unbiased affinities of the chosen experts,
normalised to sum to 1 and multiplied by ``routed_scaling_factor``.

Experts are placed as dispatch places them: expert ``e`` lives on rank
``e // (E / world_size)`` and so on node ``e // (E / num_nodes)``.
"""

from __future__ import annotations

import torch


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")


# What a bias that is not finite counts as: far beyond any score, yet summed over a node's experts still finite.
_FINITE_BIAS = 1e30


def node_limited_topk(
    logits: torch.Tensor,
    num_topk: int,
    num_nodes: int,
    max_nodes: int,
    expert_bias: torch.Tensor | None = None,
    node_score_topk: int | None = None,
    routed_scaling_factor: float = 1.0,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route tokens to ``num_topk`` experts on at most ``max_nodes`` nodes.

    Args:
        logits: ``[T, E]`` router logits (any float dtype; computed in float32).
        num_topk: experts per token, K.
        num_nodes: nodes the E experts are spread over (``E % num_nodes == 0``).
        max_nodes: M, the most nodes a token may reach.
        expert_bias: ``[E]`` float32 selection bias (auxiliary-loss-free balancing), or None.
        node_score_topk: how many of a node's best affinities rank the node;
            default ``max(1, K // M)`` (DeepSeek-V3: K/M highest scores per node).
        routed_scaling_factor: multiplies the normalised weights.
        normalize: divide weights by their sum over the chosen experts.

    Returns:
        ``topk_idx`` ``[T, K]`` int64 and ``topk_weights`` ``[T, K]`` float32.
    """
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
        raise TypeError("logits: expected a floating-point torch.Tensor")
    if logits.dim() != 2:
        raise ValueError(f"logits: expected [tokens, experts], got shape {list(logits.shape)}")
    num_tokens, num_experts = logits.shape
    for name, value in (("num_topk", num_topk), ("num_nodes", num_nodes), ("max_nodes", max_nodes)):
        _check_int(name, value)
    if node_score_topk is not None:
        _check_int("node_score_topk", node_score_topk)
    if num_nodes <= 0 or num_experts % num_nodes != 0:
        raise ValueError(f"num_nodes: must divide the expert count {num_experts}, got {num_nodes}")
    experts_per_node = num_experts // num_nodes
    if not 1 <= max_nodes <= num_nodes:
        raise ValueError(f"max_nodes: must lie in [1, {num_nodes}], got {max_nodes}")
    if not 1 <= num_topk <= max_nodes * experts_per_node:
        raise ValueError(
            f"num_topk: must lie in [1, max_nodes * experts_per_node = {max_nodes * experts_per_node}], got {num_topk}"
        )
    if node_score_topk is None:
        node_score_topk = max(1, num_topk // max_nodes)
    if not 1 <= node_score_topk <= experts_per_node:
        raise ValueError(f"node_score_topk: must lie in [1, {experts_per_node}], got {node_score_topk}")

    scores = torch.sigmoid(logits.float())
    selection = scores
    if expert_bias is not None:
        if not isinstance(expert_bias, torch.Tensor):
            raise TypeError(f"expert_bias: expected a torch.Tensor [E] or None, got {type(expert_bias).__name__}")
        if expert_bias.shape != (num_experts,):
            raise ValueError(f"expert_bias: expected shape [{num_experts}], got {list(expert_bias.shape)}")
        # Not-allowed experts are masked with -inf below: a bias that is not finite would tie with (or, NaN,
        # outrank) the mask, and the top-k would pick experts on nodes the token did not choose. Made finite on
        # the device (checking it would read it on the host, a sync in every routing): -inf and NaN keep an
        # expert last among its allowed ones, +inf first.
        bias = expert_bias.to(device=scores.device, dtype=torch.float32)
        selection = scores + bias.nan_to_num(nan=-_FINITE_BIAS, posinf=_FINITE_BIAS, neginf=-_FINITE_BIAS)

    per_node = selection.view(num_tokens, num_nodes, experts_per_node)
    node_scores = per_node.topk(node_score_topk, dim=-1).values.sum(dim=-1)
    chosen_nodes = node_scores.topk(max_nodes, dim=-1).indices
    node_allowed = torch.zeros(num_tokens, num_nodes, dtype=torch.bool, device=logits.device)
    node_allowed.scatter_(1, chosen_nodes, True)
    expert_allowed = node_allowed.repeat_interleave(experts_per_node, dim=1)
    masked = selection.masked_fill(~expert_allowed, float("-inf"))
    topk_idx = masked.topk(num_topk, dim=-1).indices

    topk_weights = scores.gather(1, topk_idx)
    if normalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    topk_weights = topk_weights * routed_scaling_factor
    return topk_idx.to(torch.int64), topk_weights.contiguous()


def expert_load(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[E]`` int64: how many (token, k) entries chose each expert (``-1`` ignored)."""
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dtype != torch.int64:
        raise TypeError("topk_idx: expected an int64 torch.Tensor")
    _check_int("num_experts", num_experts)
    if topk_idx.numel() and not (-1 <= int(topk_idx.min()) and int(topk_idx.max()) < num_experts):
        raise ValueError(f"topk_idx: expert ids must lie in [-1, {num_experts}) (-1: none)")
    return torch.bincount(topk_idx[topk_idx >= 0].flatten(), minlength=num_experts)


def update_expert_bias(expert_bias: torch.Tensor, expert_load: torch.Tensor, update_rate: float) -> torch.Tensor:
    """Auxiliary-loss-free balancing step (DeepSeek-V3 §2.1.2).

    After each step, lower the bias of overloaded experts and raise that of
    underloaded ones by ``update_rate``: ``b_i += rate * sign(mean(load) - load_i)``.
    ``expert_load`` should be the global load (all-reduce it across ranks first).
    Returns the new bias; the input is not modified.
    """
    if not isinstance(expert_bias, torch.Tensor) or not isinstance(expert_load, torch.Tensor):
        raise TypeError("expert_bias, expert_load: expected torch.Tensors")
    if expert_bias.dtype != torch.float32:
        # Steps of update_rate (DeepSeek-V3: 1e-3) vanish in bf16 once |bias| >= 0.5: balancing would stop silently.
        raise TypeError(f"expert_bias: expected float32 (keep the bias buffer in float32), got {expert_bias.dtype}")
    if expert_bias.dim() != 1:
        raise ValueError(f"expert_bias: expected [E], got shape {list(expert_bias.shape)}")
    if expert_bias.shape != expert_load.shape:
        raise ValueError(
            f"expert_load: expected the shape of expert_bias {list(expert_bias.shape)}, got {list(expert_load.shape)}"
        )
    load = expert_load.to(torch.float32)
    return expert_bias + update_rate * torch.sign(load.mean() - load).to(expert_bias.dtype)
