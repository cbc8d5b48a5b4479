"""A pushing combine's plan (deepcomm/landing.py): pushers and owners agree on every row's place.

The simulation below moves rows the way the copies and the combine kernel do (csrc/kernels/
intranode_push.cpp, intranode.cu), on random routings, and checks every token gathers its own rows.
"""

from __future__ import annotations

import numpy as np
import pytest

from deepcomm import landing
from deepcomm.landing import COUNT_WRAP, ChunkCounts, chunk_rows, num_chunks, push_plan


def routing(seed: int, world: int, skew: str) -> list[np.ndarray]:
    """is_token_in_rank per source rank: [tokens, world] bools (zero tokens, a skipped rank, skew)."""
    rng = np.random.default_rng(seed)
    masks = []
    for source in range(world):
        tokens = 0 if source == seed % world else int(rng.integers(1, 60))
        p = np.full(world, 0.5)
        if skew == "skewed":
            p = np.linspace(0.95, 0.05, world)
        elif skew == "one_rank_empty":
            p[(seed + 1) % world] = 0.0
        masks.append(rng.random((tokens, world)) < p)
    return masks


def simulate(masks: list[np.ndarray], row_bytes: int) -> None:
    world = len(masks)
    matrix = np.array([m.sum(axis=0) for m in masks], dtype=np.int64)  # [src][dst]
    # Rank d's rows: by source rank, then token; a row names (owner, token).
    held = [[(s, t) for s in range(world) for t in range(len(masks[s])) if masks[s][t, d]] for d in range(world)]
    plans = [push_plan(matrix, r, row_bytes) for r in range(world)]
    areas = [[None] * plans[o].landing_rows for o in range(world)]
    for pusher, plan in enumerate(plans):
        for owner in range(world):
            if owner == pusher:
                continue
            rows = held[pusher][plan.first_row[owner] : plan.first_row[owner] + plan.num_rows[owner]]
            assert all(s == owner for s, _ in rows) and len(rows) == matrix[owner][pusher]
            owner_plan = plans[owner]
            assert plan.landing_row[owner] == owner_plan.landing_first_row[pusher]
            assert plan.push_chunk_rows[owner] == owner_plan.land_chunk_rows[pusher]
            assert plan.push_chunks[owner] == owner_plan.land_chunks[pusher]
            for i, row in enumerate(rows):
                place = plan.landing_row[owner] + i
                assert areas[owner][place] is None, "two rows pushed to one landing row"
                areas[owner][place] = row
    for owner, plan in enumerate(plans):
        assert None not in areas[owner], "a landing row nobody pushed"
        mask = masks[owner]
        send_pos = np.cumsum(mask, axis=0) - mask  # a token's row among this rank's rows for each rank
        for token in range(len(mask)):
            for src in np.flatnonzero(mask[token]):
                if src == owner:  # its own rows: where the dispatch put them
                    row = held[owner][int(matrix[:owner, owner].sum()) + send_pos[token, src]]
                else:
                    place = plan.landing_first_row[src] + send_pos[token, src]
                    row = areas[owner][place]
                    chunk = send_pos[token, src] // plan.land_chunk_rows[src]
                    assert chunk < plan.land_chunks[src]
                assert row == (owner, token)
        assert plan.cross_bytes == (matrix.sum() - np.trace(matrix)) * row_bytes
        assert plan.cross_bytes == plans[0].cross_bytes


@pytest.mark.parametrize("world", [2, 3, 4, 8])
@pytest.mark.parametrize("skew", ["uniform", "skewed", "one_rank_empty"])
@pytest.mark.parametrize("row_bytes", [1024, 14336])
def test_every_token_gathers_its_own_rows_from_the_landing_area(world, skew, row_bytes, monkeypatch):
    monkeypatch.setattr(landing, "MIN_CHUNK_BYTES", 2048)  # several chunks a pair at these sizes
    for seed in range(4):
        simulate(routing(seed, world, skew), row_bytes)


def test_chunks_are_few_and_not_too_small():
    row = 14336
    assert chunk_rows(0, row) == 1 and num_chunks(0, row) == 0  # never divides by zero
    assert num_chunks(1, row) == 1
    small = -(-landing.MIN_CHUNK_BYTES // row)  # rows in the smallest chunk
    assert chunk_rows(3 * small, row) == small and num_chunks(3 * small, row) == 3
    for rows in (10 ** 4, 12345, 4096 * 3):
        assert num_chunks(rows, row) <= landing.CHUNKS_PER_PEER
        assert chunk_rows(rows, row) * row >= landing.MIN_CHUNK_BYTES
        assert (num_chunks(rows, row) - 1) * chunk_rows(rows, row) < rows <= num_chunks(rows, row) * chunk_rows(rows, row)


def test_chunk_counts_grow_by_each_plan_and_wrap_at_32_bits():
    matrix = np.array([[3, 40], [50, 2]])
    plan = push_plan(matrix, 0, 1024)
    counts = ChunkCounts(2)
    counts.pushed[1] = COUNT_WRAP - 1
    counts.advance(plan)
    assert counts.pushed == [0, (COUNT_WRAP - 1 + plan.push_chunks[1]) % COUNT_WRAP]
    assert counts.landed == [0, plan.land_chunks[1]] and plan.push_chunks[0] == plan.land_chunks[0] == 0


@pytest.mark.parametrize("matrix, rank", [(np.zeros((2, 3)), 0), (np.zeros((2, 2)), 2), (np.array([[1, -1], [0, 0]]), 0)])
def test_a_bad_matrix_is_refused_by_name(matrix, rank):
    with pytest.raises(ValueError, match="^matrix:"):
        push_plan(matrix, rank, 1024)
