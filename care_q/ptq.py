"""Post-training quantization: `care_q.ptq(...)`, the API behind `care-q ptq`.

`care_q.pipeline.prepare` (deploy form, substitutions, transforms, plan, calibration, bias
correction) -> int8 artifacts (TFLite, ONNX QDQ) by `care_q.pipeline.artifacts`, each verified in
its runtime against its exact fake-quant reference and against FP32 -> report.json + report.md.
"""

from __future__ import annotations

import platform
import sys
import time
import types
import warnings
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from care_q.errors import CareQError
from care_q.export.fp32_baselines import fp32_baselines
from care_q.export.tflite_profile import load_profile
from care_q.graph.roles import Role
from care_q.pipeline import MIN_AGREEMENT, ExportConfig, PrepareConfig, Prepared, held_out_images, prepare
from care_q.pipeline.artifacts import agreement_failure, export_artifacts, resolve_targets
from care_q.pipeline.fidelity import fp32_logits, recipe_vs_minmax
from care_q.pipeline.kernels import choose_kernels
from care_q.quant.recipe import load_recipe
from care_q.runtime import load_runner
from care_q.utils.io import atomic_write_json, atomic_write_text
from care_q.utils.progress import stage
from care_q.utils.timing import MIN_BLOCKS, block_sizes, measure_isolated

ATTENTION_ROLES = (Role.ATTN_QK, Role.ATTN_ELU, Role.ATTN_PHI, Role.ATTN_KV, Role.ATTN_KMEAN,
                   Role.ATTN_DEN, Role.ATTN_NUM, Role.ATTN_OUT)
KERNEL_PROFILE = "kernel_profile.json"  # a measured kernel profile, for --kernel-profile to reproduce the file
FAKE_QUANT_IMAGES = 8  # images of the per-tensor SQNR comparison (recipe vs one global min/max)


@dataclass(frozen=True)
class PTQConfig:
    """A `care-q ptq` run: what to prepare, which artifacts to write and how to check them."""

    prepare: PrepareConfig
    targets: tuple[str, ...] | None = None  # default: the recipe's
    io: str | None = None                   # default: the recipe's
    out: Path = Path("out")
    num_verify: int = 128
    threads: int = 2
    latency_runs: int = 0
    min_agreement: float = MIN_AGREEMENT
    kernel_profile: Path | None = None      # recipe tflite.kernels: measured: a profile from the target device


def ptq(model: str, *, weights: str | Path | None = None, calib: str = "imagenet_1k_subset",
        data_root: str | Path | None = None, num_calib: int | None = None, recipe: str | Path = "ptq_int8_cpu",
        targets: list[str] | None = None, img_size: int | None = None, io: str | None = None,
        out: str | Path = "out", num_verify: int = 128, threads: int = 2, latency_runs: int = 0,
        fallback_synthetic: bool = False, progress: bool | None = None, seed: int = 0,
        min_agreement: float = MIN_AGREEMENT, device: str = "auto", recon_steps: int | None = None,
        kernel_profile: str | Path | None = None) -> dict:
    """Quantize a CARE model to int8 artifacts and write a report. Returns the report dict.

    The keyword form of `run_ptq(PTQConfig(...))`. Raises CareQError before any work for an
    unknown model/set/recipe or a target the recipe cannot honour; after export, when an artifact
    agrees with the fake-quant reference on fewer than ``min_agreement`` of the verification images.
    A recipe with a ``reconstruction`` section reconstructs on ``device`` (auto: CUDA when present)
    and checkpoints what it learnt in ``<out>/reconstruction.pt`` (a killed run resumes there);
    ``recon_steps`` replaces its steps per unit. A recipe with ``tflite.kernels: measured`` picks each
    elementwise op's TFLite form (int8 or float island) by one-op timings on this machine, or from
    ``kernel_profile`` (`care-q bench --kernel-profile`, e.g. measured on a phone).
    """
    prep = PrepareConfig(model, weights=weights, recipe=recipe, calib=calib, num_calib=num_calib, img_size=img_size,
                         data_root=data_root, seed=seed, fallback_synthetic=fallback_synthetic, progress=progress,
                         device=device, recon_steps=recon_steps)
    return run_ptq(PTQConfig(prep, targets=tuple(targets) if targets else None, io=io, out=Path(out),
                             num_verify=num_verify, threads=threads, latency_runs=latency_runs,
                             min_agreement=min_agreement,
                             kernel_profile=Path(kernel_profile) if kernel_profile is not None else None))


