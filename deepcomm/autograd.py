"""Differentiable dispatch and combine on every backend: the backward of each is the other.

    out = deepcomm.autograd.dispatch(comm, x, topk_idx, topk_weights, num_experts)
    y, event = deepcomm.autograd.combine(comm, expert_out, out.handle)

Gradients flow to ``x`` (summed over the ranks that received each token, in
combine's fixed order) and to ``topk_weights`` (each entry from the rank that
holds its expert), and from ``y`` back to ``expert_out`` (each received row gets
its token's gradient).

Backward on the reference backend uses its own data movement (``reduce_rows``,
``scatter_rows``). On the kernel backends (intranode, internode):

- dispatch's backward w.r.t. ``x`` is ``combine`` of the row gradients (the
  same fixed-order sum); w.r.t. ``topk_weights`` the float32 ``[R, K]`` rows go
  back to their source ranks unrounded (:func:`return_to_sources`);
- combine's backward dispatches the bf16 gradient again with the forward
  dispatch's routing: rows arrive in the forward's received order, so row i of
  the result is the gradient of ``expert_out`` row i. That routing is why a
  handle given to :func:`combine` must come from :func:`dispatch`.

Every rank must run the same forward and backward (these are collectives).
Backward runs on the stream that was current during the forward (autograd's
rule) and uses the synchronous API there, so that stream waits for each call.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from deepcomm.events import EventHandle
from deepcomm.fp8 import dequantize_fp8
from deepcomm.internode import InternodeHandle
from deepcomm.intranode import IntranodeHandle
from deepcomm.layout import token_rank_mask
from deepcomm.reference import ReferenceCommunicator
from deepcomm.results import DispatchResult
from deepcomm.streams import CommStreamScope, hand_back


# -- backends -----------------------------------------------------------------


def _backend(comm):
    """The backend object behind a Communicator (or a backend passed directly)."""
    impl = getattr(comm, "_impl", comm)
    if not (hasattr(impl, "run_dispatch") and hasattr(impl, "run_combine")):
        raise TypeError(f"comm: expected a deepcomm.Communicator, got {type(comm).__name__}")
    return impl


def _is_reference(impl) -> bool:
    return isinstance(impl, ReferenceCommunicator)


def row_dtypes(comm) -> tuple[torch.dtype, ...]:
    """Dtypes that rows may have in :func:`dispatch` and :func:`combine` on ``comm``'s backend.

    bf16 everywhere; float32 too on the reference backend (the rows travel as raw
    bytes and combine sums them in float32), which lets CPU tests compare
    layers tightly.
    """
    return (torch.bfloat16, torch.float32) if _is_reference(_backend(comm)) else (torch.bfloat16,)


def _comm_stream(impl, device: torch.device):
    """The stream ``impl`` communicates on (None on the CPU)."""
    if device.type != "cuda":
        return None
    return impl.comm_stream(device) if _is_reference(impl) else impl._stream


def _check_rows(comm, name: str, rows: object) -> None:
    # Other dtypes are the backend's to report; float32 is only ours to allow.
    if isinstance(rows, torch.Tensor) and rows.dtype == torch.float32 and torch.float32 not in row_dtypes(comm):
        raise TypeError(f"{name}: float32 rows travel only on the reference backend; use bf16")


# -- routing kept for the kernel backends' backward ---------------------------


@dataclass
class _Route:
    """A kernel dispatch's routing: combine's backward dispatches again with it.

    ``newest_handle``: the handle of the latest such re-dispatch. It moves rows
    exactly as the forward's handle does, and its combine state is younger (the
    internode combine retraces forward maps that live for ``num_recv_slots``
    dispatches).
    """

    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    num_experts: int
    newest_handle: Any = None


# id(handle) -> _Route, dropped when the handle is collected. Handles are frozen and belong to
# the backends, so the routing cannot ride on them; a _Route never refers to its own key.
_ROUTES: dict[int, _Route] = {}


def _remember_route(handle, route: _Route) -> None:
    key = id(handle)
    _ROUTES[key] = route
    weakref.finalize(handle, _ROUTES.pop, key, None)


def _route_of(handle) -> _Route:
    route = _ROUTES.get(id(handle))
    if route is None:
        raise ValueError("handle: on the kernel backends it must come from deepcomm.autograd.dispatch "
                         "(combine's backward dispatches again with that routing)")
    return route


def _combinable_handle(impl, route: _Route, forward_handle):
    """A handle combine can still use for this routing (dispatching again if none is left)."""
    handle = route.newest_handle or forward_handle
    expired = (isinstance(handle, InternodeHandle)
               and impl._dispatch_calls - handle.dispatch_call >= impl.config.num_recv_slots)
    if expired:
        # Its forward maps are overwritten. Every rank counts dispatches alike, so all dispatch again together.
        rows = torch.zeros(handle.num_tokens, handle.hidden, dtype=torch.bfloat16, device=route.topk_idx.device)
        handle = _dispatch_again(impl, route, rows, handle).handle
    return handle


def _dispatch_again(impl, route: _Route, rows: torch.Tensor, handle) -> DispatchResult:
    """Dispatch ``rows`` along ``route``, whose dispatch made ``handle``; every rank does so together.

    The intranode backend reuses the handle's routing (no layout, no count exchange, no host wait);
    the others know the row count, which spares the host its wait where a backend has one.
    """
    reuse = handle if isinstance(handle, IntranodeHandle) else None
    result = impl.run_dispatch(rows, route.topk_idx, route.topk_weights, route.num_experts,
                               num_recv_tokens=handle.num_recv_tokens, handle=reuse)
    route.newest_handle = result.handle
    return result


# -- the weight-gradient return -----------------------------------------------


def return_to_sources(
    values: torch.Tensor,
    num_recv_tokens_per_rank: list[int] | None,
    is_token_in_rank: torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Send received rows back to the tokens they came from; each token sums what returns.

    Args:
        values: ``[R, C]`` float32, one row per received row, in received order
            (by source rank, then source token index).
        num_recv_tokens_per_rank: rows received from each source rank
            (``DispatchResult.num_recv_tokens_per_rank``).
        is_token_in_rank: ``[T, W]`` bool, which ranks this rank's tokens went to
            (the dispatch layout's mask): the rows coming back from rank ``d``
            belong, in order, to the tokens with ``is_token_in_rank[:, d]``.
        group: the communicator's process group.

    Returns:
        ``[T, C]`` float32. No rounding to a narrower type happens, and the sum is
        exact when each entry is nonzero on at most one rank (weight gradients:
        each (token, k) has its expert on one rank).
    """
    world_size = dist.get_world_size(group)
    if not isinstance(values, torch.Tensor) or values.dtype != torch.float32:
        raise TypeError(f"values: expected a float32 torch.Tensor, got {getattr(values, 'dtype', type(values))}")
    if values.dim() != 2:
        raise ValueError(f"values: expected [rows, columns], got shape {list(values.shape)}")
    if num_recv_tokens_per_rank is None:
        raise ValueError("num_recv_tokens_per_rank: unknown because the dispatch was given num_recv_tokens; "
                         "dispatch without it to get the per-source counts that gradients need")
    if len(num_recv_tokens_per_rank) != world_size or sum(num_recv_tokens_per_rank) != values.shape[0]:
        raise ValueError(f"num_recv_tokens_per_rank: expected {world_size} counts summing to the {values.shape[0]} "
                         f"rows of values, got {list(num_recv_tokens_per_rank)}")
    if not isinstance(is_token_in_rank, torch.Tensor) or is_token_in_rank.dtype != torch.bool:
        raise TypeError("is_token_in_rank: expected a bool torch.Tensor")
    if is_token_in_rank.dim() != 2 or is_token_in_rank.shape[1] != world_size:
        raise ValueError(f"is_token_in_rank: expected [tokens, {world_size}], got {list(is_token_in_rank.shape)}")

    send_counts = is_token_in_rank.sum(dim=0).tolist()  # what this rank sent each rank is what it gets back
    token_idx = is_token_in_rank.t().nonzero()[:, 1]  # rank 0's rows first, each rank's in token order
    returned = values.new_empty(token_idx.shape[0], values.shape[1])
    dist.all_to_all_single(returned, values.contiguous(), send_counts, list(num_recv_tokens_per_rank), group=group)
    return values.new_zeros(is_token_in_rank.shape[0], values.shape[1]).index_add_(0, token_idx, returned)


