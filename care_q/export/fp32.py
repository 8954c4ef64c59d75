"""FP32 export of the deploy form to ONNX and TFLite, each artifact verified in its runtime.

    results = export_fp32(model, "out", "care_s0", img_size=224)
    results["ok"], results["artifacts"]["tflite"]["verify"]["rel_diff"]

ONNX: ``torch.onnx.export(dynamo=True)`` (the torch.export-based exporter), opset 18, dynamic
batch, input ``input``, output ``logits``, one self-contained file, checked by
``onnx.checker``. The TorchScript exporter (``dynamo=False``) cannot export the deploy form
with a dynamic batch (the head's ``layer_norm`` takes its normalised shape from the
tensor, which it then refuses as "not constant"), so it is only a fallback, at batch 1.
TFLite: ``litert_torch.convert(deploy_model, (sample,))``, batch 1, NCHW input as in PyTorch.

Both files are written atomically to ``DIR/<name>_fp32.{onnx,tflite}``, then run through
`care_q.runtime` (onnxruntime; the TFLite interpreter with XNNPACK) and compared with the
PyTorch deploy form on the same inputs.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from care_q.errors import CareQError
from care_q.models.care import CARE
from care_q.runtime import capture_stderr, load_runner, onnx_op_census, tflite_op_census
from care_q.transforms.deploy import DeployCARE, deploy
from care_q.utils.io import atomic_path

FORMATS = ("onnx", "tflite")
ONNX_OPSET = 18
SUFFIX = {"onnx": ".onnx", "tflite": ".tflite"}

# Agreement thresholds for an FP32 artifact against the PyTorch deploy form.
# - REL_TOL bounds max|y_runtime - y_torch| / max|y_torch| over all logits of all samples. An
#   FP32 artifact differs from PyTorch only by float32 round-off: other summation orders,
#   XNNPACK's GELU/EXP approximations, fused kernels. Over ~100 layers that stays around
#   1e-6..1e-5 of the logit scale (measured: ~1e-7 for care_s0); a conversion bug (a wrong
#   layout, a dropped op, a wrong constant) moves logits by a large fraction of their scale.
#   1e-3 sits orders of magnitude from both.
# - TOP1_AGREEMENT: the predicted class must be the same for every sample. A flip is excused
#   only as a tie, when PyTorch's own top-2 margin is within 2x the max abs difference (both
#   classes are then equal up to round-off); ties are counted and reported.
REL_TOL = 1e-3
TOP1_AGREEMENT = 1.0

_MACS_RE = re.compile(r"equivalently ([\d.]+) M\s+MACs")

Progress = Callable[[str], None]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # terminal colour codes in exporter messages


def _to_deploy(model: nn.Module) -> nn.Module:

    if isinstance(model, CARE):
        return deploy(model).eval()
    if isinstance(model, DeployCARE):
        return model.eval()
    raise CareQError(f"export_fp32 takes a care_q CARE or DeployCARE model, got {type(model).__name__}")


def random_samples(n: int, img_size: int, seed: int = 0) -> np.ndarray:
    """n seeded standard-normal NCHW inputs (the scale of normalised images)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, img_size, img_size, generator=g).numpy()


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' console chatter (stdout, Python warnings, native logging on fd 2).

    Yields a one-element list that holds the captured native log after the block.
    """
    buf = io.StringIO()
    old = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"  # litert-torch's own progress lines
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), capture_stderr() as log:
            warnings.simplefilter("ignore")
            yield log
    finally:
        if old is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = old


# ----------------------------------------------------------------------------- exporters


def export_onnx(model: nn.Module, path: str | Path, img_size: int, dynamic_batch: bool = True,
                opset: int = ONNX_OPSET) -> dict:
    """Export the deploy form to one ONNX file (atomic) and check it; returns export facts."""
    import onnx

    d = _to_deploy(model)
    path = Path(path)
    # torch.export specialises a batch of 1 to a constant; trace with 2 for a dynamic batch.
    sample = torch.zeros(2 if dynamic_batch else 1, 3, img_size, img_size)
    exporter = "dynamo"
    with atomic_path(path) as tmp:
        try:
            with _quiet():
                shapes = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic_batch else None
                prog = torch.onnx.export(d, (sample,), None, input_names=["input"],
                                         output_names=["logits"], opset_version=opset, dynamo=True,
                                         dynamic_shapes=shapes, verbose=False)
                prog.save(str(tmp), external_data=False)
        except Exception as e:  # fall back to the TorchScript exporter at a fixed batch of 1
            text = _ANSI.sub("", str(e)).strip()  # torch.export colours its messages
            first = text.splitlines()[0] if text else type(e).__name__
            exporter = f"torchscript (dynamo failed: {first[:200]})"
            dynamic_batch = False
            try:
                with _quiet():
                    torch.onnx.export(d, (sample[:1],), str(tmp), input_names=["input"],
                                      output_names=["logits"], opset_version=max(opset, 17),
                                      dynamo=False)
            except Exception as e2:
                raise CareQError(f"ONNX export of {path.name} failed with both exporters: "
                                 f"dynamo: {first[:200]}; torchscript: "
                                 f"{_ANSI.sub('', str(e2)).strip().splitlines()[0][:200]}"
                                 ) from None
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as e:
            raise CareQError(f"ONNX export of {path.name} is not a valid model: {e}") from None
    return {"exporter": exporter, "opset": opset, "dynamic_batch": dynamic_batch}


def export_tflite(model: nn.Module, path: str | Path, img_size: int) -> dict:
    """Convert the deploy form with litert-torch to one .tflite file (atomic)."""
    d = _to_deploy(model)
    path = Path(path)
    sample = torch.zeros(1, 3, img_size, img_size)
    log: list[str] = []
    with atomic_path(path) as tmp:
        try:
            with _quiet() as log:
                import litert_torch

                edge = litert_torch.convert(d, (sample,))
                edge.export(str(tmp))
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            native = [ln for ln in (log[0] if log else "").splitlines() if "rror" in ln]
            hint = f" ({native[-1].strip()[:300]})" if native else ""
            raise CareQError(f"TFLite conversion of {path.name} failed: {msg[:300]}{hint}") from None
    m = _MACS_RE.search(log[0] if log else "")
    return {"exporter": f"litert-torch {litert_torch.__version__}",
            "converter_macs": float(m.group(1)) * 1e6 if m else None}


EXPORTERS = {"onnx": export_onnx, "tflite": export_tflite}


# ----------------------------------------------------------------------------- verification


def compare_logits(ref: np.ndarray, got: np.ndarray) -> dict:
    """Agreement of artifact logits ``got`` with reference logits ``ref`` (both (N, classes))."""
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64)
    if ref.shape != got.shape:
        raise CareQError(f"artifact output shape {got.shape} differs from PyTorch's {ref.shape}")
    diff = float(np.abs(got - ref).max())
    scale = float(np.abs(ref).max())
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    top_ref, top_got = ref.argmax(1), got.argmax(1)
    flips = np.nonzero(top_ref != top_got)[0]
    srt = np.sort(ref, axis=1)
    margin = srt[:, -1] - srt[:, -2] if ref.shape[1] > 1 else np.full(len(ref), np.inf)
    ties = int(sum(margin[i] <= 2 * diff for i in flips))
    agreement = float((top_ref == top_got).mean())
    ok = rel <= REL_TOL and (agreement >= TOP1_AGREEMENT or len(flips) == ties)
    return {"samples": int(len(ref)), "max_abs_diff": diff, "logit_scale": scale, "rel_diff": rel,
            "top1_agreement": agreement, "top1_ties": ties, "ok": bool(ok)}


def verify_artifact(path: str | Path, model: nn.Module, samples: np.ndarray, threads: int = 2,
                    tflite_delegate: str = "xnnpack", runner=None, ref: np.ndarray | None = None) -> dict:
    """Run ``path`` in its runtime on ``samples`` (float32 NCHW) and compare with the PyTorch
    deploy form (or with ``ref``, its logits on ``samples`` when already computed)."""
    samples = np.asarray(samples, np.float32)
    if ref is None:
        with torch.no_grad():
            ref = _to_deploy(model)(torch.from_numpy(samples)).numpy()
    runner = runner or load_runner(path, threads=threads, tflite_delegate=tflite_delegate)
    res = compare_logits(ref, runner(samples))
    res["runtime"] = "onnxruntime" if runner.kind == "onnx" else f"tflite ({tflite_delegate})"
    return res


def _check_samples(samples, img_size: int) -> np.ndarray:
    x = samples.detach().cpu().numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples)
    x = x.astype(np.float32, copy=False)
    if x.ndim != 4 or x.shape[1:] != (3, img_size, img_size) or x.shape[0] == 0:
        raise CareQError(f"verification samples must be a float NCHW batch (N, 3, {img_size}, "
                         f"{img_size}), got shape {tuple(x.shape)}")
    return x


# ----------------------------------------------------------------------------- front door


def artifact_path(out_dir: str | Path, name: str, fmt: str) -> Path:
    return Path(out_dir) / f"{name}_fp32{SUFFIX[fmt]}"


def export_fp32(model: nn.Module, out_dir: str | Path, name: str, img_size: int,
                formats=FORMATS, verify: bool = True, samples=None, *, num_samples: int = 8,
                threads: int = 2, dynamic_batch: bool = True, progress: Progress | None = None) -> dict:
    """Export ``model`` (CARE or DeployCARE; always as the deploy form) to FP32 artifacts.

    Returns ``{"name", "img_size", "ok", "problems": [...], "artifacts": {fmt: {...}}}`` where
    each artifact has ``path``, ``size_bytes``, ``size_mb``, ``seconds`` (conversion),
    ``op_census``, exporter facts, ``verify`` (see `compare_logits`; None if not verified) and
    for TFLite ``delegate_info`` and ``xnnpack_partitions``. Disagreement does not raise: it
    sets ``ok`` False and explains itself in ``problems``.
    """
    formats = tuple(formats)
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise CareQError(f"unknown export format(s) {bad or formats}; choose from {list(FORMATS)}")
    if img_size < 32 or img_size % 32:
        raise CareQError(f"img_size must be a positive multiple of 32 (4x stem, 3 downsamples), "
                         f"got {img_size}")
    d = _to_deploy(model)
    say = progress or (lambda msg: None)
    ref = None
    if verify:
        samples = _check_samples(samples, img_size) if samples is not None \
            else random_samples(num_samples, img_size)
        with torch.no_grad():
            ref = d(torch.from_numpy(samples)).numpy()
    results = {"name": name, "img_size": img_size, "artifacts": {}, "problems": []}
    for fmt in formats:
        path = artifact_path(out_dir, name, fmt)
        say(f"{fmt}: converting to {path.name}")
        t0 = time.perf_counter()
        kw = {"dynamic_batch": dynamic_batch} if fmt == "onnx" else {}
        art = {"format": fmt, "path": str(path), **EXPORTERS[fmt](d, path, img_size, **kw)}
        art["seconds"] = time.perf_counter() - t0
        art["size_bytes"] = path.stat().st_size
        art["size_mb"] = art["size_bytes"] / 1e6
        art["op_census"] = onnx_op_census(path) if fmt == "onnx" else tflite_op_census(path)
        art["verify"] = None
        runner = None
        if fmt == "tflite" or verify:
            runner = load_runner(path, threads=threads)
        if fmt == "tflite":
            art["delegate_info"] = runner.delegate_info
            art["xnnpack_partitions"] = runner.delegate_info["partitions"]
        if verify:
            say(f"{fmt}: verifying on {len(samples)} inputs")
            v = verify_artifact(path, d, samples, threads=threads, runner=runner, ref=ref)
            art["verify"] = v
            if not v["ok"]:
                results["problems"].append(
                    f"{path.name} disagrees with PyTorch: rel diff {v['rel_diff']:.2e} (limit "
                    f"{REL_TOL:.0e}), top-1 agreement {v['top1_agreement']:.1%} ({v['top1_ties']} "
                    f"tie(s) within round-off)")
        results["artifacts"][fmt] = art
        say(f"{fmt}: done in {art['seconds']:.1f} s")
    results["ok"] = not results["problems"]
    return results
