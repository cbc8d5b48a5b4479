"""Exceptions raised by deepcomm beyond TypeError/ValueError for bad input."""

from __future__ import annotations


class CommunicationError(RuntimeError):
    """A collective step failed or a peer stopped answering within the timeout.

    ``rank`` is the rank that raised, ``stage`` the step it was in (for
    example ``"dispatch/counts"``), ``peer`` the rank that did not answer, or
    refused, or differs, when it is known.
    """

    def __init__(self, rank: int, stage: str, detail: str, peer: int | None = None) -> None:
        self.rank = rank
        self.stage = stage
        self.peer = peer
        # The detail names the peer and what it did (did not answer, refused, passed another value).
        super().__init__(f"rank {rank}: stage '{stage}' failed: {detail}")


class SlotReusedError(ValueError):
    """Rows, or a place for them, in a receive slot that later dispatches have reused
    (a dispatch's results live in its slot until ``num_recv_slots`` further dispatches ran)."""