def run_ptq(cfg: PTQConfig) -> dict:
    """`ptq` with a typed configuration (see `ptq`)."""
    t_start = time.time()
    rec = load_recipe(cfg.prepare.recipe)
    targets, io = resolve_targets(rec, cfg.targets, cfg.io)
    measured = rec.tflite_kernels == "measured" and "tflite" in targets
    if cfg.kernel_profile is not None:
        if rec.tflite_kernels != "measured":
            raise CareQError(f"--kernel-profile: recipe '{rec.name}' writes every op int8 (tflite.kernels: "
                             f"{rec.tflite_kernels}); a kernel profile applies to recipes with tflite.kernels: "
                             f"measured (ptq_int8_cpu)")
        load_profile(cfg.kernel_profile)  # a bad file fails before any work
    prep_cfg = cfg.prepare
    if rec.reconstruction is not None and prep_cfg.checkpoint is None:
        prep_cfg = replace(prep_cfg, checkpoint=Path(cfg.out) / "reconstruction.pt")
    prep = prepare(prep_cfg)
    model, progress = cfg.prepare.model, cfg.prepare.progress
    xv = held_out_images(prep, cfg.num_verify)
    kernels = None
    if measured:
        what = f"from {cfg.kernel_profile}" if cfg.kernel_profile else "timing one-op models on this machine"
        with stage(f"tflite: choosing int8 or float per elementwise op ({what})", progress):
            kernels = choose_kernels(prep.plan, io, threads=cfg.threads, profile=cfg.kernel_profile,
                                     save_to=Path(cfg.out) / KERNEL_PROFILE)
    compared = recipe_vs_minmax(prep.dmodel, prep.plan, xv[:FAKE_QUANT_IMAGES])
    export = ExportConfig(targets, io, Path(cfg.out), f"{model}_int8", cfg.num_verify, cfg.threads,
                          cfg.min_agreement, progress)
    artifacts = export_artifacts(prep.plan, prep.dmodel, export, xv, preprocess=prep.preprocess, model_name=model,
                                 fp32_logits=fp32_logits(prep.net, xv))
    notes = list(prep.notes)
    for t, a in artifacts.items():
        if "note" in a["verification"]:
            notes.append(f"{t}: {a['verification']['note']}")
            warnings.warn(notes[-1], stacklevel=2)
    report = _report(cfg, prep, io, targets, xv, artifacts, compared, notes)
    report["tflite_kernels"] = kernels
    if cfg.latency_runs:
        t0 = time.time()
        report["latency"] = _latency(prep.net, export.out, model, prep.img_size, artifacts, cfg.threads,
                                     cfg.latency_runs, progress)
        report["latency_seconds"] = round(time.time() - t0, 1)
    report["seconds"] = round(time.time() - t_start, 1)
    atomic_write_json(report, export.out / "report.json")
    atomic_write_text(render_markdown(report, prep.plan), export.out / "report.md")
    failure = agreement_failure(artifacts, cfg.min_agreement, export.out / "report.md")
    if failure:
        raise CareQError(failure)
    return report


def _report(cfg: PTQConfig, prep: Prepared, io: str, targets, xv, artifacts: dict, compared: dict,
            notes: list[str]) -> dict:
    return {
        "command": "ptq", "model": prep.model, "weights": prep.weights,
        "img_size": prep.img_size, "recipe": prep.recipe.to_json(), "io": io, "targets": list(targets),
        "calibration": {"set": prep.calib, "images": prep.calib_images, "seconds": prep.calib_seconds},
        "cross_layer_equalization": prep.equalization, "bias_correction": prep.bias_correction,
        "reconstruction": prep.reconstruction, "deploy_form_vs_fp32": prep.deploy_vs_fp32,
        "verification_images": int(xv.shape[0]),
        "artifacts": artifacts, "fp32_param_bytes": sum(p.numel() * 4 for p in prep.net.parameters()),
        "logit_sqnr_db_fake_quant": {k: compared["logit_sqnr_db"][k] for k in ("recipe", "minmax", "float_weights")},
        "tensors": prep.plan.to_json(),
        "sqnr_db": compared["sqnr_db"],
        "graph_census": prep.graph.census(),
        "notes": notes, "machine": {"platform": platform.platform(), "python": platform.python_version(),
                                    "torch": torch.__version__},
        "min_agreement": cfg.min_agreement,
        "seconds": None,
    }


