"""Quantization analysis for reports: a calibrated plan, per-tensor SQNR, activation histograms.

    prep = prepare_plan("care_s0", weights=..., calib="cifar10_train", num_calib=1000)
    a = quant_analysis(prep, num_images=16)
    a["sqnr_db"]["stages.2.blocks.0.attn.den"]        # {"recipe": dB, "minmax": dB, "role", "group"}
    a["histograms"]["stages.2.blocks.0.attn.phi_k"]    # counts over [lo, hi], chosen range, method

`prepare_plan` follows `care_q.ptq.ptq` step for step (deploy form, recipe substitutions,
trace, plan, calibration on the same seeded images), so with the same arguments it gives the
plan behind the care-q artifacts. SQNR is measured fake-quant vs FP32 per tensor, for the recipe
and for one global min/max over every tensor (what generic tools do).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from care_q.errors import CareQError

ATTENTION_HIST_ROLES = ("attn_qk", "attn_elu", "attn_phi", "attn_kv", "attn_kmean", "attn_den", "attn_num", "attn_out")


@dataclass
class Prepared:
    model: str
    net: torch.nn.Module          # the original CARE model (FP32)
    dmodel: torch.nn.Module       # its deploy form (after the recipe's substitutions)
    graph: object
    plan: object                  # calibrated QuantPlan (plan.observers set)
    recipe: object
    preprocess: object
    img_size: int
    calib: str
    calib_images: int
    weights: str | None
    notes: list


def prepare_plan(model: str, *, weights: str | Path | None = None, calib: str = "imagenet_1k_subset",
                 recipe: str | Path = "ptq_int8", num_calib: int | None = None, img_size: int | None = None,
                 data_root=None, seed: int = 0, progress: bool | None = None) -> Prepared:
    """Build and calibrate the plan exactly as `care_q.ptq.ptq` does."""
    from care_q.data import get_dataset, make_loader
    from care_q.graph.trace import trace
    from care_q.models import create_model, load_sidecar
    from care_q.quant.calibrate import calibrate
    from care_q.quant.plan import build_plan
    from care_q.quant.recipe import load_recipe
    from care_q.transforms import deploy

    rec = load_recipe(recipe)
    net = create_model(model, weights=weights)
    notes = []
    if weights is None:
        notes.append("no weights: random initialisation, accuracy figures are meaningless")
    pre = load_sidecar(weights).with_size(img_size)
    size = pre.input_size[-1]
    ds = get_dataset(calib, pre, data_root=data_root, limit=num_calib, seed=seed, model=net, progress=progress)
    from care_q.transforms.substitute import apply_substitutions

    first = next(iter(make_loader(ds, batch_size=rec.batch_size)))[0] if rec.attention == "npu" else None
    dmodel, sub_notes = apply_substitutions(deploy(net), rec, first)
    notes += sub_notes
    graph = trace(dmodel, torch.zeros(1, 3, size, size))
    plan = build_plan(graph, rec)
    if num_calib is not None and len(ds) < num_calib:
        notes.append(f"asked for {num_calib} calibration images, '{calib}' has {len(ds)}")
    n = calibrate(plan, dmodel, make_loader(ds, batch_size=rec.batch_size), progress=progress)
    return Prepared(model, net, dmodel, graph, plan, rec, pre, size, str(calib), n,
                    str(weights) if weights else None, notes)


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


def minmax_plan(prep: Prepared):
    """The same graph with every tensor at one global min/max (generic tools' default)."""
    from care_q.quant.plan import build_plan
    from care_q.quant.qtypes import Method

    naive = build_plan(prep.graph, dataclasses.replace(prep.recipe, rules=(), method=Method.MINMAX))
    naive.finalize(prep.plan.observers)
    naive.consts = {}
    return naive


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
                   hist_blocks: str = "first_last", data_root=None, seed: int = 1) -> dict:
    """Per-tensor SQNR (recipe and global min/max) on ``x`` (default: ``num_images`` held-out
    images of the calibration set) and histograms of the attention tensors with their chosen
    ranges. JSON-ready."""
    from care_q.ptq import tensor_sqnr
    from care_q.quant.fakequant import QuantOps
    from care_q.quant.qtypes import sqnr_db

    plan = prep.plan
    if not getattr(plan, "observers", None):
        raise CareQError("quant_analysis needs a calibrated plan (run care_q.quant.calibrate first)")
    if x is None:
        x = held_out_images(prep, num_images, data_root=data_root, seed=seed)
    naive = minmax_plan(prep)
    sq_rec = tensor_sqnr(prep.dmodel, plan, x)
    sq_mm = tensor_sqnr(prep.dmodel, naive, x)
    fl = prep.dmodel(x).numpy()
    naive_logits = prep.dmodel(x, QuantOps(naive, "quant")).numpy()
    logit = {"recipe": sqnr_db(fl, prep.dmodel(x, QuantOps(plan, "quant")).numpy()),
             "minmax": sqnr_db(fl, naive_logits),
             # share of non-finite logits under one global min/max: with no divisor guard a normaliser
             # rounds to its zero point and the division overflows
             "minmax_nonfinite": float(np.mean(~np.isfinite(naive_logits)))}
    sq = {n: {"recipe": v, "minmax": sq_mm.get(n), "role": plan.specs[n].role.value, "group": layer_group(n)}
          for n, v in sq_rec.items()}
    hists = {}
    for n in attention_tensors(plan, hist_blocks):
        obs, spec, qp = plan.observers[n], plan.specs[n], plan.qp(n)
        nv = naive.qp(n)
        hists[n] = {**_rebin(obs, hist_bins), "min": float(obs.min), "max": float(obs.max),
                    "range": [qp.lo, qp.hi] if qp else None, "minmax_range": [nv.lo, nv.hi] if nv else None,
                    "method": spec.method.value, "dtype": spec.dtype.value, "symmetric": spec.symmetric,
                    "role": spec.role.value}
    return {"model": prep.model, "img_size": prep.img_size, "recipe": prep.recipe.name, "calib": prep.calib,
            "calib_images": prep.calib_images, "images": int(x.shape[0]), "logit_sqnr_db": logit,
            "sqnr_db": sq, "histograms": hists}


def held_out_images(prep: Prepared, n: int, data_root=None, seed: int = 1) -> torch.Tensor:
    """``n`` images of the calibration set drawn with another seed (the ptq verification draw)."""
    from care_q.data import get_dataset, make_loader

    ds = get_dataset(prep.calib, prep.preprocess, data_root=data_root, limit=n, seed=seed, model=prep.net,
                     progress=False)
    return torch.cat([b[0] for b in make_loader(ds, batch_size=max(1, min(n, 64)))])[:n]
