"""The reference path against its contract, on several processes over gloo.

Each configuration (world size, ranks per node) runs in one set of processes
that goes through every routing, dtype and token-count case, comparing with
the independent single-process simulation bit for bit.
"""

from __future__ import annotations

import time

import pytest
import torch

import deepcomm
from cases import ROUTINGS, RankInputs, make_inputs
from deepcomm import fp8
from deepcomm.events import EventHandle
from deepcomm.checks import expected_round_trip
from deepcomm.simulation import simulate_combine, simulate_dispatch
from dist import run_ranks

HIDDEN = 256
NUM_TOPK = 6


def _token_counts(seed: int, world_size: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 24, (world_size,), generator=generator).tolist()
    counts[seed % world_size] = 0  # some rank has no tokens at all
    return counts


def _same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    actual, expected = actual.cpu(), expected.cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert torch.equal(actual.contiguous().view(torch.uint8), expected.contiguous().view(torch.uint8)), what


def _contract_worker(rank: int, world_size: int, ranks_per_node: int, device: torch.device | None = None,
                     hidden: int = HIDDEN) -> None:
    """Runs every case on ``device`` (default CPU); the simulation runs on the CPU."""
    device = device or torch.device("cpu")
    comm = deepcomm.Communicator(ranks_per_node=ranks_per_node, backend="reference")
    topo = comm.topology
    num_experts = 4 * world_size
    for seed, routing in enumerate(ROUTINGS):
        counts = _token_counts(seed, world_size)
        inputs = [
            make_inputs(seed, r, counts[r], hidden, NUM_TOPK, num_experts, routing, topo.num_nodes)
            for r in range(world_size)
        ]
        mine = RankInputs(*(t.to(device) for t in (inputs[rank].x, inputs[rank].topk_idx, inputs[rank].topk_weights)))
        for mode in ("bf16", "fp8", "quantize_in_dispatch"):
            where = f"{routing}/{mode}/rank{rank}"
            if mode == "bf16":
                result = comm.dispatch(mine.x, mine.topk_idx, mine.topk_weights, num_experts)
                xs, scales = [i.x for i in inputs], None
            else:
                quantized = [fp8.quantize_fp8(i.x) for i in inputs]
                xs, scales = [q for q, _ in quantized], [s for _, s in quantized]
                if mode == "fp8":
                    result = comm.dispatch(
                        xs[rank].to(device), mine.topk_idx, mine.topk_weights, num_experts,
                        x_scales=scales[rank].to(device),
                    )
                else:
                    result = comm.dispatch(mine.x, mine.topk_idx, mine.topk_weights, num_experts, quantize_fp8=True)
            sim = simulate_dispatch(xs, scales, [i.topk_idx for i in inputs], [i.topk_weights for i in inputs],
                                    num_experts)
            expected = sim[rank]
            _same_bits(result.x, expected.x, f"{where}: received x")
            if scales is not None:
                _same_bits(result.x_scales, expected.x_scales, f"{where}: received scales")
            else:
                assert result.x_scales is None
            _same_bits(result.topk_idx, expected.topk_idx, f"{where}: local topk_idx")
            _same_bits(result.topk_weights, expected.topk_weights, f"{where}: topk_weights")
            _same_bits(result.num_tokens_per_expert, expected.num_tokens_per_expert, f"{where}: per-expert counts")
            assert result.num_recv_tokens_per_expert_list == expected.num_tokens_per_expert.tolist(), where
            assert result.num_recv_tokens_per_rank == [
                sum(1 for src, _ in expected.sources if src == r) for r in range(world_size)
            ], where
            assert result.event.query()

        # Combine of arbitrary expert outputs equals the simulation, bit for bit.
        expert_outs = []
        for r in range(world_size):
            generator = torch.Generator().manual_seed(seed * 7919 + r)
            expert_outs.append(torch.randn(sim[r].x.shape[0], hidden, generator=generator).to(torch.bfloat16))
        result = comm.dispatch(mine.x, mine.topk_idx, mine.topk_weights, num_experts)
        combined = comm.combine(expert_outs[rank].to(device), result.handle)
        expected_y = simulate_combine(expert_outs, sim, counts, topo)[rank]
        _same_bits(combined, expected_y, f"{routing}: combine")
        # The same rows written into combine_input (a plain tensor here) combine the same.
        rows_in = comm.combine_input(result.handle)
        assert rows_in.dtype == torch.bfloat16 and rows_in.shape == (result.x.shape[0], hidden)
        _same_bits(comm.combine(rows_in.copy_(expert_outs[rank]), result.handle), expected_y, f"{routing}: combine_input")
        with pytest.raises(TypeError, match="^handle:"):
            comm.combine_input(object())

        # Round trip: every rank returns the row it received.
        round_trip = comm.combine(result.x, result.handle)
        _same_bits(round_trip, expected_round_trip(mine.x, mine.topk_idx, num_experts, topo), f"{routing}: round trip")

        # Async shape: previous events are honoured, returned events complete.
        async_result = comm.dispatch_async(
            mine.x, mine.topk_idx, mine.topk_weights, num_experts, previous_event=EventHandle.record(mine.x.device)
        )
        async_result.event.wait()
        y, event = comm.combine_async(async_result.x, async_result.handle, previous_event=async_result.event)
        event.synchronize()
        _same_bits(y, round_trip, f"{routing}: async round trip")


@pytest.mark.parametrize(
    "world_size,ranks_per_node", [(2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (8, 2), (8, 4)]
)
def test_dispatch_and_combine_match_simulation(world_size: int, ranks_per_node: int) -> None:
    run_ranks(_contract_worker, world_size, ranks_per_node)


def test_one_scale_column_and_a_rank_without_tokens() -> None:
    """Hidden 128: fp8 scales are [T, 1], and a rank with no tokens has [0, 1] scales (odd strides)."""
    run_ranks(_contract_worker, 2, 2, None, 128)


def _skipping_rank_worker(rank: int, world_size: int, timeout_s: float) -> None:
    comm = deepcomm.Communicator(ranks_per_node=1, backend="reference")
    if rank == world_size - 1:
        time.sleep(timeout_s * 3)  # alive but never joins the dispatch
        return
    x = torch.randn(8, 128).to(torch.bfloat16)
    topk_idx = torch.arange(8 * 2).view(8, 2) % (2 * world_size)
    start = time.monotonic()
    with pytest.raises(deepcomm.CommunicationError) as info:
        comm.dispatch(x, topk_idx, torch.rand(8, 2), 2 * world_size)
    elapsed = time.monotonic() - start
    assert info.value.rank == rank
    assert info.value.stage == "dispatch/counts"
    assert f"rank {rank}: stage 'dispatch/counts'" in str(info.value)
    assert elapsed < timeout_s * 2.5, f"waited {elapsed:.1f}s with a {timeout_s}s timeout"


def test_rank_that_skips_a_call_makes_peers_raise_in_bounded_time() -> None:
    run_ranks(_skipping_rank_worker, 2, 3.0, timeout_s=3.0)
