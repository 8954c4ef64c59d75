"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization", section 4.1).

CARE's interaction modules end in depthwise -> pointwise chains with nothing in between:
``inter1_conv -> inter1_fc2`` and ``inter2_conv -> inter2_fc2`` (not in a stage's last block,
whose ``inter2_conv`` is the block output). For such a pair, scaling output channel c of the
depthwise conv (weights and bias) by 1 / s_c and input channel c of the pointwise conv by s_c
is exact in FP32; with

    s_c = sqrt(r1_c * r2_c) / r2_c,   r1_c = max |W_dw[c]|,  r2_c = max_o |W_pw[o, c]|

both ranges become sqrt(r1_c * r2_c): channels whose depthwise filters (and so, roughly,
outputs) are large shrink, small ones grow, so the per-tensor int8 grid of the intermediate
activation serves all channels more evenly. Data-free; applied to the deploy form before
calibration, so calibration and every exporter see the equalized weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn

EPS = 1e-12


def equalization_pairs(model) -> list[tuple[str, nn.Conv2d, nn.Conv2d]]:
    """(name, depthwise conv, following pointwise conv) of every equalizable chain of a DeployCARE."""
    pairs = []
    for name, blk in zip(model.block_names(), model.blocks):
        pairs.append((f"{name}.inter1_conv", blk.inter1_conv, blk.inter1_fc2))
        if not blk.last:
            pairs.append((f"{name}.inter2_conv", blk.inter2_conv, blk.inter2_fc2))
    return pairs


@torch.no_grad()
def equalize_pair(dw: nn.Conv2d, pw: nn.Conv2d) -> torch.Tensor:
    """Equalize one depthwise -> pointwise pair in place; returns the scales s (see module doc)."""
    if dw.groups != dw.out_channels or dw.in_channels != dw.out_channels:
        raise ValueError(f"cross-layer equalization: expected a depthwise conv, got groups={dw.groups} "
                         f"for {dw.in_channels}->{dw.out_channels} channels")
    if pw.groups != 1 or pw.kernel_size != (1, 1) or pw.in_channels != dw.out_channels:
        raise ValueError(f"cross-layer equalization: expected a pointwise conv reading {dw.out_channels} "
                         f"channels, got kernel {pw.kernel_size}, groups {pw.groups}, {pw.in_channels} inputs")
    r1 = dw.weight.abs().amax(dim=(1, 2, 3))
    r2 = pw.weight.abs().amax(dim=(0, 2, 3))
    ok = (r1 > EPS) & (r2 > EPS)  # a dead channel on either side keeps its scale
    s = torch.where(ok, torch.sqrt(r1 * r2) / r2.clamp_min(EPS), torch.ones_like(r1))
    dw.weight.div_(s.reshape(-1, 1, 1, 1))
    if dw.bias is not None:
        dw.bias.div_(s)
    pw.weight.mul_(s.reshape(1, -1, 1, 1))
    return s


@torch.no_grad()
def cross_layer_equalization(model) -> dict:
    """Equalize every depthwise -> pointwise chain of a DeployCARE in place; a summary for the report:
    the pairs, and the mean over pairs of the spread (max / min) of the depthwise per-channel weight
    ranges before and after."""
    spreads_before, spreads_after = [], []
    pairs = equalization_pairs(model)
    for _, dw, pw in pairs:
        spreads_before.append(_spread(dw))
        equalize_pair(dw, pw)
        spreads_after.append(_spread(dw))
    n = max(len(pairs), 1)
    return {"pairs": len(pairs), "range_spread_before": sum(spreads_before) / n,
            "range_spread_after": sum(spreads_after) / n}


def _spread(dw: nn.Conv2d) -> float:
    r = dw.weight.abs().amax(dim=(1, 2, 3))
    r = r[r > EPS]
    return float(r.max() / r.min()) if r.numel() else 1.0
