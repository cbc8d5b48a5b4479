"""tools/bench_deepep.py --mode low-latency: what runs without a GPU or DeepEP (arguments, bytes,
the routing's expected counts, the handle's packing, the probe's one-line reason), and its checks
and rows on CPU ranks against a stand-in for DeepEP's low-latency Buffer (written here from its
documented behaviour: the real one is only exercised on the GPU machine)."""

from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dist import run_ranks

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
    assert bench_deepep.ll_stage_bytes("ll_round_trip(graph)", "bf16", rows, hidden) == 1000 * 2 * 14336
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


def test_deepeps_low_latency_launch_sizes():
    # Decode on an H200 (132 SMs): 288 experts in groups of 3 -> 96 blocks; combine: 128 tokens, one a block.
    assert bench_deepep.ll_blocks(288, 128, 132) == (96, 128)
    assert bench_deepep.ll_blocks(256, 128, 132) == (128, 128)
    assert bench_deepep.ll_blocks(288, 512, 132) == (96, 128)  # 4 tokens a block
    assert bench_deepep.ll_blocks(16, 0, 132) == (16, 16)


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


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


class StandInBuffer:
    """DeepEP's LL dispatch/combine as documented, on CPU over the group: per local expert,
    the source ranks' rows in a random order of ranks and tokens; fp8 with a float scale per 128
    channels (column-major); combine returns each token's weighted sum. ``corrupt`` breaks it."""

    corrupt = ""

    def __init__(self, group, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=0,
                 allow_nvlink_for_low_latency_mode=False, explicitly_destroy=False):
        assert low_latency_mode and explicitly_destroy and num_rdma_bytes > 0 and allow_nvlink_for_low_latency_mode
        self.rank, self.world = group.rank(), group.size()

    @staticmethod
    def get_low_latency_rdma_size_hint(tokens, hidden, ranks, experts):
        return 1 << 20

    def low_latency_dispatch(self, x, topk_idx, max_tokens, experts, use_fp8=True):
        local, hidden = experts // self.world, x.shape[1]
        xs, ids = _gather(x), _gather(topk_idx)
        recv = torch.zeros(local, self.world * max_tokens, hidden, dtype=torch.bfloat16)
        src = torch.zeros(local, self.world * max_tokens, dtype=torch.int32)
        layout = torch.zeros(local, self.world, dtype=torch.int64)
        counts = torch.zeros(local, dtype=torch.int32)
        for e in range(local):
            end = 0
            for r in random.sample(range(self.world), self.world):
                tokens = (ids[r] == self.rank * local + e).any(1).nonzero().flatten()
                tokens = tokens[torch.randperm(len(tokens))]
                layout[e, r] = (end << 32) | len(tokens)
                recv[e, end:end + len(tokens)] = xs[r][tokens]
                src[e, end:end + len(tokens)] = tokens.to(torch.int32)
                end += len(tokens)
            counts[e] = end
        if self.corrupt == "rows":
            recv[:, [0, 1]] = recv[:, [1, 0]]
        handle = (src, layout, max_tokens, hidden, experts)
        if not use_fp8:
            return recv, counts, handle, None, None
        blocks = recv.float().unflatten(-1, (hidden // 128, 128))
        scale = blocks.abs().amax(-1).clamp_min(1e-4) / 448
        values = (blocks / scale.unsqueeze(-1)).flatten(-2).to(torch.float8_e4m3fn)
        scales = torch.empty(local, hidden // 128, self.world * max_tokens).transpose(1, 2)
        scales.copy_(scale * (1.2 if self.corrupt == "scales" else 1.0))
        return (values, scales), counts, handle, None, None

    def low_latency_combine(self, rows, topk_idx, topk_weights, handle):
        src, layout, max_tokens, hidden, experts = handle
        local = experts // self.world
        ids, weights = _gather(topk_idx), _gather(topk_weights)
        partial = torch.zeros(self.world, max_tokens, hidden)
        for e in range(local):
            for r in range(self.world):
                begin, count = int(layout[e, r]) >> 32, int(layout[e, r]) & 0xFFFFFFFF
                tokens = src[e, begin:begin + count].long()
                weight = (weights[r][tokens] * (ids[r][tokens] == self.rank * local + e)).sum(1, keepdim=True)
                partial[r, tokens] += weight * rows[e, begin:begin + count].float()
        return sum(p[self.rank] for p in _gather(partial)).to(torch.bfloat16), None, None

    def destroy(self):
        pass


def _low_latency_rows(rank: int, world: int, corrupt: str, out: dict) -> None:
    StandInBuffer.corrupt = corrupt
    deep_ep = types.SimpleNamespace(Buffer=StandInBuffer, topk_idx_t=torch.int64)
    args = bench_deepep.parse_args(["--mode", "low-latency", "--tokens", "16", "--hidden", "256", "--experts", "8",
                                    "--topk", "3", "--iters", "1", "--warmup", "0"])
    rows = bench_deepep.run_low_latency(args, deep_ep, dist.group.WORLD)
    if rank == 0:
        out.update({(r.stage, r.dtype): r for r in rows})


def _check_rows(rank: int, world: int, corrupt: str) -> None:
    rows: dict = {}
    _low_latency_rows(rank, world, corrupt, rows)
    if rank:
        return
    assert list(rows) == [("ll_dispatch", "bf16"), ("ll_dispatch", "fp8"), ("ll_combine", "bf16"),
                          ("ll_round_trip", "bf16"), ("ll_round_trip", "fp8")]
    failed = {key for key, row in rows.items() if row.check != "ok"}
    expect = {"": set(), "rows": set(rows), "scales": {("ll_dispatch", "fp8"), ("ll_round_trip", "fp8")}}[corrupt]
    assert failed == expect, (corrupt, failed)
    for (stage, dtype), row in rows.items():
        assert row.path == "deepep_ll" and row.ranks == world and row.sms is None and row.us > 0
        # Top-3 of 8 experts, 16 tokens a rank: averaged over ranks each receives 16 * 3 rows.
        assert row.bytes_per_rank == bench_deepep.ll_stage_bytes(stage, dtype, 16 * 3, 256)


@pytest.mark.parametrize("corrupt", ["", "rows", "scales"])
def test_checks_and_rows_against_a_stand_in_on_two_cpu_ranks(corrupt):
    run_ranks(_check_rows, 2, corrupt)
