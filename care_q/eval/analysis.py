"""Quantization analysis for reports: per-tensor SQNR, the shipped logits against FP32, activation histograms.

    prep = prepare(PrepareConfig("care_s0", weights=..., calib="cifar10_train", num_calib=1000))
    a = quant_analysis(prep, num_images=16)
    a["sqnr_db"]["stages.2.blocks.0.attn.den"]        # {"recipe": dB, "minmax": dB, "role", "group"}
    a["shipped_vs_fp32"]                               # the TFLite artifact's logits vs FP32 on the same images
    a["histograms"]["stages.2.blocks.0.attn.phi_k"]    # counts over [lo, hi], chosen range, method

The plan is `care_q.pipeline.prepare`'s, the one `care-q ptq` ships (bias correction and
equalization included). Per-tensor SQNR is fake quantization vs float, for the recipe and for one
global min/max over every tensor (what generic tools do); ``shipped_vs_fp32`` is computed by the
TFLite artifact's exact reference, so on the same images it equals the artifact's own
``verification.vs_fp32`` in a ptq report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from care_q.errors import CareQError
from care_q.pipeline import PrepareConfig, Prepared, held_out_images, prepare
from care_q.pipeline.fidelity import fidelity, fp32_logits, recipe_vs_minmax, shipped_logits

ATTENTION_HIST_ROLES = ("attn_qk", "attn_elu", "attn_phi", "attn_kv", "attn_kmean", "attn_den", "attn_num", "attn_out")


def prepare_plan(model: str, *, weights: str | Path | None = None, calib: str = "imagenet_1k_subset",
                 recipe: str | Path = "ptq_int8", num_calib: int | None = None, img_size: int | None = None,
                 data_root=None, seed: int = 0, progress: bool | None = None) -> Prepared:
    """`care_q.pipeline.prepare` with keyword arguments (the plan `care-q ptq` ships)."""
    return prepare(PrepareConfig(model, weights=weights, recipe=recipe, calib=calib, num_calib=num_calib,
                                 img_size=img_size, data_root=data_root, seed=seed, progress=progress))


def layer_group(name: str) -> str:
    """The layer a tensor belongs to: ``stages.2.blocks.0``, ``stages.1.downsample``, ``stem``, ``head``."""
    parts = name.split(":")[0].split(".")
    if parts[0] == "stages" and len(parts) >= 4 and parts[2] == "blocks":
        return ".".join(parts[:4])
    if parts[0] == "stages" and len(parts) >= 3:
        return ".".join(parts[:3])
    if parts[0] == "input":
        return "stem"
    return parts[0]


def _rebin(obs, max_bins: int) -> dict:
    """The observer's histogram cropped to [min, max] and merged into at most ``max_bins`` bins."""
    edges = obs.edges
    hist = obs.hist
    i0 = max(int(np.searchsorted(edges, obs.min, side="right")) - 1, 0)
    i1 = min(int(np.searchsorted(edges, obs.max, side="left")), len(hist))
    i1 = max(i1, i0 + 1)
    h = hist[i0:i1]
    step = max(1, int(np.ceil(len(h) / max_bins)))
    pad = (-len(h)) % step
    h = np.concatenate([h, np.zeros(pad)]).reshape(-1, step).sum(axis=1)
    return {"lo": float(edges[i0]), "hi": float(edges[i0] + (edges[1] - edges[0]) * step * len(h)),
            "counts": [float(c) for c in h]}


def attention_tensors(plan, blocks: str = "first_last") -> list[str]:
    """Observed attention tensors of the first and last attention block (execution order)."""
    names = [n for n, s in plan.specs.items() if s.role.value in ATTENTION_HIST_ROLES and n in plan.observers]
    order = []
    for n in names:
        g = layer_group(n)
        if g not in order:
            order.append(g)
    keep = set(order if blocks == "all" else ([order[0], order[-1]] if order else []))
    return [n for n in names if layer_group(n) in keep]


@torch.no_grad()
def quant_analysis(prep: Prepared, x: torch.Tensor | None = None, num_images: int = 16, hist_bins: int = 96,
                   hist_blocks: str = "first_last", data_root=None, seed: int | None = None) -> dict:
    """Per-tensor SQNR (recipe and global min/max) on ``x`` (default: ``num_images`` held-out images
    of the calibration set, the draw `care-q ptq` verifies on), the shipped logits against FP32, and
    histograms of the attention tensors with their chosen ranges. JSON-ready."""
    plan = prep.plan
    if not plan.observers:
        raise CareQError("quant_analysis needs a calibrated plan (care_q.pipeline.prepare)")
    if x is None:
        x = held_out_images(prep, num_images, seed=seed)
    compared = recipe_vs_minmax(prep.dmodel, plan, x)
    naive = compared["naive"]
    sq = {n: {**v, "role": plan.specs[n].role.value, "group": layer_group(n)} for n, v in compared["sqnr_db"].items()}
    hists = {}
    for n in attention_tensors(plan, hist_blocks):
        obs, spec, qp = plan.observers[n], plan.specs[n], plan.qp(n)
        nv = naive.qp(n)
        hists[n] = {**_rebin(obs, hist_bins), "min": float(obs.min), "max": float(obs.max),
                    "range": [qp.lo, qp.hi] if qp else None, "minmax_range": [nv.lo, nv.hi] if nv else None,
                    "method": spec.method.value, "dtype": spec.dtype.value, "symmetric": spec.symmetric,
                    "role": spec.role.value}
    return {"model": prep.model, "img_size": prep.img_size, "recipe": prep.recipe.name, "calib": prep.calib,
            "calib_images": prep.calib_images, "images": int(x.shape[0]), "logit_sqnr_db": compared["logit_sqnr_db"],
            "shipped_vs_fp32": fidelity(fp32_logits(prep.net, x), shipped_logits(prep.dmodel, plan, x)),
            "sqnr_db": sq, "histograms": hists}
