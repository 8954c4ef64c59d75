"""The generic tools care-q is measured against, on the same checkpoint and calibration images.

    x = calibration_images("care_s0", weights=..., calib="cifar10_train", num_calib=1000)
    res = run_baselines("out/care_s0_fp32.onnx", "out/care_s0_fp32.tflite", x, "out/baselines")
    res["ort_quantize_static"]["path"]       # or res[...]["failure"] = {"type", "exception", "message", "stage"}

- ``ort_quantize_static``: onnxruntime ``quantize_static`` on the FP32 ONNX: QDQ format,
  per-channel weights, MinMax calibration, int8 activations and weights (its defaults otherwise);
- ``nncf``: ``nncf.quantize`` on the FP32 ONNX model with the transformer preset
  (``model_type=nncf.ModelType.TRANSFORMER``), every calibration image used (``subset_size``);
  where its default (mixed) preset stops on CARE's unified-scale groups, the performance preset;
- ``ai_edge_quantizer``: ai-edge-quantizer's static int8 recipe (``static_wi8_ai8``: int8
  weights and activations, min/max) on the FP32 .tflite, calibrated through its calibration API
  (a dict of signature inputs per image).

Each produces an artifact file or a recorded failure (exception type and first line, and the
stage: quantize, save or load). A tool that raises does not stop the others; an artifact that
does not load in its runtime is kept on disk but reported as failed. Runtime crashes of an
artifact on real images are caught where it is run (`care_q.eval.evaluate` and
`care_q.bench.host` run artifacts in child processes).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from care_q.errors import CareQError
from care_q.eval.census import artifact_census
from care_q.runtime import capture_stderr, load_runner
from care_q.utils.io import atomic_path, atomic_write_json

BASELINES = ("ort_quantize_static", "nncf", "ai_edge_quantizer")
SUFFIX = {"ort_quantize_static": "_ort_qdq.onnx", "nncf": "_nncf_int8.onnx", "ai_edge_quantizer": "_aeq_int8.tflite"}


def _first_line(e: BaseException) -> str:
    """The first line of an exception, without memory addresses (so reports are reproducible)."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return re.sub(r" object at 0x[0-9a-fA-F]+", "", line)[:400]


def failure(e: BaseException, stage: str) -> dict:
    return {"type": "error", "exception": type(e).__name__, "message": f"{type(e).__name__}: {_first_line(e)}",
            "stage": stage}


@contextlib.contextmanager
def quiet():
    """Silence the tools' warnings, logging and progress output (stdout and native stderr)."""

    buf = io.StringIO()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), \
                capture_stderr() as log:
            warnings.simplefilter("ignore")
            yield log
    finally:
        root.setLevel(level)


def calibration_images(model: str, *, weights=None, calib: str = "imagenet_1k_subset", num_calib: int | None = None,
                       img_size: int | None = None, data_root=None, seed: int = 0, progress: bool | None = None) -> np.ndarray:
    """The calibration images `care_q.ptq.ptq` uses for the same arguments, as a float32 NCHW array."""
    import torch

    from care_q.data import get_dataset, make_loader
    from care_q.models import create_model, load_sidecar

    net = create_model(model, weights=weights)
    pre = load_sidecar(weights).with_size(img_size)
    ds = get_dataset(calib, pre, data_root=data_root, limit=num_calib, seed=seed, model=net, progress=progress)
    return torch.cat([b[0] for b in make_loader(ds, batch_size=64)]).numpy().astype(np.float32)


# ----------------------------------------------------------------------------- the tools


