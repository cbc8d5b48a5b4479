"""Pieces shared by the kernel backends (deepcomm.intranode, deepcomm.internode).

Both run the same protocol around their kernels: validate, pick the payload,
launch on the communication stream, read counts and errors from a pinned host
mailbox whose first words are ``csrc/runtime/mailbox_layout.h``'s header, and
hand out received rows as views into a receive slot laid out by
``intranode.recv_layout``.
"""

from __future__ import annotations

import functools
import types

import numpy as np
import torch

from deepcomm import _ext, fp8
from deepcomm.errors import CommunicationError, SlotReusedError
from deepcomm.events import EventHandle
from deepcomm.results import DispatchResult
from deepcomm.validation import check_dispatch_inputs, check_int

PAYLOAD_BF16, PAYLOAD_FP8, PAYLOAD_BF16_TO_FP8, PAYLOAD_BF16_TO_FP8_POW2 = 0, 1, 2, 3

# csrc/runtime/mailbox_layout.h
ERROR_TIMEOUT, ERROR_SIZE_MISMATCH, ERROR_INVALID_IDS, ERROR_MODE_MISMATCH, ERROR_SHAPE_MISMATCH = 1, 2, 3, 4, 5
ERROR_COMBINE_MODE_MISMATCH = 6
STAGE_NAMES = {1: "notify", 2: "dispatch", 3: "combine_ready", 4: "combine_done", 5: "forward",
               6: "combine_credit", 7: "combine_recv", 8: "low_latency_staging", 9: "low_latency_rows",
               10: "low_latency_outputs", 11: "low_latency_partials", 12: "combine_landed"}
NOTIFY_DONE_WORD = 3


def payload_of(x: torch.Tensor, quantize_fp8: bool, power_of_two_scales: bool) -> int:
    hidden = x.shape[1]
    if x.data_ptr() % 16 != 0:  # the kernels move (and quantise) rows in 16-byte units
        raise ValueError(f"x: must start at a 16-byte boundary for the kernels (a view at storage offset "
                         f"{x.storage_offset()}); pass x.clone()")
    if quantize_fp8:
        if x.dtype != torch.bfloat16:
            raise ValueError("quantize_fp8: needs bf16 x; x is already fp8")
        fp8.num_scale_blocks(hidden, "x")
        return PAYLOAD_BF16_TO_FP8_POW2 if power_of_two_scales else PAYLOAD_BF16_TO_FP8
    if (hidden * x.element_size()) % 16 != 0:
        raise ValueError(f"x: rows must be a multiple of 16 bytes for the kernels, got hidden={hidden}")
    return PAYLOAD_FP8 if x.dtype == fp8.FP8_DTYPE else PAYLOAD_BF16


def recv_row_shape(payload: int, hidden: int) -> tuple[int, int]:
    """(bytes of x per received row, fp8 scale columns) for a payload."""
    if payload == PAYLOAD_BF16:
        return 2 * hidden, 0
    return hidden, hidden // fp8.BLOCK_CHANNELS


# (field, bits) of a call's shape word, low bits first: every rank's notify compares its peers' word with its own.
_CALL_SHAPE_FIELDS = (("hidden size", 24), ("K", 8), ("fp8 rows", 1), ("num_experts", 16), ("num_sms", 15))


def call_shape(hidden: int, num_topk: int, payload: int, num_experts: int, num_blocks: int) -> int:
    """The word a dispatch's notify publishes: what every rank must pass equal for the rows to land where
    their receivers read them (received row format, not how it was made: bf16 quantised on the way and
    fp8 given are the same rows)."""
    word, shift = 0, 0
    for (name, bits), value in zip(_CALL_SHAPE_FIELDS, (hidden, num_topk, int(payload != PAYLOAD_BF16), num_experts,
                                                         num_blocks)):
        if not 0 <= value < 1 << bits:
            raise ValueError(f"{name}: {value} does not fit the kernels' call word ({bits} bits)")
        word |= value << shift
        shift += bits
    return word


def blocks_of(default: int, num_sms: int | None) -> int:
    blocks = default if num_sms is None else num_sms
    check_int("num_sms", blocks)
    return blocks


