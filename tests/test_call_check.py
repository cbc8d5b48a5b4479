"""Communicator(check_calls=True): ranks that disagree on a call all raise at once, naming the field and rank."""

from __future__ import annotations

import time

import pytest
import torch

import deepcomm
from deepcomm import call_check, fp8
from deepcomm.errors import CommunicationError

T, H, K = 8, 256, 4


def test_the_summary_helpers_read_what_a_call_sends():
    x = torch.zeros(T, H, dtype=torch.bfloat16)
    assert call_check.tensor_dim(x, 1) == H and call_check.tensor_dim(x, -1) == H
    assert call_check.tensor_dim(x, 2) is None and call_check.tensor_dim("x", 0) is None
    assert call_check.row_format(x) == "bfloat16"
    assert call_check.row_format(x, quantize_fp8=True) == "fp8"
    assert call_check.row_format(x.to(fp8.FP8_DTYPE)) == "fp8"
    assert call_check.row_format(None) is None


@pytest.mark.parametrize("value, on", [("1", True), ("yes", True), ("On", True), ("0", False), ("", False)])
def test_the_environment_variable_turns_the_check_on(single_rank_group, monkeypatch, value, on):
    monkeypatch.setenv(call_check.ENV_VAR, value)
    assert deepcomm.Communicator(single_rank_group, backend="reference").check_calls is on
    # An explicit argument wins over the environment.
    assert deepcomm.Communicator(single_rank_group, backend="reference", check_calls=not on).check_calls is not on


def _one_rank_checks_worker(rank: int, world_size: int) -> None:
    with pytest.raises(ValueError, match=r"^check_calls: the ranks differ \(rank 0: True, rank 1: False\)"):
        deepcomm.Communicator(backend="reference", check_calls=rank == 0)


def test_ranks_must_agree_on_checking_their_calls():
    """A rank that checks runs a collective the others would not: the communicator refuses on every rank."""
    from dist import run_ranks

    run_ranks(_one_rank_checks_worker, 2)


def _silent_rank_worker(rank: int, world_size: int) -> None:
    comm = deepcomm.Communicator(backend="reference", check_calls=True)
    x, idx, weights = torch.randn(T, H).to(torch.bfloat16), torch.randint(0, 8, (T, K)), torch.rand(T, K)
    if rank == 1:
        time.sleep(10)  # alive, but never makes the call
        return
    start = time.monotonic()
    with pytest.raises(CommunicationError) as info:
        comm.dispatch(x, idx, weights, 8)
    assert info.value.stage == "dispatch/check" and info.value.rank == 0
    assert time.monotonic() - start < 9, "waited longer than the group's timeout"


def test_a_rank_that_never_calls_is_waited_for_the_groups_timeout():
    from dist import run_ranks

    run_ranks(_silent_rank_worker, 2, timeout_s=4.0)


def test_check_calls_must_be_a_bool(single_rank_group):
    with pytest.raises(TypeError, match="^check_calls: expected a bool or None, got str"):
        deepcomm.Communicator(single_rank_group, backend="reference", check_calls="yes")


def test_one_rank_checks_its_own_arguments_and_runs(single_rank_group):
    comm = deepcomm.Communicator(single_rank_group, backend="reference", check_calls=True)
    x, idx, weights = torch.randn(T, H).to(torch.bfloat16), torch.randint(0, 8, (T, K)), torch.rand(T, K)
    received = comm.dispatch(x, idx, weights, 8)
    assert torch.equal(comm.combine(received.x, received.handle), comm.reference.combine(received.x, received.handle))
    with pytest.raises(ValueError, match="^topk_idx: expert ids must lie in"):
        comm.dispatch(x, torch.full((T, K), 8), weights, 8)


