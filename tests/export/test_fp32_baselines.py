"""FP32 baselines of the latency comparison: reused only for the same weights, model and size."""

from __future__ import annotations

import json

import onnxruntime as ort
import torch

from care_q import create_model
from care_q.export import fp32_baselines as fb


def _net(seed):
    torch.manual_seed(seed)
    return create_model("care_test", num_classes=10).eval()


def test_reused_only_for_the_same_model(tmp_path, monkeypatch):
    net = _net(0)
    paths = fb.fp32_baselines(net, tmp_path, "care_test", 32, ["onnx"])
    sess = ort.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape == [1, 3, 32, 32]  # a fixed batch of 1, what the latency runs use
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(x).numpy()
    got = sess.run(None, {"input": x.numpy()})[0]
    assert abs(got - ref).max() < 1e-4 * abs(ref).max()  # the FP32 model of these weights
    key = json.loads((tmp_path / "care_test_fp32.key.json").read_text())
    assert key["img_size"] == 32 and key["model"] == "care_test" and key["targets"] == ["onnx"]

    exported = []
    monkeypatch.setattr("care_q.export.fp32.EXPORTERS",
                        {"onnx": lambda n, p, s, **kw: exported.append((p.name, s)) or p.touch()})
    assert fb.fp32_baselines(_net(0), tmp_path, "care_test", 32, ["onnx"]) == paths
    assert exported == []  # the same weights and size: reused
    fb.fp32_baselines(_net(1), tmp_path, "care_test", 32, ["onnx"])  # other weights
    fb.fp32_baselines(_net(1), tmp_path, "care_test", 48, ["onnx"])  # another size
    assert exported == [("care_test_fp32.onnx", 32), ("care_test_fp32.onnx", 48)]
    assert json.loads((tmp_path / "care_test_fp32.key.json").read_text())["img_size"] == 48


def test_both_targets_exported_side_by_side(tmp_path):
    # ONNX in a child process while TFLite converts here: both files are the FP32 model, the key
    # lists both, the child's temporary model file is gone
    import tempfile
    from pathlib import Path

    from care_q.runtime import load_runner

    before = set(Path(tempfile.gettempdir()).glob(".care-q-fp32-*"))
    net = _net(2)
    paths = fb.fp32_baselines(net, tmp_path, "care_test", 32, ["onnx", "tflite"])
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = net(x).numpy()
    for t in ("onnx", "tflite"):
        got = load_runner(paths[t], threads=1)(x.numpy())
        assert abs(got - ref).max() < 1e-4 * abs(ref).max(), t
    assert json.loads((tmp_path / "care_test_fp32.key.json").read_text())["targets"] == ["onnx", "tflite"]
    assert set(Path(tempfile.gettempdir()).glob(".care-q-fp32-*")) == before


def test_onnx_child_failure_names_the_file_and_cleans_up(tmp_path):
    """The side-by-side ONNX export's child fails (an input size no conv can take): wait() raises a
    CareQError naming the file and the child's last error line; its temporary model file is gone.
    kill() (the TFLite conversion failed) leaves nothing either, and no file under the final name."""
    from pathlib import Path

    import pytest

    from care_q.errors import CareQError

    torch.manual_seed(0)
    net = create_model("care_test", num_classes=10).eval()
    bad = fb._OnnxChild(net, tmp_path / "bad.onnx", 0)
    with pytest.raises(CareQError, match=r"FP32 ONNX export of bad\.onnx \(child process\) failed: \S") as e:
        bad.wait()
    assert "\x1b" not in str(e.value)  # torch.export's colour codes are stripped
    assert not Path(bad.model_file).exists() and not (tmp_path / "bad.onnx").exists()
    killed = fb._OnnxChild(net, tmp_path / "killed.onnx", 32)
    killed.kill()
    assert killed.proc.returncode is not None and not Path(killed.model_file).exists()
    assert not (tmp_path / "killed.onnx").exists()
