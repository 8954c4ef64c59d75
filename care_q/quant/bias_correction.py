"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization", section 4.2).

Quantized weights and clipped, rounded inputs shift the *mean* of a layer's output: per output
channel, E[y_quant] != E[y_float]. The shift is systematic (the same for every image), so it
does not average out downstream; depthwise convs with few taps are the classic victims. The
correction moves it into the bias: for every conv and int8 FC, per output channel,

    bias += E[y_float] - E[y_quant]

measured on calibration images, y_quant being the layer's output in the fake-quant model
(before its own output rounding) and y_float the FP32 deploy form's. Layer after layer: a
correction upstream changes what downstream layers see, so each layer is measured with the
layers before it already corrected (correcting all layers at once from one measurement, and
iterating, diverged on the CIFAR-10 proxy: each layer also "corrects" what its upstream layers
fix; mean error 1.7% -> 4.2% -> 10%). The exporters then write the corrected bias (int32 at s_in * s_w, like any other), so every
artifact and the fake-quant reference carry it; the calibrated ranges are left as they are.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from care_q.quant.fakequant import QuantOps
from care_q.quant.plan import QuantPlan
from care_q.utils.progress import track

# Per-channel means over images x positions: 512 images at 64x64 pin them down (the proxy's
# 2x2 last stage: 2048 samples per channel); at higher resolutions as many positions take fewer
# images (224: 41; 27 s of `care-q ptq` on care_s1@224 here).
MAX_IMAGES = 512
PIXEL_BUDGET = MAX_IMAGES * 64 * 64
MIN_IMAGES = 32


def images_for(size: int) -> int:
    """How many calibration images bias correction uses at `size` x `size` input."""
    return max(MIN_IMAGES, min(MAX_IMAGES, PIXEL_BUDGET // (size * size)))


def _not_channels(y: torch.Tensor) -> list[int]:
    """Every dim but the channels (dim 1: NCHW maps, (N, C) logits)."""
    return [d for d in range(y.dim()) if d != 1]


class _ChannelMeans(QuantOps):
    """QuantOps ("float" or "quant") that sums every conv / int8 FC output per channel (over
    images and positions), before the layer's own output quantization; with `squares`, the sums
    of squares too."""

    def __init__(self, plan: QuantPlan, mode: str, squares: bool = False):
        super().__init__(plan, mode)
        self.squares = squares
        self.sums: dict[str, torch.Tensor] = {}
        self.sq_sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.modules: dict[str, nn.Module] = {}
        self._layer: str | None = None

    def conv(self, name, x, conv):
        self.modules[name], self._layer = conv, name
        return super().conv(name, x, conv)

    def linear(self, name, x, fc):
        in_name = self.plan.graph_inputs[name][0]
        if self.plan.quantized(name) and self.plan.quantized(in_name):  # int8 FC only; a float head is exact
            self.modules[name], self._layer = fc, name
        return super().linear(name, x, fc)

    def _out(self, name, y, op=""):
        if name == self._layer:  # the layer's own output
            self._layer = None
            dims = _not_channels(y)
            yd = y.double()
            self.sums[name] = self.sums.get(name, 0) + yd.sum(dim=dims)
            if self.squares:
                self.sq_sums[name] = self.sq_sums.get(name, 0) + yd.square().sum(dim=dims)
            self.counts[name] = self.counts.get(name, 0) + y.numel() // y.shape[1]
        return super()._out(name, y, op)

    def merge(self, other: _ChannelMeans) -> None:
        """Add another pass's sums (over other images) to this one's."""
        self.modules.update(other.modules)
        for mine, theirs in ((self.sums, other.sums), (self.sq_sums, other.sq_sums)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        for k, v in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v

    def means(self) -> dict[str, torch.Tensor]:
        return {k: s / self.counts[k] for k, s in self.sums.items()}

    def rms(self) -> dict[str, float]:
        return {k: float((s / self.counts[k]).mean().sqrt()) for k, s in self.sq_sums.items()}


class _Correcting(_ChannelMeans):
    """Fake-quant forward that corrects each layer's output mean in flight (to `target`, the FP32
    means on the same images) before its output quantization, so every later layer sees the
    corrected values; sums the corrections per layer."""

    def __init__(self, plan: QuantPlan, target: dict[str, torch.Tensor]):
        super().__init__(plan, "quant")
        self.target = target
        self.deltas: dict[str, torch.Tensor] = {}

    def _out(self, name, y, op=""):
        if name == self._layer:
            self._layer = None  # its sums are not needed: the corrections are
            delta = self.target[name] - y.double().mean(dim=_not_channels(y))
            self.deltas[name] = self.deltas.get(name, 0) + delta * (y.numel() // y.shape[1])
            shape = [1] * y.dim()
            shape[1] = -1
            y = y + delta.to(y.dtype).reshape(shape)
        return super()._out(name, y, op)


def _error(target: dict, got: dict, spread: dict) -> float:
    return sum(float((target[k] - got[k]).square().mean().sqrt()) / max(spread[k], 1e-12)
               for k in target) / len(target)


@torch.no_grad()
def bias_correction(plan: QuantPlan, model, batches: Iterable, progress: bool | None = None) -> dict:
    """Correct the biases of `model` (the deploy form of the calibrated `plan`) in place.

    Sequential per batch: the FP32 per-channel means of every layer on the batch, then a
    fake-quant forward that corrects each layer in flight (so downstream layers are measured
    with upstream ones already corrected, as layer-by-layer correction requires); the
    corrections of all batches are averaged (weighted by positions) into the biases.

    `batches`: input tensors or (x, y) pairs. Returns a summary for the report: the layers
    corrected and the mean over layers of RMS_c(E[y_float]_c - E[y_quant]_c) / RMS(y_float)
    before (``error_before``) and after (``error_after``) correction, each measured by a pass
    over the same images.
    """
    xs = [b[0] if isinstance(b, (list, tuple)) else b for b in batches]
    if not xs:
        raise ValueError("bias correction needs at least one batch of images")
    deltas: dict[str, torch.Tensor] = {}
    ref = _ChannelMeans(plan, "float", squares=True)   # all batches: the before/after target
    before = _ChannelMeans(plan, "quant")
    for x in track(xs, "bias correction", enabled=progress):
        f = _ChannelMeans(plan, "float", squares=True)
        model(x, f)
        ref.merge(f)
        model(x, before)
        c = _Correcting(plan, f.means())
        model(x, c)
        for k, d in c.deltas.items():
            deltas[k] = deltas.get(k, 0) + d
    for name, module in ref.modules.items():
        if module.bias is None:  # a bias-free conv gets one (the exporters write it like any other)
            module.bias = nn.Parameter(torch.zeros(deltas[name].shape[0], dtype=module.weight.dtype),
                                       requires_grad=False)
        module.bias.add_((deltas[name] / ref.counts[name]).to(module.bias.dtype))
    after = _ChannelMeans(plan, "quant")
    for x in xs:
        model(x, after)
    target, spread = ref.means(), ref.rms()
    return {"layers": len(ref.modules), "images": sum(int(x.shape[0]) for x in xs),
            "error_before": _error(target, before.means(), spread),
            "error_after": _error(target, after.means(), spread)}