def _latency(net, out: Path, name: str, size: int, artifacts: dict, threads: int, runs: int,
             progress: bool | None = None) -> dict:
    """int8 vs FP32 latency per runtime (FP32 files next to the int8 ones; see fp32_baselines), each
    pair in processes of its own, ``runs`` rounds in blocks (`care_q.utils.timing.measure_isolated`):
    ``ratio`` is the median of the blocks' int8 / FP32 median ratios, ``ratio_spread`` their range."""
    with stage(f"FP32 {' + '.join(artifacts)} for the latency comparison", progress):
        fp32 = fp32_baselines(net, out, name, size, list(artifacts))
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    per_block = block_sizes(runs, MIN_BLOCKS)
    jobs = {t: ({"fp32": partial(load_runner, fp32[t], threads=threads),
                 "int8": partial(load_runner, a["path"], threads=threads)}, "fp32") for t, a in artifacts.items()}
    with stage(f"{' + '.join(artifacts)}: timing int8 vs FP32, {MIN_BLOCKS} blocks of {per_block} rounds, "
               f"a process each", progress):
        measured = measure_isolated(jobs, x, blocks=MIN_BLOCKS, runs=per_block)
    res = {}
    for t, a in artifacts.items():
        m, fp = measured[t], fp32[t]
        if m["error"] or m["load_failures"]:
            raise CareQError(f"{t} latency: {m['error'] or '; '.join(f'{k}: {v}' for k, v in m['load_failures'].items())}")
        r = m["results"]
        res[t] = {"fp32": r["fp32"], "int8": r["int8"], "ratio": r["int8"]["ratio"],
                  "ratio_spread": r["int8"]["ratio_spread"], "block_ratios": r["int8"]["block_ratios"],
                  "fp32_size_bytes": fp.stat().st_size, "size_ratio": Path(a["path"]).stat().st_size / fp.stat().st_size}
    return res


def stage_seconds(r: dict) -> dict[str, float]:
    """A ptq report's time by stage (the report's and the benchmark's split)."""
    st = {"calibration": r["calibration"]["seconds"]}
    if r.get("bias_correction"):
        st["bias correction"] = r["bias_correction"]["seconds"]
    if r.get("reconstruction"):
        st["reconstruction"] = r["reconstruction"]["seconds"]
    st.update({f"{t} export + verification": a["seconds"] for t, a in r["artifacts"].items() if "seconds" in a})
    if "latency_seconds" in r:
        st["latency (FP32 exports unless reused, then the runs)"] = r["latency_seconds"]
    return st


def _time_split(r: dict) -> str:
    return ", ".join(f"{k} {v} s" for k, v in stage_seconds(r).items())


def _transform_lines(r: dict) -> list[str]:
    lines = []
    eq, bc = r.get("cross_layer_equalization"), r.get("bias_correction")
    if eq:
        lines.append(f"- cross-layer equalization: {eq['pairs']} depthwise -> pointwise pairs; spread (max/min) "
                     f"of the depthwise per-channel weight ranges {eq['range_spread_before']:.1f} -> "
                     f"{eq['range_spread_after']:.1f} (mean over pairs)")
    if bc:
        lines.append(f"- bias correction: {bc['layers']} layers on {bc['images']} calibration images, {bc['seconds']} s; "
            f"output-mean error (RMS over channels / RMS of the FP32 output, mean over layers) "
            f"{100 * bc['error_before']:.2f}% -> {100 * bc['error_after']:.2f}%")
    return lines


