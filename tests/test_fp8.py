"""Per-128-channel fp8 quantisation: accuracy, scale rules, and bad input."""

from __future__ import annotations

import pytest
import torch

from deepcomm.fp8 import FP8_MAX, dequantize_fp8, quantize_fp8, round_up_to_power_of_two


def test_round_trip_error_is_within_e4m3_precision():
    x = (torch.randn(64, 1024) * torch.logspace(-3, 3, 64).unsqueeze(1)).to(torch.bfloat16)
    q, scales = quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and scales.shape == (64, 8) and scales.dtype == torch.float32
    back = dequantize_fp8(q, scales).float()
    block_amax = x.float().view(64, 8, 128).abs().amax(-1, keepdim=True)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 of the block's largest value.
    error = (back.view(64, 8, 128) - x.float().view(64, 8, 128)).abs()
    assert bool((error <= block_amax * 2**-4 + 1e-6).all())


def test_block_maximum_maps_to_e4m3_maximum():
    x = torch.randn(16, 256).to(torch.bfloat16)
    q, _ = quantize_fp8(x)
    assert torch.allclose(q.float().view(16, 2, 128).abs().amax(-1), torch.full((16, 2), FP8_MAX), rtol=0.07)


def test_power_of_two_scales_are_powers_of_two_and_cover_amax():
    x = torch.randn(32, 512).to(torch.bfloat16) * 5
    q, scales = quantize_fp8(x, power_of_two_scales=True)
    mantissa, _ = torch.frexp(scales)
    assert bool((mantissa == 0.5).all())
    amax = x.float().view(32, 4, 128).abs().amax(-1)
    assert bool((scales * FP8_MAX >= amax).all())
    assert bool(q.float().isfinite().all())


def test_round_up_to_power_of_two_is_exact_at_and_next_to_powers():
    values = torch.tensor([1.0, 0.75, 2.0**-10 * (1 + 2.0**-23), 3.0, 2.0**-126])
    expected = torch.tensor([1.0, 1.0, 2.0**-9, 4.0, 2.0**-126])
    assert torch.equal(round_up_to_power_of_two(values), expected)


def test_all_zero_block_gets_finite_scale_and_zero_values():
    q, scales = quantize_fp8(torch.zeros(2, 128, dtype=torch.bfloat16))
    assert bool(scales.isfinite().all()) and bool((scales > 0).all())
    assert bool((q.float() == 0).all())


@pytest.mark.parametrize(
    "x,error,match",
    [
        (torch.zeros(4, 100, dtype=torch.bfloat16), ValueError, "hidden"),
        (torch.zeros(4, dtype=torch.bfloat16), ValueError, "x"),
        (torch.zeros(4, 128, dtype=torch.int32), TypeError, "x"),
        ([1.0], TypeError, "x"),
    ],
)
def test_quantize_rejects_bad_input(x, error, match):
    with pytest.raises(error, match=match):
        quantize_fp8(x)


def test_dequantize_checks_scales():
    q, scales = quantize_fp8(torch.randn(4, 256).to(torch.bfloat16))
    with pytest.raises(ValueError, match="scales"):
        dequantize_fp8(q, scales[:, :1])
    with pytest.raises(TypeError, match="q"):
        dequantize_fp8(q.float(), scales)


def test_power_of_two_scales_keep_inf_and_nan_as_they_are():
    """frexp gives inf and NaN exponent 0: without care their blocks were scaled by 1 and an inf came back 448."""
    rounded = round_up_to_power_of_two(torch.tensor([float("inf"), float("nan"), 3.0, 4.0, 1e-30]))
    assert rounded[0] == float("inf") and rounded[1].isnan()
    assert rounded[2:].tolist() == [4.0, 4.0, 2.0 ** -99]
    row = torch.zeros(1, 128)
    row[0, :3] = torch.tensor([float("inf"), 1000.0, 1e-3])
    q, scales = quantize_fp8(row.to(torch.bfloat16), power_of_two_scales=True)
    assert scales[0, 0] == float("inf")  # not 1.0: the block does not come back finite
