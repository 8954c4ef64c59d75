"""Parameters and multiply-accumulates (MACs) of a CARE model.

MACs are counted on the deploy form by interpreting its forward with `CountingOps`, so every
conv, the classifier Linear and the attention matmuls (k^T v, q . mean(k), q (k^T v)) are
counted from the shapes that actually flow; elementwise ops, norms and pooling are not counted
(the usual convention, which the published GMACs of CARE follow).
"""

from __future__ import annotations

import collections

import torch
import torch.nn as nn

from care_q.graph.ops import FloatOps
from care_q.models.builder import create_model
from care_q.transforms.deploy import deploy

MAC_TYPES = ("conv", "dwconv", "linear", "matmul")


class CountingOps(FloatOps):
    """FP32 ops that add up MACs per op type and per tensor name."""

    def __init__(self):
        self.macs: collections.Counter[str] = collections.Counter()
        self.by_name: dict[str, int] = {}

    def _count(self, kind: str, name: str, macs: int) -> None:
        self.macs[kind] += macs
        self.by_name[name] = self.by_name.get(name, 0) + macs

    def conv(self, name, x, conv: nn.Conv2d):
        y = super().conv(name, x, conv)
        per_out = (conv.in_channels // conv.groups) * conv.kernel_size[0] * conv.kernel_size[1]
        depthwise = conv.groups > 1 and conv.groups == conv.in_channels
        self._count("dwconv" if depthwise else "conv", name, y.numel() * per_out)
        return y

    def linear(self, name, x, fc: nn.Linear):
        y = super().linear(name, x, fc)
        self._count("linear", name, y.numel() * fc.in_features)
        return y

    def matmul(self, name, a, b, transpose_a=False, transpose_b=False):
        y = super().matmul(name, a, b, transpose_a, transpose_b)
        inner = a.shape[-2] if transpose_a else a.shape[-1]
        self._count("matmul", name, y.numel() * inner)
        return y


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def model_info(model_or_name: nn.Module | str, img_size: int = 224, weights=None,
               num_classes: int | None = None) -> dict:
    """``params`` (of the model as given: the official two-head CARE for a name), ``macs`` for one
    image of ``img_size`` x ``img_size``, ``macs_by_type`` (conv, dwconv, linear, matmul) and
    ``deploy_params`` (the deploy form: BNs folded, heads merged)."""
    model = create_model(model_or_name, weights=weights, num_classes=num_classes) \
        if isinstance(model_or_name, str) else model_or_name
    d = deploy(model)
    ops = CountingOps()
    d(torch.zeros(1, 3, img_size, img_size), ops)
    return {"arch": getattr(d, "arch", None), "img_size": img_size, "num_classes": d.num_classes,
            "params": count_params(model), "deploy_params": count_params(d),
            "macs": sum(ops.macs.values()),
            "macs_by_type": {k: ops.macs.get(k, 0) for k in MAC_TYPES}}
