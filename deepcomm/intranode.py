"""Intranode dispatch/combine on reserved SMs (csrc/kernels/intranode.cu).

For the ranks of one node: GPUs joined by NVLink, or ranks sharing one GPU
under CUDA MPS. Each rank allocates one buffer, shares it with its peers by
CUDA IPC, and the kernels write every received row once, at its final place.

A call: the layout kernel counts tokens per rank and expert; notify exchanges
the counts on the GPU and the host waits once (pinned mailbox) to learn how
many rows arrive; dispatch then runs as a persistent grid of ``num_sms`` blocks
on the communication stream. Combine reduces each token's rows in ascending
rank order, after pulling them from the ranks that hold them with the SMs, or,
for large combines, after those ranks' copy engines pushed them into this
rank's landing area (deepcomm/landing.py; ``BufferConfig.push_combine_min_bytes``).

Received tensors are views into a ring of ``num_recv_slots`` receive slots:
a DispatchResult stays valid until ``num_recv_slots`` further dispatches on the
same communicator (two, by default: enough for two micro-batches in flight).
Clone what must live longer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from deepcomm import _ext, fp8, landing
from deepcomm.errors import CommunicationError
from deepcomm.ipc import close_peers, open_peer_buffers
from deepcomm.kernel_common import (
    DispatchScratch, MailboxErrors, ReceiveSlots, RoutingSource, ScratchRouting, SlotViews, blocks_of, call_shape,
    check_kernel_dispatch, check_slot_sizes, invalid_ids_error, misaligned_rows, recv_layout, recv_row_shape,
)
from deepcomm.landing import ChunkCounts, PushPlan, push_plan
from deepcomm.layout import launch_dispatch_layout
from deepcomm.profiling import name_stream
from deepcomm.results import DispatchResult, HandleOwner
from deepcomm.streams import CommStreamScope, hand_back
from deepcomm.topology import Topology
from deepcomm.validation import check_combine_inputs, check_positive_ints

MAX_TOPK = 32  # experts per token the dispatch kernels take (csrc/kernels/intranode.cu, internode.cu)


@dataclass(frozen=True)
class BufferConfig:
    """Sizes the intranode buffers; one buffer per rank, allocated once.

    max_tokens_per_rank: most tokens any rank passes to one dispatch.
    hidden: the largest hidden size dispatched.
    num_topk: the largest K.
    num_recv_slots: dispatch results alive at once (2 covers two micro-batches).
    push_combine_min_bytes: None (the default): combine pulls the rows with the SMs. A number: a combine
        whose rows crossing between ranks add up to at least this many bytes (over all ranks) has them
        pushed by the copy engines instead, and its SMs only add them up; smaller ones still pull (a copy
        costs microseconds to start; 32 MiB keeps decode-size calls pulling). Worth it when the combine
        gets few SMs: on two H200s a prefill combine took 301–302 µs pushed against 400–401 pulled on 8
        SMs, but 237–239 against 202 on 24 (docs/benchmarks.md). Pushing needs a landing area of
        ``max_tokens_per_rank * (ranks - 1)`` rows a rank, and a dispatch that waited for the counts (not
        given ``num_recv_tokens``). Intranode path only. Every rank must pass the same config.
    """

    max_tokens_per_rank: int
    hidden: int
    num_topk: int = 8
    num_recv_slots: int = 2
    push_combine_min_bytes: int | None = None

    def __post_init__(self) -> None:
        check_positive_ints(self, ("max_tokens_per_rank", "hidden", "num_topk", "num_recv_slots"))
        if self.num_topk > MAX_TOPK:  # else the kernels refuse the call only after notify has run
            raise ValueError(f"num_topk: the dispatch kernels support at most {MAX_TOPK}, got {self.num_topk}")
        threshold = self.push_combine_min_bytes
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0):
            raise ValueError(f"push_combine_min_bytes: expected None or an int >= 0, got {threshold!r}")

    def max_recv_rows(self, world_size: int) -> int:
        # Every token of every rank may go to one rank.
        return self.max_tokens_per_rank * world_size

    def slot_bytes(self, world_size: int) -> int:
        layout = _ext.extension().intranode.recv_layout
        rows = self.max_recv_rows(world_size)
        bf16 = layout(rows, 2 * self.hidden, 0, self.num_topk)["total_bytes"]
        as_fp8 = layout(rows, self.hidden, -(-self.hidden // fp8.BLOCK_CHANNELS), self.num_topk)["total_bytes"]
        return max(bf16, as_fp8)

    def combine_bytes(self, world_size: int) -> int:
        return self.max_recv_rows(world_size) * 2 * self.hidden

    def landing_bytes(self, world_size: int) -> int:
        """The landing area of a pushing combine: every peer's rows of this rank's tokens."""
        if self.push_combine_min_bytes is None:
            return 0
        return self.max_tokens_per_rank * (world_size - 1) * 2 * self.hidden

    def total_bytes(self, world_size: int) -> int:
        """Bytes of the one buffer each rank allocates."""
        return (
            _ext.extension().intranode.DATA_OFFSET
            + self.num_recv_slots * self.slot_bytes(world_size)
            + self.combine_bytes(world_size)
            + self.landing_bytes(world_size)
        )


@dataclass(frozen=True)
class IntranodeHandle(ScratchRouting):
    """What combine needs: where this rank's tokens sit in every rank's receive slot."""

    num_tokens: int
    hidden: int
    num_recv_tokens: int
    scratch: DispatchScratch  # the dispatch's routing tensors; combine reads them through pointers
    dispatch_call: int
    owner: int  # owner_id of the communicator that made it (deepcomm.results.HandleOwner)
    routing: RoutingSource  # what a dispatch reusing this handle must be given
    # [src][dst] tokens of every rank, when the dispatch waited for the counts and the config may push (a
    # combine can then push); None otherwise.
    tokens_matrix: np.ndarray | None


class IntranodeCommunicator(MailboxErrors, ReceiveSlots, HandleOwner):
    """Dispatch/combine among ``topology.world_size`` ranks of one node through the CUDA kernels."""

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        topology: Topology,
        config: BufferConfig,
        num_sms: int,
        timeout_s: float,
    ) -> None:
        core = _ext.extension()
        self.kernels = core.intranode
        if topology.is_multi_node:
            raise ValueError(
                f"ranks_per_node: the intranode path needs one node, got {topology.num_nodes} nodes "
                "(the internode path is not built yet)"
            )
        if topology.world_size > self.kernels.MAX_RANKS:
            raise ValueError(f"group: the intranode path supports at most {self.kernels.MAX_RANKS} ranks")
        if not torch.cuda.is_available():
            raise ValueError("backend: the intranode path needs a CUDA device")
        self.group, self.topology, self.config, self.num_sms = group, topology, config, num_sms
        self.timeout_s = timeout_s
        self.device = torch.device("cuda", torch.cuda.current_device())
        world = topology.world_size
        self.slot_bytes = config.slot_bytes(world)
        self.combine_offset = self.kernels.DATA_OFFSET + config.num_recv_slots * self.slot_bytes
        self.landing_offset = self.combine_offset + config.combine_bytes(world)
        # Peers would push past the end of a smaller buffer, or cut chunks differently.
        settings = (config, landing.CHUNKS_PER_PEER, landing.MIN_CHUNK_BYTES)
        gathered = [None] * world
        dist.all_gather_object(gathered, settings, group=group)
        if any(s != settings for s in gathered):
            raise ValueError(f"config: every rank must pass the same BufferConfig (and keep deepcomm.landing's chunk "
                             f"sizes), got {gathered}")
        if config.push_combine_min_bytes is not None:
            self.kernels.require_stream_write_value()

        self.buffer = torch.empty(config.total_bytes(world), dtype=torch.uint8, device=self.device)
        self.buffer[: self.kernels.DATA_OFFSET].zero_()
        self._slots = SlotViews.of_slots(self.buffer, self.kernels.DATA_OFFSET, self.slot_bytes, config.num_recv_slots)
        self.mailbox = torch.zeros(self.kernels.MAILBOX_BYTES // 8, dtype=torch.int64, pin_memory=True)
        # A dispatch reads its counts in one extension call (read_counts); numpy views of the mailbox for the
        # error words (MailboxErrors) and the token matrix a pushing combine plans from.
        self._mailbox_address = self.mailbox.data_ptr()
        mailbox = self._mailbox_words = self.mailbox.numpy()
        max_ranks, kernels = self.kernels.MAX_RANKS, self.kernels
        self._tokens_matrix = mailbox[kernels.MAILBOX_TOKENS_MATRIX :][: max_ranks * max_ranks].reshape(max_ranks,
                                                                                                    max_ranks)
        self._invalid_ids = mailbox[kernels.MAILBOX_INVALID_IDS :][:max_ranks]
        torch.cuda.synchronize(self.device)
        self._peers, regions = open_peer_buffers(self.buffer, group, topology.rank, range(world))
        self.ctx = self.kernels.Context(
            regions, topology.rank, config.num_recv_slots, self.slot_bytes,
            self.mailbox.data_ptr(), int(timeout_s * 1e9),
        )
        # Every rank counts calls and blocks identically; the kernels compare against these.
        self._dispatch_calls = 0
        self._combine_calls = 0
        self._dispatch_blocks = 0
        self._combine_blocks = 0
        self._failure: CommunicationError | None = None
        self._spare_scratch: DispatchScratch | None = None  # _take_scratch
        # High priority: as compute blocks retire, the scheduler places communication blocks first.
        self._stream = torch.cuda.Stream(self.device, priority=-1)
        name_stream(self._stream, "deepcomm communication")
        # A pushing combine's copies, one stream per owner so that the copy engines serve owners at once.
        self._chunk_counts = ChunkCounts(world)
        self._copy_streams: list[torch.cuda.Stream] | None = None
        dist.barrier(group=group)  # every peer has mapped every buffer before any kernel writes


    # -- dispatch -----------------------------------------------------------

    def check_dispatch(
        self, x, topk_idx, topk_weights, num_experts, x_scales=None, quantize_fp8=False, power_of_two_scales=False,
        num_sms=None, num_recv_tokens=None, handle=None, check_values=False,
    ) -> tuple[int, int]:
        """Everything a dispatch refuses on the host before its launch (also the call check's); (payload, blocks)."""
        self.check_errors()
        payload = check_kernel_dispatch(x, x_scales, topk_idx, topk_weights, num_experts, self.topology.world_size,
                                        self.device, self.config, quantize_fp8, power_of_two_scales, check_values)
        num_blocks = blocks_of(self.num_sms, num_sms)
        if handle is not None:
            self._check_handle(handle)
            handle.routing.check_reused_by(topk_idx, num_experts)
            if num_recv_tokens is not None and num_recv_tokens != handle.num_recv_tokens:
                raise ValueError(f"num_recv_tokens: the handle's dispatch received {handle.num_recv_tokens} rows, "
                                 f"got {num_recv_tokens}")
        return payload, num_blocks

    def run_dispatch(
        self, x, topk_idx, topk_weights, num_experts, x_scales=None, quantize_fp8=False, power_of_two_scales=False,
        previous_event=None, async_finish=False, num_sms=None, num_recv_tokens=None, handle=None,
    ) -> DispatchResult:
        payload, num_blocks = self.check_dispatch(x, topk_idx, topk_weights, num_experts, x_scales, quantize_fp8,
                                                  power_of_two_scales, num_sms, num_recv_tokens, handle)
        num_tokens, hidden = x.shape
        num_topk = topk_idx.shape[1]
        shape = call_shape(hidden, num_topk, payload, num_experts, num_blocks)
        if handle is not None:
            return self._dispatch_reusing(handle, x, x_scales, topk_idx, topk_weights, num_experts, payload,
                                          num_blocks, shape, previous_event, async_finish, num_recv_tokens)
        world, rank = self.topology.world_size, self.topology.rank
        experts_per_rank = num_experts // world
        stream = self._stream

        with CommStreamScope(stream, previous_event, (x, x_scales, topk_idx, topk_weights),
                             async_finish) as caller:
            scratch = self._take_scratch(num_tokens, num_experts)
            ptr, cuda_stream = scratch.ptr, stream.cuda_stream
            launch_dispatch_layout(topk_idx, num_experts, self.topology, num_blocks, cuda_stream, ptr["per_rank"],
                                   ptr["per_node"], ptr["layout_per_expert"], ptr["is_token_in_rank"],
                                   ptr["num_invalid"], ptr["send_pos"])

            call = self._dispatch_calls + 1
            slot = call % self.config.num_recv_slots
            self.ctx.notify(call, shape, ptr["per_rank"], ptr["layout_per_expert"], ptr["num_invalid"], num_experts,
                            ptr["send_base"], ptr["recv_totals"], ptr["recv_per_expert"], ptr["abort"], cuda_stream)
            # Dispatch needs no host decision (it reads the counts on the device), so it is queued
            # before the host waits: the GPU runs layout → notify → dispatch without a bubble.
            self._dispatch_calls = call
            self._dispatch_blocks += num_blocks
            self.ctx.dispatch(
                call, slot, payload, x.data_ptr(), x_scales.data_ptr() if x_scales is not None else 0, hidden,
                topk_idx.data_ptr(), topk_weights.data_ptr(), num_tokens, num_topk, experts_per_rank,
                ptr["is_token_in_rank"], ptr["send_pos"], ptr["send_base"], ptr["recv_totals"], ptr["abort"],
                -1 if num_recv_tokens is None else num_recv_tokens, self._dispatch_blocks, num_blocks, cuda_stream,
            )
            # Everything that needs no count is done while the GPU works towards them: the call's end
            # (its kernels are all queued), where its routing came from, and (before waiting) the next
            # call's scratch. Both ranks' host work up to here is what a small call costs.
            event = hand_back((scratch.recv_per_expert,), self.device, stream, caller, async_finish)
            routing = RoutingSource.of(topk_idx, num_experts, call)
            recv_row_bytes, scale_cols = recv_row_shape(payload, hidden)
            if num_recv_tokens is not None:
                # The caller knows the size: no host wait. The kernel checks the size (and the ids)
                # and a mismatch surfaces at the next call or check_errors().
                own_layout = recv_layout(num_recv_tokens, recv_row_bytes, scale_cols, num_topk)
                result = self._views(slot, own_layout, num_recv_tokens, hidden, num_topk, payload,
                                     scratch.recv_per_expert)
                result.num_recv_tokens_per_rank = None
                return self._finish(result, scratch, num_recv_tokens, call, event, routing)
            self._spare_scratch = self._new_scratch(num_tokens, num_experts)
            self._wait_notify(call)
            culprit, invalid, totals, from_ranks, per_expert = self.kernels.read_counts(
                self._mailbox_address, world, rank, experts_per_rank)
            if culprit >= 0:
                raise invalid_ids_error(culprit, invalid, num_experts)
            # Every rank sees the same counts: on overflow the kernels wrote nothing and every rank raises.
            own_layout = check_slot_sizes(totals, payload, hidden, num_topk, self.slot_bytes, rank)
            result = self._views(slot, own_layout, totals[rank], hidden, num_topk, payload,
                                 scratch.recv_per_expert)
            result.num_recv_tokens_per_rank = from_ranks
            result.num_recv_tokens_per_expert_list = per_expert
            # Kept past the next notify (which rewrites the mailbox) only where a combine may push.
            pushable = (self._tokens_matrix[:world, :world].copy() if self.config.push_combine_min_bytes is not None
                        else None)
            return self._finish(result, scratch, totals[rank], call, event, routing, pushable)

    def _new_scratch(self, num_tokens: int, num_experts: int) -> DispatchScratch:
        return DispatchScratch(self.device, num_tokens, self.topology.world_size, self.topology.num_nodes,
                               num_experts, with_node_rows=False)

    def _take_scratch(self, num_tokens: int, num_experts: int) -> DispatchScratch:
        """A fresh scratch for this call: the one the previous call allocated while it waited, if it fits.

        Allocated on the communication stream (the scope's), where only this call's kernels use it.
        """
        spare, self._spare_scratch = self._spare_scratch, None
        if spare is not None and spare.fits(num_tokens, num_experts):
            return spare
        return self._new_scratch(num_tokens, num_experts)

    def _dispatch_reusing(self, handle, x, x_scales, topk_idx, topk_weights, num_experts, payload, num_blocks, shape,
                          previous_event, async_finish, num_recv_tokens) -> DispatchResult:
        """Dispatch along ``handle``'s routing: no layout, no count exchange, no host wait.

        The handle's scratch already holds where every row goes (send positions, this rank's
        first row at every rank, every rank's row total). Notify only meets the peers (a slot's
        owner must have moved on before anyone writes into it), which all must reuse the routing
        of the same dispatch in the same call.
        """
        rows = handle.num_recv_tokens  # check_dispatch checked the handle, its topk_idx and num_recv_tokens
        num_tokens, hidden = x.shape
        num_topk = topk_idx.shape[1]
        scratch, stream = handle.scratch, self._stream
        ptr, cuda_stream = scratch.ptr, stream.cuda_stream
        with CommStreamScope(stream, previous_event, (x, x_scales, topk_idx, topk_weights),
                             async_finish) as caller:
            call = self._dispatch_calls + 1
            slot = call % self.config.num_recv_slots
            self.ctx.meet(call, handle.routing.call, shape, ptr["abort"], cuda_stream)
            self._dispatch_calls = call
            self._dispatch_blocks += num_blocks
            self.ctx.dispatch(
                call, slot, payload, x.data_ptr(), x_scales.data_ptr() if x_scales is not None else 0, hidden,
                topk_idx.data_ptr(), topk_weights.data_ptr(), num_tokens, num_topk, num_experts // self.topology.world_size,
                ptr["is_token_in_rank"], ptr["send_pos"], ptr["send_base"], ptr["recv_totals"], ptr["abort"],
                rows, self._dispatch_blocks, num_blocks, cuda_stream,
            )
            recv_row_bytes, scale_cols = recv_row_shape(payload, hidden)
            result = self._views(slot, recv_layout(rows, recv_row_bytes, scale_cols, num_topk), rows, hidden, num_topk,
                                 payload, scratch.recv_per_expert)
            result.num_recv_tokens_per_rank = None
            # The other outputs are views of the receive slot (registered memory, never freed by the allocator).
            event = hand_back((scratch.recv_per_expert,), self.device, stream, caller, async_finish)
            return self._finish(result, scratch, rows, call, event, handle.routing, handle.tokens_matrix)

    def _finish(self, result, scratch, num_recv_tokens, call, event, routing, tokens_matrix=None):
        result.handle = IntranodeHandle(scratch.num_tokens, result.x.shape[1], num_recv_tokens, scratch, call, self.owner_id,
                                        routing, tokens_matrix)
        result.event = event
        return result

    def _views(self, slot, layout, rows, hidden, num_topk, payload, per_expert) -> DispatchResult:
        return self._slots[slot].result(layout, rows, hidden, num_topk, payload, per_expert)

    # -- combine ------------------------------------------------------------

    def _check_handle(self, handle) -> None:
        if not isinstance(handle, IntranodeHandle) or handle.owner != self.owner_id:
            raise TypeError("handle: expected the handle of a dispatch on this communicator")

    def _slot_start(self, handle) -> int:
        return self.kernels.DATA_OFFSET + (handle.dispatch_call % self.config.num_recv_slots) * self.slot_bytes

    def check_combine(self, expert_out, handle, num_sms=None) -> int:
        """Everything a combine refuses on the host before its launch (also the call check's); its blocks."""
        self.check_errors()
        self._check_handle(handle)
        check_combine_inputs(expert_out, handle.num_recv_tokens, handle.hidden, self.device)
        self._check_combine_source(expert_out, handle)
        # A push sums this rank's own rows where they are, in 16-byte units, wherever they are.
        if expert_out.data_ptr() % 16 and self.config.push_combine_min_bytes is not None:
            raise misaligned_rows(expert_out)
        return blocks_of(self.num_sms, num_sms)

    def push_plan(self, handle) -> PushPlan | None:
        """The plan of a pushing combine of ``handle``'s rows, or None when it pulls them.

        Every rank decides alike: from the config and the token matrix, which all ranks read the same.
        A dispatch that skipped its host wait has no matrix here and pulls (if it skipped it on some ranks
        only, combine_ready reports the ranks' disagreement). Under CUDA graph capture it pulls: the
        copies' chunk counts would be replayed as captured.
        """
        threshold = self.config.push_combine_min_bytes
        if threshold is None or handle.tokens_matrix is None or self.topology.world_size == 1:
            return None
        if torch.cuda.is_current_stream_capturing():
            return None
        plan = push_plan(handle.tokens_matrix, self.topology.rank, 2 * handle.hidden)
        return plan if plan.cross_bytes >= threshold else None

    def run_combine(self, expert_out, handle, previous_event=None, async_finish=False, num_sms=None):
        num_blocks = self.check_combine(expert_out, handle, num_sms)
        plan = self.push_plan(handle)
        stream = self._stream
        with CommStreamScope(stream, previous_event, (expert_out,), async_finish) as caller:
            # On the communication stream, which writes it (after previous_event, the caller's stream may
            # still be using memory it freed); hand_back makes it safe on the caller's.
            y = torch.empty(handle.num_tokens, handle.hidden, dtype=torch.bfloat16, device=self.device)
            call = self._combine_calls + 1
            self._combine_calls = call
            routing = handle.scratch.ptr
            if plan is None:
                source_offset = self._combine_source(expert_out, handle)
                self._combine_blocks += num_blocks  # only pulling combines count their blocks in the peers
                self.ctx.combine(call, source_offset, y.data_ptr(), handle.hidden, handle.num_tokens,
                                 routing["is_token_in_rank"], routing["send_pos"], routing["send_base"],
                                 self._combine_blocks, num_blocks, stream.cuda_stream)
            else:
                # The copies read expert_out where it is: it need not be in the registered buffer.
                counts = self._chunk_counts
                # A rank that received no rows has an empty expert_out (address 0 perhaps): it pushes
                # nothing, and any address of this GPU marks its combine as a pushing one.
                own_rows = expert_out.data_ptr() or self.buffer.data_ptr()
                self.ctx.combine_pushed(
                    call, own_rows, self.landing_offset, plan.first_row,
                    plan.num_rows, plan.landing_row, plan.push_chunk_rows, counts.pushed, plan.landing_first_row,
                    plan.land_chunk_rows, counts.landed, y.data_ptr(), handle.hidden, handle.num_tokens,
                    routing["is_token_in_rank"], routing["send_pos"], routing["send_base"], num_blocks,
                    stream.cuda_stream, self._copy_stream_handles(),
                )
                counts.advance(plan)
            return y, hand_back((y,), self.device, stream, caller, async_finish)

    def _copy_stream_handles(self) -> list[int]:
        if self._copy_streams is None:
            self._copy_streams = [torch.cuda.Stream(self.device) for _ in range(self.topology.world_size)]
            for owner, copies in enumerate(self._copy_streams):
                name_stream(copies, f"deepcomm combine copies to rank {owner}")
        return [copies.cuda_stream for copies in self._copy_streams]

    def close(self) -> None:
        """Unmap the peers' buffers (every rank should close together)."""
        self._closed = True
        close_peers(self._peers)
        self._peers = []
