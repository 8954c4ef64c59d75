"""Low-bit weights and learnt-scale bookkeeping shared by reconstruction PTQ and QAT.

- int4 weights (a recipe rule's ``weight_dtype: int4``): fake-quantized per output channel to
  ``s4 * [-7, 7]`` with ``s4 = max|w| / 7``; the int8 exporters store them as int8 codes
  ``round(q4 * 127 / 7)`` (15 levels per channel).
- learnt activation scales written into a plan: the tie dither (`tie_dither`) and the divisor
  guards recomputed from the new scales (`refresh_divisor_guards`).
"""

from __future__ import annotations

import zlib

import torch

from care_q.errors import CareQError
from care_q.quant.plan import QuantPlan

INT4_QMAX = 7
TIE_DITHER = 1e-4  # relative; see `tie_dither`
DIVISOR_GUARD_LSB = 1.0  # QuantPlan.finalize's divisor guard: den + eps >= 1 LSB of its scale


def weight_bits_of(plan: QuantPlan) -> dict[str, int]:
    """Conv node name -> weight bits (the recipe's 8 or 7, or 4) from the recipe's default and its rules (last match wins).

    A rule with ``weight_dtype`` that selects no conv is an error naming the rule.
    """
    rec = plan.recipe
    bits: dict[str, int] = {}
    hits = {r.index: 0 for r in rec.rules if r.weight_bits}
    for n in plan.graph.nodes:
        if n.op != "conv":
            continue
        spec = plan.specs[n.outputs[0]]
        b = rec.weight_bits
        for r in rec.rules:
            if r.weight_bits and r.matches(n.name, spec.role, n.op):
                b = r.weight_bits
                hits[r.index] += 1
        bits[n.name] = b
    for r in rec.rules:
        if r.weight_bits and hits[r.index] == 0:
            raise CareQError(f"{rec.source}: {r.describe()} sets weight_dtype but selects no conv of this model "
                             f"(weights belong to conv nodes: select their output tensors)")
    return bits


def int4_scales(w: torch.Tensor, per_channel: bool = True) -> torch.Tensor:
    """Symmetric int4 scales ``max|w| / 7``, per output channel (dim 0) or one for the tensor."""
    if per_channel:
        amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)
    else:
        amax = w.detach().abs().max().expand(w.shape[0])
    return (torch.clamp(amax, min=1e-12) / INT4_QMAX).float()


CLIP_RATIOS = torch.linspace(0.5, 1.0, 51)  # of max|w|: the int4 clipping ranges searched


def int4_mse_scales(w: torch.Tensor, per_channel: bool = True) -> torch.Tensor:
    """Symmetric int4 scales that clip: per output channel (or for the tensor), the scale
    ``r * max|w| / 7`` (r in `CLIP_RATIOS`) with the least squared rounding error of the weights.
    Written-back weights clamped to +-7 scale keep it: the exporters' ``max|w| / 7`` is this scale."""
    w = w.detach().float()
    flat = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
    amax = flat.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    best, best_err = amax / INT4_QMAX, torch.full_like(amax, float("inf"))
    for r in CLIP_RATIOS:
        s = amax * float(r) / INT4_QMAX
        err = (torch.clamp(torch.round(flat / s), -INT4_QMAX, INT4_QMAX) * s - flat).square().sum(1, keepdim=True)
        best, best_err = torch.where(err < best_err, s, best), torch.minimum(err, best_err)
    return best.reshape(-1).expand(w.shape[0]).contiguous()


def int4_weight(w: torch.Tensor, per_channel: bool = True) -> torch.Tensor:
    """Symmetric int4 fake quantization over [-7, 7] (straight-through), per output channel."""
    scale = int4_scales(w, per_channel)
    zp = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scale, zp, 0, -INT4_QMAX, INT4_QMAX)


def tie_dither(group: str) -> float:
    """A fixed pseudo-random factor within ``1 +- TIE_DITHER`` from a group's name.

    Learnt (LSQ) scales tend to settle where frequent values sit exactly on a rounding tie of
    their tensor (the gradient flips sign there), e.g. an int8 ADD whose output scale satisfies
    ``4 s_a + s_b = 2.75 s_out``. At an exact tie the reference and the runtimes' fixed-point
    arithmetic round differently; multiplying every learnt scale by this factor moves such ties
    about 1e-4 LSB away, far beyond float round-off, at no cost in accuracy.
    """
    return 1.0 + ((zlib.crc32(group.encode()) % 20001) - 10000) / 10000 * TIE_DITHER


def refresh_divisor_guards(plan: QuantPlan) -> None:
    """Recompute the plan's divisor-guard constants after its parameters changed (learnt scales)."""
    for n in plan.graph.nodes:
        if plan.divisor_guard(n) and plan.quantized(n.outputs[0]):
            plan.consts[n.name] = max(float(n.attrs["value"]), DIVISOR_GUARD_LSB * plan.qp(n.outputs[0]).scale[0])
