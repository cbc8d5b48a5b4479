"""The communicator: one per process group; validates, picks the path, runs it.

Backends:
- ``"reference"``: the pure-torch path (deepcomm.reference) over any
  torch.distributed backend. It is the only backend of this release; the
  reserved-SM kernels (intranode, internode, low-latency) plug in here.
- ``"auto"``: the fastest backend available for the group and tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from deepcomm.events import EventHandle
from deepcomm.reference import ReferenceCommunicator
from deepcomm.results import DispatchResult
from deepcomm.topology import Topology

BACKENDS = ("auto", "reference")
DEFAULT_NUM_SMS = 24


class Communicator:
    """Expert-parallel dispatch and combine among the ranks of ``group``.

    Args:
        group: the process group (default: the world).
        num_sms: SMs each communication kernel may occupy (persistent grid size).
        ranks_per_node: ranks per node; default: ranks sharing a host. Set it
            lower to run the inter-node path inside one host (docs/design.md).
        backend: one of ``BACKENDS``.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        num_sms: int = DEFAULT_NUM_SMS,
        ranks_per_node: int | None = None,
        backend: str = "auto",
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if isinstance(num_sms, bool) or not isinstance(num_sms, int) or num_sms <= 0:
            raise ValueError(f"num_sms: expected a positive int, got {num_sms!r}")
        self.num_sms = num_sms
        self._impl = ReferenceCommunicator(group, ranks_per_node)
        self.backend = "reference"

    @property
    def topology(self) -> Topology:
        return self._impl.topology

    @property
    def rank(self) -> int:
        return self.topology.rank

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    def dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        num_experts: int,
        x_scales: torch.Tensor | None = None,
        quantize_fp8: bool = False,
        power_of_two_scales: bool = False,
        previous_event: EventHandle | None = None,
    ) -> DispatchResult:
        """See :meth:`deepcomm.reference.ReferenceCommunicator.dispatch` (same contract on every backend)."""
        return self._impl.dispatch(
            x, topk_idx, topk_weights, num_experts, x_scales, quantize_fp8, power_of_two_scales, previous_event
        )

    def dispatch_async(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        num_experts: int,
        x_scales: torch.Tensor | None = None,
        quantize_fp8: bool = False,
        power_of_two_scales: bool = False,
        previous_event: EventHandle | None = None,
    ) -> DispatchResult:
        """:meth:`dispatch` on the communication stream; wait on ``result.event`` before use."""
        return self._impl.dispatch_async(
            x, topk_idx, topk_weights, num_experts, x_scales, quantize_fp8, power_of_two_scales, previous_event
        )

    def combine(self, expert_out: torch.Tensor, handle: object) -> torch.Tensor:
        """``[R, H]`` bf16 rows back to their tokens, reduced in a fixed order: ``[T, H]`` bf16."""
        return self._impl.combine(expert_out, handle)

    def combine_async(
        self, expert_out: torch.Tensor, handle: object, previous_event: EventHandle | None = None
    ) -> tuple[torch.Tensor, EventHandle]:
        """:meth:`combine` on the communication stream; returns ``(y, event)``."""
        return self._impl.combine_async(expert_out, handle, previous_event)
