"""Post-training quantization: `care_q.ptq(...)`, the API behind `care-q ptq`.

Pipeline: model -> deploy form (-> recipe substitutions) -> traced graph -> per-tensor plan
from the recipe -> calibration -> int8 artifacts (TFLite, ONNX QDQ), each verified in its
runtime against the PyTorch fake-quant reference -> report.json + report.md.
"""

from __future__ import annotations

import dataclasses
import platform
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch

from care_q.data import stage
from care_q.errors import CareQError
from care_q.export.fp32_baselines import fp32_baselines
from care_q.graph.trace import trace
from care_q.models import create_model, load_sidecar
from care_q.quant.bias_correction import bias_correction, images_for
from care_q.quant.calibrate import calibrate
from care_q.quant.fakequant import QuantOps
from care_q.quant.plan import build_plan
from care_q.quant.qtypes import Method, Role, sqnr_db
from care_q.quant.recipe import load_recipe
from care_q.transforms import deploy
from care_q.transforms.equalize import cross_layer_equalization
from care_q.transforms.substitute import apply_substitutions
from care_q.utils.io import atomic_path, atomic_write_json, atomic_write_text
from care_q.utils.layout import channels_last

MIN_AGREEMENT = 0.99
ATTENTION_ROLES = (Role.ATTN_QK, Role.ATTN_ELU, Role.ATTN_PHI, Role.ATTN_KV, Role.ATTN_KMEAN,
                   Role.ATTN_DEN, Role.ATTN_NUM, Role.ATTN_OUT)


def _artifact_names(name: str) -> dict[str, str]:
    return {"tflite": f"{name}_int8.tflite", "onnx": f"{name}_int8_qdq.onnx"}


def _emit(target: str, plan, io: str, path: Path, preprocess=None, model_name: str = "care") -> None:
    if target == "tflite":
        from care_q.export.tflite_int8 import emit_tflite_int8

        data = emit_tflite_int8(plan, io=io, preprocess=preprocess, model_name=model_name)
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    else:
        from care_q.export.onnx_qdq import emit_onnx_qdq, save_onnx

        save_onnx(emit_onnx_qdq(plan, io=io), path)


def _batches(ds, batch_size: int):
    from care_q.data import make_loader

    return make_loader(ds, batch_size=batch_size, shuffle=False, workers=0)


def _first_images(batches, limit: int):
    """The first `limit` images of a loader, as batches."""
    seen = 0
    for b in batches:
        x = b[0] if isinstance(b, (list, tuple)) else b
        if seen >= limit:
            return
        yield x[:limit - seen]
        seen += x.shape[0]


@torch.no_grad()
def tensor_sqnr(model, plan, x: torch.Tensor) -> dict[str, float]:
    """SQNR (dB) of every quantized tensor: fake-quant model vs float model on `x`."""
    f_ops, q_ops = QuantOps(plan, "float", record=True), QuantOps(plan, "quant", record=True)
    model(x, f_ops)
    model(x, q_ops)
    out = {}
    for name, ref in f_ops.record.items():
        if plan.quantized(name) and name in q_ops.record and plan.specs[name].op not in (
                "split", "to_heads", "from_heads"):
            out[name] = sqnr_db(ref, q_ops.record[name])
    return out


VERIFY_CHUNK = 25


X86_MACHINES = ("x86_64", "amd64", "i386", "i686")  # platform.machine() of CPUs running MLAS's AVX2 Add


