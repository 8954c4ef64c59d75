"""Calibration and fake quantization as interpretations of the deploy form's ops.

`QuantOps(plan, mode)` runs `DeployCARE.forward(x, ops)`:

- mode "observe": float compute; every quantized tensor updates its `HistogramObserver`;
- mode "quant": the PyTorch reference of the int8 artifacts: weights quantized per channel
  (symmetric, [-127, 127]), biases to int32 at s_in * s_w, every activation rounded to its
  tensor's grid; the head after the pool in float, as the exporters emit it;
- mode "float": plain float compute (for side-by-side SQNR with `record=True`).

`exact=True` (quant mode) computes convolutions, 1x1 constant convs and matmuls the way the
integer runtimes do: exact integer accumulation (float64), then float32 requantization
``round_half_even(float32(acc) * (s_in * s_w / s_out))`` as XNNPACK and onnxruntime's MLAS
compute it. This is the verification reference: float32 accumulation alone differs from the
runtimes by one step on ~1e-5 of the outputs, which a low-SNR network amplifies.
``exact="xnnpack"`` also computes int8 ADDs as XNNPACK does (fixed-point multipliers, rounding
half up), and MUL, MEAN, LOGISTIC (and SiLU's LOGISTIC + MUL), L2_NORMALIZATION and RELU as
ai-edge-litert's kernels do (XNNPACK's or TFLite's own; the functions below name their sources):
the TFLite reference, bit for bit on the NPU recipe's graph. ``exact="onnxruntime"`` computes
int8 Adds as onnxruntime's QLinearAdd does on x86 (float32 fused multiply-adds on the stored
codes): the QDQ reference. Those emulations run only where no gradient is wanted.

Gradients pass straight through the rounding (STE), so QAT trains this same module.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from care_q.graph.ops import Ops
from care_q.quant.observers import HistogramObserver
from care_q.quant.plan import FIXED_INT8_OUTPUT, SHARED_OPS, QuantPlan
from care_q.quant.qtypes import DType, QParams

SIGMOID_QPARAMS = {DType.INT8: FIXED_INT8_OUTPUT["sigmoid"],  # TFLite's fixed LOGISTIC output
                   DType.INT16: QParams((1 / 32768,), (0,), DType.INT16)}


def fake_quant(x: torch.Tensor, qp: QParams | None) -> torch.Tensor:
    if qp is None:
        return x
    if x.requires_grad or x.dtype != torch.float32:
        return torch.fake_quantize_per_tensor_affine(x, qp.scale[0], qp.zero_point[0], qp.qmin, qp.qmax)
    # Inference: the same arithmetic as PyTorch's fake-quant kernel (float32 x * (1f / scale),
    # round half to even, + zero point, clamp, - zero point, * scale), in place, about 2x faster
    # on CPU (verification runs a 224 model over hundreds of images).
    sc = np.float32(qp.scale[0])
    zp = float(qp.zero_point[0])
    inv = float(np.float32(1.0) / sc)
    y = torch.mul(x, inv).round_()
    return y.add_(zp).clamp_(qp.qmin, qp.qmax).sub_(zp).mul_(float(sc))


def weight_qmax(plan) -> int:
    """Largest weight code: 127, or 63 for 7-bit weights (recipe `weights.bits: 7`)."""
    return 63 if plan.recipe.weight_bits == 7 else 127


def weight_scales(w: torch.Tensor, per_channel: bool = True, qmax: int = 127) -> torch.Tensor:
    """Symmetric weight scales over [-qmax, qmax] (int8: 127), per output channel (dim 0)."""
    if per_channel:
        amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)
    else:
        amax = w.detach().abs().max().expand(w.shape[0])
    return torch.clamp(amax, min=1e-12) / float(qmax)


def quantize_weight(w: torch.Tensor, scales: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    zp = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scales.float(), zp, 0, -qmax, qmax)


def xnnpack_add_codes(ia: torch.Tensor, ib: torch.Tensor, s_a: float, s_b: float, s_out: float, lo: int,
                      hi: int) -> torch.Tensor | None:
    """XNNPACK's int8 ADD on integer codes minus zero points (``ia``, ``ib``; result likewise,
    clamped to [lo, hi]): 21-bit fixed-point multipliers of float32(s_a / s_out) and
    float32(s_b / s_out) sharing one shift, rounding half up,
    ``(m_a * ia + m_b * ib + 2^(shift-1)) >> shift`` (XNNPACK's qs8 add parameters, as its
    TFLite delegate sets them up). None where the delegate would not take the ADD (a scale ratio
    outside [2^-10, 2^8): TFLite's own kernel runs it)."""
    so = np.float32(s_out)
    ratios = [np.float32(np.float32(s) / so) for s in (s_a, s_b)]
    if not all(2.0 ** -10 <= r < 2.0 ** 8 for r in ratios):
        return None
    shift = 20 - (int(np.frexp(max(ratios))[1]) - 1)
    m_a, m_b = (float(np.rint(np.float32(r * np.float32(2.0 ** shift)))) for r in ratios)
    acc = m_a * ia.double() + m_b * ib.double() + 2.0 ** (shift - 1)
    return torch.clamp(torch.floor(acc / 2.0 ** shift), lo, hi)


def scalar_const(value: float, top: int = 127) -> tuple[int, float]:
    """A scalar constant as the exporters write it: the code +-top (0 for 0) at scale
    |value| / top (1.0 for 0), exact up to the float32 scale. Returns (code minus zero point, scale)."""
    if value == 0:
        return 0, 1.0
    return (top if value > 0 else -top), abs(value) / top


def onnxruntime_add_codes(ia: torch.Tensor, ib: torch.Tensor, qa: QParams, qb: QParams, qo: QParams,
                          offset: int = 128) -> torch.Tensor:
    """onnxruntime's QLinearAdd on x86 (MLAS's AVX2 kernel, qladd_avx2.cpp, what a DQ-Add-Q of
    8-bit tensors becomes), on integer codes minus zero points; returns the output's likewise.
    MLAS works on the *stored* codes (an int8 grid stored as uint8: code + ``offset``), in float32
    with fused multiply-adds: ``r_a = s_a / s_o``, ``r_b = s_b / s_o``,
    ``fixed = z_o - fma(r_a, z_a, r_b * z_b)``, ``c = rne(fma(a, r_a, fma(b, r_b, fixed)))``,
    saturated; ``ib`` may be a scalar (QLinearAdd of a constant: the same arithmetic). Bit for
    bit against onnxruntime 1.32 over every code pair (tests/test_onnx_qdq.py). Each fma is
    exact in float64 (8-bit codes times a float32: 32 significant bits; the sum spans < 53)
    and then rounded once to float32, as the instruction is."""
    f32 = _F32
    r_a, r_b = f32(f32(qa.scale[0]) / f32(qo.scale[0])), f32(f32(qb.scale[0]) / f32(qo.scale[0]))
    za, zb, zo = (f32(q.zero_point[0] + offset) for q in (qa, qb, qo))
    fixed = f32(zo - f32(np.float64(r_a) * np.float64(za) + np.float64(f32(r_b * zb))))
    inner = ((ib + zb) * float(r_b) + float(fixed)).float()  # fma(b, r_b, fixed)
    v = ((ia + za) * float(r_a) + inner.double()).float()    # fma(a, r_a, inner)
    lo, hi = qo.qmin + offset, qo.qmax + offset
    return torch.clamp(torch.round(v), lo, hi).double() - float(zo)


def onnxruntime_mul_codes(ia: torch.Tensor, ib: torch.Tensor, qa: QParams, qb: QParams, qo: QParams,
                          offset: int = 128) -> torch.Tensor:
    """onnxruntime's QLinearMul on x86 (MLAS's SSE2 kernel, qlmul.cpp, what a DQ-Mul-Q of 8-bit
    tensors becomes), on integer codes minus zero points: the exact int32 product of the codes
    (zero points subtracted) to float32, times ``r = float32(float32(s_a * s_b) / s_o)``, plus the
    stored output zero point in float32, rounded half to even, saturated; returns codes minus the
    zero point. |ia * ib| <= 2^16: exact in float32."""
    f32 = _F32
    r = f32(f32(f32(qa.scale[0]) * f32(qb.scale[0])) / f32(qo.scale[0]))
    zo = f32(qo.zero_point[0] + offset)
    v = (ia * ib).float() * float(r)  # float32 product, r exact in float32
    v = v + float(zo)                  # float32 sum, as _mm_add_ps
    lo, hi = qo.qmin + offset, qo.qmax + offset
    return torch.clamp(torch.round(v), lo, hi).double() - float(zo)


# The int8 kernels of the NPU recipe's ops as ai-edge-litert's default interpreter runs them
# (XNNPACK takes MUL, MEAN and LOGISTIC; L2_NORMALIZATION and int8 RELU run in TFLite's own
# kernels). Each equals the runtime bit for bit (tests/test_tflite_int8.py); sources are files of
# google/XNNPACK and google-ai-edge/LiteRT. Codes are integer-valued tensors minus zero points.
_F32 = np.float32


def xnnpack_mul_codes(ia: torch.Tensor, ib: torch.Tensor, s_a: float, s_b: float, s_out: float, lo: int,
                      hi: int) -> torch.Tensor | None:
    """XNNPACK's int8 MUL (qs8 vmul, fp32 requantization; scale set up by
    xnn_init_qs8_mul_minmax_scalar_params): ``round_half_even(float32(ia * ib) * s)`` with
    ``s = float32(float32(s_a * s_b) / s_out)``, then the output zero point, clamped to [lo, hi].
    None where the delegate would not take the MUL (s outside [2^-16, 2^8),
    CheckTensorsInputProductOutputScale in xnnpack_delegate.cc): TFLite's own kernel runs it."""
    s = _F32(_F32(_F32(s_a) * _F32(s_b)) / _F32(s_out))
    if not 2.0 ** -16 <= s < 2.0 ** 8:
        return None
    return torch.clamp(torch.round((ia.double() * ib.double()).float() * float(s)), lo, hi).double()


def xnnpack_mean_codes(q_sum: torch.Tensor, n: int, s_in: float, z_in: int, s_out: float, z_out: int) -> torch.Tensor:
    """XNNPACK's int8 MEAN of ``n`` codes from their exact sum ``q_sum`` (codes with the input zero
    point): qs8 rsum into int32, then the int32 -> qs8 convert of src/operators/reduce-nd.c,
    ``round_half_even(float32(q_sum) * m + z')``, ``m = float32(float32(s_in / s_out) * float32(1 / n))``,
    ``z' = z_out - float32(n * z_in) * m`` (all float32): the zero point is folded in before the
    rounding, so ties go to the even *code*. Returns codes minus z_out."""
    m = _F32(_F32(_F32(s_in) / _F32(s_out)) * _F32(_F32(1) / _F32(n)))
    z = _F32(_F32(z_out) - _F32(_F32(n * z_in) * m))
    y = torch.round(q_sum.float() * float(m) + float(z))  # float32 tensor ops, m and z exact float32
    return torch.clamp(y, -128, 127).double() - z_out


def xnnpack_sigmoid_table(s_in: float, z_in: int, s_out: float, z_out: int) -> torch.Tensor:
    """XNNPACK's int8 LOGISTIC: a 256-entry table (init_lut_op_with_config in
    src/operators/unary-elementwise-nc.c) of the reference op on every input code: x =
    ``(float(q) - z_in) * s_in``, ``e = exp(double(x))``, ``float(e / (1 + e))`` (SigmoidOp in
    src/reference/unary-elementwise.cc; 0 / 1 beyond -+100), quantized as
    ``round_half_even(y * float32(1 / s_out) + z_out)``. Indexed by code + 128; holds output codes."""
    import math

    x = (np.arange(-128, 128, dtype=_F32) - _F32(z_in)) * _F32(s_in)
    y = np.array([1.0 if v > 100 else 0.0 if v < -100 else math.exp(v) / (1.0 + math.exp(v)) for v in x.tolist()],
                 dtype=_F32)
    q = np.rint(y * (_F32(1) / _F32(s_out)) + _F32(z_out))
    return torch.from_numpy(np.clip(q, -128, 127).astype(np.float64))


_I32_MIN, _I32_MAX = -(2 ** 31), 2 ** 31 - 1


def _srdhm(a: torch.Tensor, b: torch.Tensor | int) -> torch.Tensor:
    """gemmlowp SaturatingRoundingDoublingHighMul of int32 values (int64 tensors)."""
    ab = a * b
    ab = ab + torch.where(ab >= 0, 2 ** 30, 1 - 2 ** 30)
    hi = torch.div(ab, 2 ** 31, rounding_mode="trunc")
    return torch.where((a == _I32_MIN) & (b == _I32_MIN), _I32_MAX, hi)


def _rounding_divide_by_pot(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """gemmlowp RoundingDivideByPOT: x / 2^e rounded half away from zero."""
    mask = (1 << e) - 1
    return (x >> e) + ((x & mask) > (mask >> 1) + (x < 0)).long()


def _sat_shift_left(x: torch.Tensor, e: int) -> torch.Tensor:
    """gemmlowp SaturatingRoundingMultiplyByPOT<e> for e > 0 (int32 saturation)."""
    t = (1 << (31 - e)) - 1
    return torch.where(x > t, _I32_MAX, torch.where(x < -t, _I32_MIN, x * (1 << e)))


def _bit_length(x: torch.Tensor) -> torch.Tensor:
    """Bits of non-negative int64 values below 2^53 (0 for 0)."""
    return torch.where(x > 0, torch.frexp(x.double())[1].long(), 0)


def _wrap32(x: torch.Tensor) -> torch.Tensor:
    return (x + 2 ** 31) % 2 ** 32 - 2 ** 31


def tflite_l2norm_codes(x: torch.Tensor) -> torch.Tensor:
    """TFLite's int8 L2_NORMALIZATION over the last dim (reference_integer_ops::L2Normalization in
    tflite/kernels/internal/reference/integer_ops/l2normalization.h; XNNPACK does not take the op)
    on codes minus the input zero point: acc = sum x^2 (int32), 1/sqrt(acc) as a fixed-point
    multiplier and shift (GetInvSqrtQuantizedMultiplierExp in tflite/kernels/internal/common.h:
    5 Newton-Raphson steps in gemmlowp Q3.28), then
    ``MultiplyByQuantizedMultiplier(x, mult, shift + 7)`` (double rounding, the default build),
    clamped to [-128, 127]. The output is at scale 1/128, zero point 0; the input scale is unused."""
    x = x.long()
    acc = (x * x).sum(-1, keepdim=True)
    small = acc <= 1  # the kernel's special case: multiplier INT32_MAX, shift 0
    v = torch.where(small, 4, acc)
    shift = torch.full_like(v, 11)
    while bool((v >= 1 << 29).any()):
        big = v >= 1 << 29
        v, shift = torch.where(big, v // 4, v), shift + big.long()
    bits = _bit_length(v)  # CountLeadingZeros = 32 - bits
    pairs = (31 - bits) // 2 - 1  # (CountLeadingZeros - 1) / 2 - 1
    shift = shift - pairs
    v = v << (2 * pairs)  # now in [2^27, 2^29)
    half_v = _rounding_divide_by_pot(v >> 1, torch.ones_like(v))  # F3 input / 2
    r = torch.full_like(v, 1 << 28)  # F3 one
    for _ in range(5):  # x = 1.5 x - (v / 2) x^3 (Rescale<3> of the F9 / F6 products: saturating shifts)
        x3 = _sat_shift_left(_srdhm(_srdhm(r, r), r), 6)
        r = _sat_shift_left(_wrap32(_srdhm(torch.full_like(r, 3 << 27), r) - _srdhm(half_v, x3)), 3)
    r = _srdhm(r, 1518500250)  # * sqrt(2) / 2 (Q0.31)
    neg = shift < 0
    r = torch.where(neg, _wrap32(r << torch.where(neg, -shift, 0)), r)
    shift = torch.where(neg, 0, shift)
    r = torch.where(small, _I32_MAX, r)
    s = torch.where(small, 0, -shift) + 7  # kReverseShift, then the output's 7 fractional bits
    return torch.clamp(_multiply_by_quantized_multiplier(x, r, s), -128, 127).double()


def _multiply_by_quantized_multiplier(x: torch.Tensor, m, shift) -> torch.Tensor:
    """TFLite's MultiplyByQuantizedMultiplier(int32 x, m, shift) (tflite/kernels/internal/common.cc,
    double rounding: the default build): x * m * 2^shift / 2^31, rounded twice, half away from zero."""
    shift = torch.as_tensor(shift, dtype=torch.int64)
    return _rounding_divide_by_pot(_srdhm(_wrap32(x << shift.clamp(min=0)), m), (-shift).clamp(min=0))


def _one_over_one_plus_x(a: torch.Tensor) -> torch.Tensor:
    """gemmlowp one_over_one_plus_x_for_x_in_0_1 on Q0.31 raws (int64 tensors): 1 / (1 + a) by
    three Newton-Raphson steps in Q2.29 from 48/17 - 32/17 d, d = (1 + a) / 2, returned in Q0.31."""
    s = a + _I32_MAX  # RoundingHalfSum(a, F0::One()), F0::One() = INT32_MAX
    half = torch.div(s + torch.where(s >= 0, 1, -1), 2, rounding_mode="trunc")
    x = 1515870810 + _srdhm(half, -1010580540)  # 48/17 + d * (-32/17), Q2.29
    for _ in range(3):
        one_minus = (1 << 29) - _srdhm(half, x)
        x = x + _sat_shift_left(_srdhm(x, one_minus), 2)  # Rescale<2> of the Q4.27 product
    return _sat_shift_left(x, 1)  # ExactMulByPot<-1>, then Rescale<0>


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
    hp1 = 32 - _bit_length(b)                   # CountLeadingZeros(b)
    recip_shift = 31 - hp1                      # GetReciprocal(b, 31, &recip_shift)
    inv = _one_over_one_plus_x((b << hp1) - (1 << 31))
    headroom = torch.where(a >= 0, 31 - _bit_length(a), 32 - _bit_length(2 * a.abs() - 1))  # CountLeadingSignBits
    q = _srdhm(a << headroom, inv)              # MultiplyByQuantizedMultiplierGreaterThanOne
    e = recip_shift + headroom - out_shift      # MultiplyByQuantizedMultiplierSmallerThanOneExp's right shift
    if bool((e < 0).any()):
        raise ValueError(f"TFLite int8 DIV: output multiplier 2^{out_shift} too large to emulate")
    x = _srdhm(q, m)
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
    y = _multiply_by_quantized_multiplier(x.long(), m, shift)
    return torch.clamp(y, max(-128 - z_out, 0), 127 - z_out).double()


def tflite_builtin_dwconv(plan, name: str, conv) -> bool:
    """Whether the .tflite runs this conv in TFLite's own int8 kernel rather than XNNPACK's: a
    depthwise int8 conv of more than 25 taps (CARE's 7x7) under ``tflite.large_dwconv: builtin``. The
    emitter gives it a bias made at run time (a RESHAPE of the constant), which XNNPACK does not
    take. Measured (ai-edge-litert 2.3.0, 2 threads, x86 AVX2): XNNPACK's int8 7x7 depthwise conv
    on 56x56x8 takes 1.6 ms, TFLite's 0.19 ms (3x3: XNNPACK 0.025 ms, TFLite 0.077 ms); its int8
    depthwise kernels of up to 25 taps are single-pass, longer ones are not."""
    kh, kw = conv.kernel_size
    if not (plan.recipe.tflite_large_dwconv == "builtin" and conv.groups > 1
            and conv.groups == conv.in_channels == conv.out_channels and kh * kw > 25):
        return False
    qps = [plan.qp(t) for t in (name, *plan.graph_inputs[name])]
    return all(qp is not None and qp.dtype == DType.INT8 for qp in qps)


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
    v = _srdhm(_wrap32(acc.long() << shift.clamp(min=0)), m)
    right = (-shift).clamp(min=0)
    return (v + torch.where(right > 0, 1 << (right - 1).clamp(min=0), 0)) >> right


_F32_EXACT = 2.0 ** 24  # every integer of magnitude below this is a float32


def integer_product(op, x_int: torch.Tensor, w_int: torch.Tensor, w_bound: torch.Tensor | float) -> torch.Tensor:
    """``op(x_int, w_int)`` of integer-valued tensors (a conv or matmul: a sum of products),
    computed exactly and returned as float64.

    ``w_bound`` bounds ``sum_k |w_k|`` over any one output's terms. Where
    ``max|x| * w_bound < 2^24`` every partial sum is an integer that float32 holds exactly, so
    the fast float32 kernel gives the exact result in any summation order. Otherwise x is split
    into 16 * hi + lo (|hi| <= max|x| / 16 + 1, 0 <= lo <= 15) and the two float32 products are
    combined in float64, if each is provably exact; float64 (slow, exact) is the last resort."""
    w_bound = float(w_bound)
    x_max = float(x_int.abs().max()) if x_int.numel() else 0.0
    if x_max * w_bound < _F32_EXACT:
        return op(x_int.float(), w_int.float()).double()
    hi = torch.floor(x_int / 16.0)
    lo = x_int - 16.0 * hi  # in [0, 16)
    if max(x_max / 16.0 + 1.0, 15.0) * w_bound < _F32_EXACT:
        wf = w_int.float()
        return 16.0 * op(hi.float(), wf).double() + op(lo.float(), wf).double()
    return op(x_int.double(), w_int.double())


def unit_weight_and_bias(value: float, in_scale: float) -> tuple[float, float]:
    """Dequantized weight (127 at scale 1/127) and int32-rounded bias of `x * 1 + value`."""
    s_w = torch.tensor(1.0 / 127.0, dtype=torch.float32)
    w = float(127 * s_w)
    s_b = float(s_w * in_scale)
    return w, round(value / s_b) * s_b


def quantize_bias(b: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Round a bias to int32 at the given per-channel scales (s_in * s_w)."""
    q = torch.clamp(torch.round(b / scales), -(2 ** 31), 2 ** 31 - 1)
    return b + (q * scales - b).detach()


class QuantOps(Ops):
    def __init__(self, plan: QuantPlan, mode: str = "quant", record: bool = False,
                 observers: dict[str, HistogramObserver] | None = None, exact: bool | str = False,
                 ort_act_offset: int = 128):
        if mode not in ("observe", "quant", "float"):
            raise ValueError(mode)
        if exact not in (False, True, "xnnpack", "onnxruntime"):
            raise ValueError(f"exact={exact!r}")
        self.exact = bool(exact) and mode == "quant"
        self.xnnpack = exact == "xnnpack" and mode == "quant"  # TFLite's int8 kernels (module functions above)
        # onnxruntime's QLinearAdd (x86); int8 grids stored with this offset (the QDQ file's act_type)
        self.ort = exact == "onnxruntime" and mode == "quant"
        self.ort_act_offset = ort_act_offset
        self.plan = plan
        self.mode = mode
        self.observers = observers if observers is not None else {}
        self.record: dict[str, torch.Tensor] | None = {} if record else None
        self.per_channel = plan.recipe.weight_granularity == "per_channel"
        self.w_qmax = weight_qmax(plan)
        self._tables: dict[tuple, torch.Tensor] = {}  # XNNPACK LOGISTIC tables by quantization

    # ------------------------------------------------------------------ helpers
    def _out(self, name: str, y: torch.Tensor, op: str = "") -> torch.Tensor:
        spec = self.plan.specs.get(name)
        if self.record is not None:
            self.record[name] = y.detach()
        if spec is None or spec.dtype == DType.FLOAT or self.mode == "float":
            return y
        if self.mode == "observe":
            if op not in SHARED_OPS:
                obs = self.observers.get(name)
                if obs is None:
                    obs = self.observers[name] = HistogramObserver(name)
                obs.update(y)
            return y
        y = fake_quant(y, self.plan.qp(name))
        if self.record is not None:
            self.record[name] = y.detach()
        return y

    def _wq(self) -> bool:
        return self.mode == "quant"

    def _exact_ok(self, name: str, inputs: list[str]) -> bool:
        return self.exact and all(self.plan.qp(t) is not None for t in [name, *inputs])

    def _ints(self, x: torch.Tensor, tensor: str) -> torch.Tensor:
        """Integer values (minus zero point) of a tensor on its grid, as float64."""
        qp = self.plan.qp(tensor)
        return torch.round(x.double() / qp.scale[0])

    def _requant(self, name: str, acc: torch.Tensor, scale_in: torch.Tensor, channel_dim: int | None) -> torch.Tensor:
        """float32(acc) * float32(scale_in / s_out), round half to even, clamp: dequantized output."""
        qp = self.plan.qp(name)
        s_out = torch.tensor(qp.scale[0], dtype=torch.float32)
        scale = scale_in.float() / s_out
        if channel_dim is not None:
            shape = [1] * acc.dim()
            shape[channel_dim] = -1
            scale = scale.reshape(shape)
        y = acc.float()  # in place from here: a float32 acc is the caller's temporary
        y.mul_(scale).round_().clamp_(qp.qmin - qp.zero_point[0], qp.qmax - qp.zero_point[0])
        return y.mul_(s_out)

    def _int_weights(self, w: torch.Tensor, b: torch.Tensor | None, in_name: str):
        """(integer weight codes, float32 per-channel scales, int32-rounded bias at s_in * s_w), as
        float64 tensors: what the exporters write for a conv or linear module."""
        q = self.w_qmax
        s_w = weight_scales(w, self.per_channel, q).float()
        w_int = torch.clamp(torch.round(w.detach().double() / s_w.double().reshape((-1,) + (1,) * (w.dim() - 1))), -q, q)
        # s_in as the exporters take it (the plan's float64 value, not its float32 rounding): the
        # bias codes round(b / s_b) must be theirs, else one code in ~1e-7 differs by one.
        s_b = s_w.double() * float(self.plan.qp(in_name).scale[0])
        b0 = b.detach().double() if b is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        return w_int, s_w, torch.round(b0 / s_b)

    @staticmethod
    def _w_abs_sum(w_int: torch.Tensor) -> float:
        """max over output channels of sum |w|: `integer_product`'s bound."""
        return float(w_int.abs().reshape(w_int.shape[0], -1).sum(1).max())

    def _conv_acc(self, x, in_name, w_int, b_int, conv_args, w_abs_sum: float) -> torch.Tensor:
        """Exact int32 accumulators (bias added) of a conv over the integer codes of x, as float64."""
        acc = integer_product(lambda a, b: F.conv2d(a, b, None, *conv_args), self._ints(x, in_name), w_int, w_abs_sum)
        return acc + b_int.double().reshape(1, -1, 1, 1)

    def _exact_conv(self, name, x, in_name, w_int, s_w, b_int, conv_args) -> torch.Tensor:
        s_in = torch.tensor(self.plan.qp(in_name).scale[0], dtype=torch.float32)
        w_abs_sum = self._w_abs_sum(w_int)
        fast = self._exact_conv_f32(name, x, in_name, w_int, s_w, b_int, conv_args, s_in, w_abs_sum)
        if fast is not None:
            return fast
        acc = self._conv_acc(x, in_name, w_int, b_int, conv_args, w_abs_sum)
        return self._requant(name, acc, s_in * s_w.float(), 1)

    def _tflite_conv(self, name, x, in_name, w_int, s_w, b_int, conv_args) -> torch.Tensor:
        """A conv in TFLite's own int8 kernel (`tflite_builtin_dwconv`): exact int32 accumulation,
        TFLite's fixed-point requantization (`tflite_conv_requant_codes`)."""
        acc = self._conv_acc(x, in_name, w_int, b_int, conv_args, self._w_abs_sum(w_int))
        qp = self.plan.qp(name)
        codes = tflite_conv_requant_codes(acc, self.plan.qp(in_name).scale[0], s_w, qp.scale[0])
        codes = codes.clamp(qp.qmin - qp.zero_point[0], qp.qmax - qp.zero_point[0])
        return codes.float().mul_(torch.tensor(qp.scale[0], dtype=torch.float32))

    def _exact_conv_f32(self, name, x, in_name, w_int, s_w, b_int, conv_args, s_in, w_abs_sum):
        """`_exact_conv` in float32 throughout, where that is provably the same arithmetic (the
        verification of a 224 model spends most of its time converting to and from float64):
        the integer codes of x are exact in float32 (|code| <= 255; x / float32(scale) is within
        1e-5 of its code), the accumulation is exact when max|x| * sum|w| < 2^24 (as in
        `integer_product`), and float32(acc) + float32(bias) is one correctly rounded addition
        of two float32-exact integers when |bias| < 2^24: float32(acc + bias), what the float64
        path rounds to before its float32 requantization. None where a bound fails."""
        qp = self.plan.qp(in_name)
        x_int = torch.round(x / np.float32(qp.scale[0]))
        x_max = float(x_int.abs().max()) if x_int.numel() else 0.0
        if x_max * w_abs_sum >= _F32_EXACT or (b_int.numel() and float(b_int.abs().max()) >= _F32_EXACT):
            return None
        acc = F.conv2d(x_int, w_int.float(), None, *conv_args)
        acc.add_(b_int.float().reshape(1, -1, 1, 1))
        return self._requant(name, acc, s_in * s_w.float(), 1)

    # ------------------------------------------------------------------ ops
    def input(self, name, x):
        return self._out(name, x)

    def conv(self, name, x, conv):
        w, b = conv.weight, conv.bias
        in_name = self.plan.graph_inputs[name][0]
        if self._exact_ok(name, [in_name]):
            w_int, s_w, b_int = self._int_weights(w, b, in_name)
            args = (conv.stride, conv.padding, conv.dilation, conv.groups)
            if self.xnnpack and tflite_builtin_dwconv(self.plan, name, conv):
                return self._out(name, self._tflite_conv(name, x, in_name, w_int, s_w, b_int, args))
            return self._out(name, self._exact_conv(name, x, in_name, w_int, s_w, b_int, args))
        if self._wq():
            s_w = weight_scales(w, self.per_channel, self.w_qmax)
            w = quantize_weight(w, s_w, self.w_qmax)
            in_qp = self.plan.qp(self.plan.graph_inputs[name][0])
            if b is not None and in_qp is not None:
                b = quantize_bias(b, s_w * in_qp.scale[0])
        y = F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)
        return self._out(name, y)

    def linear(self, name, x, fc):
        # Float classifier unless the recipe says ``head.dtype: int8``: then (plan) the input and
        # the logits are int8 and this is a static int8 FC, weights per output channel, int32 bias
        # (the same arithmetic as a 1x1 conv). Int8 weights with a float input are never emitted:
        # XNNPACK turns DEQUANTIZE + FULLY_CONNECTED into a dynamically quantized FC whose input
        # rounding this reference cannot see (measured 8% of the logit scale).
        in_name = self.plan.graph_inputs[name][0]
        if self.mode != "quant" or not (self.plan.quantized(name) and self.plan.quantized(in_name)):
            return self._out(name, F.linear(x, fc.weight, fc.bias))
        w, b = fc.weight, fc.bias
        s_in = self.plan.qp(in_name).scale[0]
        if self.exact:
            w_int, s_w, b_int = self._int_weights(w, b, in_name)
            acc = F.linear(self._ints(x, in_name), w_int, b_int)
            return self._out(name, self._requant(name, acc, torch.tensor(s_in, dtype=torch.float32) * s_w, 1))
        q = self.w_qmax
        s_w = weight_scales(w, self.per_channel, q)
        return self._out(name, F.linear(x, quantize_weight(w, s_w, q), quantize_bias(b, s_w * s_in)))

    def add(self, name, a, b):
        ins = self.plan.graph_inputs[name]
        if self.xnnpack and len(ins) == 2 and self._exact_ok(name, ins):
            y = self._xnnpack_add(name, a, b, ins)
            if y is not None:
                return self._out(name, y)
        if self.ort and len(ins) == 2 and self._int8_ok(name, ins, a, b):
            qa, qb, qo = (self.plan.qp(t) for t in (*ins, name))
            q = onnxruntime_add_codes(self._ints(a, ins[0]), self._ints(b, ins[1]), qa, qb, qo, self.ort_act_offset)
            return self._out(name, self._dq(name, q))
        return self._out(name, a + b)

    def _xnnpack_add(self, name, a, b, ins) -> torch.Tensor | None:
        qa, qb, qo = (self.plan.qp(t) for t in (*ins, name))
        q = xnnpack_add_codes(self._ints(a, ins[0]), self._ints(b, ins[1]), qa.scale[0], qb.scale[0], qo.scale[0],
                              qo.qmin - qo.zero_point[0], qo.qmax - qo.zero_point[0])
        return None if q is None else self._dq(name, q)

    def mul(self, name, a, b):
        ins = self.plan.graph_inputs[name]
        if self._tflite_ok(name, ins, a, b):
            y = self._xnnpack_mul(name, self._ints(a, ins[0]), self._ints(b, ins[1]), self.plan.qp(ins[0]),
                                  self.plan.qp(ins[1]))
            if y is not None:
                return self._out(name, y.to(a.dtype))
        if self.ort and self._int8_ok(name, ins, a, b):
            qa, qb, qo = (self.plan.qp(t) for t in (*ins, name))
            q = onnxruntime_mul_codes(self._ints(a, ins[0]), self._ints(b, ins[1]), qa, qb, qo, self.ort_act_offset)
            return self._out(name, self._dq(name, q).to(a.dtype))
        return self._out(name, a * b)

    def _tflite_ok(self, name: str, inputs: list[str], *xs: torch.Tensor) -> bool:
        """Emulate TFLite's int8 kernel: the TFLite reference, every tensor int8, no gradient
        wanted (QAT trains the float path)."""
        return self.xnnpack and self._int8_ok(name, inputs, *xs)

    def _int8_ok(self, name: str, inputs: list[str], *xs: torch.Tensor) -> bool:
        """A runtime's int8 kernel can be emulated: exact mode, every tensor int8, no gradient."""
        return (self._exact_ok(name, inputs) and not any(x.requires_grad for x in xs)
                and all(self.plan.qp(t).dtype == DType.INT8 for t in [name, *inputs]))

    def _dq(self, name: str, codes: torch.Tensor) -> torch.Tensor:
        """Output codes (minus the zero point) of tensor `name` as its float32 values."""
        return (codes * float(np.float32(self.plan.qp(name).scale[0]))).float()

    def _xnnpack_mul(self, name, ia, ib, qa: QParams, qb: QParams) -> torch.Tensor | None:
        qo = self.plan.qp(name)
        q = xnnpack_mul_codes(ia, ib, qa.scale[0], qb.scale[0], qo.scale[0], qo.qmin - qo.zero_point[0],
                              qo.qmax - qo.zero_point[0])
        return None if q is None else self._dq(name, q)

    def add_const(self, name, x, value):
        if self.mode != "quant" or not self.plan.quantized(name):
            return self._out(name, x + value)
        value = self.plan.consts.get(name, value)  # the divisor guard (QuantPlan.finalize)
        in_name = self.plan.graph_inputs[name][0]
        if self.ort and self._int8_ok(name, [in_name], x):
            # the QDQ file's QLinearAdd of x and the scalar constant as the exporter writes it
            qa, qo = self.plan.qp(in_name), self.plan.qp(name)
            code, scale = scalar_const(float(value))
            qc = QParams((scale,), (0,), DType.INT8)
            q = onnxruntime_add_codes(self._ints(x, in_name), torch.tensor(float(code), dtype=torch.float64),
                                      qa, qc, qo, self.ort_act_offset)
            return self._out(name, self._dq(name, q))
        if self._exact_ok(name, [in_name]):
            ch = x.shape[1]
            s_w = torch.full((ch,), 1.0 / 127.0, dtype=torch.float32)
            s_b = s_w.double() * torch.tensor(self.plan.qp(in_name).scale[0], dtype=torch.float32).double()
            b_int = torch.round(torch.full((ch,), float(value), dtype=torch.float64) / s_b)
            w_int = torch.full((ch, 1, 1, 1), 127.0, dtype=torch.float64)
            return self._out(name, self._exact_conv(name, x, in_name, w_int, s_w, b_int, (1, 0, 1, ch)))
        # Exported as a 1x1 depthwise conv with weight 1 (int8 127 at scale 1/127) and the
        # constant as its int32 bias: the same kernel as every conv, so runtimes match this
        # reference bit for bit (an int8 ADD of a constant rounds differently in XNNPACK).
        in_qp = self.plan.qp(in_name)
        if in_qp is None:  # float input (mixed precision): a float add, then this tensor's grid
            return self._out(name, x + value)
        w, b = unit_weight_and_bias(float(value), in_qp.scale[0])
        return self._out(name, x * w + b)

    def mul_const(self, name, x, value):
        in_name = self.plan.graph_inputs[name][0]
        if isinstance(value, torch.Tensor) and value.dim() == 1 and self._exact_ok(name, [in_name]):
            g = value.detach()
            s_w = (torch.clamp(g.abs().double(), min=1e-12) / 127.0).float()
            w_int = torch.clamp(torch.round(g.double() / s_w.double()), -127, 127).reshape(-1, 1, 1, 1)
            b_int = torch.zeros(g.numel(), dtype=torch.float64)
            return self._out(name, self._exact_conv(name, x, in_name, w_int, s_w, b_int, (1, 0, 1, g.numel())))
        return self._out(name, super().mul_const(name, x, value))

    def div(self, name, a, b):
        ins = self.plan.graph_inputs[name]
        if self._tflite_ok(name, ins, a, b):  # TFLite's own int8 DIV kernel (emulated)
            qa, qb, qo = (self.plan.qp(t) for t in (*ins, name))
            q = tflite_div_codes(self._ints(a, ins[0]), self._ints(b, ins[1]), qa.scale[0], qb.scale[0], qo.scale[0],
                                 qo.zero_point[0])
            return self._out(name, self._dq(name, q))
        return self._out(name, a / b)

    def reciprocal(self, name, x):
        # TFLite: an int8 DIV of the constant 1 (code 127 at scale 1/127) by x, in TFLite's own
        # fixed-point kernel (emulated); onnxruntime: a float Reciprocal between DQ and Q.
        ins = self.plan.graph_inputs[name]
        if self._tflite_ok(name, ins, x):
            qx, qo = self.plan.qp(ins[0]), self.plan.qp(name)
            one, s_one = scalar_const(1.0)
            q = tflite_div_codes(torch.tensor(float(one)), self._ints(x, ins[0]), s_one, qx.scale[0], qo.scale[0],
                                 qo.zero_point[0])
            return self._out(name, self._dq(name, q))
        return self._out(name, 1.0 / x)

    def gelu(self, name, x):
        return self._out(name, F.gelu(x))

    def silu(self, name, x):
        in_name = self.plan.graph_inputs[name][0]
        if self._tflite_ok(name, [in_name], x):  # LOGISTIC + MUL (the emitter's op_silu), as XNNPACK runs them
            qs = SIGMOID_QPARAMS[DType.INT8]
            ix, s_codes = self._ints(x, in_name), self._xnnpack_sigmoid(x, in_name, qs)
            y = self._xnnpack_mul(name, ix, s_codes - qs.zero_point[0], self.plan.qp(in_name), qs)
            if y is not None:
                return self._out(name, y)
        s = torch.sigmoid(x)
        if self.mode == "quant" and self.plan.quantized(name):
            s = fake_quant(s, SIGMOID_QPARAMS[self.plan.specs[name].dtype])
        return self._out(name, x * s)

    def elu(self, name, x):
        return self._out(name, F.elu(x))

    def relu(self, name, x):
        in_name = self.plan.graph_inputs[name][0]
        if self._tflite_ok(name, [in_name], x):
            qi, qo = self.plan.qp(in_name), self.plan.qp(name)
            return self._out(name, self._dq(name, tflite_relu_codes(self._ints(x, in_name), qi.scale[0], qo.scale[0],
                                                                    qo.zero_point[0])))
        return self._out(name, F.relu(x))

    def sigmoid(self, name, x):
        in_name = self.plan.graph_inputs[name][0]
        if self._tflite_ok(name, [in_name], x):
            qo = self.plan.qp(name)
            return self._out(name, self._dq(name, self._xnnpack_sigmoid(x, in_name, qo) - qo.zero_point[0]))
        return self._out(name, torch.sigmoid(x))

    def _xnnpack_sigmoid(self, x, in_name: str, qo: QParams) -> torch.Tensor:
        """Output codes (with the zero point) of XNNPACK's LOGISTIC table for `x` on its grid."""
        qi = self.plan.qp(in_name)
        key = (qi.scale[0], qi.zero_point[0], qo.scale[0], qo.zero_point[0])
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = xnnpack_sigmoid_table(*key)
        return table[(self._ints(x, in_name) + qi.zero_point[0] + 128).clamp(0, 255).long()]

    def l2_norm(self, name, x):
        in_name = self.plan.graph_inputs[name][0]
        if self._tflite_ok(name, [in_name], x):  # output parameters fixed by TFLite: 1/128, zero point 0
            return self._out(name, self._dq(name, tflite_l2norm_codes(self._ints(x, in_name))))
        return self._out(name, super().l2_norm(name, x))

    def to_tokens(self, name, x, kind):
        return self._out(name, super().to_tokens(name, x, kind), "to_tokens")

    def from_tokens(self, name, x, hw):
        return self._out(name, super().from_tokens(name, x, hw), "from_tokens")

    def mean_axis(self, name, x, axis):
        y = self._xnnpack_mean(name, x, (axis,), True)
        return self._out(name, y if y is not None else super().mean_axis(name, x, axis))

    def _xnnpack_mean(self, name, x, dims: tuple[int, ...], keepdim: bool) -> torch.Tensor | None:
        """An int8 MEAN over `dims` as XNNPACK computes it; None where the float path applies."""
        in_name = self.plan.graph_inputs[name][0]
        if not self._tflite_ok(name, [in_name], x):
            return None
        qi, qo = self.plan.qp(in_name), self.plan.qp(name)
        q_sum = (self._ints(x, in_name) + qi.zero_point[0]).sum(dim=dims, keepdim=keepdim)
        n = int(np.prod([x.shape[d] for d in dims]))
        return self._dq(name, xnnpack_mean_codes(q_sum, n, qi.scale[0], qi.zero_point[0], qo.scale[0], qo.zero_point[0]))

    def split(self, name, x, sizes, dim=1):
        outs = torch.split(x, sizes, dim=dim)
        return tuple(self._out(f"{name}:{i}", o, "split") for i, o in enumerate(outs))

    def cat(self, name, xs, dim=1):
        return self._out(name, torch.cat(xs, dim=dim), "cat")

    def to_heads(self, name, x, num_heads):
        return self._out(name, super().to_heads(name, x, num_heads), "to_heads")

    def from_heads(self, name, x, hw):
        return self._out(name, super().from_heads(name, x, hw), "from_heads")

    def matmul(self, name, a, b, transpose_a=False, transpose_b=False):
        ins = self.plan.graph_inputs[name]
        if self._exact_ok(name, ins):
            bi = self._ints(b, ins[1])
            k = a.shape[-2] if transpose_a else a.shape[-1]
            acc = integer_product(lambda u, v: super(QuantOps, self).matmul(name, u, v, transpose_a, transpose_b),
                                  self._ints(a, ins[0]), bi, bi.abs().max() * k)
            s_in = (torch.tensor(self.plan.qp(ins[0]).scale[0], dtype=torch.float32)
                    * torch.tensor(self.plan.qp(ins[1]).scale[0], dtype=torch.float32))
            return self._out(name, self._requant(name, acc, s_in, None))
        return self._out(name, super().matmul(name, a, b, transpose_a, transpose_b))

    def mean_tokens(self, name, x):
        y = self._xnnpack_mean(name, x, (-2,), True)
        return self._out(name, y if y is not None else x.mean(dim=-2, keepdim=True))

    def global_pool(self, name, x):  # TFLite: MEAN over H and W of the NHWC map
        y = self._xnnpack_mean(name, x, (2, 3), False)
        return self._out(name, y if y is not None else x.flatten(2).mean(dim=-1))

    def layer_norm(self, name, x, eps):
        return self._out(name, F.layer_norm(x, x.shape[-1:], None, None, eps))
