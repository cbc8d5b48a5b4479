"""Where a pushing intranode combine puts every rank's rows, and when it pushes.

In a pushing combine (csrc/kernels/intranode_push.cpp) each rank's copy engines write its expert rows
back to the ranks that own the tokens, into the owner's landing area, in chunks; each chunk raises the
owner's count of chunks landed from that rank, and the owner sums a token once the chunks holding its
rows have landed. Pusher and owner must agree on every row's place and every chunk's size without
talking: both derive them here from the dispatch's token matrix (``matrix[s][d]``: tokens rank ``s``
sent to rank ``d``), which every rank reads the same after the dispatch's host wait.

- Rank ``d`` holds its rows in the dispatch's order: by source rank, then token. The rows of owner ``o``
  start at ``sum(matrix[s][d] for s < o)``.
- Owner ``o``'s landing area holds its peers' rows peer after peer, in ascending rank order, each peer's
  in the order ``o``'s tokens came.
- Each (pusher, owner) pair's rows go in up to ``CHUNKS_PER_PEER`` chunks of at least
  ``MIN_CHUNK_BYTES``: the owner sums the early chunks while later ones are still copied, and a copy
  costs microseconds to start.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHUNKS_PER_PEER = 8
MIN_CHUNK_BYTES = 1 << 20
COUNT_WRAP = 1 << 32  # the chunk counts are 32-bit words (cuStreamWriteValue32)


def chunk_rows(num_rows: int, row_bytes: int) -> int:
    """Rows per chunk of a pair that moves ``num_rows`` rows (1 when it moves none: never divided by zero)."""
    if num_rows == 0:
        return 1
    return max(-(-num_rows // CHUNKS_PER_PEER), -(-MIN_CHUNK_BYTES // row_bytes))


def num_chunks(num_rows: int, row_bytes: int) -> int:
    return -(-num_rows // chunk_rows(num_rows, row_bytes))


@dataclass(frozen=True)
class PushPlan:
    """One rank's part of a pushing combine. Lists are per rank; the entry for this rank is unused (0)."""

    # As a pusher, per owner o:
    first_row: list[int]         # where o's rows start among this rank's rows
    num_rows: list[int]          # how many
    landing_row: list[int]       # where they go in o's landing area
    push_chunk_rows: list[int]
    push_chunks: list[int]
    # As an owner, per peer p:
    landing_first_row: list[int]  # where p's rows start in this rank's landing area
    land_chunk_rows: list[int]
    land_chunks: list[int]
    landing_rows: int             # rows this rank's landing area takes in all
    cross_bytes: int              # bytes every rank together pushes to another (the same on every rank)


def push_plan(matrix, rank: int, row_bytes: int) -> PushPlan:
    """This rank's plan for a combine of bf16 rows of ``row_bytes`` after a dispatch with ``matrix``.

    Plain Python on at most 8 x 8 counts: cheaper than numpy calls at this size, and it runs once per combine.
    """
    counts = np.asarray(matrix, dtype=np.int64)
    world = counts.shape[0]
    if counts.shape != (world, world) or not 0 <= rank < world:
        raise ValueError(f"matrix: expected a square token matrix with rank {rank} in it, got shape {counts.shape}")
    m = counts.tolist()
    if min(min(row) for row in m) < 0:
        raise ValueError("matrix: token counts must be >= 0")
    zeros = [0] * world
    first_row, num_rows, landing_row = list(zeros), list(zeros), list(zeros)
    landing_first_row, landed = list(zeros), list(zeros)
    held_below = 0  # rows this rank holds of owners below o
    sent_below = 0  # rows this rank's peers below p sent here
    for other in range(world):
        if other != rank:
            # This rank pushing to owner `other`: other's rows here come after lower owners' rows; they go
            # to other's landing area after the rows of other's peers below this rank.
            first_row[other] = held_below
            num_rows[other] = m[other][rank]
            landing_row[other] = sum(m[other][q] for q in range(rank) if q != other)
            # Peer `other` pushing to this rank.
            landing_first_row[other] = sent_below
            landed[other] = m[rank][other]
            sent_below += m[rank][other]
        held_below += m[other][rank]
    cross_rows = sum(map(sum, m)) - sum(m[r][r] for r in range(world))
    return PushPlan(first_row, num_rows, landing_row, [chunk_rows(n, row_bytes) for n in num_rows],
                    [num_chunks(n, row_bytes) for n in num_rows], landing_first_row,
                    [chunk_rows(n, row_bytes) for n in landed], [num_chunks(n, row_bytes) for n in landed],
                    sent_below, cross_rows * row_bytes)


class ChunkCounts:
    """The chunk counts a rank's pushing combines have raised so far, as the kernels see them.

    ``pushed[o]``: owner o's count of chunks landed from this rank; ``landed[p]``: this rank's count of
    chunks landed from peer p. Both only grow, by the plans of the pushing combines in call order.
    """

    def __init__(self, world_size: int) -> None:
        self.pushed = [0] * world_size
        self.landed = [0] * world_size

    def advance(self, plan: PushPlan) -> None:
        self.pushed = [(n + c) % COUNT_WRAP for n, c in zip(self.pushed, plan.push_chunks)]
        self.landed = [(n + c) % COUNT_WRAP for n, c in zip(self.landed, plan.land_chunks)]
