"""Argument checks shared by every dispatch/combine backend.

Each check raises TypeError (wrong type or dtype) or ValueError (wrong shape,
device, layout or value) whose message starts with the argument's name.
"""

from __future__ import annotations

import torch

from deepcomm.fp8 import FP8_DTYPE, num_scale_blocks

DISPATCH_DTYPES = (torch.bfloat16, FP8_DTYPE)


def check_tensor(
    name: str,
    value: object,
    dtypes: tuple[torch.dtype, ...],
    ndim: int,
    device: torch.device | None = None,
) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        wanted = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype {wanted}, got {value.dtype}")
    if value.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(value.shape)}")
    if device is not None and value.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {value.device}")
    if not value.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (call .contiguous())")
    return value


def check_int(name: str, value: object, minimum: int = 1) -> None:
    """ValueError naming ``name`` unless ``value`` is an int (a bool is not) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def check_positive_ints(config: object, names: tuple[str, ...]) -> None:
    """Each named field of ``config`` is a positive int (a bool is not); ValueError naming the first that is not."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")


def check_num_experts(num_experts: object, world_size: int) -> int:
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        raise TypeError(f"num_experts: expected an int, got {type(num_experts).__name__}")
    if num_experts <= 0 or num_experts % world_size != 0:
        raise ValueError(
            f"num_experts: must be a positive multiple of the world size {world_size}, got {num_experts}"
        )
    return num_experts


def check_topk_idx(
    topk_idx: object,
    num_tokens: int | None,
    num_experts: int,
    device: torch.device | None,
    check_values: bool = True,
) -> torch.Tensor:
    """Type, shape and value checks; ``num_tokens=None`` accepts any token count.

    The value check reads the ids on the host (a device sync); the kernel path
    passes ``check_values=False`` and checks on the GPU instead.
    """
    check_tensor("topk_idx", topk_idx, (torch.int64,), 2, device)
    assert isinstance(topk_idx, torch.Tensor)
    if (num_tokens is not None and topk_idx.shape[0] != num_tokens) or topk_idx.shape[1] == 0:
        wanted = "T" if num_tokens is None else str(num_tokens)
        raise ValueError(f"topk_idx: expected shape [{wanted}, K>0], got {list(topk_idx.shape)}")
    if check_values and topk_idx.numel() > 0:
        low, high = torch.aminmax(topk_idx)
        low, high = int(low), int(high)
        if low < -1 or high >= num_experts:
            raise ValueError(
                f"topk_idx: expert ids must lie in [-1, {num_experts}) (-1 = no expert), found [{low}, {high}]"
            )
    return topk_idx


def check_dispatch_inputs(
    x: object,
    x_scales: object,
    topk_idx: object,
    topk_weights: object,
    num_experts: object,
    world_size: int,
    device: torch.device | None = None,
    check_values: bool = True,
) -> None:
    """Validate dispatch's arguments against the contract in docs/api.md.

    ``check_values=False`` skips the host-side expert-id range check (the
    kernels count invalid ids on the GPU and raise after notify).
    """
    check_tensor("x", x, DISPATCH_DTYPES, 2, device)
    assert isinstance(x, torch.Tensor)
    num_tokens, hidden = x.shape
    if hidden == 0:
        raise ValueError("x: hidden size must be > 0")
    if x.dtype == FP8_DTYPE:
        if x_scales is None:
            raise ValueError("x_scales: required when x is fp8 (float32 [tokens, hidden/128])")
        check_tensor("x_scales", x_scales, (torch.float32,), 2, x.device)
        assert isinstance(x_scales, torch.Tensor)
        expected = (num_tokens, num_scale_blocks(hidden, "x"))
        if tuple(x_scales.shape) != expected:
            raise ValueError(f"x_scales: expected shape {list(expected)}, got {list(x_scales.shape)}")
    elif x_scales is not None:
        raise ValueError("x_scales: only valid with fp8 x; pass None for bf16")
    experts = check_num_experts(num_experts, world_size)
    check_topk_idx(topk_idx, num_tokens, experts, x.device, check_values)
    assert isinstance(topk_idx, torch.Tensor)
    check_tensor("topk_weights", topk_weights, (torch.float32,), 2, x.device)
    assert isinstance(topk_weights, torch.Tensor)
    if topk_weights.shape != topk_idx.shape:
        raise ValueError(
            f"topk_weights: expected the shape of topk_idx {list(topk_idx.shape)}, got {list(topk_weights.shape)}"
        )


def check_combine_inputs(expert_out: object, num_recv_tokens: int, hidden: int, device: torch.device) -> None:
    check_tensor("expert_out", expert_out, (torch.bfloat16,), 2, device)
    assert isinstance(expert_out, torch.Tensor)
    if tuple(expert_out.shape) != (num_recv_tokens, hidden):
        raise ValueError(
            f"expert_out: expected shape [{num_recv_tokens}, {hidden}] (the dispatched rows), "
            f"got {list(expert_out.shape)}"
        )
