"""FP32 export of the CIFAR-10 proxy (care_s0 at 64x64) through `care-q export`, each artifact
checked here again, independently, against the PyTorch deploy form.

One real conversion (ONNX + TFLite, about a minute) is shared by the module; the other tests
reuse its artifacts."""

from __future__ import annotations

import contextlib
import io
import shutil

import numpy as np
import onnx
import pytest
import torch

import care_q.export.fp32 as fp32
from care_q import create_model
from care_q.cli import main
from care_q.errors import CareQError
from care_q.models import save_checkpoint
from care_q.runtime import load_runner
from care_q.transforms import deploy
from care_q.transforms.profile import model_info


@pytest.fixture(scope="module")
def exported(tmp_path_factory, proxy_ckpt):
    """`care-q export --format all` on the proxy; the exporter's result dict is recorded."""
    out = tmp_path_factory.mktemp("fp32")
    seen = {}
    real = fp32.export_fp32

    def recording(*a, **kw):
        seen.update(real(*a, **kw))
        return seen

    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(fp32, "export_fp32", recording)
        rc = main(["export", "--model", "care_s0", "--weights", str(proxy_ckpt), "--format", "all",
                   "--out", str(out)])
    return {"rc": rc, "out": out, "stdout": stdout.getvalue(), "res": seen,
            "model": deploy(create_model("care_s0", weights=proxy_ckpt))}


def test_cli_export_succeeds_and_reports(exported):
    assert exported["rc"] == 0
    res = exported["res"]
    assert res["ok"] and res["problems"] == []
    assert res["img_size"] == 64 and res["name"] == "care_s0_cifar10_64"  # from the sidecar / stem
    text = exported["stdout"]
    for name in ("care_s0_cifar10_64_fp32.onnx", "care_s0_cifar10_64_fp32.tflite"):
        assert (exported["out"] / name).is_file()
        row = next(line for line in text.splitlines() if name in line)
        assert "100%" in row and row.rstrip(" │").endswith("yes")
    tfl_row = next(line for line in text.splitlines() if ".tflite" in line)
    assert f" {res['artifacts']['tflite']['xnnpack_partitions']} " in tfl_row
    for fmt in ("onnx", "tflite"):
        v = res["artifacts"][fmt]["verify"]
        assert v["samples"] == 8 and v["top1_agreement"] == 1.0 and v["ok"]
        assert v["rel_diff"] <= 1e-5 and v["max_abs_diff"] > 0  # round-off, not a bit-copy of torch


def test_artifacts_agree_with_pytorch_independently(exported):
    """Fresh inputs (not the exporter's), batch 5, each runtime vs the PyTorch deploy form."""
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        ref = exported["model"](x).numpy()
    for suffix in ("onnx", "tflite"):
        r = load_runner(exported["out"] / f"care_s0_cifar10_64_fp32.{suffix}", threads=2)
        y = r(x.numpy())
        assert y.shape == (5, 10)
        assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
        assert (y.argmax(1) == ref.argmax(1)).all()


def test_onnx_artifact(exported):
    path = exported["out"] / "care_s0_cifar10_64_fp32.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 64, 64]  # dynamic batch
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    art = exported["res"]["artifacts"]["onnx"]
    assert art["dynamic_batch"] and art["exporter"] == "dynamo"
    assert art["op_census"]["MatMul"] == 36  # 3 per attention block; s0 has 8 + 4 of them
    assert "Elu" not in art["op_census"] and art["op_census"]["Exp"] == 24  # elu as relu + exp(min(x, 0)) - 1
    assert not list(exported["out"].glob(".*.tmp"))  # atomic writes left nothing behind
    r = load_runner(path)
    assert r.input_shape == (None, 3, 64, 64) and r.input_layout == "NCHW"


