"""An opt-in check that the ranks agree on each collective call, before any of them launches it.

``Communicator(check_calls=True)`` (or ``DEEPCOMM_CHECK_CALLS=1``; every rank must choose the same): every
dispatch and combine, normal and low-latency, and deepcomm.autograd's forward calls first run this rank's
checks on the host — its backend's own ``check_dispatch`` / ``check_combine``, everything the backend refuses
before it launches (a failure its kernels recorded, row alignment, buffer capacity, blocks per GPU, handles
and their receive slots, hooks), plus the expert ids unless a CUDA graph is being captured or
``previous_event`` orders them — then exchange a summary of the call over the communicator's group. Every
rank then raises at once when

- a rank refused (it raises its own error, the others ``CommunicationError`` naming it),
- the ranks are in different calls (one combines while another dispatches), or
- a field the kernels need equal on every rank differs (hidden size, K, row format, ``num_experts``,
  ``num_sms``, weights at dispatch, and the dispatch a reused or combined handle came from: the n-th
  dispatch of each rank belong together).

Without it the kernel paths trust the caller: a peer with other arguments reads rows of another shape, or
waits for a call that never comes until the timeout. A rank that never makes the call is waited for as long
as the group's timeout, after which the group is out of step: make a new one. Not covered: what the
kernels find while they run (a peer that stops answering: their own bounded waits) and autograd's
backward collectives. A host round trip per call: for debugging; calls captured into a CUDA graph run this
rank's checks only (nothing on the host runs at a replay).
"""

from __future__ import annotations

import collections
import os
import weakref
from collections.abc import Callable

import torch
import torch.distributed as dist

from deepcomm.errors import CommunicationError
from deepcomm.fp8 import FP8_DTYPE

ENV_VAR = "DEEPCOMM_CHECK_CALLS"
# Handles a combine may still name; an older one is "unknown" (None) on every rank alike: agreed, not checked.
_RECENT_DISPATCHES = 64


def enabled_by_env() -> bool:
    """Whether DEEPCOMM_CHECK_CALLS asks for the check (1, true, yes, on)."""
    return os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


def tensor_dim(value: object, dim: int) -> int | None:
    """``value.shape[dim]`` for a tensor with that dimension, else None (the arguments are refused anyway)."""
    if isinstance(value, torch.Tensor) and -value.dim() <= dim < value.dim():
        return int(value.shape[dim])
    return None


def row_format(x: object, quantize_fp8: bool = False) -> str | None:
    """What travels: ``"fp8"`` (fp8 rows, or bf16 quantised on the way) or the tensor's dtype."""
    if not isinstance(x, torch.Tensor):
        return None
    return "fp8" if quantize_fp8 or x.dtype == FP8_DTYPE else str(x.dtype).removeprefix("torch.")


class CallCheck:
    """Exchanges each call's summary among the ranks of ``group`` and raises where they disagree."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int, world_size: int, run_stage) -> None:
        self.group, self.rank, self.world_size = group, rank, world_size
        self._run_stage = run_stage  # (stage, fn, *args, **kwargs): a collective whose failure names rank and stage
        self._dispatches = 0
        self._recent: collections.deque = collections.deque(maxlen=_RECENT_DISPATCHES)

    def dispatched(self, handle: object) -> None:
        """Number the dispatch that made ``handle`` (after it returned), for the combines that name it."""
        self._dispatches += 1
        self._recent.append((weakref.ref(handle), self._dispatches))

    def dispatch_of(self, handle: object) -> int | None:
        """The number of the checked dispatch that made ``handle``; None for one unknown here."""
        for ref, number in reversed(self._recent):
            if ref() is handle:
                return number
        return None

    def agree(self, method: str, fields: dict[str, object], validate: Callable[[bool], None]) -> None:
        """Validate this rank's arguments, exchange ``fields`` with the other ranks, raise where they differ.

        ``validate(check_values)``: this rank's argument checks; ``check_values`` is False while a CUDA graph
        is being captured (reading expert ids on the host would wait for the GPU there). ``fields``: what
        every rank must pass equal (plain values). Every rank raises the same error, naming the first rank
        that refused or the first that differs from the value most ranks share (``.peer``), except a rank
        that refused: that one raises its own error.
        """
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            validate(False)  # a collective here would be captured into the graph: this rank's own checks only
            return
        refused = None
        try:
            validate(True)
        except Exception as error:  # any: the peers must hear of it here, not wait for this rank's call
            refused = error
        stage = f"{method}/check"
        mine = {"refused": None if refused is None else f"{type(refused).__name__}: {refused}",
                "fields": {"call": method, **fields}}
        everyone: list = [None] * self.world_size
        self._run_stage(stage, dist.all_gather_object, everyone, mine, group=self.group)
        if refused is not None:
            raise refused
        for peer, theirs in enumerate(everyone):
            if theirs["refused"] is not None:
                raise CommunicationError(self.rank, stage, f"rank {peer} refused its arguments ({theirs['refused']})",
                                         peer=peer)
        for name in mine["fields"]:  # the call first: the other fields mean nothing between different calls
            values = [theirs["fields"].get(name) for theirs in everyone]
            if len(set(values)) > 1:
                common = collections.Counter(values).most_common(1)[0][0]
                peer = next(r for r, value in enumerate(values) if value != common)
                listed = ", ".join(f"rank {r}: {value!r}" for r, value in enumerate(values))
                hint = "; every rank must make the same calls in the same order" if name == "call" else ""
                raise CommunicationError(self.rank, stage, f"{name} differs between the ranks ({listed}){hint}",
                                         peer=peer)
