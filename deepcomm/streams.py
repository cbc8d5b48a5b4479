"""Running a call on the communication stream, ordered by events (shared by every backend).

A decode-size dispatch is host-bound, so this path avoids torch's Python stream
objects where it can: the caller's stream is read as ids and a raw handle, and
stream-to-stream waits go through the extension's ``order_streams`` (one event
record and one wait) instead of ``Stream.wait_stream`` (a new Python Event each).
"""

from __future__ import annotations

import torch

from deepcomm import _ext
from deepcomm.events import EventHandle


# Stream objects of the callers' streams, by (stream id, device index, device type): the few streams a
# program calls from, each built once (building a torch.cuda.Stream costs a few µs). A Stream object is
# nothing but those ids, so a kept one is the same as one built anew.
_CALLER_STREAMS: dict[tuple[int, int, int], torch.cuda.Stream] = {}


class CallerStream:
    """The stream that was current when a call began, read without building a ``torch.cuda.Stream``."""

    __slots__ = ("ids", "raw")

    def __init__(self, device_index: int) -> None:
        self.ids = torch._C._cuda_getCurrentStream(device_index)  # (stream id, device index, device type)
        self.raw = torch._C._cuda_getCurrentRawStream(device_index)  # cudaStream_t

    @property
    def stream(self) -> torch.cuda.Stream:
        stream = _CALLER_STREAMS.get(self.ids)
        if stream is None:
            stream_id, device_index, device_type = self.ids
            stream = torch.cuda.Stream(stream_id=stream_id, device_index=device_index, device_type=device_type)
            _CALLER_STREAMS[self.ids] = stream
        return stream

    def make_current(self) -> None:
        stream_id, device_index, device_type = self.ids
        torch._C._cuda_setStream(stream_id=stream_id, device_index=device_index, device_type=device_type)


def order_streams(waiter: torch.cuda.Stream | CallerStream, waited: torch.cuda.Stream | CallerStream) -> None:
    """``waiter`` runs nothing queued after this until the work queued on ``waited`` so far is done.

    The host does not wait. Through the extension when it is built, else torch's ``wait_stream``.
    """
    if _ext.available():
        _ext.extension().order_streams(_raw(waiter), _raw(waited))
    else:
        _stream(waiter).wait_stream(_stream(waited))


def _raw(stream: torch.cuda.Stream | CallerStream) -> int:
    return stream.raw if isinstance(stream, CallerStream) else stream.cuda_stream


def _stream(stream: torch.cuda.Stream | CallerStream) -> torch.cuda.Stream:
    return stream.stream if isinstance(stream, CallerStream) else stream


class CommStreamScope:
    """Run a block on ``stream`` after ``previous_event`` (default: after the caller's stream).

    ``with`` yields the caller's :class:`CallerStream` (None on the CPU, where everything is
    synchronous). When the call finishes asynchronously (``async_finish``), ``inputs`` are marked
    as used on the communication stream so the caching allocator does not recycle them while it
    still reads them. Otherwise :func:`hand_back` makes the caller's stream wait for the call's
    end, so whatever that stream later allocates in their memory runs after it, and marking them
    (about a microsecond each, at decode sizes a few % of the call) buys nothing. Inputs allocated on
    another stream than the caller's need ``async_finish`` and an explicit wait, as with any
    cross-stream use in torch. Tensors the block allocates belong to the communication stream;
    :func:`hand_back` makes those it returns safe on the caller's.
    """

    def __init__(self, stream: torch.cuda.Stream | None, previous_event: EventHandle | None, inputs: tuple,
                 async_finish: bool = True) -> None:
        self.stream, self.previous_event, self.async_finish = stream, previous_event, async_finish
        self.inputs = inputs if async_finish else ()
        self._caller: CallerStream | None = None

    def __enter__(self) -> CallerStream | None:
        if self.stream is None:
            return None
        caller = CallerStream(self.stream.device_index)
        # Setting a stream current sets its device current too: the caller's comes back at the exit.
        self._device = torch._C._cuda_getDevice()
        # The communication stream (and so its device) is current first: the ordering event is the
        # current device's, and a raw handle of 0 means the current device's default stream.
        torch._C._cuda_setStream(stream_id=self.stream.stream_id, device_index=self.stream.device_index,
                                 device_type=self.stream.device_type)
        self._caller = caller
        try:
            if self.previous_event is not None:
                self.previous_event.wait(self.stream)
            else:
                order_streams(self.stream, caller)
            for t in self.inputs:
                if t is not None:
                    t.record_stream(self.stream)
        except BaseException as error:
            self.__exit__(type(error), error, None)
            raise
        return caller

    def __exit__(self, exc_type=None, *exc) -> None:
        if self._caller is None:
            return
        try:
            if exc_type is not None and not self.async_finish:
                # The call failed before hand_back: its queued kernels may still read the unmarked inputs.
                order_streams(self._caller, self.stream)
        finally:
            self._caller.make_current()
            if self._device != self.stream.device_index:
                torch.cuda.set_device(self._device)


def hand_back(
    allocated: tuple, device: torch.device, stream: torch.cuda.Stream | None, caller: CallerStream | None,
    async_finish: bool,
) -> EventHandle:
    """End a call on ``stream``; its outputs become usable on the caller's stream.

    ``allocated``: the outputs the call allocated on ``stream`` (views of a communicator's
    registered buffer need nothing: the allocator never frees it while the communicator lives).
    The event marks the call's end on ``stream``. Unless ``async_finish``, the caller's stream
    waits for it now (the host never does); else the caller waits on the event.
    """
    if caller is None:
        return EventHandle(None)
    for t in allocated:
        if t is not None:
            t.record_stream(caller.stream)
    event = EventHandle.record(device, stream)
    if not async_finish:
        order_streams(caller, stream)
    return event
