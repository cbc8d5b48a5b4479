"""Internode (hierarchical) kernels against the reference path, bit for bit.

Nodes are carved out of the GPU(s) with ranks_per_node (DESIGN.md decision 3):
2 nodes x 2, 2 x 4 and 4 x 2 ranks, the inter-node leg through CUDA IPC
(direct stores, and staged like a NIC) or NVSHMEM. Byte counters are checked
exactly against deepcomm.traffic, computed from the routing alone.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

import deepcomm
from cases import make_inputs
from deepcomm import _ext, fp8
from deepcomm.traffic import leg_rows
from dist import run_ranks
from kernel_checks import a_differing_dispatch, combine_from_combine_input, dispatch_both, refused_at_notify
from kernel_checks import require_ranks, same_bits

pytestmark = pytest.mark.gpu

HIDDEN = 512
NUM_TOPK = 6
MAX_TOKENS = 96
ROUTINGS = ("uniform", "skewed", "minus_one", "empty_experts", "node_limited_1", "node_limited_2")


def _communicator(ranks_per_node: int, transport: str, num_sms: int = 4, hidden: int = HIDDEN,
                  **kwargs) -> deepcomm.Communicator:
    torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    config = deepcomm.BufferConfig(max_tokens_per_rank=MAX_TOKENS, hidden=hidden, num_topk=8)
    comm = deepcomm.Communicator(backend="internode", buffer=config, ranks_per_node=ranks_per_node,
                                 transport=transport, num_sms=num_sms, **kwargs)
    assert comm.backend == "internode" and comm.topology.num_nodes > 1
    return comm


def _poison_receive_slots(comm: deepcomm.Communicator) -> None:
    torch.cuda.synchronize()
    dist.barrier()
    impl = comm._impl
    impl.buffer[impl.kernels.NODE_DATA_OFFSET :].fill_(0xFF)
    torch.cuda.synchronize()
    dist.barrier()


def _expected_bytes(comm, all_topk, num_experts, hidden, mode) -> dict[str, int]:
    kernels = _ext.extension().internode
    x_bytes, scale_cols = (2 * hidden, 0) if mode == "bf16" else (hidden, hidden // fp8.BLOCK_CHANNELS)
    stride = kernels.row_stride(x_bytes, scale_cols, comm.topology.ranks_per_node, NUM_TOPK)
    slot_row = kernels.slot_row_bytes(x_bytes, scale_cols, NUM_TOPK)
    rows = leg_rows(all_topk, num_experts, comm.topology)
    return {
        "dispatch_boundary": rows["dispatch_boundary"] * stride,
        "dispatch_nvlink_direct": rows["dispatch_nvlink_direct"] * slot_row,
        "dispatch_nvlink_forward": rows["dispatch_nvlink_forward"] * slot_row,
        "combine_boundary": rows["combine_boundary"] * 2 * hidden,
        "combine_nvlink": rows["combine_nvlink"] * 2 * hidden,
    }


def _agreement_worker(rank: int, world_size: int, ranks_per_node: int, transport: str, sms: tuple,
                      hidden: int = HIDDEN) -> None:
    comm = _communicator(ranks_per_node, transport, num_sms=sms[0], hidden=hidden)
    device = torch.device("cuda", torch.cuda.current_device())
    num_experts = 8 * world_size
    num_nodes = world_size // ranks_per_node
    for seed, routing in enumerate(ROUTINGS):
        generator = torch.Generator().manual_seed(seed)
        num_tokens = [int(v) for v in torch.randint(1, MAX_TOKENS + 1, (world_size,), generator=generator)]
        num_tokens[seed % world_size] = 0  # a rank with no tokens
        inputs = [make_inputs(seed, r, num_tokens[r], hidden, NUM_TOPK, num_experts, routing, num_nodes)
                  for r in range(world_size)]
        local = inputs[rank]
        local.x, local.topk_idx, local.topk_weights = (t.to(device) for t in (local.x, local.topk_idx, local.topk_weights))
        modes = (("bf16", sms[0]), ("fp8", sms[1]), ("quantize", sms[0]), ("quantize_pow2", sms[1]), ("bf16", 2))
        for mode, num_sms in modes:
            where = f"{routing}/{mode}/sms{num_sms}/rank{rank}"
            _poison_receive_slots(comm)
            before = comm.traffic()
            ours, theirs = dispatch_both(comm, local, mode, num_experts, num_sms)
            torch.cuda.synchronize()
            comm.check_errors()
            for name in ("x", "x_scales", "topk_idx", "topk_weights", "num_tokens_per_expert"):
                same_bits(getattr(ours, name), getattr(theirs, name), f"{where}: {name}")
            assert ours.num_recv_tokens_per_rank == theirs.num_recv_tokens_per_rank, where
            # The host's copy of the per-expert counts, read in the same wait as the row counts.
            assert ours.num_recv_tokens_per_expert_list == theirs.num_tokens_per_expert.tolist(), where

            # Combine of arbitrary rows; the oracle is the reference path (same node grouping) on CPU.
            cpu = comm.reference.dispatch(inputs[rank].x.cpu(), inputs[rank].topk_idx.cpu(),
                                          inputs[rank].topk_weights.cpu(), num_experts)
            expert_out = torch.randn(ours.x.shape, generator=generator).to(torch.bfloat16)
            y = comm.combine(expert_out.to(device), ours.handle, num_sms=num_sms)
            same_bits(y, comm.reference.combine(expert_out, cpu.handle), f"{where}: combine")

            moved = {k: v - before[k] for k, v in comm.traffic().items()}
            all_topk = [i.topk_idx for i in inputs]
            expected = _expected_bytes(comm, all_topk, num_experts, hidden, "bf16" if mode == "bf16" else "fp8")
            assert moved == expected, f"{where}: bytes per leg {moved} != {expected}"

        # Round trip from the receive slot, and async calls chained by events.
        ours, _ = dispatch_both(comm, local, "bf16", num_experts, sms[0])
        cpu = comm.reference.dispatch(inputs[rank].x.cpu(), inputs[rank].topk_idx.cpu(),
                                      inputs[rank].topk_weights.cpu(), num_experts)
        expected_round_trip = comm.reference.combine(cpu.x, cpu.handle)
        same_bits(comm.combine(ours.x, ours.handle), expected_round_trip, f"{routing}: round trip from the slot")
        # Outputs written where combine reads them, over an fp8 dispatch's slot (a different layout).
        ours_fp8, _ = dispatch_both(comm, local, "fp8", num_experts, sms[1])
        expert_out = torch.randn(ours.x.shape, generator=generator).to(torch.bfloat16)
        combine_from_combine_input(comm, ours_fp8.handle, expert_out, comm.reference.combine(expert_out, cpu.handle),
                                   f"{routing}: combine_input")
        first = comm.dispatch_async(local.x, local.topk_idx, local.topk_weights, num_experts,
                                    previous_event=deepcomm.EventHandle.record(device))
        second = comm.dispatch_async(local.x, local.topk_idx, local.topk_weights, num_experts,
                                     previous_event=first.event)
        # Two micro-batches in flight: both dispatched before either combines.
        y1, _ = comm.combine_async(first.x, first.handle, previous_event=second.event)
        y2, event = comm.combine_async(second.x, second.handle)
        event.wait()
        same_bits(y1, expected_round_trip, f"{routing}: async round trip, first micro-batch")
        same_bits(y2, expected_round_trip, f"{routing}: async round trip, second micro-batch")
        with pytest.raises(ValueError, match="^handle: 2 dispatches ran since"):
            comm.combine_input(ours_fp8.handle)
    torch.cuda.synchronize()
    dist.barrier()
    comm._impl.close()


# (world size, ranks per node, transport, SM counts, hidden). Ranks sharing a GPU must fit at once.
# Hidden 128 and 640 give rows whose 16-byte units leave lanes idle in the last step of a reduction
# (16 and 80 units): warp-collective code there must still run on every lane.
LAYOUTS = [
    (4, 2, "ipc", (24, 5), HIDDEN),
    (4, 2, "ipc_staged", (24, 3), 128),
    (8, 4, "ipc", (16, 3), HIDDEN),
    (8, 2, "ipc", (16, 4), HIDDEN),
    (8, 2, "ipc_staged", (12, 2), 640),
]


@pytest.mark.parametrize("world_size,ranks_per_node,transport,sms,hidden", LAYOUTS)
def test_internode_matches_reference_bit_for_bit_and_counts_bytes(world_size, ranks_per_node, transport, sms, hidden):
    require_ranks(world_size)
    run_ranks(_agreement_worker, world_size, ranks_per_node, transport, sms, hidden, timeout_s=300)


def _nvshmem_ok() -> None:
    if not hasattr(_ext.extension(), "nvshmem"):
        pytest.skip("built without NVSHMEM")


@pytest.mark.multigpu
@pytest.mark.parametrize("transport", ["nvshmem", "nvshmem_staged"])  # stores into mapped peers / puts only
@pytest.mark.parametrize("world_size,ranks_per_node", [(2, 1), (4, 2)])
def test_internode_over_nvshmem(world_size, ranks_per_node, transport):
    require_ranks(world_size)
    _nvshmem_ok()
    if world_size > torch.cuda.device_count():
        pytest.skip("NVSHMEM wants a GPU per PE here (see test_internode_over_nvshmem_on_one_gpu)")
    run_ranks(_agreement_worker, world_size, ranks_per_node, transport, (16, 4), timeout_s=300)


@pytest.mark.skipif(os.environ.get("DEEPCOMM_NVSHMEM_SHARED_GPU") != "1",
                    reason="opt-in: NVSHMEM with several PEs on one GPU (tools/gpu_check.sh tries it)")
@pytest.mark.parametrize("transport", ["nvshmem", "nvshmem_staged"])
def test_internode_over_nvshmem_on_one_gpu(transport):
    require_ranks(2)
    _nvshmem_ok()
    run_ranks(_agreement_worker, 2, 1, transport, (8, 4), timeout_s=300)


def _skipping_rank_worker(rank: int, world_size: int) -> None:
    comm = _communicator(2, "ipc", timeout_s=2.0)
    device = torch.device("cuda", torch.cuda.current_device())
    inputs = make_inputs(3, rank, 16, HIDDEN, NUM_TOPK, 8 * world_size, "uniform", 2)
    x, topk_idx, topk_weights = (t.to(device) for t in (inputs.x, inputs.topk_idx, inputs.topk_weights))
    result = comm.dispatch(x, topk_idx, topk_weights, 8 * world_size, num_sms=4)  # everyone takes part once
    torch.cuda.synchronize()
    if rank == world_size - 1:
        time.sleep(14)  # alive, but skips the next calls; leaves last
        return
    # Combine: the silent rank's node peer sees it in combine_ready; other nodes wait for its partials.
    start = time.monotonic()
    comm.combine(result.x, result.handle, num_sms=4)
    with pytest.raises(deepcomm.CommunicationError) as info:
        torch.cuda.synchronize()
        comm.check_errors()
    elapsed = time.monotonic() - start
    assert info.value.rank == rank and info.value.peer is not None
    assert info.value.stage in ("combine_ready", "combine_recv", "combine_credit", "combine_done"), info.value
    assert elapsed < 8.0, f"gave up after {elapsed:.1f}s with a 2s timeout"
    with pytest.raises(deepcomm.CommunicationError):  # the communicator stays failed
        comm.dispatch(x, topk_idx, topk_weights, 8 * world_size, num_sms=4)
    torch.cuda.synchronize()
    time.sleep(4)


def test_internode_rank_that_skips_a_call_makes_the_others_raise_naming_it():
    require_ranks(4)
    run_ranks(_skipping_rank_worker, 4, timeout_s=90)


def _skipping_notify_worker(rank: int, world_size: int) -> None:
    comm = _communicator(2, "ipc", timeout_s=2.0)
    device = torch.device("cuda", torch.cuda.current_device())
    inputs = make_inputs(4, rank, 16, HIDDEN, NUM_TOPK, 8 * world_size, "uniform", 2)
    x, topk_idx, topk_weights = (t.to(device) for t in (inputs.x, inputs.topk_idx, inputs.topk_weights))
    comm.dispatch(x, topk_idx, topk_weights, 8 * world_size, num_sms=4)
    torch.cuda.synchronize()
    if rank == 1:
        time.sleep(12)
        return
    with pytest.raises(deepcomm.CommunicationError) as info:
        comm.dispatch(x, topk_idx, topk_weights, 8 * world_size, num_sms=4)
    assert info.value.stage == "notify" and info.value.peer == 1 and info.value.rank == rank
    torch.cuda.synchronize()
    time.sleep(4)


def test_internode_rank_that_skips_dispatch_is_named_at_notify():
    require_ranks(4)
    run_ranks(_skipping_notify_worker, 4, timeout_s=90)


def _shape_mismatch_worker(rank: int, world_size: int, differs: str) -> None:
    comm = _communicator(2, "ipc", timeout_s=30.0)
    device = torch.device("cuda", torch.cuda.current_device())
    inputs = make_inputs(5, rank, 16, HIDDEN, NUM_TOPK, 8 * world_size, "uniform", 2)
    x, topk_idx, topk_weights = (t.to(device) for t in (inputs.x, inputs.topk_idx, inputs.topk_weights))
    comm.dispatch(x, topk_idx, topk_weights, 8 * world_size)  # one good call first
    _poison_receive_slots(comm)
    x, kwargs = a_differing_dispatch(x, differs, num_sms=6) if rank == 3 else (x, {})
    impl = comm._impl
    refused_at_notify(lambda: comm.dispatch(x, topk_idx, topk_weights, 8 * world_size, **kwargs),
                      range(world_size), impl.buffer[impl.kernels.NODE_DATA_OFFSET :], f"rank {rank}")
    dist.barrier()


@pytest.mark.parametrize("differs", ["hidden", "num_sms"])
def test_internode_ranks_whose_dispatch_shapes_differ_all_raise_at_once_and_nothing_moves(differs):
    """2 nodes x 2 ranks, one rank with another hidden size or num_sms: every rank raises at notify."""
    require_ranks(4)
    run_ranks(_shape_mismatch_worker, 4, differs, timeout_s=90)


def _bad_input_worker(rank: int, world_size: int) -> None:
    comm = _communicator(1, "ipc")
    device = torch.device("cuda", torch.cuda.current_device())
    small = torch.randn(4, HIDDEN, device=device).to(torch.bfloat16)
    topk_idx = torch.zeros(4, 2, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="^num_sms:"):
        comm.dispatch(small, topk_idx, torch.rand(4, 2, device=device), 8 * world_size, num_sms=1)
    if torch.cuda.device_count() == 1:  # both ranks on one GPU: their blocks must fit at once
        too_many = torch.cuda.get_device_properties(device).multi_processor_count // 2 + 1
        with pytest.raises(ValueError, match="^num_sms: 2 ranks share this GPU"):
            comm.dispatch(small, topk_idx, torch.rand(4, 2, device=device), 8 * world_size, num_sms=too_many)
    bad_idx = topk_idx.clone()
    if rank == 0:
        bad_idx[2, 1] = 8 * world_size
    with pytest.raises(ValueError, match="^topk_idx: .*rank 0 passed 1 invalid"):
        comm.dispatch(small, bad_idx, torch.rand(4, 2, device=device), 8 * world_size, num_sms=4)
    good = comm.dispatch(small, topk_idx, torch.ones(4, 2, device=device), 8 * world_size, num_sms=4)
    assert good.x.shape[0] == (4 * world_size if rank == 0 else 0)
    y = comm.combine(good.x, good.handle, num_sms=4)
    assert torch.equal(y, small)  # one rank held each token: y == x
    torch.cuda.synchronize()
    dist.barrier()


def test_internode_bad_input_and_recovery():
    require_ranks(2)
    run_ranks(_bad_input_worker, 2)

