"""DeepEP v1's intranode kernels on deepcomm.bench's workloads, for a same-run comparison.

    tools/build_deepep.sh /tmp/deepep_site
    PYTHONPATH=/tmp/deepep_site python3 -m deepcomm.launch --standalone --nproc-per-node 2 \
        tools/bench_deepep.py --preset prefill --json deepep_prefill.json

Inputs are drawn exactly as ``python -m deepcomm.bench`` draws them (same seed, x first, then
the routing), timed with its Timer (slowest rank's median), counted with its bytes (received rows
for dispatch, rows sent back for combine) and set against its copy floor, so the two tables compare
row by row. DeepEP is only called through its public Python API; its source is not part of this
repo (tools/build_deepep.sh builds it from the git-ignored .peer/DeepEP).

Each stage is timed once per NVL chunk size of a small sweep and the fastest is reported, as
DeepEP's own test tunes it. "dispatch" is layout + dispatch from top-k ids (what deepcomm's
dispatch does); "dispatch(cached)" reuses the handle (no layout, no host wait for counts): the
mode DeepEP's test times and ../shared/BENCHMARKS.md quotes.

``--mode low-latency`` times DeepEP's low-latency (LL) kernels instead, on the same inputs, with a
build that has NVSHMEM (``DEEPEP_WITH_NVSHMEM=1 tools/build_deepep.sh /tmp/deepep_ll_site``):

    PYTHONPATH=/tmp/deepep_ll_site python3 -m deepcomm.launch --standalone --nproc-per-node 2 \
        tools/bench_deepep.py --mode low-latency --preset decode --json deepep_ll_decode.json

One Buffer in low-latency mode, its RDMA buffer sized by DeepEP's hint for (tokens per rank,
hidden, ranks, experts), NVLink allowed (peers on one host are reached by NVSHMEM's P2P
mapping, no NIC needed). Rows (path "deepep_ll"):
  ll_dispatch   bf16 / fp8  low_latency_dispatch(use_fp8=False / True), no hook, synchronous
  ll_combine    bf16        low_latency_combine of the rows a bf16 dispatch received, passed back
                            unchanged, zero-copy off, the handle reused
  ll_round_trip bf16 / fp8  a dispatch, then combine with its handle: bf16, of the rows it
                            received; fp8, of fixed bf16 rows (an earlier fp8 dispatch's rows,
                            dequantised), as DeepEP's test times it
  ll_round_trip(graph) bf16 the bf16 round trip captured in a CUDA graph and replayed (no host
                            work), as deepcomm.bench times its own; checked after the replays. No
                            dispatch alone: DeepEP flips its Buffer's halves on the host each call
Checked before timing, on every rank: each local expert's received count equals the count the
gathered routing gives; each received row is its source token's row (bf16: bit for bit; fp8:
dequantised, within e4m3 rounding of its scale); combine returns x times the sum of the token's
weights (bf16 dispatch: within bf16 rounding; fp8: relative error under 5%).
Bytes per rank are counted as DeepEP's test_low_latency.py counts them, on the rows a rank
receives: R = its received (token, expert) rows (the sum of its per-expert counts; averaged over
ranks it equals the sent (token, expert) selections DeepEP's test counts). ll_dispatch: R rows of
hidden*2 bytes (bf16) or hidden + 4*hidden/128 + 16 bytes (fp8: values, a float scale per 128
channels, the 16-byte message header); ll_combine: R rows of hidden*2; ll_round_trip: the sum of
its dispatch and combine bytes. No floor column: LL kernels pick their own SM count.
Before timing, each rank starts a short probe in a child process (DeepEP's Buffer, a dispatch
of each kind and a combine): NVSHMEM failing to initialise can abort the process or trap on the
GPU, so when the probe fails the benchmark prints one line with the reason and exits 0, no rows.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from deepcomm import _ext, bench, bench_floor, fp8
from deepcomm.bench_low_latency import captured
from deepcomm.checks import expected_round_trip
from deepcomm.launch import destroy_distributed, init_distributed
from deepcomm.layout import get_dispatch_layout
from deepcomm.topology import Topology

RECV_BUFFER_TOKENS = 256  # NVL ring slots per channel and peer, as in DeepEP's test and defaults
MAX_LOCAL_EXPERTS = 128  # DeepEP's notify kernel handles at most this many experts per rank
MODES = ("normal", "low-latency")
LL_STAGES = ("ll_dispatch", "ll_combine", "ll_round_trip")
PROBE_OK = "deepep-ll-probe: ok"
PROBE_FAILED = "deepep-ll-probe: FAILED:"
PROBE_TEARDOWN_S = 30.0  # after PROBE_OK, how long the probe may take to leave
FP8_MAX_RELATIVE_ERROR = 0.05  # combine of fp8-dispatched rows vs x * sum(weights), as a norm ratio


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(bench.PRESETS), default=None,
                        help="default prefill; decode with --mode low-latency")
    for key in ("tokens", "hidden", "topk", "experts"):
        parser.add_argument(f"--{key}", type=int, help="overrides the preset")
    parser.add_argument("--routing", choices=("uniform",), default="uniform")
    parser.add_argument("--sms", type=int, default=24, help="SMs per rank (even)")
    parser.add_argument("--dispatch-chunks", default="4,8,12,16,20,24,28,32",
                        help="NVL send chunk sizes (tokens) swept for dispatch")
    parser.add_argument("--combine-chunks", default="1,2,4,6,8,10,12,16",
                        help="NVL send chunk sizes (tokens) swept for combine")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", default=None, help="write every row to this file")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--mode", choices=MODES, default="normal",
                        help="normal: DeepEP's intranode kernels; low-latency: its LL kernels (needs an NVSHMEM "
                             "build; --sms and the chunk sweeps do not apply)")
    parser.add_argument("--probe-timeout", type=float, default=180.0,
                        help="low-latency: seconds the start-up probe may take")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # the probe's child process
    args = parser.parse_args(argv)
    if args.preset is None:
        args.preset = "decode" if args.mode == "low-latency" else "prefill"
    return args


def ll_row_bytes(hidden: int, dtype: str) -> int:
    """Bytes of one (token, expert) row as DeepEP's test_low_latency.py counts them: bf16, the
    values; fp8, the values, a float scale per 128 channels and the 16-byte message header."""
    if dtype == "bf16":
        return hidden * 2
    if dtype == "fp8":
        if hidden % 128:
            raise ValueError(f"fp8 low-latency rows need hidden % 128 == 0, not {hidden}")
        return hidden + hidden // 128 * 4 + 16
    raise ValueError(f"unknown dtype {dtype!r} (bf16, fp8)")


def ll_stage_bytes(stage: str, dtype: str, rows: int, hidden: int) -> int:
    """Bytes per rank of one LL stage, given the (token, expert) rows the rank receives (a replay from
    a CUDA graph, ``stage(graph)``, moves the stage's bytes)."""
    stage = stage.removesuffix("(graph)")
    if stage == "ll_dispatch":
        return rows * ll_row_bytes(hidden, dtype)
    if stage == "ll_combine":
        return rows * ll_row_bytes(hidden, "bf16")
    if stage == "ll_round_trip":
        return rows * (ll_row_bytes(hidden, dtype) + ll_row_bytes(hidden, "bf16"))
    raise ValueError(f"unknown stage {stage!r} {LL_STAGES}")


def ll_blocks(experts: int, tokens: int, device_sms: int) -> tuple[int, int]:
    """The blocks, one per SM, that DeepEP v1's low-latency dispatch and combine launch (its
    internode_ll.cu launch sizes at commit 567632d): experts in groups of ceil(E / SMs) per block; the
    combine at least as many blocks again as it takes to give each ceil(T / SMs) of the tokens it reduces."""
    groups = -(-experts // device_sms)
    dispatch = -(-experts // groups)
    tokens_per_block = -(-tokens // device_sms)
    combine = max(dispatch, -(-tokens // tokens_per_block) if tokens_per_block else 1)
    return dispatch, combine


def local_expert_counts(all_topk_idx: torch.Tensor, experts: int, rank: int, world: int) -> torch.Tensor:
    """(token, expert) rows each of ``rank``'s experts receives, from every rank's top-k ids
    (``[ranks, tokens, topk]``, -1 for none)."""
    ids = all_topk_idx.flatten().to(torch.int64)
    counts = torch.bincount(ids[ids >= 0], minlength=experts)
    local = experts // world
    return counts[rank * local:(rank + 1) * local]


def unpack_layout_range(value: int) -> tuple[int, int]:
    """(first slot, count) of one source rank's rows in an LL dispatch handle's layout range."""
    return value >> 32, value & 0xFFFFFFFF


def ll_unsupported(shape: dict, world: int, qp_depth: int) -> str | None:
    """Why DeepEP's LL mode cannot take this workload, for the limits its Python side checks
    (its kernels check more: hidden sizes, top-k; the probe reports those), else None."""
    if shape["experts"] % world:
        return f"{shape['experts']} experts do not split over {world} ranks"
    if qp_depth < (shape["tokens"] + 1) * 2:
        return (f"{shape['tokens']} tokens per rank need NVSHMEM_QP_DEPTH >= {(shape['tokens'] + 1) * 2} "
                f"(it is {qp_depth})")
    return None


def error_line(error: BaseException) -> str:
    """An exception on one line; where it has no message (a bare assert), where it was raised."""
    text = str(error).strip()
    if text:
        return f"{type(error).__name__}: {text.splitlines()[0]}"
    frames = traceback.extract_tb(error.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}: {frames[-1].line}" if frames else ""
    return f"{type(error).__name__}{where}"


def probe_reason(text: str, code: int | None, timeout_s: float) -> str:
    """One line on why the probe failed, from its output and exit code (None: killed at timeout_s)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # A device-side assertion prints its condition before the trap that the host then reports.
    device = next((line[:200] for line in lines if line.startswith("Assertion failed")), "")
    reason = next((line[len(PROBE_FAILED):].strip()[:300] for line in lines if line.startswith(PROBE_FAILED)), "")
    if not reason:
        hits = [line for line in lines
                if re.search(r"error|fail|assert|abort|unable|trap|timeout|exception|terminate", line, re.I)]
        last = hits[-1] if hits else lines[-1] if lines else ""
        reason = f"timed out after {timeout_s:.0f} s" if code is None else f"exit code {code}"
        if last:
            reason += f": {last[:300]}"
    if device and device not in reason:
        reason += f"; {device}"
    return reason


def sweep_note(chunk: int, chunks: list[int]) -> str:
    return f"NVL chunk {chunk} (best of {','.join(map(str, chunks))}), {RECV_BUFFER_TOKENS}-token ring"


def run(args: argparse.Namespace, deep_ep, group) -> list[bench.Row]:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device())
    shape = bench.workload(args, on_cuda=True)
    tokens, hidden, experts = shape["tokens"], shape["hidden"], shape["experts"]
    topo = Topology(rank=rank, world_size=world, ranks_per_node=world)
    # The same draws as deepcomm.bench.run, in the same order: the same tokens and routing.
    generator = torch.Generator().manual_seed(args.seed * 1000 + rank)
    x = torch.randn(tokens, hidden, generator=generator).to(device, torch.bfloat16)
    topk_idx, topk_weights = bench.make_routing(args, shape, topo, generator, device)
    ep_topk_idx = topk_idx.to(deep_ep.topk_idx_t)
    q, scales = fp8.quantize_fp8(x)
    ours = get_dispatch_layout(topk_idx, experts, topo)
    # tokens_to_rank[s, d]: rows rank s sends rank d; a rank receives its column.
    tokens_to_rank = bench.gather_host(ours.num_tokens_per_rank.to(torch.int64).cpu())
    expected_recv = int(tokens_to_rank[:, rank].sum())
    kept_rows = bench_floor.rows_kept_local(tokens_to_rank, topo, hierarchical=False)
    own_gpu = world > 1 and bench_floor.ranks_have_own_gpu(world)

    dispatch_chunks = [int(c) for c in args.dispatch_chunks.split(",")]
    combine_chunks = [int(c) for c in args.combine_chunks.split(",")]
    deep_ep.Buffer.set_num_sms(args.sms)
    configs = {c: deep_ep.Config(args.sms, c, RECV_BUFFER_TOKENS) for c in set(dispatch_chunks + combine_chunks)}
    nvl_bytes = max(cfg.get_nvl_buffer_size_hint(hidden * 2, world) for cfg in configs.values())
    buffer = deep_ep.Buffer(group, nvl_bytes, 0, explicitly_destroy=True)
    timer = bench.Timer(device, args.warmup, args.iters)
    device_name = torch.cuda.get_device_name(device)

    def floor_us(nbytes: int, row_bytes: int) -> float | None:
        """deepcomm.bench's floor for the same bytes: NVLink stores of the rows bound for other GPUs
        when ranks have a GPU each, else a local copy of all of them; same SMs."""
        if not _ext.available():
            return None
        if own_gpu:
            return bench_floor.peer_copy_floor_us(timer, nbytes - kept_rows * row_bytes, args.sms, device)
        return bench_floor.copy_floor_us(timer, nbytes, args.sms, device)

    def row(dtype, stage, us, nbytes, floor, check, note) -> bench.Row:
        nbytes = int(bench.mean_over_ranks(nbytes))
        gbps = nbytes / (us * 1e-6) / 1e9 if nbytes else None
        return bench.Row(device_name, "deepep", dtype, stage, tokens, hidden, shape["topk"], experts, world,
                         world, args.sms, us, gbps, nbytes, floor, check, note)

    def best(chunks, call):
        """(µs, chunk) of the fastest NVL chunk size; the same on every rank (Timer reduces over ranks)."""
        return min((timer(partial(call, configs[c])), c) for c in chunks)

    def layout():
        return buffer.get_dispatch_layout(ep_topk_idx, experts)

    def full_dispatch(payload, cfg):
        per_rank, _, per_expert, in_rank, _ = layout()
        return buffer.dispatch(payload, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                               num_tokens_per_expert=per_expert, topk_idx=ep_topk_idx,
                               topk_weights=topk_weights, config=cfg)

    def cached_dispatch(payload, handle, cfg):
        return buffer.dispatch(payload, handle=handle, config=cfg)

    def combine(recv_x, handle, cfg):
        return buffer.combine(recv_x, handle, config=cfg)

    per_rank, _, _, in_rank, _ = layout()
    layout_ok = (torch.equal(per_rank.cpu().to(torch.int64), ours.num_tokens_per_rank.cpu().to(torch.int64))
                 and torch.equal(in_rank.cpu(), ours.is_token_in_rank.cpu()))
    rows = [row("-", "layout", timer(layout), 0, None, bench.all_ok(layout_ok), "counts and mask equal ours")]

    first = configs[dispatch_chunks[0]]
    recv_bf16, _, _, _, handle, _ = full_dispatch(x, first)
    for dtype, payload in (("bf16", x), ("fp8", (q, scales))):
        recv, _, _, _, _, _ = full_dispatch(payload, first)
        if dtype == "bf16":
            ok, num_recv, row_bytes = recv.shape[0] == expected_recv, recv.shape[0], hidden * 2
        else:
            # Rows arrive in the same order either way, and quantising is per row: bit-exact.
            ref_q, ref_scales = fp8.quantize_fp8(recv_bf16)
            num_recv, row_bytes = recv[0].shape[0], hidden + scales.shape[1] * 4
            ok = (num_recv == expected_recv and torch.equal(recv[1], ref_scales)
                  and torch.equal(recv[0].view(torch.uint8), ref_q.view(torch.uint8)))
        check, nbytes = bench.all_ok(ok), num_recv * row_bytes
        floor = floor_us(nbytes, row_bytes)
        us, chunk = best(dispatch_chunks, partial(full_dispatch, payload))
        rows.append(row(dtype, "dispatch", us, nbytes, floor, check, sweep_note(chunk, dispatch_chunks)))
        us, chunk = best(dispatch_chunks, partial(cached_dispatch, payload, handle))
        rows.append(row(dtype, "dispatch(cached)", us, nbytes, floor, check,
                        sweep_note(chunk, dispatch_chunks) + ", handle reused"))

    # DeepEP's combine sums the returned copies unweighted: bf16(x * ranks the token went to).
    combined, _, _ = combine(recv_bf16, handle, configs[combine_chunks[0]])
    expected = expected_round_trip(x, topk_idx, experts, topo)
    check = bench.all_ok(torch.allclose(combined.float(), expected.float(), rtol=1e-2, atol=1e-2))
    us, chunk = best(combine_chunks, partial(combine, recv_bf16, handle))
    nbytes = recv_bf16.shape[0] * hidden * 2
    rows.append(row("bf16", "combine", us, nbytes, floor_us(nbytes, hidden * 2), check,
                    sweep_note(chunk, combine_chunks)))
    torch.cuda.synchronize()
    dist.barrier()
    buffer.destroy()
    return rows


def draw_inputs(args: argparse.Namespace, shape: dict, topo: Topology, device: torch.device):
    """x, top-k ids and weights: the same draws as deepcomm.bench.run, in the same order."""
    generator = torch.Generator().manual_seed(args.seed * 1000 + topo.rank)
    x = torch.randn(shape["tokens"], shape["hidden"], generator=generator).to(device, torch.bfloat16)
    topk_idx, topk_weights = bench.make_routing(args, shape, topo, generator, device)
    return x, topk_idx, topk_weights


def make_ll_buffer(deep_ep, group, shape: dict, world: int):
    """DeepEP's Buffer in low-latency mode, sized by its hint; (buffer, RDMA bytes)."""
    tokens, hidden, experts = shape["tokens"], shape["hidden"], shape["experts"]
    num_rdma_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(tokens, hidden, world, experts)
    buffer = deep_ep.Buffer(group, num_nvl_bytes=0, num_rdma_bytes=num_rdma_bytes, low_latency_mode=True,
                            num_qps_per_rank=experts // world, allow_nvlink_for_low_latency_mode=True,
                            explicitly_destroy=True)
    return buffer, num_rdma_bytes


def run_low_latency(args: argparse.Namespace, deep_ep, group) -> list[bench.Row]:
    rank, world = dist.get_rank(), dist.get_world_size()
    on_cuda = torch.cuda.is_available()  # always, but for a check of this function with a stand-in
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    shape = bench.workload(args, on_cuda=True)
    tokens, hidden, experts = shape["tokens"], shape["hidden"], shape["experts"]
    local = experts // world
    topo = Topology(rank=rank, world_size=world, ranks_per_node=world)
    x, topk_idx, topk_weights = draw_inputs(args, shape, topo, device)
    ep_topk_idx = topk_idx.to(deep_ep.topk_idx_t).contiguous()
    weights = topk_weights.to(torch.float32).contiguous()
    buffer, num_rdma_bytes = make_ll_buffer(deep_ep, group, shape, world)
    timer = bench.Timer(device, args.warmup, args.iters)
    device_name = torch.cuda.get_device_name(device) if on_cuda else "cpu"
    # The SMs column: DeepEP's launch sizes (deepcomm's rows use 24); a round trip holds the larger.
    blocks = ll_blocks(experts, tokens, torch.cuda.get_device_properties(device).multi_processor_count) \
        if on_cuda else None
    stage_sms = {"ll_dispatch": blocks[0], "ll_combine": blocks[1]} if blocks else {}

    # What every rank sends, to check what arrives here.
    all_topk_idx = bench.gather_host(topk_idx.to(torch.int64).cpu())  # [ranks, tokens, topk]
    all_x = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(all_x, x.contiguous())
    all_x = torch.stack(all_x)  # [ranks, tokens, hidden]
    want_counts = local_expert_counts(all_topk_idx, experts, rank, world)
    recv_rows = int(want_counts.sum())
    expected = x.float() * weights.sum(dim=1, keepdim=True)  # every top-k id is valid here

    def dispatch(use_fp8: bool):
        return buffer.low_latency_dispatch(x, ep_topk_idx, tokens, experts, use_fp8=use_fp8)

    def combine(rows: torch.Tensor, handle) -> torch.Tensor:
        return buffer.low_latency_combine(rows, ep_topk_idx, weights, handle)[0]

    def round_trip(use_fp8: bool, fixed_rows: torch.Tensor | None):
        recv, _, handle, _, _ = dispatch(use_fp8)
        return combine(recv if fixed_rows is None else fixed_rows, handle)

    def dequantise(recv) -> torch.Tensor:
        values, scales = recv  # [local, slots, hidden] e4m3, [local, slots, hidden / 128] float
        return (values.float() * scales.repeat_interleave(128, dim=-1)).to(torch.bfloat16)

    def dispatch_ok(recv, counts: torch.Tensor, handle, use_fp8: bool) -> bool:
        """Counts as the routing gives; each received row is its source token's row."""
        if not torch.equal(counts.cpu().to(torch.int64), want_counts):
            return False
        src_info, layout_range = handle[0].cpu(), handle[1].cpu()
        expert_at, slot_at, rank_at, token_at = [], [], [], []
        for e in range(local):
            ranges = sorted((*unpack_layout_range(int(layout_range[e, r])), r) for r in range(world))
            end = 0
            for begin, count, r in ranges:
                if begin != end:  # the source ranks' ranges tile the expert's received rows
                    return False
                end = begin + count
                tokens_in = src_info[e, begin:end].to(torch.int64)
                routed = (all_topk_idx[r] == rank * local + e).any(dim=1).nonzero().flatten()
                if not torch.equal(tokens_in.sort().values, routed):
                    return False
                expert_at.append(torch.full((count,), e))
                slot_at.append(torch.arange(begin, end))
                rank_at.append(torch.full((count,), r))
                token_at.append(tokens_in)
            if end != int(want_counts[e]):
                return False
        expert_at, slot_at, rank_at, token_at = (torch.cat(t).to(device) for t in (expert_at, slot_at, rank_at, token_at))
        source = all_x[rank_at, token_at]
        if not use_fp8:
            return torch.equal(recv[expert_at, slot_at], source)
        values, scales = recv
        scale = scales[expert_at, slot_at].repeat_interleave(128, dim=-1)
        got = values[expert_at, slot_at].float() * scale
        # e4m3 keeps 3 mantissa bits: half an ulp is at most 1/16 of the value; subnormals step by scale * 2^-9.
        bound = source.float().abs() * (1 / 16 + 1e-3) + scale * 2.0 ** -8
        return bool(((got - source.float()).abs() <= bound).all())

    def combine_ok(combined: torch.Tensor, use_fp8: bool) -> bool:
        if combined.shape != expected.shape or bool(combined.isnan().any()):
            return False
        if not use_fp8:
            return torch.allclose(combined.float(), expected, rtol=1e-2, atol=1e-2)
        error = (combined.float() - expected).norm() / expected.norm().clamp_min(1e-12)
        return float(error) < FP8_MAX_RELATIVE_ERROR

    def row(dtype: str, stage: str, us: float, check: str, note: str) -> bench.Row:
        nbytes = int(bench.mean_over_ranks(ll_stage_bytes(stage, dtype, recv_rows, hidden)))
        gbps = nbytes / (us * 1e-6) / 1e9 if nbytes and us > 0 else None
        sms = stage_sms.get(stage, max(blocks)) if blocks else None
        return bench.Row(device_name, "deepep_ll", dtype, stage, tokens, hidden, shape["topk"], experts, world,
                         world, sms, us, gbps, nbytes, None, check, note)

    buffer_note = f"NVLink P2P, {num_rdma_bytes / 2**20:.0f} MiB LL buffer"
    rows: list[bench.Row] = []
    received = {}
    for dtype, use_fp8 in (("bf16", False), ("fp8", True)):
        recv, counts, handle, _, _ = dispatch(use_fp8)
        check = bench.all_ok(dispatch_ok(recv, counts, handle, use_fp8))
        received[dtype] = (recv, handle)
        rows.append(row(dtype, "ll_dispatch", timer(partial(dispatch, use_fp8)), check, buffer_note))

    recv_bf16, handle_bf16 = received["bf16"]
    check = bench.all_ok(combine_ok(combine(recv_bf16, handle_bf16), use_fp8=False))
    rows.append(row("bf16", "ll_combine", timer(partial(combine, recv_bf16, handle_bf16)), check,
                    "rows of a bf16 dispatch passed back, handle reused, zero-copy off"))

    check = bench.all_ok(combine_ok(round_trip(False, None), use_fp8=False))
    rows.append(row("bf16", "ll_round_trip", timer(partial(round_trip, False, None)), check,
                    "dispatch, combine of the rows it received"))
    recv_fp8, handle_fp8 = received["fp8"]
    fixed_rows = dequantise(recv_fp8)  # the dispatch's own rows, dequantised: the combine check
    check = bench.all_ok(combine_ok(combine(fixed_rows, handle_fp8), use_fp8=True))
    rows.append(row("fp8", "ll_round_trip", timer(partial(round_trip, True, fixed_rows)), check,
                    "fp8 dispatch, combine of fixed bf16 rows (as DeepEP's test)"))
    def graph_row() -> bench.Row:
        """The round trip replayed from a CUDA graph, no host work (deepcomm.bench has this row too). Only
        whole round trips: each call flips the Buffer's two halves on the host, so a graph of a dispatch
        alone would replay into the half it never cleans for itself (stale counts, no real wait)."""
        replay, graph_y = captured(partial(round_trip, False, None))
        us = timer(replay)  # the output holds data once replayed, not after the capture
        return row("bf16", "ll_round_trip(graph)", us, bench.all_ok(combine_ok(graph_y, use_fp8=False)),
                   "CUDA graph replay of dispatch + combine")

    if on_cuda:
        try:
            rows.append(graph_row())
        except RuntimeError as error:  # a build whose calls cannot be captured: the eager rows still stand
            print(f"deepep_ll: no CUDA graph row: {error_line(error)}", flush=True)
    del received, recv_bf16, handle_bf16, recv_fp8, handle_fp8
    if on_cuda:
        torch.cuda.synchronize()
    dist.barrier()
    buffer.destroy()
    return rows


def run_probe(args: argparse.Namespace, deep_ep) -> None:
    """The probe's child process: DeepEP's LL Buffer, one dispatch of each kind and a combine.
    Prints PROBE_OK, or PROBE_FAILED and the error, before any teardown (which can hang once
    NVSHMEM or the GPU failed: then it leaves at once, and the parent ends the peers)."""
    init_distributed(min(args.timeout, args.probe_timeout))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", torch.cuda.current_device())
        shape = bench.workload(args, on_cuda=True)
        topo = Topology(rank=rank, world_size=world, ranks_per_node=world)
        x, topk_idx, topk_weights = draw_inputs(args, shape, topo, device)
        topk_idx = topk_idx.to(deep_ep.topk_idx_t).contiguous()
        buffer, _ = make_ll_buffer(deep_ep, dist.group.WORLD, shape, world)
        buffer.low_latency_dispatch(x, topk_idx, shape["tokens"], shape["experts"], use_fp8=True)
        recv, _, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, shape["tokens"], shape["experts"],
                                                            use_fp8=False)
        buffer.low_latency_combine(recv, topk_idx, topk_weights.float().contiguous(), handle)
        torch.cuda.synchronize()
        dist.barrier()
    except Exception as error:  # noqa: BLE001 - the parent reads this line as the reason
        print(f"{PROBE_FAILED} {error_line(error)}", flush=True)
        os._exit(1)
    print(PROBE_OK, flush=True)
    buffer.destroy()
    destroy_distributed()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def probe_low_latency(args: argparse.Namespace, argv: list[str]) -> str | None:
    """Start DeepEP's LL mode in a child process of every rank, joined by a group of their own:
    None when it works on every rank, else one line saying why (the same on every rank)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    port = [free_port() if rank == 0 else 0]
    dist.broadcast_object_list(port, src=0)
    # The children's group is their own: torchrun's agent store is not theirs to join.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
    repo = str(Path(__file__).resolve().parent.parent)
    env.update(MASTER_PORT=str(port[0]), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")])))
    log = Path(tempfile.gettempdir()) / f"deepep_ll_probe_rank{rank}.log"
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--probe"]
    with open(log, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    start, ok_at = time.monotonic(), None
    while child.poll() is None and time.monotonic() - start < args.probe_timeout:
        time.sleep(0.5)
        if ok_at is None and PROBE_OK in log.read_text(errors="replace"):
            ok_at = time.monotonic()
        if ok_at is not None and time.monotonic() - ok_at > PROBE_TEARDOWN_S:
            break  # it worked; its teardown hangs
    code = child.poll()
    if code is None:
        os.killpg(child.pid, signal.SIGKILL)  # its own session: the child and what it started
        child.wait()
    text = log.read_text(errors="replace")
    reason = None if PROBE_OK in text else f"{probe_reason(text, code, args.probe_timeout)} (log: {log})"
    reasons: list[str | None] = [None] * world
    dist.all_gather_object(reasons, reason)
    failed = [(r, why) for r, why in enumerate(reasons) if why]
    return f"rank {failed[0][0]}: {failed[0][1]}" if failed else None


def build_info(deep_ep) -> str:
    """What tools/build_deepep.sh recorded about an NVSHMEM build, on one line ('' if nothing)."""
    path = Path(deep_ep.__file__).resolve().parent.parent / "deepep_build_info.txt"
    try:
        return " ".join(line.strip() for line in path.read_text().splitlines()
                        if line.strip() and not line.startswith("nvshmem_home="))
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        import deep_ep
    except ImportError as error:
        if rank0:
            print(f"deepep: not installed (tools/build_deepep.sh)\n  import deep_ep: {error}")
        return
    if "RANK" not in os.environ or not torch.cuda.is_available():
        raise SystemExit("deepep: needs GPUs and torchrun: python3 -m deepcomm.launch --standalone "
                         "--nproc-per-node N tools/bench_deepep.py")
    if args.probe:
        try:
            run_probe(args, deep_ep)
        except Exception as error:  # noqa: BLE001 - init_distributed's: the parent reads this line
            print(f"{PROBE_FAILED} {error_line(error)}", flush=True)
            raise SystemExit(1)
        return
    low_latency = args.mode == "low-latency"
    group = init_distributed(args.timeout)
    try:
        world, shape = dist.get_world_size(), bench.workload(args, on_cuda=True)
        experts = shape["experts"]
        if low_latency:
            # DeepEP's Buffer leaves NVSHMEM_QP_DEPTH as set, else makes it 1024.
            reason = ll_unsupported(shape, world, int(os.environ.get("NVSHMEM_QP_DEPTH", "1024")))
            if reason:
                if rank0:
                    print(f"deepep bench: mode=low-latency skipped: {reason}")
                return
            reason = probe_low_latency(args, argv)
            if reason:
                if rank0:
                    print(f"deepep bench: mode=low-latency skipped: DeepEP's low-latency mode did not start: {reason}")
                return
            rows = run_low_latency(args, deep_ep, group)
        else:
            if experts // world > MAX_LOCAL_EXPERTS:
                if rank0:
                    print(f"deepep bench: skipped: {experts // world} experts per rank; DeepEP's normal "
                          f"(intranode) mode takes at most {MAX_LOCAL_EXPERTS}")
                return
            rows = run(args, deep_ep, group)
    finally:
        destroy_distributed()
    if rank0:
        r = rows[0]
        mode = f"mode=low-latency {build_info(deep_ep)} ".replace("  ", " ") if low_latency else ""
        print(f"deepep bench: {mode}device={r.device} ranks={r.ranks} tokens/rank={r.tokens} hidden={r.hidden} "
              f"topk={r.topk} experts={r.experts} routing={args.routing} iters={args.iters} (median, slowest rank)")
        print(bench.format_table(rows))
        if args.json_path:
            with open(args.json_path, "w") as f:
                json.dump([asdict(r) for r in rows], f, indent=1)
            print(f"rows written to {args.json_path}")
    failed = [f"{r.stage}/{r.dtype}" for r in rows if r.check != "ok"]
    if failed:
        raise SystemExit(f"deepep: correctness check failed: {failed}")


if __name__ == "__main__":
    main()
