"""AIMET's AdaRound (``aimet-torch``) on a CARE model, as a baseline beside care-q's reconstruction PTQ.

    x = torch.from_numpy(calibration_images("care_s0", weights=w, calib="cifar10_train", num_calib=1000))
    res = aimet_adaround(create_model("care_s0", weights=w), x, Path("out/aimet"), iterations=300,
                         num_batches=31)
    res["sim"](images)            # the QuantizationSimModel's model (fake-quant torch), or
    res["failure"]                # {"type", "exception", "message", "stage"} where AIMET stopped

The flow is AIMET's documented PTQ recipe for a PyTorch user (2.x, ``aimet_torch``):

1. ``Adaround.apply_adaround`` on the FP32 model with 8-bit weights, the per-channel quantsim
   config shipped with AIMET (``default_config_per_channel.json``: per-channel Conv/Gemm/MatMul
   weights, symmetric), and ``QuantScheme.post_training_tf_enhanced`` (AdaRound's default);
   ``iterations`` per layer (AIMET's default is 10,000) on ``num_batches`` batches of the images;
2. ``QuantizationSimModel`` on the AdaRounded model, int8 weights and activations, same config
   and scheme; ``set_and_freeze_param_encodings`` with AdaRound's encodings;
3. ``compute_encodings`` over the calibration images (activation ranges);
4. export: ``aimet_torch.onnx.export`` (ONNX with QuantizeLinear/DequantizeLinear embedded) into
   ``out_dir/aimet_adaround_qdq.onnx``, and AdaRound's parameter encodings JSON; written into a
   temporary folder then moved into place; onnxruntime then loads and runs the QDQ file on a few
   calibration images (``result["onnx"]``).

A stage that raises is a result (``failure``), not a crash: the stages are ``import``,
``prepare`` (only on the model-preparer retry), ``adaround``, ``quantsim``, ``compute_encodings``,
``export`` (the last keeps the sim: it is usable without an ONNX file). Where ``adaround`` or
``quantsim`` fails on the original model, AIMET's own workaround is tried once: its model
preparer (``aimet_torch.model_preparer.prepare_model``, torch.fx) makes functional ops into
modules, and the flow is rerun on the prepared model (``notes`` say so, ``first_failure`` keeps
the original error).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from care_q.errors import CareQError
from care_q.eval.baselines import failure, quiet
from care_q.utils.io import atomic_write_bytes

INSTALL = "pip install aimet-torch==2.42.0"
ONNX_NAME = "aimet_adaround_qdq.onnx"
ENCODINGS_PREFIX = "aimet_adaround"
NAME = "aimet_adaround"                     # the bench's baseline name (`aimet_baseline`)
SUFFIX = "_aimet_adaround_qdq.onnx"         # its file beside the other baselines': <model><SUFFIX>


class _Stage(Exception):
    """An AIMET error, with the stage it happened in."""

    def __init__(self, stage: str, error: BaseException):
        super().__init__(str(error))
        self.stage, self.error = stage, error


def _import_failure(e: BaseException) -> dict:
    f = failure(e, "import")
    return {**f, "message": f"aimet_torch is not importable ({f['message']}); install it with `{INSTALL}`"}


def _check_args(calib_images, iterations: int, num_batches: int, batch_size: int) -> None:
    import torch

    if not isinstance(calib_images, torch.Tensor) or calib_images.ndim != 4:
        raise CareQError(f"calib_images must be an NCHW torch.Tensor, got {type(calib_images).__name__}"
                         f"{'' if not hasattr(calib_images, 'shape') else tuple(calib_images.shape)}")
    if iterations < 1 or num_batches < 1 or batch_size < 1:
        raise CareQError(f"iterations, num_batches and batch_size must be positive, got {iterations}, "
                         f"{num_batches}, {batch_size}")
    if num_batches * batch_size > len(calib_images):
        raise CareQError(f"num_batches*batch_size = {num_batches * batch_size} images asked for AdaRound, but "
                         f"calib_images has {len(calib_images)}")


def _config_file() -> str:
    import aimet_torch.common.quantsim_config as qc

    path = Path(qc.__file__).parent / "default_config_per_channel.json"
    if not path.is_file():
        raise CareQError(f"AIMET's per-channel quantsim config is missing: {path}")
    return str(path)


def _run(stage: str, fn, *args, **kwargs):
    # AIMET's loggers write through handlers made at import (not through sys.stderr): mute below ERROR
    logging.disable(logging.WARNING)
    try:
        with quiet():
            return fn(*args, **kwargs)
    except Exception as e:  # AIMET's errors are results
        raise _Stage(stage, e) from e
    finally:
        logging.disable(logging.NOTSET)


def _flow(model, x, work: Path, settings: dict):
    """AdaRound -> quantsim with frozen AdaRound weight encodings -> activation encodings."""
    import torch
    from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters
    from aimet_torch.common.defs import QuantScheme
    from aimet_torch.quantsim import QuantizationSimModel

    scheme = QuantScheme.post_training_tf_enhanced
    dummy = x[:1]
    bs = settings["batch_size"]
    loader = torch.utils.data.DataLoader(x, batch_size=bs, shuffle=False)
    params = AdaroundParameters(data_loader=loader, num_batches=settings["num_batches"],
                                default_num_iterations=settings["iterations"])
    t0 = time.perf_counter()
    ada = _run("adaround", Adaround.apply_adaround, model, dummy, params, path=str(work),
               filename_prefix=ENCODINGS_PREFIX, default_param_bw=8, default_quant_scheme=scheme,
               default_config_file=settings["config_file"])
    settings["adaround_seconds"] = round(time.perf_counter() - t0, 1)
    sim = _run("quantsim", QuantizationSimModel, ada, dummy, quant_scheme=scheme, default_param_bw=8,
               default_output_bw=8, config_file=settings["config_file"])
    _run("quantsim", sim.set_and_freeze_param_encodings, str(work / f"{ENCODINGS_PREFIX}.encodings"))

    def forward(m):
        for i in range(0, len(x), bs):
            m(x[i:i + bs])

    t1 = time.perf_counter()
    _run("compute_encodings", sim.compute_encodings, forward)
    settings["compute_encodings_seconds"] = round(time.perf_counter() - t1, 1)
    return sim


def _export(sim, x, out_dir: Path) -> dict:
    """AIMET's QDQ ONNX (+ AdaRound's encodings JSON) into out_dir, via a temporary folder; then ORT."""
    import aimet_torch.onnx as aimet_onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".aimet_export.{os.getpid()}.", dir=out_dir))
    try:
        _run("export", aimet_onnx.export, sim, (x[:1],), str(tmp / ONNX_NAME), input_names=["input"],
             output_names=["logits"], dynamo=False, opset_version=17)
        for f in tmp.iterdir():
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"path": str(out_dir / ONNX_NAME), "files": sorted(f.name for f in out_dir.iterdir()
                                                                if not f.name.startswith("."))}


def _ort_check(path: Path, sim, x) -> dict:
    """Does onnxruntime load and run AIMET's QDQ file; how close is it to the sim."""
    import onnx
    import onnxruntime as ort
    import torch

    from care_q.quant.qtypes import sqnr_db

    n = min(8, len(x))
    ops = [node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node]
    census = {"quantize_linear": ops.count("QuantizeLinear"), "dequantize_linear": ops.count("DequantizeLinear"),
              "nodes": len(ops)}
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        got = np.concatenate([sess.run(None, {name: x[i:i + 1].numpy()})[0] for i in range(n)])
    except Exception as e:  # a file ORT cannot run is a result
        return {"ort_runs": False, "census": census, "failure": failure(e, "ort")}
    with torch.no_grad():
        ref = sim.model(x[:n]).numpy()
    return {"ort_runs": True, "census": census, "images": n, "sqnr_db_vs_sim": round(sqnr_db(ref, got), 2),
            "agree_vs_sim": float((ref.argmax(1) == got.argmax(1)).mean())}


