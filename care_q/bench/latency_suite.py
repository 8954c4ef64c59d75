"""The suite's ``latency:`` section: each model at deployment resolution with random (trained-like)
weights goes through the same artifacts as the accuracy proxy (`care_q.bench.artifacts`), then
`care_q.bench.host.bench` times every int8 artifact against its FP32 in blocks, a fresh process per
block. The anchors (`care_q.bench.anchors`: plain CNNs and litert-torch's PT2E CARE backbone,
each int8 against its own FP32) are built and timed the same way in the same run (`run_anchors`)."""

from __future__ import annotations

from pathlib import Path

import torch

from care_q.bench.anchors import build_anchor
from care_q.bench.artifacts import ModelRun, calib_key, make_artifacts, recipe_key
from care_q.bench.host import bench
from care_q.bench.keys import code_digest, json_digest
from care_q.bench.npu import coverage
from care_q.bench.steps import Steps
from care_q.eval.evaluate import file_digest
from care_q.export.onnx_profile import profile_onnx
from care_q.export.tflite_profile import profile_tflite
from care_q.models import create_model, randomize_like_trained, save_checkpoint
from care_q.ptq import ptq
from care_q.quant.recipe import load_recipe

NUM_VERIFY = 16  # ptq's verification images for a latency model (its weights are random: agreement only)


def latency_run(model: str, Lc: dict, A: dict, root: Path) -> ModelRun:
    """A latency model as a `ModelRun`: random weights, the section's input size and calibration."""
    prefix = f"latency/{model}"
    return ModelRun(prefix=prefix, model=model, weights=root / prefix / "weights" / f"{model}_random.pth",
                    img_size=Lc["img_size"], calib=Lc["calib"], num_calib=Lc["num_calib"], recipe=A["recipe"],
                    x86_recipe=A.get("onnx_x86_recipe"), baselines=tuple(Lc["baselines"]), fp32_samples=2,
                    size_arg=Lc["img_size"], num_verify=NUM_VERIFY)


def run_latency(cfg: dict, Lc: dict, A: dict, root: Path, steps: Steps, data_root, progress) -> dict:
    out = {}
    seed, threads = cfg["seed"], cfg["threads"]
    for model in Lc["models"]:
        run = latency_run(model, Lc, A, root)
        wpath = run.weights

        def weights(model=model, wpath=wpath):
            torch.manual_seed(seed)
            # trained-like layer scales/BN/LN (the official init's 1e-6 layer scales push XNNPACK's int8
            # ADDs out of range); no sidecar: ImageNet preprocessing, size from img_size
            save_checkpoint(randomize_like_trained(create_model(model), seed), wpath)
            return {"path": str(wpath)}

        steps.run(f"{run.prefix}/weights", {"model": model, "seed": seed, "init": "like_trained",
                                            "code": code_digest("weights")}, weights, wpath.parent)
        made = make_artifacts(run, root, steps, seed=seed, threads=threads, data_root=data_root, progress=progress)
        arts = made["artifacts"]
        delegates = list(Lc["tflite_delegates"]) + [x for x in Lc["slow_delegates"] if model in Lc["slow_models"]
                                                    and x not in Lc["tflite_delegates"]]
        bench_cfg = {"threads": threads, "runs": Lc["runs"], "blocks": Lc["blocks"], "warmup": Lc["warmup"],
                     "delegates": delegates, "slow_runs": Lc["slow_runs"], "code": code_digest("bench"),
                     "artifacts": {n: file_digest(Path(a["path"])) for n, a in arts.items()}}

        def do_bench(arts=arts, delegates=delegates):
            return bench(arts, threads=threads, runs=Lc["runs"], blocks=Lc["blocks"], warmup=Lc["warmup"],
                         tflite_delegates=tuple(delegates),
                         slow_runs=Lc["slow_runs"], memory=True, progress=progress, report=False)

        out[model] = {"methods": made["methods"], "baselines": made["baselines"],
                      "bench": steps.run(f"{run.prefix}/bench", bench_cfg, do_bench),
                      "profile": run_profile(run.prefix, made["methods"], threads, steps),
                      "ort_profile": run_ort_profile(run.prefix, made["methods"], threads, steps),
                      "npu": run_npu(run, Lc.get("npu_recipes") or [], made["methods"], root, steps, seed=seed,
                                     threads=threads, data_root=data_root)}
    return out


NPU_RECON_STEPS = 1  # the NPU graph's structure is what Vela compiles: one reconstruction step, not the recipe's
NPU_CALIB = 32       # at least one reconstruction batch of the NPU recipe


