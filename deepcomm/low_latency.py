"""Low-latency dispatch/combine for decode (csrc/kernels/low_latency.cu).

The normal path sizes its output on the host: one wait per dispatch. Here
every (expert, source rank) has a fixed capacity instead, the received layout
is fixed (``[local experts, world * max_tokens_per_rank, H]``), and nothing
waits on the host, so a synchronous call is one launch and can be captured in
a CUDA graph. The rows of local expert ``e`` are ``x[e, :num_tokens_per_expert[e]]``:
those from rank 0 first, then rank 1, ..., each rank's in token order (the
same in every run). Each expert gets one row per token that names it; a token
crosses to a rank once, however many of its experts live there.

Combine takes the experts' bf16 outputs in that layout and returns, per token,
the weighted sum of its experts' outputs; the reduction is part of combine.
With the weights given to combine, it pulls each token's rows from their owners
and sums ``topk_weights[t, k] * output of expert k`` over k (ascending) in
float32, rounded once to bf16. With the weights given to the dispatch instead
(``topk_weights=``, they travel with the rows), the sums happen where the
experts ran: each rank owning some of a token's experts sums its terms (k
ascending, float32, rounded to bf16) and writes that one partial into the
token's rank, which adds the partials in ascending rank order in float32
(``reference_low_latency.sum_by_owner``): one row per (token, rank) crosses
between GPUs instead of one per (token, expert).

Two receive areas alternate between calls, so a result stays valid through one
further dispatch (two micro-batches in flight). With ``return_recv_hook`` a
call only sends; ``hook()`` queues the receive when the caller wants the data,
and no SM waits in between. Each dispatch is combined at most once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from deepcomm import _ext, fp8
from deepcomm.errors import CommunicationError, SlotReusedError
from deepcomm.events import EventHandle
from deepcomm.ipc import close_peers, open_peer_buffers
from deepcomm.kernel_common import ERROR_INVALID_IDS, ERROR_MODE_MISMATCH, blocks_of, mailbox_failure, payload_of
from deepcomm.profiling import name_stream
from deepcomm.results import HandleOwner
from deepcomm.streams import CommStreamScope, hand_back, order_streams, CallerStream
from deepcomm.topology import Topology, gpu_share
from deepcomm.validation import check_int, check_num_experts, check_positive_ints, check_tensor, check_topk_idx

MAX_TOPK = 16  # csrc/runtime/low_latency_layout.h kMaxTopk
MAX_EXPERTS = 1024
MAX_RANKS = 8
MAX_SHARED_BYTES = 200 * 1024  # the send kernel's routing masks must fit one SM's shared memory


@dataclass(frozen=True)
class LowLatencyConfig:
    """Sizes the low-latency buffers; one buffer per rank, allocated once.

    max_tokens_per_rank: most tokens a rank passes to one call (the capacity of
        each (expert, source rank)).
    hidden: the hidden size (every call uses exactly this one).
    num_experts: experts in the model (every call uses exactly this many).
    num_topk: the largest K.
    early_launch: launch each call's kernels early (programmatic dependent launch): their blocks are
        placed while the kernel before them on the stream still runs, and wait for it to end, so that the
        launch's latency overlaps that kernel. Only where the extension's code for the GPU was built for
        sm_90 or later; elsewhere, and with False, they are launched plainly.
    """

    max_tokens_per_rank: int
    hidden: int
    num_experts: int
    num_topk: int = 8
    early_launch: bool = True

    def __post_init__(self) -> None:
        check_positive_ints(self, ("max_tokens_per_rank", "hidden", "num_experts", "num_topk"))
        if not isinstance(self.early_launch, bool):
            raise TypeError(f"early_launch: expected a bool, got {type(self.early_launch).__name__}")
        if self.hidden % 8:
            raise ValueError(f"hidden: must be a multiple of 8 (16-byte bf16 rows), got {self.hidden}")
        if self.num_topk > MAX_TOPK:
            raise ValueError(f"num_topk: the low-latency path supports at most {MAX_TOPK}, got {self.num_topk}")
        if self.num_experts > MAX_EXPERTS:
            raise ValueError(f"num_experts: the low-latency path supports at most {MAX_EXPERTS}, got {self.num_experts}")
        masks = self.num_experts * (-(-self.max_tokens_per_rank // 32)) * 4
        if masks > MAX_SHARED_BYTES:
            raise ValueError(f"max_tokens_per_rank: {self.max_tokens_per_rank} tokens x {self.num_experts} experts "
                             f"need {masks} bytes of routing masks per SM, more than {MAX_SHARED_BYTES}")

    def check_world(self, world_size: int) -> None:
        if world_size > MAX_RANKS:
            raise ValueError(f"low_latency: the low-latency path supports at most {MAX_RANKS} ranks, got {world_size}")
        check_num_experts(self.num_experts, world_size)

    def rows_per_expert(self, world_size: int) -> int:
        return world_size * self.max_tokens_per_rank

    def recv_shape(self, world_size: int) -> tuple[int, int, int]:
        """``(local experts, rows per expert, hidden)``: the shape of a received ``x``."""
        return self.num_experts // world_size, self.rows_per_expert(world_size), self.hidden

    def area_bytes(self, world_size: int) -> int:
        local, rows, hidden = self.recv_shape(world_size)
        return _ext.extension().low_latency.area_layout(local, world_size, self.max_tokens_per_rank,
                                                        hidden)["total_bytes"]

    def total_bytes(self, world_size: int) -> int:
        """Bytes of the one buffer each rank allocates (signals + two receive areas)."""
        core = _ext.extension().low_latency
        return core.DATA_OFFSET + core.NUM_AREAS * self.area_bytes(world_size)


@dataclass
class LowLatencyResult:
    """What a low-latency dispatch returns.

    x:                     ``[E/world, world * max_tokens_per_rank, H]`` bf16, or fp8 e4m3; rows of
                           local expert e are ``x[e, :num_tokens_per_expert[e]]``, the rest unspecified
    x_scales:              ``[E/world, world * max_tokens_per_rank, H/128]`` float32 for fp8, else None
    num_tokens_per_expert: ``[E/world]`` int32 on the device (the host never learns it)
    handle:                what :meth:`low_latency_combine` needs
    event:                 reached when the outputs are ready (with a hook: when the send ended)
    hook:                  with ``return_recv_hook``: call it to queue the receive; afterwards the
                           caller's stream may use the outputs. None otherwise
    """

    x: torch.Tensor
    x_scales: torch.Tensor | None
    num_tokens_per_expert: torch.Tensor
    handle: "LowLatencyHandle"
    event: EventHandle
    hook: Callable[[], EventHandle] | None = None


@dataclass(frozen=True)
class LowLatencyHandle:
    """Where each of this rank's (token, k) pairs went: ``pair_rows[t, k] = expert * rows_per_expert + row``
    (-1: none), and which call and area it belongs to. ``pair_rows`` and the counts are final once the
    dispatch has received (at once, or when its hook ran); in memory of the area, like the rows."""

    pair_rows: torch.Tensor  # [T, K] int32
    num_tokens_per_expert: torch.Tensor  # [E/world] int32, this rank's received rows per local expert
    num_tokens: int
    hidden: int
    area: int
    call: int
    owner: int  # owner_id of the communicator that made it (deepcomm.results.HandleOwner)
    weights_at_dispatch: bool = False  # the dispatch carried the weights: combine sums at the owners


def check_low_latency_dispatch(config: LowLatencyConfig, world_size: int, x, x_scales, topk_idx, num_experts,
                               device, check_values: bool, topk_weights=None) -> None:
    """The argument checks of a low-latency dispatch, shared by the kernels and the reference path."""
    check_tensor("x", x, (torch.bfloat16, fp8.FP8_DTYPE), 2, device)
    num_tokens, hidden = x.shape
    if hidden != config.hidden:
        raise ValueError(f"x: hidden size {hidden}, but the low-latency buffer is for {config.hidden}")
    if num_tokens > config.max_tokens_per_rank:
        raise ValueError(f"x: {num_tokens} tokens exceed the low-latency buffer's max_tokens_per_rank="
                         f"{config.max_tokens_per_rank}")
    if x.dtype == fp8.FP8_DTYPE:
        if x_scales is None:
            raise ValueError("x_scales: required when x is fp8 (float32 [tokens, hidden/128])")
        check_tensor("x_scales", x_scales, (torch.float32,), 2, x.device)
        if tuple(x_scales.shape) != (num_tokens, fp8.num_scale_blocks(hidden, "x")):
            raise ValueError(f"x_scales: expected shape {[num_tokens, hidden // fp8.BLOCK_CHANNELS]}, "
                             f"got {list(x_scales.shape)}")
    elif x_scales is not None:
        raise ValueError("x_scales: only valid with fp8 x; pass None for bf16")
    if num_experts != config.num_experts:
        raise ValueError(f"num_experts: the low-latency buffer is for {config.num_experts}, got {num_experts!r}")
    check_num_experts(num_experts, world_size)
    check_topk_idx(topk_idx, num_tokens, num_experts, x.device, check_values)
    if topk_idx.shape[1] > config.num_topk:
        raise ValueError(f"topk_idx: K={topk_idx.shape[1]} exceeds the low-latency buffer's num_topk={config.num_topk}")
    if topk_weights is not None:
        check_tensor("topk_weights", topk_weights, (torch.float32,), 2, x.device)
        if tuple(topk_weights.shape) != tuple(topk_idx.shape):
            raise ValueError(f"topk_weights: expected shape {list(topk_idx.shape)} (topk_idx's), "
                             f"got {list(topk_weights.shape)}")


def check_low_latency_combine(config: LowLatencyConfig, world_size: int, expert_out, topk_weights, handle,
                              device) -> None:
    check_tensor("expert_out", expert_out, (torch.bfloat16,), 3, device)
    if tuple(expert_out.shape) != config.recv_shape(world_size):
        raise ValueError(f"expert_out: expected shape {list(config.recv_shape(world_size))} (the dispatched layout), "
                         f"got {list(expert_out.shape)}")
    if handle.weights_at_dispatch:
        if topk_weights is not None:
            raise ValueError("topk_weights: the dispatch carried the weights (its owners sum with them); pass None")
        return
    if topk_weights is None:
        raise ValueError("topk_weights: required (float32 [tokens, K]) unless the dispatch was given them")
    check_tensor("topk_weights", topk_weights, (torch.float32,), 2, device)
    if tuple(topk_weights.shape) != tuple(handle.pair_rows.shape):
        raise ValueError(f"topk_weights: expected shape {list(handle.pair_rows.shape)} (the dispatch's topk_idx), "
                         f"got {list(topk_weights.shape)}")


class LowLatencyKernels(HandleOwner):
    """The low-latency kernels among ``topology.world_size`` ranks of one host (CUDA IPC)."""

    def __init__(self, group: dist.ProcessGroup | None, topology: Topology, config: LowLatencyConfig,
                 num_sms: int, timeout_s: float) -> None:
        if not isinstance(config, LowLatencyConfig):
            raise TypeError(f"low_latency: expected a deepcomm.LowLatencyConfig, got {type(config).__name__}")
        config.check_world(topology.world_size)
        core = _ext.extension().low_latency
        self.kernels = core
        self.group, self.topology, self.config, self.num_sms, self.timeout_s = group, topology, config, num_sms, timeout_s
        self.device = torch.device("cuda", torch.cuda.current_device())
        world = topology.world_size
        layout = core.area_layout(config.num_experts // world, world, config.max_tokens_per_rank, config.hidden)
        self._area_bytes = layout["total_bytes"]
        # A whole call can be one launch whose blocks wait for each other's rows: ranks sharing a GPU must fit
        # every rank's blocks at once.
        self._ranks_on_gpu, self._num_device_sms = gpu_share(group, self.device)
        self._blocks(None)
        shared = core.dispatch_shared_bytes(config.num_experts, config.max_tokens_per_rank) + core.STATIC_SHARED_BOUND
        optin = _ext.extension().device_info(self.device.index)["max_shared_memory_per_block_optin"]
        if shared > optin:
            raise ValueError(f"max_tokens_per_rank: the send's routing masks need {shared} bytes of shared memory, "
                             f"more than this GPU gives a block ({optin})")
        self.buffer = torch.empty(core.DATA_OFFSET + core.NUM_AREAS * self._area_bytes, dtype=torch.uint8,
                                  device=self.device)
        self.buffer[: core.DATA_OFFSET].zero_()
        for area in range(core.NUM_AREAS):  # no staged row is ever taken for one of this call (-1: no epoch)
            start = core.DATA_OFFSET + area * self._area_bytes
            self.buffer[start + layout["staging_tags"] : start + self._area_bytes].fill_(0xFF)
        self._views = [self._area_views(area, layout) for area in range(core.NUM_AREAS)]
        self.mailbox = torch.zeros(core.MAILBOX_BYTES // 8, dtype=torch.int64, pin_memory=True)
        self._mailbox_words = self.mailbox.numpy()
        torch.cuda.synchronize(self.device)
        self._peers, regions = open_peer_buffers(self.buffer, group, topology.rank, range(world))
        self.ctx = core.Context(regions, topology.rank, config.num_experts, config.max_tokens_per_rank, config.hidden,
                                self.mailbox.data_ptr(), int(timeout_s * 1e9))
        # Whether the kernels are launched early: asked for, and built for sm_90 or later (their waits compile
        # to nothing below, e.g. PTX of an older arch compiled for this GPU at load).
        self.early_launch = self.ctx.set_early_launch(config.early_launch, self.device.index)
        local_experts = config.num_experts // world
        self._routing_words = [torch.empty(local_experts + config.max_tokens_per_rank * config.num_topk,
                                           dtype=torch.int32, device=self.device) for _ in range(core.NUM_AREAS)]
        self._routing: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._core = _ext.extension()
        self._last_stream: int | None = None  # where this rank's last low-latency kernel was queued (_follow)
        self._unreceived: set[int] = set()  # dispatches sent with a receive hook not called yet
        self._combined: set[int] = set()  # dispatches combined already (once each)
        self._calls = 0
        self._failure: CommunicationError | None = None
        self._closed = False
        self._phase_clock: torch.Tensor | None = None  # record_phases
        self._stream = torch.cuda.Stream(self.device, priority=-1)
        name_stream(self._stream, "deepcomm communication (low latency)")
        dist.barrier(group=group)  # every peer has mapped every buffer before any kernel writes

    def _area_views(self, area: int, layout: dict) -> dict[torch.dtype | str, torch.Tensor]:
        """The fixed views of one receive area: rows as bf16 and as fp8, and the fp8 scales."""
        local, rows, hidden = self.config.recv_shape(self.topology.world_size)
        start = self.kernels.DATA_OFFSET + area * self._area_bytes
        region = self.buffer[start : start + self._area_bytes]
        bf16 = region[: local * rows * 2 * hidden].view(torch.bfloat16).view(local, rows, hidden)
        as_fp8 = region[: local * rows * hidden].view(fp8.FP8_DTYPE).view(local, rows, hidden)
        scales = region[layout["scales"] : layout["scales"] + local * rows * (hidden // 128) * 4]
        scales = scales.view(torch.float32).view(local, rows, hidden // 128) if hidden % 128 == 0 else None
        return {torch.bfloat16: bf16, fp8.FP8_DTYPE: as_fp8, "scales": scales}

    # -- errors ---------------------------------------------------------

    def check_errors(self) -> None:
        if self._closed:
            raise RuntimeError("communicator: closed (close() unmapped the peers' buffers); make a new one")
        if self._failure is None and self._mailbox_words[0] != 0:
            words = self._mailbox_words
            invalid = np.zeros(self.topology.world_size, dtype=np.int64)
            if int(words[0]) == ERROR_INVALID_IDS:
                invalid[int(words[2])] = 1
            self._failure = mailbox_failure(words, self.topology.rank, self.timeout_s, invalid)
            if int(words[0]) == ERROR_MODE_MISMATCH:
                self._failure = CommunicationError(self.topology.rank, "low_latency_rows",
                                                   f"rank {int(words[2])} dispatched the other row format (bf16 / fp8) "
                                                   "or the other choice of routing weights (given or not) in this "
                                                   "call; every rank must send the same", peer=int(words[2]))
            torch.cuda.synchronize(self.device)  # this rank's kernels finish giving up before anything is torn down
        if self._failure is not None:
            raise self._failure

    def _blocks(self, num_sms: int | None) -> int:
        blocks = blocks_of(self.num_sms, num_sms)
        if blocks * self._ranks_on_gpu > self._num_device_sms:
            raise ValueError(f"num_sms: {self._ranks_on_gpu} rank(s) on this GPU and every rank's blocks must run at "
                             f"once: ranks x num_sms <= {self._num_device_sms}, got {blocks}")
        return blocks

    def _check_received(self, handle) -> None:
        self._check_handle(handle)
        if handle.call in self._unreceived:
            raise ValueError("handle: its dispatch has not received yet; call the result's hook() first")
        if handle.call in self._combined:
            # A peer may still be pulling the outputs of the first combine: rewriting them would race with it.
            raise ValueError("handle: its dispatch was combined already (once per dispatch); dispatch again")

    def _check_handle(self, handle) -> None:
        if not isinstance(handle, LowLatencyHandle) or handle.owner != self.owner_id:
            raise TypeError("handle: expected the handle of a low-latency dispatch on this communicator")
        if self._calls - handle.call >= self.kernels.NUM_AREAS:
            raise SlotReusedError(f"handle: {self._calls - handle.call} low-latency dispatches ran since the one that "
                                  f"made it and reused its receive area (results stay valid for "
                                  f"{self.kernels.NUM_AREAS - 1} further dispatch)")

    # -- dispatch -------------------------------------------------------

    def check_dispatch(self, x, topk_idx, num_experts, x_scales=None, quantize_fp8=False, power_of_two_scales=False,
                       num_sms=None, topk_weights=None, check_values=False) -> tuple[int, int]:
        """Everything a dispatch refuses on the host before its launch (also the call check's, which reads the
        expert ids too: the kernels skip invalid ones and report them at the next call); (payload, blocks)."""
        self.check_errors()
        check_low_latency_dispatch(self.config, self.topology.world_size, x, x_scales, topk_idx, num_experts,
                                   self.device, check_values, topk_weights)
        payload = payload_of(x, quantize_fp8, power_of_two_scales)
        num_blocks = self._blocks(num_sms)
        pending = self._calls + 1 - self.kernels.NUM_AREAS
        if pending in self._unreceived:
            raise ValueError(f"return_recv_hook: dispatch {pending} on the same receive area has not received yet; "
                             "call its hook() before this dispatch")
        return payload, num_blocks

    def dispatch(self, x, topk_idx, num_experts, x_scales=None, quantize_fp8=False, power_of_two_scales=False,
                 previous_event=None, async_finish=False, return_recv_hook=False, num_sms=None,
                 topk_weights=None) -> LowLatencyResult:
        payload, num_blocks = self.check_dispatch(x, topk_idx, num_experts, x_scales, quantize_fp8, power_of_two_scales,
                                                  num_sms, topk_weights)
        num_tokens, num_topk = topk_idx.shape
        call = self._calls + 1
        area = call % self.kernels.NUM_AREAS
        pair_rows, counts = self._routing_of(area, num_tokens, num_topk)
        views = self._views[area]
        handle = LowLatencyHandle(pair_rows, counts, num_tokens, self.config.hidden, area, call, self.owner_id,
                                  topk_weights is not None)
        result = LowLatencyResult(views[torch.bfloat16 if payload == 0 else fp8.FP8_DTYPE],
                                  None if payload == 0 else views["scales"], counts, handle, EventHandle(None))
        args = (area, payload, x.data_ptr(), 0 if x_scales is None else x_scales.data_ptr(), topk_idx.data_ptr(),
                0 if topk_weights is None else topk_weights.data_ptr(), topk_weights is not None, num_tokens, num_topk,
                pair_rows.data_ptr(), counts.data_ptr(), num_blocks)
        kernels = self.kernels
        caller = self._caller_stream(previous_event, async_finish or return_recv_hook)
        if caller is not None:  # synchronous: one launch on the caller's stream
            self._follow(caller)
            self.ctx.dispatch(kernels.BOTH, *args, caller)
            self._sent(call)
            result.event = EventHandle(self._core.StreamPoint(caller, self.device.index))
            return result
        stream = self._stream
        with CommStreamScope(stream, previous_event, (x, x_scales, topk_idx, topk_weights), True) as caller_stream:
            self._follow(stream.cuda_stream)
            if return_recv_hook:
                self.ctx.dispatch(kernels.SEND, *args, stream.cuda_stream)
                self._sent(call)
                self._unreceived.add(call)
                result.event = hand_back((), self.device, stream, caller_stream, True)
                result.hook = self._receive_hook(handle, args)
                return result
            self.ctx.dispatch(kernels.BOTH, *args, stream.cuda_stream)
            self._sent(call)
            result.event = hand_back((), self.device, stream, caller_stream, async_finish)
            return result

    def _sent(self, call: int) -> None:
        """Dispatch ``call`` is queued: it reuses the area of ``call - NUM_AREAS``, whose handle is done."""
        self._calls = call
        self._combined.discard(call - self.kernels.NUM_AREAS)

    def _caller_stream(self, previous_event, asynchronous: bool) -> int | None:
        """The caller's current stream (cudaStream_t) when a call may run on it, else None.

        A synchronous call with no event to wait for runs where the caller would wait for it anyway:
        no stream switch, no events between streams, inputs and outputs already ordered.
        """
        if asynchronous or previous_event is not None or torch.cuda.current_device() != self.device.index:
            return None
        return torch._C._cuda_getCurrentRawStream(self.device.index)

    def _follow(self, stream: int) -> None:
        """Queue this call's kernels after this rank's previous low-latency kernels, whatever stream those
        went to: the protocol needs every rank's calls to run in call order (a peer writes into an area
        again once this rank's next call on it has started, and reads it until its own has).

        Under CUDA graph capture nothing is ordered (torch.cuda.graph synchronises the device before it
        captures) and nothing is remembered (a replay runs where the caller puts it).
        """
        if torch._C._cuda_isCurrentStreamCapturing():
            if self._phase_clock is not None:  # a replay would write into the clock after it is given up
                raise RuntimeError("record_phases: the phase clock is on; stop it (record_phases(0)) before capturing "
                                   "a CUDA graph")
            self._last_stream = None
            return
        if self._last_stream is not None and self._last_stream != stream:
            self._core.order_streams(stream, self._last_stream)
        self._last_stream = stream

    def _routing_of(self, area: int, num_tokens: int, num_topk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """An area's pair rows ``[T, K]`` and received counts, in memory of its own (no allocation per call:
        they live as long as the area's rows, and a captured graph finds them at the same address)."""
        key = (area, num_tokens, num_topk)
        views = self._routing.get(key)
        if views is None:
            words = self._routing_words[area]
            local_experts = self.config.num_experts // self.topology.world_size
            views = (words[local_experts : local_experts + num_tokens * num_topk].view(num_tokens, num_topk),
                     words[:local_experts])
            self._routing[key] = views
        return views

    def _receive_hook(self, handle: LowLatencyHandle, args: tuple) -> Callable[[], EventHandle]:
        def hook() -> EventHandle:
            """Queue the receive of the dispatch; the current stream waits for it (the host does not)."""
            if handle.call not in self._unreceived:
                raise RuntimeError("hook: already called")
            self.check_errors()
            self._check_handle(handle)
            with torch.cuda.device(self.device):  # the events that order the streams are the current device's
                caller = CallerStream(self.device.index)
                order_streams(self._stream, caller)
                self._follow(self._stream.cuda_stream)
                self.ctx.dispatch(self.kernels.RECEIVE, *args, self._stream.cuda_stream)
                self._unreceived.discard(handle.call)
                event = EventHandle.record(self.device, self._stream)
                order_streams(caller, self._stream)
            return event

        return hook

    # -- combine --------------------------------------------------------

    def combine_input(self, handle: LowLatencyHandle) -> torch.Tensor:
        """The receive area of ``handle``'s dispatch as bf16 ``[E/world, rows, H]``: outputs written here
        are read where they are (no staging copy). Writing it overwrites the dispatched rows."""
        self._check_received(handle)
        return self._views[handle.area][torch.bfloat16]

    def check_combine(self, expert_out, topk_weights, handle, num_sms=None) -> tuple[int, bool]:
        """Everything a combine refuses on the host before its launch (also the call check's); (blocks, whether
        expert_out is copied into the receive area first)."""
        self.check_errors()
        self._check_received(handle)
        check_low_latency_combine(self.config, self.topology.world_size, expert_out, topk_weights, handle, self.device)
        num_blocks = self._blocks(num_sms)
        owner_sums = handle.weights_at_dispatch  # only this rank reads expert_out: any memory will do
        staged = not owner_sums and expert_out.data_ptr() != self._views[handle.area][torch.bfloat16].data_ptr()
        if (owner_sums or staged) and expert_out.data_ptr() % 16:
            raise ValueError("expert_out: must start at a 16-byte boundary for the kernels; pass expert_out.clone()")
        return num_blocks, staged

    def combine(self, expert_out, topk_weights, handle, previous_event=None, async_finish=False,
                return_recv_hook=False, num_sms=None):
        """``(y, event, hook)``; once per dispatch (a second combine raises)."""
        num_blocks, staged = self.check_combine(expert_out, topk_weights, handle, num_sms)
        area, owner_sums = handle.area, handle.weights_at_dispatch

        def send(cuda_stream: int, phases: int) -> torch.Tensor:
            if staged:  # the pull reads registered memory only
                self.ctx.stage_outputs(area, expert_out.data_ptr(), handle.num_tokens_per_expert.data_ptr(),
                                       num_blocks, cuda_stream)
            y = torch.empty(handle.num_tokens, handle.hidden, dtype=torch.bfloat16, device=self.device)
            receive(y, cuda_stream, phases)
            return y

        def receive(y: torch.Tensor, cuda_stream: int, phases: int) -> None:
            self.ctx.combine(phases, area, owner_sums, expert_out.data_ptr() if owner_sums else 0,
                             handle.pair_rows.data_ptr(), 0 if owner_sums else topk_weights.data_ptr(), handle.num_tokens,
                             handle.pair_rows.shape[1], y.data_ptr(), num_blocks, cuda_stream)

        kernels = self.kernels
        caller = self._caller_stream(previous_event, async_finish or return_recv_hook)
        if caller is not None:  # synchronous: one launch on the caller's stream, y allocated there
            self._follow(caller)
            y = send(caller, kernels.BOTH)
            self._combined.add(handle.call)
            return y, EventHandle(self._core.StreamPoint(caller, self.device.index)), None
        stream = self._stream
        with CommStreamScope(stream, previous_event, (expert_out, topk_weights), True) as caller_stream:
            self._follow(stream.cuda_stream)
            # y belongs to the communication stream, which writes it; hand_back makes it safe on the caller's.
            y = send(stream.cuda_stream, kernels.SEND if return_recv_hook else kernels.BOTH)
            self._combined.add(handle.call)
            event = hand_back((y,), self.device, stream, caller_stream, async_finish or return_recv_hook)
            if not return_recv_hook:
                return y, event, None
        called = False

        def hook() -> EventHandle:
            """Queue the pull and reduction (or the adding of the owners' partials); the current stream waits
            for it (the host does not)."""
            nonlocal called
            if called:
                raise RuntimeError("hook: already called")
            self.check_errors()
            self._check_handle(handle)
            with torch.cuda.device(self.device):  # the events that order the streams are the current device's
                now = CallerStream(self.device.index)
                order_streams(stream, now)
                self._follow(stream.cuda_stream)
                receive(y, stream.cuda_stream, kernels.RECEIVE)
                called = True
                done = EventHandle.record(self.device, stream)
                order_streams(now, stream)
            return done

        return y, event, hook

    # -- profiling ------------------------------------------------------

    def record_phases(self, slots: int) -> torch.Tensor | None:
        """Have every later call's kernels stamp where they are (csrc/kernels/low_latency.h ``Phase``).

        Returns the clock, ``[slots, PHASE_BLOCKS, len(PHASES)]`` int64 %globaltimer ns on the device, zeroed
        (a call on area a with epoch e lands in slot ``(2 e + a) % slots``: n calls need n + 2 slots so
        that none shares one; read it after a synchronize, see deepcomm.low_latency_phases). Every
        block is stamped (a call's blocks all run at once, fewer than PHASE_BLOCKS). ``slots=0`` stops and
        returns None. Calls are not captured in a CUDA graph while the clock is on (they raise).
        """
        check_int("slots", slots, 0)
        # The new clock first: if it cannot be made, the kernels keep stamping the old one, which stays alive.
        clock = (torch.zeros(slots, self.kernels.PHASE_BLOCKS, len(self.kernels.PHASES), dtype=torch.int64,
                             device=self.device) if slots else None)
        torch.cuda.synchronize(self.device)  # no running kernel keeps the old pointer
        self.ctx.record_phases(0 if clock is None else clock.data_ptr(), slots)
        self._phase_clock = clock
        return clock

    def close(self) -> None:
        self._closed = True
        close_peers(self._peers)
        self._peers = []