def check_kernel_dispatch(x, x_scales, topk_idx, topk_weights, num_experts, world_size: int, device, config,
                          quantize_fp8: bool, power_of_two_scales: bool, check_values: bool) -> int:
    """The argument checks of a normal-mode kernel dispatch (intranode, internode): the contract, rows the
    kernels can move, a call that fits the buffer. Expert ids are range-checked on the GPU unless
    ``check_values`` (a host sync: the call check's). Returns the payload."""
    check_dispatch_inputs(x, x_scales, topk_idx, topk_weights, num_experts, world_size, device,
                          check_values=check_values)
    payload = payload_of(x, quantize_fp8, power_of_two_scales)
    check_capacity(x.shape[0], x.shape[1], topk_idx.shape[1], config)
    return payload


def check_capacity(num_tokens: int, hidden: int, num_topk: int, config) -> None:
    if num_tokens > config.max_tokens_per_rank:
        raise ValueError(f"x: {num_tokens} tokens exceed the buffer's max_tokens_per_rank={config.max_tokens_per_rank}")
    if hidden > config.hidden or num_topk > config.num_topk:
        raise ValueError(f"x: hidden {hidden} / top-k {num_topk} exceed the buffer's {config.hidden} / {config.num_topk}")


@functools.lru_cache(maxsize=64)
def _scratch_offsets(num_tokens: int, world_size: int, num_nodes: int, num_experts: int,
                     with_node_rows: bool) -> tuple[types.MappingProxyType, int]:
    """DispatchScratch's regions: int32-word offsets by name, and the words in all."""
    tokens_words = num_tokens * world_size
    regions = (
        ("per_rank", world_size + num_nodes + num_experts + 1), ("send_base", world_size),
        ("recv_totals", world_size), ("abort", 1),
        ("send_pos", tokens_words), ("node_rows", num_tokens * num_nodes if with_node_rows else 0),
        ("is_token_in_rank", -(-tokens_words // 4)),  # bytes, in int32 words
    )
    offsets, words = {}, 0
    for name, size in regions:
        offsets[name] = words
        words += -(-size // 4) * 4  # the next region 16-byte aligned
    # Inside the first region, back to back (one memset zeroes them).
    offsets["per_node"] = offsets["per_rank"] + world_size
    offsets["layout_per_expert"] = offsets["per_node"] + num_nodes
    offsets["num_invalid"] = offsets["layout_per_expert"] + num_experts
    return types.MappingProxyType(offsets), words


class DispatchScratch:
    """The small device tensors one dispatch call writes, carved out of one int32 allocation.

    Fresh for each call, since its handle keeps send_base, send_pos, is_token_in_rank (and
    node_rows) for as long as a combine may come; but two allocations where there were six or
    seven, and the kernels get pointers (``ptr``): a dispatch's host work is its torch calls, so
    the tensor views of those regions are built only when something asks for them. The received
    count per local expert goes back in the result and may be kept for long (load statistics): it
    is the second allocation, pinning nothing else.
    Regions (``_scratch_offsets``), each 16-byte aligned: [per_rank W | per_node N |
    layout_per_expert E | num_invalid 1] (4-byte words back to back: the layout launch zeroes them
    in one memset), send_base W, recv_totals W, abort 1, send_pos [T, W], node_rows [T, N]
    (internode), is_token_in_rank [T, W] bool.
    """

    __slots__ = ("words", "ptr", "recv_per_expert", "num_tokens", "_world_size", "_node_cols", "_offsets",
                 "_num_experts")

    def __init__(self, device: torch.device, num_tokens: int, world_size: int, num_nodes: int, num_experts: int,
                 with_node_rows: bool) -> None:
        offsets, words = _scratch_offsets(num_tokens, world_size, num_nodes, num_experts, with_node_rows)
        self.words = torch.empty(words, dtype=torch.int32, device=device)
        base = self.words.data_ptr()
        self.ptr = {name: base + 4 * offset for name, offset in offsets.items()}
        self.recv_per_expert = torch.empty(num_experts // world_size, dtype=torch.int32, device=device)
        self.ptr["recv_per_expert"] = self.recv_per_expert.data_ptr()
        self.num_tokens, self._world_size, self._offsets = num_tokens, world_size, offsets
        self._node_cols = num_nodes if with_node_rows else 0
        self._num_experts = num_experts

    def fits(self, num_tokens: int, num_experts: int) -> bool:
        """Whether a call with this shape (same ranks, nodes and node rows) can use this scratch."""
        return num_tokens == self.num_tokens and num_experts == self._num_experts

    def _view(self, name: str, rows: int, cols: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        words = self.words if dtype == torch.int32 else self.words.view(dtype)
        return words.as_strided((rows, cols), (cols, 1), self._offsets[name] * (4 // dtype.itemsize))

    @property
    def send_base(self) -> torch.Tensor:  # [W] int32
        return self._view("send_base", 1, self._world_size)[0]

    @property
    def send_pos(self) -> torch.Tensor:  # [T, W] int32
        return self._view("send_pos", self.num_tokens, self._world_size)

    @property
    def node_rows(self) -> torch.Tensor | None:  # [T, N] int32, internode only
        return self._view("node_rows", self.num_tokens, self._node_cols) if self._node_cols else None

    @property
    def is_token_in_rank(self) -> torch.Tensor:  # [T, W] bool
        return self._view("is_token_in_rank", self.num_tokens, self._world_size, torch.bool)


class RoutingSource:
    """The ``topk_idx`` a dispatch routed by, for a later dispatch that reuses its handle.

    A handle's routing (send positions, row counts) was computed from one ``topk_idx`` by dispatch
    call ``call``; a dispatch that reuses it skips that computation, so it must be given the very
    same tensor, unchanged (same object, same in-place version): anything else would send rows where
    the ids do not say. Writes torch does not see (``.data``, custom kernels, raw pointers) and
    tensors made under ``torch.inference_mode`` (no version counter) escape the version check.
    The kernels compare ``call`` across ranks: every rank must reuse the same dispatch's routing.
    """

    __slots__ = ("topk_idx", "version", "num_experts", "call")

    def __init__(self, topk_idx: torch.Tensor, version: int | None, num_experts: int, call: int) -> None:
        self.topk_idx, self.version, self.num_experts, self.call = topk_idx, version, num_experts, call

    @classmethod
    def of(cls, topk_idx: torch.Tensor, num_experts: int, call: int) -> "RoutingSource":
        return cls(topk_idx, None if topk_idx.is_inference() else topk_idx._version, num_experts, call)

    def check_reused_by(self, topk_idx: torch.Tensor, num_experts: int) -> None:
        if topk_idx is not self.topk_idx:
            raise ValueError("handle: a dispatch that reuses a handle takes the topk_idx tensor that made it "
                             "(the same object); dispatch without the handle to route anew")
        if self.version is not None and topk_idx._version != self.version:
            raise ValueError("topk_idx: modified in place since the dispatch that made the handle; "
                             "dispatch without the handle to route anew")
        if num_experts != self.num_experts:
            raise ValueError(f"num_experts: the handle's dispatch had {self.num_experts}, got {num_experts}")


class ScratchRouting:
    """A handle's routing tensors as views of its dispatch's scratch (``self.scratch``), built when asked.

    Combine passes the kernels ``scratch.ptr`` pointers; these views are for callers and tests.
    """

    scratch: DispatchScratch

    @property
    def is_token_in_rank(self) -> torch.Tensor:  # [T, W] bool
        return self.scratch.is_token_in_rank

    @property
    def send_pos(self) -> torch.Tensor:  # [T, W] int32
        return self.scratch.send_pos

    @property
    def send_base(self) -> torch.Tensor:  # [W] int32
        return self.scratch.send_base

    @property
    def node_rows(self) -> torch.Tensor | None:  # [T, N] int32 (internode): the token's row per node, -1 if none
        return self.scratch.node_rows


class SlotViews:
    """One receive slot (uint8, fields 256-byte aligned by ``recv_layout``) handing out DispatchResults.

    The slot is seen once, at construction, as every dtype a result holds, so each field of a
    result is one ``as_strided`` of a typed alias: dispatch builds its views on the host every call,
    and a byte slice + dtype view + shape view per field is three torch calls where one does.
    """

    DTYPES = (torch.bfloat16, fp8.FP8_DTYPE, torch.float32, torch.int64)

    def __init__(self, region: torch.Tensor) -> None:
        if region.dtype != torch.uint8 or region.dim() != 1 or region.numel() % 16 or region.data_ptr() % 16:
            raise ValueError("region: expected a 16-byte aligned 1-D uint8 tensor of a multiple of 16 bytes")
        self._typed = {dtype: region.view(dtype) for dtype in self.DTYPES}

    @classmethod
    def of_slots(cls, buffer: torch.Tensor, start: int, slot_bytes: int, num_slots: int) -> list["SlotViews"]:
        """The ``num_slots`` slots of ``slot_bytes`` each that lie back to back from byte ``start``."""
        return [cls(buffer[start + s * slot_bytes : start + (s + 1) * slot_bytes]) for s in range(num_slots)]

    def field(self, offset: int, dtype: torch.dtype, rows: int, cols: int) -> torch.Tensor:
        """A contiguous [rows, cols] ``dtype`` tensor at byte ``offset`` of the slot."""
        typed = self._typed[dtype]
        return typed.as_strided((rows, cols), (cols, 1), typed.storage_offset() + offset // dtype.itemsize)

    def result(self, layout: dict, rows: int, hidden: int, num_topk: int, payload: int,
               per_expert: torch.Tensor) -> DispatchResult:
        """A DispatchResult whose tensors are views of this slot, laid out by ``layout``."""
        if payload == PAYLOAD_BF16:
            x = self.field(layout["x"], torch.bfloat16, rows, hidden)
            scales = None
        else:
            x = self.field(layout["x"], fp8.FP8_DTYPE, rows, hidden)
            scales = self.field(layout["scales"], torch.float32, rows, hidden // fp8.BLOCK_CHANNELS)
        return DispatchResult(
            x=x,
            x_scales=scales,
            topk_idx=self.field(layout["topk_idx"], torch.int64, rows, num_topk),
            topk_weights=self.field(layout["topk_weights"], torch.float32, rows, num_topk),
            num_tokens_per_expert=per_expert,
            num_recv_tokens_per_rank=[],
            handle=None,
            event=EventHandle(None),
        )


@functools.lru_cache(maxsize=1024)
def recv_layout(rows: int, row_bytes: int, scale_cols: int, num_topk: int) -> types.MappingProxyType:
    """Byte offsets of a receive slot's fields for ``rows`` rows (``intranode.recv_layout``), read-only.

    Cached: a dispatch asks on every call, and at decode sizes the same few row counts recur.
    """
    return types.MappingProxyType(_ext.extension().intranode.recv_layout(rows, row_bytes, scale_cols, num_topk))


def check_slot_sizes(totals: list[int], payload: int, hidden: int, num_topk: int, slot_bytes: int,
                     rank: int) -> dict:
    """This rank's receive-slot layout; raises (on every rank alike) when any rank's rows overflow its slot.

    A slot's size grows with its row count, so the rank receiving the most rows is the one to check.
    """
    row_bytes, scale_cols = recv_row_shape(payload, hidden)
    largest = max(range(len(totals)), key=totals.__getitem__)
    if recv_layout(totals[largest], row_bytes, scale_cols, num_topk)["total_bytes"] > slot_bytes:
        raise ValueError(f"x: rank {largest} would receive {totals[largest]} rows, more than its receive "
                         f"slot holds ({slot_bytes} bytes); enlarge BufferConfig")
    return recv_layout(totals[rank], row_bytes, scale_cols, num_topk)


def check_invalid_ids(invalid: np.ndarray, num_experts: int) -> None:
    if invalid.any():
        culprit = int(invalid.nonzero()[0][0])
        raise invalid_ids_error(culprit, int(invalid[culprit]), num_experts)


def invalid_ids_error(culprit: int, count: int, num_experts: int) -> ValueError:
    # Every rank sees every rank's count: all raise, none dispatched.
    return ValueError(f"topk_idx: expert ids must lie in [-1, {num_experts}) (-1 = no expert); rank {culprit} "
                      f"passed {count} invalid ids")


def mailbox_failure(words: np.ndarray, rank: int, timeout_s: float, invalid: np.ndarray) -> CommunicationError | None:
    """The CommunicationError a kernel recorded in the mailbox header, if any."""
    code = int(words[0])
    if code == 0:
        return None
    stage, detail = STAGE_NAMES.get(int(words[1]), "unknown"), int(words[2])
    if code == ERROR_TIMEOUT:
        return CommunicationError(rank, stage, f"waiting for rank {detail}: no answer within {timeout_s:g}s",
                                  peer=detail)
    if code == ERROR_SIZE_MISMATCH:
        return CommunicationError(rank, stage, f"num_recv_tokens was wrong: {detail} rows arrived")
    if code == ERROR_MODE_MISMATCH:
        return CommunicationError(rank, stage, f"ranks disagree on reusing a handle in this dispatch (rank {detail} "
                                  "differs from this one; every rank passes one, or none does)", peer=detail)
    if code == ERROR_SHAPE_MISMATCH:
        return CommunicationError(rank, stage, f"rank {detail}'s dispatch differs from this rank's in hidden size, K, "
                                  "row format (bf16 / fp8), num_experts or num_sms; every rank must pass the same "
                                  "(nothing was dispatched; Communicator(check_calls=True) names the field)",
                                  peer=detail)
    if code == ERROR_COMBINE_MODE_MISMATCH:
        return CommunicationError(rank, stage, f"rank {detail} pulls this combine's rows where this rank pushes them, "
                                  "or the other way round: the ranks' dispatches differ in num_recv_tokens (given on "
                                  "some ranks only), and only a dispatch that waited for the counts can push",
                                  peer=detail)
    culprits = {r: int(n) for r, n in enumerate(invalid) if n}
    return CommunicationError(rank, stage, f"topk_idx had invalid expert ids (rank: count) {culprits}")



def _check_slot_alive(dispatches_since: int, num_slots: int, what: str) -> None:
    if dispatches_since >= num_slots:
        raise SlotReusedError(f"{what}: {dispatches_since} dispatches ran since the one whose receive slot it is, "
                              f"and reused the slot (results stay valid while fewer than {num_slots} further "
                              "dispatches ran; clone to keep them)")


def combine_input_view(buffer: torch.Tensor, slot_start: int, slot_bytes: int, handle,
                       dispatches_since: int, num_slots: int) -> torch.Tensor:
    """``[R, H]`` bf16 at the start of ``handle``'s receive slot, for the expert outputs.

    Combine reads rows that live in the slot where they are (:func:`combine_source_offset`).
    The bf16 rows cover the whole received result (an fp8 one's scales and routing too), which
    the experts have read by the time they write their outputs; they fit any slot
    (``BufferConfig.slot_bytes``) unless a wrong ``num_recv_tokens`` sized the result.
    """
    _check_slot_alive(dispatches_since, num_slots, "handle")
    rows, hidden = handle.num_recv_tokens, handle.hidden
    if rows * hidden * 2 > slot_bytes:
        raise ValueError(f"handle: {rows} rows of {hidden} bf16 do not fit a receive slot ({slot_bytes} bytes); "
                         "was num_recv_tokens wrong?")
    # Detached, not a view for autograd: a recorded copy_ into it (rows that carry gradients) is then
    # one CopyBackwards, not a CopySlices that rebuilds a gradient of the whole viewed region.
    return buffer[slot_start : slot_start + rows * hidden * 2].view(torch.bfloat16).view(rows, hidden).detach()


def rows_in_slot(buffer: torch.Tensor, expert_out: torch.Tensor, slot_start: int, slot_bytes: int,
                 dispatches_since: int, num_slots: int) -> int | None:
    """Byte offset in ``buffer`` of rows that lie in the receive slot of the handle's dispatch
    (``slot_start``, ``slot_bytes``), None for rows outside the buffer. Rows in another part of the
    buffer (another dispatch's slot, which a later dispatch may have reused) are refused.
    ``dispatches_since``: dispatches after the one whose handle combine uses."""
    nbytes = expert_out.numel() * 2
    start = expert_out.data_ptr() - buffer.data_ptr()
    if not (nbytes and 0 <= start < buffer.numel()):
        return None
    if not slot_start <= start <= slot_start + slot_bytes - nbytes:
        raise ValueError("expert_out: it lies in this communicator's buffer but not in the receive slot of "
                         "handle's dispatch (use combine_input(handle), or a tensor of your own)")
    _check_slot_alive(dispatches_since, num_slots, "expert_out")
    return start


def combine_source_offset(buffer: torch.Tensor, expert_out: torch.Tensor, combine_offset: int, slot_start: int,
                          slot_bytes: int, dispatches_since: int, num_slots: int) -> int:
    """Byte offset in ``buffer`` (this rank's registered memory) of the rows combine sends.

    Rows in the receive slot of the handle's dispatch (written there by the experts, or a round trip
    of the received rows) are read where they are (:func:`rows_in_slot`); rows anywhere else outside
    the buffer are copied to the combine area at ``combine_offset`` first, because peers can only
    read registered memory.
    """
    start = rows_in_slot(buffer, expert_out, slot_start, slot_bytes, dispatches_since, num_slots)
    if start is not None:
        return start
    nbytes = expert_out.numel() * 2
    staged = buffer[combine_offset : combine_offset + nbytes].view(torch.bfloat16)
    staged.view(expert_out.shape).copy_(expert_out)
    return combine_offset


class ReceiveSlots:
    """combine_input and where combine finds its rows, shared by the kernel communicators.

    Needs: buffer, slot_bytes, combine_offset, config (num_recv_slots), _dispatch_calls,
    ``_check_handle(handle)`` and ``_slot_start(handle)`` (byte offset of its dispatch's slot).
    """

    def _dispatches_since(self, handle) -> int:
        return self._dispatch_calls - handle.dispatch_call

    def combine_input(self, handle) -> torch.Tensor:
        self._check_handle(handle)
        return combine_input_view(self.buffer, self._slot_start(handle), self.slot_bytes, handle,
                                  self._dispatches_since(handle), self.config.num_recv_slots)

    def _combine_source(self, expert_out: torch.Tensor, handle) -> int:
        return combine_source_offset(self.buffer, expert_out, self.combine_offset, self._slot_start(handle),
                                     self.slot_bytes, self._dispatches_since(handle), self.config.num_recv_slots)

    def _check_combine_source(self, expert_out: torch.Tensor, handle) -> None:
        """What :meth:`_combine_source` refuses, without staging anything. Rows in the slot are read there,
        by kernels that move 16-byte units (rows from elsewhere are copied into the buffer first)."""
        in_slot = rows_in_slot(self.buffer, expert_out, self._slot_start(handle), self.slot_bytes,
                               self._dispatches_since(handle), self.config.num_recv_slots) is not None
        if in_slot and expert_out.data_ptr() % 16:
            raise misaligned_rows(expert_out)


def misaligned_rows(expert_out: torch.Tensor) -> ValueError:
    return ValueError(f"expert_out: must start at a 16-byte boundary for the kernels (a view at storage offset "
                      f"{expert_out.storage_offset()}); pass expert_out.clone()")


class MailboxErrors:
    """check_errors and the notify wait, shared by the kernel communicators.

    Needs: mailbox (pinned int64 tensor), _mailbox_words and _invalid_ids
    (its numpy views), topology, timeout_s, _stream, _failure; ``close()`` sets ``_closed``.
    """

    _closed = False

    def check_errors(self) -> None:
        """Raise the CommunicationError a kernel reported, if any (the communicator is then unusable)."""
        if self._closed:  # its kernels would touch unmapped peer memory: a sticky CUDA fault, not an error
            raise RuntimeError("communicator: closed (close() unmapped the peers' buffers); make a new one")
        if self._failure is None and self._mailbox_words[0] != 0:
            self._failure = mailbox_failure(self._mailbox_words, self.topology.rank, self.timeout_s,
                                            self._invalid_ids[: self.topology.world_size])
            # Let this rank's kernels finish giving up (their waits are bounded) before anyone
            # tears down buffers that peers still map.
            self._stream.synchronize()
        if self._failure is not None:
            raise self._failure

    def _wait_notify(self, call: int) -> None:
        status = _ext.extension().intranode.wait_notify(self.mailbox.data_ptr(), call, self.timeout_s + 5.0)
        if status == 1:
            self.check_errors()
        if status != 0:
            self._failure = CommunicationError(
                self.topology.rank, "notify", f"the notify kernel did not finish within {self.timeout_s + 5:g}s"
            )
            raise self._failure