def _expect(rank: int, call, message: str, culprit: int | None = None, error: type = ValueError,
            peer: int | None = None) -> None:
    """``culprit`` (when one rank refused its arguments) raises its own ``error``; every other rank a
    CommunicationError naming ``peer`` (the culprit by default), well within the 60 s timeout the
    communicators wait for a silent peer."""
    start = time.monotonic()
    if rank == culprit:
        with pytest.raises(error, match=message):
            call()
        return
    with pytest.raises(CommunicationError, match=message) as info:
        call()
    assert info.value.peer == (culprit if peer is None else peer), info.value
    assert info.value.stage.endswith("/check") and time.monotonic() - start < 30


def _disagreeing_calls_worker(rank: int, world_size: int) -> None:
    comm = deepcomm.Communicator(backend="reference", timeout_s=60.0, check_calls=True)
    unchecked = deepcomm.Communicator(backend="reference", timeout_s=60.0)
    experts = 8 * world_size
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(T, H, generator=generator).to(torch.bfloat16)
    idx = torch.randint(0, experts, (T, K), generator=generator)
    weights = torch.rand(T, K, generator=generator)

    # A good round trip gives what the unchecked communicator gives, bit for bit.
    first = comm.dispatch(x, idx, weights, experts)
    expected = unchecked.dispatch(x, idx, weights, experts)
    assert torch.equal(first.x, expected.x) and torch.equal(first.topk_idx, expected.topk_idx)
    assert torch.equal(comm.combine(first.x, first.handle), unchecked.combine(expected.x, expected.handle))

    # One rank's num_sms differs (the kernels would wait out their timeout): every rank names it.
    # Every rank names rank 2: the value most ranks share is taken as the right one.
    _expect(rank, lambda: comm.dispatch(x, idx, weights, experts, num_sms=5 if rank == 2 else None),
            r"num_sms differs between the ranks \(rank 0: 24, rank 1: 24, rank 2: 5\)", peer=2)

    # A hidden size that differs on rank 1 (its rows would be read at the others' width).
    wide = torch.randn(T, 2 * H, generator=generator).to(torch.bfloat16)
    _expect(rank, lambda: comm.dispatch(wide if rank == 1 else x, idx, weights, experts),
            r"hidden size differs between the ranks \(rank 0: 256, rank 1: 512, rank 2: 256\)", peer=1)

    # Bad expert outputs on rank 1: its own ValueError there, at once on the others (unchecked, combine leaves
    # them to their timeout).
    second = comm.dispatch(x, idx, weights, experts)
    bad_rows = second.x[:-1] if rank == 1 else second.x
    _expect(rank, lambda: comm.combine(bad_rows, second.handle), "expert_out: expected shape", culprit=1)

    # Rank 0 combines while the others dispatch: every rank names rank 0.
    _expect(rank, lambda: comm.combine(second.x, second.handle) if rank == 0 else comm.dispatch(x, idx, weights, experts),
            r"call differs between the ranks \(rank 0: 'combine', rank 1: 'dispatch', rank 2: 'dispatch'\); "
            "every rank must make the same calls", peer=0)
    # A closed communicator on rank 2 (close() is collective; here one rank closed alone): named at once.
    lone = deepcomm.Communicator(backend="reference", check_calls=True)
    if rank == 2:
        lone.close()
    _expect(rank, lambda: lone.dispatch(x, idx, weights, experts), "closed", culprit=2, error=RuntimeError)
    # A per-call argument every backend checks first (num_sms), refused on rank 1.
    _expect(rank, lambda: comm.dispatch(x, idx, weights, experts, num_sms=0 if rank == 1 else None), "num_sms",
            culprit=1)

    # Rank 2 combines the handle of an earlier dispatch than its peers'.
    third = comm.dispatch(x, idx, weights, experts)
    older = second if rank == 2 else third
    _expect(rank, lambda: comm.combine(older.x, older.handle),
            r"handle of dispatch number differs between the ranks \(rank 0: 3, rank 1: 3, rank 2: 2\)", peer=2)

    # Refused dispatch arguments on rank 2 (an id out of range only it can see).
    bad_idx = idx.clone()
    bad_idx[0, 0] = experts
    _expect(rank, lambda: comm.dispatch(x, bad_idx if rank == 2 else idx, weights, experts),
            "topk_idx: expert ids must lie in", culprit=2)

    # Every rank is still in step: the next round trip runs.
    last = comm.dispatch(x, idx, weights, experts)
    assert torch.equal(comm.combine(last.x, last.handle), unchecked.combine(expected.x, expected.handle))


