"""Events that order communication against compute.

An :class:`EventHandle` marks a point on a CUDA stream; on the CPU (gloo, the
reference path) work is synchronous and the handle is already complete.

Every dispatch and combine records one, and the overlap scheduler one per
stage: with the extension built, the point is the extension's ``StreamPoint``
(an event from a pool, recorded in one call), about a microsecond where a
``torch.cuda.Event`` costs several; without it, a ``torch.cuda.Event``.
"""

from __future__ import annotations

import torch

from deepcomm import _ext


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


class EventHandle:
    """A recorded point on a stream, or a completed no-op on the CPU."""

    __slots__ = ("_point",)

    def __init__(self, point=None) -> None:
        self._point = point  # None (complete), a _C.StreamPoint or a torch.cuda.Event

    @classmethod
    def record(cls, device: torch.device, stream: torch.cuda.Stream | None = None) -> "EventHandle":
        """Record on ``stream`` (default: the current stream of ``device``)."""
        if device.type != "cuda":
            return cls(None)
        # The stream's device, which need not be the current one (a raw handle of 0 means the default
        # stream of whichever device is current: StreamPoint records with its device current).
        index = stream.device_index if stream is not None else _device_index(device)
        if _ext.available():
            raw = stream.cuda_stream if stream is not None else torch._C._cuda_getCurrentRawStream(index)
            return cls(_ext.extension().StreamPoint(raw, index))
        event = torch.cuda.Event()
        event.record(stream if stream is not None else torch.cuda.current_stream(index))
        return cls(event)

    def wait(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make ``stream`` (default: the current stream) wait for this point, without blocking the host."""
        point = self._point
        if point is None:
            return
        if isinstance(point, torch.cuda.Event):
            (stream if stream is not None else torch.cuda.current_stream()).wait_event(point)
        elif stream is None:
            point.wait(torch._C._cuda_getCurrentRawStream(torch.cuda.current_device()))
        elif stream.device_index != torch._C._cuda_getDevice():
            with torch.cuda.device(stream.device_index):  # a raw handle of 0 is the current device's default stream
                point.wait(stream.cuda_stream)
        else:
            point.wait(stream.cuda_stream)

    def synchronize(self) -> None:
        """Block the host until this point is reached."""
        if self._point is not None:
            self._point.synchronize()

    def query(self) -> bool:
        """Whether the point has been reached."""
        return self._point is None or self._point.query()
