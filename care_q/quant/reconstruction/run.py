"""Reconstruction PTQ (BRECQ / QDrop with AdaRound rounding and LSQ step sizes), unit by unit.

For each unit (`units_of`: stem, downsamples, CARE blocks, head) in execution order:

1. its input is the output of the already reconstructed, fake-quantized units before it on the
   calibration images; its target is that unit's output on the FP32 chain (no labels) of the
   ``reference`` model: the original deploy form where the recipe substitutes ops
   (``reconstruction.target: original``; scaled where a substitution folds a constant across the
   unit's output, `unit_output_gains`), else the deploy form as it is;
2. ``iterations`` Adam steps on random batches minimise the squared error (summed over channels,
   mean over the rest, divided by the target's mean square) of the unit's fake-quant output
   against the target, plus AdaRound's
   rounding regulariser; learnt: each weight's rounding (`Rounding`), the step sizes of the
   activation groups the unit is the first to produce and, in float, the parameters of the unit's
   substitutions (`substitution_params`) and its conv / linear biases (stored as int32 at the
   input's times the weight's scale: any value is exact to that step); with QDrop (`ReconOps`);
3. the learnt state is written back: hard codes into the deploy form's weights (each channel's
   maximum unchanged, so the exporters recompute the same scales and the learnt codes), learnt
   scales (tie-dithered) into ``plan.qparams``, divisor guards recomputed;
4. a checkpoint of everything learnt so far is written atomically: a killed run resumes at the
   next unit and ends with the result of an uninterrupted one (seeded per unit).

Then, with ``network_iterations``, the network stage (`_network_stage`): the whole model as one last
unit, its fake-quant logits against the FP32 logits, learning every step size and, in float, the
biases and the int8 weights (the exporters round them); no QDrop. Unit-wise errors do not add up
to the end-to-end one (each unit fits its own output, not what the rest of the network makes of
its error): on the CIFAR-10 proxy the stage takes the logit SQNR on held-out images from 19.0 to
21.5-22 dB (see the recipe ptq_int8_recon). Checkpointed like a unit.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from care_q.errors import CareQError
from care_q.graph.ops import FloatOps
from care_q.quant.fakequant import QuantOps
from care_q.quant.layout_policy import weight_qmax
from care_q.quant.lowbit import (
    INT4_QMAX,
    refresh_divisor_guards,
    tie_dither,
    weight_bits_of,
)
from care_q.quant.plan import QuantPlan
from care_q.quant.qtypes import DType, QParams, sqnr_db
from care_q.quant.recipe import ReconSettings
from care_q.quant.reconstruction.ops import ReconOps
from care_q.quant.reconstruction.rounding import Rounding
from care_q.quant.reconstruction.units import Unit, units_of
from care_q.transforms.substitute import substitution_params, unit_output_gains
from care_q.utils.io import atomic_torch_save
from care_q.utils.progress import progress_bar

CHECKPOINT_VERSION = 2
CHUNK = 100  # images per no-grad forward
SCORE_IMAGES = 256  # calibration images a unit's error is measured on (during its steps, before and after)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CareQError("device 'cuda' asked for, but torch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise CareQError(f"device '{device}': use auto, cpu or cuda")
    return torch.device(device)


@torch.no_grad()
def _forward(unit: Unit, x: torch.Tensor, ops, device: torch.device) -> torch.Tensor:
    """The unit on all of ``x`` (no gradient, in chunks), on the CPU."""
    return torch.cat([unit.run(x[i:i + CHUNK].to(device), ops).cpu() for i in range(0, x.shape[0], CHUNK)])


def _layout(plan: QuantPlan, units: list[Unit], sample: torch.Tensor) -> list[tuple[set[str], list[str]]]:
    """Per unit: (the tensor names it produces, its conv/linear node names), from a recorded float run."""
    producer = plan.graph.producer()
    out, x = [], sample
    for u in units:
        ops = QuantOps(plan, "float", record=True)
        with torch.no_grad():
            x = u.run(x, ops)
        names = set(ops.record)
        nodes = sorted({producer[t].name for t in names if t in producer and producer[t].op in ("conv", "linear")})
        out.append((names, nodes))
    return out


def _owners(plan: QuantPlan, layout) -> dict[str, int]:
    """Group root -> the first unit producing one of its tensors (the unit that learns its scale)."""
    owner: dict[str, int] = {}
    for k, (names, _) in enumerate(layout):
        for t in sorted(names):
            spec = plan.specs.get(t)
            if spec is not None:
                owner.setdefault(spec.group, k)
    return owner


def _learnable(plan: QuantPlan, groups: list[str]) -> list[str]:
    out = plan.specs[plan.graph.output].group  # the int8 logits keep their calibrated floor (see calibrate)
    return [g for g in groups if plan.specs[g].dtype != DType.FLOAT and plan.specs[g].fixed is None
            and g in plan.qparams and g != out]


def _fingerprint(plan: QuantPlan, units: list[Unit], images: torch.Tensor, settings: ReconSettings,
                 seed: int) -> str:
    """What a checkpoint must have been made from: the units, images, settings, seed, calibrated plan and weights."""
    h = hashlib.sha256()
    h.update(repr([u.name for u in units]).encode())
    h.update(repr((tuple(images.shape), float(images.double().sum()), float(images.double().square().sum()))).encode())
    h.update(repr((sorted(settings.to_json().items()), seed)).encode())
    h.update(repr(sorted((k, v.scale, v.zero_point) for k, v in plan.qparams.items())).encode())
    for n in plan.graph.nodes:  # the weights it started from
        if n.module is not None and hasattr(n.module, "weight"):
            h.update(n.module.weight.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _qp_state(qp: QParams | None):
    return None if qp is None else {"scale": list(qp.scale), "zero_point": list(qp.zero_point),
                                    "dtype": qp.dtype.value, "axis": qp.axis}


def _qp_load(d) -> QParams | None:
    return None if d is None else QParams(tuple(d["scale"]), tuple(d["zero_point"]), DType(d["dtype"]), d["axis"])


def _save(path: Path | None, fingerprint: str, done: int, weights: dict, floats: dict, plan: QuantPlan,
          records: list) -> None:
    if path is None:
        return
    atomic_torch_save({"version": CHECKPOINT_VERSION, "fingerprint": fingerprint, "done": done,
                       "weights": {k: v.detach().cpu().clone() for k, v in weights.items()},
                       "float_params": {k: v.detach().cpu().clone() for k, v in floats.items()},
                       "qparams": {k: _qp_state(v) for k, v in plan.qparams.items()},
                       "output_qparams": _qp_state(plan.output_qparams),
                       "consts": dict(plan.consts), "units": records}, path)


def _resume(path: Path | None, fingerprint: str, plan: QuantPlan, modules: dict, floats: dict,
            notes: list[str]) -> tuple:
    """(units done, learnt weights, learnt float parameters, unit records) from a matching
    checkpoint, applied to the plan, the modules and ``floats`` (name -> parameter)."""
    if path is None or not Path(path).is_file():
        return 0, {}, {}, []
    state = torch.load(path, weights_only=True)
    if state.get("version") != CHECKPOINT_VERSION or state.get("fingerprint") != fingerprint:
        notes.append(f"reconstruction checkpoint {path} is from another run (model, images, recipe or seed "
                     f"differ); starting over")
        warnings.warn(notes[-1], stacklevel=3)
        return 0, {}, {}, []
    with torch.no_grad():
        for k, w in state["weights"].items():
            modules[k].weight.copy_(w)
        for k, v in state["float_params"].items():
            floats[k].copy_(v)
    plan.qparams = {k: _qp_load(v) for k, v in state["qparams"].items()}
    plan.output_qparams = _qp_load(state["output_qparams"])
    plan.consts.clear()
    plan.consts.update(state["consts"])
    return state["done"], dict(state["weights"]), dict(state["float_params"]), list(state["units"])


def _unit_error(unit: Unit, x_q: torch.Tensor, y_fp: torch.Tensor, ops, device) -> dict:
    """Mean squared error and SQNR (dB) of the unit's fake-quant output against its FP32 target."""
    y = _forward(unit, x_q, ops, device)
    return {"mse": float((y.double() - y_fp.double()).square().mean()), "sqnr_db": round(sqnr_db(y_fp, y), 3)}


