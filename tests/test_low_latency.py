"""The low-latency mode: the reference path against a brute-force oracle (CPU, gloo), and the
kernels against the reference path bit for bit (GPU; ranks sharing the GPU under MPS)."""

from __future__ import annotations

import re
from unittest import mock

import numpy as np
import pytest
import torch
import torch.distributed as dist

import deepcomm
from deepcomm import fp8
from deepcomm.errors import CommunicationError, SlotReusedError
from deepcomm.low_latency_phases import phase_times
from deepcomm.reference_low_latency import ReferenceLowLatency
from cases import ROUTINGS, make_inputs
from dist import run_ranks
from kernel_checks import require_ranks, same_bits

HIDDEN = 256
NUM_TOPK = 6
MAX_TOKENS = 40


def _config(world_size: int, **kwargs) -> deepcomm.LowLatencyConfig:
    return deepcomm.LowLatencyConfig(max_tokens_per_rank=MAX_TOKENS, hidden=HIDDEN, num_experts=4 * world_size,
                                     num_topk=8, **kwargs)


def _token_counts(seed: int, world_size: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    counts = [int(v) for v in torch.randint(1, MAX_TOKENS + 1, (world_size,), generator=generator)]
    counts[seed % world_size] = 0  # a rank with no tokens
    counts[(seed + 1) % world_size] = MAX_TOKENS  # and one at capacity
    return counts


def _every_rank_inputs(seed: int, routing: str, world_size: int, num_experts: int):
    counts = _token_counts(seed, world_size)
    inputs = [make_inputs(seed, r, counts[r], HIDDEN, NUM_TOPK, num_experts, routing, 1) for r in range(world_size)]
    if counts[0] > 1 and routing == "uniform":
        inputs[0].topk_idx[1, 1] = inputs[0].topk_idx[1, 0]  # one token names an expert twice
    return inputs


def _oracle_layout(inputs, rank: int, world_size: int, num_experts: int, max_tokens: int):
    """What rank ``rank`` receives, by brute force: per local expert, rows by source rank then token."""
    local = num_experts // world_size
    rows = torch.zeros(local, world_size * max_tokens, HIDDEN, dtype=torch.bfloat16)
    counts = [0] * local
    for src in range(world_size):
        for e_local in range(local):
            expert = rank * local + e_local
            for t in range(inputs[src].x.shape[0]):
                if expert in inputs[src].topk_idx[t].tolist():
                    rows[e_local, counts[e_local]] = inputs[src].x[t]
                    counts[e_local] += 1
    return rows, counts


def _oracle_pair_rows(inputs, rank: int, world_size: int, num_experts: int, max_tokens: int) -> torch.Tensor:
    mine = inputs[rank].topk_idx
    out = torch.full(mine.shape, -1, dtype=torch.int32)
    for t in range(mine.shape[0]):
        for k in range(mine.shape[1]):
            expert = int(mine[t, k])
            if expert < 0:
                continue
            before = sum(int((inputs[src].topk_idx == expert).any(dim=1).sum()) for src in range(rank))
            earlier = int((mine[:t] == expert).any(dim=1).sum())
            out[t, k] = expert * world_size * max_tokens + before + earlier
    return out


def _oracle_combine(outputs, pair_rows, weights, owner_rows: int, hidden: int) -> torch.Tensor:
    """Per token: acc = w0 * row0, then acc + wk * rowk (float32, no fused multiply-add), +0.0 for none."""
    y = torch.zeros(pair_rows.shape[0], hidden, dtype=torch.bfloat16)
    for t in range(pair_rows.shape[0]):
        acc = None
        for k in range(pair_rows.shape[1]):
            row = int(pair_rows[t, k])
            term = torch.zeros(hidden)
            if row >= 0:
                owner, local_row = divmod(row, owner_rows)
                term = outputs[owner].reshape(owner_rows, hidden)[local_row].float() * weights[t, k]
            acc = term if acc is None else acc + term
        y[t] = acc.to(torch.bfloat16)
    return y


def _oracle_combine_by_owner(outputs, pair_rows, weights, owner_rows: int, hidden: int) -> torch.Tensor:
    """Per token and owner rank ascending: the owner's terms w_k * row_k summed k ascending (float32), rounded
    to bf16; the token's partials summed in owner order (float32) and rounded; +0.0 for none."""
    y = torch.zeros(pair_rows.shape[0], hidden, dtype=torch.bfloat16)
    for t in range(pair_rows.shape[0]):
        partials = {}
        for k in range(pair_rows.shape[1]):
            row = int(pair_rows[t, k])
            if row < 0:
                continue
            owner, local_row = divmod(row, owner_rows)
            term = outputs[owner].reshape(owner_rows, hidden)[local_row].float() * weights[t, k]
            partials[owner] = term if owner not in partials else partials[owner] + term
        acc = None
        for owner in sorted(partials):
            partial = partials[owner].to(torch.bfloat16).float()
            acc = partial if acc is None else acc + partial
        if acc is not None:
            y[t] = acc.to(torch.bfloat16)
    return y


def _random_outputs(seed: int, rank: int, shape) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed * 7 + rank)) * 2).to(torch.bfloat16)


# ------------------------------------------------------------------ CPU: reference path


