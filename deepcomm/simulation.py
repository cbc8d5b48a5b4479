"""Single-process simulation of dispatch and combine over all ranks at once.

Written as plain per-token loops, independently of the reference path's
vectorised code, so that each checks the other: given every rank's inputs it
produces every rank's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepcomm.topology import Topology


@dataclass
class SimulatedDispatch:
    """One rank's received data (fields as in DispatchResult) plus the source of each row."""

    x: torch.Tensor
    x_scales: torch.Tensor | None
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    num_tokens_per_expert: torch.Tensor
    sources: list[tuple[int, int]]  # (source rank, source token) per received row


def simulate_dispatch(
    xs: list[torch.Tensor],
    x_scales: list[torch.Tensor] | None,
    topk_idxs: list[torch.Tensor],
    topk_weights: list[torch.Tensor],
    num_experts: int,
) -> list[SimulatedDispatch]:
    world_size = len(xs)
    experts_per_rank = num_experts // world_size
    results = []
    for dest in range(world_size):
        rows, scales, idx_rows, weight_rows, sources = [], [], [], [], []
        for src in range(world_size):
            for token in range(xs[src].shape[0]):
                experts = topk_idxs[src][token].tolist()
                if not any(e >= 0 and e // experts_per_rank == dest for e in experts):
                    continue
                rows.append(xs[src][token])
                if x_scales is not None:
                    scales.append(x_scales[src][token])
                local = [e - dest * experts_per_rank if e >= 0 and e // experts_per_rank == dest else -1 for e in experts]
                idx_rows.append(torch.tensor(local, dtype=torch.int64))
                weight_rows.append(
                    torch.tensor([w if l >= 0 else 0.0 for w, l in zip(topk_weights[src][token].tolist(), local)])
                )
                sources.append((src, token))
        hidden, num_topk = xs[0].shape[1], topk_idxs[0].shape[1]
        x = torch.stack(rows) if rows else torch.empty(0, hidden, dtype=xs[0].dtype)
        idx = torch.stack(idx_rows) if idx_rows else torch.empty(0, num_topk, dtype=torch.int64)
        counts = torch.zeros(experts_per_rank, dtype=torch.int32)
        for e in idx[idx >= 0].tolist():
            counts[e] += 1
        results.append(
            SimulatedDispatch(
                x=x,
                x_scales=(torch.stack(scales) if scales else torch.empty(0, x_scales[0].shape[1]))
                if x_scales is not None
                else None,
                topk_idx=idx,
                topk_weights=torch.stack(weight_rows).float() if weight_rows else torch.empty(0, num_topk),
                num_tokens_per_expert=counts,
                sources=sources,
            )
        )
    return results


def simulate_combine(
    expert_outs: list[torch.Tensor],
    dispatched: list[SimulatedDispatch],
    num_tokens: list[int],
    topology: Topology,
) -> list[torch.Tensor]:
    """Every rank's combine output, reducing per node then across nodes (reference.py's order)."""
    hidden = expert_outs[0].shape[1]
    contributions: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
    for rank, result in enumerate(dispatched):
        for row, source in enumerate(result.sources):
            contributions.setdefault(source, []).append((rank, expert_outs[rank][row].float()))
    outputs = []
    for src in range(len(num_tokens)):
        y = torch.zeros(num_tokens[src], hidden, dtype=torch.bfloat16)
        for token in range(num_tokens[src]):
            node_partials: dict[int, torch.Tensor] = {}
            for rank, value in sorted(contributions.get((src, token), []), key=lambda item: item[0]):
                node = topology.node_of(rank)
                node_partials[node] = value.clone() if node not in node_partials else node_partials[node] + value
            total = None
            for node in sorted(node_partials):
                partial = node_partials[node].to(torch.bfloat16).float()
                total = partial if total is None else total + partial
            if total is not None:
                y[token] = total.to(torch.bfloat16)
        outputs.append(y)
    return outputs
