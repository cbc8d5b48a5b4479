"""The low-latency rows of ``python -m deepcomm.bench --mode low-latency``.

Stages, each on the kernels (path ``low_latency``) and on the reference path:
``ll_dispatch`` (bf16 rows, or ``fp8``: bf16 quantised on the way, as DeepEP's
low-latency mode does), ``ll_round_trip`` (a dispatch, then the received bf16
rows pulled back and reduced, weighted) and ``ll_combine``: the round trip less
the dispatch (a dispatch is combined once, so combine alone is not repeated);
``ll_round_trip(owners)``: the weights sent with the dispatch, so that the
combine sums at the owners and adds their partials; on the kernels also the
dispatch and both round trips replayed from a CUDA graph. Bytes are counted as DeepEP's
low-latency test counts them: received (token, expert) rows times their bytes
for dispatch, the same rows in bf16 for combine.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from deepcomm import _ext
from deepcomm.bench_floor import copy_floor_us, peer_copy_floor_us
from deepcomm.communicator import Communicator
from deepcomm.low_latency import LowLatencyConfig
from deepcomm.reference_low_latency import sum_by_owner, weighted_sum_in_k_order


def distinct_pairs(topk_idx: torch.Tensor, first_expert: int = 0, num_experts: int | None = None) -> int:
    """(token, expert) rows a routing sends, a token naming an expert twice counted once; only experts in
    ``[first_expert, first_expert + num_experts)`` when given."""
    idx = topk_idx.cpu()
    last = idx.max().item() + 1 if num_experts is None else first_expert + num_experts
    keep = (idx >= first_expert) & (idx < last)
    rows = torch.arange(idx.shape[0]).unsqueeze(1).expand_as(idx)[keep]
    return int(torch.unique(rows * (last + 1) + idx[keep]).numel())


def round_trip_expected(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Combine of the received rows themselves: per token, its weights times x in k order (bf16)."""
    num_tokens, num_topk = topk_idx.shape
    values = x.unsqueeze(1).expand(num_tokens, num_topk, x.shape[1])
    return weighted_sum_in_k_order(values, topk_weights, topk_idx >= 0).to(torch.bfloat16)


