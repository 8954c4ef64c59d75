"""Shared vocabulary of care-q's quantization: dtypes, methods, quantization parameters.

Tensor roles are the deploy form's vocabulary: `care_q.graph.roles.Role`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


class DType(str, Enum):
    INT8 = "int8"
    UINT8 = "uint8"
    INT16 = "int16"
    FLOAT = "float"

    @property
    def qrange(self) -> tuple[int, int]:
        return {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767)}[self.value]

    @property
    def bits(self) -> int:
        return {"int8": 8, "uint8": 8, "int16": 16, "float": 32}[self.value]


class Method(str, Enum):
    """How a tensor's range is chosen from its calibration statistics."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"
    ENTROPY = "entropy"


@dataclass(frozen=True)
class QParams:
    """Affine quantization: real = scale * (q - zero_point). Per-channel when `axis` is set."""

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    dtype: DType
    axis: int | None = None

    @property
    def qmin(self) -> int:
        return self.dtype.qrange[0]

    @property
    def qmax(self) -> int:
        return self.dtype.qrange[1]

    @property
    def lo(self) -> float:
        return self.scale[0] * (self.qmin - self.zero_point[0])

    @property
    def hi(self) -> float:
        return self.scale[0] * (self.qmax - self.zero_point[0])

    def to_json(self) -> dict:
        d = {"dtype": self.dtype.value, "scale": list(self.scale), "zero_point": list(self.zero_point)}
        if self.axis is None:
            d.update(scale=self.scale[0], zero_point=self.zero_point[0], range=[self.lo, self.hi])
        else:
            d["axis"] = self.axis
        return d


def qparams_from_range(lo: float, hi: float, dtype: DType, symmetric: bool) -> QParams:
    """Scale and zero point covering [lo, hi] (the range is widened to contain 0).

    Symmetric: zero point 0 and scale = max|x| / qmax (int8: 127, so -128 is unused).
    """
    if dtype == DType.FLOAT:
        raise ValueError("float tensors have no quantization parameters")
    qmin, qmax = dtype.qrange
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"range [{lo}, {hi}] is not finite")
    if symmetric:
        amax = max(-lo, hi, 1e-12)
        zmid = 0 if dtype != DType.UINT8 else 128
        return QParams((amax / min(qmax - zmid, zmid - qmin if zmid else qmax),), (zmid,), dtype)
    scale = max((hi - lo) / (qmax - qmin), 1e-12)
    zp = int(round(qmin - lo / scale))
    zp = max(qmin, min(qmax, zp))
    return QParams((scale,), (zp,), dtype)


def sqnr_db(ref, test) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|^2 / |ref - test|^2)."""
    import torch

    ref = torch.as_tensor(ref, dtype=torch.float64)
    test = torch.as_tensor(test, dtype=torch.float64)
    noise = float(((ref - test) ** 2).sum())
    signal = float((ref ** 2).sum())
    if noise == 0:
        return float("inf")
    return 10.0 * math.log10(max(signal, 1e-30) / noise)
