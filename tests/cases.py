"""Random routings and inputs shared by the tests (every rank can rebuild every rank's inputs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepcomm import fp8
from deepcomm.routing import node_limited_topk

ROUTINGS = ("uniform", "skewed", "empty_experts", "minus_one", "node_limited_1", "node_limited_2")


@dataclass
class RankInputs:
    x: torch.Tensor
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor


def random_topk(
    generator: torch.Generator, num_tokens: int, num_topk: int, num_experts: int, routing: str, num_nodes: int
) -> torch.Tensor:
    """``[T, K]`` int64 expert ids (distinct per token, -1 allowed) following ``routing``."""
    if routing.startswith("node_limited"):
        max_nodes = min(int(routing[-1]), num_nodes)
        experts_per_node = num_experts // num_nodes
        topk = min(num_topk, max_nodes * experts_per_node)
        logits = torch.randn(num_tokens, num_experts, generator=generator)
        idx, _ = node_limited_topk(logits, topk, num_nodes, max_nodes)
        return torch.cat([idx, torch.full((num_tokens, num_topk - topk), -1, dtype=torch.int64)], dim=1)
    scores = torch.rand(num_tokens, num_experts, generator=generator)
    if routing == "skewed":
        # Expert popularity falls off geometrically: a few experts take most tokens.
        scores = scores * torch.pow(0.7, torch.arange(num_experts, dtype=torch.float32))
    elif routing == "empty_experts":
        # Every other rank's experts (and thus some ranks) receive nothing.
        scores[:, num_experts // 2 :] = -1.0
    idx = scores.topk(num_topk, dim=1).indices
    if routing in ("minus_one", "empty_experts"):
        drop = torch.rand(num_tokens, num_topk, generator=generator) < 0.3
        idx = torch.where(drop, -1, idx)
        if num_tokens > 0:
            idx[0] = -1  # a token that goes nowhere
    return idx.to(torch.int64)


def make_inputs(
    seed: int,
    rank: int,
    num_tokens: int,
    hidden: int,
    num_topk: int,
    num_experts: int,
    routing: str,
    num_nodes: int,
) -> RankInputs:
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    x = (torch.randn(num_tokens, hidden, generator=generator) * 3).to(torch.bfloat16)
    topk_idx = random_topk(generator, num_tokens, num_topk, num_experts, routing, num_nodes)
    topk_weights = torch.rand(num_tokens, num_topk, generator=generator)
    return RankInputs(x, topk_idx, topk_weights)


def as_fp8(inputs: RankInputs) -> tuple[torch.Tensor, torch.Tensor]:
    return fp8.quantize_fp8(inputs.x)
