"""Internode (hierarchical) dispatch/combine (csrc/kernels/internode.cu).

When the communicator spans several nodes, each token crosses the node
boundary once per destination node, through the transport, to the rank of
that node with the same local index, which forwards it over NVLink to every
rank of its node that holds one of the token's experts. Combine runs the
other way: each node reduces its ranks' expert outputs for a token first and
sends one partial sum per (token, node) back across the boundary; the home
rank adds the node partials in ascending node order (the reference order).

Memory per rank: an NVLink region shared by CUDA IPC with the ranks of its
node (receive slots, as intranode), a transport region (deepcomm.transport),
and local forward maps that remember, per receive slot, where forwarded rows
went (combine retraces them). Results are views into the receive slots and
stay valid for ``num_recv_slots`` dispatches, as on the intranode path.

All ranks must pass the same ``num_sms`` to a call. Ranks sharing one GPU
must leave room for every rank's blocks at once (ranks × num_sms ≤ SMs):
forwarders wait for senders of other ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from deepcomm import _ext
from deepcomm.errors import CommunicationError, SlotReusedError
from deepcomm.intranode import BufferConfig
from deepcomm.ipc import close_peers, open_peer_buffers
from deepcomm.kernel_common import (
    DispatchScratch, MailboxErrors, ReceiveSlots, ScratchRouting, SlotViews, blocks_of, call_shape,
    check_invalid_ids, check_kernel_dispatch, check_slot_sizes, recv_layout, recv_row_shape,
)
from deepcomm.layout import launch_dispatch_layout
from deepcomm.profiling import name_stream
from deepcomm.results import DispatchResult, HandleOwner
from deepcomm.streams import CommStreamScope, hand_back
from deepcomm.topology import Topology, gpu_share
from deepcomm.transport import make_transport
from deepcomm.validation import check_combine_inputs


@dataclass(frozen=True)
class InternodeHandle(ScratchRouting):
    """What combine needs: where this rank's tokens went, and which dispatch forwarded them."""

    num_tokens: int
    hidden: int
    num_recv_tokens: int
    scratch: DispatchScratch  # the dispatch's routing tensors (node_rows too); combine reads them through pointers
    slot: int
    channels: int
    dispatch_call: int
    owner: int  # owner_id of the communicator that made it (deepcomm.results.HandleOwner)


