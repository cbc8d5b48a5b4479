"""Events that order communication against compute.

An :class:`EventHandle` marks a point on a CUDA stream; on the CPU (gloo, the
reference path) work is synchronous and the handle is already complete.
"""

from __future__ import annotations

import torch


class EventHandle:
    """A recorded point on a stream, or a completed no-op on the CPU."""

    __slots__ = ("_event",)

    def __init__(self, event: torch.cuda.Event | None = None) -> None:
        self._event = event

    @classmethod
    def record(cls, device: torch.device, stream: torch.cuda.Stream | None = None) -> "EventHandle":
        """Record on ``stream`` (default: the current stream of ``device``)."""
        if device.type != "cuda":
            return cls(None)
        event = torch.cuda.Event()
        event.record(stream if stream is not None else torch.cuda.current_stream(device))
        return cls(event)

    def wait(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make ``stream`` (default: the current stream) wait for this point, without blocking the host."""
        if self._event is not None:
            (stream if stream is not None else torch.cuda.current_stream()).wait_event(self._event)

    def synchronize(self) -> None:
        """Block the host until this point is reached."""
        if self._event is not None:
            self._event.synchronize()

    def query(self) -> bool:
        """Whether the point has been reached."""
        return self._event is None or self._event.query()

    @property
    def cuda_event(self) -> torch.cuda.Event | None:
        return self._event