def _verify(path: Path, model, plan, x: np.ndarray, threads: int) -> dict:
    from care_q.runtime import load_runner

    runner = load_runner(path, threads=threads)
    with torch.no_grad():
        # the integer arithmetic of the artifact's runtime: XNNPACK's / TFLite's int8 kernels for
        # .tflite, onnxruntime's QLinearAdd on the stored codes for .onnx (int8 grids stored as
        # uint8, offset 128, unless the file's act_type says int8)
        ops = (QuantOps(plan, "quant", exact="xnnpack") if Path(path).suffix == ".tflite"
               else QuantOps(plan, "quant", exact="onnxruntime",
                             ort_act_offset=0 if runner.metadata.get("care_q.act_type") == "int8" else 128))
        xt = torch.from_numpy(x)  # in chunks: at 224 whole-batch float64 intermediates thrash the cache
        with channels_last(model):
            ref = np.concatenate([model(xt[i:i + VERIFY_CHUNK], ops).contiguous().numpy()
                                  for i in range(0, len(xt), VERIFY_CHUNK)])
    got = runner(x)
    agree = float((got.argmax(1) == ref.argmax(1)).mean())
    res = {"images": int(x.shape[0]), "top1_agreement": agree, "logit_sqnr_db": sqnr_db(ref, got),
           "max_abs_diff": float(np.abs(got - ref).max())}
    info = getattr(runner, "delegate_info", None)
    if info:
        res["delegate"] = info
    if Path(path).suffix == ".onnx" and platform.machine().lower() not in X86_MACHINES:
        res["note"] = (f"the ONNX reference computes onnxruntime's x86 int8 Add; on {platform.machine()} "
                       f"onnxruntime's own kernel may round rare elements differently")
    return res


def _census(path: Path) -> list[str]:
    """What runs where (XNNPACK / NNAPI / Edge TPU, or ORT integer kernels): summary lines."""
    from care_q.census import check

    try:
        return check(path, targets=("all",), runtime=False).summary_lines()
    except CareQError as e:
        return [f"census failed: {e}"]


