"""Two-micro-batch overlap: while one micro-batch communicates, the other computes.

A model is a flat list of :class:`Stage` s, each ``compute`` or ``comm``
(a communication point: dispatch, combine). The scheduler splits a batch into
micro-batches and issues their stages in an interleaved order in which micro-batch
``m`` trails ``m - 1`` by one stage, compute first on a tie::

    attention A, attention B, dispatch A, experts A, dispatch B, experts B, combine A, shared A,
    combine B, finish A, shared B, finish B, ...

so on the GPU each communication runs on the communication stream (reserved
SMs) while the other micro-batch's attention or experts run on the compute
stream: dispatch A under attention B, dispatch B under experts A, combine A under
experts B, combine B under both shared-expert stages (which need no
communication, hence placed after combine) and the next layer's attention A. Order
between the streams comes from events only: each compute stage leaves an event
(``READY``) after which its micro-batch's next comm stage starts, and each comm
stage leaves one (``PENDING``) that the micro-batch's next compute stage that
``waits_for_comm`` waits for. The host never waits in the steady state, except
for the one small wait in dispatch that sizes its output, which this order
places where the GPU still has the other micro-batch's compute queued.

Compute kernels must leave the communication kernels their SMs: a persistent
GEMM holds one block on every SM until it ends, so a dispatch queued behind it
would start only then. ``compute_sms`` caps cuBLASLt matmuls and torch's grouped
GEMM at that many SMs while the scheduler runs (:func:`compute_sm_limit`).

Training: each stage runs on detached copies of the tensors it may read, so
the backward pass can be issued stage by stage in the same interleaved order
(reversed) instead of autograd's own order — the comm stages' backward (combine
for dispatch, dispatch for combine) then sits between compute stages of the other
micro-batch too, and every rank issues its collectives in the same order.

Every stage runs inside a ``L{layer}/mb{m}/{stage}`` range (torch profiler and
NVTX) for tools/overlap_report.py.
"""

from __future__ import annotations

import dataclasses
import functools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from deepcomm.events import EventHandle
from deepcomm.profiling import stage_name, stage_range
from deepcomm.validation import check_int

COMPUTE, COMM = "compute", "comm"
PENDING = "pending_event"  # state key: the event a comm stage left for its micro-batch's next compute
# State key: the compute stream's position right after the micro-batch's last compute stage. A comm stage
# starts after it, not after everything queued on the compute stream (which by then holds the other
# micro-batch's compute too: waiting for that would serialise the two).
READY = "ready_event"


@dataclass(frozen=True)
class Stage:
    """One step of one layer for one micro-batch: ``run(state)`` reads and writes the micro-batch's state dict.

    ``waits_for_comm`` (compute stages): whether the stage reads what the micro-batch's
    previous communication produced. A stage that does not can run while it is in flight.
    """

    layer: int
    name: str
    kind: str
    run: Callable[[dict], None]
    waits_for_comm: bool = True

    def __post_init__(self) -> None:
        check_int("layer", self.layer, 0)
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name: expected a non-empty str, got {self.name!r}")
        if not callable(self.run):
            raise TypeError(f"run: expected a callable taking the micro-batch's state dict, got {self.run!r}")
        if self.kind not in (COMPUTE, COMM):
            raise ValueError(f"kind: expected {COMPUTE!r} or {COMM!r}, got {self.kind!r}")
        if self.kind == COMM and not self.waits_for_comm:
            raise ValueError("waits_for_comm: only compute stages may run beside their micro-batch's communication")


def interleaved_order(kinds: list[str], num_micro_batches: int = 2) -> list[tuple[int, int]]:
    """Issue order ``[(micro_batch, stage_index)]``: micro-batch m trails m - 1 by one stage;
    on the same step compute stages go first, then lower micro-batches."""
    check_int("num_micro_batches", num_micro_batches)
    keys = [(s + m, 0 if kind == COMPUTE else 1, m, s)
            for m in range(num_micro_batches) for s, kind in enumerate(kinds)]
    return [(m, s) for _, _, m, s in sorted(keys)]


