"""TFLite's own int8 kernels (the ones XNNPACK does not take, or is kept off) as ai-edge-litert
runs them, bit for bit (tests/export/test_tflite_int8.py): DIV, L2_NORMALIZATION, RELU, and the
requantization of the optimized depthwise conv. Sources are files of google-ai-edge/LiteRT
(tflite/kernels/...), built on gemmlowp's fixed point (`care_q.quant.emulation.fixedpoint`).
Codes are integer-valued tensors minus zero points."""

from __future__ import annotations

import numpy as np
import torch

from care_q.quant.emulation.fixedpoint import (
    I32_MAX,
    bit_length,
    one_over_one_plus_x,
    rounding_divide_by_pot,
    sat_shift_left,
    srdhm,
    wrap32,
)

_F32 = np.float32


def tflite_quantize_multiplier(m: float) -> tuple[int, int]:
    """TFLite's QuantizeMultiplier (tflite/kernels/internal/quantization_util.cc): m = q * 2^shift
    with q a Q0.31 integer in [2^30, 2^31), rounded half away from zero."""
    if m == 0.0:
        return 0, 0
    frac, shift = np.frexp(np.float64(m))
    q = int(np.floor(abs(frac) * 2.0 ** 31 + 0.5)) * (1 if frac > 0 else -1)
    if abs(q) == 2 ** 31:
        q, shift = q // 2, shift + 1
    if shift < -31:
        return 0, 0
    return q, int(shift)


def multiply_by_quantized_multiplier(x: torch.Tensor, m, shift) -> torch.Tensor:
    """TFLite's MultiplyByQuantizedMultiplier(int32 x, m, shift) (tflite/kernels/internal/common.cc,
    double rounding: the default build): x * m * 2^shift / 2^31, rounded twice, half away from zero."""
    shift = torch.as_tensor(shift, dtype=torch.int64)
    return rounding_divide_by_pot(srdhm(wrap32(x << shift.clamp(min=0)), m), (-shift).clamp(min=0))


