"""The MoE layer, block and model against a one-rank oracle, on several processes over gloo.

Experts are seeded by their global id, so a one-rank layer holding every expert,
fed every rank's tokens, computes what the N-rank layer computes: outputs and
input gradients row for row, expert gradients expert for expert, and the
gradients of replicated parameters (router, shared experts, attention) as the
sum over ranks.
"""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch
import torch.distributed as dist

import deepcomm
from deepcomm import autograd, moe
from deepcomm.moe import MoEConfig, MoELayer, MoEModel, TransformerBlock
from deepcomm.results import DispatchResult
from dist import run_ranks
from test_autograd import KernelInterface

def _tokens(rank: int, shape: tuple[int, ...], dtype: torch.dtype, salt: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 * salt + rank)
    return torch.randn(shape, generator=generator).to(dtype)


def _oracle_comm(rank: int, world_size: int) -> deepcomm.Communicator:
    """A one-rank communicator per rank (every rank takes part in creating every group)."""
    groups = [dist.new_group([r]) for r in range(world_size)]
    return deepcomm.Communicator(groups[rank], ranks_per_node=1, backend="reference")


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    actual, expected = actual.float(), expected.float()
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    if expected.numel() == 0:
        return
    scale = expected.abs().max().clamp_min(1.0)
    error = (actual - expected).abs().max() / scale
    assert error <= tol, f"{what}: error {float(error):.3g} relative to {float(scale):.3g} > {tol}"


def _compare_with_oracle(make, comm, oracle_comm, shapes: list[tuple[int, ...]], dtype, tol: float,
                         where: str, prepare=None) -> None:
    """Forward and backward of ``make(comm)`` on this rank's tokens and of ``make(oracle_comm)`` on
    every rank's; ``shapes[r]``: rank r's input shape (tokens along dim 0)."""
    rank = comm.topology.rank
    module, oracle = make(comm), make(oracle_comm)
    for layer in [m for m in oracle.modules() if isinstance(m, MoELayer)]:
        layer.num_nodes = comm.topology.num_nodes  # route over the N-rank run's nodes
    for m in (module, oracle):
        if prepare is not None:
            prepare(m)
    inputs = [_tokens(r, shape, dtype) for r, shape in enumerate(shapes)]
    upstream = [_tokens(r, shape, torch.float32, salt=1) for r, shape in enumerate(shapes)]

    x = inputs[rank].clone().requires_grad_()
    y = module(x)
    (y.float() * upstream[rank]).sum().backward()
    x_all = torch.cat(inputs).requires_grad_()
    y_all = oracle(x_all)
    (y_all.float() * torch.cat(upstream)).sum().backward()

    start = sum(shape[0] for shape in shapes[:rank])
    mine = slice(start, start + shapes[rank][0])
    _close(y, y_all[mine], tol, f"{where}: output")
    _close(x.grad, x_all.grad[mine], tol, f"{where}: grad x")
    oracle_params = dict(oracle.named_parameters())
    for name, param in module.named_parameters():
        expected = oracle_params[name]
        if name.rsplit(".", 1)[-1] in moe.EXPERT_PARAMETERS:
            # This rank holds experts [rank * E_local, (rank + 1) * E_local) of the oracle's E.
            local = param.shape[0]
            held = slice(rank * local, (rank + 1) * local)
            assert torch.equal(param.detach(), expected.detach()[held]), f"{where}: {name} weights"
            _close(param.grad, expected.grad[held], tol, f"{where}: grad {name}")
        else:
            # Replicated: the oracle saw every rank's tokens.
            grad = param.grad.float()
            dist.all_reduce(grad)
            _close(grad, expected.grad, tol, f"{where}: grad {name}")


def _starve_experts(layer: MoELayer) -> None:
    """A bias that keeps every third expert from being chosen: some experts get no rows."""
    with torch.no_grad():
        layer.expert_bias[::3] = -10.0


