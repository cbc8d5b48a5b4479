"""Bad input to dispatch/combine: a TypeError or ValueError naming the argument, never a crash."""

from __future__ import annotations

import warnings

import pytest
import torch

import deepcomm
from deepcomm import autograd, fp8
from deepcomm.validation import check_num_experts

T, H, K, E = 8, 256, 4, 16


@pytest.fixture(scope="module")
def comm(single_rank_group):
    return deepcomm.Communicator(single_rank_group, backend="reference")


def good_inputs():
    return dict(
        x=torch.randn(T, H).to(torch.bfloat16),
        topk_idx=torch.randint(0, E, (T, K)),
        topk_weights=torch.rand(T, K),
        num_experts=E,
    )


BAD_DISPATCH = [
    ("x", torch.randn(T, H), TypeError),  # float32
    ("x", torch.randn(T * H).to(torch.bfloat16), ValueError),  # 1-D
    ("x", torch.randn(H, T).to(torch.bfloat16).t(), ValueError),  # not contiguous
    ("x", "tokens", TypeError),
    ("x", torch.randn(T, 0).to(torch.bfloat16), ValueError),
    ("topk_idx", torch.randint(0, E, (T, K), dtype=torch.int32), TypeError),
    ("topk_idx", torch.full((T, K), E), ValueError),  # expert id out of range
    ("topk_idx", torch.full((T, K), -2), ValueError),
    ("topk_idx", torch.randint(0, E, (T + 1, K)), ValueError),
    ("topk_idx", torch.randint(0, E, (T, 0)), ValueError),
    ("topk_idx", torch.empty(T, K, dtype=torch.int64, device="meta"), ValueError),
    ("topk_weights", torch.rand(T, K, dtype=torch.float64), TypeError),
    ("topk_weights", torch.rand(T, K + 1), ValueError),
    ("topk_weights", torch.rand(K, T).t(), ValueError),
    ("num_experts", 16.0, TypeError),
    ("num_experts", True, TypeError),
    ("num_experts", 0, ValueError),
]


@pytest.mark.parametrize("name,value,error", BAD_DISPATCH, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD_DISPATCH)])
def test_dispatch_rejects_bad_argument_by_name(comm, name, value, error):
    inputs = good_inputs()
    inputs[name] = value
    with pytest.raises(error, match=f"^{name}:"):
        comm.dispatch(**inputs)


def test_inputs_on_different_devices_are_rejected(comm):
    inputs = good_inputs()
    inputs["x"] = torch.empty(T, H, dtype=torch.bfloat16, device="meta")
    with pytest.raises(ValueError, match="^topk_idx: expected a tensor on meta, got one on cpu"):
        comm.dispatch(**inputs)


def test_fp8_needs_matching_scales(comm):
    inputs = good_inputs()
    q, scales = fp8.quantize_fp8(inputs.pop("x"))
    with pytest.raises(ValueError, match="^x_scales:"):
        comm.dispatch(q, **inputs)
    with pytest.raises(ValueError, match="^x_scales:"):
        comm.dispatch(q, **inputs, x_scales=scales[:, :1].contiguous())
    with pytest.raises(TypeError, match="^x_scales:"):
        comm.dispatch(q, **inputs, x_scales=scales.double())
    with pytest.raises(ValueError, match="^x_scales:"):
        comm.dispatch(q.float().to(torch.bfloat16), **inputs, x_scales=scales)
    with pytest.raises(ValueError, match="^quantize_fp8:"):
        comm.dispatch(q, **inputs, x_scales=scales, quantize_fp8=True)


def test_num_experts_must_divide_by_world_size():
    with pytest.raises(ValueError, match="^num_experts:.*world size 4"):
        check_num_experts(6, 4)


def test_combine_rejects_bad_arguments(comm):
    result = comm.dispatch(**good_inputs())
    rows = result.x.shape[0]
    with pytest.raises(TypeError, match="^expert_out:"):
        comm.combine(result.x.float(), result.handle)
    with pytest.raises(ValueError, match="^expert_out:"):
        comm.combine(result.x[:-1].contiguous(), result.handle)
    with pytest.raises(ValueError, match="^expert_out:"):
        comm.combine(torch.zeros(rows, H + 1, dtype=torch.bfloat16), result.handle)
    with pytest.raises(TypeError, match="^handle:"):
        comm.combine(result.x, {"not": "a handle"})