def inv_sqrt_multiplier_exp(acc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TFLite's GetInvSqrtQuantizedMultiplierExp(acc, kReverseShift) (tflite/kernels/internal/common.h):
    1/sqrt(acc) of int32 ``acc`` >= 0 as a Q0.31 multiplier and the shift to pass to
    MultiplyByQuantizedMultiplier (5 Newton-Raphson steps in gemmlowp Q3.28; acc <= 1 gives
    INT32_MAX and 0)."""
    acc = acc.long()
    small = acc <= 1  # the kernel's special case: multiplier INT32_MAX, shift 0
    v = torch.where(small, 4, acc)
    shift = torch.full_like(v, 11)
    while bool((v >= 1 << 29).any()):
        big = v >= 1 << 29
        v, shift = torch.where(big, v // 4, v), shift + big.long()
    bits = bit_length(v)  # CountLeadingZeros = 32 - bits
    pairs = (31 - bits) // 2 - 1  # (CountLeadingZeros - 1) / 2 - 1
    shift = shift - pairs
    v = v << (2 * pairs)  # now in [2^27, 2^29)
    half_v = rounding_divide_by_pot(v >> 1, torch.ones_like(v))  # F3 input / 2
    r = torch.full_like(v, 1 << 28)  # F3 one
    for _ in range(5):  # x = 1.5 x - (v / 2) x^3 (Rescale<3> of the F9 / F6 products: saturating shifts)
        x3 = sat_shift_left(srdhm(srdhm(r, r), r), 6)
        r = sat_shift_left(wrap32(srdhm(torch.full_like(r, 3 << 27), r) - srdhm(half_v, x3)), 3)
    r = srdhm(r, 1518500250)  # * sqrt(2) / 2 (Q0.31)
    neg = shift < 0
    r = torch.where(neg, wrap32(r << torch.where(neg, -shift, 0)), r)
    shift = torch.where(neg, 0, shift)
    r = torch.where(small, I32_MAX, r)
    return r, torch.where(small, 0, -shift)  # kReverseShift


def tflite_l2norm_codes(x: torch.Tensor) -> torch.Tensor:
    """TFLite's int8 L2_NORMALIZATION over the last dim (reference_integer_ops::L2Normalization in
    tflite/kernels/internal/reference/integer_ops/l2normalization.h; XNNPACK does not take the op)
    on codes minus the input zero point: acc = sum x^2 (int32), 1/sqrt(acc) as a fixed-point
    multiplier and shift (GetInvSqrtQuantizedMultiplierExp in tflite/kernels/internal/common.h:
    5 Newton-Raphson steps in gemmlowp Q3.28), then
    ``MultiplyByQuantizedMultiplier(x, mult, shift + 7)`` (double rounding, the default build),
    clamped to [-128, 127]. The output is at scale 1/128, zero point 0; the input scale is unused."""
    x = x.long()
    r, s = inv_sqrt_multiplier_exp((x * x).sum(-1, keepdim=True))
    return torch.clamp(multiply_by_quantized_multiplier(x, r, s + 7), -128, 127).double()


def tflite_div_codes(a: torch.Tensor, b: torch.Tensor, s_a: float, s_b: float, s_out: float,
                     z_out: int) -> torch.Tensor:
    """TFLite's int8 DIV (XNNPACK has none; reference_ops::DivElementwise and BroadcastDivSlowQuantized
    in tflite/kernels/internal/reference/div.h) on codes minus zero points ``a / b`` (b != 0):
    1/b as a Q0.31 reciprocal and shift (GetReciprocal: gemmlowp Newton-Raphson), a shifted left
    by its headroom times it, then the output multiplier QuantizeMultiplier(float32(s_a /
    float32(s_b * s_out))) with rounding half away from zero, plus z_out, clamped to [-128, 127].
    Returns codes minus z_out."""
    a, b = torch.broadcast_tensors(a.long(), b.long())
    neg = b < 0
    a, b = torch.where(neg, -a, a), torch.where(neg, -b, b)
    m, out_shift = tflite_quantize_multiplier(float(_F32(_F32(s_a) / _F32(_F32(s_b) * _F32(s_out)))))
    hp1 = 32 - bit_length(b)                    # CountLeadingZeros(b)
    recip_shift = 31 - hp1                      # GetReciprocal(b, 31, &recip_shift)
    inv = one_over_one_plus_x((b << hp1) - (1 << 31))
    headroom = torch.where(a >= 0, 31 - bit_length(a), 32 - bit_length(2 * a.abs() - 1))  # CountLeadingSignBits
    q = srdhm(a << headroom, inv)               # MultiplyByQuantizedMultiplierGreaterThanOne
    e = recip_shift + headroom - out_shift      # MultiplyByQuantizedMultiplierSmallerThanOneExp's right shift
    if bool((e < 0).any()):
        raise ValueError(f"TFLite int8 DIV: output multiplier 2^{out_shift} too large to emulate")
    x = srdhm(q, m)
    # gemmlowp RoundingDivideByPOT as compiled for x86: the mask is (1 << e) - 1 in 64 bits cut to 32
    # (all ones from e = 32), the arithmetic shift takes e mod 32. e reaches 32 and more for small
    # quotients (|a| small, |b| large); there TFLite returns garbage that saturates, as emulated.
    mask = torch.where(e >= 32, -1, (1 << e.clamp(max=31)) - 1)
    y = (x >> (e & 31)) + ((x & mask) > (mask >> 1) + (x < 0)).long()
    return torch.clamp(y + z_out, -128, 127).double() - z_out


def tflite_relu_codes(x: torch.Tensor, s_in: float, s_out: float, z_out: int) -> torch.Tensor:
    """TFLite's int8 RELU (XNNPACK takes float RELU only): on codes minus the input zero point,
    ``z_out + MultiplyByQuantizedMultiplier(x, QuantizeMultiplier(float32(s_in / s_out)))`` clamped
    to [max(-128, z_out), 127] (ReluPrepare / QuantizedReluX in tflite/kernels/activations.cc,
    reference_ops::ReluX). Returns codes minus z_out."""
    m, shift = tflite_quantize_multiplier(float(_F32(_F32(s_in) / _F32(s_out))))
    y = multiply_by_quantized_multiplier(x.long(), m, shift)
    return torch.clamp(y, max(-128 - z_out, 0), 127 - z_out).double()


def tflite_conv_requant_codes(acc: torch.Tensor, s_in: float, s_w, s_out: float) -> torch.Tensor:
    """TFLite's int8 per-channel requantization in its optimized depthwise conv
    (optimized_integer_ops::DepthwiseConvPerChannel): channel c's multiplier is
    QuantizeMultiplier(double(s_in) * double(s_w[c]) / double(s_out)) of the float32 scales in the
    file (PopulateConvolutionQuantizationParams); the accumulator is shifted left by the positive
    part of the shift, SaturatingRoundingDoublingHighMul'ed by the multiplier, then shifted right by
    the negative part with rounding half *up* (add 2^(e-1), arithmetic shift: the SIMD rounding
    shift, not the reference kernel's half-away-from-zero RoundingDivideByPOT; found bit for bit
    against ai-edge-litert 2.3.0). ``acc``: int64 (N, C, H, W) accumulators with the bias added.
    Returns codes minus the output zero point, not clamped."""
    s_in, s_out = float(_F32(s_in)), float(_F32(s_out))
    qs = [tflite_quantize_multiplier(s_in * float(w) / s_out) for w in np.asarray(s_w, np.float32)]
    m = torch.tensor([q for q, _ in qs], dtype=torch.int64).reshape(1, -1, 1, 1)
    shift = torch.tensor([e for _, e in qs], dtype=torch.int64).reshape(1, -1, 1, 1)
    v = srdhm(wrap32(acc.long() << shift.clamp(min=0)), m)
    right = (-shift).clamp(min=0)
    return (v + torch.where(right > 0, 1 << (right - 1).clamp(min=0), 0)) >> right


def tflite_rsqrt_codes(x: torch.Tensor, s_in: float, s_out: float, z_out: int) -> torch.Tensor:
    """TFLite's int8 RSQRT (XNNPACK does not take it; the quantized Rsqrt of
    tflite/kernels/elementwise.cc) on codes minus the input zero point (x >= 0: the kernel fails on
    negative inputs): x = 0 gives 127; else 1/sqrt(x) as GetInvSqrtQuantizedMultiplierExp's
    multiplier and shift, ``data = MultiplyByQuantizedMultiplier(1, m, shift + 20)``, then
    ``MultiplyByQuantizedMultiplier(data, QuantizeMultiplier(1 / (sqrt(s_in) * s_out)), shift - 20)``
    + z_out, clamped to [-128, 127]. Returns codes minus z_out."""
    x = x.long().clamp(min=0)
    r, s = inv_sqrt_multiplier_exp(x)
    data = multiply_by_quantized_multiplier(torch.ones_like(x), r, s + 20)
    m, shift = tflite_quantize_multiplier(1.0 / (float(np.sqrt(np.float64(_F32(s_in)))) * float(_F32(s_out))))
    y = multiply_by_quantized_multiplier(data, m, shift - 20) + z_out
    y = torch.where(x == 0, 127, y)
    return torch.clamp(y, -128, 127).double() - z_out
