"""Emit, verify and census int8 artifacts: one registry of targets, used by `care-q ptq` and `care-q qat`.

Each `Target` names its file, its exporter and its *reference*: the fake-quant model computing
the integer arithmetic of the artifact's runtime (XNNPACK's / TFLite's int8 kernels for .tflite;
onnxruntime's integer kernels on the stored codes for .onnx), so that a correct artifact agrees
with it image for image. A new target is one entry in `TARGETS`.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from care_q.census import check
from care_q.errors import CareQError
from care_q.export.onnx_qdq import emit_onnx_qdq, save_onnx
from care_q.export.tflite_int8 import emit_tflite_int8
from care_q.pipeline.config import ExportConfig
from care_q.pipeline.fidelity import fidelity, reference_logits
from care_q.quant.fakequant import QuantOps
from care_q.quant.plan import QuantPlan
from care_q.quant.recipe import Recipe
from care_q.runtime import load_runner
from care_q.utils.io import atomic_path
from care_q.utils.progress import stage

X86_MACHINES = ("x86_64", "amd64", "i386", "i686")  # platform.machine() of CPUs running MLAS's AVX2 Add


def _emit_tflite(plan: QuantPlan, io: str, path: Path, preprocess, model_name: str) -> None:
    data = emit_tflite_int8(plan, io=io, preprocess=preprocess, model_name=model_name)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _emit_onnx(plan: QuantPlan, io: str, path: Path, preprocess, model_name: str) -> None:
    save_onnx(emit_onnx_qdq(plan, io=io), path)


def _tflite_reference(plan: QuantPlan, metadata: dict) -> QuantOps:
    return QuantOps(plan, "quant", exact="xnnpack")


def _onnx_reference(plan: QuantPlan, metadata: dict) -> QuantOps:
    # int8 grids are stored as uint8 (offset 128) unless the file's act_type says int8
    offset = 0 if metadata.get("care_q.act_type") == "int8" else 128
    return QuantOps(plan, "quant", exact="onnxruntime", ort_act_offset=offset)


def _onnx_note() -> str | None:
    if platform.machine().lower() in X86_MACHINES:
        return None
    return (f"the ONNX reference computes onnxruntime's x86 int8 Add; on {platform.machine()} onnxruntime's own "
            f"kernel may round rare elements differently")


@dataclass(frozen=True)
class Target:
    """An artifact kind: its file name, exporter, runtime reference and caveat."""

    name: str
    file_suffix: str                                           # <stem><file_suffix>
    emit: Callable[[QuantPlan, str, Path, object, str], None]  # (plan, io, path, preprocess, model name)
    reference: Callable[[QuantPlan, dict], QuantOps]           # (plan, runner metadata) -> exact reference
    note: Callable[[], str | None] = lambda: None              # a caveat of the reference on this machine

    def filename(self, stem: str) -> str:
        return f"{stem}{self.file_suffix}"


TARGETS: dict[str, Target] = {
    "tflite": Target("tflite", ".tflite", _emit_tflite, _tflite_reference),
    "onnx": Target("onnx", "_qdq.onnx", _emit_onnx, _onnx_reference, _onnx_note),
}


def target(name: str) -> Target:
    if name not in TARGETS:
        raise CareQError(f"unknown target '{name}'; choose from {list(TARGETS)}")
    return TARGETS[name]


def resolve_targets(rec: Recipe, targets, io: str | None) -> tuple[tuple[str, ...], str]:
    """(targets, io) of a run: the recipe's unless given; a CareQError when the recipe cannot honour them."""
    targets = tuple(rec.targets if targets is None else targets)
    bad = [t for t in targets if t not in rec.targets]
    if bad:
        raise CareQError(f"recipe '{rec.name}' cannot honour target(s) {bad}: it supports {list(rec.targets)}")
    io = io or rec.io
    if io not in ("float", "int8"):
        raise CareQError(f"--io {io}: supported are float and int8")
    if io != rec.io and rec.io != "float":
        raise CareQError(f"recipe '{rec.name}' requires io={rec.io}; --io {io} contradicts it")
    return targets, io


def emit(name: str, plan: QuantPlan, io: str, path: str | Path, preprocess=None, model_name: str = "care") -> Path:
    """Write the artifact of target ``name`` for ``plan`` to ``path`` (atomically)."""
    path = Path(path)
    target(name).emit(plan, io, path, preprocess, model_name)
    return path


def verify(path: str | Path, model, plan: QuantPlan, x: np.ndarray, threads: int,
           fp32_logits: np.ndarray | None = None) -> dict:
    """Run the artifact on ``x`` in its runtime and compare with its exact fake-quant reference;
    with ``fp32_logits``, also the artifact against FP32 (``vs_fp32``)."""
    runner = load_runner(path, threads=threads)
    t = target(runner.kind)
    ref = reference_logits(model, t.reference(plan, runner.metadata), x)
    got = runner(x)
    res = {"images": int(x.shape[0]), **fidelity(ref, got), "max_abs_diff": float(np.abs(got - ref).max())}
    if fp32_logits is not None:
        res["vs_fp32"] = fidelity(fp32_logits, got)
    info = getattr(runner, "delegate_info", None)
    if info:
        res["delegate"] = info
    note = t.note()
    if note:
        res["note"] = note
    return res


def census(path: str | Path) -> list[str]:
    """What runs where (XNNPACK / NNAPI / Edge TPU, or onnxruntime's integer kernels): summary lines."""
    try:
        return check(path, targets=("all",), runtime=False).summary_lines()
    except CareQError as e:
        return [f"census failed: {e}"]


def export_artifacts(plan: QuantPlan, model, cfg: ExportConfig, x_verify: torch.Tensor, *, preprocess=None,
                     model_name: str = "care", fp32_logits: np.ndarray | None = None, log=None) -> dict:
    """Emit, verify and census every target of ``cfg``: {target: {"path", "size_bytes", "verification",
    "census", "seconds"}}. ``model`` is the deploy form ``plan`` was made on."""
    artifacts = {}
    for name in cfg.targets:
        path = Path(cfg.out) / target(name).filename(cfg.stem)
        t0 = time.time()
        with stage(f"{name}: writing {path.name}", cfg.progress):
            emit(name, plan, cfg.io, path, preprocess=preprocess, model_name=model_name)
        with stage(f"{name}: verifying against the fake-quant reference on {len(x_verify)} images", cfg.progress):
            v = verify(path, model, plan, x_verify.numpy(), cfg.threads, fp32_logits)
        artifacts[name] = {"path": str(path), "size_bytes": path.stat().st_size, "verification": v,
                           "census": census(path), "seconds": round(time.time() - t0, 1)}
        if log is not None:
            log(f"{name}: {path} ({path.stat().st_size / 1e6:.2f} MB), top-1 agreement with the fake-quant model "
                f"{100 * v['top1_agreement']:.1f}% on {v['images']} images")
    return artifacts


def agreement_failure(artifacts: dict, min_agreement: float, report: Path) -> str | None:
    """The error message when an artifact agrees with its reference on fewer than ``min_agreement``."""
    failed = {t: a["verification"]["top1_agreement"] for t, a in artifacts.items()
              if a["verification"]["top1_agreement"] < min_agreement}
    if not failed:
        return None
    return ("artifact(s) disagree with the fake-quant reference: "
            + ", ".join(f"{t} {100 * v:.1f}% top-1 agreement" for t, v in failed.items())
            + f" (< {100 * min_agreement:.1f}%); see {report}")
