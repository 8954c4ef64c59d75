"""Layer sensitivity: which layers' quantization costs accuracy, to choose a mixed-precision recipe.

    res = sensitivity("care_s0", weights=..., calib="cifar10_train", num_calib=256, by="block")
    res["ranking"]            # groups, most harmful first
    res["groups"]["stages.2.blocks.0"]["only"]["agreement"]

The plan is calibrated once (as `care-q ptq` does). Then, on held-out images, for every group G
of tensors (``by``: ``block`` = stem / downsample / each block / head, ``stage``, or ``role`` =
the recipe's tensor classes such as attn_den):

- ``only``: G quantized, everything else float: the damage G does on its own;
- ``all_but``: everything quantized except G: how much keeping G in float recovers.

Each variant reports top-1 agreement with FP32, accuracy when the images have labels, and the
logit SQNR against FP32. A float tensor keeps float weights too (`MixedOps`). Per-tensor SQNR of
the fully quantized model is reported alongside, aggregated per group.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from care_q.data import check_classes, get_dataset, make_loader
from care_q.errors import CareQError
from care_q.eval.analysis import layer_group
from care_q.eval.report import write_report
from care_q.pipeline import PrepareConfig, Prepared, prepare
from care_q.pipeline.fidelity import fp32_logits, shipped_logits, tensor_sqnr
from care_q.quant.mixed import MixedOps
from care_q.quant.qtypes import DType, sqnr_db
from care_q.utils.progress import progress_bar

GROUPINGS = ("block", "stage", "role")
MODES = ("only", "all_but")


WEIGHT_OPS = ("conv", "linear")


def group_of(name: str, spec, by: str) -> str:
    if by == "role":
        return spec.role.value
    g = layer_group(name)
    if by == "stage" and g.startswith("stages."):
        return ".".join(g.split(".")[:2])
    return g


def layer_groups(plan, by: str = "block") -> dict[str, list[str]]:
    """Group -> the tensors quantization touches (int activations, or int8 weights of their
    conv/linear), in execution order; groups with none are left out."""
    if by not in GROUPINGS:
        raise CareQError(f"unknown grouping '{by}'; choose from {list(GROUPINGS)}")
    out: dict[str, list[str]] = {}
    for name, spec in plan.specs.items():
        if spec.dtype != DType.FLOAT or spec.op in WEIGHT_OPS:
            out.setdefault(group_of(name, spec, by), []).append(name)
    return out


def float_except(plan, keep: set[str]):
    """A copy of ``plan`` in which every tensor outside ``keep`` is float, with float weights
    (`MixedOps`); the tensors in ``keep`` keep their parameters."""
    specs = {n: (s if n in keep or s.dtype == DType.FLOAT else dataclasses.replace(s, dtype=DType.FLOAT))
             for n, s in plan.specs.items()}
    return dataclasses.replace(plan, specs=specs, consts=dict(plan.consts),
                               float_weights=frozenset(n for n in plan.specs if n not in keep))


@torch.no_grad()
def _logits(dmodel, plan, x: torch.Tensor, batch: int, mode: str = "quant") -> np.ndarray:
    outs = []
    for i in range(0, x.shape[0], batch):
        xb = x[i:i + batch]
        outs.append((dmodel(xb) if plan is None else dmodel(xb, MixedOps(plan, mode))).numpy())
    return np.concatenate(outs)


def _score(logits: np.ndarray, ref: np.ndarray, labels: np.ndarray | None) -> dict:
    pred = logits.argmax(1)
    res = {"agreement": float((pred == ref.argmax(1)).mean()), "logit_sqnr_db": sqnr_db(ref, logits)}
    if labels is not None:
        res["top1"] = float((pred == labels).mean())
    return res


def sensitivity(model: str, *, weights: str | Path | None = None, calib: str = "imagenet_1k_subset",
                recipe: str | Path = "ptq_int8", num_calib: int | None = None, num_eval: int = 256,
                eval_set: str | None = None, data_root=None, img_size: int | None = None, by: str = "block",
                modes=MODES, seed: int = 0, batch_size: int = 64, out=None, progress: bool | None = None,
                prepared: Prepared | None = None, report: bool = True) -> dict:
    """Rank layer groups by the damage their quantization does (see the module docstring).

    The plan is `care_q.pipeline.prepare`'s (``prepared``, or prepared here), the one `care-q ptq`
    ships; its ``full_int8`` row is the TFLite artifact's logits (its exact reference) against FP32.
    ``eval_set``: labelled images to score on (default: ``num_eval`` held-out images of the
    calibration set, the draw `care-q ptq` verifies on; their labels are used when the set has
    labels for this head). Writes report.md / .json / .html to ``out`` when given.
    """
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise CareQError(f"unknown mode(s) {bad or list(modes)}; choose from {list(MODES)}")
    if by not in GROUPINGS:
        raise CareQError(f"unknown grouping '{by}'; choose from {list(GROUPINGS)}")
    if num_eval < 1:
        raise CareQError(f"num_eval must be >= 1, got {num_eval}")
    t_start = time.time()
    prep = prepared or prepare(PrepareConfig(model, weights=weights, recipe=recipe, calib=calib, num_calib=num_calib,
                                             img_size=img_size, data_root=data_root, seed=seed, progress=progress))
    plan, dmodel = prep.plan, prep.dmodel
    src = eval_set or prep.calib
    x, labels = _eval_images(prep, src, eval_set is not None, num_eval, seed + 1, batch_size, progress)
    groups = layer_groups(plan, by)
    total = 2 + len(groups) * len(modes)
    with progress_bar(f"sensitivity ({len(groups)} groups by {by})", total, enabled=progress) as advance:
        ref = fp32_logits(prep.net, x)
        advance(1)
        full = _score(shipped_logits(dmodel, plan, x), ref, labels)
        advance(1)
        fp32 = _score(ref, ref, labels)
        all_q = set().union(*groups.values()) if groups else set()
        rows: dict[str, dict] = {}
        for g, members in groups.items():
            row = {"tensors": len(members)}
            if "only" in modes:
                row["only"] = _score(_logits(dmodel, float_except(plan, set(members)), x, batch_size), ref, labels)
                advance(1)
            if "all_but" in modes:
                row["all_but"] = _score(_logits(dmodel, float_except(plan, all_q - set(members)), x, batch_size),
                                        ref, labels)
                advance(1)
            rows[g] = row
    sq = tensor_sqnr(dmodel, plan, x[:min(16, len(x))])  # per-tensor SQNR of the fully quantized model
    _add_tensor_sqnr(rows, groups, sq)
    res = {"command": "sensitivity", "model": prep.model, "weights": prep.weights, "img_size": prep.img_size,
           "recipe": prep.recipe.name, "calib": prep.calib, "calib_images": prep.calib_images,
           "eval": {"set": str(src), "images": int(x.shape[0]), "labelled": labels is not None},
           "by": by, "modes": list(modes), "fp32": fp32, "full_int8": full, "groups": rows,
           "ranking": _ranking(rows, full),
           "tensor_sqnr_db": {n: {"sqnr_db": v, "group": group_of(n, plan.specs[n], by),
                                  "role": plan.specs[n].role.value} for n, v in sq.items()},
           "notes": prep.notes, "seconds": None}
    res["seconds"] = round(time.time() - t_start, 1)
    if out is not None and report:
        write_report(res, out)
    return res


def _eval_images(prep: Prepared, src: str, labelled_set: bool, n: int, seed: int, batch_size: int,
                 progress: bool | None) -> tuple[torch.Tensor, np.ndarray | None]:
    """(images, labels or None): ``n`` images of ``src`` drawn with ``seed``; labels when they fit the head."""
    ds = get_dataset(src, prep.preprocess, data_root=prep.config.data_root, limit=n, seed=seed, model=prep.net,
                     progress=progress)
    if labelled_set:
        check_classes(ds, prep.net.num_classes, prep.preprocess.label_names, what=f"model '{prep.model}'")
    xs, ys = [], []
    for xb, yb in make_loader(ds, batch_size=batch_size):
        xs.append(xb)
        ys.append(yb)
    x, y = torch.cat(xs)[:n], torch.cat(ys)[:n].numpy()
    classes = getattr(ds, "classes", None)
    fits = classes is not None and len(classes) == prep.net.num_classes and (y >= 0).all()
    return x, (y if fits else None)


def _add_tensor_sqnr(rows: dict, groups: dict, sq: dict) -> None:
    for g, members in groups.items():
        vals = [sq[m] for m in members if m in sq and np.isfinite(sq[m])]
        rows[g]["sqnr_db_mean"] = float(np.mean(vals)) if vals else None
        rows[g]["sqnr_db_min"] = float(np.min(vals)) if vals else None
        rows[g]["worst_tensor"] = min((m for m in members if m in sq), key=lambda m: sq[m], default=None)


def _ranking(rows: dict, full: dict) -> list[str]:
    def harm(g):
        """Most harmful first: lowest agreement when alone int8 minus what keeping it float recovers;
        ties (common on few images) broken by the logit SQNR, alone (lower first) then all-but (higher first)."""
        r = rows[g]
        a = r["only"]["agreement"] if "only" in r else 1.0
        b = r["all_but"]["agreement"] if "all_but" in r else full["agreement"]
        s_only = r["only"]["logit_sqnr_db"] if "only" in r else np.inf
        s_but = r["all_but"]["logit_sqnr_db"] if "all_but" in r else -np.inf
        return (a - (b - full["agreement"]), s_only, -s_but, g)

    return sorted(rows, key=harm)
