"""The pure-torch reference path: dispatch and combine over ``torch.distributed``.

It implements the whole contract (docs/api.md) with two ``all_to_all_single``
calls per dispatch (counts, then one packed row per (token, destination rank))
and one per combine, over any backend: gloo on CPU or with ranks sharing a GPU,
NCCL with one GPU per rank. It is the correctness oracle for every kernel, the
baseline of every benchmark, and the backend where no GPU exists.

Combine's reduction order (bit-exact contract). For token t, let the ranks
that received it be grouped by node. Per node, rows are summed in float32 in
ascending rank order, starting from the first row (not from 0, so the sign of
a zero survives), and the node's partial sum is rounded to bf16 (the format
that crosses the node boundary). The node partials are then summed the same
way in ascending node order and rounded to bf16. On one node this is simply
``bf16(sum of rows in rank order, in float32)``. A token no rank received
comes back as +0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from deepcomm.errors import CommunicationError
from deepcomm.events import EventHandle
from deepcomm import fp8
from deepcomm.layout import token_rank_mask
from deepcomm.profiling import name_stream
from deepcomm.results import DispatchResult, HandleOwner
from deepcomm.streams import CallerStream, CommStreamScope, hand_back
from deepcomm.topology import Topology, detect_topology
from deepcomm.kernel_common import RoutingSource
from deepcomm.validation import check_combine_inputs, check_dispatch_inputs


# What travels with each count of dispatch's count exchange: what every rank's rows look like.
_SAME_ROWS = ("x: hidden size", "topk_idx: K", "x dtype: fp8 (1) or bf16 (0), after quantize_fp8", "num_experts",
              "handle: given (1) or not (0)")
REFUSED = -1  # in a count exchange: the count of a rank whose arguments were refused (it raised there)


def _check_same_rows(this_rank: int, every_rank: list[list[int]], mine: list[int]) -> None:
    """Every rank's count row (the count, then _SAME_ROWS) must be valid and its _SAME_ROWS equal this rank's: the
    call is collective. Every rank sees every rank's values, so all raise, as the kernels' ranks do when they
    disagree."""
    for rank, theirs in enumerate(every_rank):
        if theirs[0] == REFUSED:
            raise CommunicationError(this_rank, "dispatch/counts", f"rank {rank} refused its dispatch arguments "
                                     "(it raised the error there); no rank dispatched", peer=rank)
    for rank, theirs in enumerate(every_rank):
        for name, value, own in zip(_SAME_ROWS, theirs[1:], mine):
            if value != own:
                raise CommunicationError(this_rank, "dispatch/counts", f"ranks disagree on {name}: rank {rank} "
                                         f"passed {value}, this rank {own}; every rank must pass the same", peer=rank)


@dataclass(frozen=True)
class ReferenceHandle:
    """Everything combine needs to return rows to the tokens they came from.

    send_token_idx: ``[S]`` int64, the tokens this rank sent, grouped by destination rank, ascending
    send_counts:    rows sent to each rank
    recv_counts:    rows received from each rank
    recv_src_idx:   ``[R]`` int64, source token index of each received row
    """

    topology: Topology
    num_tokens: int
    hidden: int
    send_token_idx: torch.Tensor
    send_counts: tuple[int, ...]
    recv_counts: tuple[int, ...]
    recv_src_idx: torch.Tensor
    routing: RoutingSource | None = None  # what a dispatch reusing this handle must be given
    owner: int = 0  # owner_id of the communicator that made it (deepcomm.results.HandleOwner)

    @property
    def num_recv_tokens(self) -> int:
        return sum(self.recv_counts)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """``[N, ...]`` contiguous tensor → ``[N, bytes per row]`` uint8 view."""
    rows = t.contiguous().view(t.shape[0], math.prod(t.shape[1:]))
    if rows.numel() == 0:  # torch may give an empty tensor any strides (fp8 scales [0, 1]: (1, 0))
        return torch.empty(rows.shape[0], rows.shape[1] * t.element_size(), dtype=torch.uint8, device=t.device)
    return rows.view(torch.uint8)


def _split_columns(rows: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
    parts, start = [], 0
    for width in widths:
        # A copy, never a view: with one row the slice is already contiguous, and its byte
        # offset (e.g. 132 after fp8 x and a scale) could not be viewed as int64.
        parts.append(rows[:, start : start + width].clone(memory_format=torch.contiguous_format))
        start += width
    return parts


def ordered_sum(
    segments: list[tuple[torch.Tensor, torch.Tensor]], num_tokens: int, hidden: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum float32 row segments into ``[num_tokens, hidden]`` in segment order.

    Each segment is ``(token_idx [n], rows [n, hidden] float32)`` with distinct
    token indices. A token's sum starts from its first row, then adds the next
    segments' rows in order. Returns the sums and a ``[num_tokens]`` bool of
    tokens that received any row.
    """
    acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=device)
    touched = torch.zeros(num_tokens, dtype=torch.bool, device=device)
    for token_idx, rows in segments:
        first = ~touched[token_idx]
        acc[token_idx[first]] = rows[first]
        later = ~first
        acc[token_idx[later]] += rows[later]
        touched[token_idx] = True
    return acc, touched


