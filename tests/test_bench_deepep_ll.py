"""tools/bench_deepep.py --mode low-latency: what runs without a GPU or DeepEP (arguments, bytes,
the routing's expected counts, the handle's packing, the probe's one-line reason)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_deepep.py"
_spec = importlib.util.spec_from_file_location("bench_deepep", TOOL)
bench_deepep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_deepep)


def test_mode_defaults_to_normal_with_the_prefill_preset():
    args = bench_deepep.parse_args([])
    assert args.mode == "normal" and args.preset == "prefill" and not args.probe


def test_low_latency_mode_defaults_to_the_decode_preset_and_keeps_an_explicit_one():
    args = bench_deepep.parse_args(["--mode", "low-latency"])
    assert args.mode == "low-latency" and args.preset == "decode"
    args = bench_deepep.parse_args(["--mode", "low-latency", "--preset", "small", "--tokens", "64",
                                    "--probe-timeout", "30", "--json", "rows.json"])
    assert (args.preset, args.tokens, args.probe_timeout, args.json_path) == ("small", 64, 30.0, "rows.json")
    assert bench_deepep.parse_args(["--mode", "low-latency", "--probe"]).probe


def test_unknown_mode_is_rejected(capsys):
    with pytest.raises(SystemExit):
        bench_deepep.parse_args(["--mode", "fast"])
    assert "--mode" in capsys.readouterr().err


def test_probe_flag_is_hidden_from_help():
    out = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--mode" in out.stdout and "low-latency" in out.stdout
    assert "--probe " not in out.stdout and "--probe\n" not in out.stdout


def test_row_bytes_as_deepeps_low_latency_test_counts_them():
    # DeepEP's test: fp8 rows are hidden + hidden / 128 * 4 + 16 bytes, bf16 rows hidden * 2.
    assert bench_deepep.ll_row_bytes(7168, "bf16") == 14336
    assert bench_deepep.ll_row_bytes(7168, "fp8") == 7168 + 56 * 4 + 16 == 7408
    assert bench_deepep.ll_row_bytes(2048, "fp8") == 2048 + 16 * 4 + 16
    with pytest.raises(ValueError):
        bench_deepep.ll_row_bytes(7100, "fp8")
    with pytest.raises(ValueError):
        bench_deepep.ll_row_bytes(7168, "fp4")


def test_stage_bytes_per_rank():
    rows, hidden = 1000, 7168
    assert bench_deepep.ll_stage_bytes("ll_dispatch", "bf16", rows, hidden) == 1000 * 14336
    assert bench_deepep.ll_stage_bytes("ll_dispatch", "fp8", rows, hidden) == 1000 * 7408
    # Combine sends the same rows back in bf16, whatever the dispatch's type.
    assert bench_deepep.ll_stage_bytes("ll_combine", "bf16", rows, hidden) == 1000 * 14336
    assert bench_deepep.ll_stage_bytes("ll_round_trip", "fp8", rows, hidden) == 1000 * (7408 + 14336)
    assert bench_deepep.ll_stage_bytes("ll_round_trip", "bf16", rows, hidden) == 1000 * 2 * 14336
    assert bench_deepep.ll_stage_bytes("ll_dispatch", "fp8", 0, hidden) == 0
    with pytest.raises(ValueError):
        bench_deepep.ll_stage_bytes("dispatch", "bf16", rows, hidden)


def test_local_expert_counts_follow_the_gathered_routing():
    # 2 ranks, 3 tokens each, top-2 of 4 experts: rank 0 holds experts 0-1, rank 1 experts 2-3.
    all_topk_idx = torch.tensor([[[0, 2], [1, 0], [3, -1]],
                                 [[2, 3], [0, 3], [-1, -1]]])
    assert bench_deepep.local_expert_counts(all_topk_idx, 4, 0, 2).tolist() == [3, 1]
    assert bench_deepep.local_expert_counts(all_topk_idx, 4, 1, 2).tolist() == [2, 3]


def test_received_rows_averaged_over_ranks_equal_the_sent_selections():
    # The docstring's claim: the mean over ranks of received (token, expert) rows is the mean of
    # the selections each rank sends, which DeepEP's test counts.
    generator = torch.Generator().manual_seed(0)
    ranks, tokens, experts, topk = 4, 128, 288, 8
    all_topk_idx = torch.stack([torch.rand(tokens, experts, generator=generator).topk(topk, dim=1).indices
                                for _ in range(ranks)])
    received = [int(bench_deepep.local_expert_counts(all_topk_idx, experts, r, ranks).sum()) for r in range(ranks)]
    sent = [int((all_topk_idx[r] != -1).sum()) for r in range(ranks)]
    assert sum(received) == sum(sent) == ranks * tokens * topk


def test_layout_range_unpacks_first_slot_and_count():
    assert bench_deepep.unpack_layout_range((5 << 32) | 7) == (5, 7)
    assert bench_deepep.unpack_layout_range(0) == (0, 0)
    assert bench_deepep.unpack_layout_range((1 << 32) * 300 + 0xFFFFFFFF) == (300, 0xFFFFFFFF)


def test_unsupported_workloads_are_named():
    decode = dict(tokens=128, hidden=7168, topk=8, experts=288)
    assert bench_deepep.ll_unsupported(decode, 2, 1024) is None
    assert "split" in bench_deepep.ll_unsupported(dict(decode, experts=289), 2, 1024)
    reason = bench_deepep.ll_unsupported(dict(decode, tokens=4096), 2, 1024)
    assert "NVSHMEM_QP_DEPTH >= 8194" in reason


def test_probe_reason_prefers_the_probes_own_line_and_adds_a_device_assertion():
    text = ("WARN: init failed for transport: IBGDA\n"
            "Assertion failed: internode_ll.cu:285, condition: ibgda_get_state()->num_rc_per_pe >= num_local_experts\n"
            f"{bench_deepep.PROBE_FAILED} RuntimeError: CUDA error: unspecified launch failure\n")
    reason = bench_deepep.probe_reason(text, 1, 180)
    assert reason.startswith("RuntimeError: CUDA error")
    assert "num_rc_per_pe" in reason and "\n" not in reason


def test_probe_reason_without_its_own_line():
    text = "nvshmem init started\n/src/host/init/init.cu:1001: non-zero status: 7 nvshmem setup connections failed\n"
    assert bench_deepep.probe_reason(text, -6, 180) == (
        "exit code -6: /src/host/init/init.cu:1001: non-zero status: 7 nvshmem setup connections failed")
    assert bench_deepep.probe_reason("", None, 180) == "timed out after 180 s"


def test_error_line_of_a_bare_assert_says_where():
    # (pytest rewrites asserts in this file to carry a message: raise one without.)
    try:
        raise AssertionError()
    except AssertionError as error:
        line = bench_deepep.error_line(error)
    assert line.startswith("AssertionError at test_bench_deepep_ll.py:") and "raise AssertionError()" in line
    assert bench_deepep.error_line(RuntimeError("Failed: Assertion error\nmore")) == \
        "RuntimeError: Failed: Assertion error"