# -- dispatch -----------------------------------------------------------------


def _arrive(impl, result: DispatchResult, async_finish: bool, as_float32: bool) -> tuple:
    """Autograd's outputs from the received rows: dequantised fp8, float32 reinterpreted, and
    on the kernel backends copies (receive slots are reused, and autograd keeps these for backward).

    With ``async_finish`` this runs on the communication stream and ``result.event`` moves past it.
    """

    def convert() -> tuple:
        x, topk_idx, topk_weights = result.x, result.topk_idx, result.topk_weights
        if result.x_scales is not None:
            x = dequantize_fp8(x, result.x_scales)
        elif as_float32:
            x = x.view(torch.float32)
        elif not _is_reference(impl):
            x = x.clone()
        if not _is_reference(impl):
            topk_idx, topk_weights = topk_idx.clone(), topk_weights.clone()
        return x, topk_idx, topk_weights

    device = result.x.device
    stream = _comm_stream(impl, device) if async_finish else None
    if stream is None:
        return convert()  # the caller's stream already waits for the rows (or there are no streams)
    with CommStreamScope(stream, result.event, ()) as caller:
        outputs = convert()
        result.event = hand_back(outputs, device, stream, caller, async_finish=True)
    return outputs


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, route, holder: dict, options: dict, x, topk_weights, topk_idx):
        as_float32 = x.dtype == torch.float32
        wire = x.detach().view(torch.bfloat16) if as_float32 else x.detach()  # float32: two bf16 per value
        result = impl.run_dispatch(wire, topk_idx, topk_weights.detach(), options["num_experts"], None,
                                   options["quantize_fp8"], False, options["previous_event"], options["async_finish"])
        result.x, result.topk_idx, result.topk_weights = _arrive(impl, result, options["async_finish"], as_float32)
        result.x_scales = None
        holder["result"] = result
        ctx.impl, ctx.handle, ctx.route = impl, result.handle, route
        ctx.recv_counts = result.num_recv_tokens_per_rank
        ctx.save_for_backward(result.topk_idx)
        return result.x, result.topk_weights

    @staticmethod
    def backward(ctx, grad_x, grad_weights):
        (local_idx,) = ctx.saved_tensors
        impl, route = ctx.impl, ctx.route
        grad_input = grad_topk_weights = None
        if ctx.needs_input_grad[4]:
            if _is_reference(impl):
                grad_input = impl.reduce_rows(grad_x.contiguous(), ctx.handle)
            else:
                handle = _combinable_handle(impl, route, ctx.handle)
                grad_input, _ = impl.run_combine(grad_x.contiguous(), handle)
        if ctx.needs_input_grad[5]:
            # Entries for experts elsewhere were zeros, not weights: they pass no gradient.
            local_grad = torch.where(local_idx >= 0, grad_weights, 0.0)
            if _is_reference(impl):
                grad_topk_weights = impl.reduce_rows(local_grad, ctx.handle)
            else:
                in_rank = token_rank_mask(route.topk_idx, route.num_experts, impl.topology.world_size)
                grad_topk_weights = return_to_sources(local_grad, ctx.recv_counts, in_rank, impl.group)
        return None, None, None, None, grad_input, grad_topk_weights, None


