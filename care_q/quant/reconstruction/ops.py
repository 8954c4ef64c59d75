"""`ReconOps`: the fake-quant reference (`QuantOps(plan, "quant")`) with what reconstruction learns.

- weights of the unit being reconstructed come from their `Rounding` (soft AdaRound codes while
  learning; int4 codes then stored on the int8 grid, as the exporters store them);
- the activation step sizes of the groups the unit owns are learnt (LSQ, as ``log(scale)``; zero
  points stay the calibrated ones; gradient scale ``1 / sqrt(features * qmax)``);
- QDrop: with ``drop_prob`` each activation element keeps its float value (a seeded generator
  draws the masks, so a resumed run draws what an uninterrupted one does).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from care_q.graph.roles import Role
from care_q.quant.fakequant import QuantOps, quantize_bias, quantize_weight, weight_scales
from care_q.quant.lowbit import DIVISOR_GUARD_LSB
from care_q.quant.plan import QuantPlan
from care_q.quant.qtypes import DType
from care_q.quant.reconstruction.rounding import Rounding


class ReconOps(QuantOps):
    def __init__(self, plan: QuantPlan, rounders: dict[str, Rounding] | None = None,
                 log_scales: torch.Tensor | None = None, index: dict[str, int] | None = None,
                 drop_prob: float = 0.0, generator: torch.Generator | None = None, soft: bool = True):
        super().__init__(plan, "quant")
        self.rounders = rounders or {}
        self.log_scales = log_scales
        self.index = index or {}
        self.drop_prob = drop_prob
        self.generator = generator
        self.soft = soft

    def _learnt(self, name: str) -> int | None:
        spec = self.plan.specs.get(name)
        if self.log_scales is None or spec is None or spec.dtype == DType.FLOAT:
            return None
        return self.index.get(spec.group)

    def _out(self, name, y, op=""):
        spec = self.plan.specs.get(name)
        if spec is None or spec.dtype == DType.FLOAT:
            return super()._out(name, y, op)
        i = self._learnt(name)
        if i is None:
            q = super()._out(name, y, op)
        else:
            qp = self.plan.qparams[spec.group]
            zp = torch.full((1,), float(qp.zero_point[0]), device=y.device)
            grad = 1.0 / math.sqrt(max(y[0].numel(), 1) * qp.qmax)
            q = torch._fake_quantize_learnable_per_tensor_affine(y, torch.exp(self.log_scales[i:i + 1]), zp,
                                                                 qp.qmin, qp.qmax, grad)
        if self.drop_prob > 0:
            keep = torch.rand(y.shape, generator=self.generator).to(y.device) < self.drop_prob
            q = torch.where(keep, y, q)
        return q

    def _weight(self, r: Rounding) -> tuple[torch.Tensor, torch.Tensor]:
        """(fake-quant weight, its int8-grid scales): int4 codes go onto the int8 grid as exported."""
        w = r.weight(self.soft)
        s_w = weight_scales(w, self.per_channel, self.w_qmax)
        if r.qmax != self.w_qmax:
            w = quantize_weight(w, s_w, self.w_qmax)
        return w, s_w

    def _bias(self, b: torch.Tensor | None, s_w: torch.Tensor, in_name: str) -> torch.Tensor | None:
        in_qp = self.plan.qp(in_name)
        return quantize_bias(b, s_w * in_qp.scale[0]) if b is not None and in_qp is not None else b

    def conv(self, name, x, conv):
        r = self.rounders.get(name)
        if r is None:
            return super().conv(name, x, conv)
        w, s_w = self._weight(r)
        b = self._bias(conv.bias, s_w, self.plan.graph_inputs[name][0])
        return self._out(name, F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups))

    def linear(self, name, x, fc):
        r = self.rounders.get(name)
        in_name = self.plan.graph_inputs[name][0]
        if r is None or not (self.plan.quantized(name) and self.plan.quantized(in_name)):
            return super().linear(name, x, fc)
        w, s_w = self._weight(r)
        return self._out(name, F.linear(x, w, self._bias(fc.bias, s_w, in_name)))

    def add_const(self, name, x, value):
        i = self._learnt(name)
        if i is None:
            return super().add_const(name, x, value)
        if self.plan.specs[name].role == Role.ATTN_DEN:  # the divisor guard, with the current (learnt) scale
            value = max(float(value), DIVISOR_GUARD_LSB * float(torch.exp(self.log_scales[i].detach())))
        return self._out(name, x + value)