class ReferenceCommunicator(HandleOwner):
    """Dispatch/combine on ``torch.distributed`` (the oracle and baseline).

    Works on CPU tensors with gloo and CUDA tensors with gloo or NCCL. Each
    call synchronises with the host once (to size the received rows).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, ranks_per_node: int | None = None) -> None:
        self.group = group
        self.closed = False  # set by Communicator.close when this is its backend (autograd calls it directly)
        self.topology = detect_topology(group, ranks_per_node)
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    # -- plumbing ---------------------------------------------------------

    def _stage(self, stage: str, fn, *args, **kwargs):
        """Run one collective step; failures (including peer timeouts) name the rank and stage."""
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, dist.DistBackendError) as error:
            if isinstance(error, CommunicationError):
                raise
            raise CommunicationError(self.topology.rank, stage, str(error).splitlines()[0]) from error

    def comm_stream(self, device: torch.device) -> torch.cuda.Stream | None:
        """The stream communication runs on (CUDA), created once per device."""
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
            name_stream(self._streams[device], "deepcomm communication (reference)")
        return self._streams[device]

    def _all_to_all(self, stage: str, rows: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        out = torch.empty(sum(recv_counts), *rows.shape[1:], dtype=rows.dtype, device=rows.device)
        self._stage(stage, dist.all_to_all_single, out, rows, recv_counts, send_counts, group=self.group)
        return out

    # -- dispatch ---------------------------------------------------------

    def dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        num_experts: int,
        x_scales: torch.Tensor | None = None,
        quantize_fp8: bool = False,
        power_of_two_scales: bool = False,
        previous_event: EventHandle | None = None,
    ) -> DispatchResult:
        """Send each token once to each rank that holds one of its experts.

        The received rows and the handle are described in :class:`DispatchResult`;
        the current stream waits for them before this returns.

        Args:
            x: ``[T, H]`` bf16, or fp8 e4m3 with ``x_scales``.
            topk_idx: ``[T, K]`` int64 global expert ids, -1 = none.
            topk_weights: ``[T, K]`` float32.
            num_experts: E, a multiple of the world size.
            x_scales: ``[T, H/128]`` float32 for fp8 ``x``.
            quantize_fp8: quantise bf16 ``x`` to fp8 (deepcomm.fp8) before sending.
            power_of_two_scales: with ``quantize_fp8``, round scales up to powers of two.
            previous_event: start after it (default: after the current stream's work).
        """
        return self.run_dispatch(
            x, topk_idx, topk_weights, num_experts, x_scales, quantize_fp8, power_of_two_scales, previous_event, False
        )

    def dispatch_async(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        num_experts: int,
        x_scales: torch.Tensor | None = None,
        quantize_fp8: bool = False,
        power_of_two_scales: bool = False,
        previous_event: EventHandle | None = None,
    ) -> DispatchResult:
        """:meth:`dispatch` without making the current stream wait: wait on ``result.event`` before use."""
        return self.run_dispatch(
            x, topk_idx, topk_weights, num_experts, x_scales, quantize_fp8, power_of_two_scales, previous_event, True
        )

    def run_dispatch(
        self, x, topk_idx, topk_weights, num_experts, x_scales=None, quantize_fp8=False, power_of_two_scales=False,
        previous_event=None, async_finish=False, num_sms=None, num_recv_tokens=None, handle=None,
    ) -> DispatchResult:
        """The backend interface Communicator drives (``num_sms`` does not apply here;
        a given ``num_recv_tokens`` is checked against what arrives; a given ``handle``
        is checked for its kind, and the routing computed anew: this path has nothing to skip).
        With either, the host lists of counts are None, as on the kernels (no host wait there)."""
        self._check_open()
        try:
            self.check_dispatch(x, topk_idx, topk_weights, num_experts, x_scales, quantize_fp8, power_of_two_scales,
                                num_sms, num_recv_tokens, handle)
        except (TypeError, ValueError):
            self.refuse_dispatch(x, topk_idx)
            raise
        if quantize_fp8:
            x, x_scales = fp8.quantize_fp8(x, power_of_two_scales)
        with self._on_comm_stream(x.device, previous_event, (x, x_scales, topk_idx, topk_weights)) as caller:
            result = self._dispatch(x, x_scales, topk_idx, topk_weights, num_experts, handle is not None)
            if num_recv_tokens is not None and num_recv_tokens != result.x.shape[0]:
                raise ValueError(f"num_recv_tokens: given {num_recv_tokens}, but {result.x.shape[0]} rows arrived")
            if num_recv_tokens is not None or handle is not None:
                # The kernels skip their host wait here and learn no host counts: neither does this path, so that
                # a program reading them fails here too rather than on the GPU.
                result.num_recv_tokens_per_rank = None
                result.num_recv_tokens_per_expert_list = None
            return self._finish(result, caller, async_finish)

    def check_dispatch(
        self, x, topk_idx, topk_weights, num_experts, x_scales=None, quantize_fp8=False, power_of_two_scales=False,
        num_sms=None, num_recv_tokens=None, handle=None, check_values=True,
    ) -> None:
        """Everything a dispatch refuses before it communicates (the kernels' contract, so that a program that
        runs here runs there; also the call check's)."""
        check_dispatch_inputs(x, x_scales, topk_idx, topk_weights, num_experts, self.topology.world_size,
                              check_values=check_values)
        if handle is not None:
            self._check_handle(handle)
            handle.routing.check_reused_by(topk_idx, num_experts)
        if quantize_fp8 and x.dtype != torch.bfloat16:
            raise ValueError("quantize_fp8: needs bf16 x; x is already fp8")

    def refuse(self, stage: str, shape: tuple[int, ...], exchange, *arguments) -> None:
        """This rank's arguments were refused: take part in the exchange its peers wait in (``exchange(sent)``,
        one collective), every value REFUSED, so that they raise at once naming this rank instead of waiting out
        their timeout. Best effort: the caller raises the argument's own error whatever happens here."""
        if self.topology.world_size == 1:
            return
        # NCCL takes CUDA tensors only; on gloo the peers' kind is most likely the arguments'.
        if dist.get_backend(self.group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = next((a.device for a in arguments if isinstance(a, torch.Tensor)), torch.device("cpu"))
        try:
            self._stage(stage, exchange, torch.full(shape, REFUSED, dtype=torch.int64, device=device))
        except CommunicationError:
            pass

    def refuse_dispatch(self, x, topk_idx) -> None:
        """This rank refused its dispatch arguments (here or in the Communicator's per-call checks): the peers,
        waiting in the count exchange, raise at once naming this rank."""
        self.refuse("dispatch/counts", (self.topology.world_size, 1 + len(_SAME_ROWS)),
                    lambda sent: dist.all_to_all_single(torch.empty_like(sent), sent, group=self.group), x, topk_idx)

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("communicator: closed (close() was called); make a new one")

    def _check_handle(self, handle) -> None:
        if not isinstance(handle, ReferenceHandle) or handle.owner != self.owner_id:
            raise TypeError("handle: expected the handle of a dispatch on this communicator's reference path, got "
                            f"{'one of another communicator' if isinstance(handle, ReferenceHandle) else type(handle).__name__}")

    def _dispatch(
        self,
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        num_experts: int,
        reuses_handle: bool = False,
    ) -> DispatchResult:
        topo = self.topology
        num_tokens, hidden = x.shape
        device = x.device

        # send_token_idx lists the tokens for rank 0, then rank 1, ... each in token order:
        # nonzero() of the [W, T] mask walks it row-major.
        in_rank = token_rank_mask(topk_idx, num_experts, topo.world_size)
        dest_rank, send_token_idx = in_rank.t().nonzero(as_tuple=True)
        send_counts_t = torch.bincount(dest_rank, minlength=topo.world_size)
        # With each count, what every rank's rows look like: ranks that disagree would exchange rows of
        # different widths (a crash in the transfer on one rank, garbage on another), so they raise here.
        shape = [hidden, topk_idx.shape[1], int(x.dtype == fp8.FP8_DTYPE), num_experts, int(reuses_handle)]
        send = torch.cat([send_counts_t.unsqueeze(1),
                          send_counts_t.new_tensor(shape).expand(topo.world_size, len(shape))], dim=1)
        received_t = torch.empty_like(send)
        self._stage("dispatch/counts", dist.all_to_all_single, received_t, send, group=self.group)
        received = received_t.tolist()  # one host copy for the counts and the check
        _check_same_rows(topo.rank, received, shape)
        send_counts, recv_counts = send_counts_t.tolist(), [row[0] for row in received]

        # One packed row per (token, destination rank): x | scales | topk_idx | topk_weights | token index.
        fields = [x] + ([x_scales] if x_scales is not None else []) + [topk_idx, topk_weights]
        fields.append(torch.arange(num_tokens, dtype=torch.int64, device=device).unsqueeze(1))
        byte_fields = [_as_bytes(f) for f in fields]
        widths = [f.shape[1] for f in byte_fields]
        packed = torch.cat(byte_fields, dim=1)[send_token_idx]
        received = self._all_to_all("dispatch/rows", packed, send_counts, recv_counts)
        parts = _split_columns(received, widths)

        num_recv = received.shape[0]
        num_topk = topk_idx.shape[1]
        recv_x = parts[0].view(x.dtype).view(num_recv, hidden)
        recv_scales = None
        if x_scales is not None:
            recv_scales = parts[1].view(torch.float32).view(num_recv, fp8.num_scale_blocks(hidden))
            parts = [parts[0]] + parts[2:]
        global_idx = parts[1].view(torch.int64).view(num_recv, num_topk)
        weights = parts[2].view(torch.float32).view(num_recv, num_topk)
        recv_src_idx = parts[3].view(torch.int64).view(num_recv)

        experts_per_rank = num_experts // topo.world_size
        local_idx = global_idx - topo.rank * experts_per_rank
        is_local = (global_idx >= 0) & (local_idx >= 0) & (local_idx < experts_per_rank)
        recv_topk_idx = torch.where(is_local, local_idx, -1)
        recv_weights = torch.where(is_local, weights, 0.0)
        per_expert = torch.bincount(recv_topk_idx[is_local], minlength=experts_per_rank).to(torch.int32)

        handle = ReferenceHandle(
            topology=topo,
            num_tokens=num_tokens,
            hidden=hidden,
            send_token_idx=send_token_idx,
            send_counts=tuple(send_counts),
            recv_counts=tuple(recv_counts),
            recv_src_idx=recv_src_idx,
            routing=RoutingSource.of(topk_idx, num_experts, 0),
            owner=self.owner_id,
        )
        return DispatchResult(
            x=recv_x,
            x_scales=recv_scales,
            topk_idx=recv_topk_idx,
            topk_weights=recv_weights,
            num_tokens_per_expert=per_expert,
            num_recv_tokens_per_rank=list(recv_counts),
            handle=handle,
            event=EventHandle(None),
            num_recv_tokens_per_expert_list=per_expert.tolist(),  # the reference path syncs anyway
        )

    # -- combine ----------------------------------------------------------

    def combine(self, expert_out: torch.Tensor, handle: ReferenceHandle) -> torch.Tensor:
        """Return ``[R, H]`` bf16 rows to their tokens and reduce: ``[T, H]`` bf16.

        Row i of ``expert_out`` belongs to received row i of the dispatch that
        made ``handle``. The reduction order is fixed (module docstring).
        """
        combined, _ = self.run_combine(expert_out, handle, None, async_finish=False)
        return combined

    def combine_async(
        self, expert_out: torch.Tensor, handle: ReferenceHandle, previous_event: EventHandle | None = None
    ) -> tuple[torch.Tensor, EventHandle]:
        """:meth:`combine` on the communication stream after ``previous_event``, without making the
        current stream wait; returns ``(y, event)``."""
        return self.run_combine(expert_out, handle, previous_event, async_finish=True)

    def combine_input(self, handle: ReferenceHandle) -> torch.Tensor:
        """``[R, H]`` bf16 for the expert outputs; a plain tensor here (collectives need no registered memory)."""
        self._check_handle(handle)
        return torch.empty(handle.num_recv_tokens, handle.hidden, dtype=torch.bfloat16,
                           device=handle.send_token_idx.device)

    def check_combine(self, expert_out, handle, num_sms=None) -> None:
        """Everything a combine refuses before it communicates (also the call check's)."""
        self._check_open()
        self._check_handle(handle)
        check_combine_inputs(expert_out, handle.num_recv_tokens, handle.hidden, handle.send_token_idx.device)

    def run_combine(
        self, expert_out, handle, previous_event=None, async_finish=False, num_sms=None
    ) -> tuple[torch.Tensor, EventHandle]:
        """The backend interface Communicator drives (``num_sms`` does not apply here)."""
        self.check_combine(expert_out, handle)
        with self._on_comm_stream(expert_out.device, previous_event, (expert_out,)) as caller:
            combined = self._combine(expert_out, handle)
            device = expert_out.device
            return combined, hand_back((combined,), device, self.comm_stream(device), caller, async_finish)

    def _combine(self, expert_out: torch.Tensor, handle: ReferenceHandle) -> torch.Tensor:
        return self.reduce_rows(expert_out, handle)

    def reduce_rows(self, rows: torch.Tensor, handle: ReferenceHandle) -> torch.Tensor:
        """Combine's data movement and reduction for any float rows ``[R, C]`` → ``[T, C]``.

        Sums in float32 in the contract's order; node partials are rounded to
        ``rows.dtype`` (bf16 for combine). Used by combine and by autograd.
        """
        topo = handle.topology
        returned = self._all_to_all("combine/rows", rows, list(handle.recv_counts), list(handle.send_counts))
        offsets = [0]
        for count in handle.send_counts:
            offsets.append(offsets[-1] + count)
        width = rows.shape[1]
        node_segments = []
        for node in range(topo.num_nodes):
            rank_segments = [
                (handle.send_token_idx[offsets[r] : offsets[r + 1]], returned[offsets[r] : offsets[r + 1]].float())
                for r in topo.ranks_of_node(node)
            ]
            partial, touched = ordered_sum(rank_segments, handle.num_tokens, width, rows.device)
            tokens = touched.nonzero().squeeze(1)
            node_segments.append((tokens, partial[tokens].to(rows.dtype).float()))
        total, _ = ordered_sum(node_segments, handle.num_tokens, width, rows.device)
        return total.to(rows.dtype)

    def scatter_rows(self, values: torch.Tensor, handle: ReferenceHandle) -> torch.Tensor:
        """Dispatch's data movement with a known handle: ``[T, C]`` → ``[R, C]`` in received order."""
        return self._all_to_all("dispatch/rows", values[handle.send_token_idx].contiguous(),
                                list(handle.send_counts), list(handle.recv_counts))

    # -- streams ----------------------------------------------------------

    def _on_comm_stream(self, device: torch.device, previous_event: EventHandle | None, inputs: tuple):
        return CommStreamScope(self.comm_stream(device), previous_event, inputs)

    def _finish(self, result: DispatchResult, caller: CallerStream | None, async_finish: bool) -> DispatchResult:
        device = result.x.device
        outputs = (result.x, result.x_scales, result.topk_idx, result.topk_weights, result.num_tokens_per_expert)
        result.event = hand_back(outputs, device, self.comm_stream(device), caller, async_finish)
        return result