def split_sizes(batch: int, num_micro_batches: int = 2) -> list[int]:
    """As even as possible, larger first; some are 0 when the batch is smaller than the count."""
    check_int("batch", batch, 0)
    check_int("num_micro_batches", num_micro_batches)
    base, extra = divmod(batch, num_micro_batches)
    return [base + (1 if m < extra else 0) for m in range(num_micro_batches)]


def _grad_tensor(value) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad


@dataclass
class _StageRecord:
    """What the backward of one executed stage needs: its input leaves (with the tensors they
    were cut from) and the tensors it left in the state."""

    stage: int
    inputs: list[tuple[torch.Tensor, torch.Tensor]]
    outputs: list[torch.Tensor]


class OverlapScheduler:
    """Runs ``stages`` over micro-batches in :func:`interleaved_order`.

    ``forward(states, output=key)`` runs every stage of every micro-batch and
    returns ``states[m][key]`` per micro-batch. With autograd enabled those
    outputs are leaves: compute a loss from them, call ``loss.backward()``, then
    :meth:`backward` carries their gradients back through the stages (and into
    the inputs the states started with).

    ``compute_sms``: SMs that matmuls may use while the scheduler runs (None: all);
    see :func:`compute_sm_limit`.
    """

    def __init__(self, stages: list[Stage], num_micro_batches: int = 2, compute_sms: int | None = None) -> None:
        if not stages:
            raise ValueError("stages: expected at least one stage")
        if not all(isinstance(stage, Stage) for stage in stages):
            raise TypeError("stages: expected deepcomm.overlap.Stage items")
        check_int("num_micro_batches", num_micro_batches)
        if compute_sms is not None:  # the upper bound (the device's SMs) is checked where a device is known
            check_int("compute_sms", compute_sms)
        self.stages = list(stages)
        self.num_micro_batches = num_micro_batches
        self.compute_sms = compute_sms
        self.order = interleaved_order([s.kind for s in self.stages], num_micro_batches)
        self._records: list[list[_StageRecord]] | None = None
        self._outputs: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(self, states: list[dict], output: str) -> list[torch.Tensor]:
        if len(states) != self.num_micro_batches:
            raise ValueError(f"states: expected {self.num_micro_batches} micro-batch states, got {len(states)}")
        training = torch.is_grad_enabled()
        records: list[list[_StageRecord]] = [[] for _ in states]
        with compute_sm_limit(self.compute_sms):
            for m, s in self.order:
                stage, state = self.stages[s], states[m]
                with stage_range(stage_name(stage.layer, m, stage.name)):
                    if stage.kind == COMPUTE and stage.waits_for_comm:
                        _wait_pending(state)
                    inputs = _cut(state) if training else []
                    stage.run(state)
                    if stage.kind == COMPUTE:
                        state[READY] = _compute_point(state)
                    if training:
                        records[m].append(_StageRecord(s, inputs, [v for v in state.values() if _grad_tensor(v)]))
        outputs = []
        for m, state in enumerate(states):
            _wait_pending(state)
            state.pop(READY, None)
            if output not in state:
                raise ValueError(f"output: micro-batch {m}'s state has no {output!r} after the last stage "
                                 f"(it holds {sorted(state)})")
            outputs.append(state[output])
        if not training:
            return outputs
        self._records = records
        self._outputs = [(out.detach().requires_grad_(), out) for out in outputs]
        return [leaf for leaf, _ in self._outputs]

    def backward(self) -> None:
        """Stage-wise backward from the gradients the returned outputs received."""
        if self._records is None or self._outputs is None:
            raise RuntimeError("backward: call forward with autograd enabled first")
        grads: list[dict[int, torch.Tensor]] = [{} for _ in self._records]
        for m, (leaf, out) in enumerate(self._outputs):
            if leaf.grad is not None:
                grads[m][id(out)] = leaf.grad
        position = [len(r) for r in self._records]
        reversed_kinds = [s.kind for s in reversed(self.stages)]
        # On the calling thread: autograd otherwise hands CUDA work to a worker thread of its own, whose
        # kernels then fall outside the stage's range in the profiler (which attributes by launching thread).
        records, self._records, self._outputs = self._records, None, None  # one backward per forward, failed or not
        with compute_sm_limit(self.compute_sms), torch.autograd.set_multithreading_enabled(False):
            for m, _ in interleaved_order(reversed_kinds, self.num_micro_batches):
                position[m] -= 1
                record = records[m][position[m]]
                stage = self.stages[record.stage]
                with stage_range(stage_name(stage.layer, m, stage.name, backward=True)):
                    _stage_backward(record, grads[m])
        _leftover_to_inputs(grads, records)


