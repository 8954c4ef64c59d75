"""gemmlowp's fixed-point arithmetic (gemmlowp/fixedpoint/fixedpoint.h), on int32 values held
in int64 tensors: the building blocks of TFLite's own int8 kernels (`care_q.quant.emulation.tflite`)."""

from __future__ import annotations

import torch

I32_MIN, I32_MAX = -(2 ** 31), 2 ** 31 - 1


def srdhm(a: torch.Tensor, b: torch.Tensor | int) -> torch.Tensor:
    """gemmlowp SaturatingRoundingDoublingHighMul of int32 values (int64 tensors)."""
    ab = a * b
    ab = ab + torch.where(ab >= 0, 2 ** 30, 1 - 2 ** 30)
    hi = torch.div(ab, 2 ** 31, rounding_mode="trunc")
    return torch.where((a == I32_MIN) & (b == I32_MIN), I32_MAX, hi)


def rounding_divide_by_pot(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """gemmlowp RoundingDivideByPOT: x / 2^e rounded half away from zero."""
    mask = (1 << e) - 1
    return (x >> e) + ((x & mask) > (mask >> 1) + (x < 0)).long()


def sat_shift_left(x: torch.Tensor, e: int) -> torch.Tensor:
    """gemmlowp SaturatingRoundingMultiplyByPOT<e> for e > 0 (int32 saturation)."""
    t = (1 << (31 - e)) - 1
    return torch.where(x > t, I32_MAX, torch.where(x < -t, I32_MIN, x * (1 << e)))


def bit_length(x: torch.Tensor) -> torch.Tensor:
    """Bits of non-negative int64 values below 2^53 (0 for 0)."""
    return torch.where(x > 0, torch.frexp(x.double())[1].long(), 0)


def wrap32(x: torch.Tensor) -> torch.Tensor:
    """Two's-complement int32 wrap-around of int64 values."""
    return (x + 2 ** 31) % 2 ** 32 - 2 ** 31


def one_over_one_plus_x(a: torch.Tensor) -> torch.Tensor:
    """gemmlowp one_over_one_plus_x_for_x_in_0_1 on Q0.31 raws (int64 tensors): 1 / (1 + a) by
    three Newton-Raphson steps in Q2.29 from 48/17 - 32/17 d, d = (1 + a) / 2, returned in Q0.31."""
    s = a + I32_MAX  # RoundingHalfSum(a, F0::One()), F0::One() = INT32_MAX
    half = torch.div(s + torch.where(s >= 0, 1, -1), 2, rounding_mode="trunc")
    x = 1515870810 + srdhm(half, -1010580540)  # 48/17 + d * (-32/17), Q2.29
    for _ in range(3):
        one_minus = (1 << 29) - srdhm(half, x)
        x = x + sat_shift_left(srdhm(x, one_minus), 2)  # Rescale<2> of the Q4.27 product
    return sat_shift_left(x, 1)  # ExactMulByPot<-1>, then Rescale<0>
