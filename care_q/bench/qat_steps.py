"""The suite's ``qat:`` section: each QAT recipe on the accuracy proxy, from its own PTQ start,
fine-tuned, evaluated on the accuracy section's test set, its artifacts verified in their runtimes;
and ``--adopt-qat``, which seeds a recipe's step with a run trained elsewhere (a GPU machine).

A step's folder is tagged with what the training depends on (`qat_step_config`); the rest of its
key (verification count, export-only recipe settings, the exporters' code) re-exports and
re-verifies a finished run when it changes, without training it again."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from care_q.bench.keys import code_digest, dataset_key, file_key, without_source
from care_q.bench.steps import Steps
from care_q.errors import CareQError
from care_q.qat import qat
from care_q.qat.config import export_content, training_content
from care_q.quant.recipe import load_recipe
from care_q.utils.io import atomic_path

QAT_NUM_VERIFY = 200      # held-out images each QAT artifact is verified on, unless qat.num_verify says


def qat_epochs(Q: dict, name: str) -> float:
    """Epochs for one QAT recipe: ``qat.recipe_epochs[name]``, else ``qat.epochs``."""
    return float((Q.get("recipe_epochs") or {}).get(name, Q["epochs"]))


def qat_step_config(cfg: dict, name: str, wkey: dict | None = None) -> dict:
    """What the QAT step of recipe ``name`` is cached on (its folder's tag): what its training depends on."""
    Q, A = cfg["qat"], cfg["accuracy"]
    return {"model": A["model"], "weights": wkey or file_key(A["weights"]), "recipe": name,
            "recipe_content": without_source(training_content(load_recipe(name))), "code": code_digest("qat_train"),
            "dataset": dataset_key(Q["dataset"]), "epochs": qat_epochs(Q, name),
            "limit": Q["limit"], "eval": dataset_key(A["dataset"]), "eval_limit": Q["eval_limit"],
            "calib": dataset_key(A["calib"]), "num_calib": A["num_calib"], "seed": cfg["seed"]}


def adopt_qat(cfg: dict, root: Path, name: str, checkpoint: str | Path) -> Path:
    """Seed the QAT step of recipe ``name`` with a run trained elsewhere (a GPU machine, say): the
    run's checkpoint becomes the step folder's ``last.pt``, tagged with the step's configuration,
    so the next bench resumes it (a finished run is evaluated, exported and verified here). The
    run's own settings are checked against the step's when it resumes (`care_q.qat`)."""
    Q = cfg.get("qat") or {}
    if name not in Q.get("recipes", []):
        raise CareQError(f"--adopt-qat {name}: not a QAT recipe of this suite ({Q.get('recipes', [])})")
    src = Path(checkpoint)
    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
        run = state["config"]
    except FileNotFoundError:
        raise CareQError(f"--adopt-qat {name}: no checkpoint {src}") from None
    except Exception as e:
        raise CareQError(f"--adopt-qat {name}: {src} is not a care-q QAT checkpoint ({str(e).splitlines()[0]})") from None
    want = {"recipe": name, "epochs": qat_epochs(Q, name), "model": cfg["accuracy"]["model"]}
    got = {"recipe": run.get("recipe", {}).get("name"), "epochs": run.get("epochs"), "model": run.get("model")}
    if got != want:
        raise CareQError(f"--adopt-qat {name}: {src} is a run of {got}, the suite's step is {want}")
    d = root / "qat" / name
    Steps.prepare(d, qat_step_config(cfg, name), clear=True)
    with atomic_path(d / "last.pt") as tmp:
        shutil.copyfile(src, tmp)
    return d / "last.pt"


def _summary(rep: dict) -> dict:
    """The parts of a qat report the suite keeps."""
    keep = ("recipe", "accuracy", "train", "calibration", "notes", "seconds")
    r = {k: rep.get(k) for k in keep}
    r["recipe"] = {"name": rep["recipe"]["name"], "description": rep["recipe"].get("description")}
    r["artifacts"] = {t: {"file": Path(a["path"]).name, "size_bytes": a["size_bytes"],
                          "agreement": a["verification"]["top1_agreement"],
                          "logit_sqnr_db": a["verification"]["logit_sqnr_db"], "census": a.get("census")}
                      for t, a in rep.get("artifacts", {}).items()}
    return r


def run_qat(cfg: dict, Q: dict, A: dict, root: Path, steps: Steps, data_root, progress) -> dict:
    """Each QAT recipe on the accuracy proxy: PTQ of the recipe (its starting point), then fine-tuning,
    evaluated on the accuracy section's test set, the artifacts verified in their runtimes."""
    out = {}
    wkey = file_key(A["weights"])
    for name in Q["recipes"]:
        d = root / "qat" / name
        tag = qat_step_config(cfg, name, wkey)
        num_verify = Q.get("num_verify", QAT_NUM_VERIFY)
        conf = {**tag, "num_verify": num_verify, "export_code": code_digest("qat")} | export_content(load_recipe(name))

        def do_qat(name=name, d=d, num_verify=num_verify):
            resume = (d / "last.pt").exists()  # a killed run continues from its last checkpoint
            rep = qat(A["model"], A["weights"], Q["dataset"], recipe=name, epochs=qat_epochs(Q, name), out=d, resume=resume,
                      calib=A["calib"], calib_images=A["num_calib"], data_root=data_root, seed=cfg["seed"],
                      eval_dataset=A["dataset"], eval_limit=Q["eval_limit"], limit=Q["limit"],
                      threads=cfg["threads"], progress=progress, log=steps.log, num_verify=num_verify,
                      min_agreement=0.0)  # a benchmark records the agreement (table) instead of failing
            return _summary(rep)

        out[name] = steps.run(f"qat/{name}", conf, do_qat, d, tag=tag)
    return out
