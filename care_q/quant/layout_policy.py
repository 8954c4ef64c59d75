"""How the exporters lay ops out, where the fake-quant reference must do the same.

`care_q.export.tflite_int8` and `care_q.export.onnx_qdq` write these choices into the files;
`QuantOps` (`care_q.quant.fakequant`) mirrors them so the reference computes what the files
compute. They live in `quant`, below `export`, because both sides need them: the exporters
import them from here.
"""

from __future__ import annotations

import torch

from care_q.quant.plan import FIXED_INT8_OUTPUT
from care_q.quant.qtypes import DType, QParams

# SiLU's LOGISTIC output (x * sigmoid(x) is emitted as LOGISTIC + MUL): TFLite's fixed int8
# LOGISTIC parameters, and the int16 grid of a 16-bit activation
SIGMOID_QPARAMS = {DType.INT8: FIXED_INT8_OUTPUT["sigmoid"],
                   DType.INT16: QParams((1 / 32768,), (0,), DType.INT16)}
LARGE_DWCONV_TAPS = 25  # TFLite's int8 depthwise kernels are single-pass up to this many taps


def weight_qmax(plan) -> int:
    """Largest weight code: 127, or 63 for 7-bit weights (recipe `weights.bits: 7`)."""
    return 63 if plan.recipe.weight_bits == 7 else 127


def scalar_value(value) -> float | None:
    """A ``mul_const`` value as the one float the exporters write (a learnt one is a 0-d parameter, e.g.
    the NPU attention's denominator weight), or None for a per-channel vector."""
    if isinstance(value, torch.Tensor):
        return float(value.detach()) if value.dim() == 0 else None
    return float(value)


def scalar_const(value: float, top: int = 127) -> tuple[int, float]:
    """A scalar constant as the exporters write it: the code +-top (0 for 0) at scale
    |value| / top (1.0 for 0), exact up to the float32 scale. Returns (code minus zero point, scale)."""
    if value == 0:
        return 0, 1.0
    return (top if value > 0 else -top), abs(value) / top


def unit_weight_and_bias(value: float, in_scale: float) -> tuple[float, float]:
    """``x + value`` as the exporters write it (a 1x1 depthwise conv): the dequantized weight (127
    at scale 1/127) and the bias rounded to int32 at 1/127 * ``in_scale``."""
    s_w = torch.tensor(1.0 / 127.0, dtype=torch.float32)
    w = float(127 * s_w)
    s_b = float(s_w * in_scale)
    return w, round(value / s_b) * s_b


def tflite_builtin_dwconv(plan, name: str, conv) -> bool:
    """Whether the .tflite runs this conv in TFLite's own int8 kernel rather than XNNPACK's: a
    depthwise int8 conv of more than 25 taps (CARE's 7x7) under ``tflite.large_dwconv: builtin``. The
    emitter gives it a bias made at run time (a RESHAPE of the constant), which XNNPACK does not
    take. Measured (ai-edge-litert 2.3.0, 2 threads, x86 AVX2): XNNPACK's int8 7x7 depthwise conv
    on 56x56x8 takes 1.6 ms, TFLite's 0.19 ms (3x3: XNNPACK 0.025 ms, TFLite 0.077 ms); its int8
    depthwise kernels of up to 25 taps are single-pass, longer ones are not."""
    kh, kw = conv.kernel_size
    if not (plan.recipe.tflite_large_dwconv == "builtin" and conv.groups > 1
            and conv.groups == conv.in_channels == conv.out_channels and kh * kw > LARGE_DWCONV_TAPS):
        return False
    qps = [plan.qp(t) for t in (name, *plan.graph_inputs[name])]
    return all(qp is not None and qp.dtype == DType.INT8 for qp in qps)