def _oracle_worker(rank: int, world_size: int, ranks_per_node: int, max_nodes: int | None) -> None:
    comm = deepcomm.Communicator(ranks_per_node=ranks_per_node, backend="reference")
    oracle_comm = _oracle_comm(rank, world_size)
    config = moe.tiny(max_nodes=max_nodes)
    tokens = [(5 + 3 * r, config.moe.hidden) for r in range(world_size)]
    tokens[1] = (0, config.moe.hidden)  # a rank with no tokens
    f32 = torch.float32

    _compare_with_oracle(lambda c: MoELayer(config.moe, c, f32, seed=3), comm, oracle_comm, tokens, f32, 1e-5,
                         "layer float32")
    _compare_with_oracle(lambda c: MoELayer(config.moe, c, f32, seed=4), comm, oracle_comm, tokens, f32, 1e-5,
                         "layer float32, starved experts", prepare=_starve_experts)
    _compare_with_oracle(lambda c: MoELayer(config.moe, c, torch.bfloat16, seed=3), comm, oracle_comm, tokens,
                         torch.bfloat16, 3e-2, "layer bf16")
    sequences = [(2, 4, config.moe.hidden) for _ in range(world_size)]
    sequences[0] = (0, 4, config.moe.hidden)  # an empty micro-batch
    _compare_with_oracle(lambda c: MoEModel(config, 2, c, f32, seed=5), comm, oracle_comm, sequences, f32, 1e-5,
                         "model float32")
    _check_kernel_backward_is_the_reference(comm, config)
    gc.collect()
    assert not autograd._ROUTES, "the kept routing outlived its handles"
    if max_nodes is not None:
        _check_node_limit(comm, config)
    _check_empty_everywhere(comm, config)
    _check_world_size_errors(comm)


def _check_kernel_backward_is_the_reference(comm, config) -> None:
    """The kernel backends' backward (combine, dispatch again, return_to_sources), driven through
    the reference path, gives the reference backend's gradients bit for bit."""
    kernel_interface = KernelInterface(comm.reference)
    for dispatch_dtype in ("bf16", "fp8"):
        cfg = moe.tiny(max_nodes=config.moe.max_nodes, dispatch_dtype=dispatch_dtype)
        runs = []
        for c in (comm, kernel_interface):
            model = MoEModel(cfg, 2, c, torch.bfloat16, seed=9)
            x = _tokens(comm.rank, (2, 3, cfg.moe.hidden), torch.bfloat16).requires_grad_()
            y = model(x)
            (y.float() * _tokens(comm.rank, y.shape, torch.float32, salt=1)).sum().backward()
            runs.append([y, x.grad] + [p.grad for p in model.parameters()])
        for i, (ours, reference) in enumerate(zip(*runs)):
            assert torch.equal(ours, reference), f"{dispatch_dtype}: tensor {i}"


def _check_node_limit(comm, config) -> None:
    """Every token's experts lie on at most max_nodes nodes."""
    layer = MoELayer(config.moe, comm, torch.float32, seed=3)
    topk_idx, _ = layer.route(_tokens(comm.rank, (32, config.moe.hidden), torch.float32))
    experts_per_node = config.moe.num_experts // comm.topology.num_nodes
    nodes = topk_idx // experts_per_node
    spans = [len(set(row)) for row in nodes.tolist()]
    assert max(spans) <= config.moe.max_nodes < comm.topology.num_nodes