def ort_quantize_static(fp32_onnx: Path, x: np.ndarray, path: Path) -> dict:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    input_name = onnx.load(str(fp32_onnx), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(range(len(x)))

        def get_next(self):
            i = next(self._it, None)
            return None if i is None else {input_name: x[i:i + 1]}

    settings = {"quant_format": "QDQ", "per_channel": True, "calibrate_method": "MinMax",
                "activation_type": "QInt8", "weight_type": "QInt8", "images": int(len(x))}
    with atomic_path(path) as tmp:
        with quiet():
            quantize_static(str(fp32_onnx), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
    return settings


def nncf_quantize(fp32_onnx: Path, x: np.ndarray, path: Path) -> dict:
    import nncf
    import onnx

    model = onnx.load(str(fp32_onnx))
    input_name = model.graph.input[0].name
    data = nncf.Dataset([x[i:i + 1] for i in range(len(x))], lambda item: {input_name: item})
    settings = {"model_type": "TRANSFORMER", "subset_size": int(len(x)), "preset": "default (mixed)"}
    try:
        with quiet():
            q = nncf.quantize(model, data, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(x))
    except nncf.InternalError as e:
        # On CARE the transformer model type's default (mixed: asymmetric activations where NNCF
        # prefers them) puts an asymmetric and a symmetric Add into one unified-scale group (a
        # Concat's inputs) and stops with "QConfigs for unified scale group ... are not equal";
        # the performance preset (symmetric activations) is the documented alternative.
        if "unified scale group" not in str(e):
            raise
        settings["preset"] = "performance"
        settings["note"] = ("the transformer default (mixed preset) fails on CARE: QConfigs for a unified scale "
                            "group (asymmetric and symmetric Add into one Concat) are not equal")
        with quiet():
            q = nncf.quantize(model, data, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(x),
                              preset=nncf.QuantizationPreset.PERFORMANCE)
    with atomic_path(path) as tmp:
        onnx.save(q, str(tmp))
    return settings


def aeq_static_int8(fp32_tflite: Path, x: np.ndarray, path: Path, threads: int = 2) -> dict:
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import quantizer, recipe

    sigs = Interpreter(model_path=str(fp32_tflite)).get_signature_list()
    if not sigs:
        raise CareQError(f"{fp32_tflite} has no signature; ai-edge-quantizer calibrates through signatures")
    sig = next(iter(sigs))
    inputs = sigs[sig]["inputs"]
    if len(inputs) != 1:
        raise CareQError(f"{fp32_tflite}: signature '{sig}' has {len(inputs)} inputs, expected 1")
    settings = {"recipe": "static_wi8_ai8", "algorithm": "min_max_uniform_quant", "signature": sig,
                "images": int(len(x))}
    with quiet():
        qt = quantizer.Quantizer(str(fp32_tflite), recipe.static_wi8_ai8())
        cal = qt.calibrate({sig: [{inputs[0]: x[i:i + 1]} for i in range(len(x))]}, num_threads=threads)
        result = qt.quantize(cal)
    if result.quantized_model is None:
        raise CareQError("ai-edge-quantizer returned no model")
    with atomic_path(path) as tmp:
        tmp.write_bytes(bytes(result.quantized_model))
    return settings


TOOLS: dict[str, tuple[str, str, Callable]] = {
    "ort_quantize_static": ("onnx", "onnxruntime", ort_quantize_static),
    "nncf": ("onnx", "nncf", nncf_quantize),
    "ai_edge_quantizer": ("tflite", "ai-edge-quantizer", aeq_static_int8),
}


def run_baseline(name: str, fp32: Path, x: np.ndarray, path: Path, threads: int = 2, census: bool = True) -> dict:
    """One baseline: quantize, then load the artifact (not run it). Never raises for a tool failure."""
    from importlib import metadata


    kind, package, fn = TOOLS[name]
    try:
        version = metadata.version(package)
    except metadata.PackageNotFoundError:
        version = None
    res = {"tool": f"{package} {version}" if version else package, "input": str(fp32), "path": None, "ok": False}
    if version is None:
        res["failure"] = {"type": "error", "exception": "ModuleNotFoundError", "stage": "import",
                          "message": f"{package} is not installed (pip install -e '.[baselines]')"}
        return res
    t0 = time.perf_counter()
    try:
        kw = {"threads": threads} if name == "ai_edge_quantizer" else {}
        res["settings"] = fn(Path(fp32), x, Path(path), **kw)
    except Exception as e:  # any tool error is a result, not a crash of care-q
        res["failure"] = failure(e, "quantize")
        res["seconds"] = round(time.perf_counter() - t0, 1)
        return res
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["path"] = str(path)
    res["size_bytes"] = Path(path).stat().st_size
    try:
        load_runner(path, threads=1)
    except CareQError as e:
        res["failure"] = {"type": "error", "exception": "LoadError", "stage": "load",
                          "message": f"does not load: {_first_line(e)}"}
        return res
    if census:

        try:
            res["census"] = artifact_census(path)
        except CareQError as e:
            res["census"] = {"error": str(e)}
    res["ok"] = True
    return res


RECORD_VERSION = 2  # cached baseline records of another version are redone (2: NNCF performance-preset fallback)


def run_baselines(fp32_onnx, fp32_tflite, x: np.ndarray, out_dir, names=BASELINES, prefix: str = "model",
                  threads: int = 2, cache: bool = False, say: Callable[[str], None] | None = None) -> dict:
    """Run each baseline in ``names`` on the FP32 artifacts with calibration images ``x``
    (float32 NCHW). Artifacts go to ``out_dir/<prefix><suffix>``. With ``cache``, an artifact that
    already exists is reused (the caller keys the folder by checkpoint and calibration images)."""

    bad = [n for n in names if n not in TOOLS]
    if bad:
        raise CareQError(f"unknown baseline(s) {bad}; known: {list(BASELINES)}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 4 or x.shape[0] == 0:
        raise CareQError(f"calibration images must be a non-empty float NCHW array, got shape {x.shape}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = {}
    for name in names:
        kind = TOOLS[name][0]
        fp32 = Path(fp32_onnx if kind == "onnx" else fp32_tflite) if (fp32_onnx if kind == "onnx" else fp32_tflite) else None
        path = out_dir / f"{prefix}{SUFFIX[name]}"
        record = out_dir / f".{name}.json"
        if cache and record.exists():
            import json

            cached = json.loads(record.read_text())
            if cached.get("record_version") == RECORD_VERSION:
                res[name] = cached
                continue
        if say:
            say(f"baseline {name}: quantizing {fp32.name if fp32 else '?'} on {len(x)} images")
        if fp32 is None or not fp32.exists():
            res[name] = {"tool": TOOLS[name][1], "path": None, "ok": False,
                         "failure": {"type": "error", "exception": "FileNotFoundError", "stage": "input",
                                     "message": f"no FP32 .{kind} to quantize ({fp32})"}}
        else:
            res[name] = run_baseline(name, fp32, x, path, threads=threads)
        if cache:
            atomic_write_json({**res[name], "record_version": RECORD_VERSION}, record)
    return res
