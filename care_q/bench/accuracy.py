"""The suite's ``accuracy:`` section: the trained proxy checkpoint's artifacts (FP32, care-q,
baselines: `care_q.bench.artifacts`) evaluated against the FP32 PyTorch model on the same images
(artifacts in child processes, so a runtime abort is a result), the quantization analysis of
the recipe's plan (per-tensor SQNR, histograms) on held-out images, and the fidelity ceilings
(`care_q.eval.ceiling`) of the ``ceiling_recipes`` on the evaluation images."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from care_q.bench.artifacts import ModelRun, calib_key, input_key, make_artifacts, recipe_key
from care_q.bench.keys import code_digest, dataset_key
from care_q.bench.steps import Steps
from care_q.eval.analysis import prepare_plan, quant_analysis
from care_q.eval.ceiling import fidelity_ceiling, noise_reference
from care_q.eval.evaluate import evaluate, file_digest
from care_q.models import load_sidecar
from care_q.pipeline import PrepareConfig, calib_tensor, prepare
from care_q.pipeline.prepare import draw_images, draw_labelled, load_network
from care_q.quant.recipe import load_recipe


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
    ceilings = {r: run_ceiling(run, r, A, d, steps, seed=seed, data_root=data_root, progress=progress)
                for r in A.get("ceiling_recipes") or ()}
    noise = run_noise(run, A, cfg["targets"]["recon_sqnr_db"], steps, seed=seed, data_root=data_root) if ceilings \
        else None
    return {"fp32": made["fp32"], "ptq": made["ptq"], "baselines": made["baselines"], "methods": made["methods"],
            "extra_ptq": made["extra_ptq"], "extra_methods": made["extra_methods"], "eval": ev, "analysis": an,
            "ceilings": ceilings, "noise": noise}


def run_noise(run: ModelRun, A: dict, sqnr: float, steps: Steps, *, seed: int, data_root) -> dict:
    """The step ``<prefix>/noise``: `noise_reference` at issue 19's SQNR target on the eval step's images."""
    def do_noise():
        x, y = draw_labelled(A["dataset"], load_sidecar(run.weights).with_size(run.img_size), A["limit"], seed,
                             data_root=data_root)
        return noise_reference(load_network(run.model, run.weights, seed).eval(), x, y, sqnr)

    key = {**input_key(run), "dataset": dataset_key(A["dataset"]), "limit": A["limit"], "seed": seed,
           "sqnr_db": sqnr, "code": code_digest("ceiling")}
    return steps.run(f"{run.prefix}/noise", key, do_noise)


def run_ceiling(run: ModelRun, recipe: str, A: dict, d: Path, steps: Steps, *, seed: int, data_root,
                progress) -> dict:
    """The step ``<prefix>/ceiling_<recipe>``: `fidelity_ceiling` of the recipe's plan on the
    evaluation images (A's dataset and limit, as the eval step draws them) and its calibration
    images. A reconstruction recipe resumes from a copy of its PTQ step's checkpoint
    (``ptq_<recipe>/reconstruction.pt``, the same plan as its artifacts) when that step ran,
    else it reconstructs here."""
    work = d / f"ceiling_{recipe}"
    made = d / f"ptq_{recipe}" / "reconstruction.pt"

    def do_ceiling():
        ckpt = None
        if load_recipe(recipe).reconstruction is not None:
            work.mkdir(parents=True, exist_ok=True)
            ckpt = work / "reconstruction.pt"
            if made.is_file():
                shutil.copyfile(made, ckpt)
        torch.manual_seed(seed)
        prep = prepare(PrepareConfig(run.model, weights=run.weights, recipe=recipe, calib=run.calib,
                                     num_calib=run.num_calib, data_root=data_root, seed=seed, progress=progress,
                                     checkpoint=ckpt))
        x = draw_images(A["dataset"], prep.preprocess, A["limit"], seed, data_root=data_root)
        recon = prep.reconstruction
        return {**fidelity_ceiling(prep, x, calib_tensor(prep)),
                "reconstruction": {k: recon[k] for k in ("resumed_units", "seconds")} if recon else None}

    key = {**calib_key(run, seed), **recipe_key(recipe), "dataset": dataset_key(A["dataset"]), "limit": A["limit"],
           "code": code_digest("ceiling"), "ptq_code": code_digest("ptq")}
    return steps.run(f"{run.prefix}/ceiling_{recipe}", key, do_ceiling, work)
