"""Intranode kernels against the reference path, bit for bit, with ranks sharing the GPU(s).

Ranks outnumbering GPUs need CUDA MPS (python -m deepcomm.launch or
tools/gpu_check.sh start it); without it these tests skip instead of crawling.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

import deepcomm
from deepcomm import fp8, landing
from cases import ROUTINGS, make_inputs
from dist import run_ranks
from kernel_checks import a_differing_dispatch, combine_from_combine_input, dispatch_both as _dispatch_both
from kernel_checks import refused_at_notify
from kernel_checks import require_ranks as _require, same_bits as _same_bits

pytestmark = pytest.mark.gpu

HIDDEN = 512
NUM_TOPK = 6
MAX_TOKENS = 96


def _communicator(combine: str = "auto", **kwargs) -> deepcomm.Communicator:
    """combine: "auto" (the default config: combines pull) or "push" (every combine pushes, in chunks
    of a few rows, so that each pair of ranks moves several)."""
    torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    push = {}
    if combine == "push":
        push = {"push_combine_min_bytes": 0}
        landing.MIN_CHUNK_BYTES = 4 * 2 * HIDDEN  # this process only (run_ranks spawns the ranks)
    config = deepcomm.BufferConfig(max_tokens_per_rank=MAX_TOKENS, hidden=HIDDEN, num_topk=8, **push)
    comm = deepcomm.Communicator(backend="intranode", buffer=config, **kwargs)
    assert comm.backend == "intranode"
    return comm


def _poison_receive_slots(comm: deepcomm.Communicator) -> None:
    """Fill this rank's slots with 0xFF, after every rank finished reading them."""
    torch.cuda.synchronize()
    dist.barrier()
    impl = comm._impl
    impl.buffer[impl.kernels.DATA_OFFSET :].fill_(0xFF)
    torch.cuda.synchronize()
    dist.barrier()


def _poison_landing(comm: deepcomm.Communicator) -> None:
    """Fill this rank's landing area with 0xFF once every rank is between combines: a pushed combine that
    read a row before its chunk landed then gives NaNs, not last call's (equal) row."""
    torch.cuda.synchronize()
    dist.barrier()
    comm._impl.buffer[comm._impl.landing_offset :].fill_(0xFF)
    torch.cuda.synchronize()
    dist.barrier()


def _agreement_worker(rank: int, world_size: int, combine: str) -> None:
    comm = _communicator(combine)
    device = torch.device("cuda", torch.cuda.current_device())
    num_experts = 8 * world_size
    for seed, routing in enumerate(ROUTINGS):
        generator = torch.Generator().manual_seed(seed)
        num_tokens = [int(v) for v in torch.randint(1, MAX_TOKENS + 1, (world_size,), generator=generator)]
        num_tokens[seed % world_size] = 0  # a rank with no tokens
        local = make_inputs(seed, rank, num_tokens[rank], HIDDEN, NUM_TOPK, num_experts, routing, 1)
        local.x, local.topk_idx, local.topk_weights = (t.to(device) for t in (local.x, local.topk_idx, local.topk_weights))
        for mode, num_sms in (("bf16", 24), ("bf16", 1), ("fp8", 3), ("quantize", 24), ("quantize_pow2", 5)):
            where = f"{routing}/{mode}/sms{num_sms}/rank{rank}"
            _poison_receive_slots(comm)
            ours, theirs = _dispatch_both(comm, local, mode, num_experts, num_sms)
            torch.cuda.synchronize()
            for name in ("x", "x_scales", "topk_idx", "topk_weights", "num_tokens_per_expert"):
                _same_bits(getattr(ours, name), getattr(theirs, name), f"{where}: {name}")
            assert ours.num_recv_tokens_per_rank == theirs.num_recv_tokens_per_rank, where
            # The host's copy of the per-expert counts, read in the same wait as the row counts.
            assert ours.num_recv_tokens_per_expert_list == theirs.num_tokens_per_expert.tolist(), where

        # Combine of arbitrary rows, staged from outside the buffer, and in place (round trip).
        # The oracle is the reference path on CPU tensors.
        ours, _ = _dispatch_both(comm, local, "bf16", num_experts, 24)
        cpu = comm.reference.dispatch(local.x.cpu(), local.topk_idx.cpu(), local.topk_weights.cpu(), num_experts)
        expert_out = torch.randn(ours.x.shape, generator=generator).to(torch.bfloat16)
        expected = comm.reference.combine(expert_out, cpu.handle)
        expected_round_trip = comm.reference.combine(cpu.x, cpu.handle)
        expert_out = expert_out.to(device)
        for num_sms in (24, 2):
            if combine == "push":
                _poison_landing(comm)
            y = comm.combine(expert_out, ours.handle, num_sms=num_sms)
            comm.check_errors()
            _same_bits(y, expected, f"{routing}: combine sms{num_sms}")
        _same_bits(comm.combine(ours.x, ours.handle), expected_round_trip, f"{routing}: round trip from the slot")
        # Outputs written where combine reads them, over an fp8 dispatch's slot (a different layout).
        ours_fp8, _ = _dispatch_both(comm, local, "fp8", num_experts, 24)
        combine_from_combine_input(comm, ours_fp8.handle, expert_out, expected, f"{routing}: combine_input")

        # Async: chained by events, the caller's stream never waits on its own.
        first = comm.dispatch_async(local.x, local.topk_idx, local.topk_weights, num_experts,
                                    previous_event=deepcomm.EventHandle.record(device))
        y, event = comm.combine_async(first.x, first.handle, previous_event=first.event)
        event.wait()
        _same_bits(y, expected_round_trip, f"{routing}: async round trip")
        comm.dispatch(local.x, local.topk_idx, local.topk_weights, num_experts)  # its slot again
        with pytest.raises(ValueError, match="^handle: 2 dispatches ran since"):
            comm.combine_input(ours_fp8.handle)
    torch.cuda.synchronize()
    dist.barrier()