class InternodeCommunicator(MailboxErrors, ReceiveSlots, HandleOwner):
    """Dispatch/combine across ``topology.num_nodes`` nodes through the hierarchical kernels."""

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        topology: Topology,
        config: BufferConfig,
        num_sms: int,
        timeout_s: float,
        transport: str = "ipc",
        staged: bool = False,
    ) -> None:
        core = _ext.extension()
        self.kernels = core.internode
        if not topology.is_multi_node:
            raise ValueError("ranks_per_node: the internode path needs at least two nodes")
        if topology.ranks_per_node > self.kernels.MAX_LOCAL_RANKS or topology.num_nodes > self.kernels.MAX_NODES:
            raise ValueError(f"ranks_per_node: the internode path supports up to {self.kernels.MAX_LOCAL_RANKS} ranks "
                             f"per node and {self.kernels.MAX_NODES} nodes, got {topology.ranks_per_node} x "
                             f"{topology.num_nodes}")
        if config.push_combine_min_bytes is not None:
            raise ValueError("push_combine_min_bytes: only the intranode path pushes a combine; pass None")
        if not torch.cuda.is_available():
            raise ValueError("backend: the internode path needs a CUDA device")
        self.group, self.topology, self.config, self.num_sms = group, topology, config, num_sms
        self.timeout_s = timeout_s
        self.device = torch.device("cuda", torch.cuda.current_device())
        world, per_node, num_nodes = topology.world_size, topology.ranks_per_node, topology.num_nodes
        slots = config.num_recv_slots

        # NVLink region, shared with the ranks of this node.
        self.slot_bytes = config.slot_bytes(world)
        data_offset = self.kernels.NODE_DATA_OFFSET
        self.combine_offset = data_offset + slots * self.slot_bytes
        self.buffer = torch.empty(self.combine_offset + config.combine_bytes(world), dtype=torch.uint8,
                                  device=self.device)
        self.buffer[:data_offset].zero_()
        self._slots = SlotViews.of_slots(self.buffer, data_offset, self.slot_bytes, slots)
        torch.cuda.synchronize(self.device)
        self._peers, node_regions = open_peer_buffers(self.buffer, group, topology.rank,
                                                      topology.ranks_of_node(topology.node))

        self.layout = self.kernels.transport_layout(world, per_node, config.max_tokens_per_rank, config.hidden,
                                                    config.num_topk)
        # Forwarders spin on other ranks' senders: ranks sharing a GPU must fit their blocks at once.
        self._ranks_on_gpu, self._num_device_sms = gpu_share(group, self.device)
        self.transport = make_transport(transport, group, topology, self.layout["total_bytes"], self.device, staged)
        area_rows = self.layout["area_rows"]
        self.forward_rows = torch.empty(slots * num_nodes * area_rows * per_node, dtype=torch.int32, device=self.device)
        self.forward_counts = torch.zeros(slots * num_nodes * self.kernels.MAX_CHANNELS, dtype=torch.int32,
                                          device=self.device)
        self.traffic_bytes = torch.zeros(len(self.kernels.TRAFFIC_COUNTERS), dtype=torch.int64, device=self.device)
        self.mailbox = torch.zeros(self.kernels.MAILBOX_BYTES // 8, dtype=torch.int64, pin_memory=True)
        self._mailbox_words = words = self.mailbox.numpy()
        max_ranks = self.kernels.MAX_RANKS
        self._recv_from_rank = words[self.kernels.MAILBOX_RECV_FROM_RANK :][:max_ranks]
        self._recv_totals = words[self.kernels.MAILBOX_RECV_TOTALS :][:max_ranks]
        self._invalid_ids = words[self.kernels.MAILBOX_INVALID_IDS :][:max_ranks]
        self._recv_per_expert = words[self.kernels.MAILBOX_RECV_PER_EXPERT :][: self.kernels.MAX_EXPERTS]
        self.ctx = self.kernels.Context(
            self.kernels.TRANSPORTS[self.transport.name], self.transport.regions, bool(staged), node_regions,
            topology.rank, world, per_node, slots, self.slot_bytes, config.max_tokens_per_rank, config.hidden,
            config.num_topk, self.forward_rows.data_ptr(), self.forward_counts.data_ptr(),
            self.traffic_bytes.data_ptr(), self.mailbox.data_ptr(), int(timeout_s * 1e9),
        )
        # Every rank counts calls and blocks identically; the kernels compare against these.
        self._dispatch_calls = 0
        self._combine_calls = 0
        self._dispatch_blocks = 0
        self._combine_blocks = 0
        self._failure: CommunicationError | None = None
        self._stream = torch.cuda.Stream(self.device, priority=-1)
        name_stream(self._stream, "deepcomm communication")
        torch.cuda.synchronize(self.device)
        dist.barrier(group=group)  # every peer has mapped every region before any kernel writes

    def traffic(self) -> dict[str, int]:
        """Bytes moved so far on each leg by this rank's kernels (waits for them)."""
        self._stream.synchronize()
        return dict(zip(self.kernels.TRAFFIC_COUNTERS, self.traffic_bytes.tolist()))

    # -- dispatch -----------------------------------------------------------

    def check_dispatch(
        self, x, topk_idx, topk_weights, num_experts, x_scales=None, quantize_fp8=False, power_of_two_scales=False,
        num_sms=None, num_recv_tokens=None, handle=None, check_values=False,
    ) -> tuple[int, int]:
        """Everything a dispatch refuses on the host before its launch (also the call check's); (payload, blocks)."""
        self.check_errors()
        if handle is not None:
            raise ValueError("handle: reusing a dispatch's routing is implemented by the intranode backend only; "
                             "dispatch without it")
        payload = check_kernel_dispatch(x, x_scales, topk_idx, topk_weights, num_experts, self.topology.world_size,
                                        self.device, self.config, quantize_fp8, power_of_two_scales, check_values)
        num_blocks = blocks_of(self.num_sms, num_sms)
        self._check_blocks(num_blocks)
        return payload, num_blocks

    def run_dispatch(
        self, x, topk_idx, topk_weights, num_experts, x_scales=None, quantize_fp8=False, power_of_two_scales=False,
        previous_event=None, async_finish=False, num_sms=None, num_recv_tokens=None, handle=None,
    ) -> DispatchResult:
        payload, num_blocks = self.check_dispatch(x, topk_idx, topk_weights, num_experts, x_scales, quantize_fp8,
                                                  power_of_two_scales, num_sms, num_recv_tokens, handle)
        topo = self.topology
        num_tokens, hidden = x.shape
        num_topk = topk_idx.shape[1]
        shape = call_shape(hidden, num_topk, payload, num_experts, num_blocks)
        world, num_nodes = topo.world_size, topo.num_nodes
        experts_per_rank = num_experts // world
        stream = self._stream

        with CommStreamScope(stream, previous_event, (x, x_scales, topk_idx, topk_weights),
                             async_finish) as caller:
            scratch = DispatchScratch(self.device, num_tokens, world, num_nodes, num_experts, with_node_rows=True)
            ptr, cuda_stream = scratch.ptr, stream.cuda_stream
            launch_dispatch_layout(topk_idx, num_experts, topo, num_blocks, cuda_stream, ptr["per_rank"],
                                   ptr["per_node"], ptr["layout_per_expert"], ptr["is_token_in_rank"],
                                   ptr["num_invalid"], ptr["send_pos"])

            call = self._dispatch_calls + 1
            slot = call % self.config.num_recv_slots
            self.ctx.notify(call, shape, ptr["per_rank"], ptr["per_node"], ptr["layout_per_expert"],
                            ptr["num_invalid"], num_experts, ptr["send_base"], ptr["recv_totals"],
                            ptr["recv_per_expert"], ptr["abort"], cuda_stream)
            # Queued before the host waits: the GPU runs layout → notify → dispatch without a bubble.
            self._dispatch_calls = call
            self._dispatch_blocks += num_blocks
            self.ctx.dispatch(
                call, slot, payload, x.data_ptr(), x_scales.data_ptr() if x_scales is not None else 0, hidden,
                topk_idx.data_ptr(), topk_weights.data_ptr(), num_tokens, num_topk, experts_per_rank,
                ptr["is_token_in_rank"], ptr["send_pos"], ptr["send_base"], ptr["recv_totals"], ptr["abort"],
                -1 if num_recv_tokens is None else num_recv_tokens, self._dispatch_blocks, num_blocks,
                ptr["node_rows"], cuda_stream,
            )
            recv_row_bytes, scale_cols = recv_row_shape(payload, hidden)
            if num_recv_tokens is not None:
                own_layout = recv_layout(num_recv_tokens, recv_row_bytes, scale_cols, num_topk)
                result = self._views(slot, own_layout, num_recv_tokens, hidden, num_topk, payload,
                                     scratch.recv_per_expert)
                result.num_recv_tokens_per_rank = None
            else:
                self._wait_notify(call)
                check_invalid_ids(self._invalid_ids[:world], num_experts)
                totals = self._recv_totals[:world].tolist()
                own_layout = check_slot_sizes(totals, payload, hidden, num_topk, self.slot_bytes, topo.rank)
                num_recv_tokens = totals[topo.rank]
                result = self._views(slot, own_layout, num_recv_tokens, hidden, num_topk, payload,
                                     scratch.recv_per_expert)
                result.num_recv_tokens_per_rank = self._recv_from_rank[:world].tolist()
                result.num_recv_tokens_per_expert_list = self._recv_per_expert[:experts_per_rank].tolist()
            result.handle = InternodeHandle(num_tokens, hidden, num_recv_tokens, scratch, slot,
                                            self.kernels.num_channels(num_blocks), call, self.owner_id)
            # The other outputs are views of the receive slot (registered memory, never freed by the allocator).
            result.event = hand_back((result.num_tokens_per_expert,), self.device, stream, caller, async_finish)
            return result

    def _check_blocks(self, num_blocks: int) -> None:
        if num_blocks < 2 or self.kernels.num_channels(num_blocks) > self.kernels.MAX_CHANNELS:
            raise ValueError(f"num_sms: the internode path needs 2 to {2 * self.kernels.MAX_CHANNELS} blocks "
                             f"(half send, half forward), got {num_blocks}")
        if self._ranks_on_gpu > 1 and num_blocks * self._ranks_on_gpu > self._num_device_sms:
            raise ValueError(f"num_sms: {self._ranks_on_gpu} ranks share this GPU and every rank's blocks must run at "
                             f"once: ranks x num_sms <= {self._num_device_sms}, got {num_blocks}")

    def _views(self, slot, layout, rows, hidden, num_topk, payload, per_expert) -> DispatchResult:
        return self._slots[slot].result(layout, rows, hidden, num_topk, payload, per_expert)

    # -- combine ------------------------------------------------------------

    def _check_handle(self, handle) -> None:
        if not isinstance(handle, InternodeHandle) or handle.owner != self.owner_id:
            raise TypeError("handle: expected the handle of a dispatch on this communicator")

    def _slot_start(self, handle) -> int:
        return self.kernels.NODE_DATA_OFFSET + handle.slot * self.slot_bytes

    def check_combine(self, expert_out, handle, num_sms=None) -> int:
        """Everything a combine refuses on the host before its launch (also the call check's); its blocks."""
        self.check_errors()
        self._check_handle(handle)
        check_combine_inputs(expert_out, handle.num_recv_tokens, handle.hidden, self.device)
        dispatches_since = self._dispatches_since(handle)
        if dispatches_since >= self.config.num_recv_slots:
            raise SlotReusedError(f"handle: {dispatches_since} dispatches ran since this one; its forward map is gone "
                                  f"(combine within {self.config.num_recv_slots} dispatches)")
        self._check_combine_source(expert_out, handle)
        num_blocks = blocks_of(self.num_sms, num_sms)
        self._check_blocks(num_blocks)
        return num_blocks

    def run_combine(self, expert_out, handle, previous_event=None, async_finish=False, num_sms=None):
        num_blocks = self.check_combine(expert_out, handle, num_sms)
        stream = self._stream
        with CommStreamScope(stream, previous_event, (expert_out,), async_finish) as caller:
            # On the communication stream, which writes it (after previous_event, the caller's stream may
            # still be using memory it freed); hand_back makes it safe on the caller's.
            y = torch.empty(handle.num_tokens, handle.hidden, dtype=torch.bfloat16, device=self.device)
            source_offset = self._combine_source(expert_out, handle)
            call = self._combine_calls + 1
            credit_expected = call - 1  # each home rank gives one credit a combine, once it read every partial
            self._combine_calls = call
            self._combine_blocks += num_blocks
            routing = handle.scratch.ptr
            self.ctx.combine(call, handle.slot, handle.channels, source_offset, y.data_ptr(), handle.hidden,
                             handle.num_tokens, routing["is_token_in_rank"], routing["send_pos"], routing["send_base"],
                             routing["node_rows"], credit_expected,
                             self._combine_blocks, num_blocks, stream.cuda_stream)
            return y, hand_back((y,), self.device, stream, caller, async_finish)

    def close(self) -> None:
        """Unmap the peers' regions (every rank should close together)."""
        self._closed = True
        close_peers(self._peers)
        self._peers = []
        self.transport.close()
