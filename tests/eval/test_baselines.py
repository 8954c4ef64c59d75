"""Baselines runner on care_test at 32x32 with a few calibration images: onnxruntime
quantize_static end to end; NNCF recorded whatever it does; failures recorded, never raised."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from care_q.errors import CareQError

SIZE = 32
SLOW = os.environ.get("CARE_Q_SLOW_TESTS") == "1"


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    torch.set_num_threads(1)
    from care_q import create_model
    from care_q.transforms import deploy

    root = tmp_path_factory.mktemp("baselines")
    torch.manual_seed(0)
    net = create_model("care_test", num_classes=10)
    # The TorchScript exporter at batch 1: ~2 s, where care_q.export.fp32.export_onnx (torch.export,
    # dynamic batch) takes ~15 s on 2 cores. Which exporter made the FP32 model is not under test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(deploy(net), (torch.zeros(1, 3, SIZE, SIZE),), str(root / "t_fp32.onnx"),
                          input_names=["input"], output_names=["logits"], opset_version=17, dynamo=False)
    x = torch.randn(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)).numpy()
    return {"root": root, "net": net, "onnx": root / "t_fp32.onnx", "x": x}


def test_ort_quantize_static(fp32):
    from care_q.eval.baselines import run_baselines
    from care_q.quant.qtypes import sqnr_db
    from care_q.runtime import load_runner

    out = fp32["root"] / "bl"
    res = run_baselines(fp32["onnx"], None, fp32["x"][:4], out, names=["ort_quantize_static", "ai_edge_quantizer"],
                        prefix="t", threads=1)
    r = res["ort_quantize_static"]
    assert r["ok"], r.get("failure")
    assert r["path"] == str(out / "t_ort_qdq.onnx") and r["tool"].startswith("onnxruntime ")
    assert r["settings"]["per_channel"] and r["settings"]["calibrate_method"] == "MinMax" and r["settings"]["images"] == 4
    c = r["census"]
    assert c["quantize"] > 10 and c["dequantize"] > c["quantize"]           # QDQ on activations and weights
    assert c["integer_kernels"] > 0                                         # onnxruntime fused some into QLinear*
    # it computes roughly what FP32 computes on held-out inputs
    x = fp32["x"][4:]
    got = load_runner(r["path"], threads=1)(x)
    with torch.no_grad():
        ref = fp32["net"](torch.from_numpy(x)).numpy()
    assert sqnr_db(ref, got) > 10.0
    # no FP32 .tflite given: ai-edge-quantizer is a recorded failure, not an exception
    a = res["ai_edge_quantizer"]
    assert not a["ok"] and a["failure"]["stage"] == "input" and "no FP32 .tflite" in a["failure"]["message"]


def test_tool_errors_are_recorded(fp32, tmp_path):
    from care_q.eval.baselines import run_baselines

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07garbage")
    res = run_baselines(junk, None, fp32["x"][:2], tmp_path / "o", names=["ort_quantize_static"], prefix="j")
    f = res["ort_quantize_static"]["failure"]
    assert f["stage"] == "quantize" and f["exception"] and f["message"].startswith(f["exception"] + ":")
    assert "\n" not in f["message"]
    with pytest.raises(CareQError, match=r"unknown baseline\(s\) \['tensorrt'\]"):
        run_baselines(junk, None, fp32["x"], tmp_path / "o", names=["tensorrt"])
    with pytest.raises(CareQError, match="non-empty float NCHW"):
        run_baselines(junk, None, np.zeros((0, 3, SIZE, SIZE), np.float32), tmp_path / "o")


def test_nncf_quantizes_care(fp32):
    """NNCF 3.4's transformer default (mixed preset) stops on CARE's concat scale groups; the
    runner falls back to the performance preset and says so: a loadable QDQ model either way."""
    from care_q.eval.baselines import run_baselines

    r = run_baselines(fp32["onnx"], None, fp32["x"][:4], fp32["root"] / "nncf", names=["nncf"], prefix="t")["nncf"]
    assert r["ok"], r.get("failure")
    assert r["census"]["quantize"] > 0 and r["settings"]["model_type"] == "TRANSFORMER"
    if r["settings"]["preset"] == "performance":
        assert "unified scale group" in r["settings"]["note"]
    else:
        assert r["settings"]["preset"] == "default (mixed)"


@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="ai-edge-quantizer needs the litert-torch FP32 .tflite export (~25 s on 2 "
                                     "cores); set CARE_Q_SLOW_TESTS=1 to run it")
def test_ai_edge_quantizer(fp32):
    from care_q.eval.baselines import run_baselines
    from care_q.export.fp32 import export_tflite

    tfl = fp32["root"] / "t_fp32.tflite"
    export_tflite(fp32["net"], tfl, SIZE)
    r = run_baselines(None, tfl, fp32["x"][:4], fp32["root"] / "aeq", names=["ai_edge_quantizer"], prefix="t")
    r = r["ai_edge_quantizer"]
    assert r["ok"], r.get("failure")
    assert r["census"]["quantize"] > 0 and r["census"]["xnnpack"]["partitions"] >= 1
