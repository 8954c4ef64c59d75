"""The suite's ``accuracy:`` section: the trained proxy checkpoint's artifacts (FP32, care-q,
baselines: `care_q.bench.artifacts`) evaluated against the FP32 PyTorch model on the same images
(artifacts in child processes, so a runtime abort is a result), and the quantization analysis of
the recipe's plan (per-tensor SQNR, histograms) on held-out images."""

from __future__ import annotations

from pathlib import Path

from care_q.bench.artifacts import ModelRun, calib_key, input_key, make_artifacts, recipe_key
from care_q.bench.keys import code_digest, dataset_key
from care_q.bench.steps import Steps
from care_q.eval.analysis import prepare_plan, quant_analysis
from care_q.eval.evaluate import evaluate, file_digest
from care_q.models import load_sidecar


def proxy_run(A: dict) -> ModelRun:
    """The accuracy proxy as a `ModelRun`: the checkpoint at its own input size."""
    return ModelRun(prefix=A["name"], model=A["model"], weights=Path(A["weights"]),
                    img_size=load_sidecar(A["weights"]).input_size[-1], calib=A["calib"], num_calib=A["num_calib"],
                    recipe=A["recipe"], x86_recipe=A.get("onnx_x86_recipe"), baselines=tuple(A["baselines"]),
                    fp32_samples=8, extra_recipes=tuple(A.get("extra_recipes") or ()))


def run_accuracy(cfg: dict, A: dict, root: Path, steps: Steps, data_root, progress) -> dict:
    seed, threads = cfg["seed"], cfg["threads"]
    run = proxy_run(A)
    d = root / run.prefix
    made = make_artifacts(run, root, steps, seed=seed, threads=threads, data_root=data_root, progress=progress)
    arts = made["artifacts"]
    eval_cfg = {**input_key(run), "dataset": dataset_key(A["dataset"]), "limit": A["limit"], "seed": seed,
                "code": code_digest("eval"),
                "artifacts": {n: file_digest(Path(a["path"])) for n, a in arts.items()}}

    def do_eval():
        return evaluate(run.model, weights=run.weights, artifacts=arts, dataset=A["dataset"], data_root=data_root,
                        limit=A["limit"], out=d / "eval", threads=threads, seed=seed, isolate=True, cache=True,
                        progress=progress)

    ev = steps.run(f"{run.prefix}/eval", eval_cfg, do_eval, d / "eval")

    def do_analysis():
        prep = prepare_plan(run.model, weights=run.weights, calib=run.calib, recipe=run.recipe, num_calib=run.num_calib,
                            data_root=data_root, seed=seed, progress=progress)
        return quant_analysis(prep, num_images=A["analysis_images"], data_root=data_root, seed=seed + 1)

    an = steps.run(f"{run.prefix}/analysis", {**calib_key(run, seed), **recipe_key(run.recipe),
                                              "images": A["analysis_images"], "code": code_digest("analysis")},
                   do_analysis)
    return {"fp32": made["fp32"], "ptq": made["ptq"], "baselines": made["baselines"], "methods": made["methods"],
            "extra_ptq": made["extra_ptq"], "extra_methods": made["extra_methods"], "eval": ev, "analysis": an}
