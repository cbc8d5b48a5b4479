"""Events that order communication against compute.

An :class:`EventHandle` marks a point on a CUDA stream; on the CPU (gloo, the
reference path) work is synchronous and the handle is already complete.
"""

from __future__ import annotations

import torch


class EventHandle:
    """A recorded point on a stream, or a completed no-op on the CPU."""

    __slots__ = ("_event", "_pending")

    def __init__(self, event: torch.cuda.Event | None = None) -> None:
        self._event = event
        self._pending = None  # a CallerStream to record on at first use

    @classmethod
    def record(cls, device: torch.device, stream: torch.cuda.Stream | None = None) -> "EventHandle":
        """Record on ``stream`` (default: the current stream of ``device``)."""
        if device.type != "cuda":
            return cls(None)
        event = torch.cuda.Event()
        event.record(stream if stream is not None else torch.cuda.current_stream(device))
        return cls(event)

    @classmethod
    def on_first_use(cls, caller) -> "EventHandle":
        """A point on the caller's stream (a ``streams.CallerStream``) that already waits for a call's end.

        A synchronous call returns one: most are never used, and recording a CUDA event is host
        time on every call. It is recorded when first used, so reaching it also means reaching
        the caller's work queued in between; it is never reached before the call's end.
        """
        handle = cls(None)
        handle._pending = caller
        return handle

    def _resolved(self) -> torch.cuda.Event | None:
        if self._pending is not None:
            self._event = torch.cuda.Event()
            self._event.record(self._pending.stream)
            self._pending = None
        return self._event

    def wait(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make ``stream`` (default: the current stream) wait for this point, without blocking the host."""
        event = self._resolved()
        if event is not None:
            (stream if stream is not None else torch.cuda.current_stream()).wait_event(event)

    def synchronize(self) -> None:
        """Block the host until this point is reached."""
        event = self._resolved()
        if event is not None:
            event.synchronize()

    def query(self) -> bool:
        """Whether the point has been reached."""
        event = self._resolved()
        return event is None or event.query()

    @property
    def cuda_event(self) -> torch.cuda.Event | None:
        return self._resolved()
