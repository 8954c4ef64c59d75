"""One model's artifacts for the suite, the same sequence for the accuracy proxy and for every
latency model: FP32 exports, care-q PTQ (the suite's recipe), the x86 recipe's ONNX (where the
suite has ``accuracy.onnx_x86_recipe``) and the baselines on the same calibration images, each a
cached step (`care_q.bench.steps`) keyed by `care_q.bench.keys`."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from care_q.bench.keys import code_digest, dataset_key, file_key, recipe_content
from care_q.bench.steps import Steps
from care_q.errors import CareQError
from care_q.eval import aimet_adaround as aimet
from care_q.eval.baselines import BASELINES, SUFFIX, calibration_images, run_baselines
from care_q.export.fp32 import export_fp32
from care_q.models import create_model
from care_q.ptq import ptq
from care_q.quant.recipe import load_recipe
from care_q.utils.machine import versions

METHODS = [  # key, label, runtime, group
    ("fp32_tflite", "FP32 TFLite (litert-torch)", "tflite", "fp32"),
    ("fp32_onnx", "FP32 ONNX (torch.onnx)", "onnx", "fp32"),
    ("careq_tflite", "care-q int8 TFLite", "tflite", "care-q"),
    ("careq_onnx", "care-q int8 ONNX QDQ", "onnx", "care-q"),
    ("careq_onnx_x86", "care-q int8 ONNX QDQ, x86 recipe", "onnx", "care-q"),
    ("ort_quantize_static", "ORT quantize_static (QDQ, per-channel, MinMax)", "onnx", "baseline"),
    ("nncf", "NNCF quantize (transformer)", "onnx", "baseline"),
    ("ai_edge_quantizer", "ai-edge-quantizer static int8", "tflite", "baseline"),
    (aimet.NAME, "AIMET AdaRound + QuantSim (QDQ, per-channel)", "onnx", "baseline"),
]
# The AIMET baseline's settings (issue 19): AdaRound on 8 batches of 32 calibration images, this many
# iterations per layer (AIMET's default, 10,000, would take hours on 2 cores), activation encodings on all.
AIMET_SETTINGS = {"iterations": 200, "num_batches": 8, "batch_size": 32}
SETTING = {"tflite": "tflite/xnnpack", "onnx": "onnxruntime"}


def artifact_file(method: str, model: str) -> str:
    return {"fp32_tflite": f"{model}_fp32.tflite", "fp32_onnx": f"{model}_fp32.onnx",
            "careq_tflite": f"{model}_int8.tflite", "careq_onnx": f"{model}_int8_qdq.onnx",
            "careq_onnx_x86": f"{model}_int8_x86_qdq.onnx", aimet.NAME: f"{model}{aimet.SUFFIX}"}.get(method) \
        or f"{model}{SUFFIX[method]}"


RUNTIME_LABEL = {"tflite": "TFLite", "onnx": "ONNX QDQ"}


def extra_methods(recipes) -> list[tuple[str, str, str, str]]:
    """METHODS rows of the suite's extra care-q recipes (``accuracy.extra_recipes``): one per recipe and target."""
    return [(f"careq_{t}:{r}", f"care-q int8 {RUNTIME_LABEL[t]}, {r}", t, "care-q")
            for r in recipes for t in load_recipe(r).targets]


def extra_file(model: str, recipe: str, target: str) -> str:
    return f"{model}_int8_{recipe}.tflite" if target == "tflite" else f"{model}_int8_{recipe}_qdq.onnx"