def dispatch(
    comm,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    previous_event: EventHandle | None = None,
    async_finish: bool = False,
    quantize_fp8: bool = False,
) -> DispatchResult:
    """:meth:`Communicator.dispatch` recorded for autograd, on any backend.

    ``result.x`` and ``result.topk_weights`` carry gradients back to ``x`` and
    ``topk_weights``. ``x`` is bf16 (float32 too on the reference backend).
    With ``async_finish`` the caller's stream does not wait: call
    ``result.event.wait()`` before using the outputs (as ``dispatch_async``).

    ``quantize_fp8``: the rows travel as fp8 e4m3 with per-128-channel scales
    (deepcomm.fp8) and arrive dequantised to bf16 (``result.x_scales`` is None),
    so experts compute in bf16. The backward treats quantisation as the
    identity (straight-through): the gradient w.r.t. ``x`` is that of the bf16
    rows received.

    On the kernel backends the outputs are copies of the receive slot (the
    slot is reused by later dispatches, and autograd keeps them for backward).
    """
    impl = _backend(comm)
    as_float32 = isinstance(x, torch.Tensor) and x.dtype == torch.float32

    def checks() -> None:
        _check_rows(comm, "x", x)
        if as_float32:
            if quantize_fp8:
                raise ValueError("quantize_fp8: needs bf16 x, got float32")
            if not x.is_contiguous():
                raise ValueError("x: must be contiguous (call .contiguous())")

    checked = getattr(comm, "check_calls", False)  # a Communicator made with check_calls (deepcomm.call_check)
    if checked:  # float32 rows travel as twice as many bf16 values: what the ranks must agree on
        wire = x.detach().view(torch.bfloat16) if as_float32 and x.dim() == 2 and x.is_contiguous() else x
        comm._agree_dispatch(wire, topk_idx, topk_weights, num_experts, x_scales=None, quantize_fp8=quantize_fp8,
                             power_of_two_scales=False, previous_event=previous_event, num_sms=None,
                             num_recv_tokens=None, handle=None, caller_checks=checks)
    else:
        checks()
    # The kernel backends' backward needs the routing (module docstring).
    route = None if _is_reference(impl) else _Route(topk_idx, topk_weights.detach(), num_experts)
    holder: dict = {}
    options = dict(num_experts=num_experts, quantize_fp8=quantize_fp8, previous_event=previous_event,
                   async_finish=async_finish)
    recv_x, recv_weights = _Dispatch.apply(impl, route, holder, options, x, topk_weights, topk_idx)
    result = holder["result"]
    result.x, result.topk_weights = recv_x, recv_weights
    if route is not None:
        _remember_route(result.handle, route)
    return comm._dispatched(result) if checked else result


