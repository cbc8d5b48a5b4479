"""What dispatch returns; shared by every backend."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch

from deepcomm.events import EventHandle


@dataclass
class DispatchResult:
    """Tokens received by this rank, in order of source rank, then source token index.

    x:                     ``[R, H]`` bf16, or fp8 e4m3 when dispatched as fp8
    x_scales:              ``[R, H/128]`` float32 for fp8, else None
    topk_idx:              ``[R, K]`` int64, local expert ids (``e - rank * E/world``), -1 where not local
    topk_weights:          ``[R, K]`` float32, 0 where ``topk_idx`` is -1
    num_tokens_per_expert: ``[E/world]`` int32, received (token, k) entries per local expert
    num_recv_tokens_per_rank: received rows from each source rank (host list); None when the
                           caller passed num_recv_tokens and the host skipped its wait
    handle:                what :meth:`combine` needs to send results back
    event:                 reached when the outputs are ready on the communication stream
    num_recv_tokens_per_expert_list: ``num_tokens_per_expert`` as a host list, learnt in the same
                           host wait as ``num_recv_tokens_per_rank`` (sizes a grouped GEMM with no
                           further sync); None when that wait was skipped
    """

    x: torch.Tensor
    x_scales: torch.Tensor | None
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    num_tokens_per_expert: torch.Tensor
    num_recv_tokens_per_rank: list[int] | None
    handle: Any
    event: EventHandle
    num_recv_tokens_per_expert_list: list[int] | None = None


_OWNER_IDS = itertools.count(1)


class HandleOwner:
    """Stamps the handles an object makes with a number no other object of the process has had: ``id()`` is
    reused once an object dies, and a dead communicator's handle must not pass for one of a live one's."""

    _owner_id: int | None = None

    @property
    def owner_id(self) -> int:
        if self._owner_id is None:
            self._owner_id = next(_OWNER_IDS)
        return self._owner_id