def _check_empty_everywhere(comm, config) -> None:
    """A micro-batch with no tokens on any rank still runs forward and backward (and the collectives)."""
    block = TransformerBlock(config, comm, torch.float32, seed=1)
    x = torch.zeros(0, 3, config.moe.hidden, requires_grad=True)
    y = block(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert torch.count_nonzero(block.moe.w_gate_up.grad) == 0


def _check_world_size_errors(comm) -> None:
    with pytest.raises(ValueError, match="^num_experts:"):
        MoELayer(MoEConfig(hidden=8, expert_hidden=8, num_experts=comm.world_size + 1, num_topk=1), comm)


@pytest.mark.parametrize("world_size,ranks_per_node,max_nodes", [(2, 2, None), (4, 4, None), (4, 2, 1)])
def test_layer_block_and_model_match_one_rank_oracle(world_size, ranks_per_node, max_nodes):
    run_ranks(_oracle_worker, world_size, ranks_per_node, max_nodes)


def _fp8_worker(rank: int, world_size: int) -> None:
    """fp8 dispatch: forward close to bf16's; gradients flow (straight-through) and stay close."""
    comm = deepcomm.Communicator(ranks_per_node=world_size, backend="reference")
    config = moe.tiny().moe
    outputs, grads = {}, {}
    for dtype, dispatch_dtype in ((torch.bfloat16, "bf16"), (torch.bfloat16, "fp8"), (torch.float32, "fp8")):
        layer = MoELayer(dataclasses.replace(config, dispatch_dtype=dispatch_dtype), comm, dtype, seed=2)
        x = _tokens(rank, (9, config.hidden), dtype).requires_grad_()
        y = layer(x)
        y.float().sum().backward()
        outputs[dtype, dispatch_dtype], grads[dtype, dispatch_dtype] = y.float(), layer.w_gate_up.grad.float()
    for key in ((torch.bfloat16, "fp8"), (torch.float32, "fp8")):
        _close(outputs[key], outputs[torch.bfloat16, "bf16"], 0.1, f"{key}: output")
        _close(grads[key], grads[torch.bfloat16, "bf16"], 0.1, f"{key}: expert gradient")
        assert not torch.equal(outputs[key], outputs[torch.bfloat16, "bf16"]), f"{key}: no fp8 on the wire"


def test_fp8_dispatch_is_close_to_bf16():
    run_ranks(_fp8_worker, 2)


def _decode_worker(rank: int, world_size: int) -> None:
    """decode (the low-latency mode) equals forward (the normal path) up to rounding, bf16 and fp8 on the wire."""
    config = moe.tiny(num_experts=4 * world_size, num_topk=3).moe
    low_latency = deepcomm.LowLatencyConfig(max_tokens_per_rank=16, hidden=config.hidden,
                                            num_experts=config.num_experts, num_topk=config.num_topk)
    comm = deepcomm.Communicator(backend="reference", low_latency=low_latency)
    for dtype, dispatch_dtype, tolerance in ((torch.float32, "bf16", 0.01), (torch.bfloat16, "bf16", 0.01),
                                             (torch.bfloat16, "fp8", 0.02)):
        layer = MoELayer(dataclasses.replace(config, dispatch_dtype=dispatch_dtype), comm, dtype, seed=4)
        x = _tokens(rank, (5 + 7 * rank, config.hidden), dtype)
        decoded = layer.decode(x)
        _close(decoded.float(), layer(x).detach().float(), tolerance, f"{dtype}/{dispatch_dtype}")
        assert decoded.dtype == dtype
        assert (decoded - layer.shared(x).detach()).abs().max() > 0.5  # the routed experts count
    with pytest.raises(ValueError, match="x: 17 tokens exceed the low-latency buffer"):
        layer.decode(_tokens(rank, (17, config.hidden), torch.bfloat16))


def test_decode_through_the_low_latency_mode_matches_forward():
    run_ranks(_decode_worker, 2)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("counts, rows_per_expert", [
    ([3, 0, 5, 1], 6), ([0, 0, 0], 4), ([4, 4], 4), ([0, 7, 0], 7), ([2], 5)])
def test_packing_indices_pack_each_experts_received_rows_back_to_back(counts, rows_per_expert, dtype):
    counts_t = torch.tensor(counts, dtype=dtype)
    gather, scatter, ends = moe.packing_indices(counts_t, rows_per_expert)
    capacity = len(counts) * rows_per_expert
    assert gather.shape == scatter.shape == (capacity,) and ends.dtype == torch.int32
    assert ends.tolist() == torch.tensor(counts).cumsum(0).tolist()
    received = [e * rows_per_expert + i for e, count in enumerate(counts) for i in range(count)]
    assert gather[:len(received)].tolist() == received  # expert order, each expert's rows in order
    assert set(gather[len(received):].tolist()) <= {0}
    rows = torch.randn(capacity, 3)
    back = rows.index_select(0, gather).index_select(0, scatter)
    for place in received:  # every received row comes back to its place; the others are never read
        assert torch.equal(back[place], rows[place])


def _packed_decode_worker(rank: int, world_size: int, device_kind: str) -> None:
    """decode with the experts on packed rows equals the padded batched matmul up to rounding: the same rows,
    the same weights, other GEMM shapes (and on CUDA the grouped GEMM)."""
    on_cuda = device_kind == "cuda"
    if on_cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    config = moe.tiny(num_experts=4 * world_size, num_topk=3).moe
    low_latency = deepcomm.LowLatencyConfig(max_tokens_per_rank=16, hidden=config.hidden,
                                            num_experts=config.num_experts, num_topk=config.num_topk)
    comm = (deepcomm.Communicator(low_latency=low_latency, num_sms=4) if on_cuda
            else deepcomm.Communicator(backend="reference", low_latency=low_latency))
    dtypes = (torch.bfloat16,) if on_cuda else (torch.float32, torch.bfloat16)
    # Rank 0 sends nothing in the second round: its experts receive only rank 1's rows.
    for dtype, dispatch_dtype, tokens in [(d, w, n) for d in dtypes for w in ("bf16", "fp8")
                                          for n in ((3, 12), (0, 16))]:
        x = _tokens(rank, (tokens[rank], config.hidden), dtype).to(device)
        outputs = {}
        for way in ("padded", "packed"):
            layer = MoELayer(dataclasses.replace(config, dispatch_dtype=dispatch_dtype, decode_experts=way), comm,
                             dtype, device, seed=4)
            if on_cuda:
                assert layer._packs_decode_rows(torch.empty(1, 1, config.hidden, device=device)) == (way == "packed")
            outputs[way] = layer.decode(x)
        tolerance = 1e-5 if dtype == torch.float32 else 0.02
        _close(outputs["packed"], outputs["padded"], tolerance,
               f"{dtype}/{dispatch_dtype}/{tokens}: packed against padded")
    if on_cuda:
        comm.check_errors()
        comm.close()


def test_decode_on_packed_rows_equals_padded():
    run_ranks(_packed_decode_worker, 2, "cpu")


@pytest.mark.gpu
def test_decode_on_packed_rows_on_the_low_latency_kernels():
    from kernel_checks import require_ranks

    require_ranks(2)
    run_ranks(_packed_decode_worker, 2, "cuda")


# -- one process --------------------------------------------------------------------


@pytest.fixture(scope="module")
def comm(single_rank_group):
    return deepcomm.Communicator(single_rank_group, ranks_per_node=1, backend="reference")


def _naive_experts(layer: MoELayer, received: DispatchResult) -> torch.Tensor:
    """Every (row, k) pair on its own: weight × down(silu(gate) * up), summed in k order."""
    out = torch.zeros(received.x.shape, dtype=torch.float32)
    for row in range(received.x.shape[0]):
        for k in range(received.topk_idx.shape[1]):
            expert = int(received.topk_idx[row, k])
            if expert < 0:
                continue
            gate, up = (received.x[row] @ layer.w_gate_up[expert]).chunk(2)
            expert_out = (torch.nn.functional.silu(gate) * up) @ layer.w_down[expert]
            out[row] += received.topk_weights[row, k] * expert_out.float()
    return out.to(layer.dtype)


def _received(num_rows: int, hidden: int, num_topk: int, num_experts: int, seed: int) -> DispatchResult:
    generator = torch.Generator().manual_seed(seed)
    topk_idx = torch.randint(-1, num_experts, (num_rows, num_topk), generator=generator)
    topk_idx[:, 1] = torch.where(topk_idx[:, 1] == topk_idx[:, 0], -1, topk_idx[:, 1])
    topk_idx[topk_idx == 2] = -1  # expert 2 receives nothing
    weights = torch.rand(num_rows, num_topk, generator=generator) * (topk_idx >= 0)
    per_expert = torch.bincount(topk_idx[topk_idx >= 0], minlength=num_experts).to(torch.int32)
    return DispatchResult(x=torch.randn(num_rows, hidden, generator=generator), x_scales=None, topk_idx=topk_idx,
                          topk_weights=weights, num_tokens_per_expert=per_expert,
                          num_recv_tokens_per_rank=[num_rows], handle=None, event=deepcomm.EventHandle())


@pytest.mark.parametrize("num_rows", [0, 1, 13])
def test_grouped_experts_equal_a_loop_over_pairs(comm, num_rows):
    config = MoEConfig(hidden=16, expert_hidden=8, num_experts=4, num_topk=2)
    layer = MoELayer(config, comm, torch.float32, seed=1)
    received = _received(num_rows, config.hidden, config.num_topk, config.num_experts, seed=num_rows)
    expected = _naive_experts(layer, received)
    actual = layer.experts(received)  # sums num_tokens_per_expert on the host itself
    assert actual.shape == (num_rows, config.hidden)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    # With dispatch's host-side per-expert counts (no sync): the same bits.
    local_experts = config.num_experts // comm.world_size
    per_expert = torch.bincount(received.topk_idx[received.topk_idx >= 0], minlength=local_experts)
    received.num_recv_tokens_per_expert_list = per_expert.tolist()
    assert torch.equal(layer.experts(received), actual)


def test_grouped_matmul_fallback_matches_torch_grouped_mm():
    """The fallback's groups are the offsets torch._grouped_mm takes (cumulative ends)."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm is missing")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(12, 16, generator=generator).to(torch.bfloat16)
    weights = torch.randn(4, 16, 8, generator=generator).to(torch.bfloat16)
    counts = torch.tensor([5, 0, 7, 0])
    try:
        expected = torch._grouped_mm(x, weights, offs=counts.cumsum(0).to(torch.int32))
    except RuntimeError as error:
        pytest.skip(f"torch._grouped_mm does not run on the CPU here: {error}")
    ends = counts.cumsum(0, dtype=torch.int32)
    torch.testing.assert_close(moe.grouped_matmul(x, weights, ends).float(), expected.float(), rtol=2e-2,
                               atol=2e-2)


def test_presets():
    big = moe.deepseek_v3()
    assert (big.moe.hidden, big.moe.expert_hidden, big.moe.num_experts, big.moe.num_topk) == (7168, 2048, 256, 8)
    assert (big.moe.num_shared_experts, big.moe.max_nodes, big.num_heads, big.head_dim) == (1, 4, 128, 128)
    assert moe.tiny(dispatch_dtype="fp8").moe.dispatch_dtype == "fp8"


def test_same_seed_same_layer_different_seed_different(comm):
    config = moe.tiny().moe
    first, second, other = (MoELayer(config, comm, torch.float32, seed=s) for s in (7, 7, 8))
    for (name, a), b, c in zip(first.named_parameters(), second.parameters(), other.parameters()):
        assert torch.equal(a, b) and not torch.equal(a, c), name


BAD_CONFIGS = [
    ("hidden", dict(hidden=0)),
    ("expert_hidden", dict(expert_hidden=-1)),
    ("num_experts", dict(num_experts=2.0)),
    ("num_topk", dict(num_topk=9)),
    ("num_shared_experts", dict(num_shared_experts=-1)),
    ("max_nodes", dict(max_nodes=0)),
    ("routed_scaling_factor", dict(routed_scaling_factor=0.0)),
    ("dispatch_dtype", dict(dispatch_dtype="fp16")),
    ("dispatch_dtype", dict(dispatch_dtype="fp8", hidden=96)),
    ("decode_experts", dict(decode_experts="masked")),
]


@pytest.mark.parametrize("name,overrides", BAD_CONFIGS)
def test_bad_config_names_the_field(name, overrides):
    with pytest.raises(ValueError, match=f"^{name}:"):
        moe.tiny(**overrides)


def test_bad_arguments_name_the_argument(comm):
    config = moe.tiny()
    with pytest.raises(TypeError, match="^config:"):
        MoELayer(config, comm)
    with pytest.raises(TypeError, match="^dtype:"):
        MoELayer(config.moe, comm, dtype=torch.float16)
    with pytest.raises(TypeError, match="^moe:"):
        moe.BlockConfig(moe=None, num_heads=1, head_dim=1)
    with pytest.raises(ValueError, match="^num_heads:"):
        moe.BlockConfig(moe=config.moe, num_heads=0, head_dim=1)
    with pytest.raises(ValueError, match="^num_layers:"):
        MoEModel(config, 0, comm)
    layer = MoELayer(config.moe, comm, torch.float32)
    with pytest.raises(ValueError, match="^x2d:"):
        layer(torch.zeros(3, config.moe.hidden + 1))
    with pytest.raises(TypeError, match="^x2d:"):
        layer(torch.zeros(3, config.moe.hidden, dtype=torch.bfloat16))
    block = TransformerBlock(config, comm, torch.float32)
    with pytest.raises(ValueError, match="^x:"):
        block(torch.zeros(3, config.moe.hidden))


def test_float32_needs_the_reference_backend():
    class KernelBackend:
        topology = deepcomm.topology.Topology(0, 1, 1)

        def run_dispatch(self):
            """Only the interface: autograd treats this as a kernel backend."""

        run_combine = run_dispatch

    with pytest.raises(TypeError, match="^dtype:"):
        MoELayer(moe.tiny().moe, KernelBackend(), dtype=torch.float32)


# -- GPU ----------------------------------------------------------------------------------


def _kernel_worker(rank: int, world_size: int, backend: str, ranks_per_node: int) -> None:
    """The layer (and a 3-layer model: old handles in backward) on the kernels vs the reference backend."""
    torch.cuda.set_device(rank % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device())
    config = moe.tiny(num_experts=4 * world_size, num_topk=4)
    buffer = deepcomm.BufferConfig(max_tokens_per_rank=64, hidden=config.moe.hidden, num_topk=8)
    comm = deepcomm.Communicator(backend=backend, buffer=buffer, ranks_per_node=ranks_per_node, num_sms=4)
    assert comm.backend == backend
    for dispatch_dtype in ("bf16", "fp8"):
        cfg = dataclasses.replace(config, moe=dataclasses.replace(config.moe, dispatch_dtype=dispatch_dtype))
        runs = []
        for c in (comm, comm.reference):
            layer = MoELayer(cfg.moe, c, torch.bfloat16, device, seed=6)
            model = MoEModel(cfg, 3, c, torch.bfloat16, device, seed=6)
            x2d = _tokens(rank, (3 + 5 * rank, cfg.moe.hidden), torch.bfloat16).to(device).requires_grad_()
            seq = _tokens(rank, (2, 5, cfg.moe.hidden), torch.bfloat16).to(device).requires_grad_()
            y = _async_layer(layer, x2d)
            z = model(seq)
            (y.float().sum() + z.float().square().mean()).backward()
            grads = [x2d.grad, seq.grad] + [p.grad for p in (*layer.parameters(), *model.parameters())]
            runs.append([y, z] + grads)
        for i, (ours, reference) in enumerate(zip(*runs)):
            _close(ours, reference, 2e-2, f"{backend}/{dispatch_dtype}: tensor {i}")
        _check_without_autograd(comm, cfg, rank, device, f"{backend}/{dispatch_dtype}: no_grad")
    del runs, y, z, grads  # their autograd nodes hold the handles
    _check_old_handle_in_backward(comm, device)
    comm.check_errors()
    gc.collect()
    assert not autograd._ROUTES, "the kept routing outlived its handles"


@torch.no_grad()
def _check_without_autograd(comm, cfg, rank: int, device, what: str) -> None:
    """With no gradient to record the experts write their rows where combine reads them (nothing copied in)."""
    x2d = _tokens(rank, (3 + 5 * rank, cfg.moe.hidden), torch.bfloat16).to(device)
    layers = [MoELayer(cfg.moe, c, torch.bfloat16, device, seed=6) for c in (comm, comm.reference)]
    received = layers[0].dispatch(x2d, *layers[0].route(x2d))
    rows = layers[0].experts(received)
    offset = rows.data_ptr() - comm._impl.buffer.data_ptr()
    assert rows.numel() == 0 or 0 <= offset < comm._impl.buffer.numel(), f"{what}: rows outside the buffer"
    _close(_async_layer(layers[0], x2d), _async_layer(layers[1], x2d), 2e-2, what)


def _check_old_handle_in_backward(comm, device) -> None:
    """Dispatch's backward after more dispatches than receive slots (internode: its forward maps are gone)."""
    num_experts, rank = 4 * comm.world_size, comm.rank
    generator = torch.Generator().manual_seed(rank)
    topk_idx = torch.randperm(num_experts, generator=generator)[:3].repeat(6, 1).to(device)
    weights = torch.rand(6, 3, generator=generator).to(device)
    grads = []
    for c in (comm, comm.reference):
        x = _tokens(rank, (6, 128), torch.bfloat16).to(device).requires_grad_()
        out = autograd.dispatch(c, x, topk_idx, weights, num_experts)
        for _ in range(3):
            c.dispatch(x.detach(), topk_idx, weights, num_experts)
        (out.x.float() * 2.0**rank).sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1]), "gradient through an old handle"