def method_paths(model: str, fp32_dir: Path, ptq_dir: Path, baselines: dict,
                 x86_dir: Path | None = None) -> dict[str, dict]:
    """method -> {"path" | "failure", "source", "file"} for one model's artifacts (the x86
    recipe's ONNX where ``x86_dir`` is given)."""
    out = {}
    for key, *_ in METHODS:
        name = artifact_file(key, model)
        if key == "careq_onnx_x86":
            if x86_dir is not None:
                out[key] = {"file": name, "path": str(x86_dir / name), "source": "int8"}
        elif key.startswith("fp32"):
            out[key] = {"file": name, "path": str(fp32_dir / name), "source": "fp32"}
        elif key.startswith("careq"):
            out[key] = {"file": name, "path": str(ptq_dir / name), "source": "int8"}
        elif key in baselines:
            b = baselines[key]
            out[key] = {"file": name, "source": "int8", "path": b.get("path")}
            if not b.get("ok"):
                out[key]["failure"] = b.get("failure")
    return out


def strip_ptq(rep: dict) -> dict:
    """The parts of a ptq report the suite keeps (the per-tensor table stays in its report.json)."""
    keep = ("model", "img_size", "io", "targets", "calibration", "verification_images", "artifacts",
            "fp32_param_bytes", "logit_sqnr_db_fake_quant", "notes", "seconds")
    out = {k: rep.get(k) for k in keep}
    rc = rep.get("reconstruction")
    if rc:  # its time and per-unit errors (issue 19's time target), not the learnt values
        out["reconstruction"] = {k: rc.get(k) for k in ("iterations", "images", "seconds", "device", "resumed_units", "units")}
    return out


@dataclass(frozen=True)
class ModelRun:
    """One model of a section: what its artifacts are made from and where they go."""

    prefix: str            # its steps' names and folder under the suite's root: "proxy", "latency/care_s0"
    model: str
    weights: Path
    img_size: int          # the FP32 exports' input size
    calib: str
    num_calib: int
    recipe: str
    x86_recipe: str | None
    baselines: tuple[str, ...]
    fp32_samples: int      # images the FP32 exports are verified on
    size_arg: int | None = None     # the input size passed to ptq and the baselines' calibration (None: the checkpoint's)
    num_verify: int | None = None   # ptq's verification images (None: its default)
    extra_recipes: tuple[str, ...] = ()  # more care-q recipes beside ``recipe`` (each a ptq step of its own)

    def size_kw(self) -> dict:
        return {} if self.size_arg is None else {"img_size": self.size_arg}

    def ptq_kw(self) -> dict:
        return {**self.size_kw(), **({} if self.num_verify is None else {"num_verify": self.num_verify})}


def input_key(run: ModelRun) -> dict:
    """What every step of ``run`` is made from: model, weights (by content), input size."""
    return {"model": run.model, "weights": file_key(run.weights), "img_size": run.img_size}


def calib_key(run: ModelRun, seed: int) -> dict:
    return {**input_key(run), "calib": dataset_key(run.calib), "num_calib": run.num_calib, "seed": seed,
            "args": run.ptq_kw()}


def recipe_key(name: str) -> dict:
    return {"recipe": name, "recipe_content": recipe_content(name)}


