"""tools/profile_low_latency.py: what can be checked without a GPU (kernel names as the profiler gives them)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import profile_low_latency as profile  # noqa: E402

from deepcomm.low_latency_phases import format_phase_times, phase_times  # noqa: E402


def test_kernel_names_mangled_and_demangled_with_their_phase():
    mangled = ("_ZN8deepcomm11low_latency47_GLOBAL__N__f15305fc_14_low_latency_cu_6a66627215dispatch_kernelILNS_9"
               "intranode7PayloadE0ELb{}ELb{}EEEvNS0_7ContextENS0_12DispatchArgsENS1_8ChunkingES6_")
    assert profile.kernel_name(mangled.format(1, 0)) == "dispatch_kernel (send)"
    assert profile.kernel_name(mangled.format(0, 1)) == "dispatch_kernel (receive)"
    assert profile.kernel_name(mangled.format(1, 1)) == "dispatch_kernel"
    demangled = "void deepcomm::low_latency::(anonymous namespace)::dispatch_kernel<(deepcomm::intranode::Payload)2, {}, {}>(x)"
    assert profile.kernel_name(demangled.format("false", "true")) == "dispatch_kernel (receive)"
    assert profile.kernel_name("void ns::(anonymous namespace)::combine_recv_kernel<true>(ctx)") == "combine_recv_kernel"
    assert profile.kernel_name("Memcpy DtoD (Device -> Device)") == "Memcpy DtoD (Device -> Device)"


def test_kernel_times_per_call_ignore_a_rank_waiting_for_its_peers_profiler():
    # 4 calls: a send and a receive each; the first receive spun 5 ms for a peer whose profiler started late.
    durations = {"dispatch_kernel (send)": [30.0, 31.0, 29.0, 30.0],
                 "dispatch_kernel (receive)": [5000.0, 20.0, 21.0, 19.0],
                 "combine_recv_kernel": [10.0] * 8}  # two launches a call
    assert profile.per_call_us(durations, 4) == {"dispatch_kernel (send)": 30.0, "dispatch_kernel (receive)": 20.5,
                                                 "combine_recv_kernel": 20.0}


def test_the_hook_option_parses():
    assert profile.parse_args(["--hook", "--fp8"]).hook and not profile.parse_args([]).hook


def test_the_phases_and_host_functions_options_parse():
    assert profile.parse_args(["--phases"]).phases and not profile.parse_args([]).phases
    assert profile.parse_args(["--host-functions", "25"]).host_functions == 25
    assert profile.parse_args([]).host_functions == 0


PHASES = ["start", "rows sent", "unused", "combine start", "summed"]


def _clock(calls: int, blocks: int, slots: int = 8) -> np.ndarray:
    """Stamps as the kernels write them: absolute %globaltimer ns (about 1.7e18: float64 would round
    them to 256 ns), block b of call c at its phases' offsets, the rest 0."""
    clock = np.zeros((slots, 4, len(PHASES)), dtype=np.int64)
    for call in range(calls):
        origin = 1_764_000_000_000_000_000 + call * 1_000_000
        for b in range(blocks):
            clock[call, b, 0] = origin + 10 * b  # the last block starts 10 ns per block later
            clock[call, b, 1] = origin + 2_000 + 300 * b + call  # the slowest block sends 300 ns per block later
            clock[call, b, 3] = origin + 50_000
            clock[call, b, 4] = origin + 61_100 + 100 * b
    return clock


def test_phase_times_from_the_first_block_start_and_the_imbalance_between_blocks():
    rows = phase_times(_clock(calls=5, blocks=3), PHASES)
    assert [r.phase for r in rows] == ["start", "rows sent", "combine start", "summed"]  # unused: never stamped
    start, sent, combine, summed = rows
    assert (start.first_block_us, start.last_block_us) == (0.0, pytest.approx(0.020))
    assert sent.first_block_us == pytest.approx(2.002) and sent.last_block_us == pytest.approx(2.602)
    assert sent.step_us == pytest.approx(2.602 - 0.020)
    assert combine.step_us == pytest.approx(50.0 - 2.602)
    assert summed.last_block_us == pytest.approx(61.3) and summed.step_us == pytest.approx(11.3)
    assert all(r.calls == 5 for r in rows)


def test_phase_times_of_an_empty_clock_and_a_wrong_shape():
    assert phase_times(np.zeros((4, 2, len(PHASES)), dtype=np.int64), PHASES) == []
    with pytest.raises(ValueError, match="clock: expected"):
        phase_times(np.zeros((4, 2, 3), dtype=np.int64), PHASES)
    lines = format_phase_times(phase_times(_clock(2, 2), PHASES)).splitlines()
    assert len(lines) == 5 and lines[2].split() == ["rows", "sent", "2.0", "2.3", "2.3", "2"]
