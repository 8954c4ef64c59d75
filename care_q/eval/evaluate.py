"""`care_q.eval.evaluate(...)`: accuracy of the FP32 PyTorch model and of every artifact, on the
same images, side by side.

    res = evaluate("care_s0", weights="care_s0_cifar10_64.pth", artifacts="out/s0",
                   dataset="cifar10_test", out="out/s0_eval")
    res["artifacts"]["care_s0_int8.tflite"]["metrics"]["drop_top1_pt"]

Every artifact is loaded and checked before any image is run (it loads; it takes the model's
input size; it has as many outputs as the model's head); the dataset's classes are checked
against the head. The PyTorch model runs first, batched; its logits are the reference. Then each
artifact runs in its own runtime (onnxruntime batched, TFLite batch 1 inside its Runner), by
default in a child process so that a runtime abort is reported as that artifact's failure.
Results are cached per artifact (keyed by the file's content and the image selection) under
``out/.cache``, so an interrupted run resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from care_q.errors import CareQError
from care_q.eval import metrics as M
from care_q.eval.census import artifact_census, detect_source
from care_q.eval.report import write_report
from care_q.eval.worker import preprocess_to_dict, run_artifact, run_isolated, save_npz
from care_q.paths import data_root as resolve_data_root
from care_q.runtime import KINDS, load_runner
from care_q.utils.io import atomic_write_json
from care_q.utils.machine import machine_info
from care_q.utils.progress import progress_bar

REFERENCE = "pytorch_fp32"


# ----------------------------------------------------------------------------- artifacts


def find_artifacts(artifacts) -> dict[str, dict]:
    """name -> {"path", "source"} from a folder (every .tflite / .onnx in it, sorted), a list of
    paths, or a mapping name -> path | {"path": ..., "source": ...}."""
    if artifacts is None:
        return {}
    if isinstance(artifacts, (str, Path)):
        d = Path(artifacts)
        if not d.exists():
            raise CareQError(f"artifacts folder {d} does not exist")
        if d.is_file():
            items = {d.name: d}
        else:
            items = {p.name: p for p in sorted(d.iterdir()) if p.suffix.lower() in KINDS and p.is_file()}
            if not items:
                raise CareQError(f"artifacts folder {d} holds no .tflite or .onnx file")
    elif isinstance(artifacts, dict):
        items = dict(artifacts)
    else:
        items = {Path(p).name: Path(p) for p in artifacts}
    out = {}
    for name, v in items.items():
        entry = dict(v) if isinstance(v, dict) else {"path": v}
        entry["path"] = Path(entry["path"])
        entry.setdefault("source", None)
        if entry["path"].suffix.lower() not in KINDS:
            raise CareQError(f"artifact {entry['path']}: not a model artifact; care-q evaluates .onnx and .tflite files")
        if not entry["path"].is_file():
            raise CareQError(f"artifact {entry['path']} not found")
        out[name] = entry
    return out


def file_digest(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _output_classes(runner) -> int | None:
    """The artifact's number of outputs per image, from its metadata (without running it)."""
    try:
        if runner.kind == "tflite":
            shape = [int(d) for d in runner._out["shape"]]
        else:
            shape = list(runner._output.shape)
        last = shape[-1]
        return int(last) if isinstance(last, (int, np.integer)) and last > 0 else None
    except (AttributeError, KeyError, IndexError, TypeError):
        return None


def preflight(name: str, path: Path, model_desc: str, size: int, num_classes: int, threads: int = 1,
              size_source: str = "") -> dict:
    """Load an artifact and check it against the model: a CareQError naming both sides otherwise.
    Returns facts (kind, input shape/layout/dtype, size in bytes)."""
    try:
        runner = load_runner(path, threads=threads)
    except CareQError as e:
        raise CareQError(f"artifact {name} does not load: {e}") from None
    _, c, h, w = runner.input_shape
    if (h is not None and h != size) or (w is not None and w != size) or (c is not None and c != 3):
        hint = f" ({size_source})" if size_source else ""
        raise CareQError(f"input size mismatch: artifact {path} takes {c}x{h}x{w} inputs, but model {model_desc} "
                         f"is evaluated at 3x{size}x{size}{hint}; pass --img-size {h} or export the artifact "
                         f"at {size}")
    k = _output_classes(runner)
    if k is not None and k != num_classes:
        raise CareQError(f"class mismatch: artifact {path} outputs {k} classes, but model {model_desc} has a "
                         f"{num_classes}-class head")
    return {"kind": runner.kind, "input_shape": list(runner.input_shape), "input_layout": runner.input_layout,
            "input_dtype": str(runner.input_dtype), "size_bytes": path.stat().st_size}


# ----------------------------------------------------------------------------- reference


