"""The low-latency contract (deepcomm/low_latency.py) in torch ops over ``torch.distributed``.

The oracle the kernels are checked against bit for bit, and the low-latency
path where no GPU exists. Unlike the kernels it waits on the host (it moves
rows with ``all_to_all_single``); the received layout, the counts and combine's
reduction are the kernels' exactly. Rows past an expert's count are zero here
(unspecified in the contract).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from deepcomm import fp8
from deepcomm.errors import CommunicationError, SlotReusedError
from deepcomm.events import EventHandle
from deepcomm.low_latency import (
    LowLatencyConfig, LowLatencyHandle, LowLatencyResult, check_low_latency_combine, check_low_latency_dispatch,
)
from deepcomm.reference import REFUSED, ReferenceCommunicator, _as_bytes, _split_columns
from deepcomm.results import HandleOwner
from deepcomm.streams import hand_back


def weighted_sum_in_k_order(values: torch.Tensor, weights: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """``[T, H]`` float32: sum over k ascending of ``weights[:, k] * values[:, k]``, each product and sum
    rounded on its own, starting from k = 0; an absent pair adds +0.0 (deepcomm/pair_sum.py's order)."""
    terms = torch.where(present.unsqueeze(-1), values.float() * weights.unsqueeze(-1), 0.0)
    acc = terms[:, 0]
    for k in range(1, terms.shape[1]):
        acc = acc + terms[:, k]
    return acc


def _hold_back(tensors) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For a call with a receive hook: this path has its results at once, so they are set aside and the caller's
    tensors hold 0xFF bytes (NaN, or -1 for counts) until the hook puts them back, as on the kernels, where
    nothing has arrived before the hook. Call it where the results were made (their stream)."""
    held = [(t, t.clone()) for t in tensors if t is not None]
    for tensor, _ in held:
        tensor.view(torch.uint8).fill_(0xFF)
    return held


def _give_back(held: list[tuple[torch.Tensor, torch.Tensor]], event: EventHandle) -> EventHandle:
    """The hook's receive: the current stream waits for the call, then its results are put in place there."""
    event.wait()
    for tensor, result in held:
        if result.is_cuda:
            result.record_stream(torch.cuda.current_stream(result.device))
        tensor.copy_(result)
    return event


def _once(check, held, event: EventHandle):
    """A combine's receive hook here: runs once, after ``check()``, as on the kernels."""
    called = False

    def hook() -> EventHandle:
        nonlocal called
        if called:
            raise RuntimeError("hook: already called")
        check()
        called = True
        return _give_back(held, event)

    return hook


def sum_by_owner(values: torch.Tensor, weights: torch.Tensor, owners: torch.Tensor, world_size: int) -> torch.Tensor:
    """``[T, H]`` bf16: the combine's reduction of ``values`` ``[T, K, H]`` (bf16) when the dispatch carried the weights.

    Per rank o ascending, the partial ``sum over k ascending with owners[:, k] == o of weights[:, k] *
    values[:, k]`` (float32, each product and sum rounded on its own, from the first such k) rounded to
    bf16, as the owner sends it; then the partials of the ranks a token reached summed in ascending rank
    order in float32 from the first, rounded to bf16. ``owners`` -1 is no pair; a token with none gives +0.0.
    """
    num_tokens, num_topk, hidden = values.shape
    total = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=values.device)
    total_started = torch.zeros(num_tokens, 1, dtype=torch.bool, device=values.device)
    for owner in range(world_size):
        partial = torch.zeros_like(total)
        started = torch.zeros_like(total_started)
        for k in range(num_topk):
            here = (owners[:, k] == owner).unsqueeze(1)
            term = values[:, k].float() * weights[:, k : k + 1]
            partial = torch.where(here, torch.where(started, partial + term, term), partial)
            started = started | here
        partial = partial.to(torch.bfloat16).float()
        total = torch.where(started, torch.where(total_started, total + partial, partial), total)
        total_started = total_started | started
    return total.to(torch.bfloat16)