def test_ranks_that_disagree_on_a_call_all_raise_at_once_naming_the_field_and_rank():
    from dist import run_ranks

    run_ranks(_disagreeing_calls_worker, 3)


def _low_latency_worker(rank: int, world_size: int) -> None:
    experts = 4 * world_size
    config = deepcomm.LowLatencyConfig(max_tokens_per_rank=T, hidden=H, num_experts=experts, num_topk=K)
    comm = deepcomm.Communicator(backend="reference", timeout_s=60.0, low_latency=config, check_calls=True)
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(T, H, generator=generator).to(torch.bfloat16)
    idx = torch.randint(0, experts, (T, K), generator=generator)
    weights = torch.rand(T, K, generator=generator)

    received = comm.low_latency_dispatch(x, idx, experts)
    y = comm.low_latency_combine(received.x, weights, received.handle)
    assert y.shape == (T, H)

    # Weights sent with the dispatch on rank 1 only (the kernels' owners would wait for partials never sent).
    _expect(rank, lambda: comm.low_latency_dispatch(x, idx, experts, topk_weights=weights if rank == 1 else None),
            r"weights at dispatch differs between the ranks \(rank 0: False, rank 1: True\)", peer=1)
    # fp8 on rank 0 only (two ranks, two values: the lower rank's is taken as the right one).
    _expect(rank, lambda: comm.low_latency_dispatch(x, idx, experts, quantize_fp8=rank == 0),
            r"row format differs between the ranks \(rank 0: 'fp8', rank 1: 'bfloat16'\)", peer=1)
    # A combine without its weights on rank 0: refused there, named on rank 1.
    received = comm.low_latency_dispatch(x, idx, experts)
    _expect(rank, lambda: comm.low_latency_combine(received.x, None if rank == 0 else weights, received.handle),
            "topk_weights: required", culprit=0)
    assert comm.low_latency_combine(received.x, weights, received.handle).shape == (T, H)
    # Rank 1 combines before calling its dispatch's receive hook: refused there, named on rank 0 (unchecked,
    # rank 0 would wait in the combine's exchange until the group's timeout).
    hooked = comm.low_latency_dispatch(x, idx, experts, return_recv_hook=True)
    if rank == 0:
        hooked.hook()
    _expect(rank, lambda: comm.low_latency_combine(hooked.x, weights, hooked.handle), "has not received yet",
            culprit=1)
    if rank == 1:
        hooked.hook()
    assert comm.low_latency_combine(hooked.x, weights, hooked.handle).shape == (T, H)


def test_low_latency_calls_that_disagree_all_raise_at_once():
    from dist import run_ranks

    run_ranks(_low_latency_worker, 2)


def _autograd_worker(rank: int, world_size: int) -> None:
    from deepcomm import autograd, moe, overlap

    checked = deepcomm.Communicator(backend="reference", timeout_s=60.0, check_calls=True)
    plain = deepcomm.Communicator(backend="reference", timeout_s=60.0)
    config = moe.tiny()

    # A MoE block forward and backward, plain and overlapped, with every collective checked: the same
    # outputs and gradients as unchecked.
    def run(comm, overlapped: bool):
        block = moe.TransformerBlock(config, comm, torch.float32, seed=5)
        x = torch.randn(2, 6, config.moe.hidden, generator=torch.Generator().manual_seed(rank), requires_grad=True)
        if overlapped:
            y, backward = overlap.run_overlapped([block], x, sizes=[1, 1])
            y.backward(torch.ones_like(y))
            backward.backward()
        else:
            y = block(x)
            y.sum().backward()
        return y.detach(), x.grad

    for overlapped in (False, True):
        got, expected = run(checked, overlapped), run(plain, overlapped)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])

    # Refused on one rank through autograd: float32 rows with quantize_fp8 on rank 1.
    experts = 4 * world_size
    x = torch.randn(T, H)
    idx, weights = torch.randint(0, experts, (T, K)), torch.rand(T, K)
    _expect(rank, lambda: autograd.dispatch(checked, x if rank == 1 else x.to(torch.bfloat16), idx, weights, experts,
                                            quantize_fp8=True), "quantize_fp8: needs bf16 x", culprit=1)
    # A combine of float32 rows (the reference path sums them in float32) with a handle of the wrong dispatch.
    first = autograd.dispatch(checked, x, idx, weights, experts)
    second = autograd.dispatch(checked, x, idx, weights, experts)
    older = first if rank == 0 else second  # the blocks above dispatched three times on `checked`
    _expect(rank, lambda: autograd.combine(checked, older.x, older.handle),
            r"handle of dispatch number differs between the ranks \(rank 0: 4, rank 1: 5\)", peer=1)
    y, _ = autograd.combine(checked, second.x, second.handle)
    assert y.dtype == torch.float32 and y.shape == (T, H)