def render_markdown(r: dict, plan) -> str:
    L = [f"# care-q PTQ report: {r['model']} ({r['img_size']}x{r['img_size']})", ""]
    L += [f"- recipe: `{r['recipe']['name']}` ({r['recipe']['source']}), io: {r['io']}",
          f"- calibration: `{r['calibration']['set']}`, {r['calibration']['images']} images, "
          f"{r['calibration']['seconds']} s",
          *_transform_lines(r),
          f"- weights: {r['weights'] or 'random (accuracy meaningless)'}",
          f"- total time: {r['seconds']} s ({_time_split(r)})", ""]
    for n in r["notes"]:
        L.append(f"> note: {n}")
    L += ["", "## Artifacts, verified in their runtimes against the PyTorch fake-quant reference", "",
          "| target | file | size (MB) | top-1 agreement | logit SQNR (dB) | max abs diff | vs FP32: agreement, SQNR |",
          "|---|---|---:|---:|---:|---:|---:|"]
    for t, a in r["artifacts"].items():
        v = a["verification"]
        f = v.get("vs_fp32")
        L.append(f"| {t} | `{Path(a['path']).name}` | {a['size_bytes'] / 1e6:.2f} | "
                 f"{100 * v['top1_agreement']:.1f}% ({v['images']} images) | {v['logit_sqnr_db']:.1f} | "
                 f"{v['max_abs_diff']:.3g} | "
                 + (f"{100 * f['top1_agreement']:.1f}%, {f['logit_sqnr_db']:.1f} dB |" if f else "|"))
    L += _reconstruction_lines(r.get("reconstruction"))
    L += _kernel_lines(r.get("tflite_kernels"))
    L += ["", "## Where the ops run (care-q check)", ""]
    for t, a in r["artifacts"].items():
        L += [f"- {t}: " + line for line in a.get("census", [])]
    if "latency" in r:
        L += ["", "## Latency (batch 1, this machine)", "",
              "Each int8 file against its runtime's FP32 file in processes that load only those two, in blocks; "
              "ratio: the median of the blocks' ratios, with their lowest and highest.", "",
              "| runtime | FP32 median (ms) | INT8 median (ms) | ratio | ratio per block (min-max) | size ratio |",
              "|---|---:|---:|---:|---:|---:|"]
        for t, m in r["latency"].items():
            lo, hi = m["ratio_spread"]
            L.append(f"| {t} | {m['fp32']['median_ms']:.2f} | {m['int8']['median_ms']:.2f} | "
                     f"{m['ratio']:.2f}x | {lo:.2f}-{hi:.2f} | {m['size_ratio']:.2f}x |")
    ls = r["logit_sqnr_db_fake_quant"]
    L += ["", "## Linear attention: per-tensor SQNR (dB), this recipe vs one global min/max", "",
          f"Logits (fake-quant vs FP32): recipe {ls['recipe']:.1f} dB, min/max everywhere {ls['minmax']:.1f} dB; "
          f"the recipe's int8 activations on float weights {ls['float_weights']:.1f} dB (what the activations' grid "
          f"costs alone; rounding learnt against the output can go a little past it)."
          + ("" if not r.get("deploy_form_vs_fp32") else
             f" The deploy form in float (the recipe's substitutions, before calibration) against the original FP32 "
             f"model: {r['deploy_form_vs_fp32']['logit_sqnr_db']:.1f} dB, top-1 agreement "
             f"{100 * r['deploy_form_vs_fp32']['top1_agreement']:.1f}% (first calibration batch, "
             f"{r['deploy_form_vs_fp32']['images']} images)."),
          "", "| role | tensors | mean SQNR recipe | mean SQNR min/max |", "|---|---:|---:|---:|"]
    by_role: dict[str, list] = {}
    for k, v in r["sqnr_db"].items():
        by_role.setdefault(plan.specs[k].role.value, []).append(v)
    for role, vals in sorted(by_role.items()):
        rec = np.mean([v["recipe"] for v in vals])
        mm = np.mean([v["minmax"] for v in vals if v["minmax"] is not None])
        L.append(f"| {role} | {len(vals)} | {rec:.1f} | {mm:.1f} |")
    L += ["", "## Attention tensors: ranges and why", "",
          "| tensor | dtype | method | sym | range | why |", "|---|---|---|---|---|---|"]
    first_attn = [k for k, s in plan.specs.items() if s.role in ATTENTION_ROLES][:16]
    for k in first_attn:
        s, qp = plan.specs[k], plan.qp(k)
        rng = f"[{qp.lo:.3g}, {qp.hi:.3g}]" if qp else "float"
        L.append(f"| `{k}` | {s.dtype.value} | {s.method.value} | {s.symmetric} | {rng} | "
                 f"{'; '.join(s.why[1:]) or s.why[0]} |")
    L += ["", f"(all {len(plan.specs)} tensors with their parameters: `report.json` -> `tensors`)", ""]
    return "\n".join(L)


