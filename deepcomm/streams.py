"""Running a call on the communication stream, ordered by events (shared by every backend)."""

from __future__ import annotations

import torch

from deepcomm.events import EventHandle


class CommStreamScope:
    """Run a block on ``stream`` after ``previous_event`` (default: after the caller's stream).

    ``with`` yields the caller's stream (None on the CPU, where everything is
    synchronous). Inputs are marked as used on the communication stream so the
    caching allocator does not recycle them while it still reads them.
    """

    def __init__(self, stream: torch.cuda.Stream | None, previous_event: EventHandle | None, inputs: tuple) -> None:
        self.stream, self.previous_event, self.inputs = stream, previous_event, inputs
        self._caller: torch.cuda.Stream | None = None

    # The stream switches below are torch.cuda.set_stream, not the torch.cuda.stream context: a
    # dispatch is host-bound at decode sizes, and the context costs several current-stream lookups.
    def __enter__(self) -> torch.cuda.Stream | None:
        if self.stream is None:
            return None
        caller = torch.cuda.current_stream(self.stream.device_index)
        if self.previous_event is not None:
            self.previous_event.wait(self.stream)
        else:
            self.stream.wait_stream(caller)
        for t in self.inputs:
            if t is not None:
                t.record_stream(self.stream)
        torch.cuda.set_stream(self.stream)  # allocations in the block belong to the communication stream
        self._caller = caller
        return caller

    def __exit__(self, *exc) -> None:
        if self._caller is not None:
            torch.cuda.set_stream(self._caller)


def hand_back(
    outputs: tuple, device: torch.device, stream: torch.cuda.Stream | None, caller: torch.cuda.Stream | None,
    async_finish: bool,
) -> EventHandle:
    """Record the end of a call on ``stream``; outputs become usable on the caller's stream.

    Unless ``async_finish``, the caller's stream waits for the event (the host never does).
    """
    event = EventHandle.record(device, stream)
    if caller is not None:
        for t in outputs:
            if t is not None:
                t.record_stream(caller)
        if not async_finish:
            event.wait(caller)
    return event