# -- combine ------------------------------------------------------------------


def _check_float32_rows(impl, rows, handle) -> None:
    impl._check_handle(handle)
    if rows.dim() != 2 or rows.shape[0] != handle.num_recv_tokens:
        raise ValueError(f"expert_out: expected [{handle.num_recv_tokens}, hidden] (the dispatched rows), "
                         f"got {list(rows.shape)}")


def _combine_float32(impl, rows, handle, previous_event, async_finish) -> tuple[torch.Tensor, EventHandle]:
    """Combine of float32 rows on the reference backend: its reduction, kept in float32."""
    _check_float32_rows(impl, rows, handle)
    device = rows.device
    stream = impl.comm_stream(device)
    with CommStreamScope(stream, previous_event, (rows,)) as caller:
        y = impl.reduce_rows(rows.contiguous(), handle)
        return y, hand_back((y,), device, stream, caller, async_finish)


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, handle, route, holder: dict, options: dict, expert_out):
        rows = expert_out.detach()
        if rows.dtype == torch.float32:
            y, holder["event"] = _combine_float32(impl, rows, handle, options["previous_event"],
                                                  options["async_finish"])
        else:
            y, holder["event"] = impl.run_combine(rows, handle, options["previous_event"], options["async_finish"])
        ctx.impl, ctx.handle, ctx.route = impl, handle, route
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if _is_reference(ctx.impl):
            return None, None, None, None, None, ctx.impl.scatter_rows(grad_y.contiguous(), ctx.handle)
        rows = _dispatch_again(ctx.impl, ctx.route, grad_y.contiguous(), ctx.handle).x
        return None, None, None, None, None, rows.clone()  # the receive slot is reused by later dispatches


def combine_input(comm, handle) -> torch.Tensor:
    """:meth:`Communicator.combine_input` for a handle from :func:`dispatch`: outputs written there
    (``copy_``, recorded for autograd like any in-place copy) go to combine without a copy."""
    return _backend(comm).combine_input(handle)


def combine(
    comm,
    expert_out: torch.Tensor,
    handle,
    previous_event: EventHandle | None = None,
    async_finish: bool = False,
) -> tuple[torch.Tensor, EventHandle]:
    """:meth:`Communicator.combine_async` recorded for autograd: ``(y, event)``, gradient to ``expert_out``.

    ``expert_out`` is bf16 (float32 too on the reference backend, summed in
    float32). Without ``async_finish`` the caller's stream already waits for
    ``event``; with it, call ``event.wait()`` before using ``y``. On the
    kernel backends ``handle`` must come from :func:`dispatch`.
    """
    impl = _backend(comm)
    if not getattr(comm, "check_calls", False):  # a Communicator made with check_calls (deepcomm.call_check)
        _check_rows(comm, "expert_out", expert_out)
    else:
        def checks() -> None:  # the backend's own checks, which float32 rows on the reference path pass too
            _check_rows(comm, "expert_out", expert_out)
            if isinstance(expert_out, torch.Tensor) and expert_out.dtype == torch.float32:
                _check_float32_rows(impl, expert_out, handle)
            else:
                comm._check_combine_arguments(expert_out, handle)
            if not _is_reference(impl):
                _route_of(handle)

        comm._agree_combine(expert_out, handle, previous_event=previous_event, num_sms=None, checks=checks)
    route = None if _is_reference(impl) else _route_of(handle)  # before any rank starts communicating
    holder: dict = {}
    options = dict(previous_event=previous_event, async_finish=async_finish)
    y = _Combine.apply(impl, handle, route, holder, options, expert_out)
    return y, holder["event"]
