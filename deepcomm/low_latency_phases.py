"""Where a low-latency call's time goes, read from the kernels' phase clock.

The kernels stamp %globaltimer at each phase (csrc/kernels/low_latency.h ``Phase``) when a clock is
set (``LowLatencyKernels.record_phases``): thread 0 of every block, one slot per call. Per call, every
phase is timed from the earliest block's start of the call's dispatch, so the combine's phases
include the time between the two kernels too. A phase's time is when its first and its last block
got there: the gap between them is the blocks' imbalance, and the last block's time is what the next
phase waits for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PhaseTime:
    phase: str
    first_block_us: float  # median over calls: the earliest block reached the phase, µs after the call began
    last_block_us: float  # median over calls: the latest block reached it
    step_us: float  # median over calls: the latest block's time less the previous stamped phase's
    calls: int  # calls that stamped the phase


def phase_times(clock: np.ndarray, phases: list[str]) -> list[PhaseTime]:
    """Per stamped phase, medians over the calls in ``clock`` ([slots, blocks, phases] ns, 0 = not
    stamped). A call counts if its dispatch start is stamped; phases no call stamped are left out."""
    if clock.ndim != 3 or clock.shape[2] != len(phases):
        raise ValueError(f"clock: expected [slots, blocks, {len(phases)}], got shape {list(clock.shape)}")
    stamped = clock > 0
    calls = stamped[:, :, 0].any(axis=1)
    if not calls.any():
        return []
    clock, stamped = clock[calls].astype(np.int64), stamped[calls]
    # In int64 until the stamps are relative: float64 would round absolute ns to hundreds of ns.
    big = np.iinfo(np.int64).max
    origin = np.where(stamped[:, :, 0], clock[:, :, 0], big).min(axis=1)  # [calls]
    relative = np.where(stamped, clock - origin[:, None, None], 0).astype(np.float64)
    first = np.where(stamped, relative, np.inf).min(axis=1)  # [calls, phases]
    last = np.where(stamped, relative, -np.inf).max(axis=1)
    reached = stamped.any(axis=1)  # [calls, phases]
    rows, previous = [], None
    for p, name in enumerate(phases):
        if not reached[:, p].any():
            continue
        with_phase = reached[:, p]
        step = last[:, p] - (last[:, previous] if previous is not None else 0.0)
        usable = with_phase & (reached[:, previous] if previous is not None else True)
        rows.append(PhaseTime(name, float(np.median(first[with_phase, p])) / 1e3,
                              float(np.median(last[with_phase, p])) / 1e3,
                              float(np.median(step[usable])) / 1e3 if usable.any() else float("nan"),
                              int(with_phase.sum())))
        previous = p
    return rows


def format_phase_times(rows: list[PhaseTime]) -> str:
    lines = [f"{'phase':<16} {'first block µs':>14} {'last block µs':>14} {'step µs':>8} {'calls':>6}"]
    lines += [f"{r.phase:<16} {r.first_block_us:14.1f} {r.last_block_us:14.1f} {r.step_us:8.1f} {r.calls:6d}"
              for r in rows]
    return "\n".join(lines)