def _kernel_lines(k: dict | None) -> list[str]:
    """Which elementwise ops the .tflite runs int8 and which as float islands, and the one-op times."""
    if not k:
        return []
    ops = sorted(set(k["float_by_op"]) | set(k["int8_by_op"]))
    return ["", f"## TFLite kernels: int8 or float island per elementwise op ({k['source']})", "",
            f"A float island (DEQUANTIZE, the op in float, QUANTIZE) keeps the op's int8 grids; it is chosen where its "
            f"one-op time is at most {k['margin']:.0%} of the int8 op's"
            + (f" in each of {k['blocks']} blocks" if k.get("blocks", 1) > 1 else "") + ". Candidates' one-op time: "
            f"all int8 {k['one_op_ms']['int8']:.2f} ms, as chosen {k['one_op_ms']['chosen']:.2f} ms."
            + (f" {len(k['close'])} ops whose blocks disagreed stay int8 (close to the margin: islands there would "
               f"change the one-op time by {k['close_ms']:.3f} ms)." if k.get("close") else "")
            + f" The same file again: `--kernel-profile {k['profile']}` (timings near the margin vary between runs).",
            "",
            "| op | float islands | int8 |", "|---|---:|---:|",
            *(f"| {o} | {k['float_by_op'].get(o, 0)} | {k['int8_by_op'].get(o, 0)} |" for o in ops)]


def _float_summary(counts: dict) -> str:
    """'12 biases, 9 parameters of the substitutions' from reconstruction's counts of float parameters."""
    parts = [f"{counts['biases']} biases"] if counts.get("biases") else []
    if counts.get("substitution"):
        parts.append(f"{counts['substitution']} parameters of the substitutions (NPU kernel affine, output scales)")
    return ", ".join(parts)


def _reconstruction_lines(rc: dict | None) -> list[str]:
    """The per-unit error of the fake-quant model against FP32 before and after reconstruction."""
    if not rc:
        return []
    L = ["", f"## Reconstruction ({rc['iterations']} steps per unit, {rc['images']} calibration images, "
             f"{rc['seconds']} s on {rc['device']}"
         + (f"; resumed after {rc['resumed_units']} units" if rc["resumed_units"] else "") + ")", "",
         "Each unit's fake-quant output against its FP32 output on (up to 256 of) the calibration images, "
         "its input coming from the reconstructed units before it: SQNR and mean squared error before "
         "(calibrated step sizes, nearest rounding) and after; kept: what was written back (the candidate "
         "with the lowest error, never worse than before)."
         + (" The FP32 outputs are the original model's, before the recipe's substitutions." if
            rc.get("target") == "original" else "")
         + (f" Learnt in float as well: {_float_summary(rc['float_params'])}."
            if any(rc.get("float_params", {}).values()) else ""),
         "",
         "| unit | SQNR before (dB) | SQNR after (dB) | MSE before | MSE after | kept | seconds |",
         "|---|---:|---:|---:|---:|---|---:|"]
    net = rc.get("network")
    for u in rc["units"] + ([net] if net else []):
        b, a = u["before"], u["after"]
        name = u["name"] if u is not net else f"network ({net['iterations']} steps, the logits)"
        L.append(f"| {name} | {b['sqnr_db']:.2f} | {a['sqnr_db']:.2f} | {b['mse']:.3g} | {a['mse']:.3g} | "
                 f"{u['kept']} | {u['seconds']} |")
    if net:
        n = net["learnt"]
        L += ["", f"The network stage learnt {n['step_sizes']} step sizes, {n['biases']} biases and {n['weights']} "
                  f"weight tensors (in float, rounded by the exporters) on the whole model's logits."]
    return L


class _CallableModule(types.ModuleType):
    """Lets `care_q.ptq(...)` call `care_q.ptq.ptq(...)` (the package attribute is this module)."""

    def __call__(self, *args, **kwargs):
        return ptq(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