def test_autograd_and_the_moe_block_are_checked_too():
    from dist import run_ranks

    run_ranks(_autograd_worker, 2)


def _kernels_worker(rank: int, world_size: int) -> None:
    """The check in front of the intranode and low-latency kernels: refusals and disagreements raise on every
    rank before anything launches, and the kernels run on afterwards, bit for bit with the reference."""
    torch.cuda.set_device(rank % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device())
    experts = 4 * world_size
    low_latency = deepcomm.LowLatencyConfig(max_tokens_per_rank=T, hidden=H, num_experts=experts, num_topk=K)
    comm = deepcomm.Communicator(buffer=deepcomm.BufferConfig(max_tokens_per_rank=T, hidden=H, num_topk=K),
                                 low_latency=low_latency, timeout_s=60.0, check_calls=True)
    assert comm.backend == "intranode" and comm.check_calls
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(T, H, generator=generator).to(torch.bfloat16).to(device)
    idx = torch.randint(0, experts, (T, K), generator=generator).to(device)
    weights = torch.rand(T, K, generator=generator).to(device)

    def round_trip() -> None:
        ours = comm.dispatch(x, idx, weights, experts)
        theirs = comm.reference.dispatch(x, idx, weights, experts)
        assert torch.equal(ours.x.cpu(), theirs.x.cpu())
        rows = ours.x.clone()
        assert torch.equal(comm.combine(rows, ours.handle).cpu(), comm.reference.combine(theirs.x, theirs.handle).cpu())

    round_trip()
    _expect(rank, lambda: comm.dispatch(x, idx, weights, experts, num_sms=2 if rank == 1 else None),
            r"num_sms differs between the ranks", peer=1)
    bad_idx = idx.clone()
    bad_idx[0, 0] = experts
    _expect(rank, lambda: comm.dispatch(x, bad_idx if rank == 1 else idx, weights, experts),
            "topk_idx: expert ids must lie in", culprit=1)
    first, second = comm.dispatch(x, idx, weights, experts), comm.dispatch(x, idx, weights, experts)
    older = first if rank == 0 else second
    _expect(rank, lambda: comm.combine(older.x.clone(), older.handle), "handle of dispatch number differs", peer=1)
    received = comm.low_latency_dispatch(x, idx, experts)
    _expect(rank, lambda: comm.low_latency_combine(received.x, None if rank == 0 else weights, received.handle),
            "topk_weights: required", culprit=0)
    comm.low_latency_combine(received.x, weights, received.handle)
    _expect(rank, lambda: comm.low_latency_dispatch(x, idx, experts, topk_weights=weights if rank == 1 else None),
            "weights at dispatch differs", peer=1)
    round_trip()
    comm.check_errors()
    comm.close()


@pytest.mark.gpu
def test_the_check_in_front_of_the_kernels():
    from dist import run_ranks
    from kernel_checks import require_ranks

    require_ranks(2)
    run_ranks(_kernels_worker, 2)