def _float_classifier(plan: QuantPlan, node) -> bool:
    """A linear node run in float (no int8 input and output): its weights are not quantized."""
    return node.op == "linear" and not (plan.quantized(node.outputs[0]) and plan.quantized(node.inputs[0]))


def _rounders(plan: QuantPlan, nodes: list[str], bits: dict[str, int], learn: bool, device,
              skip: tuple = ()) -> dict[str, Rounding]:
    """The `Rounding` of each conv/linear of ``nodes`` (not those whose weight is in ``skip``: learnt in float)."""
    per_channel = plan.recipe.weight_granularity == "per_channel"
    nodes_by_name = {n.name: n for n in plan.graph.nodes}
    out = {}
    for name in nodes:
        n = nodes_by_name[name]
        if _float_classifier(plan, n):
            continue  # nothing to round
        if any(n.module.weight is p for p in skip):
            continue
        qmax = INT4_QMAX if bits.get(name) == 4 else weight_qmax(plan)
        out[name] = Rounding(n.module.weight, qmax, per_channel, learn).to(device)
    return out


def _beta(s: ReconSettings, it: int) -> float | None:
    """The regulariser's exponent at step ``it`` (None during the warm-up: no regulariser)."""
    warm = int(s.warmup * s.iterations)
    if it < warm:
        return None
    t = (it - warm) / max(s.iterations - warm, 1)
    return s.beta_end + (s.beta_start - s.beta_end) * max(0.0, 1.0 - t)