class ReferenceLowLatency(HandleOwner):
    """Low-latency dispatch/combine on the reference communicator's group."""

    def __init__(self, reference: ReferenceCommunicator, config: LowLatencyConfig) -> None:
        if not isinstance(config, LowLatencyConfig):
            raise TypeError(f"low_latency: expected a deepcomm.LowLatencyConfig, got {type(config).__name__}")
        config.check_world(reference.topology.world_size)
        self.reference, self.config, self.topology = reference, config, reference.topology
        self._calls = 0
        self._outputs: dict[tuple[int, torch.device], torch.Tensor] = {}  # combine_input, per area and device
        self._combined: set[int] = set()
        self._unreceived: set[int] = set()  # dispatches with a receive hook not yet called
        self._weights: dict[int, torch.Tensor] = {}  # per call that carried them (its area's last two calls)

    def check_errors(self) -> None:
        """Nothing is reported later on this path: bad input raises at once."""

    def _check_handle(self, handle) -> None:
        """The kernels' checks, so that a program that runs here runs there."""
        if not isinstance(handle, LowLatencyHandle) or handle.owner != self.owner_id:
            raise TypeError("handle: expected the handle of a low-latency dispatch on this communicator")
        self._check_reused(handle)
        if handle.call in self._combined:
            raise ValueError("handle: its dispatch was combined already (once per dispatch); dispatch again")

    def _check_received(self, handle) -> None:
        self._check_handle(handle)
        if handle.call in self._unreceived:
            raise ValueError("handle: its dispatch has not received yet; call the result's hook() first")

    def _check_reused(self, handle) -> None:
        if self._calls - handle.call >= 2:
            raise SlotReusedError(f"handle: {self._calls - handle.call} low-latency dispatches ran since the one that "
                                  "made it and reused its receive area (results stay valid for 1 further dispatch)")

    def _receive_hook(self, result: LowLatencyResult, held):
        """The kernels' hook contract: once, while the handle is valid; the results appear only then."""
        call = result.handle.call

        def hook() -> EventHandle:
            if call not in self._unreceived:
                raise RuntimeError("hook: already called")
            self._check_handle(result.handle)
            self._unreceived.discard(call)
            return _give_back(held, result.event)

        return hook

    def check_dispatch(self, x, topk_idx, num_experts, x_scales=None, quantize_fp8=False, power_of_two_scales=False,
                       num_sms=None, topk_weights=None, check_values=True) -> None:
        """Everything a dispatch refuses before it communicates (the kernels' contract; also the call check's)."""
        check_low_latency_dispatch(self.config, self.topology.world_size, x, x_scales, topk_idx, num_experts, None,
                                   check_values, topk_weights)
        if self._calls + 1 - 2 in self._unreceived:
            raise ValueError(f"return_recv_hook: dispatch {self._calls - 1} on the same receive area has not "
                             "received yet; call its hook() before this dispatch")
        if quantize_fp8 and x.dtype != torch.bfloat16:
            raise ValueError("quantize_fp8: needs bf16 x; x is already fp8")
        if quantize_fp8:
            fp8.num_scale_blocks(x.shape[1], "x")

    def refuse_dispatch(self, x, topk_idx) -> None:
        """This rank refused its dispatch arguments (here or in the Communicator's per-call checks): the peers,
        waiting in the count exchange, raise at once naming this rank."""
        ref, world = self.reference, self.topology.world_size

        def exchange(sent: torch.Tensor) -> None:
            dist.all_gather([torch.empty_like(sent) for _ in range(world)], sent, group=ref.group)

        ref.refuse("low_latency/counts", (self.config.num_experts + 1,), exchange, x, topk_idx)

    def dispatch(self, x, topk_idx, num_experts, x_scales=None, quantize_fp8=False, power_of_two_scales=False,
                 previous_event=None, async_finish=False, return_recv_hook=False, num_sms=None,
                 topk_weights=None) -> LowLatencyResult:
        try:
            self.check_dispatch(x, topk_idx, num_experts, x_scales, quantize_fp8, power_of_two_scales, num_sms,
                                topk_weights)
        except (TypeError, ValueError):  # the peers wait in the count exchange: they raise at once, naming this rank
            self.refuse_dispatch(x, topk_idx)
            raise
        if quantize_fp8:
            x, x_scales = fp8.quantize_fp8(x, power_of_two_scales)
        with self.reference._on_comm_stream(x.device, previous_event, (x, x_scales, topk_idx, topk_weights)) as caller:
            result = self._dispatch(x, x_scales, topk_idx, topk_weights)
            held = _hold_back((result.x, result.x_scales, result.num_tokens_per_expert)) if return_recv_hook else []
            result.event = hand_back((result.x, result.x_scales, result.num_tokens_per_expert,
                                      result.handle.pair_rows), x.device, self.reference.comm_stream(x.device),
                                     caller, async_finish or return_recv_hook)
        if return_recv_hook:
            self._unreceived.add(result.handle.call)
            result.hook = self._receive_hook(result, held)
        return result

    def _dispatch(self, x, x_scales, topk_idx, topk_weights) -> LowLatencyResult:
        config, topo = self.config, self.topology
        world, rank, device = topo.world_size, topo.rank, x.device
        num_tokens, hidden = x.shape
        local_experts, rows_per_expert, _ = config.recv_shape(world)
        num_experts = config.num_experts

        # chosen[t, e]: token t sends one row to expert e (naming it twice still sends one).
        valid = topk_idx >= 0
        chosen = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=device)
        token_of = torch.arange(num_tokens, device=device).unsqueeze(1).expand_as(topk_idx)
        chosen[token_of[valid], topk_idx[valid]] = True
        counts = chosen.sum(0)  # [E]
        # With each rank's counts, whether it sends its weights: every rank must do as the others (the kernels
        # report a rank that differs at the next call; here it raises at once, on every rank).
        sent = torch.cat([counts, counts.new_tensor([int(topk_weights is not None)])])
        every_count = [torch.empty_like(sent) for _ in range(world)]
        self.reference._stage("low_latency/counts", dist.all_gather, every_count, sent, group=self.reference.group)
        every_count = torch.stack(every_count)  # [W, E + 1]
        refused = (every_count[:, -1] == REFUSED).nonzero().flatten().tolist()
        if refused:
            raise CommunicationError(rank, "low_latency/counts", f"rank {refused[0]} refused its dispatch arguments "
                                     "(it raised the error there); no rank dispatched", peer=refused[0])
        differs = (every_count[:, -1] != every_count[rank, -1]).nonzero().flatten().tolist()
        if differs:
            raise ValueError(f"topk_weights: rank {differs[0]} {'gave' if topk_weights is None else 'did not give'} "
                             "them to this dispatch; every rank must give them or none")
        every_count = every_count[:, :-1]
        # This rank's rows for expert e follow the lower ranks', in token order.
        row_of = every_count[:rank].sum(0) + chosen.long().cumsum(0) - 1  # [T, E], meaningful where chosen
        picked_row = row_of.gather(1, topk_idx.clamp(min=0))
        pair_rows = torch.where(valid, topk_idx * rows_per_expert + picked_row, -1).to(torch.int32)

        # One packed row per chosen (token, expert), by destination rank, then expert, then token.
        expert_idx, token_idx = chosen.t().nonzero(as_tuple=True)
        owner = expert_idx // local_experts
        flat_row = (expert_idx % local_experts) * rows_per_expert + row_of[token_idx, expert_idx]
        fields = [x[token_idx]] + ([x_scales[token_idx]] if x_scales is not None else []) + [flat_row.unsqueeze(1)]
        byte_fields = [_as_bytes(f) for f in fields]
        send_counts = torch.bincount(owner, minlength=world)
        recv_counts = torch.empty_like(send_counts)
        self.reference._stage("low_latency/sizes", dist.all_to_all_single, recv_counts, send_counts,
                              group=self.reference.group)
        received = self.reference._all_to_all("low_latency/rows", torch.cat(byte_fields, dim=1),
                                              send_counts.tolist(), recv_counts.tolist())
        parts = _split_columns(received, [f.shape[1] for f in byte_fields])
        places = parts[-1].view(torch.int64).view(-1)

        # Placed as bytes: index_put is not defined for every dtype (fp8) on every device.
        out_x = torch.zeros(local_experts * rows_per_expert, hidden * x.element_size(), dtype=torch.uint8,
                            device=device)
        out_x[places] = parts[0]
        out_x = out_x.view(x.dtype)
        out_scales = None
        if x_scales is not None:
            out_scales = torch.zeros(local_experts * rows_per_expert, x_scales.shape[1], dtype=torch.float32,
                                     device=device)
            out_scales[places] = parts[1].view(torch.float32).view(-1, x_scales.shape[1])
            out_scales = out_scales.view(local_experts, rows_per_expert, -1)
        per_expert = every_count[:, rank * local_experts : (rank + 1) * local_experts].sum(0).to(torch.int32)
        self._calls += 1
        self._combined.discard(self._calls - 2)
        handle = LowLatencyHandle(pair_rows, per_expert, num_tokens, hidden, self._calls % 2, self._calls, self.owner_id,
                                  topk_weights is not None)
        # The weights stay with the call, as the kernels keep them with its rows (a copy: the caller may reuse its own).
        self._weights = {call: w for call, w in self._weights.items() if call > self._calls - 2}
        if topk_weights is not None:
            self._weights[self._calls] = topk_weights.detach().clone()
        return LowLatencyResult(out_x.view(local_experts, rows_per_expert, hidden), out_scales, per_expert, handle,
                                EventHandle(None))

    def combine_input(self, handle: LowLatencyHandle) -> torch.Tensor:
        """One tensor per receive area, as on the kernels (written, then passed to combine)."""
        self._check_received(handle)
        key = (handle.area, handle.pair_rows.device)
        if key not in self._outputs:
            shape = self.config.recv_shape(self.topology.world_size)
            self._outputs[key] = torch.zeros(shape, dtype=torch.bfloat16, device=handle.pair_rows.device)
        return self._outputs[key]

    def check_combine(self, expert_out, topk_weights, handle, num_sms=None) -> None:
        """Everything a combine refuses before it communicates (also the call check's)."""
        self._check_received(handle)
        check_low_latency_combine(self.config, self.topology.world_size, expert_out, topk_weights, handle, None)

    def combine(self, expert_out, topk_weights, handle, previous_event=None, async_finish=False,
                return_recv_hook=False, num_sms=None):
        self.check_combine(expert_out, topk_weights, handle, num_sms)
        self._combined.add(handle.call)
        device = expert_out.device
        with self.reference._on_comm_stream(device, previous_event, (expert_out, topk_weights)) as caller:
            y = self._combine(expert_out, topk_weights, handle)
            held = _hold_back((y,)) if return_recv_hook else []
            event = hand_back((y,), device, self.reference.comm_stream(device), caller, async_finish or return_recv_hook)
        return y, event, (_once(lambda: self._check_reused(handle), held, event) if return_recv_hook else None)

    def _combine(self, expert_out, topk_weights, handle) -> torch.Tensor:
        local_experts, rows_per_expert, hidden = expert_out.shape
        owner_rows = local_experts * rows_per_expert
        pairs = handle.pair_rows.reshape(-1).long()
        present = pairs >= 0
        wanted = pairs[present]
        owner = wanted // owner_rows
        order = torch.argsort(owner, stable=True)
        send_counts = torch.bincount(owner, minlength=self.topology.world_size)
        recv_counts = torch.empty_like(send_counts)
        ref = self.reference
        ref._stage("low_latency/requests", dist.all_to_all_single, recv_counts, send_counts, group=ref.group)
        sends, recvs = send_counts.tolist(), recv_counts.tolist()
        asked = ref._all_to_all("low_latency/requests", (wanted % owner_rows)[order].contiguous(), sends, recvs)
        rows = ref._all_to_all("low_latency/outputs", expert_out.reshape(owner_rows, hidden)[asked].contiguous(),
                               recvs, sends)
        values = torch.zeros(pairs.numel(), hidden, dtype=torch.bfloat16, device=expert_out.device)
        values[present.nonzero().squeeze(1)[order]] = rows
        num_tokens, num_topk = handle.pair_rows.shape
        values = values.view(num_tokens, num_topk, hidden)
        if handle.weights_at_dispatch:
            owners = torch.where(present, pairs // owner_rows, -1).view(num_tokens, num_topk)
            return sum_by_owner(values, self._weights[handle.call], owners, self.topology.world_size)
        summed = weighted_sum_in_k_order(values, topk_weights, present.view(num_tokens, num_topk))
        return summed.to(torch.bfloat16)