def test_communicator_arguments(single_rank_group):
    with pytest.raises(ValueError, match="^backend:"):
        deepcomm.Communicator(single_rank_group, backend="magic")
    with pytest.raises(ValueError, match="^num_sms:"):
        deepcomm.Communicator(single_rank_group, num_sms=0)
    with pytest.raises(ValueError, match="^ranks_per_node:"):
        deepcomm.Communicator(single_rank_group, ranks_per_node=2)
    with pytest.raises(TypeError, match="^ranks_per_node:"):
        deepcomm.Communicator(single_rank_group, ranks_per_node=True)
    for timeout, error in (("30", TypeError), (None, TypeError), (True, TypeError), (0, ValueError),
                           (float("inf"), ValueError), (float("nan"), ValueError)):
        with pytest.raises(error, match="^timeout_s:"):
            deepcomm.Communicator(single_rank_group, timeout_s=timeout)
    with pytest.raises(ValueError, match="^num_topk: the dispatch kernels support at most 32"):
        deepcomm.BufferConfig(max_tokens_per_rank=8, hidden=128, num_topk=33)


def test_per_call_arguments_are_checked_on_every_backend(comm):
    inputs = good_inputs()
    for value in (0, -1, True, "abc", 2.0):
        with pytest.raises(ValueError, match="^num_sms:"):
            comm.dispatch(**inputs, num_sms=value)
    with pytest.raises(TypeError, match="^previous_event:"):
        comm.dispatch_async(**inputs, previous_event="garbage")
    for value in (-1, 7.0, True):
        with pytest.raises(ValueError, match="^num_recv_tokens:"):
            comm.dispatch(**inputs, num_recv_tokens=value)
    result = comm.dispatch(**inputs)
    with pytest.raises(ValueError, match="^num_sms:"):
        comm.combine(result.x, result.handle, num_sms=0)
    with pytest.raises(TypeError, match="^previous_event:"):
        comm.combine_async(result.x, result.handle, previous_event=123)


def test_fp8_of_an_odd_hidden_size_names_x(comm):
    inputs = good_inputs()
    inputs["x"] = torch.randn(T, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="^x: fp8 needs a hidden size that is a multiple of 128"):
        comm.dispatch(**inputs, quantize_fp8=True)


def test_a_closed_communicator_refuses_every_call(single_rank_group):
    closed = deepcomm.Communicator(single_rank_group, backend="reference")
    closed.close()
    with pytest.raises(RuntimeError, match="^communicator: closed"):
        closed.dispatch(**good_inputs())
    with pytest.raises(RuntimeError, match="^communicator: closed"):  # the backend itself, as autograd calls it
        closed._impl.run_dispatch(**good_inputs())


def test_one_rank_world_round_trips(comm):
    inputs = good_inputs()
    result = comm.dispatch(**inputs)
    touched = (inputs["topk_idx"] >= 0).any(dim=1)
    assert result.x.shape[0] == int(touched.sum())
    assert torch.equal(comm.combine(result.x, result.handle), inputs["x"])


def test_caller_given_receive_size_is_checked(comm):
    inputs = good_inputs()
    waited = comm.dispatch(**inputs)
    rows = waited.x.shape[0]
    assert waited.num_recv_tokens_per_rank == [rows] and waited.num_recv_tokens_per_expert_list is not None
    known = comm.dispatch(**inputs, num_recv_tokens=rows)
    assert known.x.shape[0] == rows
    # No host wait on the kernels, so no host counts: the reference path gives none either.
    assert known.num_recv_tokens_per_rank is None and known.num_recv_tokens_per_expert_list is None
    with pytest.raises(ValueError, match="^num_recv_tokens:"):
        comm.dispatch(**inputs, num_recv_tokens=rows + 1)


