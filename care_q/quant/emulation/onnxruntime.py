"""onnxruntime's 8-bit QLinear kernels on x86 (MLAS), what DQ-op-Q patterns of a QDQ model
become, bit for bit (tests/export/test_onnx_qdq.py). Codes are integer-valued tensors minus zero points;
MLAS works on the *stored* codes (an int8 grid stored as uint8: code + ``offset``)."""

from __future__ import annotations

import numpy as np
import torch

from care_q.quant.qtypes import QParams

_F32 = np.float32


def onnxruntime_add_codes(ia: torch.Tensor, ib: torch.Tensor, qa: QParams, qb: QParams, qo: QParams,
                          offset: int = 128) -> torch.Tensor:
    """onnxruntime's QLinearAdd on x86 (MLAS's AVX2 kernel, qladd_avx2.cpp, what a DQ-Add-Q of
    8-bit tensors becomes), on integer codes minus zero points; returns the output's likewise.
    MLAS works on the *stored* codes (an int8 grid stored as uint8: code + ``offset``), in float32
    with fused multiply-adds: ``r_a = s_a / s_o``, ``r_b = s_b / s_o``,
    ``fixed = z_o - fma(r_a, z_a, r_b * z_b)``, ``c = rne(fma(a, r_a, fma(b, r_b, fixed)))``,
    saturated; ``ib`` may be a scalar (QLinearAdd of a constant: the same arithmetic). Bit for
    bit against onnxruntime 1.32 over every code pair (tests/export/test_onnx_qdq.py). Each fma is
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


def onnxruntime_quantize_codes(v: torch.Tensor, qo: QParams) -> torch.Tensor:
    """onnxruntime's QuantizeLinear on x86 (MLAS, quantize.cpp, what the Q after a float island
    such as DQ -> Reciprocal -> Q computes): ``rne(float32(v) / float32(s))`` (a true division,
    not the product with ``1 / s`` of PyTorch's fake quantization; the two round differently on
    ~1.6e-6 of float values (17 of 10M measured), and on whole codes where ``v / s`` is a tie, as 1 / x on a reciprocal's
    capped range is), saturated to the grid; returns codes minus the zero point, as float64.
    The storage offset does not change it (the same shift of the rounded value and the bounds)."""
    s = torch.tensor(_F32(qo.scale[0]), dtype=torch.float32)
    q = torch.round(v.float() / s).double()
    return torch.clamp(q, qo.qmin - qo.zero_point[0], qo.qmax - qo.zero_point[0])
