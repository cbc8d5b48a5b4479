"""Per-128-channel fp8 (e4m3) quantisation, the format dispatch carries.

Each row of ``x`` ``[T, H]`` is cut into blocks of 128 channels; a block is
stored as e4m3 values and one float32 scale, so ``x ≈ q * scale``:

    amax  = max(|x_block|) in float32, at least ``AMAX_FLOOR`` (an all-zero
            block still gets a finite scale)
    scale = amax * float32(1 / 448)       (448 = largest finite e4m3; one float32
            multiply, because torch turns division by a scalar into a multiply
            by its reciprocal on CUDA but not on the CPU)
            or, with ``power_of_two_scales``, that scale rounded up to a power
            of two exactly (from its exponent bits, no log2)
    q     = e4m3(clamp(x / scale, ±448))  (float32 division, round to nearest)

Kernels that quantise inside dispatch follow these exact formulas so that
their output is bit-identical to this module's, on any device.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK_CHANNELS = 128
AMAX_FLOOR = 1e-4


def num_scale_blocks(hidden: int, name: str = "hidden") -> int:
    """Scale blocks of a row; ``name``: the argument whose hidden size it is, for the error."""
    if hidden % BLOCK_CHANNELS != 0:
        raise ValueError(f"{name}: fp8 needs a hidden size that is a multiple of {BLOCK_CHANNELS} channels, got {hidden}")
    return hidden // BLOCK_CHANNELS


def round_up_to_power_of_two(values: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= each positive float32 value, computed exactly; inf and NaN stay as they are
    (frexp gives them exponent 0: a block with one would otherwise be scaled by 1 and its inf made finite)."""
    mantissa, exponent = torch.frexp(values)  # values = mantissa * 2**exponent, mantissa in [0.5, 1)
    exact = mantissa == 0.5
    powers = torch.ldexp(torch.ones_like(values), torch.where(exact, exponent - 1, exponent))
    return torch.where(values.isfinite(), powers, values)


def quantize_fp8(x: torch.Tensor, power_of_two_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` ``[T, H]`` (bf16/fp16/fp32) to ``(q [T, H] e4m3, scales [T, H/128] float32)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x: expected 2 dimensions [tokens, hidden], got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point or x.dtype == FP8_DTYPE:
        raise TypeError(f"x: expected a bf16/fp16/fp32 tensor, got {x.dtype}")
    num_tokens, hidden = x.shape
    blocks = x.float().view(num_tokens, num_scale_blocks(hidden, "x"), BLOCK_CHANNELS)
    amax = blocks.abs().amax(dim=-1).clamp_min(AMAX_FLOOR)
    scales = amax * torch.tensor(1.0 / FP8_MAX, dtype=torch.float32, device=x.device)
    if power_of_two_scales:
        scales = round_up_to_power_of_two(scales)
    q = (blocks / scales.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(num_tokens, hidden), scales.contiguous()


def dequantize_fp8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8`: ``q [T, H]`` e4m3 and ``scales [T, H/128]`` → ``[T, H]`` ``dtype``."""
    if q.dtype != FP8_DTYPE:
        raise TypeError(f"q: expected {FP8_DTYPE}, got {q.dtype}")
    if q.dim() != 2:
        raise ValueError(f"q: expected 2 dimensions, got shape {tuple(q.shape)}")
    num_tokens, hidden = q.shape
    expected = (num_tokens, num_scale_blocks(hidden, "q"))
    if scales.dtype != torch.float32 or tuple(scales.shape) != expected:
        raise ValueError(f"scales: expected float32 of shape {expected}, got {scales.dtype} {tuple(scales.shape)}")
    blocks = q.float().view(num_tokens, expected[1], BLOCK_CHANNELS) * scales.unsqueeze(-1)
    return blocks.view(num_tokens, hidden).to(dtype)
