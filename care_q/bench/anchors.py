"""Anchors of the latency section: what int8 gives on this CPU, outside care-q (issue 21).

Plain CNNs (torchvision MobileNetV2 and ResNet-18, random weights: built with ``weights=None``,
nothing downloaded) go through the generic tools, each int8 file next to its own FP32:

- TFLite: ``litert_torch.convert`` (FP32) and litert-torch's PT2E route (int8: ``PT2EQuantizer``
  with its symmetric per-channel static config, ``torchao.quantization.pt2e`` prepare /
  calibrate / convert, then ``litert_torch.convert`` with the quantizer);
- ONNX: ``torch.onnx.export`` (FP32, batch 1) and onnxruntime ``quantize_static`` with its default
  types (uint8 activations, int8 per-channel weights, QDQ, MinMax; `onnx_ort_int8`).

``care_s0_backbone``: care_s0's deploy form without its head (`DeployCARE.forward_features`;
litert-torch's PT2E conversion fails with the head), trained-like random weights, TFLite only: the
int8 that a generic tool gets from CARE, against its own FP32.

Calibration: ``num_calib`` seeded standard-normal images (latency does not depend on the values).
A route that fails is a result (its ``failure``), not a crash: the other anchors go on.

    built = build_anchor("resnet18", out_dir, img_size=224, num_calib=8, seed=0)
    built["artifacts"]   # file name -> {"path", "source": "fp32" | "int8", "anchor", "route"}
"""

from __future__ import annotations

import contextlib
import io
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from care_q.errors import CareQError
from care_q.eval.baselines import failure
from care_q.graph.ops import FloatOps
from care_q.models import create_model, randomize_like_trained
from care_q.runtime import capture_stderr, load_runner
from care_q.transforms import deploy
from care_q.utils.io import atomic_path

# name -> (label, routes)
ANCHORS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mobilenet_v2": ("torchvision MobileNetV2", ("tflite", "onnx")),
    "resnet18": ("torchvision ResNet-18", ("tflite", "onnx")),
    "care_s0_backbone": ("care_s0 backbone (no head)", ("tflite",)),
}
ROUTES = {"tflite": ("litert-torch FP32", "litert-torch PT2E int8"),
          "onnx": ("torch.onnx FP32", "onnxruntime quantize_static QDQ int8")}


class Backbone(nn.Module):
    """A CARE deploy form up to its last stage's feature map (no pool, no head)."""

    def __init__(self, deploy_model: nn.Module):
        super().__init__()
        self.net = deploy_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x, FloatOps())


def anchor_model(name: str, seed: int = 0) -> nn.Module:
    """The FP32 module of an anchor, in eval mode (random weights from ``seed``)."""
    torch.manual_seed(seed)
    if name in ("mobilenet_v2", "resnet18"):
        import torchvision

        return getattr(torchvision.models, name)(weights=None).eval()
    if name.endswith("_backbone"):
        model = name.removesuffix("_backbone")
        return Backbone(deploy(randomize_like_trained(create_model(model), seed))).eval()
    raise CareQError(f"unknown anchor '{name}'; known: {list(ANCHORS)}")


def calibration_inputs(num: int, img_size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((num, 3, img_size, img_size)).astype(np.float32)


@contextlib.contextmanager
def _quiet():
    """The converters' chatter (stdout, warnings, native logging) kept off the console."""
    old = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), capture_stderr():
            warnings.simplefilter("ignore")
            yield
    finally:
        if old is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = old


def tflite_fp32(net: nn.Module, x: np.ndarray, path: Path) -> dict:
    import litert_torch

    with atomic_path(path) as tmp, _quiet():
        litert_torch.convert(net, (torch.from_numpy(x[:1]),)).export(str(tmp))
    return {"tool": f"litert-torch {litert_torch.__version__}"}