def _async_layer(layer: MoELayer, x2d: torch.Tensor) -> torch.Tensor:
    """The layer's stages with asynchronous dispatch and combine, waited on by events."""
    topk_idx, topk_weights = layer.route(x2d)
    received = layer.dispatch(x2d, topk_idx, topk_weights, async_finish=True)
    received.event.wait()
    routed, event = layer.combine(layer.experts(received), received.handle, async_finish=True)
    event.wait()
    return routed + layer.shared(x2d)


@pytest.mark.gpu
@pytest.mark.parametrize("backend,world_size,ranks_per_node", [("intranode", 2, 2), ("internode", 4, 2)])
def test_layer_on_the_kernels_matches_the_reference(backend, world_size, ranks_per_node):
    from kernel_checks import require_ranks

    require_ranks(world_size)
    run_ranks(_kernel_worker, world_size, backend, ranks_per_node)


def _kernel_decode_worker(rank: int, world_size: int) -> None:
    """decode on the low-latency kernels equals decode on the reference path (the same rows reach the same
    bmm; combine's order is the contract's) and forward up to rounding."""
    torch.cuda.set_device(rank % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device())
    config = moe.tiny(num_experts=4 * world_size, num_topk=3).moe
    low_latency = deepcomm.LowLatencyConfig(max_tokens_per_rank=16, hidden=config.hidden,
                                            num_experts=config.num_experts, num_topk=config.num_topk)
    kernels = deepcomm.Communicator(low_latency=low_latency, num_sms=4)
    reference = deepcomm.Communicator(backend="reference", low_latency=low_latency)
    for dispatch_dtype in ("bf16", "fp8"):
        cfg = dataclasses.replace(config, dispatch_dtype=dispatch_dtype)
        x = _tokens(rank, (5 + 7 * rank, config.hidden), torch.bfloat16).to(device)
        ours = MoELayer(cfg, kernels, torch.bfloat16, device, seed=4).decode(x)
        theirs = MoELayer(cfg, reference, torch.bfloat16, device, seed=4)
        _close(ours, theirs.decode(x), 1e-3, f"{dispatch_dtype}: kernels against the reference path")
        _close(ours, theirs(x).detach(), 0.02, f"{dispatch_dtype}: decode against forward")
    kernels.check_errors()
    kernels.close()


