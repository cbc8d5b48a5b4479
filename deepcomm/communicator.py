"""The communicator: one per process group; validates, picks the path, runs it.

Backends:
- ``"intranode"``: the reserved-SM CUDA kernels among the ranks of one node
  (deepcomm.intranode); needs CUDA tensors, the extension and a BufferConfig.
- ``"internode"``: the hierarchical kernels across nodes (deepcomm.internode):
  one copy per (token, destination node) through the transport, NVLink
  forwarding inside the node; needs CUDA tensors, the extension, a BufferConfig.
- ``"reference"``: the pure-torch path (deepcomm.reference) over any
  torch.distributed backend; the oracle and the CPU path.
- ``"auto"``: ``"intranode"`` on one node of at most 8 ranks, ``"internode"``
  across nodes, when the kernels can run (a CUDA device, the extension, a
  BufferConfig); else ``"reference"``.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from deepcomm import _ext
from deepcomm.call_check import ENV_VAR, CallCheck, enabled_by_env, row_format, tensor_dim
from deepcomm.events import EventHandle
from deepcomm.internode import InternodeCommunicator
from deepcomm.intranode import BufferConfig, IntranodeCommunicator
from deepcomm.low_latency import LowLatencyConfig, LowLatencyHandle, LowLatencyKernels, LowLatencyResult
from deepcomm.reference import ReferenceCommunicator
from deepcomm.reference_low_latency import ReferenceLowLatency
from deepcomm.results import DispatchResult
from deepcomm.topology import Topology
from deepcomm.validation import check_int

BACKENDS = ("auto", "intranode", "internode", "reference")
# "*_staged": every inter-node byte through local staging and a put, the access pattern of a NIC (tests that
# path on one host); plain "nvshmem" stores straight into the peers NVSHMEM maps here (GPUs of this host).
TRANSPORTS = ("auto", "ipc", "ipc_staged", "nvshmem", "nvshmem_staged")
DEFAULT_NUM_SMS = 24  # of 132 on an H100/H200 (DESIGN.md decision 8)
DEFAULT_TIMEOUT_S = 30.0
MAX_TIMEOUT_S = 9.0e9  # the kernels' bounded waits take nanoseconds as int64


def _refusal(backend, x, topk_idx):
    """What a refused dispatch runs on ``backend`` so that its peers learn of it (the reference paths), or None."""
    refuse = getattr(backend, "refuse_dispatch", None)
    return None if refuse is None else (lambda: refuse(x, topk_idx))


def _row_fields(x, topk_idx, num_experts, quantize_fp8: bool) -> dict:
    """What every rank's rows of a dispatch must share (deepcomm.call_check)."""
    return {"hidden size": tensor_dim(x, 1), "row format": row_format(x, quantize_fp8), "K": tensor_dim(topk_idx, 1),
            "num_experts": num_experts if isinstance(num_experts, int) else None}