@torch.no_grad()
def reference_logits(net, loader, total: int, progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of the PyTorch model over a loader of (x, y), as NumPy arrays."""
    logits, labels = [], []
    with progress_bar("PyTorch FP32", total, enabled=progress) as advance:
        for x, y in loader:
            logits.append(net(x).float().numpy())
            labels.append(y.numpy())
            advance(x.shape[0])
    return np.concatenate(logits), np.concatenate(labels).astype(np.int64)


# ----------------------------------------------------------------------------- one evaluation


@dataclass
class _Session:
    """What every run of an evaluation shares: the working folder (the cache), the images' spec
    for the worker, the cache key's inputs, how artifacts run."""

    work: Path
    spec_base: dict
    key_base: dict
    names: list[str]
    isolate: bool
    timeout: float | None
    census: bool
    progress: bool | None

    def key(self, extra: dict) -> str:
        """The cache key of one result: the images, model, weights and runtime settings, plus ``extra``."""
        return hashlib.sha1(json.dumps({**self.key_base, **extra}, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class _Reference:
    """The FP32 PyTorch model's predictions, against which every artifact is measured."""

    path: Path          # the .npz with its logits and the labels (the workers read it)
    labels: np.ndarray
    top: np.ndarray     # top-5 classes per image
    conf: np.ndarray    # top-1 probability per image
    seconds: float


@contextlib.contextmanager
def _work_dir(out, cache: bool):
    """``out/.cache`` (kept) with ``out`` and ``cache``, else a temporary folder (removed at the end)."""
    if out is not None and cache:
        work = Path(out) / ".cache"
        work.mkdir(parents=True, exist_ok=True)
        yield work
        return
    with tempfile.TemporaryDirectory(prefix="care_q_eval_") as tmp:
        yield Path(tmp)


def _open_images(net, model_desc: str, weights, dataset: str, data_root, limit: int | None,
                 img_size: int | None, seed: int, progress: bool | None):
    """(preprocessing, size, where the size came from, dataset): the images at the checkpoint's
    preprocessing, their classes checked against the model's head."""
    from care_q.data import check_classes, get_dataset  # slow imports (torchvision, timm)
    from care_q.models import load_sidecar

    pre = load_sidecar(weights).with_size(img_size)
    size_source = "--img-size" if img_size else (f"from {pre.source}" if weights else "the default")
    ds = get_dataset(dataset, pre, data_root=data_root, limit=limit, seed=seed, progress=progress)
    check_classes(ds, net.num_classes, pre.label_names, what=f"model {model_desc}")
    return pre, pre.input_size[-1], size_source, ds


def _reference(net, ds, batch_size: int, s: _Session, model_desc: str) -> _Reference:
    """The FP32 PyTorch model (the original module, not the deploy form) over the images; cached."""
    from care_q.data import make_loader  # slow import (torchvision, timm)

    path = s.work / f"{REFERENCE}-{s.key({'what': 'reference'})}.npz"
    if path.exists():
        with np.load(path) as z:
            logits, labels, seconds = z["logits"], z["labels"], float(z["seconds"])
    else:
        t0 = time.perf_counter()
        with torch.no_grad():
            logits, labels = reference_logits(net, make_loader(ds, batch_size=batch_size), len(ds), s.progress)
        seconds = time.perf_counter() - t0
        save_npz(path, logits=logits, labels=labels, seconds=np.float64(seconds))
    if logits.shape[1] != net.num_classes:
        raise CareQError(f"model {model_desc} returned {logits.shape[1]} logits, its head has {net.num_classes}")
    tally = M.Tally()
    tally.update(logits)
    return _Reference(path, labels, tally.top, tally.conf, seconds)


def _predictions(name: str, path: Path, s: _Session, ref: _Reference) -> dict:
    """The artifact's predictions on the images (from the cache, else run in its runtime), or
    ``{"failure": ...}`` when its runtime fails on them."""
    spec = {**s.spec_base, "path": str(path), "ref": str(ref.path),
            "out": str(s.work / f"{Path(name).stem}-{s.key({'artifact': file_digest(path)})}.npz")}
    if Path(spec["out"]).exists():
        with np.load(spec["out"]) as z:
            return {k: z[k] for k in z.files}
    with progress_bar(name, len(ref.labels), enabled=s.progress) as advance:
        if s.isolate:
            return run_isolated(spec, advance, timeout=s.timeout)
        try:
            return run_artifact(spec, advance)
        except Exception as e:  # a runtime error on real images is this artifact's result
            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return {"failure": {"type": "error", "exception": type(e).__name__,
                                "message": f"{type(e).__name__}: {text}"[:400]}}


def _artifact_entry(name: str, art: dict, facts: dict, s: _Session, ref: _Reference) -> dict:
    """One artifact's result: path, source, facts, census, and its metrics or its failure."""
    entry = {"path": str(art["path"]), "source": art["source"] or detect_source(art["path"]), **facts}
    if s.census:
        try:
            entry["census"] = artifact_census(art["path"])
        except CareQError as e:
            entry["census"] = {"error": str(e)}
    res = _predictions(name, art["path"], s, ref)
    if "failure" in res:
        entry["failure"] = res["failure"]
        return entry
    m = M.summarize(res["top"], ref.labels, ref.top, ref.conf, s.names)
    sig, noise = float(res["signal"]), float(res["noise"])
    m["logit_sqnr_db"] = (None if sig == 0 else (float("inf") if noise == 0 else 10 * np.log10(sig / noise)))
    entry["metrics"] = m
    entry["seconds"] = round(float(res["seconds"]), 2)
    return entry


def _finish(result: dict, analysis: dict | None, out, report: bool, t_start: float) -> dict:
    """Add the analysis sections, the machine and the run time; write the report (or report.json)."""
    if analysis:
        result["analysis"] = analysis
    result["machine"] = machine_info()
    result["seconds"] = round(time.time() - t_start, 1)
    if out is not None and report:
        write_report(result, out)
    elif out is not None:
        atomic_write_json(result, Path(out) / "report.json")
    return result


# ----------------------------------------------------------------------------- front door


def evaluate(model: str, *, weights: str | Path | None = None, artifacts=None, dataset: str,
             data_root: str | Path | None = None, limit: int | None = None, img_size: int | None = None,
             out: str | Path | None = None, threads: int = 2, batch_size: int = 64, seed: int = 0,
             isolate: bool = True, tflite_delegate: str = "xnnpack", cache: bool = True,
             census: bool = True, progress: bool | None = None, timeout: float | None = None,
             analysis: dict | None = None, report: bool = True) -> dict:
    """Evaluate the FP32 model and every artifact on ``dataset``; returns the result dict and,
    with ``out``, writes report.md / report.json / report.html there.

    Args:
        artifacts: a folder, a list of paths, or a mapping name -> path | {"path", "source"}.
        limit: a stratified seeded subset of the set (default: all of it).
        img_size: evaluation resolution (default: the checkpoint sidecar's, else 224).
        isolate: run each artifact in a child process (a runtime abort becomes a failure).
        cache: keep per-artifact predictions under ``out/.cache`` and reuse them.
        analysis: extra sections for the report (e.g. from `care_q.eval.analysis.quant_analysis`).
    Returns: ``reference`` (PyTorch FP32 metrics), ``artifacts`` name -> {path, kind, source,
    size_bytes, census, metrics (see `metrics.summarize`, plus logit_sqnr_db) | failure}.
    """
    from care_q.models import create_model  # slow import (timm)

    t_start = time.time()
    if threads < 1:
        raise CareQError(f"threads must be >= 1, got {threads}")
    if batch_size < 1:
        raise CareQError(f"batch size must be >= 1, got {batch_size}")
    notes: list[str] = []
    arts = find_artifacts(artifacts)
    net = create_model(model, weights=weights)
    model_desc = f"'{model}'" + (f" ({weights})" if weights else " (random weights)")
    if weights is None:
        notes.append("no weights given: the model is randomly initialised, accuracy figures are meaningless")
        warnings.warn(notes[-1], stacklevel=2)
    pre, size, size_source, ds = _open_images(net, model_desc, weights, dataset, data_root, limit, img_size,
                                              seed, progress)
    # every artifact checked before any image runs
    facts = {name: preflight(name, a["path"], model_desc, size, net.num_classes, size_source=size_source)
             for name, a in arts.items()}
    spec_base = {"dataset": str(dataset), "data_root": str(data_root) if data_root else None, "limit": limit,
                 "seed": seed, "preprocess": preprocess_to_dict(pre), "batch_size": batch_size,
                 "threads": threads, "tflite_delegate": tflite_delegate}
    key_base = {**spec_base, "data_root": str(resolve_data_root(data_root, required=False)), "model": model,
                "images": len(ds), "weights": file_digest(Path(weights)) if weights else f"random:{model}"}
    with _work_dir(out, cache) as work:
        s = _Session(work, spec_base, key_base, list(ds.classes), isolate, timeout, census, progress)
        ref = _reference(net, ds, batch_size, s, model_desc)
        result = {
            "command": "eval", "model": model, "weights": str(weights) if weights else None, "img_size": size,
            "dataset": {"name": str(dataset), "images": int(len(ref.labels)), "classes": len(s.names),
                        "class_names": s.names, "limit": limit, "seed": seed},
            "reference": {"name": REFERENCE, **M.summarize(ref.top, ref.labels), "seconds": round(ref.seconds, 2)},
            "artifacts": {name: _artifact_entry(name, a, facts[name], s, ref) for name, a in arts.items()},
            "runtime": {"threads": threads, "batch_size": batch_size, "tflite_delegate": tflite_delegate,
                        "isolated": isolate},
            "notes": notes,
        }
    return _finish(result, analysis, out, report, t_start)