def ptq(model: str, *, weights: str | Path | None = None, calib: str = "imagenet_1k_subset",
        data_root: str | Path | None = None, num_calib: int | None = None, recipe: str | Path = "ptq_int8",
        targets: list[str] | None = None, img_size: int | None = None, io: str | None = None,
        out: str | Path = "out", num_verify: int = 128, threads: int = 2, latency_runs: int = 0,
        fallback_synthetic: bool = False, progress: bool | None = None, seed: int = 0,
        min_agreement: float = MIN_AGREEMENT) -> dict:
    """Quantize a CARE model to int8 artifacts and write a report. Returns the report dict.

    Raises CareQError before any work for an unknown model/set/recipe or a target the recipe
    cannot honour; after export, when an artifact agrees with the fake-quant reference on
    fewer than 99% of the verification images.
    """
    t_start = time.time()
    rec = load_recipe(recipe)
    targets = list(targets or rec.targets)
    bad = [t for t in targets if t not in rec.targets]
    if bad:
        raise CareQError(f"recipe '{rec.name}' cannot honour target(s) {bad}: it supports "
                         f"{list(rec.targets)}")
    io = io or rec.io
    if io not in ("float", "int8"):
        raise CareQError(f"--io {io}: supported are float and int8")
    if io != rec.io and rec.io != "float":
        raise CareQError(f"recipe '{rec.name}' requires io={rec.io}; --io {io} contradicts it")
    out = Path(out)
    notes: list[str] = []

    with torch.random.fork_rng():  # random weights (no --weights) from `seed`: the same model every run
        torch.manual_seed(seed)
        net = create_model(model, weights=weights)
    if weights is None:
        notes.append("no --weights: the weights are random, so accuracy figures are meaningless "
                     "(latency, size and runtime agreement are still valid)")
        warnings.warn(notes[-1], stacklevel=2)
    pre = load_sidecar(weights).with_size(img_size)
    size = pre.input_size[1]
    dmodel = deploy(net)

    # --- calibration data
    from care_q.data import get_dataset

    calib_used = calib
    try:
        ds = get_dataset(calib, pre, data_root=data_root, limit=num_calib, seed=seed, model=net,
                         progress=progress)
    except CareQError as e:
        if not fallback_synthetic:
            raise
        notes.append(f"calibration set '{calib}' unavailable ({e}); fell back to data-free "
                     f"'synthetic_bn' (inputs optimised to match BatchNorm statistics)")
        warnings.warn(notes[-1], stacklevel=2)
        calib_used = "synthetic_bn"
        ds = get_dataset("synthetic_bn", pre, data_root=data_root, limit=num_calib or 64, seed=seed,
                         model=net, progress=progress)
    if num_calib is not None and len(ds) < num_calib:
        notes.append(f"asked for {num_calib} calibration images, '{calib_used}' has {len(ds)}; "
                     f"calibrating on {len(ds)}")
        warnings.warn(notes[-1], stacklevel=2)
    first = next(iter(_batches(ds, rec.batch_size)))[0] if rec.attention == "npu" else None  # NPU output scales
    dmodel, sub_notes = apply_substitutions(dmodel, rec, first)
    notes += sub_notes
    # before calibration: an exact FP32 rewrite that calibration and the exporters then see
    equalized = cross_layer_equalization(dmodel) if rec.cross_layer_equalization else None
    graph = trace(dmodel, torch.zeros(1, 3, size, size))
    plan = build_plan(graph, rec)
    t0 = time.time()
    with channels_last(dmodel):  # ~40% faster forwards (see care_q/utils/layout.py)
        n_cal = calibrate(plan, dmodel, _batches(ds, rec.batch_size), total=None, progress=progress)
        t_cal = time.time() - t0
        bias_corr = None
        if rec.bias_correction:  # after calibration: it measures the fake-quant model (see the module)
            t0 = time.time()
            bias_corr = bias_correction(plan, dmodel, _first_images(_batches(ds, rec.batch_size), images_for(size)),
                                        progress=progress)
            bias_corr["seconds"] = round(time.time() - t0, 1)

    # --- verification images: a different seeded draw from the same set
    try:
        vds = get_dataset(calib_used, pre, data_root=data_root, limit=num_verify, seed=seed + 1,
                          model=net, progress=progress)
    except CareQError:
        vds = ds
    xv = torch.cat([b[0] for b in _batches(vds, 50)])[:num_verify]

    # --- per-tensor SQNR: this recipe vs one global min/max (what generic tools do)
    naive = build_plan(graph, dataclasses.replace(rec, rules=(), method=Method.MINMAX))
    naive.finalize(plan.observers)
    xs = xv[:8]
    with channels_last(dmodel), torch.no_grad():
        sq_recipe, sq_naive = tensor_sqnr(dmodel, plan, xs), tensor_sqnr(dmodel, naive, xs)
        fl = dmodel(xs).numpy()
        logit_sqnr = {"recipe": sqnr_db(fl, dmodel(xs, QuantOps(plan, "quant")).numpy()),
                      "minmax": sqnr_db(fl, dmodel(xs, QuantOps(naive, "quant")).numpy())}

    # --- export and verify
    artifacts = {}
    names = _artifact_names(model)
    for t in targets:
        path = out / names[t]
        t0 = time.time()
        with stage(f"{t}: writing {path.name}", progress):
            _emit(t, plan, io, path, preprocess=pre, model_name=model)
        with stage(f"{t}: verifying against the fake-quant reference on {len(xv)} images", progress):
            v = _verify(path, dmodel, plan, xv.numpy(), threads)
        artifacts[t] = {"path": str(path), "size_bytes": path.stat().st_size, "verification": v,
                        "census": _census(path), "seconds": round(time.time() - t0, 1)}
        if "note" in v:
            notes.append(f"{t}: {v['note']}")
            warnings.warn(notes[-1], stacklevel=2)

    fp32_bytes = sum(p.numel() * 4 for p in net.parameters())
    report = {
        "command": "ptq", "model": model, "weights": str(weights) if weights else None,
        "img_size": size, "recipe": rec.to_json(), "io": io, "targets": targets,
        "calibration": {"set": calib_used, "images": n_cal, "seconds": round(t_cal, 1)},
        "cross_layer_equalization": equalized, "bias_correction": bias_corr,
        "verification_images": int(xv.shape[0]),
        "artifacts": artifacts, "fp32_param_bytes": fp32_bytes,
        "logit_sqnr_db_fake_quant": logit_sqnr,
        "tensors": plan.to_json(),
        "sqnr_db": {k: {"recipe": sq_recipe[k], "minmax": sq_naive.get(k)} for k in sq_recipe},
        "graph_census": graph.census(),
        "notes": notes, "machine": {"platform": platform.platform(), "python": platform.python_version(),
                                    "torch": torch.__version__},
        "seconds": None,
    }
    if latency_runs:
        t0 = time.time()
        report["latency"] = _latency(net, out, model, size, artifacts, threads, latency_runs, progress)
        report["latency_seconds"] = round(time.time() - t0, 1)
    report["min_agreement"] = min_agreement
    report["seconds"] = round(time.time() - t_start, 1)
    atomic_write_json(report, out / "report.json")
    atomic_write_text(render_markdown(report, plan), out / "report.md")
    failed = {t: a["verification"]["top1_agreement"] for t, a in artifacts.items()
              if a["verification"]["top1_agreement"] < min_agreement}
    if failed:
        raise CareQError("artifact(s) disagree with the fake-quant reference: "
                         + ", ".join(f"{t} {100 * v:.1f}% top-1 agreement" for t, v in failed.items())
                         + f" (< {100 * min_agreement:.0f}%); see {out / 'report.md'}")
    return report