def _prepared(net):
    from aimet_torch.model_preparer import prepare_model

    return _run("prepare", prepare_model, net)


def aimet_adaround(net, calib_images, out_dir: Path, *, iterations: int, num_batches: int,
                   batch_size: int = 32) -> dict:
    """AIMET AdaRound + int8 quantsim of the FP32 CARE model ``net`` (original form, eval mode).

    Returns {"sim", "seconds", "settings", "notes", "export", "onnx"} or, where AIMET stops,
    {"sim": None, "failure": {...}, "seconds", "settings", "notes"}; ``failure`` is
    `care_q.eval.baselines.failure` plus the stage. Never raises for an AIMET error; raises
    CareQError for bad arguments."""
    import copy

    _check_args(calib_images, iterations, num_batches, batch_size)
    out_dir = Path(out_dir)
    try:
        import aimet_torch
    except Exception as e:  # ImportError, or a broken install raising anything else
        return {"sim": None, "failure": _import_failure(e), "seconds": 0.0, "settings": {}, "notes": []}
    x = calib_images.detach().float().contiguous()
    settings = {"tool": f"aimet-torch {aimet_torch.__version__}", "iterations": int(iterations),
                "num_batches": int(num_batches), "batch_size": int(batch_size),
                "adaround_images": int(num_batches * batch_size), "encoding_images": int(len(x)),
                "weights": "int8 symmetric, per-channel (Conv/Gemm/MatMul) per AIMET's default_config_per_channel",
                "activations": "int8 (AIMET's default asymmetric)", "quant_scheme": "post_training_tf_enhanced",
                "config_file": _config_file()}
    notes: list[str] = []
    res: dict = {"sim": None, "settings": settings, "notes": notes}
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="aimet_adaround."))
    try:
        model = copy.deepcopy(net).eval()
        try:
            sim = _flow(model, x, work, settings)
        except _Stage as e:
            if e.stage not in ("adaround", "quantsim"):
                raise
            res["first_failure"] = failure(e.error, e.stage)
            notes.append(f"on the original model AIMET stopped at {e.stage}: {res['first_failure']['message']};"
                         " retried on aimet_torch.model_preparer.prepare_model(net)")
            settings["model_preparer"] = True
            sim = _flow(_prepared(copy.deepcopy(net).eval()), x, work, settings)
        res["sim"] = sim
        enc = work / f"{ENCODINGS_PREFIX}.encodings"
        if enc.is_file():
            atomic_write_bytes(enc.read_bytes(), out_dir / f"{ENCODINGS_PREFIX}_adaround_param.encodings")
        try:
            res["export"] = _export(sim, x, out_dir)
            res["onnx"] = _ort_check(Path(res["export"]["path"]), sim, x)
        except _Stage as e:
            res["failure"] = failure(e.error, e.stage)
            notes.append("the sim works in torch; AIMET's ONNX export failed")
    except _Stage as e:
        res["failure"] = failure(e.error, e.stage)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


