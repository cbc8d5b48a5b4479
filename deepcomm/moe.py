"""A DeepSeek-V3-like MoE layer and transformer block on deepcomm's dispatch and combine.

The layer is cut into the stages an overlap scheduler interleaves between two
micro-batches: compute (``route``, ``experts``, ``shared``) and communication
(``dispatch``, ``combine``, which accept ``previous_event`` and ``async_finish``).
``forward`` runs them one after another. Gradients flow through every stage
(deepcomm.autograd), on every backend.

Experts are placed as dispatch places them: global expert ``e`` lives on rank
``e // (E / world)``. Parameters are drawn from generators seeded by the
layer's ``seed`` and the parameter's place, routed experts by their global id,
so an expert has the same weights whatever the world size: a one-rank layer
holding every expert is the oracle for an N-rank one. The rows one rank
receives go through its experts as a grouped GEMM.

Every rank must run every stage, in the same order, even with zero tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deepcomm import autograd
from deepcomm.errors import SlotReusedError
from deepcomm.events import EventHandle
from deepcomm.expert_order import expert_order
from deepcomm.fp8 import BLOCK_CHANNELS
from deepcomm.pair_sum import weighted_pair_sum
from deepcomm.results import DispatchResult
from deepcomm.routing import node_limited_topk
from deepcomm.validation import check_int

DISPATCH_DTYPES = ("bf16", "fp8")
DECODE_EXPERTS = ("padded", "packed")
# Names of the routed experts' parameters: each rank holds different experts, so data-parallel
# training must not average these across ranks (everything else is replicated).
EXPERT_PARAMETERS = ("w_gate_up", "w_down")

# Places of the parameters, for their seeds.
_ROUTER, _SHARED, _EXPERT, _ATTENTION, _HEAD, _BLOCK = range(6)


# -- configuration --------------------------------------------------------------


@dataclass(frozen=True)
class MoEConfig:
    """Shapes of an MoE layer.

    hidden: H. expert_hidden: F, the width of one expert's SwiGLU.
    num_experts: E routed experts, a multiple of the world size.
    num_topk: K experts per token.
    num_shared_experts: width of the shared SwiGLU in experts (its width is
        ``num_shared_experts * expert_hidden``; 0 = none).
    max_nodes: the most nodes a token's experts may span (None: all nodes).
    routed_scaling_factor: multiplies the routing weights.
    dispatch_dtype: ``"bf16"`` sends rows in the layer's dtype; ``"fp8"`` sends
        e4m3 with per-128-channel scales (dequantised on arrival).
    decode_experts: how :meth:`MoELayer.decode` runs the experts on the low-latency mode's
        ``[E_local, rows per expert, H]`` rows, of which only each expert's first (received) rows
        count. ``"padded"``: a batched matmul over every row. ``"packed"``: only the received rows,
        gathered into one grouped GEMM by indices computed on the device (the host never learns the
        counts); where ``torch._grouped_mm`` does not run on a CUDA device this is ``"padded"``.
    """

    hidden: int
    expert_hidden: int
    num_experts: int
    num_topk: int
    num_shared_experts: int = 1
    max_nodes: int | None = None
    routed_scaling_factor: float = 1.0
    dispatch_dtype: str = "bf16"
    decode_experts: str = "padded"

    def __post_init__(self) -> None:
        for name in ("hidden", "expert_hidden", "num_experts", "num_topk"):
            check_int(name, getattr(self, name))
        check_int("num_shared_experts", self.num_shared_experts, minimum=0)
        if self.num_topk > self.num_experts:
            raise ValueError(f"num_topk: at most num_experts={self.num_experts}, got {self.num_topk}")
        if self.max_nodes is not None:
            check_int("max_nodes", self.max_nodes)
        factor = self.routed_scaling_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise ValueError(f"routed_scaling_factor: expected a positive number, got {factor!r}")
        if self.dispatch_dtype not in DISPATCH_DTYPES:
            raise ValueError(f"dispatch_dtype: expected one of {DISPATCH_DTYPES}, got {self.dispatch_dtype!r}")
        if self.decode_experts not in DECODE_EXPERTS:
            raise ValueError(f"decode_experts: expected one of {DECODE_EXPERTS}, got {self.decode_experts!r}")
        if self.dispatch_dtype == "fp8" and self.hidden % BLOCK_CHANNELS != 0:
            raise ValueError(f"dispatch_dtype: fp8 needs hidden to be a multiple of {BLOCK_CHANNELS}, "
                             f"got {self.hidden}")


@dataclass(frozen=True)
class BlockConfig:
    """A transformer block: attention of ``num_heads`` × ``head_dim``, then the MoE layer."""

    moe: MoEConfig
    num_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        if not isinstance(self.moe, MoEConfig):
            raise TypeError(f"moe: expected a MoEConfig, got {type(self.moe).__name__}")
        check_int("num_heads", self.num_heads)
        check_int("head_dim", self.head_dim)


def deepseek_v3(**moe_overrides) -> BlockConfig:
    """DeepSeek-V3's MoE: hidden 7168, 256 routed experts of width 2048, top-8 on at most 4
    nodes, one shared expert, weights scaled by 2.5. Attention is plain multi-head attention
    of 128 heads × 128 (not MLA): it only stands for the compute between the collectives."""
    moe = dict(hidden=7168, expert_hidden=2048, num_experts=256, num_topk=8, num_shared_experts=1, max_nodes=4,
               routed_scaling_factor=2.5)
    return BlockConfig(MoEConfig(**{**moe, **moe_overrides}), num_heads=128, head_dim=128)


def tiny(**moe_overrides) -> BlockConfig:
    """A test-size block (hidden 128, so fp8 dispatch works; 8 experts, top-3)."""
    moe = dict(hidden=128, expert_hidden=32, num_experts=8, num_topk=3, num_shared_experts=1)
    return BlockConfig(MoEConfig(**{**moe, **moe_overrides}), num_heads=2, head_dim=16)


# -- parameters ---------------------------------------------------------------------


def _derive_seed(seed: int, *place: int) -> int:
    """A seed for one parameter or sub-module: the same in every process (no Python hash)."""
    for part in place:
        seed = (seed * 1_000_003 + part + 1) % 2**63
    return seed


def _weights(shape: tuple[int, ...], fan_in: int, generator: torch.Generator, dtype, device) -> torch.Tensor:
    # Drawn on the CPU in float32, so every device and dtype starts from the same numbers.
    values = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
    return values.to(device=device, dtype=dtype)


def _parameter(shape: tuple[int, ...], fan_in: int, seed: int, dtype, device) -> nn.Parameter:
    return nn.Parameter(_weights(shape, fan_in, torch.Generator().manual_seed(seed), dtype, device))


# -- experts ------------------------------------------------------------------------


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# Compute capabilities (major) whose torch._grouped_mm runs on the device alone, offsets included.
_DEVICE_GROUPED_MM_MAJORS = (9, 10)
# device -> whether torch._grouped_mm runs there (probed once).
_GROUPED_MM_WORKS: dict[torch.device, bool] = {}


def _probe_grouped_mm(device: torch.device) -> bool:
    """Whether torch._grouped_mm runs forward and backward on ``device`` (CUDA bf16, sm90 builds)."""
    try:
        with torch.enable_grad():  # the first call may come under no_grad
            a = torch.ones(16, 16, dtype=torch.bfloat16, device=device, requires_grad=True)
            b = torch.ones(2, 16, 16, dtype=torch.bfloat16, device=device, requires_grad=True)
            out = torch._grouped_mm(a, b, offs=torch.tensor([8, 16], dtype=torch.int32, device=device))
            out.backward(torch.ones_like(out))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def _grouped_mm_runs(device: torch.device, dtype: torch.dtype, num_rows: int, weights: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes ``[num_rows, weights.shape[1]]`` rows of ``dtype`` on ``device``."""
    if not (device.type == "cuda" and dtype == weights.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")):
        return False
    if num_rows == 0 or weights.shape[1] % 8 != 0 or weights.shape[2] % 8 != 0:  # rows of 16-byte multiples
        return False
    if device not in _GROUPED_MM_WORKS:
        _GROUPED_MM_WORKS[device] = _probe_grouped_mm(device)
    return _GROUPED_MM_WORKS[device]


def _use_grouped_mm(x: torch.Tensor, weights: torch.Tensor) -> bool:
    return x.shape[1] == weights.shape[1] and _grouped_mm_runs(x.device, x.dtype, x.shape[0], weights)


def grouped_matmul(x: torch.Tensor, weights: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """``x`` ``[P, A]`` in groups of consecutive rows, group g times ``weights[g]`` ``[A, B]``.

    ``ends`` ``[G]`` int32: where each group's rows end (the running sum of the group sizes); rows past
    ``ends[-1]`` belong to no group and their results are unspecified (``torch._grouped_mm`` leaves them
    unwritten; zeros here). ``torch._grouped_mm`` where it runs (CUDA bf16 on sm90), else one matmul per
    group (empty groups allowed). Returns ``[P, B]``.
    """
    if _use_grouped_mm(x, weights):
        return torch._grouped_mm(x, weights, offs=ends)
    if x.shape[0] == 0:  # no rows: nothing to read from ends (a host sync on CUDA); weights[0] is a view,
        return x @ weights[0]  # so every expert's weights stay in the graph (zero gradients, as per group)
    bounds = [0, *ends.tolist()]
    out = [x[start:end] @ weights[g] for g, (start, end) in enumerate(zip(bounds, bounds[1:]))]
    if bounds[-1] < x.shape[0]:  # rows of no group
        out.append(x.new_zeros(x.shape[0] - bounds[-1], weights.shape[2]))
    return torch.cat(out)


def grouped_swiglu(x: torch.Tensor, ends: torch.Tensor, w_gate_up: torch.Tensor,
                   w_down: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts on rows grouped by expert (group g ends at row ``ends[g]``): ``silu(gate) * up`` then down."""
    return grouped_matmul(_swiglu(grouped_matmul(x, w_gate_up, ends)), w_down, ends)


def packing_indices(counts: torch.Tensor, rows_per_expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices that pack the first ``counts[e]`` rows of each expert's ``rows_per_expert`` (rows laid out
    ``[E, rows_per_expert]``, flattened) back to back, and unpack them; device ops only, no host sync.

    Returns ``(gather, scatter, ends)``, each sized for the worst case: ``packed = rows[gather]`` holds the
    received rows in expert order in its first ``ends[-1]`` rows (expert e's end at ``ends[e]``, int32);
    ``packed[scatter]`` puts them back in their places. The other entries point at row 0 (their values are
    never read).
    """
    num_experts = counts.numel()
    capacity = num_experts * rows_per_expert
    ends = counts.cumsum(0, dtype=torch.int32)
    starts = ends - counts
    place = torch.arange(capacity, device=counts.device)
    # Packed row p: the expert whose range holds it, then its row there.
    expert = torch.searchsorted(ends, place.to(torch.int32), right=True).clamp_(max=num_experts - 1)
    gather = expert * rows_per_expert + (place - starts[expert])
    gather = torch.where(place < ends[-1], gather, 0)
    # Row i of expert e: its packed place while i is one of its received rows.
    expert, row = place // rows_per_expert, place % rows_per_expert
    scatter = torch.where(row < counts[expert], starts[expert] + row, 0)
    return gather, scatter, ends


# -- the layer ----------------------------------------------------------------------


class MoELayer(nn.Module):
    """Router, routed experts (``E / world`` on this rank) and shared experts.

    Args:
        config: the shapes.
        comm: a deepcomm.Communicator (any backend).
        dtype: of parameters and activations: bf16, or float32 on the reference
            backend (for tight CPU tests).
        device: of the parameters.
        seed: parameters are drawn from it (module docstring).

    ``num_nodes``: the nodes routing spreads a token over (the communicator's);
    a one-rank oracle of an N-node run sets it to N.
    """

    def __init__(self, config: MoEConfig, comm, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config: expected a MoEConfig, got {type(config).__name__}")
        if dtype not in autograd.row_dtypes(comm):
            raise TypeError(f"dtype: expected one of {autograd.row_dtypes(comm)} on this backend, got {dtype}")
        topology = comm.topology
        if config.num_experts % topology.world_size != 0:
            raise ValueError(f"num_experts: {config.num_experts} is not a multiple of the world size "
                             f"{topology.world_size}")
        experts_per_node = config.num_experts // topology.num_nodes
        max_nodes = min(config.max_nodes or topology.num_nodes, topology.num_nodes)
        if config.num_topk > max_nodes * experts_per_node:
            raise ValueError(f"num_topk: {config.num_topk} exceeds the {max_nodes * experts_per_node} experts on "
                             f"the {max_nodes} nodes a token may reach")
        self.config, self.comm, self.dtype = config, comm, dtype
        self.num_nodes = topology.num_nodes
        self.num_local_experts = config.num_experts // topology.world_size
        hidden, width = config.hidden, config.expert_hidden

        # Built on "meta" so that its default initialisation draws nothing from the global generator.
        self.gate = nn.Linear(hidden, config.num_experts, bias=False, device="meta")
        self.gate.weight = _parameter((config.num_experts, hidden), hidden, _derive_seed(seed, _ROUTER), dtype, device)
        # Selection-only bias for auxiliary-loss-free balancing (deepcomm.routing.update_expert_bias).
        self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32, device=device))

        first = topology.rank * self.num_local_experts
        gate_up, down = [], []
        for expert in range(first, first + self.num_local_experts):
            generator = torch.Generator().manual_seed(_derive_seed(seed, _EXPERT, expert))
            gate_up.append(_weights((hidden, 2 * width), hidden, generator, dtype, device))
            down.append(_weights((width, hidden), width, generator, dtype, device))
        self.w_gate_up = nn.Parameter(torch.stack(gate_up))  # [E_local, H, 2F]: gate | up
        self.w_down = nn.Parameter(torch.stack(down))  # [E_local, F, H]

        shared = config.num_shared_experts * width
        self.shared_gate_up = _parameter((hidden, 2 * shared), hidden, _derive_seed(seed, _SHARED, 0), dtype, device)
        self.shared_down = _parameter((shared, hidden), max(shared, 1), _derive_seed(seed, _SHARED, 1), dtype, device)
        if config.decode_experts == "packed" and self.w_gate_up.is_cuda:
            # Whether the grouped GEMM runs is probed now, not in the first decode (which may be under graph capture).
            self._packs_decode_rows(self.w_gate_up)

    def _check_tokens(self, x2d: object) -> None:
        if not isinstance(x2d, torch.Tensor):
            raise TypeError(f"x2d: expected a torch.Tensor, got {type(x2d).__name__}")
        if x2d.dtype != self.dtype:
            raise TypeError(f"x2d: expected the layer's dtype {self.dtype}, got {x2d.dtype}")
        if x2d.dim() != 2 or x2d.shape[1] != self.config.hidden:
            raise ValueError(f"x2d: expected [tokens, {self.config.hidden}], got {list(x2d.shape)}")

    # -- stages ---------------------------------------------------------------

    def route(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Node-limited top-K routing: ``(topk_idx [T, K] int64, topk_weights [T, K] float32)``."""
        self._check_tokens(x2d)
        max_nodes = min(self.config.max_nodes or self.num_nodes, self.num_nodes)
        return node_limited_topk(self.gate(x2d), self.config.num_topk, self.num_nodes, max_nodes,
                                 expert_bias=self.expert_bias,
                                 routed_scaling_factor=self.config.routed_scaling_factor)

    def dispatch(self, x2d: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                 previous_event: EventHandle | None = None, async_finish: bool = False) -> DispatchResult:
        """Send the tokens to their experts' ranks (``config.dispatch_dtype`` on the wire)."""
        quantize = self.config.dispatch_dtype == "fp8"
        rows = x2d.to(torch.bfloat16) if quantize else x2d  # fp8 is quantised from bf16
        return autograd.dispatch(self.comm, rows.contiguous(), topk_idx, topk_weights, self.config.num_experts,
                                 previous_event=previous_event, async_finish=async_finish, quantize_fp8=quantize)

    def experts(self, received: DispatchResult) -> torch.Tensor:
        """This rank's experts on the received rows: ``[R, H]``, each row the sum over its local
        experts of weight × expert output, in float32 in k order, then in the layer's dtype.
        In bf16 the rows land in ``comm.combine_input(received.handle)`` (docs/api.md), the receive
        slot: pass them to combine (clone them for anything else: later dispatches overwrite the
        slot, unseen by autograd). Rows replayed without a handle, or whose slot later dispatches
        already reused, get a new tensor.

        The (row, k) pairs are sorted by expert (stably, ``deepcomm.expert_order``) for one grouped
        GEMM. How many there are comes from dispatch's host wait
        (``num_recv_tokens_per_expert_list``), so this issues its kernels without waiting for the
        GPU; only when dispatch skipped that wait does summing ``num_tokens_per_expert`` cost a
        host sync (the contract's count: a result built by hand must count so).
        """
        x = received.x.to(self.dtype)  # fp8 rows arrive as bf16
        local_idx, weights = received.topk_idx, received.topk_weights
        counts = received.num_tokens_per_expert  # [E_local]: the (row, k) pairs of each local expert
        per_expert = received.num_recv_tokens_per_expert_list
        num_pairs = int(counts.sum()) if per_expert is None else sum(per_expert)
        order, rows, ends = expert_order(local_idx, self.num_local_experts, num_pairs)  # by expert, then place
        out = grouped_swiglu(x[rows], ends, self.w_gate_up, self.w_down)
        target = None
        if self.dtype == torch.bfloat16 and received.handle is not None:
            # Written where combine reads (the receive slot, whose rows were gathered above), which
            # spares combine copying every row into registered memory. Nothing saved for backward
            # lives in the slot.
            try:
                target = autograd.combine_input(self.comm, received.handle)
            except SlotReusedError:  # more dispatches in flight than receive slots: combine copies these in
                pass
        return weighted_pair_sum(out, weights, order, target)

    def combine(self, expert_out: torch.Tensor, handle, previous_event: EventHandle | None = None,
                async_finish: bool = False) -> tuple[torch.Tensor, EventHandle]:
        """Bring the expert outputs back to their tokens: ``(y [T, H], event)``."""
        return autograd.combine(self.comm, expert_out, handle, previous_event=previous_event,
                                async_finish=async_finish)

    def shared(self, x2d: torch.Tensor) -> torch.Tensor:
        """The shared experts on this rank's tokens: ``[T, H]``."""
        self._check_tokens(x2d)
        return _swiglu(x2d @ self.shared_gate_up) @ self.shared_down

    def routed(self, x2d: torch.Tensor) -> torch.Tensor:
        """route → dispatch → experts → combine, one after another: ``[T, H]``."""
        topk_idx, topk_weights = self.route(x2d)
        received = self.dispatch(x2d, topk_idx, topk_weights)
        y, _ = self.combine(self.experts(received), received.handle)
        return y

    def forward(self, x2d: torch.Tensor) -> torch.Tensor:
        """The plain (not overlapped) layer: routed experts plus shared experts."""
        return self.routed(x2d) + self.shared(x2d)

    @torch.no_grad()
    def decode(self, x2d: torch.Tensor) -> torch.Tensor:
        """Inference through the low-latency mode (``comm`` made with ``low_latency=``): routed plus
        shared experts, with no host wait (so a decode step can be captured in a CUDA graph).

        The experts need no host sync (``MoEConfig.decode_experts``): batched over each local expert's
        whole receive region ``[E_local, world * max_tokens_per_rank, H]`` (rows past an expert's count
        are computed and never read: combine reads only received rows), or over the received rows
        alone, packed on the device into one grouped GEMM. The
        weights travel with the dispatch, so each rank holding a token's experts sums their outputs
        (k ascending, float32) and sends one partial row per (token, rank), not one row per expert;
        the result differs from :meth:`forward`'s only by rounding.
        """
        self._check_tokens(x2d)
        topk_idx, topk_weights = self.route(x2d)
        received = self.decode_dispatch(x2d, topk_idx, topk_weights)
        routed, _, _ = self.decode_combine(self.decode_experts(received), received.handle)
        return routed.to(self.dtype) + self.shared(x2d)

    # The steps of :meth:`decode`, for a scheduler that overlaps two micro-batches (deepcomm.overlap).

    def decode_dispatch(self, x2d: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                        previous_event: EventHandle | None = None, async_finish: bool = False,
                        return_recv_hook: bool = False):
        """The low-latency dispatch of :meth:`decode`: the weights travel with the rows (the owners sum)."""
        return self.comm.low_latency_dispatch(x2d.to(torch.bfloat16).contiguous(), topk_idx, self.config.num_experts,
                                              quantize_fp8=self.config.dispatch_dtype == "fp8",
                                              previous_event=previous_event, async_finish=async_finish,
                                              return_recv_hook=return_recv_hook, topk_weights=topk_weights)

    def decode_experts(self, received) -> torch.Tensor:
        """bf16 ``[E_local, rows per expert, H]``: the local experts' outputs for their received rows
        (``MoEConfig.decode_experts`` says how; the other rows hold anything)."""
        rows, scales = received.x, received.x_scales
        local_experts, rows_per_expert = rows.shape[0], rows.shape[1]
        packed = self._packs_decode_rows(rows)
        if packed:
            gather, scatter, ends = packing_indices(received.num_tokens_per_expert, rows_per_expert)
            # As bytes: the gather needs no kernel for fp8 rows.
            rows = rows.flatten(0, 1).view(torch.uint8).index_select(0, gather).view(rows.dtype)
            scales = None if scales is None else scales.flatten(0, 1).index_select(0, gather)
        if scales is not None:  # fp8 rows: dequantised per 128-channel block
            rows = (rows.float().unflatten(-1, (-1, BLOCK_CHANNELS)) * scales.unsqueeze(-1)).flatten(-2)
        rows = rows.to(self.dtype)
        if packed:
            out = grouped_swiglu(rows, ends, self.w_gate_up, self.w_down).index_select(0, scatter)
            out = out.view(local_experts, rows_per_expert, -1)
        else:
            out = torch.bmm(_swiglu(torch.bmm(rows, self.w_gate_up)), self.w_down)  # [E_local, rows, H]
        return out.to(torch.bfloat16).contiguous()

    def _packs_decode_rows(self, rows: torch.Tensor) -> bool:
        """Whether decode_experts packs: asked for, and (on CUDA) a grouped GEMM that needs no host sync: torch
        runs ``_grouped_mm`` elsewhere too, but with the group sizes read on the host below sm90."""
        if self.config.decode_experts != "packed":
            return False
        if not rows.is_cuda:
            return True
        if torch.cuda.get_device_capability(rows.device)[0] not in _DEVICE_GROUPED_MM_MAJORS:
            return False
        num_rows = rows.shape[0] * rows.shape[1]
        return all(_grouped_mm_runs(rows.device, self.dtype, num_rows, w) for w in (self.w_gate_up, self.w_down))

    def decode_combine(self, expert_out: torch.Tensor, handle, previous_event: EventHandle | None = None,
                       async_finish: bool = False, return_recv_hook: bool = False):
        """The low-latency combine of :meth:`decode`: ``(routed [T, H] bf16, event, hook)``. The owners' sums
        read the experts' outputs from any memory of this rank: no copy into the receive area."""
        if not async_finish and not return_recv_hook and previous_event is None:
            return self.comm.low_latency_combine(expert_out, None, handle), None, None
        routed, event, hook = self.comm.low_latency_combine_async(expert_out, None, handle,
                                                                  previous_event=previous_event,
                                                                  return_recv_hook=return_recv_hook)
        if not async_finish and not return_recv_hook:
            event.wait()
        return routed, event, hook


# -- the block and the model ----------------------------------------------------------


def _rms_norm(hidden: int, dtype, device) -> nn.RMSNorm:
    return nn.RMSNorm(hidden, eps=1e-6, device=device, dtype=dtype)


class TransformerBlock(nn.Module):
    """Pre-norm causal self-attention and pre-norm MoE, each with a residual, on ``[B, S, H]``.

    Stages for a scheduler: ``attend`` (x + attention), ``moe_input`` (the
    normalised tokens, flattened), the MoE layer's stages (``self.moe``), and
    ``finish`` (adds the MoE output back).
    """

    def __init__(self, config: BlockConfig, comm, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(config, BlockConfig):
            raise TypeError(f"config: expected a BlockConfig, got {type(config).__name__}")
        self.config, self.dtype = config, dtype
        hidden, width = config.moe.hidden, config.num_heads * config.head_dim
        self.moe = MoELayer(config.moe, comm, dtype, device, seed)
        self.attention_norm = _rms_norm(hidden, dtype, device)
        self.w_qkv = _parameter((hidden, 3 * width), hidden, _derive_seed(seed, _ATTENTION, 0), dtype, device)
        self.w_out = _parameter((width, hidden), width, _derive_seed(seed, _ATTENTION, 1), dtype, device)
        self.moe_norm = _rms_norm(hidden, dtype, device)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """``x + attention(norm(x))``, causal: ``[B, S, H]``."""
        hidden = self.config.moe.hidden
        if not isinstance(x, torch.Tensor) or x.dtype != self.dtype:
            raise TypeError(f"x: expected a {self.dtype} torch.Tensor, got {getattr(x, 'dtype', type(x))}")
        if x.dim() != 3 or x.shape[2] != hidden:
            raise ValueError(f"x: expected [batch, sequence, {hidden}], got {list(x.shape)}")
        batch, seq, _ = x.shape
        heads, head_dim = self.config.num_heads, self.config.head_dim
        qkv = (self.attention_norm(x) @ self.w_qkv).view(batch, seq, 3, heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, S, head_dim]
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + attended.transpose(1, 2).reshape(batch, seq, heads * head_dim) @ self.w_out

    def moe_input(self, h: torch.Tensor) -> torch.Tensor:
        """The MoE layer's tokens: ``norm(h)`` as ``[B*S, H]``."""
        return self.moe_norm(h).reshape(-1, self.config.moe.hidden)

    def finish(self, h: torch.Tensor, routed: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """``h`` plus the MoE output (routed + shared experts): ``[B, S, H]``."""
        return h + (routed + shared).view(h.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attend(x)
        x2d = self.moe_input(h)
        return self.finish(h, self.moe.routed(x2d), self.moe.shared(x2d))

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` with the MoE layer through the low-latency mode (:meth:`MoELayer.decode`): no host
        wait. Attention keeps no cache: it runs over the ``S`` tokens of ``x [B, S, H]`` alone."""
        h = self.attend(x)
        return h + self.moe.decode(self.moe_input(h)).view(h.shape)


class MoEModel(nn.Module):
    """``num_layers`` blocks, a final norm and a linear head: ``[B, S, H]`` → ``[B, S, H]``.

    No embedding: inputs are hidden states, for a toy regression or LM-like loss.
    Block ``i`` is seeded from ``seed`` and ``i``.
    """

    def __init__(self, config: BlockConfig, num_layers: int, comm, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None, seed: int = 0) -> None:
        super().__init__()
        check_int("num_layers", num_layers)
        if not isinstance(config, BlockConfig):
            raise TypeError(f"config: expected a BlockConfig, got {type(config).__name__}")
        hidden = config.moe.hidden
        self.blocks = nn.ModuleList(
            TransformerBlock(config, comm, dtype, device, _derive_seed(seed, _BLOCK, layer))
            for layer in range(num_layers)
        )
        self.norm = _rms_norm(hidden, dtype, device)
        self.head = _parameter((hidden, hidden), hidden, _derive_seed(seed, _HEAD), dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.head