def _reference_worker(rank: int, world_size: int) -> None:
    config = _config(world_size)
    comm = deepcomm.Communicator(backend="reference", low_latency=config)
    num_experts = config.num_experts
    local, rows_per_expert, _ = config.recv_shape(world_size)
    for seed, routing in enumerate(("uniform", "skewed", "empty_experts", "minus_one")):
        inputs = _every_rank_inputs(seed, routing, world_size, num_experts)
        mine = inputs[rank]
        result = comm.low_latency_dispatch(mine.x, mine.topk_idx, num_experts)
        rows, counts = _oracle_layout(inputs, rank, world_size, num_experts, MAX_TOKENS)
        assert result.num_tokens_per_expert.tolist() == counts, routing
        assert result.x.shape == (local, rows_per_expert, HIDDEN) and result.x_scales is None
        for e in range(local):
            assert torch.equal(result.x[e, : counts[e]], rows[e, : counts[e]]), f"{routing}: expert {e}"
        assert torch.equal(result.handle.pair_rows, _oracle_pair_rows(inputs, rank, world_size, num_experts,
                                                                      MAX_TOKENS)), routing

        # Combine: every rank's outputs are random rows; the oracle rebuilds them all.
        shape = (local, rows_per_expert, HIDDEN)
        outputs = [_random_outputs(seed, r, shape) for r in range(world_size)]
        y = comm.low_latency_combine(outputs[rank], mine.topk_weights, result.handle)
        expected = _oracle_combine(outputs, result.handle.pair_rows, mine.topk_weights, local * rows_per_expert,
                                   HIDDEN)
        same_bits(y, expected, f"{routing}: combine")
        # The weights sent with the dispatch: the owners sum, the token's rank adds their partials.
        carried = comm.low_latency_dispatch(mine.x, mine.topk_idx, num_experts, topk_weights=mine.topk_weights)
        assert torch.equal(carried.handle.pair_rows, result.handle.pair_rows) and carried.handle.weights_at_dispatch
        y = comm.low_latency_combine(outputs[rank], None, carried.handle)
        expected = _oracle_combine_by_owner(outputs, carried.handle.pair_rows, mine.topk_weights,
                                            local * rows_per_expert, HIDDEN)
        same_bits(y, expected, f"{routing}: combine summed at the owners")

        # fp8: quantised rows and scales land where bf16 rows do.
        quantised = comm.low_latency_dispatch(mine.x, mine.topk_idx, num_experts, quantize_fp8=True)
        q_rows, q_scales = fp8.quantize_fp8(rows.view(-1, HIDDEN))
        q_rows, q_scales = q_rows.view(local, -1, HIDDEN), q_scales.view(local, -1, HIDDEN // 128)
        for e in range(local):
            same_bits(quantised.x[e, : counts[e]], q_rows[e, : counts[e]], f"{routing}: fp8 rows of {e}")
            same_bits(quantised.x_scales[e, : counts[e]], q_scales[e, : counts[e]], f"{routing}: scales of {e}")


@pytest.mark.parametrize("world_size", [2, 3])
def test_reference_low_latency_matches_a_brute_force_oracle(world_size):
    run_ranks(_reference_worker, world_size)


def _reference_bad_input_worker(rank: int, world_size: int) -> None:
    config = _config(world_size)
    comm = deepcomm.Communicator(backend="reference", low_latency=config)
    E = config.num_experts
    x = torch.randn(4, HIDDEN).to(torch.bfloat16)
    idx = torch.zeros(4, 2, dtype=torch.int64)
    cases = [
        (dict(x=x[:, :128].contiguous()), "x: hidden size"),
        (dict(x=torch.randn(MAX_TOKENS + 1, HIDDEN).to(torch.bfloat16),
              topk_idx=torch.zeros(MAX_TOKENS + 1, 2, dtype=torch.int64)), "x: 41 tokens exceed"),
        (dict(topk_idx=torch.zeros(4, 9, dtype=torch.int64)), "topk_idx: K=9"),
        (dict(topk_idx=torch.full((4, 2), E, dtype=torch.int64)), "topk_idx: expert ids must lie"),
        (dict(topk_idx=torch.full((4, 2), -2, dtype=torch.int64)), "topk_idx: expert ids must lie"),
        (dict(num_experts=E + world_size), "num_experts: the low-latency buffer is for"),
        (dict(x=x.float()), "x: expected dtype"),
        (dict(x_scales=torch.ones(4, 2)), "x_scales: only valid"),
        (dict(topk_weights=torch.ones(4, 3)), "topk_weights: expected shape"),
        (dict(topk_weights=torch.ones(4, 2, dtype=torch.float64)), "topk_weights: expected dtype"),
    ]
    for change, message in cases:
        args = dict(x=x, topk_idx=idx, num_experts=E)
        args.update(change)
        with pytest.raises((TypeError, ValueError), match=message):
            comm.low_latency_dispatch(**args)
    # Refused on rank 1 only: rank 0 raises at once too, naming rank 1, rather than waiting out its timeout.
    if rank == 1:
        with pytest.raises(ValueError, match="topk_idx: expert ids must lie"):
            comm.low_latency_dispatch(x, torch.full((4, 2), E, dtype=torch.int64), E)
    else:
        with pytest.raises(CommunicationError, match="rank 1 refused its dispatch arguments") as info:
            comm.low_latency_dispatch(x, idx, E)
        assert info.value.peer == 1
    result = comm.low_latency_dispatch(x, idx, E)
    out = comm.low_latency_combine_input(result.handle)
    assert comm.low_latency_combine_input(result.handle) is out  # one per area, as on the kernels
    weights = torch.ones(4, 2)
    with pytest.raises(ValueError, match="expert_out: expected shape"):
        comm.low_latency_combine(out[:1], weights, result.handle)
    with pytest.raises(ValueError, match="topk_weights: expected shape"):
        comm.low_latency_combine(out, weights[:, :1].contiguous(), result.handle)
    with pytest.raises(TypeError, match="handle: expected the handle"):
        comm.low_latency_combine(out, weights, object())
    comm.low_latency_combine(out, weights, result.handle)
    with pytest.raises(ValueError, match="handle: its dispatch was combined already"):
        comm.low_latency_combine(out, weights, result.handle)
    with pytest.raises(ValueError, match="topk_weights: required"):
        comm.low_latency_combine(out, None, comm.low_latency_dispatch(x, idx, E).handle)
    carried = comm.low_latency_dispatch(x, idx, E, topk_weights=weights)
    with pytest.raises(ValueError, match="topk_weights: the dispatch carried the weights"):
        comm.low_latency_combine(out, weights, carried.handle)
    with pytest.raises(ValueError, match=f"topk_weights: rank {1 - rank} (gave|did not give) them"):
        comm.low_latency_dispatch(x, idx, E, topk_weights=weights if rank == 0 else None)
    comm.low_latency_dispatch(x, idx, E)
    comm.low_latency_dispatch(x, idx, E)
    with pytest.raises(SlotReusedError, match="handle: 4 low-latency dispatches ran"):
        comm.low_latency_combine_input(result.handle)
    # Receive hooks, as the kernels check them: nothing reads a dispatch before its hook, a hook runs once,
    # and a dispatch onto the area of one whose hook was not called is refused.
    # Until its hook runs nothing has arrived: here the results hold NaN bytes (counts -1), then the call's values.
    unhooked = comm.low_latency_dispatch(x, idx, E)
    unhooked_x, unhooked_counts = unhooked.x.clone(), unhooked.num_tokens_per_expert.clone()
    first = comm.low_latency_dispatch(x, idx, E, return_recv_hook=True)
    assert first.x.isnan().all() and (first.num_tokens_per_expert == -1).all()
    comm.low_latency_dispatch(x, idx, E, return_recv_hook=True).hook()
    with pytest.raises(ValueError, match="handle: its dispatch has not received yet"):
        comm.low_latency_combine_input(first.handle)
    with pytest.raises(ValueError, match="return_recv_hook: dispatch .* on the same receive area"):
        comm.low_latency_dispatch(x, idx, E)
    first.hook()
    assert torch.equal(first.num_tokens_per_expert, unhooked_counts)
    for e, count in enumerate(unhooked_counts.tolist()):
        assert torch.equal(first.x[e, :count], unhooked_x[e, :count])
    with pytest.raises(RuntimeError, match="hook: already called"):
        first.hook()
    y, _, hook = comm.low_latency_combine_async(comm.low_latency_combine_input(first.handle), weights, first.handle,
                                                return_recv_hook=True)
    assert y.isnan().all() or y.numel() == 0
    hook()
    assert not y.isnan().any()
    with pytest.raises(RuntimeError, match="hook: already called"):
        hook()
    # A combine's hook after its dispatch's receive area was reused (two dispatches later) is refused.
    late = comm.low_latency_dispatch(x, idx, E)
    _, _, hook = comm.low_latency_combine_async(comm.low_latency_combine_input(late.handle), weights, late.handle,
                                                return_recv_hook=True)
    comm.low_latency_dispatch(x, idx, E)
    comm.low_latency_dispatch(x, idx, E)
    with pytest.raises(SlotReusedError, match="handle: 2 low-latency dispatches ran"):
        hook()
    plain = deepcomm.Communicator(backend="reference")
    with pytest.raises(ValueError, match="low_latency: this communicator has no low-latency buffers"):
        plain.low_latency_dispatch(x, idx, E)


def test_reference_low_latency_bad_input_names_the_argument():
    run_ranks(_reference_bad_input_worker, 2)


def test_low_latency_config_checks_its_fields():
    with pytest.raises(ValueError, match="max_tokens_per_rank: expected a positive int"):
        deepcomm.LowLatencyConfig(max_tokens_per_rank=0, hidden=128, num_experts=8)
    with pytest.raises(ValueError, match="hidden: must be a multiple of 8"):
        deepcomm.LowLatencyConfig(max_tokens_per_rank=8, hidden=100, num_experts=8)
    with pytest.raises(ValueError, match="num_topk: the low-latency path supports at most 16"):
        deepcomm.LowLatencyConfig(max_tokens_per_rank=8, hidden=128, num_experts=8, num_topk=17)
    with pytest.raises(ValueError, match="num_experts: the low-latency path supports at most"):
        deepcomm.LowLatencyConfig(max_tokens_per_rank=8, hidden=128, num_experts=2048)
    with pytest.raises(ValueError, match="max_tokens_per_rank: 4096 tokens x 1024 experts"):
        deepcomm.LowLatencyConfig(max_tokens_per_rank=4096, hidden=128, num_experts=1024)
    with pytest.raises(TypeError, match="early_launch: expected a bool, got int"):
        deepcomm.LowLatencyConfig(max_tokens_per_rank=8, hidden=128, num_experts=8, early_launch=1)
    config = deepcomm.LowLatencyConfig(max_tokens_per_rank=8, hidden=128, num_experts=6)
    with pytest.raises(ValueError, match="num_experts: must be a positive multiple of the world size 4"):
        config.check_world(4)
    with pytest.raises(ValueError, match="low_latency: the low-latency path supports at most 8 ranks"):
        config.check_world(12)


def test_the_buffer_layout_and_limits_agree_with_the_extension():
    from deepcomm import _ext, low_latency

    if not _ext.available():
        pytest.skip("extension not built")
    core = _ext.extension().low_latency
    assert (core.MAX_TOPK, core.MAX_EXPERTS, core.MAX_RANKS) == (low_latency.MAX_TOPK, low_latency.MAX_EXPERTS,
                                                                 low_latency.MAX_RANKS)
    # Decode on 2 ranks: 144 local experts x 256 rows of 7168 bf16, then the fp8 scales.
    layout = core.area_layout(144, 2, 128, 7168)
    assert layout["rows_per_expert"] == 256 and layout["row_stride"] == 2 * 7168
    assert layout["scales"] >= 144 * 256 * 2 * 7168
    assert layout["total_bytes"] % 4096 == 0
    config = deepcomm.LowLatencyConfig(max_tokens_per_rank=128, hidden=7168, num_experts=288)
    assert config.total_bytes(2) == core.DATA_OFFSET + 2 * layout["total_bytes"]
    assert core.dispatch_shared_bytes(288, 128) == 288 * 4 * 4  # a 128-bit mask per expert
    assert layout["staged"] >= layout["scales"] + 144 * 256 * 56 * 4
    assert layout["total_bytes"] >= layout["staging_tags"] + 2 * 128 * 17 * 4


# ------------------------------------------------------------------ GPU: the kernels


def _kernel_communicator(world_size: int, **kwargs) -> deepcomm.Communicator:
    torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    comm = deepcomm.Communicator(low_latency=_config(world_size), **kwargs)
    assert type(comm._low_latency).__name__ == "LowLatencyKernels"
    return comm


def _poison(comm) -> None:
    """0xFF over this rank's receive areas, after every rank finished reading them."""
    torch.cuda.synchronize()
    dist.barrier()
    impl = comm._low_latency
    impl.buffer[impl.kernels.DATA_OFFSET :].fill_(0xFF)
    torch.cuda.synchronize()
    dist.barrier()


def _check_received(ours, theirs, where: str) -> None:
    counts = theirs.num_tokens_per_expert.tolist()
    assert ours.num_tokens_per_expert.tolist() == counts, where
    same_bits(ours.handle.pair_rows, theirs.handle.pair_rows, f"{where}: pair_rows")
    for e, n in enumerate(counts):  # rows past the count are unspecified; every row before it was written
        same_bits(ours.x[e, :n], theirs.x[e, :n], f"{where}: rows of expert {e}")
        if theirs.x_scales is not None:
            same_bits(ours.x_scales[e, :n], theirs.x_scales[e, :n], f"{where}: scales of expert {e}")


def _agreement_worker(rank: int, world_size: int) -> None:
    comm = _kernel_communicator(world_size)
    oracle = ReferenceLowLatency(comm.reference, comm._low_latency.config)
    device = torch.device("cuda", torch.cuda.current_device())
    num_experts = comm._low_latency.config.num_experts
    local, rows_per_expert, _ = comm._low_latency.config.recv_shape(world_size)
    for seed, routing in enumerate(ROUTINGS[:4]):
        inputs = _every_rank_inputs(seed, routing, world_size, num_experts)[rank]
        x, idx = inputs.x.to(device), inputs.topk_idx.to(device)
        for mode, num_sms in (("bf16", 24), ("bf16", 1), ("fp8", 3), ("quantize", 24), ("quantize_pow2", 5)):
            where = f"{routing}/{mode}/sms{num_sms}/rank{rank}"
            kwargs, cpu_kwargs = {}, {}
            if mode == "fp8":
                q, s = fp8.quantize_fp8(inputs.x)
                x_in, kwargs["x_scales"], cpu_x, cpu_kwargs["x_scales"] = q.to(device), s.to(device), q, s
            else:
                x_in, cpu_x = x, inputs.x
                if mode.startswith("quantize"):
                    kwargs = cpu_kwargs = dict(quantize_fp8=True, power_of_two_scales=mode.endswith("pow2"))
            _poison(comm)
            ours = comm.low_latency_dispatch(x_in, idx, num_experts, num_sms=num_sms, **kwargs)
            theirs = oracle.dispatch(cpu_x, inputs.topk_idx, num_experts, **cpu_kwargs)
            comm.check_errors()
            _check_received(ours, theirs, where)

        # Combine (once per dispatch): random outputs staged from outside the buffer, then written in place.
        theirs = oracle.dispatch(inputs.x, inputs.topk_idx, num_experts)
        outputs = _random_outputs(seed, rank, (local, rows_per_expert, HIDDEN))
        expected = oracle.combine(outputs, inputs.topk_weights, theirs.handle)[0]
        weights = inputs.topk_weights.to(device)
        for num_sms in (24, 2):
            ours = comm.low_latency_dispatch(x, idx, num_experts)
            same_bits(comm.low_latency_combine(outputs.to(device), weights, ours.handle, num_sms=num_sms), expected,
                      f"{routing}: combine staged, sms{num_sms}")
        ours = comm.low_latency_dispatch(x, idx, num_experts)
        in_place = comm.low_latency_combine_input(ours.handle)
        in_place.copy_(outputs)
        same_bits(comm.low_latency_combine(in_place, weights, ours.handle), expected, f"{routing}: combine in place")
        with pytest.raises(ValueError, match="handle: its dispatch was combined already"):
            comm.low_latency_combine(in_place, weights, ours.handle)

        # The weights sent with the dispatch (bf16 rows, fp8 quantised on the way, and fp8 rows the caller
        # quantised): the owners sum.
        carried = oracle.dispatch(inputs.x, inputs.topk_idx, num_experts, topk_weights=inputs.topk_weights)
        expected = oracle.combine(outputs, None, carried.handle)[0]
        q, s = fp8.quantize_fp8(inputs.x)
        for mode, num_sms in (("bf16", 24), ("bf16", 2), ("quantize", 7), ("fp8", 5)):
            where = f"{routing}: combine summed at the owners ({mode}), sms{num_sms}"
            _poison(comm)
            x_in, kwargs = (q.to(device), dict(x_scales=s.to(device))) if mode == "fp8" else (x, {})
            ours = comm.low_latency_dispatch(x_in, idx, num_experts, quantize_fp8=mode == "quantize", num_sms=num_sms,
                                             topk_weights=weights, **kwargs)
            if mode == "bf16":
                _check_received(ours, carried, where)
            same_bits(comm.low_latency_combine(outputs.to(device), None, ours.handle, num_sms=num_sms), expected, where)
        ours = comm.low_latency_dispatch(x, idx, num_experts, topk_weights=weights)
        in_place = comm.low_latency_combine_input(ours.handle)
        in_place.copy_(outputs)
        same_bits(comm.low_latency_combine(in_place, None, ours.handle), expected,
                  f"{routing}: combine summed at the owners, in place")
        comm.check_errors()
    comm.close()


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_low_latency_kernels_match_the_reference_bit_for_bit(world_size):
    require_ranks(world_size)
    run_ranks(_agreement_worker, world_size)


def _rewritten(t: torch.Tensor) -> torch.Tensor:
    """t, rewritten in place by a kernel queued just before the call that takes it (its largest input): an
    early launch then follows the kernel that wrote what it reads."""
    return t.mul_(1)


def _builds_early_code(device: torch.device) -> bool | None:
    """Whether the extension runs code built for sm_90 or later on this GPU (what can_launch_early finds): the
    highest listed arch the GPU can run; None when the list names no numbers (native, all)."""
    major, minor = torch.cuda.get_device_capability(device)
    archs = [re.match(r"\d+", a) for a in deepcomm.features()["build"]["cuda_archs"].replace(",", ";").split(";")]
    if not archs or not all(archs):
        return None
    runnable = [int(a[0]) for a in archs if int(a[0]) <= 10 * major + minor]
    return bool(runnable) and max(runnable) >= 90


def _odd_shapes_worker(rank: int, world_size: int) -> None:
    """Row sizes whose 16-byte units leave part of a warp idle in the last pass (640 channels: 80 units;
    136: 17, bf16 only), each on a fresh communicator that may get the memory of the one before; each call's
    largest input rewritten by a kernel just before it. The last communicator launches its kernels plainly
    (early_launch=False), the others early (where the build allows: sm_90 code)."""
    torch.cuda.set_device(rank % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device())
    early_code = _builds_early_code(device)
    for hidden, modes, early in ((640, ("bf16", "quantize"), True), (136, ("bf16",), True), (640, ("bf16",), False)):
        config = deepcomm.LowLatencyConfig(max_tokens_per_rank=MAX_TOKENS, hidden=hidden,
                                           num_experts=4 * world_size, num_topk=8, early_launch=early)
        comm = deepcomm.Communicator(low_latency=config)
        if early_code is not None:
            assert comm._low_latency.early_launch == (early and early_code), (early, early_code)
        oracle = ReferenceLowLatency(comm.reference, config)
        local, rows_per_expert, _ = config.recv_shape(world_size)
        for call, mode in enumerate(modes * 2):
            generator = torch.Generator().manual_seed(call * 10 + rank)
            x = (torch.randn(24, hidden, generator=generator) * 2).to(torch.bfloat16)
            idx = torch.rand(24, config.num_experts, generator=generator).topk(NUM_TOPK, dim=1).indices
            weights = torch.rand(24, NUM_TOPK, generator=generator)
            kwargs = dict(quantize_fp8=True) if mode == "quantize" else {}
            x_dev, idx_dev, weights_dev = x.to(device), idx.to(device), weights.to(device)
            ours = comm.low_latency_dispatch(_rewritten(x_dev), idx_dev, config.num_experts, **kwargs)
            theirs = oracle.dispatch(x, idx, config.num_experts, **kwargs)
            _check_received(ours, theirs, f"hidden {hidden}, {mode}, call {call}, rank {rank}")
            outputs = _random_outputs(call, rank, (local, rows_per_expert, hidden))
            outputs_dev = outputs.to(device)
            expected = oracle.combine(outputs, weights, theirs.handle)[0]
            same_bits(comm.low_latency_combine(_rewritten(outputs_dev), weights_dev, ours.handle), expected,
                      f"hidden {hidden}, combine, call {call}")
            # The weights sent with the dispatch: the owners' sums over the same odd rows.
            ours = comm.low_latency_dispatch(_rewritten(x_dev), idx_dev, config.num_experts, topk_weights=weights_dev,
                                             **kwargs)
            theirs = oracle.dispatch(x, idx, config.num_experts, topk_weights=weights, **kwargs)
            same_bits(comm.low_latency_combine(_rewritten(outputs_dev), None, ours.handle),
                      oracle.combine(outputs, None, theirs.handle)[0], f"hidden {hidden}, owner sums, call {call}")
        comm.check_errors()
        comm.close()
        del comm


@pytest.mark.gpu
def test_odd_row_sizes_and_a_communicator_on_reused_memory():
    require_ranks(2)
    run_ranks(_odd_shapes_worker, 2)


def _back_to_back_worker(rank: int, world_size: int) -> None:
    """Calls with changing routings and token counts, nothing cleared in between: a peer's staging row
    left by the call before last on the same area (another routing) must not be taken for this one's."""
    comm = _kernel_communicator(world_size, num_sms=6)
    oracle = ReferenceLowLatency(comm.reference, comm._low_latency.config)
    device = torch.device("cuda", torch.cuda.current_device())
    num_experts = comm._low_latency.config.num_experts
    clock = comm._low_latency.record_phases(16)  # stamping must change nothing the calls produce
    for call in range(8):
        routing = ROUTINGS[call % 4]
        inputs = _every_rank_inputs(100 + call, routing, world_size, num_experts)[rank]
        mode = ("bf16", "quantize")[call % 2]
        kwargs = dict(quantize_fp8=True) if mode == "quantize" else {}
        ours = comm.low_latency_dispatch(inputs.x.to(device), inputs.topk_idx.to(device), num_experts, **kwargs)
        theirs = oracle.dispatch(inputs.x, inputs.topk_idx, num_experts, **kwargs)
        _check_received(ours, theirs, f"call {call} ({routing}, {mode}), rank {rank}")
    comm.check_errors()
    phases = list(comm._low_latency.kernels.PHASES)
    _check_phase_clock(clock.cpu().numpy(), phases, calls=8, blocks=6, stamped=phases[: phases.index("end") + 1])

    # A round trip whose receive is a launch of its own (a hook): the send, the receive and the combine all
    # stamp the dispatch's one slot, in order; and no graph is captured while the clock is on.
    clock = comm._low_latency.record_phases(4)
    inputs = _every_rank_inputs(200, "uniform", world_size, num_experts)[rank]
    ours = comm.low_latency_dispatch(inputs.x.to(device), inputs.topk_idx.to(device), num_experts,
                                     return_recv_hook=True)
    ours.hook()
    comm.low_latency_combine(comm.low_latency_combine_input(ours.handle), inputs.topk_weights.to(device), ours.handle)
    comm.check_errors()
    pulled = [p for p in phases if p not in ("partials sent", "partials arrived")]
    _check_phase_clock(clock.cpu().numpy(), phases, calls=1, blocks=6, stamped=pulled)
    # The same with the weights sent with the dispatch and a hooked combine: the owner sums' phases instead.
    clock = comm._low_latency.record_phases(4)
    ours = comm.low_latency_dispatch(inputs.x.to(device), inputs.topk_idx.to(device), num_experts,
                                     return_recv_hook=True, topk_weights=inputs.topk_weights.to(device))
    ours.hook()
    _, _, hook = comm.low_latency_combine_async(comm.low_latency_combine_input(ours.handle), None, ours.handle,
                                                return_recv_hook=True)
    hook()
    comm.check_errors()
    _check_phase_clock(clock.cpu().numpy(), phases, calls=1, blocks=6,
                       stamped=[p for p in phases if p != "outputs ready"])
    x, idx = inputs.x.to(device), inputs.topk_idx.to(device)
    with mock.patch.object(torch._C, "_cuda_isCurrentStreamCapturing", return_value=True):  # as under capture
        with pytest.raises(RuntimeError, match="record_phases: the phase clock is on"):
            comm.low_latency_dispatch(x, idx, num_experts)
    assert comm._low_latency.record_phases(0) is None
    for bad in (-1, True, 2.0):  # refused before the clock changes: the kernels never stamp a freed one
        with pytest.raises(ValueError, match="^slots: expected an int >= 0"):
            comm._low_latency.record_phases(bad)
    comm.low_latency_dispatch(x, idx, num_experts)  # the refused call changed nothing: the next one runs
    comm.check_errors()
    comm.close()


def _check_phase_clock(clock, phases: list[str], calls: int, blocks: int, stamped: list[str]) -> None:
    """One slot per call, each block's `stamped` phases stamped and in order, no other block or phase."""
    used = clock[:, 0, 0] > 0
    assert used.sum() == calls, f"{used.sum()} slots stamped for {calls} calls"
    stamps = clock[used]
    columns = [phases.index(name) for name in stamped]
    others = [i for i in range(len(phases)) if i not in columns]
    assert (stamps[:, :blocks][:, :, columns] > 0).all() and (stamps[:, blocks:] == 0).all()
    assert (stamps[:, :, others] == 0).all()
    assert (np.diff(stamps[:, :blocks][:, :, columns], axis=2) >= 0).all(), "a block's phases out of order"
    rows = phase_times(clock, phases)
    assert [r.phase for r in rows] == stamped and all(r.calls == calls for r in rows)
    # Every call starts at its first block's start; a call takes microseconds, not seconds.
    assert rows[0].first_block_us == 0.0 and 0.0 < rows[-1].last_block_us < 1e6


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", [2, 4])
def test_back_to_back_calls_never_take_a_stale_staging_row(world_size):
    require_ranks(world_size)
    run_ranks(_back_to_back_worker, world_size)


def _hooks_and_graphs_worker(rank: int, world_size: int) -> None:
    comm = _kernel_communicator(world_size)
    oracle = ReferenceLowLatency(comm.reference, comm._low_latency.config)
    device = torch.device("cuda", torch.cuda.current_device())
    num_experts = comm._low_latency.config.num_experts
    inputs = _every_rank_inputs(5, "uniform", world_size, num_experts)[rank]
    x, idx, weights = inputs.x.to(device), inputs.topk_idx.to(device), inputs.topk_weights.to(device)
    theirs = oracle.dispatch(inputs.x, inputs.topk_idx, num_experts)
    expected = oracle.combine(oracle.combine_input(theirs.handle).copy_(theirs.x), inputs.topk_weights,
                              theirs.handle)[0]

    # Two micro-batches in flight with hooks: both send, then both receive.
    first = comm.low_latency_dispatch(x, idx, num_experts, return_recv_hook=True)
    second = comm.low_latency_dispatch(x, idx, num_experts, return_recv_hook=True)
    with pytest.raises(ValueError, match="handle: its dispatch has not received yet"):
        comm.low_latency_combine_input(first.handle)
    with pytest.raises(ValueError, match="return_recv_hook: dispatch 1 on the same receive area"):
        comm.low_latency_dispatch(x, idx, num_experts)
    first.hook()
    second.hook()
    _check_received(first, theirs, "hook, first")
    _check_received(second, theirs, "hook, second")
    y, event, hook = comm.low_latency_combine_async(first.x.clone(), weights, first.handle, return_recv_hook=True)
    hook()
    same_bits(y, expected, "combine with a hook")
    with pytest.raises(RuntimeError, match="hook: already called"):
        hook()
    # Calls from two streams keep their order: a dispatch from a side stream, its combine from the main one.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        from_side = comm.low_latency_dispatch(x, idx, num_experts)
    torch.cuda.current_stream().wait_stream(side)
    same_bits(comm.low_latency_combine(from_side.x.clone(), weights, from_side.handle), expected, "two streams")
    # On the communication stream: asynchronous (wait on the event), and after an event (the caller's stream waits).
    third = comm.low_latency_dispatch(x, idx, num_experts, async_finish=True)
    third.event.wait()
    _check_received(third, theirs, "async dispatch")
    after_event = comm.low_latency_dispatch(x, idx, num_experts, previous_event=third.event)
    _check_received(after_event, theirs, "dispatch after an event")
    third = comm.low_latency_dispatch(x, idx, num_experts)
    with pytest.raises(SlotReusedError, match="handle: 5 low-latency dispatches ran"):
        comm.low_latency_combine(first.x, weights, first.handle)
    y, event, _ = comm.low_latency_combine_async(third.x.clone(), weights, third.handle)
    event.wait()
    same_bits(y, expected, "async combine")

    # The weights sent with the dispatch: hooks on both calls, then a captured round trip further below.
    carried = oracle.dispatch(inputs.x, inputs.topk_idx, num_experts, topk_weights=inputs.topk_weights)
    by_owner = oracle.combine(oracle.combine_input(carried.handle).copy_(carried.x), None, carried.handle)[0]
    sent = comm.low_latency_dispatch(x, idx, num_experts, return_recv_hook=True, topk_weights=weights)
    sent.hook()
    _check_received(sent, carried, "hook, weights sent")
    y, event, hook = comm.low_latency_combine_async(sent.x.clone(), None, sent.handle, return_recv_hook=True)
    hook()
    same_bits(y, by_owner, "combine summed at the owners with a hook")
    # Two micro-batches, one summing at the owners and one pulling, their combines' hooks interleaved with
    # the next dispatch onto the first one's area.
    a = comm.low_latency_dispatch(x, idx, num_experts, topk_weights=weights)
    b = comm.low_latency_dispatch(x, idx, num_experts)
    y_a, _, hook_a = comm.low_latency_combine_async(a.x.clone(), None, a.handle, return_recv_hook=True)
    y_b, _, hook_b = comm.low_latency_combine_async(b.x.clone(), weights, b.handle, return_recv_hook=True)
    hook_a()
    again = comm.low_latency_dispatch(x, idx, num_experts, topk_weights=weights)
    hook_b()
    same_bits(y_a, by_owner, "interleaved hooks: owner sums")
    same_bits(y_b, expected, "interleaved hooks: pull")
    same_bits(comm.low_latency_combine(again.x.clone(), None, again.handle), by_owner, "interleaved hooks: next call")

    # A captured dispatch + combine replays with fresh inputs (the epochs live on the device).
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        warm = comm.low_latency_dispatch(static_x, idx, num_experts)
        comm.low_latency_combine(warm.x.clone(), weights, warm.handle)
        warm = comm.low_latency_dispatch(static_x, idx, num_experts, topk_weights=weights)
        comm.low_latency_combine(warm.x.clone(), None, warm.handle)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = comm.low_latency_dispatch(static_x, idx, num_experts)
        y_static = comm.low_latency_combine(captured.x, weights, captured.handle)
        summed_at_owners = comm.low_latency_dispatch(static_x, idx, num_experts, topk_weights=weights)
        y_owners = comm.low_latency_combine(summed_at_owners.x, None, summed_at_owners.handle)
    for replay in range(3):
        torch.cuda.synchronize()
        dist.barrier()
        fresh = (torch.randn(x.shape, generator=torch.Generator().manual_seed(replay * 10 + rank)) * 2).to(torch.bfloat16)
        static_x.copy_(fresh.to(device))
        graph.replay()
        torch.cuda.synchronize()
        replayed = oracle.dispatch(fresh, inputs.topk_idx, num_experts)
        _check_received(captured, replayed, f"replay {replay}")
        want = oracle.combine(oracle.combine_input(replayed.handle).copy_(replayed.x), inputs.topk_weights,
                              replayed.handle)[0]
        same_bits(y_static, want, f"replay {replay}: combine")
        replayed = oracle.dispatch(fresh, inputs.topk_idx, num_experts, topk_weights=inputs.topk_weights)
        want = oracle.combine(oracle.combine_input(replayed.handle).copy_(replayed.x), None, replayed.handle)[0]
        same_bits(y_owners, want, f"replay {replay}: combine summed at the owners")
    comm.check_errors()
    comm.close()


@pytest.mark.gpu
def test_receive_hooks_two_micro_batches_and_graph_replays():
    require_ranks(2)
    run_ranks(_hooks_and_graphs_worker, 2)


def _failure_worker(rank: int, world_size: int) -> None:
    comm = _kernel_communicator(world_size, timeout_s=2.0)
    device = torch.device("cuda", torch.cuda.current_device())
    num_experts = comm._low_latency.config.num_experts
    x = torch.randn(8, HIDDEN, device=device).to(torch.bfloat16)
    idx = torch.zeros(8, 2, dtype=torch.int64, device=device)
    if rank == 1:
        idx[3, 1] = num_experts  # invalid: skipped on the GPU, reported at the next call
    comm.low_latency_dispatch(x, idx, num_experts)
    torch.cuda.synchronize()
    if rank == 1:
        with pytest.raises(CommunicationError, match="topk_idx had invalid expert ids"):
            comm.check_errors()
    dist.barrier()
    # Ranks sending different row formats in one call: every rank raises, naming a rank that differs.
    mixed = _kernel_communicator(world_size)
    mixed.low_latency_dispatch(x, torch.zeros_like(idx), num_experts, quantize_fp8=rank > 0)
    torch.cuda.synchronize()
    with pytest.raises(CommunicationError, match="dispatched the other row format") as info:
        mixed.check_errors()
    assert info.value.peer == (1 if rank == 0 else 0)
    dist.barrier()
    # Weights sent with the dispatch by rank 0 only: the same.
    mixed = _kernel_communicator(world_size)
    weights = torch.ones(idx.shape, dtype=torch.float32, device=device) if rank == 0 else None
    mixed.low_latency_dispatch(x, torch.zeros_like(idx), num_experts, topk_weights=weights)
    torch.cuda.synchronize()
    with pytest.raises(CommunicationError, match="dispatched the other row format") as info:
        mixed.check_errors()
    assert info.value.peer == (1 if rank == 0 else 0)
    dist.barrier()
    # On a further communicator rank 0 stops answering: the others' waits give up naming the stage and rank 0.
    silent = _kernel_communicator(world_size, timeout_s=2.0)
    if rank != 0:
        silent.low_latency_dispatch(x, torch.zeros_like(idx), num_experts)
        torch.cuda.synchronize()
        with pytest.raises(CommunicationError, match="low_latency_rows") as info:
            silent.check_errors()
        assert info.value.peer == 0
    dist.barrier()
    # Every token's experts on rank 0, which dispatches with the weights and then never combines: the others'
    # combines wait for its partials (after summing their own), give up, and name the stage and rank 0.
    silent = _kernel_communicator(world_size, timeout_s=2.0)
    weights = torch.ones(idx.shape, dtype=torch.float32, device=device)
    received = silent.low_latency_dispatch(x, torch.zeros_like(idx), num_experts, topk_weights=weights)
    if rank != 0:
        silent.low_latency_combine(silent.low_latency_combine_input(received.handle), None, received.handle)
        torch.cuda.synchronize()
        with pytest.raises(CommunicationError, match="low_latency_partials") as info:
            silent.check_errors()
        assert info.value.peer == 0
    torch.cuda.synchronize()
    dist.barrier()


@pytest.mark.gpu
def test_bad_ids_and_a_silent_rank_are_reported_naming_them():
    require_ranks(3)
    run_ranks(_failure_worker, 3, timeout_s=60)


def test_a_dead_communicators_handle_is_refused_by_a_new_one(single_rank_group):
    """Handles name their communicator by a number never reused (id() is, once the communicator is gone)."""
    import gc

    config = _config(1)
    x, idx = torch.randn(4, HIDDEN).to(torch.bfloat16), torch.zeros(4, 2, dtype=torch.int64)
    old = deepcomm.Communicator(single_rank_group, backend="reference", low_latency=config)
    handle = old.low_latency_dispatch(x, idx, config.num_experts).handle
    del old
    gc.collect()
    seen = set()
    for _ in range(20):  # enough new ones that one would likely take the dead one's id()
        new = deepcomm.Communicator(single_rank_group, backend="reference", low_latency=config)
        with pytest.raises(TypeError, match="handle: expected the handle of a low-latency dispatch on this communicator"):
            new.low_latency_combine(torch.zeros(config.recv_shape(1), dtype=torch.bfloat16), torch.ones(4, 2), handle)
        seen.add(new._low_latency.owner_id)
        del new
        gc.collect()
    assert len(seen) == 20
