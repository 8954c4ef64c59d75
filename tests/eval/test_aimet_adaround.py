"""AIMET AdaRound baseline: the recorded import failure (always), bad arguments, and a tiny real run
on care_test at 32x32 (only where aimet_torch is importable, i.e. not in the project venv)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from care_q.errors import CareQError
from care_q.eval.aimet_adaround import INSTALL, ONNX_NAME, aimet_adaround, aimet_baseline

SIZE = 32


@pytest.fixture(scope="module")
def net():
    torch.set_num_threads(1)
    from care_q.models import create_model, randomize_like_trained

    return randomize_like_trained(create_model("care_test", num_classes=10), seed=0)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_import_failure_is_recorded(net, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "aimet_torch", None)  # import aimet_torch -> ImportError, as without it
    r = aimet_adaround(net, _images(4), tmp_path / "o", iterations=1, num_batches=1, batch_size=4)
    f = r["failure"]
    assert r["sim"] is None and f["type"] == "error" and f["stage"] == "import"
    assert f["exception"] in ("ImportError", "ModuleNotFoundError")
    assert INSTALL in f["message"] and "\n" not in f["message"]
    assert not (tmp_path / "o").exists()


def test_bad_arguments(net, tmp_path):
    with pytest.raises(CareQError, match=r"num_batches\*batch_size = 8 images .* has 4"):
        aimet_adaround(net, _images(4), tmp_path, iterations=1, num_batches=2, batch_size=4)
    with pytest.raises(CareQError, match="NCHW torch.Tensor"):
        aimet_adaround(net, np.zeros((4, 3, SIZE, SIZE), np.float32), tmp_path, iterations=1, num_batches=1)
    with pytest.raises(CareQError, match="must be positive"):
        aimet_adaround(net, _images(4), tmp_path, iterations=0, num_batches=1, batch_size=4)


def test_tiny_adaround_run(net, tmp_path):
    pytest.importorskip("aimet_torch")
    import onnxruntime as ort

    from care_q.quant.qtypes import sqnr_db

    x = _images(16)
    out = tmp_path / "aimet"
    r = aimet_adaround(net, x, out, iterations=2, num_batches=2, batch_size=4)
    assert "failure" not in r, r.get("failure")
    s = r["settings"]
    assert s["iterations"] == 2 and s["adaround_images"] == 8 and s["encoding_images"] == 16
    assert s["tool"] == "aimet-torch 2.42.0" and s["config_file"].endswith("default_config_per_channel.json")
    # the sim is an int8 fake-quant model: close to FP32 on held-out inputs, but not equal to it
    held = _images(8, seed=1)
    with torch.no_grad():
        ref, got = net(held), r["sim"].model(held)
    assert 20.0 < sqnr_db(ref, got) < 60.0  # measured 32.6 dB
    # AIMET's QDQ ONNX is in out_dir (nothing left of the temporary folder) and ORT runs it like the sim
    assert sorted(p.name for p in out.iterdir()) == ["aimet_adaround_adaround_param.encodings", ONNX_NAME]
    o = r["onnx"]
    assert o["ort_runs"] and o["census"]["quantize_linear"] > 20 and o["census"]["dequantize_linear"] > 20
    sess = ort.InferenceSession(str(out / ONNX_NAME), providers=["CPUExecutionProvider"])
    onnx_out = np.concatenate([sess.run(None, {"input": held[i:i + 1].numpy()})[0] for i in range(4)])
    assert sqnr_db(got[:4], onnx_out) > 30.0


def test_bench_record_where_aimet_is_missing(tmp_path, monkeypatch):
    """The bench's step (`aimet_baseline`) without aimet-torch: a failure record with the install line, no file
    and no work folder left (the child run here in this process, where the import is blocked)."""
    from care_q.utils import timing

    monkeypatch.setattr(timing, "run_isolated", lambda fn, *args, **kw: fn(*args))
    monkeypatch.setitem(sys.modules, "aimet_torch", None)
    path = tmp_path / "aimet" / "care_test_aimet_adaround_qdq.onnx"
    r = aimet_baseline("care_test", None, _images(8).numpy(), path, iterations=1, num_batches=1, batch_size=4,
                       threads=1)
    assert not r["ok"] and r["path"] is None and r["input"] == "care_test (random weights)"
    assert r["failure"]["stage"] == "import" and INSTALL in r["failure"]["message"]
    assert list(path.parent.iterdir()) == []


def test_bench_record_where_the_child_dies(tmp_path, monkeypatch):
    from care_q.utils import timing

    def killed(fn, *args, what="", **kw):
        raise CareQError(f"{what}: the child process died (signal 9)")

    monkeypatch.setattr(timing, "run_isolated", killed)
    path = tmp_path / "m_aimet_adaround_qdq.onnx"
    r = aimet_baseline("care_test", None, _images(8).numpy(), path, iterations=1, num_batches=1, batch_size=4)
    assert r["failure"] == {"type": "error", "exception": "CareQError", "stage": "run",
                            "message": "CareQError: AIMET AdaRound: the child process died (signal 9)"}
    assert list(tmp_path.iterdir()) == []


def test_bench_record_tiny_run(tmp_path):
    """The real step on care_test (only where aimet_torch is importable): AIMET's QDQ ONNX at the bench's path, its
    census from onnxruntime, nothing else left in the folder."""
    pytest.importorskip("aimet_torch")
    path = tmp_path / "b" / "care_test_aimet_adaround_qdq.onnx"
    r = aimet_baseline("care_test", None, _images(16).numpy(), path, iterations=2, num_batches=2, batch_size=4,
                       threads=1)
    assert r["ok"], r.get("failure")
    assert r["path"] == str(path) and path.stat().st_size == r["size_bytes"] and r["tool"] == "aimet-torch 2.42.0"
    assert r["census"]["kind"] == "onnx" and r["onnx"]["ort_runs"] and r["settings"]["adaround_images"] == 8
    assert [p.name for p in path.parent.iterdir()] == [path.name]