def tflite_pt2e_int8(net: nn.Module, x: np.ndarray, path: Path) -> dict:
    """litert-torch's PT2E route: symmetric per-channel static int8, calibrated on ``x``."""
    import litert_torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    sample = (torch.from_numpy(x[:1]),)
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    with atomic_path(path) as tmp, _quiet():
        prepared = prepare_pt2e(torch.export.export(net, sample).module(), quantizer)
        with torch.no_grad():
            for i in range(len(x)):
                prepared(torch.from_numpy(x[i:i + 1]))
        converted = convert_pt2e(prepared, fold_quantize=False)
        litert_torch.convert(converted, sample, quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(str(tmp))
    return {"tool": f"litert-torch {litert_torch.__version__} PT2E", "config": "symmetric, per-channel, static",
            "images": int(len(x))}


def onnx_fp32(net: nn.Module, x: np.ndarray, path: Path) -> dict:
    with atomic_path(path) as tmp, _quiet():
        prog = torch.onnx.export(net, (torch.from_numpy(x[:1]),), None, input_names=["input"], output_names=["logits"],
                                 opset_version=18, dynamo=True, verbose=False)
        prog.save(str(tmp), external_data=False)
    return {"tool": f"torch.onnx {torch.__version__} (dynamo)", "opset": 18}


def onnx_ort_int8(fp32_path: Path, x: np.ndarray, path: Path) -> dict:
    """onnxruntime ``quantize_static`` with its default types (uint8 activations, int8 weights: the
    u8s8 kernels of x86), per-channel weights, QDQ, MinMax. (The ``ort_quantize_static`` baseline's
    int8 activations run onnxruntime's s8s8 path, which measured 0.68-0.76x of FP32 on ResNet-18
    here against 0.23-0.25x for u8s8; issue 21.)"""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def get_next(self):
            self.i += 1
            return {name: x[self.i - 1:self.i]} if self.i <= len(x) else None

    reader = Reader()
    with atomic_path(path) as tmp, _quiet():
        quantize_static(str(fp32_path), str(tmp), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    return {"tool": "onnxruntime quantize_static", "quant_format": "QDQ", "per_channel": True,
            "activation_type": "QUInt8", "weight_type": "QInt8", "calibrate_method": "MinMax", "images": int(len(x))}



def export_route(name: str, route: str, net: nn.Module, x: np.ndarray, out_dir: Path) -> tuple[dict, dict]:
    """One anchor's FP32 and int8 files of one runtime: (file -> entry, stage -> failure)."""
    ext = {"tflite": "tflite", "onnx": "onnx"}[route]
    fp32 = out_dir / f"anchor_{name}_fp32.{ext}"
    int8 = out_dir / f"anchor_{name}_int8_{'pt2e' if route == 'tflite' else 'ort_qdq'}.{ext}"
    made, failed = {}, {}
    steps = ((fp32, "fp32", lambda: (tflite_fp32 if route == "tflite" else onnx_fp32)(net, x, fp32)),
             (int8, "int8", lambda: tflite_pt2e_int8(net, x, int8) if route == "tflite" else onnx_ort_int8(fp32, x, int8)))
    for path, source, make in steps:
        if source == "int8" and route == "onnx" and fp32.name not in made:
            continue  # quantize_static needs the FP32 ONNX
        t0 = time.perf_counter()
        try:
            settings = make()
            load_runner(path, threads=1)
        except Exception as e:  # a tool's failure is a result
            failed[path.name] = failure(e, f"{ROUTES[route][source == 'int8']}")
            continue
        made[path.name] = {"path": str(path), "source": source, "anchor": name, "route": route,
                           "tool": ROUTES[route][source == "int8"], "settings": settings,
                           "size_bytes": path.stat().st_size, "seconds": round(time.perf_counter() - t0, 1)}
    return made, failed


def build_anchor(name: str, out_dir, *, img_size: int = 224, num_calib: int = 8, seed: int = 0,
                 routes: tuple[str, ...] | None = None) -> dict:
    """An anchor's FP32 and int8 files in ``out_dir`` (see the module docstring)."""
    if name not in ANCHORS:
        raise CareQError(f"unknown anchor '{name}'; known: {list(ANCHORS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    net = anchor_model(name, seed)
    x = calibration_inputs(num_calib, img_size, seed)
    res = {"anchor": name, "label": ANCHORS[name][0], "img_size": img_size, "calib": f"{num_calib} N(0,1) images",
           "artifacts": {}, "failures": {}}
    for route in routes or ANCHORS[name][1]:
        made, failed = export_route(name, route, net, x, out_dir)
        res["artifacts"].update(made)
        res["failures"].update(failed)
    return res