def _train_unit(unit: Unit, plan: QuantPlan, x_q, y_fp, rounders, groups: list[str], floats: dict[str, nn.Parameter],
                lrs: dict[str, float], s: ReconSettings, gen: torch.Generator, device, advance,
                cosine: bool = False) -> torch.Tensor | None:
    """``s.iterations`` Adam steps on the unit's rounding, step sizes and float parameters
    (``floats``, each at its learning rate in ``lrs``), the rates decaying to 0 on a cosine with
    ``cosine``; returns the log step sizes.

    Every fifth of the steps the hard-rounded state is scored on (up to) `SCORE_IMAGES` calibration
    images without QDrop; the best state seen (the starting one included) is the result: the
    step-size gradients are noisy (STE), and late steps can undo earlier gains."""
    log_scales = torch.tensor([math.log(plan.qparams[g].scale[0]) for g in groups], dtype=torch.float32,
                              device=device, requires_grad=True) if groups else None
    index = {g: i for i, g in enumerate(groups)}
    vs = [r.v for r in rounders.values() if r.v is not None]
    params = [p for p in ({"params": vs, "lr": s.lr_rounding},
                          {"params": [log_scales] if groups else [], "lr": s.lr_scales}) if p["params"]]
    for n, p in floats.items():
        p.requires_grad_(True)
        params.append({"params": [p], "lr": lrs[n]})
    if not params:
        return log_scales
    ops = ReconOps(plan, rounders, log_scales, index, s.drop_prob, gen, soft=True)
    score_ops = ReconOps(plan, rounders, log_scales, index, soft=False)
    opt = torch.optim.Adam(params)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, s.iterations) if cosine else None
    tensors = [p for group in params for p in group["params"]]
    best = (_unit_error(unit, x_q[:SCORE_IMAGES], y_fp[:SCORE_IMAGES], score_ops, device)["mse"],
            [t.detach().clone() for t in tensors])
    every = max(s.iterations // 5, 1)
    # the error relative to the target's mean square: the same objective at any activation scale
    norm = 1.0 / max(float(y_fp.double().square().mean()), 1e-30)
    for it in range(s.iterations):
        idx = torch.randint(0, x_q.shape[0], (s.batch_size,), generator=gen)
        out = unit.run(x_q[idx].to(device), ops)
        rec = (out - y_fp[idx].to(device)).square().sum(1).mean() * norm
        beta = _beta(s, it)
        reg = sum(r.regulariser(beta) for r in rounders.values()) * s.round_weight if beta else 0.0
        loss = rec + reg
        if not torch.isfinite(loss):
            raise CareQError(f"reconstruction of {unit.name}: the loss is {float(loss.detach())} at step {it + 1}; "
                             f"lower reconstruction.lr_rounding / lr_scales")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if decay is not None:
            decay.step()
        advance(1, unit=unit.name, loss=float(rec.detach()))
        if (it + 1) % every == 0 or it + 1 == s.iterations:
            score = _unit_error(unit, x_q[:SCORE_IMAGES], y_fp[:SCORE_IMAGES], score_ops, device)["mse"]
            if score < best[0]:
                best = (score, [t.detach().clone() for t in tensors])
    with torch.no_grad():
        for t, b in zip(tensors, best[1]):
            t.copy_(b)
    return log_scales


@torch.no_grad()
def _write_back(plan: QuantPlan, modules: dict, rounders: dict[str, Rounding], learnt: bool, groups: list[str],
                log_scales) -> None:
    """The hard rounding (``learnt``, else nearest) into the modules' weights, the learnt step sizes
    of ``groups`` (tie-dithered) into the plan."""
    for name, r in rounders.items():
        modules[name].weight.copy_(r.final_weight(learnt).to(modules[name].weight.device))
    for i, g in enumerate(groups):
        old = plan.qparams[g]
        plan.qparams[g] = QParams((float(torch.exp(log_scales[i]).double()) * tie_dither(g),), old.zero_point,
                                  old.dtype, old.axis)
    refresh_divisor_guards(plan)


def _snapshot(plan: QuantPlan, modules: dict, names) -> tuple:
    return ({n: modules[n].weight.detach().clone() for n in names}, dict(plan.qparams), dict(plan.consts))


@torch.no_grad()
def _restore(plan: QuantPlan, modules: dict, snap: tuple) -> None:
    weights, qparams, consts = snap
    for n, w in weights.items():
        modules[n].weight.copy_(w)
    plan.qparams = dict(qparams)
    plan.consts.clear()
    plan.consts.update(consts)


def _keep_best(unit: Unit, plan: QuantPlan, modules: dict, rounders, groups, log_scales, x_q, y_fp, before: dict,
               device, floats: dict[str, nn.Parameter], start: dict[str, torch.Tensor]) -> tuple[dict, str]:
    """Write back the candidate with the lowest error on the first `SCORE_IMAGES` calibration images: the learnt rounding
    and step sizes, the learnt rounding alone, the step sizes alone (each with the learnt float parameters
    ``floats``, if any, or those alone), or (never worse than calibration) none of them: the float
    parameters back at ``start``. Returns (its error, which)."""
    snap = _snapshot(plan, modules, rounders)
    learnt = any(r.v is not None for r in rounders.values())
    cands = [(name, ls, gs) for name, ls, gs in (("rounding and step sizes", learnt, groups),
                                                 ("rounding", True, []), ("step sizes", False, groups))
             if (ls or gs) and (not ls or learnt)]
    if floats:
        cands = [(f"{name} and float parameters", ls, gs) for name, ls, gs in cands] + [("float parameters", False, [])]
    best = (before, "calibrated", False, [])
    for which, ls, gs in cands:
        _write_back(plan, modules, rounders, ls, gs, log_scales)
        err = _unit_error(unit, x_q[:SCORE_IMAGES], y_fp[:SCORE_IMAGES], QuantOps(plan, "quant"), device)
        if err["mse"] < best[0]["mse"]:
            best = (err, which, ls, gs)
        _restore(plan, modules, snap)
    _write_back(plan, modules, rounders, best[2], best[3], log_scales)  # calibrated: nearest (int4: on its grid)
    if best[1] == "calibrated":
        with torch.no_grad():
            for n, p in floats.items():
                p.copy_(start[n])
    return best[0], best[1]


SUBSTITUTION_LR_FLOOR = 1e-3  # the substitutions' parameters are O(1) (kernel a, b; output scales ~ norms)


def _float_params(plan: QuantPlan, subst: dict[str, nn.Parameter], nodes: list[str], modules: dict,
                  biases: bool) -> tuple[dict[str, nn.Parameter], dict[str, float]]:
    """A unit's parameters learnt in float: its substitutions' (``subst``) and, with ``biases``, the
    biases of its conv / linear ``nodes`` (by node name + ".bias"; each parameter once); and per
    parameter the least magnitude its learning rate is relative to: a bias's is its output's int8 step
    (a bias of zero still moves, and a layer-scaled conv's tiny bias moves on its own scale)."""
    out, floors = dict(subst), dict.fromkeys(subst, SUBSTITUTION_LR_FLOOR)
    if biases:
        seen = {id(p) for p in out.values()}
        for n in nodes:
            b = modules[n].bias
            if b is not None and id(b) not in seen:
                out[f"{n}.bias"] = b
                qp = plan.qp(n) if n in plan.specs else None  # a conv's output tensor has its name
                floors[f"{n}.bias"] = float(qp.scale[0]) if qp is not None else float(b.detach().abs().mean())
    return out, floors


def _targets(dmodel, reference, device) -> tuple[list[Unit], dict[str, float]]:
    """The units whose outputs are the targets (of a copy of ``reference``, else of ``dmodel``, on
    ``device``) and the gains to apply to them."""
    if reference is None:
        return units_of(copy.deepcopy(dmodel).to(device)), {}
    ref_units = units_of(copy.deepcopy(reference).to(device))
    if [u.name for u in ref_units] != [u.name for u in units_of(dmodel)]:
        raise CareQError("reconstruction: the reference model's units differ from the quantized model's")
    return ref_units, unit_output_gains(dmodel)


def reconstruct(plan: QuantPlan, dmodel, images: torch.Tensor, settings: ReconSettings, *,
                reference: nn.Module | None = None, checkpoint: str | Path | None = None, device: str = "auto",
                seed: int = 0, progress: bool | None = None) -> dict:
    """Reconstruct ``plan`` and ``dmodel``'s weights in place on ``images`` (see the module docstring).
    ``reference``: the model whose unit outputs are the targets (default: ``dmodel`` as it is).

    Returns {"units": [per unit: name, error before and after, seconds], "images", "iterations",
    "target" (original | deploy form), "float_params" (how many substitution parameters and biases were
    learnt), "seconds", "device", "resumed_units", "notes"}."""
    t0 = time.time()
    dev = resolve_device(device)
    images = images[:settings.images] if settings.images else images
    if images.shape[0] < settings.batch_size:
        raise CareQError(f"reconstruction needs at least one batch ({settings.batch_size}) of calibration images, "
                         f"got {images.shape[0]}")
    units = units_of(dmodel)
    fp_units, gains = _targets(dmodel, reference, dev)
    layout = _layout(plan, units, images[:1])
    owner = _owners(plan, layout)
    bits = weight_bits_of(plan)
    modules = {n.name: n.module for n in plan.graph.nodes if n.op in ("conv", "linear")}
    fingerprint = _fingerprint(plan, units, images, settings, seed)
    subst = [substitution_params(u.module) if "substitution" in settings.learn and u.module is not None else {}
             for u in units]
    floats, floors = zip(*(_float_params(plan, sp, nodes, modules, "biases" in settings.learn)
                           for sp, (_, nodes) in zip(subst, layout)))
    named = {f"{u.name}.{k}": p for u, ps in zip(units, floats) for k, p in ps.items()}
    net_floats, net_lrs = _network_floats(plan, modules, bits, subst, settings)
    net_groups = _network_groups(plan, settings)
    named.update({f"{NETWORK}.{n}": p for n, p in net_floats.items()})
    notes: list[str] = []
    done, learnt, learnt_floats, records = _resume(checkpoint, fingerprint, plan, modules, named, notes)
    dmodel.to(dev)
    x_q, x_fp = images, images
    total = max(len(units) - done, 0) * settings.iterations + (settings.network_iterations if done <= len(units) else 0)
    with progress_bar(f"reconstructing {len(units)} units", total, progress) as advance:
        for k, (u, fu) in enumerate(zip(units, fp_units)):
            y_ref = _forward(fu, x_fp, FloatOps(), dev)
            y_fp = y_ref * gains[u.name] if u.name in gains else y_ref
            if k >= done:
                t_unit = time.time()
                before = _unit_error(u, x_q[:SCORE_IMAGES], y_fp[:SCORE_IMAGES],
                                     _nearest_ops(plan, layout[k][1], bits, dev), dev)
                rounders = _rounders(plan, layout[k][1], bits, "rounding" in settings.learn, dev,
                                     tuple(subst[k].values()))
                groups = sorted(g for g, o in owner.items() if o == k) if "act_scales" in settings.learn else []
                gen = torch.Generator().manual_seed(seed * 100003 + k)
                groups = _learnable(plan, groups)
                start = {n: p.detach().clone() for n, p in floats[k].items()}
                lrs = {n: settings.lr_float * max(float(p.detach().abs().mean()), floors[k][n])
                       for n, p in floats[k].items()}
                log_scales = _train_unit(u, plan, x_q, y_fp, rounders, groups, floats[k], lrs, settings, gen, dev,
                                         advance)
                after, kept = _keep_best(u, plan, modules, rounders, groups, log_scales, x_q, y_fp, before, dev,
                                         floats[k], start)
                for n, p in floats[k].items():
                    p.requires_grad_(False)
                    learnt_floats[f"{u.name}.{n}"] = p
                learnt.update({n: modules[n].weight for n in rounders})
                records.append({"name": u.name, "before": before, "after": after, "kept": kept,
                                "seconds": round(time.time() - t_unit, 1)})
                _save(checkpoint, fingerprint, k + 1, learnt, learnt_floats, plan, records)
            if k + 1 < len(units):
                x_q = _forward(u, x_q, QuantOps(plan, "quant"), dev)
            x_fp = y_ref
        if settings.network_iterations and done <= len(units):  # y_fp: the FP32 logits
            t_net = time.time()
            before, after, kept = _network_stage(units, plan, modules, net_groups, net_floats, net_lrs, images, y_fp,
                                                 settings, seed, dev, advance)
            records.append({"name": NETWORK, "before": before, "after": after, "kept": kept,
                            "seconds": round(time.time() - t_net, 1)})
            learnt_floats.update({f"{NETWORK}.{n}": p for n, p in net_floats.items()})  # its weights too
            _save(checkpoint, fingerprint, len(units) + 1, learnt, learnt_floats, plan, records)
    dmodel.cpu()
    network = next((r for r in records if r["name"] == NETWORK), None)
    if network is not None:
        network = dict(network, iterations=settings.network_iterations,
                       learnt={"step_sizes": len(net_groups), "biases": sum(n.endswith(".bias") for n in net_floats),
                               "weights": sum(n.endswith(".weight") for n in net_floats)})
    records = [r for r in records if r["name"] != NETWORK]
    return {"units": records, "network": network, "images": int(images.shape[0]), "iterations": settings.iterations,
            "target": "original" if reference is not None else "deploy form",
            "float_params": {"substitution": sum(f"{u.name}.{n}" in learnt_floats for u, sp in zip(units, subst)
                                                 for n in sp),
                             "biases": sum(f"{u.name}.{n}" in learnt_floats for u, fp, sp in zip(units, floats, subst)
                                           for n in fp if n not in sp)},
            "seconds": round(time.time() - t0, 1), "device": dev.type, "resumed_units": min(done, len(units)),
            "notes": notes}


NETWORK = "network"  # the whole model as one last unit: its logits against the FP32 logits


def _network_groups(plan: QuantPlan, settings: ReconSettings) -> list[str]:
    """The activation groups the network stage learns the step sizes of (all learnable ones)."""
    if not settings.network_iterations or not settings.network_lr_scales:
        return []
    return _learnable(plan, sorted({spec.group for spec in plan.specs.values()}))


def _network_floats(plan: QuantPlan, modules: dict, bits: dict[str, int], subst: list[dict],
                    settings: ReconSettings) -> tuple[dict[str, nn.Parameter], dict[str, float]]:
    """The float parameters the network stage learns, by node name + ".bias" / ".weight", and their
    learning rates: every conv / linear bias (``network_lr_biases`` times its mean magnitude, at
    least times its output's int8 step) and every int8 weight (``network_lr_weights`` times its mean
    per-channel step: STE through the exporters' nearest rounding on the per-channel max grid; not
    int4 weights, whose clipped grid the write-back fixed, nor the substitutions' parameters)."""
    out, lrs = {}, {}
    if not settings.network_iterations:
        return out, lrs
    skip = {id(p) for sp in subst for p in sp.values()}
    nodes = {n.name: n for n in plan.graph.nodes}
    for name, m in modules.items():
        n = nodes[name]
        if _float_classifier(plan, n):
            continue  # it stays as trained
        if settings.network_lr_biases and m.bias is not None and id(m.bias) not in skip:
            qp = plan.qp(name) if name in plan.specs else None
            floor = float(qp.scale[0]) if qp is not None else 0.0
            out[f"{name}.bias"] = m.bias
            lrs[f"{name}.bias"] = settings.network_lr_biases * max(float(m.bias.detach().abs().mean()), floor)
        if settings.network_lr_weights and bits.get(name) != 4 and id(m.weight) not in skip:
            w = m.weight.detach()
            out[f"{name}.weight"] = m.weight
            lrs[f"{name}.weight"] = settings.network_lr_weights * float(w.abs().reshape(w.shape[0], -1).amax(1).mean()
                                                                        / weight_qmax(plan))
    return out, lrs


def _network_stage(units: list[Unit], plan: QuantPlan, modules: dict, groups: list[str], floats: dict[str, nn.Parameter],
                   lrs: dict[str, float], images: torch.Tensor, logits: torch.Tensor, settings: ReconSettings,
                   seed: int, device, advance) -> tuple[dict, dict, str]:
    """After the units: ``network_iterations`` Adam steps on the whole model's logits against the FP32
    ``logits`` (no QDrop; the rates decay on a cosine), learning the step sizes of ``groups``
    (`_network_groups`) and, in float, the biases and weights ``floats`` (`_network_floats`). Kept only
    when the logit error on the calibration images falls. Returns (error before, error after, what was kept)."""
    def run(x, ops):
        for u in units:
            x = u.run(x, ops)
        return x

    whole = Unit(NETWORK, run)
    before = _unit_error(whole, images[:SCORE_IMAGES], logits[:SCORE_IMAGES], QuantOps(plan, "quant"), device)
    snap = _snapshot(plan, modules, ())
    start = {n: p.detach().clone() for n, p in floats.items()}
    s = dataclasses.replace(settings, iterations=settings.network_iterations, lr_scales=settings.network_lr_scales,
                            drop_prob=0.0)
    gen = torch.Generator().manual_seed(seed * 100003 + len(units))
    log_scales = _train_unit(whole, plan, images, logits, {}, groups, floats, lrs, s, gen, device, advance,
                             cosine=True)
    for p in floats.values():
        p.requires_grad_(False)
    _write_back(plan, modules, {}, False, groups, log_scales)
    after = _unit_error(whole, images[:SCORE_IMAGES], logits[:SCORE_IMAGES], QuantOps(plan, "quant"), device)
    if after["mse"] < before["mse"]:
        return before, after, "+".join(k for k, v in (("step sizes", groups), ("biases", settings.network_lr_biases),
                                                      ("weights", settings.network_lr_weights)) if v)
    _restore(plan, modules, snap)
    with torch.no_grad():
        for n, p in floats.items():
            p.copy_(start[n])
    return before, before, "units' result"


def _nearest_ops(plan: QuantPlan, nodes: list[str], bits: dict[str, int], device) -> QuantOps:
    """The reference before reconstruction: nearest rounding (int4 where the recipe says)."""
    return ReconOps(plan, _rounders(plan, nodes, bits, False, device), soft=False)
