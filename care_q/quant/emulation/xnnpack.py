"""XNNPACK's int8 kernels as ai-edge-litert's XNNPACK delegate runs them (ADD, MUL, MEAN,
LOGISTIC), bit for bit (tests/export/test_tflite_int8.py). Sources are files of google/XNNPACK and
google-ai-edge/LiteRT. Codes are integer-valued tensors minus zero points."""

from __future__ import annotations

import math

import numpy as np
import torch

_F32 = np.float32


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
    x = (np.arange(-128, 128, dtype=_F32) - _F32(z_in)) * _F32(s_in)
    y = np.array([1.0 if v > 100 else 0.0 if v < -100 else math.exp(v) / (1.0 + math.exp(v)) for v in x.tolist()],
                 dtype=_F32)
    q = np.rint(y * (_F32(1) / _F32(s_out)) + _F32(z_out))
    return torch.from_numpy(np.clip(q, -128, 127).astype(np.float64))
