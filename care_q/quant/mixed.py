"""`MixedOps`: fake quantization where some convs / linears keep float weights.

`QuantOps` with the plan's ``float_weights``: those layers compute with their float weights, and a
constant added to a float input is not rounded to any grid; everything else is exactly `QuantOps`.
Used to split a plan's error into what its weights and what its activations cost
(`care_q.pipeline.fidelity.recipe_vs_minmax`) and by the layer sensitivity (`care_q.eval.sensitivity`).
"""

from __future__ import annotations

import dataclasses

import torch.nn.functional as F

from care_q.quant.fakequant import QuantOps
from care_q.quant.plan import QuantPlan


class MixedOps(QuantOps):
    def _float_weights(self, name) -> bool:
        return self.mode == "quant" and name in self.plan.float_weights

    def conv(self, name, x, conv):
        if self._float_weights(name):
            return self._out(name, F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                                            conv.groups))
        return super().conv(name, x, conv)

    def linear(self, name, x, fc):
        if self._float_weights(name):
            return self._out(name, F.linear(x, fc.weight, fc.bias))
        return super().linear(name, x, fc)

    def add_const(self, name, x, value):
        # QuantOps rounds the constant on its int8 input's grid; a float input has none
        if self.mode == "quant" and self.plan.qp(self.plan.graph_inputs[name][0]) is None:
            return self._out(name, x + (self.plan.consts.get(name, value) if self.plan.quantized(name) else value))
        return super().add_const(name, x, value)


def float_weights(plan: QuantPlan) -> QuantPlan:
    """``plan`` with every conv and linear on float weights (activations as planned): for `MixedOps`."""
    return dataclasses.replace(plan, consts=dict(plan.consts), float_weights=frozenset(plan.specs))