@pytest.mark.parametrize("world_size, combine", [(2, "auto"), (4, "auto"), (8, "auto"), (2, "push"), (3, "push"),
                                                (4, "push"), (8, "push")])
def test_dispatch_and_combine_match_reference_bit_for_bit(world_size, combine):
    _require(world_size)
    run_ranks(_agreement_worker, world_size, combine)


def _repeat_worker(rank: int, world_size: int, calls: int, combine: str = "auto") -> None:
    comm = _communicator(combine)
    device = torch.device("cuda", torch.cuda.current_device())
    inputs = make_inputs(5, rank, MAX_TOKENS, HIDDEN, NUM_TOPK, 8 * world_size, "uniform", 1)
    x, topk_idx, topk_weights = (t.to(device) for t in (inputs.x, inputs.topk_idx, inputs.topk_weights))
    expected = None
    for call in range(calls):
        result = comm.dispatch(x, topk_idx, topk_weights, 8 * world_size)
        # Pushed: every other call combines the rows doubled (exact in bf16, and so is the sum), so that a
        # row read before its chunk landed (last call's) shows; those calls are all checked.
        doubled = combine == "push" and call % 2 == 1
        y = comm.combine(result.x * 2 if doubled else result.x, result.handle)
        if call == 10:
            expected = y.clone()
            torch.cuda.synchronize()
            memory = torch.cuda.memory_allocated()
        elif call > 10 and (call % 100 == 0 or combine == "push"):
            assert torch.equal(y, expected * 2 if doubled else expected), f"call {call}: combine changed"
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= memory, "memory grew over repeated calls"
    assert torch.equal(y, expected * 2 if doubled else expected)
    dist.barrier()


def test_a_thousand_calls_keep_memory_flat_and_results_fixed():
    _require(2)
    run_ranks(_repeat_worker, 2, 1000)


def test_pushed_combines_repeat_with_memory_flat_and_results_fixed():
    """The chunk counts only grow: owners and pushers keep agreeing on them call after call."""
    _require(3)
    run_ranks(_repeat_worker, 3, 301, "push")


def _close_worker(rank: int, world_size: int) -> None:
    comm = _communicator()
    device = torch.device("cuda", torch.cuda.current_device())
    inputs = make_inputs(3, rank, MAX_TOKENS, HIDDEN, NUM_TOPK, 8 * world_size, "uniform", 1)
    x, topk_idx, topk_weights = (t.to(device) for t in (inputs.x, inputs.topk_idx, inputs.topk_weights))
    result = comm.dispatch(x, topk_idx, topk_weights, 8 * world_size)
    comm.combine_async(result.x, result.handle)  # still in flight: close waits for it
    comm.close()
    with pytest.raises(RuntimeError, match="closed"):
        comm.dispatch(x, topk_idx, topk_weights, 8 * world_size)
    torch.cuda.synchronize()  # no fault from the unmapped buffers