@contextmanager
def compute_sm_limit(num_sms: int | None):
    """Inside, cuBLASLt matmuls and torch's grouped GEMM target at most ``num_sms`` SMs.

    Through torch's SM carve-out (relative to the SM count the device reports, which
    under CUDA MPS is the client's share) and with cuBLASLt as torch's BLAS backend
    (the carve-out reaches matmuls only through it). Persistent GEMMs launch a block
    per SM they target and hold it to the end: with the cap, communication kernels
    queued beside them find free SMs at once. None: no cap (nothing changes). No-op
    without CUDA. Other SM counts and cuBLASLt may pick other GEMM algorithms: results
    agree with uncapped ones to rounding, not bit for bit.
    """
    if num_sms is None or not torch.cuda.is_available():
        yield
        return
    reported = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    if isinstance(num_sms, bool) or not isinstance(num_sms, int) or not 1 <= num_sms <= reported:
        raise ValueError(f"compute_sms: expected an int in [1, {reported}] (the device's SMs), got {num_sms!r}")
    carveout, backend = torch._C._get_sm_carveout_experimental(), torch.backends.cuda.preferred_blas_library()
    torch._C._set_sm_carveout_experimental(reported - num_sms)
    torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(carveout)
        torch.backends.cuda.preferred_blas_library(backend)


def _compute_point(state: dict) -> EventHandle | None:
    """The compute stream's position after the stage, on the device of the micro-batch's tensors (not
    necessarily the current one), for its next comm stage to start after."""
    device = next((v.device for v in state.values() if isinstance(v, torch.Tensor) and v.is_cuda), None)
    if device is None and torch.cuda.is_available() and torch.cuda.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device())
    return None if device is None else EventHandle.record(device)


def _wait_pending(state: dict) -> None:
    event = state.pop(PENDING, None)
    if event is not None:
        event.wait()


