"""GPU tests: the layout kernel against the torch layout, CUDA IPC between processes,
the reference path on CUDA tensors, and the NVSHMEM bootstrap (several GPUs)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import deepcomm
from cases import make_inputs
from deepcomm import _ext
from deepcomm.layout import dispatch_layout_cuda, dispatch_layout_torch, send_positions
from deepcomm.topology import Topology
from dist import run_ranks

pytestmark = pytest.mark.gpu


def _needs_extension():
    if not _ext.available():
        pytest.skip(f"extension not built: {deepcomm.features()['extension_error']}")


@pytest.mark.parametrize("world_size,ranks_per_node", [(1, 1), (2, 1), (8, 4), (16, 8), (64, 8), (256, 8)])
@pytest.mark.parametrize("routing", ["uniform", "skewed", "empty_experts", "minus_one", "node_limited_2"])
# Up to 256 tokens the layout is one block that stores its counts and scans send positions itself.
@pytest.mark.parametrize("num_tokens", [0, 1, 128, 256, 257, 4096, 10000])
def test_layout_kernel_matches_torch(world_size, ranks_per_node, routing, num_tokens):
    _needs_extension()
    topology = Topology(0, world_size, ranks_per_node)
    num_experts = max(256, world_size) if world_size > 1 else 64
    inputs = make_inputs(num_tokens + world_size, 0, num_tokens, 8, 8, num_experts, routing, topology.num_nodes)
    topk_idx = inputs.topk_idx.cuda()
    expected = dispatch_layout_torch(topk_idx, num_experts, topology)
    send_pos = torch.full((num_tokens, world_size), -5, dtype=torch.int32, device="cuda")
    actual = dispatch_layout_cuda(topk_idx, num_experts, topology, send_pos=send_pos)
    for field in ("num_tokens_per_rank", "num_tokens_per_node", "num_tokens_per_expert", "is_token_in_rank"):
        assert torch.equal(getattr(actual, field), getattr(expected, field)), field
    assert torch.equal(send_pos, send_positions(expected.is_token_in_rank))


@pytest.mark.parametrize("num_tokens", [0, 100, 777])  # the one-block path (no memset) and the grid
def test_layout_kernel_overwrites_poisoned_outputs(num_tokens):
    _needs_extension()
    core = _ext.extension()
    topology = Topology(0, 8, 2)
    topk_idx = make_inputs(1, 0, num_tokens, 8, 8, 64, "minus_one", 4).topk_idx.cuda()
    outputs = [
        torch.full((8,), -7, dtype=torch.int32, device="cuda"),
        torch.full((4,), -7, dtype=torch.int32, device="cuda"),
        torch.full((64,), -7, dtype=torch.int32, device="cuda"),
        torch.full((num_tokens, 8), 0x55, dtype=torch.uint8, device="cuda").view(torch.bool),
        torch.full((1,), -7, dtype=torch.int32, device="cuda"),  # invalid ids
        torch.full((num_tokens, 8), -7, dtype=torch.int32, device="cuda"),  # send positions
    ]
    core.dispatch_layout(topk_idx.data_ptr(), num_tokens, 8, 64, 8, 2, *[t.data_ptr() for t in outputs[:4]], 3,
                         torch.cuda.current_stream().cuda_stream, outputs[4].data_ptr(), outputs[5].data_ptr())
    expected = dispatch_layout_torch(topk_idx, 64, topology)
    assert torch.equal(outputs[0], expected.num_tokens_per_rank)
    assert torch.equal(outputs[1], expected.num_tokens_per_node)
    assert torch.equal(outputs[2], expected.num_tokens_per_expert)
    assert torch.equal(outputs[3].view(torch.uint8), expected.is_token_in_rank.view(torch.uint8))
    assert int(outputs[4]) == 0
    assert torch.equal(outputs[5], send_positions(expected.is_token_in_rank))


def test_device_queries_agree_with_torch():
    _needs_extension()
    core = _ext.extension()
    assert core.device_count() == torch.cuda.device_count()
    info = core.device_info(0)
    props = torch.cuda.get_device_properties(0)
    assert info["num_sms"] == props.multi_processor_count
    assert info["compute_capability"] == (props.major, props.minor)
    assert core.driver_version() > 0


def _ipc_worker(rank: int, world_size: int) -> None:
    from deepcomm.ipc import PeerTensor, export_tensor

    torch.cuda.set_device(rank % torch.cuda.device_count())
    # A tensor in the middle of a larger allocation: the offset must survive the export.
    backing = torch.zeros(1 << 20, dtype=torch.bfloat16, device="cuda")
    mine = backing[4096 : 4096 + 1000].view(10, 100)
    mine.copy_(torch.arange(1000, dtype=torch.float32).view(10, 100).to(torch.bfloat16) + rank)
    torch.cuda.synchronize()
    handles = [None] * world_size
    dist.all_gather_object(handles, export_tensor(mine))
    peer_rank = (rank + 1) % world_size
    with PeerTensor(handles[peer_rank]) as peer:
        expected = torch.arange(1000, dtype=torch.float32).view(10, 100).to(torch.bfloat16) + peer_rank
        assert torch.equal(peer.tensor, expected.cuda())
        dist.barrier()
        peer.tensor[0, 0] = -rank - 1  # write into the peer's memory
        torch.cuda.synchronize()
        dist.barrier()
    previous = (rank - 1) % world_size
    assert float(mine[0, 0]) == -previous - 1


def test_ipc_handles_between_processes():
    _needs_extension()
    run_ranks(_ipc_worker, 2)


def test_ipc_rejects_cpu_tensors():
    _needs_extension()
    from deepcomm.ipc import export_tensor

    with pytest.raises(ValueError, match="tensor"):
        export_tensor(torch.zeros(4))


def _reference_cuda_worker(rank: int, world_size: int, ranks_per_node: int) -> None:
    from test_reference import _contract_worker

    torch.cuda.set_device(rank % torch.cuda.device_count())
    _contract_worker(rank, world_size, ranks_per_node, torch.device("cuda"))


@pytest.mark.parametrize("world_size,ranks_per_node", [(2, 1), (4, 2)])
def test_reference_path_on_cuda_tensors(world_size, ranks_per_node):
    run_ranks(_reference_cuda_worker, world_size, ranks_per_node)


def _nvshmem_worker(rank: int, world_size: int) -> None:
    core = _ext.extension()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    unique_id = [core.nvshmem.unique_id() if rank == 0 else None]
    dist.broadcast_object_list(unique_id, src=0)
    core.nvshmem.init(unique_id[0], rank, world_size)
    try:
        assert core.nvshmem.my_pe() == rank and core.nvshmem.n_pes() == world_size
        slot = core.nvshmem.malloc(4)
        core.nvshmem.ring_exchange(slot, torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        value = torch.empty(1, dtype=torch.int32, device="cuda")
        from deepcomm.ipc import _CudaArray

        value.copy_(torch.as_tensor(_CudaArray(slot, 4), device="cuda").view(torch.int32))
        assert int(value) == (rank - 1) % world_size
        core.nvshmem.barrier_all()
        core.nvshmem.free(slot)
    finally:
        core.nvshmem.finalize()


@pytest.mark.multigpu
def test_nvshmem_bootstrap_by_unique_id_and_ring_put():
    _needs_extension()
    if not deepcomm.features()["nvshmem"]:
        pytest.skip("built without NVSHMEM")
    run_ranks(_nvshmem_worker, min(torch.cuda.device_count(), 4))


@pytest.mark.parametrize("power_of_two_scales", [False, True])
def test_fp8_quantisation_is_bit_identical_on_cpu_and_gpu(power_of_two_scales):
    from deepcomm import fp8

    x = (torch.randn(513, 1024) * torch.logspace(-4, 4, 513).unsqueeze(1)).to(torch.bfloat16)
    x[3] = 0
    q_cpu, s_cpu = fp8.quantize_fp8(x, power_of_two_scales)
    q_gpu, s_gpu = fp8.quantize_fp8(x.cuda(), power_of_two_scales)
    assert torch.equal(s_gpu.cpu(), s_cpu)
    assert torch.equal(q_gpu.cpu().view(torch.uint8), q_cpu.view(torch.uint8))


def test_layout_kernel_counts_invalid_ids_without_routing_them():
    _needs_extension()
    topk_idx = torch.tensor([[0, 64, -1], [-2, 3, 63], [5, 6, 7]], device="cuda")
    num_invalid = torch.full((1,), -9, dtype=torch.int32, device="cuda")
    layout = dispatch_layout_cuda(topk_idx, 64, Topology(0, 2, 1), num_invalid=num_invalid)
    assert int(num_invalid) == 2
    assert layout.num_tokens_per_expert.sum().item() == 6
    assert layout.is_token_in_rank.tolist() == [[True, False], [True, True], [True, False]]


def test_order_streams_holds_the_waiter_until_the_waited_work_ends():
    """streams.order_streams (the extension's event record + wait) orders work like wait_stream, host-free."""
    _needs_extension()
    from deepcomm.streams import CallerStream, order_streams

    slow, waiter = torch.cuda.Stream(), torch.cuda.Stream()
    value = torch.zeros(1 << 20, device="cuda")
    with torch.cuda.stream(slow):
        torch.cuda._sleep(50_000_000)  # ~25 ms of spinning before the write
        value.fill_(7.0)
        order_streams(waiter, CallerStream(torch.cuda.current_device()))  # the current stream: `slow`
    with torch.cuda.stream(waiter):
        copy = value.clone()  # queued behind the fill only through the ordering
    torch.cuda.synchronize()
    assert bool((copy == 7.0).all())



@pytest.mark.parametrize("on_current_stream", [True, False])
def test_event_handle_marks_a_point_others_wait_for(on_current_stream):
    """EventHandle (the extension's pooled StreamPoint): query, wait and synchronize see the recorded point."""
    _needs_extension()
    device = torch.device("cuda", torch.cuda.current_device())
    slow, waiter = torch.cuda.Stream(), torch.cuda.Stream()
    value = torch.zeros(1 << 20, device=device)
    with torch.cuda.stream(slow):
        torch.cuda._sleep(50_000_000)  # ~25 ms of spinning before the write
        value.fill_(7.0)
        event = deepcomm.EventHandle.record(device) if on_current_stream else deepcomm.EventHandle.record(device, slow)
    assert not event.query()  # the host did not wait
    event.wait(waiter)
    with torch.cuda.stream(waiter):
        copy = value.clone()  # queued behind the fill only through the event
    event.synchronize()
    assert event.query()
    torch.cuda.synchronize()
    assert bool((copy == 7.0).all())
    # Points come back to the pool and are recorded again: many at once stay independent.
    points = [deepcomm.EventHandle.record(device) for _ in range(64)]
    del points
    later = deepcomm.EventHandle.record(device)
    later.synchronize()
    assert later.query()


@pytest.mark.multigpu
def test_event_handle_records_on_the_streams_device_not_the_current_one():
    """A point on GPU 1's streams while GPU 0 is current: its default stream, and one given explicitly."""
    _needs_extension()
    torch.cuda.set_device(0)
    other = torch.device("cuda", 1)
    on_default = deepcomm.EventHandle.record(other)
    stream = torch.cuda.Stream(other)
    on_stream = deepcomm.EventHandle.record(torch.device("cuda"), stream)  # the stream's device wins
    for point in (on_default, on_stream):
        point.synchronize()
        assert point.query()
    on_stream.wait(torch.cuda.current_stream(0))  # another device's stream may wait on it
    torch.cuda.synchronize(0)


class _Input:
    """Stands in for an input tensor: counts the streams it is marked as used on."""

    def __init__(self) -> None:
        self.marked = []

    def record_stream(self, stream) -> None:
        self.marked.append(stream)


@pytest.mark.parametrize("async_finish", [True, False])
def test_inputs_are_marked_on_the_comm_stream_only_when_the_call_finishes_asynchronously(async_finish):
    """Synchronous finish: the caller's stream waits for the call, so its inputs need no marking."""
    from deepcomm.streams import CommStreamScope, hand_back

    device = torch.device("cuda", torch.cuda.current_device())
    comm, given = torch.cuda.Stream(), _Input()
    with CommStreamScope(comm, None, (given, None), async_finish) as caller:
        hand_back((), device, comm, caller, async_finish)
    assert given.marked == ([comm] if async_finish else [])


def test_a_synchronous_call_failing_in_its_scope_still_orders_the_caller_after_it():
    """Its inputs were not marked, so the caller's stream must not run ahead of what the call queued."""
    from deepcomm.streams import CommStreamScope

    device = torch.device("cuda", torch.cuda.current_device())
    comm = torch.cuda.Stream()
    value = torch.zeros(1 << 20, device=device)
    with pytest.raises(RuntimeError, match="failed"):
        with CommStreamScope(comm, None, (_Input(),), async_finish=False):
            torch.cuda._sleep(50_000_000)  # ~25 ms on the comm stream, then the write
            value.fill_(7.0)
            raise RuntimeError("failed after queueing")
    assert torch.cuda.current_stream() != comm  # the caller's stream is current again
    copy = value.clone()  # on the caller's stream: behind the fill only through the ordering
    torch.cuda.synchronize()
    assert bool((copy == 7.0).all())