def test_close_waits_for_the_kernels_then_every_call_raises():
    _require(2)
    run_ranks(_close_worker, 2)


def _skipping_rank_worker(rank: int, world_size: int) -> None:
    comm = _communicator(timeout_s=2.0)
    device = torch.device("cuda", torch.cuda.current_device())
    inputs = make_inputs(3, rank, 16, HIDDEN, NUM_TOPK, 8 * world_size, "uniform", 1)
    x, topk_idx, topk_weights = (t.to(device) for t in (inputs.x, inputs.topk_idx, inputs.topk_weights))
    comm.dispatch(x, topk_idx, topk_weights, 8 * world_size)  # everyone takes part once
    torch.cuda.synchronize()
    if rank == world_size - 1:
        time.sleep(12)  # alive, but skips the next call; leaves last
        return
    start = time.monotonic()
    with pytest.raises(deepcomm.CommunicationError) as info:
        comm.dispatch(x, topk_idx, topk_weights, 8 * world_size)
    elapsed = time.monotonic() - start
    assert info.value.stage == "notify" and info.value.peer == world_size - 1 and info.value.rank == rank
    assert f"waiting for rank {world_size - 1}" in str(info.value)
    assert elapsed < 6.0, f"gave up after {elapsed:.1f}s with a 2s timeout"
    with pytest.raises(deepcomm.CommunicationError):  # the communicator stays failed
        comm.dispatch(x, topk_idx, topk_weights, 8 * world_size)
    # Peers' kernels still give up on their own waits; stay until they have, so no kernel
    # writes into a buffer whose process is gone.
    torch.cuda.synchronize()
    time.sleep(4)


def test_a_rank_that_skips_a_call_makes_the_others_raise_naming_it():
    _require(3)
    run_ranks(_skipping_rank_worker, 3, timeout_s=60)


def _bad_input_worker(rank: int, world_size: int) -> None:
    comm = _communicator()
    device = torch.device("cuda", torch.cuda.current_device())
    x = torch.randn(MAX_TOKENS + 1, HIDDEN, device=device).to(torch.bfloat16)
    topk_idx = torch.zeros(MAX_TOKENS + 1, 2, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="^x: .*max_tokens_per_rank"):
        comm.dispatch(x, topk_idx, torch.rand(MAX_TOKENS + 1, 2, device=device), 8 * world_size)
    with pytest.raises(ValueError, match="^x: expected a tensor on cuda"):
        comm.dispatch(x.cpu(), topk_idx, torch.rand(MAX_TOKENS + 1, 2, device=device), 8 * world_size)
    small = x[:4].contiguous()
    result = comm.dispatch(small, topk_idx[:4].contiguous(), torch.rand(4, 2, device=device), 8 * world_size)
    with pytest.raises(TypeError, match="^handle:"):
        comm.combine(result.x, object())
    with pytest.raises(ValueError, match="^num_sms:"):
        comm.dispatch(small, topk_idx[:4].contiguous(), torch.rand(4, 2, device=device), 8 * world_size, num_sms=0)
    # An out-of-range id on one rank is found on the GPU; every rank raises, nobody dispatches...
    bad_idx = topk_idx[:4].clone()
    if rank == 0:
        bad_idx[2, 1] = 8 * world_size
    with pytest.raises(ValueError, match="^topk_idx: .*rank 0 passed 1 invalid"):
        comm.dispatch(small, bad_idx, torch.rand(4, 2, device=device), 8 * world_size)
    # ... and the communicator stays usable.
    good = comm.dispatch(small, topk_idx[:4].contiguous(), torch.ones(4, 2, device=device), 8 * world_size)
    assert good.x.shape[0] == (4 * world_size if rank == 0 else 0)
    torch.cuda.synchronize()
    dist.barrier()