class Communicator:
    """Expert-parallel dispatch and combine among the ranks of ``group``.

    Args:
        group: the process group (default: the world).
        num_sms: blocks of each communication kernel (one per SM); per call with ``num_sms=``.
        ranks_per_node: ranks per node; default: ranks sharing a host. Set it
            lower to run the inter-node path inside one host (docs/design.md).
        backend: one of ``BACKENDS``.
        buffer: sizes of the kernels' buffers (required by ``"intranode"``).
        timeout_s: how long a kernel waits for a silent peer before it reports
            the rank and stage (raised as CommunicationError).
        transport: the inter-node leg of ``"internode"``: ``"nvshmem"``, or
            CUDA IPC (``"ipc"``) when every rank shares one host; ``"auto"``
            picks ``"ipc"`` on one host and ``"nvshmem"`` across hosts.
        low_latency: sizes of the low-latency mode's buffers (decode); without
            it the ``low_latency_*`` methods raise. The kernels run whenever the
            backend is not ``"reference"`` and CUDA and the extension are there;
            they need every rank on one host (else ValueError naming
            ``low_latency``). Otherwise the reference path implements it.
        check_calls: before each dispatch and combine, validate the arguments on the host and check
            with the other ranks that they make the same call with the same hidden size, K, row
            format, ``num_experts``, ``num_sms`` and handles, raising ``CommunicationError`` on every
            rank at once where not (deepcomm.call_check; a host round trip per call: for
            debugging). Default: the ``DEEPCOMM_CHECK_CALLS`` environment variable.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        num_sms: int = DEFAULT_NUM_SMS,
        ranks_per_node: int | None = None,
        backend: str = "auto",
        buffer: BufferConfig | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: str = "auto",
        low_latency: LowLatencyConfig | None = None,
        check_calls: bool | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        check_int("num_sms", num_sms)
        if buffer is not None and not isinstance(buffer, BufferConfig):
            raise TypeError(f"buffer: expected a deepcomm.BufferConfig, got {type(buffer).__name__}")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
            raise TypeError(f"timeout_s: expected a number of seconds, got {type(timeout_s).__name__}")
        if not 0 < timeout_s <= MAX_TIMEOUT_S:  # also refuses nan and inf (the kernels take nanoseconds as int64)
            raise ValueError(f"timeout_s: expected a number of seconds in (0, {MAX_TIMEOUT_S:g}], got {timeout_s!r}")
        if ranks_per_node is not None and (isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, int)):
            raise TypeError(f"ranks_per_node: expected an int or None, got {type(ranks_per_node).__name__}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport: expected one of {TRANSPORTS}, got {transport!r}")
        if check_calls is None:
            check_calls = enabled_by_env()
        if not isinstance(check_calls, bool):
            raise TypeError(f"check_calls: expected a bool or None, got {type(check_calls).__name__}")
        self.num_sms = num_sms
        self._closed = False
        self._reference = ReferenceCommunicator(group, ranks_per_node)
        topology = self._reference.topology
        # Before any buffer is mapped: a rank checking its calls runs a collective the others would not.
        every: list = [None] * topology.world_size
        dist.all_gather_object(every, check_calls, group=group)
        if len(set(every)) > 1:
            listed = ", ".join(f"rank {r}: {value}" for r, value in enumerate(every))
            raise ValueError(f"check_calls: the ranks differ ({listed}); pass the same on every rank (or set "
                             f"{ENV_VAR} on every rank)")
        # The exchange runs on the communicator's group: a rank that never makes the call is waited for as long
        # as the group's timeout (init_process_group(timeout=...)), as the reference path's collectives are.
        self._call_check = CallCheck(group, topology.rank, topology.world_size, self._reference._stage) \
            if check_calls else None
        self.backend = self._choose(backend, topology, buffer)
        if self.backend == "intranode":
            self._impl = IntranodeCommunicator(group, topology, buffer, num_sms, timeout_s)
        elif self.backend == "internode":
            if transport == "auto":
                transport = "ipc" if self._reference.topology.single_host else "nvshmem"
            self._impl = InternodeCommunicator(group, topology, buffer, num_sms, timeout_s,
                                               transport.removesuffix("_staged"), transport.endswith("_staged"))
        else:
            self._impl = self._reference
        self._low_latency = None
        if low_latency is not None:
            self._low_latency = self._make_low_latency(group, backend, low_latency, num_sms, timeout_s)

    def _make_low_latency(self, group, backend, config, num_sms, timeout_s):
        if not isinstance(config, LowLatencyConfig):
            raise TypeError(f"low_latency: expected a deepcomm.LowLatencyConfig, got {type(config).__name__}")
        if backend == "reference" or not torch.cuda.is_available() or not _ext.available():
            return ReferenceLowLatency(self._reference, config)
        if not self._reference.topology.single_host:
            raise ValueError("low_latency: the low-latency kernels reach every rank by CUDA IPC and need them on one "
                             "host (an NVSHMEM transport for them is not built); use backend='reference'")
        return LowLatencyKernels(group, self._reference.topology, config, num_sms, timeout_s)

    @staticmethod
    def _choose(backend: str, topology: Topology, buffer: BufferConfig | None) -> str:
        if backend in ("intranode", "internode") and buffer is None:
            raise ValueError(f"buffer: the {backend} backend needs a BufferConfig")
        if backend != "auto":
            return backend
        if buffer is None or not torch.cuda.is_available() or not _ext.available():
            return "reference"
        core = _ext.extension()
        if not topology.is_multi_node:
            return "intranode" if topology.world_size <= core.intranode.MAX_RANKS else "reference"
        fits = (topology.ranks_per_node <= core.internode.MAX_LOCAL_RANKS
                and topology.num_nodes <= core.internode.MAX_NODES)
        return "internode" if fits else "reference"

    @property
    def topology(self) -> Topology:
        return self._impl.topology

    def _check_call(self, num_sms=None, previous_event=None, num_recv_tokens=None) -> None:
        """The per-call arguments every backend takes, checked before any backend counts the call."""
        if self._closed:
            raise RuntimeError("communicator: closed (close() was called); make a new one")
        if num_sms is not None:
            check_int("num_sms", num_sms)
        if previous_event is not None and not isinstance(previous_event, EventHandle):
            raise TypeError(f"previous_event: expected a deepcomm EventHandle (a result's .event) or None, "
                            f"got {type(previous_event).__name__}")
        if num_recv_tokens is not None:
            check_int("num_recv_tokens", num_recv_tokens, 0)

    @staticmethod
    def _warn_if_differentiable(method: str, **tensors) -> None:
        """A tensor that wants a gradient loses it here silently otherwise: these calls are not differentiable."""
        if not torch.is_grad_enabled():
            return
        for name, tensor in tensors.items():
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                warnings.warn(f"{name}: requires grad, but Communicator.{method} is not differentiable (no gradient "
                              f"flows back through it); train through deepcomm.autograd.dispatch / combine",
                              stacklevel=3)

    @property
    def reference(self) -> ReferenceCommunicator:
        """The pure-torch path on the same group: the oracle and baseline."""
        return self._reference

    @property
    def rank(self) -> int:
        return self.topology.rank

    def close(self) -> None:
        """Wait for this rank's communication, then unmap the peers' buffers, all ranks together.

        Collective (a barrier before and after): no rank unmaps, or exits and frees, a buffer
        that a peer's kernels may still touch. Afterwards every call raises RuntimeError; a second close()
        does nothing (a rank repeating the barriers alone would wait for peers that do not come).
        """
        if self._closed:
            return
        self._closed = True
        if self._impl is self._reference:  # autograd and the MoE layer call the backend directly
            self._reference.closed = True
        mapped = [impl for impl in (self._impl, self._low_latency) if hasattr(impl, "close")]
        if not mapped:  # the reference path maps nothing
            return
        for impl in mapped:
            torch.cuda.synchronize(impl.device)
        dist.barrier(group=self._reference.group)
        for impl in mapped:
            impl.close()
        dist.barrier(group=self._reference.group)

    @property
    def world_size(self) -> int:
        return self.topology.world_size

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
        num_sms: int | None = None,
        num_recv_tokens: int | None = None,
        handle: object | None = None,
    ) -> DispatchResult:
        """Send each token once to each rank holding one of its experts (docs/api.md).

        The caller's stream waits for the result (the host does not, except for
        the one small wait that sizes the output). ``num_recv_tokens``: rows this
        rank will receive, when the caller knows it; the intranode backend then
        skips the wait, checks the number on the GPU, and reports a wrong one
        at the next call (``num_recv_tokens_per_rank`` is then None).
        ``handle``: the handle of an earlier dispatch from this same ``topk_idx``
        tensor; the intranode backend then reuses its routing (no layout, no count
        exchange, no host wait). Collective: every rank passes one, or none does.
        """
        self._warn_if_differentiable("dispatch", x=x, topk_weights=topk_weights)
        return self._dispatch(x, topk_idx, topk_weights, num_experts, x_scales, quantize_fp8,
                              power_of_two_scales, previous_event, False, num_sms, num_recv_tokens, handle)

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
        num_sms: int | None = None,
        num_recv_tokens: int | None = None,
        handle: object | None = None,
    ) -> DispatchResult:
        """:meth:`dispatch` on the communication stream; wait on ``result.event`` before use."""
        self._warn_if_differentiable("dispatch_async", x=x, topk_weights=topk_weights)
        return self._dispatch(x, topk_idx, topk_weights, num_experts, x_scales, quantize_fp8,
                              power_of_two_scales, previous_event, True, num_sms, num_recv_tokens, handle)

    def _dispatch(self, x, topk_idx, topk_weights, num_experts, x_scales, quantize_fp8, power_of_two_scales,
                  previous_event, async_finish, num_sms, num_recv_tokens, handle) -> DispatchResult:
        self._agree_dispatch(x, topk_idx, topk_weights, num_experts, x_scales, quantize_fp8, power_of_two_scales,
                             previous_event, num_sms, num_recv_tokens, handle)
        return self._dispatched(self._impl.run_dispatch(x, topk_idx, topk_weights, num_experts, x_scales, quantize_fp8,
                                                        power_of_two_scales, previous_event, async_finish, num_sms,
                                                        num_recv_tokens, handle))

    def combine(self, expert_out: torch.Tensor, handle: object, num_sms: int | None = None) -> torch.Tensor:
        """``[R, H]`` bf16 rows back to their tokens, reduced in a fixed order: ``[T, H]`` bf16."""
        self._warn_if_differentiable("combine", expert_out=expert_out)
        self._agree_combine(expert_out, handle, None, num_sms)
        y, _ = self._impl.run_combine(expert_out, handle, None, False, num_sms)
        return y

    def combine_async(
        self,
        expert_out: torch.Tensor,
        handle: object,
        previous_event: EventHandle | None = None,
        num_sms: int | None = None,
    ) -> tuple[torch.Tensor, EventHandle]:
        """:meth:`combine` on the communication stream; returns ``(y, event)``."""
        self._warn_if_differentiable("combine_async", expert_out=expert_out)
        self._agree_combine(expert_out, handle, previous_event, num_sms)
        return self._impl.run_combine(expert_out, handle, previous_event, True, num_sms)

    def combine_input(self, handle: object) -> torch.Tensor:
        """``[R, H]`` bf16 for the expert outputs of the dispatch that made ``handle``.

        Write the outputs here (``copy_``, ``out=``) and pass the tensor to combine: the
        kernel backends then read the rows where they are instead of first copying them
        into registered memory (one read and one write of every row saved). It is the
        dispatch's receive slot: writing it overwrites the whole result (fp8 scales and
        routing included), so write once all of it has been read, before ``num_recv_slots``
        further dispatches (else :class:`SlotReusedError`), and use it only as combine's
        input. Any other bf16 tensor works too, copied in.
        """
        self._check_call()
        return self._impl.combine_input(handle)

    # -- low-latency mode (decode) ------------------------------------------

    def _low_latency_impl(self):
        if self._low_latency is None:
            raise ValueError("low_latency: this communicator has no low-latency buffers; pass "
                             "Communicator(..., low_latency=deepcomm.LowLatencyConfig(...))")
        return self._low_latency

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_experts: int,
        x_scales: torch.Tensor | None = None,
        quantize_fp8: bool = False,
        power_of_two_scales: bool = False,
        previous_event: EventHandle | None = None,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        num_sms: int | None = None,
        topk_weights: torch.Tensor | None = None,
    ) -> LowLatencyResult:
        """Send each token to each expert it names, into fixed-capacity slots; no host wait (docs/api.md).

        Returns ``x`` ``[E/world, world * max_tokens_per_rank, H]`` (expert e's rows are
        ``x[e, :num_tokens_per_expert[e]]``, by source rank then token), the counts on the
        device, and a handle. ``async_finish``: the caller waits on ``result.event``.
        ``return_recv_hook``: only send now; ``result.hook()`` queues the receive (no SM
        waits in between) and makes the current stream wait for it. ``topk_weights``
        (float32 ``[T, K]``): sent with the rows, so that the combine sums at the owners
        (its ``topk_weights`` is then None); every rank gives them or none does.
        """
        self._agree_low_latency_dispatch(x, topk_idx, num_experts, x_scales, quantize_fp8, power_of_two_scales,
                                         previous_event, num_sms, topk_weights)
        impl = self._low_latency_impl()
        return self._dispatched(impl.dispatch(x, topk_idx, num_experts, x_scales, quantize_fp8, power_of_two_scales,
                                              previous_event, async_finish, return_recv_hook, num_sms, topk_weights))

    def low_latency_combine(
        self,
        expert_out: torch.Tensor,
        topk_weights: torch.Tensor | None,
        handle: LowLatencyHandle,
        num_sms: int | None = None,
    ) -> torch.Tensor:
        """``[T, H]`` bf16: per token, the sum over k of ``topk_weights[t, k]`` times its expert's
        output row (``expert_out`` in the dispatch's layout), in float32, k ascending. When the
        dispatch carried the weights, ``topk_weights`` is None and each owner rank sums its terms
        (k ascending, rounded to bf16) before the token's rank adds them in rank order."""
        self._agree_low_latency_combine(expert_out, topk_weights, handle, None, num_sms)
        impl = self._low_latency_impl()
        y, _, _ = impl.combine(expert_out, topk_weights, handle, None, False, False, num_sms)
        return y

    def low_latency_combine_async(
        self,
        expert_out: torch.Tensor,
        topk_weights: torch.Tensor | None,
        handle: LowLatencyHandle,
        previous_event: EventHandle | None = None,
        return_recv_hook: bool = False,
        num_sms: int | None = None,
    ) -> tuple[torch.Tensor, EventHandle, object]:
        """:meth:`low_latency_combine` on the communication stream: ``(y, event, hook)``. Without a
        hook, wait on ``event``; with ``return_recv_hook``, ``hook()`` queues the pull and reduction
        (until then no SM waits for the peers) and makes the current stream wait for it."""
        self._agree_low_latency_combine(expert_out, topk_weights, handle, previous_event, num_sms)
        impl = self._low_latency_impl()
        return impl.combine(expert_out, topk_weights, handle, previous_event, True, return_recv_hook, num_sms)

    def low_latency_combine_input(self, handle: LowLatencyHandle) -> torch.Tensor:
        """``[E/world, world * max_tokens_per_rank, H]`` bf16 for the expert outputs of ``handle``'s
        dispatch: on the kernels, its receive area, which combine reads in place (when combine pulls,
        any other tensor is copied in first). Writing it overwrites the dispatched rows."""
        self._check_call()
        return self._low_latency_impl().combine_input(handle)

    # -- the opt-in agreement check of each call (check_calls, deepcomm.call_check) --------

    @property
    def check_calls(self) -> bool:
        """Whether each dispatch and combine is checked against the other ranks' first."""
        return self._call_check is not None

    def _sms(self, num_sms: int | None) -> int:
        return self.num_sms if num_sms is None else num_sms

    def _dispatched(self, result):
        """``result`` (a dispatch's), its handle numbered for the combines that name it."""
        if self._call_check is not None:
            self._call_check.dispatched(result.handle)
        return result

    def _agree(self, method: str, fields: dict, validate, refuse=None) -> None:
        """Run ``validate(check_values)`` (this rank's checks; True: expert ids read on the host too) and, with
        check_calls, agree with the other ranks on ``fields`` first (deepcomm.call_check). Without it, a refused
        call runs ``refuse()`` first: the reference path's peers then raise at once instead of waiting out the
        group's timeout in the exchange this rank skips (the kernels' peers give up after ``timeout_s``)."""
        if self._call_check is None:
            try:
                validate(False)
            except (TypeError, ValueError):
                if refuse is not None:
                    refuse()
                raise
        else:
            self._call_check.agree(method, fields, validate)

    def _agree_dispatch(self, x, topk_idx, topk_weights, num_experts, x_scales, quantize_fp8, power_of_two_scales,
                        previous_event, num_sms, num_recv_tokens, handle, caller_checks=None) -> None:
        """The per-call checks of a dispatch; with check_calls, also the backend's own (its check_dispatch) and
        agreement with the other ranks. ``caller_checks``: deepcomm.autograd's own, run first."""
        def validate(check_values: bool) -> None:
            self._check_call(num_sms, previous_event, num_recv_tokens)
            if self._call_check is None:
                return
            if caller_checks is not None:
                caller_checks()
            # Ids made on another stream (previous_event) may not be written yet: the kernels check those on the GPU.
            self._impl.check_dispatch(x, topk_idx, topk_weights, num_experts, x_scales, quantize_fp8,
                                      power_of_two_scales, num_sms, num_recv_tokens, handle,
                                      check_values=check_values and previous_event is None)

        self._agree("dispatch", self._call_check and {
            **_row_fields(x, topk_idx, num_experts, quantize_fp8), "num_sms": self._sms(num_sms),
            "reused handle of dispatch number": None if handle is None else self._call_check.dispatch_of(handle),
        }, validate, _refusal(self._impl, x, topk_idx))

    def _check_combine_arguments(self, expert_out, handle, num_sms=None) -> None:
        """The backend's own combine checks, run on the host ahead of the call."""
        self._impl.check_combine(expert_out, handle, num_sms)

    def _agree_combine(self, expert_out, handle, previous_event, num_sms, checks=None) -> None:
        """The per-call checks of a combine; with check_calls, also :meth:`_check_combine_arguments` (or the
        caller's ``checks`` in its place: deepcomm.autograd's, which take float32 rows on the reference path)
        and agreement with the other ranks."""
        def validate(check_values: bool) -> None:
            self._check_call(num_sms, previous_event)
            if self._call_check is not None:
                (checks or (lambda: self._check_combine_arguments(expert_out, handle, num_sms)))()

        self._agree("combine", self._call_check and {
            "hidden size": tensor_dim(expert_out, 1), "num_sms": self._sms(num_sms),
            "handle of dispatch number": self._call_check.dispatch_of(handle),
        }, validate)

    def _low_latency_checks(self, num_sms, previous_event):
        """What every low-latency call checks first; with check_calls, the low-latency backend whose own checks
        run next (None without check_calls)."""
        self._check_call(num_sms, previous_event)
        impl = self._low_latency_impl()
        return None if self._call_check is None else impl

    def _agree_low_latency_dispatch(self, x, topk_idx, num_experts, x_scales, quantize_fp8, power_of_two_scales,
                                    previous_event, num_sms, topk_weights) -> None:
        def validate(check_values: bool) -> None:
            impl = self._low_latency_checks(num_sms, previous_event)
            if impl is not None:
                impl.check_dispatch(x, topk_idx, num_experts, x_scales, quantize_fp8, power_of_two_scales, num_sms,
                                    topk_weights, check_values and previous_event is None)

        self._agree("low_latency_dispatch", self._call_check and {
            **_row_fields(x, topk_idx, num_experts, quantize_fp8), "num_sms": self._sms(num_sms),
            "weights at dispatch": topk_weights is not None,
        }, validate, _refusal(self._low_latency, x, topk_idx))

    def _agree_low_latency_combine(self, expert_out, topk_weights, handle, previous_event, num_sms) -> None:
        def validate(check_values: bool) -> None:
            impl = self._low_latency_checks(num_sms, previous_event)
            if impl is not None:
                impl.check_combine(expert_out, topk_weights, handle, num_sms)

        self._agree("low_latency_combine", self._call_check and {
            "hidden size": tensor_dim(expert_out, -1), "weights at dispatch": topk_weights is None,
            "num_sms": self._sms(num_sms), "handle of dispatch number": self._call_check.dispatch_of(handle),
        }, validate)

    def traffic(self) -> dict[str, int]:
        """Bytes this rank's kernels moved so far on each leg (internode backend; waits for them).

        ``dispatch_boundary``: rows across the node boundary, one per (token,
        destination node); ``dispatch_nvlink_direct`` / ``dispatch_nvlink_forward``:
        rows written into receive slots by their sender / by the forwarder;
        ``combine_boundary``: partial sums back across the boundary;
        ``combine_nvlink``: expert-output rows read over NVLink.
        """
        if not hasattr(self._impl, "traffic"):
            raise ValueError(f"backend: byte counters come from the internode kernels, not {self.backend!r}")
        self._check_call()
        return self._impl.traffic()

    def check_errors(self) -> None:
        """Raise a CommunicationError that a kernel reported since the last call, if any."""
        for impl in (self._impl, self._low_latency):
            check = getattr(impl, "check_errors", None)
            if check is not None:
                check()