def test_dispatch_with_a_handle_on_the_reference_path_routes_anew_and_checks_its_kind(comm):
    inputs = good_inputs()
    first = comm.dispatch(**inputs)
    again = comm.dispatch(**inputs, handle=first.handle)
    assert torch.equal(again.x, first.x) and torch.equal(again.topk_idx, first.topk_idx)
    assert again.num_recv_tokens_per_rank is None and again.num_recv_tokens_per_expert_list is None  # as the kernels'
    with pytest.raises(TypeError, match="^handle: expected the handle of a dispatch on this communicator"):
        comm.dispatch(**inputs, handle=object())
    # The kernels' checks: the same topk_idx object, unchanged, and a handle of this communicator.
    with pytest.raises(ValueError, match="^handle: a dispatch that reuses a handle takes the topk_idx tensor"):
        comm.dispatch(**(inputs | dict(topk_idx=inputs["topk_idx"].clone())), handle=first.handle)
    inputs["topk_idx"].add_(0)
    with pytest.raises(ValueError, match="^topk_idx: modified in place"):
        comm.dispatch(**inputs, handle=first.handle)
    other = deepcomm.Communicator(comm.reference.group, backend="reference")
    with pytest.raises(TypeError, match="^handle: expected the handle of a dispatch on this communicator"):
        other.combine(first.x, first.handle)
    with pytest.raises(TypeError, match="^handle: expected the handle of a dispatch on this communicator"):
        other.combine_input(first.handle)


def test_reused_routing_is_refused_for_another_or_changed_topk_idx():
    from deepcomm.kernel_common import RoutingSource

    topk_idx = torch.randint(0, E, (T, K))
    source = RoutingSource.of(topk_idx, E, call=1)
    source.check_reused_by(topk_idx, E)
    with pytest.raises(ValueError, match="^handle: a dispatch that reuses a handle takes the topk_idx"):
        source.check_reused_by(topk_idx.clone(), E)
    with pytest.raises(ValueError, match="^num_experts: the handle's dispatch had 16"):
        source.check_reused_by(topk_idx, 2 * E)
    topk_idx[0, 0] = 1
    with pytest.raises(ValueError, match="^topk_idx: modified in place"):
        source.check_reused_by(topk_idx, E)
    with torch.inference_mode():  # no version counter: only the identity is checked
        served = torch.randint(0, E, (T, K))
    RoutingSource.of(served, E, call=2).check_reused_by(served, E)


def _disagreeing_ranks_worker(rank: int, world_size: int) -> None:
    from deepcomm.errors import CommunicationError

    comm = deepcomm.Communicator(backend="reference")
    x = torch.randn(T, H).to(torch.bfloat16)
    idx, weights = torch.randint(0, E, (T, K)), torch.rand(T, K)
    cases = [
        (dict(topk_idx=idx[:, :1].contiguous(), topk_weights=weights[:, :1].contiguous()), "ranks disagree on topk_idx: K"),
        (dict(x=torch.randn(T, 2 * H).to(torch.bfloat16)), "ranks disagree on x: hidden size"),
        (dict(quantize_fp8=True), r"ranks disagree on x dtype: fp8 \(1\) or bf16 \(0\)"),
        (dict(num_experts=2 * E, topk_idx=idx * 2), "ranks disagree on num_experts"),
    ]
    for change, message in cases:
        args = dict(x=x, topk_idx=idx, topk_weights=weights, num_experts=E)
        if rank == 1:
            args.update(change)
        # Every rank raises, naming the field and a rank that differs (as the kernels' ranks do when they disagree),
        # instead of exchanging rows of other widths.
        with pytest.raises(CommunicationError, match=message) as info:
            comm.dispatch(**args)
        assert info.value.peer == 1 - rank and info.value.stage == "dispatch/counts"
    # The next call, with every rank agreeing, runs.
    comm.dispatch(x, idx, weights, E)


def test_ranks_disagreeing_on_the_rows_all_raise():
    from dist import run_ranks

    run_ranks(_disagreeing_ranks_worker, 2)