def _caller_known_sizes_worker(rank: int, world_size: int, combine: str = "auto") -> None:
    comm = _communicator(combine)
    device = torch.device("cuda", torch.cuda.current_device())
    inputs = make_inputs(9, rank, 40, HIDDEN, NUM_TOPK, 8 * world_size, "skewed", 1)
    x, topk_idx, topk_weights = (t.to(device) for t in (inputs.x, inputs.topk_idx, inputs.topk_weights))
    waited = comm.dispatch(x, topk_idx, topk_weights, 8 * world_size)
    rows = waited.x.shape[0]
    expected_x, expected_y = waited.x.clone(), comm.combine(waited.x, waited.handle)
    known = comm.dispatch(x, topk_idx, topk_weights, 8 * world_size, num_recv_tokens=rows)
    assert known.num_recv_tokens_per_rank is None
    _same_bits(known.x, expected_x, "x with caller-known size")
    _same_bits(comm.combine(known.x, known.handle), expected_y, "combine with caller-known size")
    again = comm.dispatch(x, topk_idx, topk_weights, 8 * world_size)  # with pushing on, a push after a pull
    _same_bits(comm.combine(again.x, again.handle), expected_y, "combine after a caller-known size")
    torch.cuda.synchronize()
    comm.check_errors()
    comm.dispatch(x, topk_idx, topk_weights, 8 * world_size, num_recv_tokens=rows + 1)  # wrong: found on the GPU
    torch.cuda.synchronize()
    with pytest.raises(deepcomm.CommunicationError, match=f"num_recv_tokens was wrong: {rows} rows arrived"):
        comm.check_errors()
    dist.barrier()


def test_caller_known_sizes_skip_the_wait_and_are_checked_on_the_gpu():
    _require(2)
    run_ranks(_caller_known_sizes_worker, 2)


def test_combines_that_push_and_pull_alternate():
    """With pushing on, a dispatch that waited pushes its combine and one given num_recv_tokens pulls."""
    _require(2)
    run_ranks(_caller_known_sizes_worker, 2, "push")


def _mixed_push_worker(rank: int, world_size: int) -> None:
    comm = _communicator("push", timeout_s=5.0)
    device = torch.device("cuda", torch.cuda.current_device())
    inputs = make_inputs(4, rank, 40, HIDDEN, NUM_TOPK, 8 * world_size, "uniform", 1)
    x, topk_idx, topk_weights = (t.to(device) for t in (inputs.x, inputs.topk_idx, inputs.topk_weights))
    rows = comm.dispatch(x, topk_idx, topk_weights, 8 * world_size).x.shape[0]
    # Rank 0 alone gives num_recv_tokens: it has no counts on the host and pulls where the others push.
    result = comm.dispatch(x, topk_idx, topk_weights, 8 * world_size, num_recv_tokens=rows if rank == 0 else None)
    assert (comm._impl.push_plan(result.handle) is None) == (rank == 0)
    start = time.monotonic()
    comm.combine(result.x, result.handle)
    torch.cuda.synchronize()
    with pytest.raises(deepcomm.CommunicationError) as info:
        comm.check_errors()
    assert info.value.stage == "combine_ready" and "pulls this combine's rows where this rank pushes" in str(info.value)
    assert info.value.peer == (1 if rank == 0 else 0)
    assert time.monotonic() - start < 5.0, "the disagreement was found at the meeting, not by a timeout"
    dist.barrier()


def test_ranks_that_disagree_on_pushing_a_combine_all_raise():
    _require(3)
    run_ranks(_mixed_push_worker, 3)


def test_intranode_bad_input():
    _require(2)
    run_ranks(_bad_input_worker, 2)