def test_tflite_artifact_and_xnnpack(exported):
    art = exported["res"]["artifacts"]["tflite"]
    census, info = art["op_census"], art["delegate_info"]
    assert sum(census.values()) == info["total_nodes"]
    assert info["delegated_nodes"] + sum(info["undelegated_ops"].values()) == info["total_nodes"]
    assert art["xnnpack_partitions"] == info["partitions"] >= 1
    # litert-torch 0.10 lowers F.elu to where(x >= 0, x, expm1(x)), whose compare and select
    # XNNPACK rejects; the deploy form's FP32 elu (relu + exp(min(x, 0)) - 1) keeps one partition.
    assert info["undelegated_ops"] == {} and info["partitions"] == 1
    assert "SELECT" not in census and "GREATER_EQUAL" not in census
    assert census["BATCH_MATMUL"] == 36 and census["CONV_2D"] + census["DEPTHWISE_CONV_2D"] > 100
    # The converter's own MAC estimate agrees with care_q.transforms.profile (it also counts a few
    # elementwise ops).
    macs = model_info(exported["model"], img_size=64)["macs"]
    assert art["converter_macs"] is None or abs(art["converter_macs"] / macs - 1) < 0.05
    r = load_runner(art["path"])
    assert (r.input_shape, r.input_layout, r.input_dtype) == ((1, 3, 64, 64), "NCHW", np.float32)


def test_disagreeing_artifact_fails_the_cli(exported, tmp_path, proxy_ckpt, monkeypatch, capsys):
    """An artifact that does not match the model (here: the proxy's, verified against a model with
    perturbed head weights) must be flagged and exit 1."""
    model = create_model("care_s0", weights=proxy_ckpt)
    with torch.no_grad():
        model.head.fc.weight.add_(0.05 * torch.randn(model.head.fc.weight.shape,
                                                     generator=torch.Generator().manual_seed(0)))
    ck = tmp_path / "perturbed.pth"
    save_checkpoint(model, ck)
    good = exported["out"] / "care_s0_cifar10_64_fp32.onnx"

    def copy_exporter(model, path, img_size, **kw):
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(good, path)
        return {"exporter": "copy", "dynamic_batch": True}

    monkeypatch.setitem(fp32.EXPORTERS, "onnx", copy_exporter)
    rc = main(["export", "--model", "care_s0", "--weights", str(ck), "--img-size", "64", "--format",
               "onnx", "--out", str(tmp_path / "out")])
    assert rc == 1
    captured = capsys.readouterr()
    assert "NO" in captured.out
    assert "perturbed_fp32.onnx disagrees with PyTorch: rel diff" in captured.err


def test_compare_logits_thresholds():
    ref = np.array([[1.0, 0.0, -1.0], [0.0, 2.0, 1.0]])
    assert fp32.compare_logits(ref, ref + 1e-7)["ok"]
    bad = fp32.compare_logits(ref, ref + np.array([[0, 0, 0], [0, 0, 0.01]]))
    assert not bad["ok"] and bad["rel_diff"] == pytest.approx(0.005)
    flip = fp32.compare_logits(ref, ref[:, [2, 1, 0]])  # flips the first row only
    assert flip["top1_agreement"] == 0.5 and not flip["ok"]
    tie = np.array([[1.0, 1.0 - 1e-7, 0.0]])  # a flip inside round-off is a tie, not a failure
    res = fp32.compare_logits(tie, tie[:, [1, 0, 2]])
    assert res["top1_ties"] == 1 and res["ok"]


def test_export_argument_errors(tmp_path):
    m = create_model("care_test")
    with pytest.raises(CareQError, match="unknown export format"):
        fp32.export_fp32(m, tmp_path, "x", 64, formats=("tflite", "coreml"))
    with pytest.raises(CareQError, match="multiple of 32"):
        fp32.export_fp32(m, tmp_path, "x", 50)
    with pytest.raises(CareQError, match=r"\(N, 3, 64, 64\), got shape \(2, 3, 32, 32\)"):
        fp32.export_fp32(m, tmp_path, "x", 64, samples=np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(CareQError, match="CARE or DeployCARE"):
        fp32.export_fp32(torch.nn.Linear(2, 2), tmp_path, "x", 64)
    assert not list(tmp_path.iterdir())