def make_artifacts(run: ModelRun, root: Path, steps: Steps, *, seed: int, threads: int, data_root,
                   progress) -> dict:
    """The FP32, PTQ, x86-recipe and baseline steps of one model. Returns {"fp32": format ->
    {path, size_bytes, verify, exporter}, "ptq", "baselines", "methods" (`method_paths`),
    "artifacts" (file -> {path, source}: those that exist)}."""
    d = root / run.prefix
    calib = calib_key(run, seed)
    common = dict(weights=run.weights, calib=run.calib, data_root=data_root, num_calib=run.num_calib,
                  threads=threads, progress=progress, seed=seed, **run.ptq_kw())

    def fp32():
        res = export_fp32(create_model(run.model, weights=run.weights), d / "fp32", run.model, run.img_size,
                          num_samples=run.fp32_samples, threads=threads)
        if not res["ok"]:
            raise CareQError(f"FP32 export of {run.model} at {run.img_size} disagrees with PyTorch: {res['problems']}")
        return {k: {kk: v.get(kk) for kk in ("path", "size_bytes", "verify", "exporter")}
                for k, v in res["artifacts"].items()}

    fp = steps.run(f"{run.prefix}/fp32", {**input_key(run), "samples": run.fp32_samples, "code": code_digest("fp32")},
                   fp32, d / "fp32")

    def do_ptq():
        torch.manual_seed(seed)
        return strip_ptq(ptq(run.model, recipe=run.recipe, out=d / "ptq", latency_runs=0, min_agreement=0.0, **common))

    pq = steps.run(f"{run.prefix}/ptq", {**calib, **recipe_key(run.recipe), "code": code_digest("ptq")}, do_ptq,
                   d / "ptq")

    @functools.cache  # the file tools and AIMET quantize on the same images: read them once
    def calib_images():
        return calibration_images(run.model, weights=run.weights, calib=run.calib, num_calib=run.num_calib,
                                  data_root=data_root, seed=seed, progress=progress, **run.size_kw())

    tools = [b for b in run.baselines if b in BASELINES]  # the tools that quantize the FP32 files

    def do_baselines():
        return run_baselines(fp["onnx"]["path"], fp["tflite"]["path"], calib_images(), d / "baselines", tools,
                             prefix=run.model, threads=threads, cache=True, say=steps.log)

    bl = steps.run(f"{run.prefix}/baselines", {**calib, "baselines": tools, "code": code_digest("baselines")},
                   do_baselines, d / "baselines")
    if aimet.NAME in run.baselines:  # AIMET quantizes the PyTorch model itself

        def do_aimet():
            steps.log(f"baseline {aimet.NAME}: AdaRound + QuantSim of {run.model} on {run.num_calib} images")
            return aimet.aimet_baseline(run.model, run.weights, calib_images(),
                                        d / "aimet" / artifact_file(aimet.NAME, run.model), threads=threads,
                                        **AIMET_SETTINGS)

        bl = {**bl, aimet.NAME: steps.run(f"{run.prefix}/aimet", {**calib, **AIMET_SETTINGS,
                                                                   "tool": versions(["aimet-torch"])["aimet-torch"],
                                                                   "code": code_digest("aimet")},
                                          do_aimet, d / "aimet")}
    x86 = None
    if run.x86_recipe:
        x86 = d / "ptq_x86"

        def do_x86():
            torch.manual_seed(seed)
            rep = ptq(run.model, recipe=run.x86_recipe, targets=["onnx"], out=x86, min_agreement=0.0, latency_runs=0,
                      **common)
            os.replace(rep["artifacts"]["onnx"]["path"], x86 / artifact_file("careq_onnx_x86", run.model))
            return strip_ptq(rep)

        steps.run(f"{run.prefix}/ptq_x86", {**calib, **recipe_key(run.x86_recipe), "code": code_digest("ptq")},
                  do_x86, x86)
    methods = method_paths(run.model, d / "fp32", d / "ptq", bl, x86)
    extra = {}
    for r in run.extra_recipes:
        dr = d / f"ptq_{r}"

        def do_extra(r=r, dr=dr):
            torch.manual_seed(seed)
            rep = ptq(run.model, recipe=r, out=dr, latency_runs=0, min_agreement=0.0, **common)
            for t, a in rep["artifacts"].items():  # named by recipe: the eval's table tells them apart
                src, a["path"] = Path(a["path"]), str(dr / extra_file(run.model, r, t))
                os.replace(src, a["path"])
            return strip_ptq(rep)

        extra[r] = steps.run(f"{run.prefix}/ptq_{r}", {**calib, **recipe_key(r), "code": code_digest("ptq")},
                             do_extra, dr)
        for key, _, t, _ in extra_methods([r]):
            name = extra_file(run.model, r, t)
            methods[key] = {"file": name, "path": str(dr / name), "source": "int8"}
    arts = {m["file"]: {"path": m["path"], "source": m["source"]} for m in methods.values() if "failure" not in m}
    return {"fp32": fp, "ptq": pq, "baselines": bl, "methods": methods, "artifacts": arts, "extra_ptq": extra,
            "extra_methods": extra_methods(run.extra_recipes)}