@pytest.mark.gpu
def test_decode_on_the_low_latency_kernels():
    from kernel_checks import require_ranks

    require_ranks(2)
    run_ranks(_kernel_decode_worker, 2)


@pytest.mark.gpu
def test_grouped_mm_path_equals_per_group_matmuls():
    generator = torch.Generator().manual_seed(0)
    device = torch.device("cuda", torch.cuda.current_device())
    x = torch.randn(40, 64, generator=generator).to(device, torch.bfloat16).requires_grad_()
    weights = torch.randn(4, 64, 32, generator=generator).to(device, torch.bfloat16).requires_grad_()
    counts = torch.tensor([10, 0, 25, 5], device=device)
    if not moe._use_grouped_mm(x, weights):
        pytest.skip("torch._grouped_mm does not run on this GPU")
    upstream = torch.randn(40, 32, generator=generator).to(device, torch.bfloat16)
    results = []
    for grouped in (True, False):
        x.grad = weights.grad = None
        y = moe.grouped_matmul(x, weights, counts.cumsum(0, dtype=torch.int32)) if grouped else torch.cat(
            [rows @ weights[g] for g, rows in enumerate(x.split(counts.tolist()))])
        y.backward(upstream)
        results.append((y, x.grad, weights.grad))
    for i, (ours, expected) in enumerate(zip(*results)):
        _close(ours, expected, 2e-2, f"tensor {i}")