def _refused_arguments_worker(rank: int, world_size: int) -> None:
    import time

    from deepcomm.errors import CommunicationError

    comm = deepcomm.Communicator(backend="reference", timeout_s=60.0)
    experts = 8 * world_size
    x = torch.randn(T, H).to(torch.bfloat16)
    idx, weights = torch.randint(0, experts, (T, K)), torch.rand(T, K)
    bad_idx = idx.clone()
    bad_idx[3, 1] = experts  # out of range on rank 2 only: a data-dependent error the other ranks cannot see
    cases = [(dict(topk_idx=bad_idx), ValueError, "^topk_idx"),
             (dict(x=x.float()), TypeError, "^x"),
             (dict(x=x.to(fp8.FP8_DTYPE), x_scales=torch.ones(T, H // 128), quantize_fp8=True), ValueError,
              "^quantize_fp8"),
             # The Communicator's own per-call checks, before any backend sees the call.
             (dict(num_sms=0), ValueError, "^num_sms"), (dict(previous_event="event"), TypeError, "^previous_event")]
    for change, error, message in cases:
        args = dict(x=x, topk_idx=idx, topk_weights=weights, num_experts=experts)
        if rank == 2:
            args.update(change)
        start = time.monotonic()
        if rank == 2:  # the argument's own error here...
            with pytest.raises(error, match=message):
                comm.dispatch(**args)
        else:  # ...and at once on the others, naming rank 2, instead of after their 60 s timeout
            with pytest.raises(CommunicationError, match="rank 2 refused its dispatch arguments") as info:
                comm.dispatch(**args)
            assert info.value.peer == 2 and time.monotonic() - start < 30
    comm.dispatch(x, idx, weights, experts)  # and the next call runs


def test_arguments_refused_on_one_rank_raise_on_every_rank_at_once():
    from dist import run_ranks

    run_ranks(_refused_arguments_worker, 3)


def _refused_low_latency_worker(rank: int, world_size: int) -> None:
    import time

    from deepcomm.errors import CommunicationError

    hidden = 136  # bf16 rows of 16-byte units, but no whole 128-channel fp8 blocks
    config = deepcomm.LowLatencyConfig(max_tokens_per_rank=T, hidden=hidden, num_experts=4 * world_size, num_topk=K)
    comm = deepcomm.Communicator(backend="reference", timeout_s=60.0, low_latency=config)
    x, idx = torch.randn(T, hidden).to(torch.bfloat16), torch.randint(0, config.num_experts, (T, K))
    for change, error, message in [(dict(quantize_fp8=True), ValueError, "^x: fp8 needs a hidden size"),
                                   (dict(num_sms=-1), ValueError, "^num_sms")]:
        args = dict(x=x, topk_idx=idx, num_experts=config.num_experts) | (change if rank == 1 else {})
        start = time.monotonic()
        if rank == 1:
            with pytest.raises(error, match=message):
                comm.low_latency_dispatch(**args)
        else:
            with pytest.raises(CommunicationError, match="rank 1 refused its dispatch arguments"):
                comm.low_latency_dispatch(**args)
            assert time.monotonic() - start < 30
    comm.low_latency_dispatch(x, idx, config.num_experts)  # and the next call runs


def test_low_latency_arguments_refused_on_one_rank_raise_on_every_rank_at_once():
    from dist import run_ranks

    run_ranks(_refused_low_latency_worker, 2)


def test_tensors_that_want_gradients_are_warned_about_outside_autograd(comm):
    inputs = good_inputs()
    with pytest.warns(UserWarning, match=r"^x: requires grad, but Communicator.dispatch is not differentiable"):
        result = comm.dispatch(**(inputs | dict(x=inputs["x"].float().requires_grad_().to(torch.bfloat16))))
    with pytest.warns(UserWarning, match=r"^expert_out: requires grad, but Communicator.combine_async"):
        comm.combine_async(result.x.float().requires_grad_().to(torch.bfloat16), result.handle)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none under no_grad, nor through deepcomm.autograd
        with torch.no_grad():
            comm.dispatch(**(inputs | dict(x=inputs["x"].float().requires_grad_().to(torch.bfloat16))))
        x = inputs["x"].float().requires_grad_()
        received = autograd.dispatch(comm, x.to(torch.bfloat16), inputs["topk_idx"], inputs["topk_weights"],
                                     inputs["num_experts"])
        autograd.combine(comm, received.x, received.handle)[0].float().sum().backward()
        assert x.grad is not None