def _latency(net, out: Path, name: str, size: int, artifacts: dict, threads: int, runs: int,
             progress: bool | None = None) -> dict:
    """int8 vs FP32 latency per runtime (FP32 files next to the int8 ones; see fp32_baselines)."""
    from care_q.bench.latency import measure
    from care_q.runtime import load_runner

    with stage(f"FP32 {' + '.join(artifacts)} for the latency comparison", progress):
        fp32 = fp32_baselines(net, out, name, size, list(artifacts))
    res = {}
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    for t, a in artifacts.items():
        fp = fp32[t]
        with stage(f"{t}: timing int8 vs FP32, {runs} runs each", progress):
            m = measure({"fp32": load_runner(fp, threads=threads), "int8": load_runner(a["path"], threads=threads)},
                        x, runs=runs)
        res[t] = {**m, "ratio": m["int8"]["median_ms"] / m["fp32"]["median_ms"],
                  "fp32_size_bytes": fp.stat().st_size,
                  "size_ratio": Path(a["path"]).stat().st_size / fp.stat().st_size}
    return res


def stage_seconds(r: dict) -> dict[str, float]:
    """A ptq report's time by stage (the report's and the benchmark's split)."""
    st = {"calibration": r["calibration"]["seconds"]}
    if r.get("bias_correction"):
        st["bias correction"] = r["bias_correction"]["seconds"]
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
          "| target | file | size (MB) | top-1 agreement | logit SQNR (dB) | max abs diff |",
          "|---|---|---:|---:|---:|---:|"]
    for t, a in r["artifacts"].items():
        v = a["verification"]
        L.append(f"| {t} | `{Path(a['path']).name}` | {a['size_bytes'] / 1e6:.2f} | "
                 f"{100 * v['top1_agreement']:.1f}% ({v['images']} images) | {v['logit_sqnr_db']:.1f} | "
                 f"{v['max_abs_diff']:.3g} |")
    L += ["", "## Where the ops run (care-q check)", ""]
    for t, a in r["artifacts"].items():
        L += [f"- {t}: " + line for line in a.get("census", [])]
    if "latency" in r:
        L += ["", "## Latency (batch 1, this machine)", "",
              "| runtime | FP32 median (ms) | INT8 median (ms) | ratio | size ratio |", "|---|---:|---:|---:|---:|"]
        for t, m in r["latency"].items():
            L.append(f"| {t} | {m['fp32']['median_ms']:.2f} | {m['int8']['median_ms']:.2f} | "
                     f"{m['ratio']:.2f}x | {m['size_ratio']:.2f}x |")
    ls = r["logit_sqnr_db_fake_quant"]
    L += ["", "## Linear attention: per-tensor SQNR (dB), this recipe vs one global min/max", "",
          f"Logits (fake-quant vs FP32): recipe {ls['recipe']:.1f} dB, min/max everywhere {ls['minmax']:.1f} dB.",
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


class _CallableModule(types.ModuleType):
    """Lets `care_q.ptq(...)` call `care_q.ptq.ptq(...)` (the package attribute is this module)."""

    def __call__(self, *args, **kwargs):
        return ptq(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
