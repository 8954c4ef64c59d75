"""AdaRound: learnt up-or-down rounding of one weight tensor on its fixed per-channel grid.

The grid is the exporters' (``max|w| / 127`` per output channel, `care_q.quant.fakequant.weight_scales`);
int4: the clipping scale of least rounding error (`care_q.quant.lowbit.int4_mse_scales`), which the
written-back weights (clamped to +-7 steps) carry as their ``max|w| / 7``. Each weight's code is
``floor(w / s) + h`` with ``h`` a rectified sigmoid of a learnt ``v`` (Nagel et al., ICML 2020): soft
while learning, ``v >= 0`` (round up) at the end. int8: the largest-magnitude element of each channel
keeps its code +-qmax and its value, so the channel's maximum, and with it the scale the exporters
recompute from the written-back weights, is unchanged: the integer codes in the artifacts are the
learnt ones.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from care_q.quant.fakequant import weight_scales
from care_q.quant.lowbit import INT4_QMAX, int4_mse_scales

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound)
AT_MAX = 1e-3  # |w / s| within this of qmax: a channel's maximum (its code is fixed at +-qmax)


class Rounding(nn.Module):
    """The rounding of one weight tensor (``learn=False``: round to nearest, nothing to learn)."""

    def __init__(self, w: torch.Tensor, qmax: int, per_channel: bool, learn: bool):
        super().__init__()
        w = w.detach().float()
        self.qmax = qmax
        s = int4_mse_scales(w, per_channel) if qmax == INT4_QMAX else weight_scales(w, per_channel, qmax).float()
        s = s.reshape((-1,) + (1,) * (w.dim() - 1))
        ratio = w / s
        self.register_buffer("w0", w.clone())
        self.register_buffer("scale", s)
        self.register_buffer("fixed", ratio.abs() >= qmax - AT_MAX)
        self.register_buffer("nearest", torch.clamp(torch.round(ratio), -qmax, qmax))
        self.register_buffer("base", torch.floor(ratio))
        frac = (ratio - self.base).clamp(1e-4, 1 - 1e-4)
        v = -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1)  # h(v) = frac: starts at the float weight
        self.v = nn.Parameter(v) if learn else None

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def codes(self, soft: bool = True) -> torch.Tensor:
        """The integer codes (soft: fractional while learning)."""
        if self.v is None:
            return self.nearest
        up = self.h() if soft else (self.v.detach() >= 0).float()
        return torch.where(self.fixed, self.nearest, torch.clamp(self.base + up, -self.qmax, self.qmax))

    def weight(self, soft: bool = True) -> torch.Tensor:
        return self.codes(soft) * self.scale

    def regulariser(self, beta: float) -> torch.Tensor:
        """AdaRound's sum of 1 - |2h - 1|^beta: zero when every h is 0 or 1."""
        if self.v is None:
            return torch.zeros(())
        return torch.where(self.fixed, 0.0, 1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def final_weight(self, learnt: bool = True) -> torch.Tensor:
        """The weights to write back: the hard codes (``learnt``, else nearest) on the grid, each
        channel's maximum unchanged."""
        codes = self.codes(soft=False) if learnt else self.nearest
        if self.qmax == INT4_QMAX:  # the clipped grid: the channel's maximum becomes 7 * scale (`int4_mse_scales`)
            return codes * self.scale
        return torch.where(self.fixed, self.w0, codes * self.scale)
