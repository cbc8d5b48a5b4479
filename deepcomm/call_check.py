"""An opt-in check that the ranks agree on each collective call, before any of them launches it.

``Communicator(check_calls=True)`` (or ``DEEPCOMM_CHECK_CALLS=1``): every dispatch and combine, normal
and low-latency, first validates its arguments on the host (expert ids included) and exchanges a
summary of the call with the other ranks over the communicator's group. Every rank then raises the
same ``CommunicationError``, at once, when

- a rank refused its arguments (it raises its own ``TypeError``/``ValueError``, naming the argument),
- the ranks are in different calls (one combines while another dispatches), or
- a field the kernels need equal on every rank differs (hidden size, K, row format, ``num_experts``,
  ``num_sms``, handle reuse, weights at dispatch), or a combine's handle comes from another
  dispatch than its peers' (the n-th dispatch of each rank belong together).

Without it the kernel paths trust the caller: a peer with other arguments reads rows of another shape,
or waits for a call that never comes until the timeout. The exchange costs a host round trip per call
(debugging, not production); calls captured into a CUDA graph are not checked (nothing on the host
runs at a replay).
"""

from __future__ import annotations

import collections
import os
import weakref
from collections.abc import Callable

import torch
import torch.distributed as dist

from deepcomm.errors import CommunicationError

ENV_VAR = "DEEPCOMM_CHECK_CALLS"
_RECENT_DISPATCHES = 64  # handles a combine may still name (far more than any receive-slot count)


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
    return "fp8" if quantize_fp8 or x.dtype == torch.float8_e4m3fn else str(x.dtype).removeprefix("torch.")


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

    def agree(self, method: str, fields: dict[str, object], validate: Callable[[], None]) -> None:
        """Validate this rank's arguments, exchange ``fields`` with the other ranks, raise where they differ.

        ``fields``: what every rank must pass equal (plain values). The same error is raised on every rank,
        naming the first rank that refused or differs from the most common value (``.peer``), except on a
        rank that refused: that one raises its own error.
        """
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            validate()  # a collective here would be captured into the graph: this rank's own checks only
            return
        refused = None
        try:
            validate()
        except (TypeError, ValueError) as error:
            refused = error
        stage = f"{method}/check"
        mine = {"method": method, "refused": None if refused is None else f"{type(refused).__name__}: {refused}",
                "fields": fields}
        everyone: list = [None] * self.world_size
        self._run_stage(stage, dist.all_gather_object, everyone, mine, group=self.group)
        if refused is not None:
            raise refused
        for peer, theirs in enumerate(everyone):
            if theirs["refused"] is not None:
                raise CommunicationError(self.rank, stage, f"rank {peer} refused its arguments ({theirs['refused']})",
                                         peer=peer)
        for peer, theirs in enumerate(everyone):
            if theirs["method"] != method:
                raise CommunicationError(self.rank, stage, f"rank {peer} is in {theirs['method']} where this rank "
                                         f"is in {method}: every rank must make the same calls in the same order",
                                         peer=peer)
        for name in fields:
            values = [theirs["fields"].get(name) for theirs in everyone]
            if len(set(values)) > 1:
                common = collections.Counter(values).most_common(1)[0][0]
                peer = next(r for r, value in enumerate(values) if value != common)
                listed = ", ".join(f"rank {r}: {value!r}" for r, value in enumerate(values))
                raise CommunicationError(self.rank, stage, f"{name} differs between the ranks ({listed})", peer=peer)