def test_experts_write_into_a_registered_buffer_under_autograd(comm, monkeypatch):
    """As on the kernel backends: combine_input is a detached bf16 view of a uint8 buffer. The experts'
    copy into it is recorded for autograd; outputs and gradients equal those through a new tensor, and
    the buffer itself stays out of the graph."""
    from deepcomm.kernel_common import combine_input_view

    config = moe.tiny(num_experts=4, num_topk=2).moe
    x2d = _tokens(0, (12, config.hidden), torch.bfloat16)
    runs = []
    buffer = torch.zeros(64 + 12 * 2 * config.hidden * 2, dtype=torch.uint8)
    for in_buffer in (False, True):
        if in_buffer:
            monkeypatch.setattr(comm._impl, "combine_input",
                                lambda handle: combine_input_view(buffer, 64, buffer.numel() - 64, handle, 0, 2))
        layer = MoELayer(config, comm, torch.bfloat16, seed=3)
        x = x2d.clone().requires_grad_()
        received = layer.dispatch(x, *layer.route(x))
        rows = layer.experts(received)
        if in_buffer:
            offset = rows.data_ptr() - buffer.data_ptr()
            assert 64 <= offset < buffer.numel()
            assert type(rows.grad_fn).__name__ == "CopyBackwards"  # the copy alone, no view bookkeeping
        y, _ = layer.combine(rows, received.handle)
        y.float().square().sum().backward()
        runs.append([y, x.grad] + [p.grad for p in layer.parameters()])
    assert not buffer.requires_grad and buffer.grad_fn is None
    assert runs[0][1] is not None and runs[0][1].abs().sum() > 0, "no gradient reached the tokens"
    for i, (plain, aliased) in enumerate(zip(*runs)):
        assert (plain is None and aliased is None) or torch.equal(plain, aliased), f"tensor {i}"


def test_experts_whose_slot_was_reused_write_a_new_tensor(comm, monkeypatch):
    """More dispatches in flight than receive slots: the experts' rows go to a tensor of their own
    (combine copies them in), with the same values."""
    config = moe.tiny(num_experts=4, num_topk=2).moe
    layer = MoELayer(config, comm, torch.bfloat16, seed=3)
    x2d = _tokens(0, (12, config.hidden), torch.bfloat16)
    received = layer.dispatch(x2d, *layer.route(x2d))
    expected = layer.experts(received)

    def reused(handle):
        raise deepcomm.SlotReusedError("handle: 2 dispatches ran since the one whose receive slot it is")

    monkeypatch.setattr(comm._impl, "combine_input", reused)
    assert torch.equal(layer.experts(received), expected)
