"""The two-micro-batch scheduler: issue order, outputs and gradients equal to the plain run."""

from __future__ import annotations

import pytest
import torch

from deepcomm import overlap
from deepcomm.overlap import COMM, COMPUTE, OverlapScheduler, Stage, interleaved_order, split_sizes

BLOCK_KINDS = [COMPUTE, COMM, COMPUTE, COMM, COMPUTE]  # attention, dispatch, experts, combine, finish


def test_interleaved_order_hides_each_communication_under_the_other_micro_batch():
    names = "attention dispatch experts combine finish".split()
    order = [f"{names[s]} {'AB'[m]}" for m, s in interleaved_order(BLOCK_KINDS)]
    assert order == ["attention A", "attention B", "dispatch A", "experts A", "dispatch B", "experts B",
                     "combine A", "finish A", "combine B", "finish B"]


def test_interleaved_order_keeps_each_micro_batch_in_stage_order_for_any_count():
    kinds = [COMPUTE, COMM, COMM, COMPUTE, COMM, COMPUTE, COMPUTE]
    for count in (1, 2, 3):
        order = interleaved_order(kinds, count)
        assert sorted(order) == [(m, s) for m in range(count) for s in range(len(kinds))]
        for m in range(count):
            assert [s for mb, s in order if mb == m] == list(range(len(kinds)))
    assert interleaved_order(kinds, 1) == [(0, s) for s in range(len(kinds))]
    with pytest.raises(ValueError, match="num_micro_batches"):
        interleaved_order(kinds, 0)


def test_stacked_layers_overlap_across_the_layer_boundary():
    order = interleaved_order(BLOCK_KINDS * 2)
    # B's combine of layer 0 (stage 3) runs under A's attention of layer 1 (stage 5), issued before B's finish.
    assert order.index((0, 4)) < order.index((1, 3)) < order.index((0, 5)) < order.index((1, 4))


def test_split_sizes_are_even_then_larger_first():
    assert split_sizes(5) == [3, 2]
    assert split_sizes(1) == [1, 0]
    assert split_sizes(0) == [0, 0]
    assert split_sizes(7, 3) == [3, 2, 2]


def test_moe_block_order_puts_both_shared_expert_stages_under_the_last_combine():
    kinds = [COMPUTE, COMM, COMPUTE, COMM, COMPUTE, COMPUTE]  # overlap.block_stages
    names = "attention dispatch experts combine shared finish".split()
    order = [f"{names[s]} {'AB'[m]}" for m, s in interleaved_order(kinds)]
    assert order == ["attention A", "attention B", "dispatch A", "experts A", "dispatch B", "experts B",
                     "combine A", "shared A", "combine B", "finish A", "shared B", "finish B"]


def test_stage_kind_is_checked():
    with pytest.raises(ValueError, match="kind"):
        Stage(0, "x", "io", lambda state: None)
    with pytest.raises(ValueError, match="waits_for_comm"):
        Stage(0, "x", COMM, lambda state: None, waits_for_comm=False)
    with pytest.raises(ValueError, match="stages"):
        OverlapScheduler([])