def _cut(state: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Replace every tensor that carries gradients with a fresh leaf; return (leaf, original) pairs."""
    pairs = []
    for key, value in list(state.items()):
        if _grad_tensor(value):
            leaf = value.detach().requires_grad_()
            state[key] = leaf
            pairs.append((leaf, value))
    return pairs


def _stage_backward(record: _StageRecord, grads: dict[int, torch.Tensor]) -> None:
    # Every output made inside the stage gets a gradient (zeros when nothing downstream used it)
    # so that comm stages run their collectives on every rank, whatever the data.
    made = [t for t in record.outputs if t.grad_fn is not None]
    if made:
        torch.autograd.backward(made, [grads.pop(id(t), None) if id(t) in grads else torch.zeros_like(t)
                                       for t in made])
    for leaf, original in record.inputs:
        passed_through = grads.pop(id(leaf), None)
        total = leaf.grad if passed_through is None else (
            passed_through if leaf.grad is None else leaf.grad + passed_through)
        if total is not None:
            grads[id(original)] = grads[id(original)] + total if id(original) in grads else total


def _leftover_to_inputs(grads: list[dict[int, torch.Tensor]], records: list[list[_StageRecord]]) -> None:
    """Gradients left after every stage's backward belong to tensors that entered the state from outside:
    the ones the micro-batch started with, and any a stage put there (a parameter, an extra input). One
    backward call for every micro-batch: their inputs may share a graph upstream (cut from one tensor that an
    embedding or an earlier layer made), which a call per micro-batch would traverse, and free, once each."""
    originals, upstream = [], []
    for state_grads, micro_batch_records in zip(grads, records):
        for record in micro_batch_records:
            for _, original in record.inputs:
                grad = state_grads.pop(id(original), None)
                if grad is not None:
                    originals.append(original)
                    upstream.append(grad)
    if originals:
        torch.autograd.backward(originals, upstream)


# ------------------------------------------------------------- the MoE block as stages


def block_stages(block, layer: int) -> list[Stage]:
    """A :class:`deepcomm.moe.TransformerBlock` as six stages over a micro-batch state holding ``x``.

    attention (compute): attention, the MoE input norm and routing; dispatch (comm);
    experts (compute); combine (comm); shared (compute, the shared experts: they need
    no communication, so they run while combine is in flight); finish (compute): the
    residual sum.
    """
    moe = block.moe

    def attention(state: dict) -> None:
        h = block.attend(state.pop("x"))
        moe_in = block.moe_input(h)
        state["topk_idx"], state["topk_weights"] = moe.route(moe_in)
        state.update(h=h, moe_in=moe_in)

    def dispatch(state: dict) -> None:
        received = moe.dispatch(state["moe_in"], state.pop("topk_idx"), state.pop("topk_weights"),
                                previous_event=state.pop(READY, None), async_finish=True)
        state.update(received=received, recv_x=received.x, recv_weights=received.topk_weights)
        state[PENDING] = received.event

    def experts(state: dict) -> None:
        received = dataclasses.replace(state["received"], x=state.pop("recv_x"),
                                       topk_weights=state.pop("recv_weights"))
        state["expert_out"] = moe.experts(received)

    def combine(state: dict) -> None:
        routed, event = moe.combine(state.pop("expert_out"), state.pop("received").handle,
                                    previous_event=state.pop(READY, None), async_finish=True)
        state["routed"], state[PENDING] = routed, event

    def shared(state: dict) -> None:
        state["shared"] = moe.shared(state.pop("moe_in"))

    def finish(state: dict) -> None:
        state["x"] = block.finish(state.pop("h"), state.pop("routed"), state.pop("shared"))

    return [Stage(layer, "attention", COMPUTE, attention), Stage(layer, "dispatch", COMM, dispatch),
            Stage(layer, "experts", COMPUTE, experts), Stage(layer, "combine", COMM, combine),
            Stage(layer, "shared", COMPUTE, shared, waits_for_comm=False), Stage(layer, "finish", COMPUTE, finish)]


class _ReceiveHook:
    """A low-latency call's receive hook where the scheduler expects an event: waiting queues the receive
    (on the communication stream, now) and makes the current stream wait for it."""

    __slots__ = ("hook",)

    def __init__(self, hook: Callable[[], EventHandle]) -> None:
        self.hook = hook

    def wait(self) -> None:
        self.hook()  # on either path the hook makes the current stream wait for the receive


def decode_block_stages(block, layer: int, recv_hooks: bool = True) -> list[Stage]:
    """:func:`block_stages` for inference through the low-latency mode (:meth:`TransformerBlock.decode`).

    The same six stages; dispatch and combine are the low-latency calls, the weights sent with the
    rows (the owners sum). ``recv_hooks``: each call only sends when its stage runs; its receive is
    queued by the micro-batch's next stage that reads the result, so between the two no SM waits for
    the peers while the other micro-batch computes. Without them each call's kernel sends, waits and
    receives on the communication stream in one launch.
    """
    moe = block.moe
    stages = block_stages(block, layer)

    def pending(event, hook):
        return _ReceiveHook(hook) if recv_hooks else event

    def dispatch(state: dict) -> None:
        received = moe.decode_dispatch(state["moe_in"], state.pop("topk_idx"), state.pop("topk_weights"),
                                       previous_event=state.pop(READY, None), async_finish=True,
                                       return_recv_hook=recv_hooks)
        state["received"], state[PENDING] = received, pending(received.event, received.hook)

    def experts(state: dict) -> None:
        state["expert_out"] = moe.decode_experts(state["received"])

    def combine(state: dict) -> None:
        routed, event, hook = moe.decode_combine(state.pop("expert_out"), state.pop("received").handle,
                                                 previous_event=state.pop(READY, None), async_finish=True,
                                                 return_recv_hook=recv_hooks)
        state["routed"], state[PENDING] = routed, pending(event, hook)

    replaced = {"dispatch": dispatch, "experts": experts, "combine": combine}
    return [dataclasses.replace(stage, run=replaced.get(stage.name, stage.run)) for stage in stages]


def model_stages(blocks, low_latency: bool = False, recv_hooks: bool = True) -> list[Stage]:
    """Blocks stacked into one stage list: micro-batch B's finish of layer l overlaps A's next layer.
    ``low_latency``: :func:`decode_block_stages` (with ``recv_hooks``) instead of :func:`block_stages`."""
    stages_of = functools.partial(decode_block_stages, recv_hooks=recv_hooks) if low_latency else block_stages
    return [stage for layer, block in enumerate(blocks) for stage in stages_of(block, layer)]


def run_overlapped(blocks, x: torch.Tensor, num_micro_batches: int = 2, sizes: list[int] | None = None,
                   compute_sms: int | None = None, low_latency: bool = False,
                   recv_hooks: bool = True) -> tuple[torch.Tensor, OverlapScheduler]:
    """``x [B, S, H]`` through ``blocks`` as micro-batches split along B (uneven or empty allowed).

    ``compute_sms``: cap on the SMs matmuls use meanwhile (:func:`compute_sm_limit`); give
    them what the communication kernels (``Communicator.num_sms``) leave.

    ``low_latency``: inference through the low-latency mode (the blocks' ``decode``; their
    communicator needs ``low_latency=`` buffers, whose two receive areas hold the two micro-batches'
    results), with ``recv_hooks`` (:func:`decode_block_stages`). Not for training.

    Returns the output ``[B, S, H]`` and the scheduler (call ``.backward()`` on it after
    ``loss.backward()`` when training; the output is then a leaf that collects the loss gradient).
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError(f"x: expected a tensor [B, S, H], got {type(x).__name__}")
    if not blocks:
        raise ValueError("blocks: expected at least one block")
    sizes = split_sizes(x.shape[0], num_micro_batches) if sizes is None else list(sizes)
    if (len(sizes) != num_micro_batches or not all(isinstance(n, int) and not isinstance(n, bool) for n in sizes)
            or sum(sizes) != x.shape[0] or min(sizes) < 0):
        raise ValueError(f"sizes: expected {num_micro_batches} non-negative sizes summing to {x.shape[0]}, "
                         f"got {sizes}")
    if low_latency and torch.is_grad_enabled():
        raise RuntimeError("low_latency: the low-latency mode is for inference; run under torch.no_grad()")
    if low_latency and num_micro_batches > 2:
        raise ValueError(f"num_micro_batches: the low-latency mode's two receive areas hold at most 2 micro-batches "
                         f"in flight, got {num_micro_batches}")
    scheduler = OverlapScheduler(model_stages(blocks, low_latency, recv_hooks), num_micro_batches, compute_sms)
    outputs = scheduler.forward([{"x": part} for part in torch.split(x, sizes, dim=0)], output="x")
    if torch.is_grad_enabled():
        # One leaf over the whole batch, so the caller's loss is over [B, S, H] as for the plain model.
        whole = torch.cat([o.detach() for o in outputs], dim=0).requires_grad_()
        return whole, _WholeBatchBackward(scheduler, outputs, whole, sizes)
    return torch.cat(outputs, dim=0), scheduler


class _WholeBatchBackward:
    """Hands the gradient of the concatenated output to the per-micro-batch leaves, then runs the scheduler's backward."""

    def __init__(self, scheduler: OverlapScheduler, leaves: list[torch.Tensor], whole: torch.Tensor,
                 sizes: list[int]) -> None:
        self.scheduler, self.leaves, self.whole, self.sizes = scheduler, leaves, whole, sizes

    def backward(self) -> None:
        if self.whole.grad is None:
            raise RuntimeError("backward: the output received no gradient (call loss.backward() first)")
        for leaf, grad in zip(self.leaves, torch.split(self.whole.grad, self.sizes, dim=0)):
            leaf.grad = grad.contiguous()
        self.scheduler.backward()
