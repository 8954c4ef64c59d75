"""FP32 baselines for the latency comparison: exported in a background process, reused only
for the same weights, model and resolution."""

from __future__ import annotations

import json

import onnxruntime as ort
import torch

from care_q import create_model
from care_q.export.fp32_baselines import FP32Baselines


def _net(seed):
    torch.manual_seed(seed)
    return create_model("care_test", num_classes=10).eval()


def test_exported_in_background_and_reused_only_for_the_same_model(tmp_path):
    net = _net(0)
    with FP32Baselines(net, tmp_path, "care_test", 32, ["onnx"]) as b:
        assert b._proc is not None and b._proc.pid != __import__("os").getpid()  # another process
        paths = b.wait()
    onnx_path = paths["onnx"]
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(x).numpy()
    got = sess.run(None, {"input": x.numpy()})[0]
    assert abs(got - ref).max() < 1e-4 * abs(ref).max()  # the FP32 model of these weights
    key = json.loads((tmp_path / "care_test_fp32.key.json").read_text())
    assert key["img_size"] == 32 and key["model"] == "care_test"
    # the same weights again: reused, nothing started
    again = FP32Baselines(_net(0), tmp_path, "care_test", 32, ["onnx"]).start()
    assert again._proc is None and again.wait() == paths
    # other weights, or another resolution: exported again (never a stale baseline)
    for other in (FP32Baselines(_net(1), tmp_path, "care_test", 32, ["onnx"]),
                  FP32Baselines(_net(0), tmp_path, "care_test", 48, ["onnx"])):
        other.start()
        assert other._proc is not None
        other.cancel()
        assert not (tmp_path / "care_test_fp32.key.json").exists()  # no key until the files are complete