def round_trip_by_owner_expected(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                                 num_experts: int, world_size: int) -> torch.Tensor:
    """The same when the dispatch carried the weights: summed per owner rank, then over the owners (bf16)."""
    num_tokens, num_topk = topk_idx.shape
    values = x.unsqueeze(1).expand(num_tokens, num_topk, x.shape[1])
    owners = torch.where(topk_idx >= 0, topk_idx // (num_experts // world_size), -1)
    return sum_by_owner(values, topk_weights, owners, world_size)


def captured(fn: Callable[[], object]) -> tuple[Callable[[], None], object]:
    """One call of ``fn`` captured in a CUDA graph (after a warm-up call on a side stream, as torch asks):
    ``(replay, outputs)``, the outputs rewritten by each replay. Collective: every rank captures together."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph.replay, outputs


def _noting(row: Callable, path: str, words: str) -> Callable:
    """row, with words added to the note of every row of path."""
    def noted(row_path, *fields, **named):
        made = row(row_path, *fields, **named)
        if row_path == path:
            made.note = f"{made.note}; {words}" if made.note else words
        return made
    return noted


def low_latency_rows(args, shape: dict, topo, x, topk_idx, topk_weights, timer: Callable, row: Callable,
                     device: torch.device, own_gpu: bool, sms_values: list[int], all_ok: Callable,
                     mean_over_ranks: Callable) -> list:
    config = LowLatencyConfig(shape["tokens"], shape["hidden"], shape["experts"], shape["topk"],
                              early_launch=not args.plain_launch)
    experts = shape["experts"]
    local = experts // topo.world_size
    paths = {"reference": Communicator(backend="reference", low_latency=config)}
    if device.type == "cuda" and _ext.available():
        paths["low_latency"] = Communicator(num_sms=sms_values[0], low_latency=config, timeout_s=args.timeout)
        launched = "early" if paths["low_latency"]._low_latency.early_launch else "plainly"
        row = _noting(row, "low_latency", f"kernels launched {launched}")
    # Rows this rank keeps (its tokens to its own experts): on GPUs of their own, the floor is the rest.
    kept = distinct_pairs(topk_idx, topo.rank * local, local)
    expected = round_trip_expected(x, topk_idx, topk_weights)
    world = dist.get_world_size()
    expected_by_owner = round_trip_by_owner_expected(x, topk_idx, topk_weights, experts, world)
    owner_pairs = distinct_pairs(topk_idx // local)  # (token, owner rank) partials of this rank's tokens
    sent = round(mean_over_ranks(distinct_pairs(topk_idx)) * world)

    def every_row_arrived(result) -> str:
        """Every row sent arrives somewhere: the totals over ranks agree (a collective)."""
        return all_ok(round(mean_over_ranks(int(result.num_tokens_per_expert.sum())) * world) == sent)

    rows = []
    for path, comm in paths.items():
        for sms in sms_values if path == "low_latency" else [None]:
            floor_sms = sms or sms_values[0]

            def floor(nbytes: int, row_bytes: int) -> float | None:
                if device.type != "cuda":
                    return None
                if own_gpu:
                    return peer_copy_floor_us(timer, nbytes - kept * row_bytes, floor_sms, device)
                return copy_floor_us(timer, nbytes, floor_sms, device)

            dispatch_us = {}
            for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
                def dispatch():
                    return comm.low_latency_dispatch(x, topk_idx, experts, quantize_fp8=dtype == "fp8", num_sms=sms)

                result = dispatch()
                row_bytes = 2 * shape["hidden"] if dtype == "bf16" else shape["hidden"] + shape["hidden"] // 32
                check = every_row_arrived(result)
                nbytes = int(result.num_tokens_per_expert.sum()) * row_bytes
                dispatch_us[dtype] = timer(dispatch)
                rows.append(row(path, dtype, "ll_dispatch", sms, dispatch_us[dtype], int(mean_over_ranks(nbytes)),
                                floor(nbytes, row_bytes), check, "no host wait" if path == "low_latency" else ""))

                # The dispatch of a combine at the owners: the receive also stages each row's weights.
                def dispatch_with_weights():
                    return comm.low_latency_dispatch(x, topk_idx, experts, quantize_fp8=dtype == "fp8", num_sms=sms,
                                                     topk_weights=topk_weights)

                check = every_row_arrived(dispatch_with_weights())
                rows.append(row(path, dtype, "ll_dispatch(weights)", sms, timer(dispatch_with_weights),
                                int(mean_over_ranks(nbytes)), floor(nbytes, row_bytes), check,
                                "weights sent, for the combine at the owners"))

            def round_trip():
                out = comm.low_latency_dispatch(x, topk_idx, experts, num_sms=sms)
                # On the kernels the received rows are combine's input in place (the experts' outputs would be).
                back = out.x if path == "low_latency" else comm.low_latency_combine_input(out.handle).copy_(out.x)
                return comm.low_latency_combine(back, topk_weights, out.handle, num_sms=sms), out

            combined, result = round_trip()
            check = all_ok(torch.equal(combined, expected))
            nbytes = int(result.num_tokens_per_expert.sum()) * 2 * shape["hidden"]
            round_trip_us = timer(round_trip)
            # A dispatch is combined once (a peer may still read the outputs of the first combine), so combine
            # alone is not timed back to back: it is the round trip less the dispatch, in the same run (two
            # medians, each the slowest rank's: where the combine is shorter than their noise, the difference
            # says nothing, and the row says so).
            if "bf16" in dispatch_us:
                combine_us = round_trip_us - dispatch_us["bf16"]
                note = ("weighted; round trip - dispatch" if combine_us > 0 else
                        "weighted; round trip - dispatch, below 0: within the noise of the two timings, not a time")
                rows.append(row(path, "bf16", "ll_combine", sms, combine_us, int(mean_over_ranks(nbytes)),
                                floor(nbytes, 2 * shape["hidden"]), check, note))
            rows.append(row(path, "bf16", "ll_round_trip", sms, round_trip_us, int(mean_over_ranks(2 * nbytes)),
                            None, check))

            def round_trip_by_owner():
                out = comm.low_latency_dispatch(x, topk_idx, experts, num_sms=sms, topk_weights=topk_weights)
                back = out.x if path == "low_latency" else comm.low_latency_combine_input(out.handle).copy_(out.x)
                return comm.low_latency_combine(back, None, out.handle, num_sms=sms), out

            check = all_ok(torch.equal(round_trip_by_owner()[0], expected_by_owner))
            # Its combine moves one row per (token, owner rank), not one per (token, expert).
            owner_bytes = nbytes + owner_pairs * 2 * shape["hidden"]
            rows.append(row(path, "bf16", "ll_round_trip(owners)", sms, timer(round_trip_by_owner),
                            int(mean_over_ranks(owner_bytes)), None, check, "weights sent with the dispatch"))
            if path == "low_latency":  # as decode runs in serving engines: no host work per call
                replay, graph_out = captured(lambda: comm.low_latency_dispatch(x, topk_idx, experts, num_sms=sms))
                us = timer(replay)
                check = every_row_arrived(graph_out)
                rows.append(row(path, "bf16", "ll_dispatch(graph)", sms, us, int(mean_over_ranks(nbytes)),
                                floor(nbytes, 2 * shape["hidden"]), check, "CUDA graph replay"))
                replay, (graph_y, _) = captured(round_trip)
                us = timer(replay)
                rows.append(row(path, "bf16", "ll_round_trip(graph)", sms, us, int(mean_over_ranks(2 * nbytes)),
                                None, all_ok(torch.equal(graph_y, expected)), "CUDA graph replay"))
                replay, (graph_y, _) = captured(round_trip_by_owner)
                us = timer(replay)
                rows.append(row(path, "bf16", "ll_round_trip(owners,graph)", sms, us, int(mean_over_ranks(owner_bytes)),
                                None, all_ok(torch.equal(graph_y, expected_by_owner)),
                                "CUDA graph replay, weights sent with the dispatch"))
    for comm in paths.values():
        comm.close()
    return rows