def run_npu(run: ModelRun, recipes: list[str], methods: dict, root: Path, steps: Steps, *, seed: int, threads: int,
            data_root) -> dict | None:
    """Issue 20 at deployment resolution: the model's .tflite by each of ``recipes`` (a ptq step each; a QAT recipe's
    is its PTQ starting point, the graph its training keeps), then the NPU census (`care_q.bench.npu.coverage`:
    Edge TPU and NNAPI by rules, Ethos-U by Vela) of them, of care-q's CPU .tflite and of ai-edge-quantizer's:
    {label: {"file", "coverage"}}; None without recipes."""
    if not recipes:
        return None
    files = {}
    for recipe in recipes:
        d = root / run.prefix / f"ptq_npu_{recipe}"
        rec = load_recipe(recipe)
        steps_per_unit = NPU_RECON_STEPS if rec.reconstruction is not None else None

        def do_ptq(recipe=recipe, d=d, steps_per_unit=steps_per_unit):
            torch.manual_seed(seed)
            rep = ptq(run.model, recipe=recipe, weights=run.weights, calib=run.calib,
                      num_calib=max(run.num_calib, NPU_CALIB), data_root=data_root, threads=threads, seed=seed, out=d,
                      latency_runs=0, min_agreement=0.0, recon_steps=steps_per_unit, progress=False, **run.ptq_kw())
            return {"path": rep["artifacts"]["tflite"]["path"]}

        made = steps.run(f"{run.prefix}/ptq_npu_{recipe}", {**calib_key(run, seed), **recipe_key(recipe),
                                                            "recon_steps": steps_per_unit, "npu_calib": NPU_CALIB,
                                                            "code": code_digest("ptq")}, do_ptq, d)
        files[f"QAT {recipe}'s graph" if rec.kind == "qat" else recipe] = Path(made["path"])
    for key, label in (("careq_tflite", run.recipe), ("ai_edge_quantizer", "ai_edge_quantizer")):
        m = methods.get(key) or {}
        if label not in files and m.get("path") and "failure" not in m and Path(m["path"]).exists():
            files[label] = Path(m["path"])
    key = {"code": code_digest("npu"), "files": {k: file_digest(f) for k, f in files.items()}}

    def do():
        return {k: {"file": f.name, "coverage": coverage(f)} for k, f in files.items()}

    return steps.run(f"{run.prefix}/npu", key, do)


PROFILE_RUNS = 20  # timed runs of each one-op model (median)
PROFILE_BLOCKS = 3  # onnxruntime profile: each file this many times, int8 and FP32 in turn (median per node)


def run_profile(prefix: str, methods: dict, threads: int, steps: Steps) -> dict | None:
    """The care-q .tflite's per-op profile and bound beside its FP32 file's (`care_q.export.tflite_profile`),
    a cached step; None where either file is missing."""
    int8, fp32 = (methods.get(k) or {} for k in ("careq_tflite", "fp32_tflite"))
    if not int8.get("path") or not fp32.get("path") or "failure" in int8 or "failure" in fp32:
        return None
    key = {"threads": threads, "runs": PROFILE_RUNS, "code": code_digest("profile"),
           "files": {k: file_digest(Path(m["path"])) for k, m in (("int8", int8), ("fp32", fp32))}}

    def do():
        p = profile_tflite(int8["path"], threads=threads, runs=PROFILE_RUNS, fp32=fp32["path"])
        p.pop("rows")
        return p

    return steps.run(f"{prefix}/profile", key, do)


ORT_PROFILED = ("careq_onnx", "careq_onnx_x86")  # the care-q ONNX files profiled beside the FP32 ONNX


def run_ort_profile(prefix: str, methods: dict, threads: int, steps: Steps) -> dict:
    """onnxruntime's per-node profile by kind of each care-q ONNX file beside the FP32 ONNX, with the
    bound (`care_q.export.onnx_profile`), a cached step per file: {method: profile}; {} without FP32."""
    fp32 = methods.get("fp32_onnx") or {}
    if not fp32.get("path") or "failure" in fp32:
        return {}
    out = {}
    for key in ORT_PROFILED:
        m = methods.get(key) or {}
        if not m.get("path") or "failure" in m:
            continue
        k = {"threads": threads, "runs": PROFILE_RUNS, "blocks": PROFILE_BLOCKS, "code": code_digest("ort_profile"),
             "files": {"int8": file_digest(Path(m["path"])), "fp32": file_digest(Path(fp32["path"]))}}
        out[key] = steps.run(f"{prefix}/ort_profile_{key}", k,
                             lambda m=m: profile_onnx(m["path"], fp32=fp32["path"], threads=threads, runs=PROFILE_RUNS,
                                                      blocks=PROFILE_BLOCKS))
    return out


ANCHOR_CALIB = 8  # seeded N(0, 1) calibration images of every anchor


def run_anchors(cfg: dict, Lc: dict, root: Path, steps: Steps, progress, compared: dict | None = None) -> dict:
    """Each anchor of ``Lc["anchors"]`` built (a cached step per anchor), then all of them timed
    by `care_q.bench.host.bench` (XNNPACK and onnxruntime, the section's runs and blocks):
    {"built": anchor -> build record, "bench": the bench result}. ``compared``: the latency benches
    whose medians are set against the anchors' (model -> bench result); they are part of the anchors'
    bench key, so a re-measured care-q file re-measures the anchors in the same run (medians of two
    runs are not compared)."""
    names = Lc.get("anchors") or []
    if not names:
        return {}
    seed, threads, size = cfg["seed"], cfg["threads"], Lc["img_size"]
    folder = root / "latency" / "anchors"
    built = {}
    for name in names:
        key = {"anchor": name, "img_size": size, "num_calib": ANCHOR_CALIB, "seed": seed,
               "code": code_digest("anchors")}

        def make(name=name):
            return build_anchor(name, folder / name, img_size=size, num_calib=ANCHOR_CALIB, seed=seed)

        built[name] = steps.run(f"latency/anchors/{name}", key, make, folder / name)
    arts = {f: {"path": Path(a["path"]), "source": a["source"]} for b in built.values() for f, a in b["artifacts"].items()}
    if not arts:
        return {"built": built, "bench": None}
    bench_cfg = {"threads": threads, "runs": Lc["runs"], "blocks": Lc["blocks"], "warmup": Lc["warmup"],
                 "code": code_digest("bench"), "artifacts": {n: file_digest(a["path"]) for n, a in arts.items()},
                 "compared": json_digest(compared or {})}

    def do_bench():
        return bench(arts, threads=threads, runs=Lc["runs"], blocks=Lc["blocks"], warmup=Lc["warmup"],
                     tflite_delegates=("xnnpack",), memory=True, progress=progress, report=False)

    return {"built": built, "bench": steps.run("latency/anchors/bench", bench_cfg, do_bench)}