def test_bad_arguments_name_themselves():
    run = lambda state: None  # noqa: E731
    cases = [
        (lambda: Stage("a", "x", COMPUTE, run), ValueError, "layer: expected an int >= 0"),
        (lambda: Stage(0, "", COMPUTE, run), ValueError, "name: expected a non-empty str"),
        (lambda: Stage(0, "x", COMPUTE, None), TypeError, "run: expected a callable"),
        (lambda: split_sizes(5, 0), ValueError, "num_micro_batches: expected an int >= 1"),
        (lambda: split_sizes(-3), ValueError, "batch: expected an int >= 0"),
        (lambda: OverlapScheduler([Stage(0, "x", COMPUTE, run)], num_micro_batches=2.0), ValueError,
         "num_micro_batches: expected an int >= 1"),
        (lambda: OverlapScheduler([Stage(0, "x", COMPUTE, run)], compute_sms=-3), ValueError,
         "compute_sms: expected an int >= 1"),
        (lambda: OverlapScheduler([Stage(0, "x", COMPUTE, run)], compute_sms="all"), ValueError,
         "compute_sms: expected an int >= 1"),
        (lambda: OverlapScheduler(["attention"]), TypeError, "stages: expected deepcomm.overlap.Stage"),
        (lambda: OverlapScheduler([Stage(0, "x", COMPUTE, run)]).forward([{"x": 1}, {"x": 2}], output="y"),
         ValueError, "output: micro-batch 0's state has no 'y'"),
        (lambda: overlap.run_overlapped([], torch.zeros(2, 3, 4)), ValueError, "blocks: expected at least one"),
        (lambda: overlap.run_overlapped([object()], [[1.0]]), TypeError, "x: expected a tensor"),
        (lambda: overlap.run_overlapped([object()], torch.zeros(2, 3, 4), sizes=[1.5, 0.5]), ValueError, "sizes:"),
        (lambda: overlap.run_overlapped([object()], torch.zeros(2, 3, 4), num_micro_batches=0), ValueError,
         "num_micro_batches"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_a_tensor_a_stage_puts_into_the_state_gets_its_gradient():
    """A parameter or input that enters the state mid-schedule (not from the first stage's inputs)."""
    w = torch.tensor(2.0, requires_grad=True)
    extra = torch.tensor([1.0, -1.0], requires_grad=True)

    def put(state: dict) -> None:
        state["w"], state["extra"] = w, extra

    def use(state: dict) -> None:
        state["x"] = state["x"] * state.pop("w") + state.pop("extra")

    stages = [Stage(0, "put", COMPUTE, put), Stage(0, "use", COMPUTE, use)]
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    plain = x * w + extra
    plain.sum().backward()
    want = (w.grad.clone(), extra.grad.clone(), x.grad.clone())
    w.grad = extra.grad = x.grad = None

    scheduler = OverlapScheduler(stages)
    outputs = scheduler.forward([{"x": x[:1]}, {"x": x[1:]}], output="x")
    torch.cat(outputs).sum().backward()
    scheduler.backward()
    assert torch.equal(w.grad, want[0]) and torch.equal(extra.grad, want[1]) and torch.equal(x.grad, want[2])


class _Event:
    """Stands in for a communication event: records when a compute stage waits for it."""

    def __init__(self, log: list, name: str) -> None:
        self.log, self.name = log, name

    def wait(self) -> None:
        self.log.append(f"wait {self.name}")


def test_a_stage_that_does_not_wait_for_comm_leaves_the_event_to_the_next_one():
    log: list = []

    def comm(state):
        log.append("comm")
        state[overlap.PENDING] = _Event(log, "comm")

    def compute(name):
        return lambda state: log.append(name)

    stages = [Stage(0, "a", COMPUTE, compute("a")), Stage(0, "c", COMM, comm),
              Stage(0, "free", COMPUTE, compute("free"), waits_for_comm=False), Stage(0, "b", COMPUTE, compute("b"))]
    OverlapScheduler(stages, num_micro_batches=1).forward([{"x": torch.zeros(1)}], output="x")
    assert log == ["a", "comm", "free", "wait comm", "b"]


def test_compute_sm_limit_sets_and_restores_the_carveout_and_blas_backend(monkeypatch):
    carveouts, backends = [None], ["cublas"]

    class Properties:
        multi_processor_count = 66

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Properties())
    monkeypatch.setattr(torch._C, "_get_sm_carveout_experimental", lambda: carveouts[-1])
    monkeypatch.setattr(torch._C, "_set_sm_carveout_experimental", carveouts.append)
    monkeypatch.setattr(torch.backends.cuda, "preferred_blas_library",
                        lambda backend=None: backends[-1] if backend is None else backends.append(backend))
    with overlap.compute_sm_limit(42):
        assert (carveouts[-1], backends[-1]) == (24, "cublaslt")
    assert (carveouts[-1], backends[-1]) == (None, "cublas")
    with overlap.compute_sm_limit(None):
        assert carveouts[-1] is None
    for bad in (0, 67, True, 4.0):
        with pytest.raises(ValueError, match="compute_sms"):
            with overlap.compute_sm_limit(bad):
                pass
    assert (carveouts[-1], backends[-1]) == (None, "cublas")


class ToyBlock(torch.nn.Module):
    """Stages shaped like the MoE block; 'communication' is a row reversal, which mixes tokens."""

    def __init__(self, hidden: int, seed: int, log: list) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Parameter(torch.randn(hidden, hidden, generator=g) / hidden ** 0.5)
        self.b = torch.nn.Parameter(torch.randn(hidden, hidden, generator=g) / hidden ** 0.5)
        self.log = log

    def stages(self, layer: int) -> list[Stage]:
        def attention(state):
            state["h"] = torch.tanh(state.pop("x") @ self.a)
            self.log.append(("attention", layer, state["h"].shape[0]))

        def send(state):
            state["r"] = state["h"].flip(0) * 2
            self.log.append(("send", layer, state["r"].shape[0]))

        def experts(state):
            state["e"] = torch.relu(state.pop("r") @ self.b)

        def back(state):
            state["y"] = state.pop("e").flip(0)

        def finish(state):
            state["x"] = state.pop("h") + state.pop("y")

        return [Stage(layer, "attention", COMPUTE, attention), Stage(layer, "send", COMM, send),
                Stage(layer, "experts", COMPUTE, experts), Stage(layer, "back", COMM, back),
                Stage(layer, "finish", COMPUTE, finish)]


def _plain(blocks, x):
    state = {"x": x}
    for layer, block in enumerate(blocks):
        for stage in block.stages(layer):
            stage.run(state)
    return state["x"]


@pytest.mark.parametrize("sizes", [[4, 3], [1, 6], [7, 0], [0, 7]])
def test_overlapped_forward_and_backward_equal_the_plain_run(sizes):
    log: list = []
    blocks = [ToyBlock(16, seed, log) for seed in (1, 2, 3)]
    x = torch.randn(7, 16, requires_grad=True)

    # Plain: the whole batch per micro-batch, one after the other (tokens only mix inside a micro-batch).
    expected = torch.cat([_plain(blocks, part) for part in torch.split(x, sizes)])
    expected.square().sum().backward()
    want = {(i, name): p.grad.clone() for i, b in enumerate(blocks) for name, p in b.named_parameters()}
    want["x"] = x.grad.clone()
    for block in blocks:
        block.zero_grad()
    x.grad = None

    log.clear()
    scheduler = OverlapScheduler([s for layer, b in enumerate(blocks) for s in b.stages(layer)])
    outputs = scheduler.forward([{"x": part} for part in torch.split(x, sizes)], output="x")
    assert torch.equal(torch.cat([o.detach() for o in outputs]), expected.detach())
    torch.cat(outputs).square().sum().backward()
    scheduler.backward()
    for i, block in enumerate(blocks):
        for name, p in block.named_parameters():
            assert torch.allclose(p.grad, want[(i, name)], atol=1e-6), (i, name)
    assert torch.allclose(x.grad, want["x"], atol=1e-6)
    # Both micro-batches ran every stage, the empty one included (collectives need every rank).
    attention = [entry for entry in log if entry[0] == "attention"]
    assert [(layer, rows) for _, layer, rows in attention] == [
        (layer, rows) for layer in range(3) for rows in sizes]


def test_backward_before_forward_is_an_error():
    log: list = []
    scheduler = OverlapScheduler(ToyBlock(4, 0, log).stages(0))
    with pytest.raises(RuntimeError, match="backward"):
        scheduler.backward()


def test_inference_keeps_no_graph():
    log: list = []
    block = ToyBlock(8, 0, log)
    x = torch.randn(5, 8)
    with torch.no_grad():
        outputs = OverlapScheduler(block.stages(0)).forward([{"x": x[:3]}, {"x": x[3:]}], output="x")
    assert not outputs[0].requires_grad
    assert torch.equal(torch.cat(outputs), torch.cat([_plain([block], x[:3]), _plain([block], x[3:])]))


def test_stages_run_inside_named_ranges():
    log: list = []
    block = ToyBlock(8, 0, log)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.no_grad():
            OverlapScheduler(block.stages(4)).forward([{"x": torch.randn(2, 8)}, {"x": torch.randn(2, 8)}], "x")
    names = {e.name for e in prof.events()}
    assert {"L4/mb0/attention", "L4/mb1/send", "L4/mb1/finish"} <= names
    assert overlap.stage_name(4, 1, "send", backward=True) == "L4/mb1/send.backward"


# ------------------------------------------------------- the real MoE block over gloo, reference path


def _block_worker(rank: int, world_size: int, ranks_per_node: int, sizes_of_rank: list[list[int]]) -> None:
    import deepcomm
    from deepcomm import moe

    comm = deepcomm.Communicator(ranks_per_node=ranks_per_node, backend="reference")
    config = moe.tiny(max_nodes=1 if ranks_per_node < world_size else None)
    blocks = [moe.TransformerBlock(config, comm, dtype=torch.float32, seed=layer) for layer in range(2)]
    sizes = sizes_of_rank[rank]
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(sum(sizes), 6, config.moe.hidden, generator=generator, requires_grad=True)
    upstream = torch.randn(x.shape, generator=generator)

    y = x
    for block in blocks:
        y = block(y)
    (y * upstream).sum().backward()
    want = {(i, name): p.grad.clone() for i, b in enumerate(blocks) for name, p in b.named_parameters()
            if p.grad is not None}
    want_x = x.grad.clone()
    for block in blocks:
        block.zero_grad(set_to_none=True)
    x.grad = None

    out, schedule = overlap.run_overlapped(blocks, x, sizes=sizes)
    assert out.shape == y.shape
    torch.testing.assert_close(out, y.detach(), rtol=1e-5, atol=1e-5)
    (out * upstream).sum().backward()
    schedule.backward()
    torch.testing.assert_close(x.grad, want_x, rtol=1e-5, atol=1e-5)
    got = {(i, name): p.grad for i, b in enumerate(blocks) for name, p in b.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("world_size,ranks_per_node,sizes_of_rank", [
    (2, 2, [[2, 1], [1, 1]]),  # uneven splits
    (2, 2, [[2, 0], [1, 0]]),  # an empty micro-batch on every rank
    (4, 2, [[1, 1], [2, 0], [0, 0], [1, 2]]),  # 2 nodes, node-limited routing; a rank with no tokens
])
def test_overlapped_block_equals_plain_block_over_gloo(world_size, ranks_per_node, sizes_of_rank):
    from dist import run_ranks

    run_ranks(_block_worker, world_size, ranks_per_node, sizes_of_rank)


def test_train_moe_loss_curves_match_with_and_without_overlap(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "curves.json"
    command = [sys.executable, str(root / "tools" / "train_moe.py"), "--nproc", "2", "--steps", "8",
               "--json", str(out)]
    # The reference path in fp32 on the CPU, where both schedules must agree to rounding; on a GPU the
    # model trains in bf16 (gpu_check's overlap step draws those curves).
    env = {**__import__("os").environ, "PYTHONPATH": str(root), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    curves = json.loads(out.read_text())
    plain, overlapped = curves["plain"], curves["overlapped"]
    assert len(plain) == len(overlapped) == 8
    assert plain[-1] < plain[0]  # it learns
    for a, b in zip(plain, overlapped):
        assert abs(a - b) <= 1e-5 * abs(a)


@pytest.mark.parametrize("mode, arguments", [
    ("normal", ["--tokens", "64", "--seq", "16", "--split", "3,1"]),
    ("decode (low-latency, receive hooks, padded experts)", ["--decode", "--tokens", "4", "--split", "3,1"]),
    ("decode (low-latency, no hooks, packed experts)", ["--decode", "--no-hooks", "--decode-experts", "packed",
                                                        "--tokens", "8", "--seq", "2", "--split", "3,1"]),
])
def test_block_bench_runs_on_cpu_and_keeps_one_traced_step_for_every_rank(tmp_path, mode, arguments):
    """tools/bench_overlap.py end to end on the reference path: 2 ranks, 2 small blocks, 3 traced steps."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    bench = os.path.join(os.path.dirname(__file__), "..", "tools", "bench_overlap.py")
    command = [sys.executable, "-m", "deepcomm.launch", "--standalone", "--nproc-per-node", "2", bench, "--small",
               *arguments, "--layers", "2", "--iters", "1", "--warmup", "0",
               "--trace-steps", "3", "--trace-dir", "traces", "--json", "block.json", "--experts", "4"]
    out = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "deepcomm block bench: device=cpu ranks=2 backend=reference" in out.stdout
    assert "micro-batches=[3, 1] (sequences) layers=2 experts=4" in out.stdout
    assert f"mode={mode} " in out.stdout
    result = json.loads((tmp_path / "block.json").read_text())
    assert result["sizes"] == [3, 1] and result["args"]["experts"] == 4
    assert set(result["rows_us"]) == {"plain", "overlapped", "compute only", "communication only"}
    assert all(us > 0 for us in result["rows_us"].values())
    share = result["share"]
    assert len(share["per_rank"]) == len(share["after_peer_arrival"]["per_rank"]) == 2
    assert share["step"] in (0, 1, 2)
    assert share["min_share"] is None  # the reference path launches no comm kernels: nothing to hide
    assert sorted(os.listdir(tmp_path / "traces")) == ["overlap_rank0.json", "overlap_rank1.json"]


@pytest.mark.parametrize("arguments, message", [
    (["--split", "3,2"], "--split: expected two non-negative sequence counts summing to the batch (4)"),
    (["--split", "a,b"], "--split: expected two comma-separated sequence counts"),
    (["--experts", "0"], "--experts: must be >= 1"),
    (["--experts", "2"], "--experts: num_topk: at most num_experts=2, got 3"),
    (["--no-hooks"], "--no-hooks: only with --decode"),
    (["--decode-experts", "packed"], "--decode-experts: only with --decode"),
])
def test_block_bench_names_a_bad_argument(arguments, message):
    import os
    import subprocess
    import sys

    bench = os.path.join(os.path.dirname(__file__), "..", "tools", "bench_overlap.py")
    out = subprocess.run([sys.executable, bench, "--small", "--tokens", "64", "--seq", "16", *arguments],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode in (1, 2) and message in out.stderr, out.stderr[-2000:]


# ------------------------------------------- decode through the low-latency mode, over gloo, reference path


def _decode_block_worker(rank: int, world_size: int, sizes_of_rank: list[list[int]], on_kernels: bool = False,
                         decode_experts: str = "padded") -> None:
    """The overlapped decode equals each micro-batch decoded alone, bit for bit: the same calls, in another order."""
    import deepcomm
    from deepcomm import moe

    config = moe.tiny(num_experts=4 * world_size, decode_experts=decode_experts)
    low_latency = deepcomm.LowLatencyConfig(max_tokens_per_rank=8, hidden=config.moe.hidden,
                                            num_experts=config.moe.num_experts, num_topk=config.moe.num_topk)
    if on_kernels:
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
        comm = deepcomm.Communicator(low_latency=low_latency, num_sms=4)
    else:
        device, dtype = torch.device("cpu"), torch.float32
        comm = deepcomm.Communicator(backend="reference", low_latency=low_latency)
    blocks = [moe.TransformerBlock(config, comm, dtype=dtype, device=device, seed=layer) for layer in range(2)]
    sizes = sizes_of_rank[rank]
    x = torch.randn(sum(sizes), 1, config.moe.hidden, generator=torch.Generator().manual_seed(rank))
    x = x.to(device, dtype)
    with torch.no_grad():
        # Plain: each micro-batch decoded alone, every layer (the same calls, one after the other).
        expected = []
        for part in torch.split(x, sizes):
            for block in blocks:
                part = block.decode(part)
            expected.append(part)
        expected = torch.cat(expected)
        for recv_hooks in (True, False):
            out, _ = overlap.run_overlapped(blocks, x, sizes=sizes, low_latency=True, recv_hooks=recv_hooks)
            torch.testing.assert_close(out, expected, rtol=0, atol=0, msg=f"recv_hooks={recv_hooks}")
    with pytest.raises(RuntimeError, match="low_latency: the low-latency mode is for inference"):
        overlap.run_overlapped(blocks, x, sizes=sizes, low_latency=True)
    with torch.no_grad(), pytest.raises(ValueError, match="num_micro_batches: the low-latency mode's two receive areas"):
        overlap.run_overlapped(blocks, x, num_micro_batches=3, low_latency=True)
    if on_kernels:
        comm.check_errors()
        comm.close()


@pytest.mark.parametrize("world_size,sizes_of_rank", [
    (2, [[3, 2], [1, 1]]),  # uneven splits
    (2, [[2, 0], [0, 1]]),  # an empty micro-batch
    (3, [[1, 2], [2, 2], [0, 0]]),  # a rank with no tokens
])
@pytest.mark.parametrize("decode_experts", ["padded", "packed"])
def test_overlapped_decode_equals_plain_decode_over_gloo(world_size, sizes_of_rank, decode_experts):
    from dist import run_ranks

    run_ranks(_decode_block_worker, world_size, sizes_of_rank, False, decode_experts)


@pytest.mark.gpu
def test_overlapped_decode_on_the_low_latency_kernels():
    from dist import run_ranks
    from kernel_checks import require_ranks

    require_ranks(2)
    for decode_experts in ("padded", "packed"):
        run_ranks(_decode_block_worker, 2, [[3, 2], [0, 4]], True, decode_experts)


def test_inputs_made_by_one_upstream_graph_get_their_gradients_in_one_pass():
    """x from an earlier layer (a dense one here), split into micro-batches: their gradients meet in that layer's
    graph, which the scheduler's backward traverses once for all micro-batches (once each would free it first)."""
    log: list = []
    blocks = [ToyBlock(16, seed, log) for seed in (1, 2)]
    x0, w = torch.randn(7, 16), torch.randn(16, 16, requires_grad=True)
    sizes = [4, 3]

    expected = torch.cat([_plain(blocks, part) for part in torch.split(torch.tanh(x0 @ w), sizes)])
    expected.square().sum().backward()
    want_w = w.grad.clone()
    want = {(i, name): p.grad.clone() for i, b in enumerate(blocks) for name, p in b.named_parameters()}
    w.grad = None
    for block in blocks:
        block.zero_grad()

    scheduler = OverlapScheduler([s for layer, b in enumerate(blocks) for s in b.stages(layer)])
    outputs = scheduler.forward([{"x": part} for part in torch.split(torch.tanh(x0 @ w), sizes)], output="x")
    torch.cat(outputs).square().sum().backward()
    scheduler.backward()
    assert torch.allclose(w.grad, want_w, atol=1e-5)
    for i, block in enumerate(blocks):
        for name, p in block.named_parameters():
            assert torch.allclose(p.grad, want[(i, name)], atol=1e-5), (i, name)


def test_a_failed_backward_lets_go_of_the_forward(monkeypatch):
    """Once backward ran, failed or not, the forward's graph is released: a retry asks for a new forward."""
    log: list = []
    scheduler = OverlapScheduler(ToyBlock(4, 0, log).stages(0))
    outputs = scheduler.forward([{"x": torch.randn(2, 4, requires_grad=True)}, {"x": torch.randn(1, 4)}], "x")
    torch.cat(outputs).sum().backward()

    def fail(record, grads):
        raise RuntimeError("a stage's backward failed")

    monkeypatch.setattr(overlap, "_stage_backward", fail)
    with pytest.raises(RuntimeError, match="a stage's backward failed"):
        scheduler.backward()
    assert scheduler._records is None and scheduler._outputs is None
    with pytest.raises(RuntimeError, match="backward: call forward with autograd enabled first"):
        scheduler.backward()