# ----------------------------------------------------------------------------- the bench's baseline


def _in_child(model: str, weights: str | None, x: np.ndarray, out_dir: str, iterations: int, num_batches: int,
              batch_size: int, threads: int) -> dict:
    import torch

    from care_q.models import create_model

    torch.set_num_threads(threads)
    res = aimet_adaround(create_model(model, weights=weights), torch.from_numpy(x), Path(out_dir),
                         iterations=iterations, num_batches=num_batches, batch_size=batch_size)
    res.pop("sim", None)  # a torch module: not picklable, and not needed by the parent
    return res


def aimet_baseline(model: str, weights, x: np.ndarray, path, *, iterations: int, num_batches: int,
                   batch_size: int = 32, threads: int = 2) -> dict:
    """`aimet_adaround` on ``model`` with ``weights`` (the FP32 checkpoint, original form) and the
    calibration images ``x`` (float32 NCHW), in a process of its own (AIMET's loggers, threads and
    memory stay there); its QDQ ONNX moved to ``path``. Returns a record in the shape of
    `care_q.eval.baselines.run_baseline`'s (tool, input, path, ok, seconds, settings, size_bytes,
    census, or failure with its stage: import where aimet-torch is not installed), plus AIMET's
    notes and the ONNX file's agreement with its own sim (``onnx``). Never raises for an AIMET error."""
    from care_q.eval.census import artifact_census
    from care_q.utils.timing import run_isolated

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".aimet_work.", dir=path.parent))
    rec: dict = {"tool": "aimet-torch", "input": f"{model} ({Path(weights).name if weights else 'random weights'})",
                 "path": None, "ok": False}
    try:
        r = run_isolated(_in_child, model, weights and str(weights), np.ascontiguousarray(x, dtype=np.float32), str(work),
                         int(iterations), int(num_batches), int(batch_size), int(threads), what="AIMET AdaRound")
        rec.update(tool=r["settings"].get("tool", rec["tool"]), seconds=r["seconds"], settings=r["settings"],
                   notes=r["notes"], onnx=r.get("onnx"))
        if "failure" in r:
            rec["failure"] = r["failure"]
            return rec
        os.replace(work / ONNX_NAME, path)
    except CareQError as e:  # the child died or raised outside AIMET's stages
        rec["failure"] = failure(e, "run")
        return rec
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rec.update(path=str(path), size_bytes=path.stat().st_size)
    try:  # loads it in onnxruntime (does not run it)
        rec["census"] = artifact_census(path)
    except CareQError as e:
        rec["failure"] = failure(e, "load")
        return rec
    rec["ok"] = True
    return rec
