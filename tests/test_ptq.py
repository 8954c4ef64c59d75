"""End-to-end PTQ at small resolution: both targets, runtime verification, report, bad input."""

from __future__ import annotations

import json

import pytest
import torch

import care_q
from care_q import CareQError


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_root, one_torch_thread):
    out = tmp_path_factory.mktemp("ptq")
    with pytest.warns(UserWarning, match="weights are random"):
        report = care_q.ptq("care_test", calib="cifar10_test", data_root=data_root, num_calib=32,
                            img_size=32, out=out, num_verify=48, latency_runs=0, progress=False)
    return out, report


def test_artifacts_verified(run):
    out, report = run
    assert (out / "care_test_int8.tflite").exists() and (out / "care_test_int8_qdq.onnx").exists()
    for t in ("tflite", "onnx"):
        v = report["artifacts"][t]["verification"]
        # the reference emulates the runtimes' int8 kernels exactly: the artifacts' logits are the
        # reference's, bit for bit (ptq itself only refuses below 99% top-1 agreement)
        assert v["images"] == 48 and v["max_abs_diff"] == 0.0 and v["logit_sqnr_db"] == float("inf"), (t, v)
        assert v["top1_agreement"] == 1.0
        assert "note" not in v  # x86: the ONNX reference is onnxruntime's arithmetic here
    assert report["calibration"] == {"set": "cifar10_test", "images": 32, "seconds": report["calibration"]["seconds"]}


def test_onnx_reference_is_noted_off_x86(tmp_path, data_root, monkeypatch):
    """On a CPU whose onnxruntime runs another int8 Add kernel (ARM: fixed point) the report
    says that the ONNX reference follows x86's."""
    monkeypatch.setattr("care_q.ptq.platform.machine", lambda: "arm64")
    with pytest.warns(UserWarning, match="x86 int8 Add; on arm64"):
        report = care_q.ptq("care_test", calib="cifar10_test", data_root=data_root, num_calib=8, img_size=32,
                            out=tmp_path, targets=["onnx"], num_verify=8, latency_runs=0, progress=False)
    assert "arm64" in report["artifacts"]["onnx"]["verification"]["note"]
    assert any("x86 int8 Add" in n for n in report["notes"])


def test_report_contents(run):
    out, report = run
    data = json.loads((out / "report.json").read_text())
    assert data["recipe"]["name"] == "ptq_int8_cpu"
    # the default CPU recipe timed its elementwise ops here and kept the profile it chose from
    k = data["tflite_kernels"]
    assert k["candidates"] == sum(k["float_by_op"].values()) + sum(k["int8_by_op"].values()) > 0
    assert k["profile"] == str(out / "kernel_profile.json") and (out / "kernel_profile.json").exists()
    assert "## TFLite kernels" in (out / "report.md").read_text()
    t = data["tensors"]["stages.2.blocks.0.attn.kv"]
    assert t["role"] == "attn_kv" and t["symmetric"] and t["qparams"]["zero_point"] == 0
    assert data["sqnr_db"]["stages.2.blocks.0.attn.num"]["recipe"] > 0
    md = (out / "report.md").read_text()
    assert "top-1 agreement" in md and "attn_phi" in md and "xnnpack:" in md and "float islands" in md
    # ptq_int8_cpu substitutes nothing: as built, its deploy form equals FP32 to float round-off
    d = data["deploy_form_vs_fp32"]
    assert d["top1_agreement"] == 1.0 and 90 < d["logit_sqnr_db"] < float("inf") and d["images"] == 32
    assert f"original FP32 model: {d['logit_sqnr_db']:.1f} dB, top-1 agreement 100.0% (first calibration batch" in md
    assert not list(out.glob(".*.tmp"))  # no temporary files left behind


def test_target_the_recipe_cannot_honour(tmp_path):
    with pytest.raises(CareQError, match="cannot honour target.*tflite"):
        care_q.ptq("care_test", recipe="ptq_a16w8_attention", targets=["tflite"], out=tmp_path)
    assert not list(tmp_path.iterdir())  # refused before any work


@pytest.mark.parametrize("kw,match", [
    ({"recipe": "nope"}, "unknown recipe 'nope'"),
    ({"io": "int4"}, "--io int4"),
])
def test_bad_arguments(tmp_path, kw, match):
    with pytest.raises(CareQError, match=match):
        care_q.ptq("care_test", out=tmp_path, **kw)


def test_unknown_model(tmp_path):
    with pytest.raises(CareQError, match="unknown model 'care_s7'"):
        care_q.ptq("care_s7", out=tmp_path)


def test_interrupted_export_leaves_no_artifact(tmp_path, data_root, monkeypatch):
    import care_q.pipeline.artifacts as tfl  # the registry's TFLite exporter

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tfl, "emit_tflite_int8", boom)
    with pytest.raises(KeyboardInterrupt):
        care_q.ptq("care_test", calib="cifar10_test", data_root=data_root, num_calib=8, img_size=32,
                   targets=["tflite"], out=tmp_path, num_verify=8, progress=False)
    assert not (tmp_path / "care_test_int8.tflite").exists()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_random_weights_come_from_the_seed(tmp_path, data_root):
    """Without --weights the model is drawn from `seed`, not from the global RNG: the same file
    whatever ran before (a test that reseeded torch changed the model once)."""
    files = []
    for i, global_seed in enumerate((1, 2)):
        with torch.random.fork_rng(), pytest.warns(UserWarning, match="weights are random"):
            torch.manual_seed(global_seed)  # the global RNG in another state each time (restored after)
            # the second run reuses the first's kernel timings (measured ones vary between runs)
            care_q.ptq("care_test", calib="cifar10_test", data_root=data_root, num_calib=8, img_size=32,
                       out=tmp_path / str(i), targets=["tflite"], num_verify=8, latency_runs=0, progress=False,
                       kernel_profile=tmp_path / "0" / "kernel_profile.json" if i else None)
        files.append((tmp_path / str(i) / "care_test_int8.tflite").read_bytes())
    assert files[0] == files[1]