def _reuse_worker(rank: int, world_size: int) -> None:
    comm = _communicator()
    device = torch.device("cuda", torch.cuda.current_device())
    num_experts = 8 * world_size
    for seed, routing in enumerate(ROUTINGS):
        generator = torch.Generator().manual_seed(100 + seed)
        num_tokens = [int(v) for v in torch.randint(1, MAX_TOKENS + 1, (world_size,), generator=generator)]
        num_tokens[seed % world_size] = 0
        local = make_inputs(100 + seed, rank, num_tokens[rank], HIDDEN, NUM_TOPK, num_experts, routing, 1)
        local.x, local.topk_idx, local.topk_weights = (t.to(device) for t in (local.x, local.topk_idx, local.topk_weights))
        first, _ = _dispatch_both(comm, local, "bf16", num_experts, 24)
        for mode, num_sms in (("bf16", 24), ("fp8", 3), ("quantize", 7)):
            where = f"{routing}/{mode}/rank{rank}: reused handle"
            _poison_receive_slots(comm)
            fresh = make_inputs(200 + seed, rank, num_tokens[rank], HIDDEN, NUM_TOPK, num_experts, routing, 1).x.to(device)
            kwargs = {}
            x = fresh
            if mode == "fp8":
                x, kwargs["x_scales"] = fp8.quantize_fp8(fresh)
            elif mode == "quantize":
                kwargs["quantize_fp8"] = True
            reused = comm.dispatch(x, local.topk_idx, local.topk_weights, num_experts, num_sms=num_sms,
                                   handle=first.handle, **kwargs)
            theirs = comm.reference.dispatch(x, local.topk_idx, local.topk_weights, num_experts, **kwargs)
            torch.cuda.synchronize()
            comm.check_errors()
            assert reused.num_recv_tokens_per_rank is None, where  # the host did not wait
            for name in ("x", "x_scales", "topk_idx", "topk_weights", "num_tokens_per_expert"):
                _same_bits(getattr(reused, name), getattr(theirs, name), f"{where}: {name}")
            # Its handle combines like the first one, and can be reused in turn.
            expert_out = theirs.x if mode == "bf16" else fp8.dequantize_fp8(theirs.x, theirs.x_scales)
            expected = comm.reference.combine(expert_out.cpu(), comm.reference.dispatch(
                local.x.cpu(), local.topk_idx.cpu(), local.topk_weights.cpu(), num_experts).handle)
            _same_bits(comm.combine(expert_out, reused.handle), expected, f"{where}: combine")
            first = reused
        # Another tensor with the same ids, or one changed in place, is refused on the host (no call made).
        with pytest.raises(ValueError, match="^handle: a dispatch that reuses a handle takes the topk_idx"):
            comm.dispatch(local.x, local.topk_idx.clone(), local.topk_weights, num_experts, handle=first.handle)
        local.topk_idx.add_(0)
        with pytest.raises(ValueError, match="^topk_idx: modified in place"):
            comm.dispatch(local.x, local.topk_idx, local.topk_weights, num_experts, handle=first.handle)
    torch.cuda.synchronize()
    dist.barrier()


@pytest.mark.parametrize("world_size", [2, 4])
def test_a_reused_handle_dispatches_the_same_rows_without_layout_or_counts(world_size):
    _require(world_size)
    run_ranks(_reuse_worker, world_size)


def _mixed_reuse_worker(rank: int, world_size: int) -> None:
    comm = _communicator(timeout_s=5.0)
    device = torch.device("cuda", torch.cuda.current_device())
    local = make_inputs(7, rank, 32, HIDDEN, NUM_TOPK, 8 * world_size, "uniform", 1)
    x, topk_idx, topk_weights = (t.to(device) for t in (local.x, local.topk_idx, local.topk_weights))
    first = comm.dispatch(x, topk_idx, topk_weights, 8 * world_size)
    # Rank 0 reuses its handle, the others route anew: nobody may dispatch, every rank must say why.
    with pytest.raises(deepcomm.CommunicationError, match="disagree on reusing a handle"):
        handle = first.handle if rank == 0 else None
        comm.dispatch(x, topk_idx, topk_weights, 8 * world_size, handle=handle)
        torch.cuda.synchronize()
        comm.check_errors()
    dist.barrier()


def test_ranks_that_disagree_on_reusing_a_handle_all_raise():
    _require(2)
    run_ranks(_mixed_reuse_worker, 2)


def _shape_mismatch_worker(rank: int, world_size: int, differs: str) -> None:
    comm = _communicator(timeout_s=30.0)
    device = torch.device("cuda", torch.cuda.current_device())
    local = make_inputs(8, rank, 32, HIDDEN, NUM_TOPK, 8 * world_size, "uniform", 1)
    x, topk_idx, topk_weights = (t.to(device) for t in (local.x, local.topk_idx, local.topk_weights))
    comm.dispatch(x, topk_idx, topk_weights, 8 * world_size)  # one good call first
    _poison_receive_slots(comm)
    x, kwargs = a_differing_dispatch(x, differs, num_sms=2) if rank == 1 else (x, {})
    impl = comm._impl
    refused_at_notify(lambda: comm.dispatch(x, topk_idx, topk_weights, 8 * world_size, **kwargs),
                      [1 - rank], impl.buffer[impl.kernels.DATA_OFFSET :], f"rank {rank}")
    dist.barrier()


@pytest.mark.parametrize("differs", ["hidden", "num_sms", "row format"])
def test_ranks_whose_dispatch_shapes_differ_all_raise_at_once_and_nothing_moves(differs):
    """Without check_calls: the notify compares each rank's call shape (hidden size, K, row format, experts,
    blocks) with its peers' and nobody dispatches (silent garbage or a timeout before)."""
    _require(2)
    run_ranks(_shape_mismatch_worker, 2, differs)
