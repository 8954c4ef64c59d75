"""The preparation pipeline: one plan for ptq, analysis and sensitivity, and the artifacts module."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from care_q import CareQError
from care_q.eval.analysis import quant_analysis
from care_q.eval.sensitivity import sensitivity
from care_q.pipeline import PrepareConfig, prepare
from care_q.pipeline.artifacts import TARGETS, agreement_failure, emit, target
from care_q.ptq import ptq

N = 24  # verification / evaluation images


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, data_root, one_torch_thread):
    """ptq of care_test at 32 with the default CPU recipe (ptq_int8_cpu: ptq_int8's plan, bias correction
    on), and the same configuration prepared again for the analyses."""
    out = tmp_path_factory.mktemp("pipeline")
    kw = dict(calib="cifar10_test", data_root=data_root, num_calib=32, img_size=32, seed=3)
    with pytest.warns(UserWarning, match="weights are random"):
        report = ptq("care_test", out=out, num_verify=N, latency_runs=0, progress=False, **kw)
    with pytest.warns(UserWarning, match="weights are random"):
        prep = prepare(PrepareConfig("care_test", recipe="ptq_int8_cpu", progress=False, **kw))
    return out, report, prep


def test_prepare_gives_the_plan_ptq_ships(shipped):
    out, report, prep = shipped
    assert prep.recipe.bias_correction and prep.bias_correction is not None  # ptq_int8 corrects biases
    assert prep.bias_correction["layers"] == report["bias_correction"]["layers"] > 0
    saved = json.loads((out / "report.json").read_text())["tensors"]
    assert json.loads(json.dumps(prep.plan.to_json())) == saved  # every tensor's parameters, as shipped
    # and the same artifact: the file emitted from the separately prepared plan is the shipped one, byte for byte
    again = emit("onnx", prep.plan, "float", out / "again_qdq.onnx")
    assert again.read_bytes() == (out / "care_test_int8_qdq.onnx").read_bytes()


def test_analyses_report_the_artifacts_own_fidelity(shipped):
    """Sensitivity's all-int8 row and the analysis' shipped logits are the TFLite artifact's own
    numbers against FP32 on the same images (they used another, uncorrected plan before)."""
    _, report, prep = shipped
    own = report["artifacts"]["tflite"]["verification"]["vs_fp32"]
    assert report["artifacts"]["tflite"]["verification"]["max_abs_diff"] == 0.0
    assert math.isfinite(own["logit_sqnr_db"]) and 0 < own["top1_agreement"] <= 1
    sens = sensitivity("care_test", prepared=prep, num_eval=N, seed=3, by="stage", modes=("only",), progress=False,
                       report=False)
    assert sens["eval"]["images"] == N
    assert sens["full_int8"]["logit_sqnr_db"] == pytest.approx(own["logit_sqnr_db"], abs=1e-6)
    assert sens["full_int8"]["agreement"] == own["top1_agreement"]
    a = quant_analysis(prep, num_images=N)
    assert a["shipped_vs_fp32"]["logit_sqnr_db"] == pytest.approx(own["logit_sqnr_db"], abs=1e-6)
    assert a["shipped_vs_fp32"]["top1_agreement"] == own["top1_agreement"]


def test_prepare_is_deterministic_and_seeded(data_root, one_torch_thread):
    cfg = PrepareConfig("care_test", calib="cifar10_test", data_root=data_root, num_calib=8, img_size=32,
                        recipe="ptq_int8_full", progress=False)
    with pytest.warns(UserWarning):
        a, b = prepare(cfg), prepare(cfg)
    with pytest.warns(UserWarning):
        c = prepare(PrepareConfig(**{**cfg.__dict__, "seed": 1}))
    assert a.plan.to_json() == b.plan.to_json()
    wa, wc = a.net.state_dict(), c.net.state_dict()
    assert any(not torch.equal(wa[k], wc[k]) for k in wa if wa[k].is_floating_point())  # random weights from seed
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 2


def test_fallback_to_synthetic_calibration(tmp_path, one_torch_thread):
    cfg = PrepareConfig("care_test", calib=str(tmp_path / "missing"), num_calib=4, img_size=32,
                        fallback_synthetic=True, progress=False)
    with pytest.warns(UserWarning, match="fell back to data-free 'synthetic_bn'"):
        prep = prepare(cfg)
    assert prep.calib == "synthetic_bn" and prep.calib_images == 4
    with pytest.raises(CareQError, match="missing"), pytest.warns(UserWarning):
        prepare(PrepareConfig("care_test", calib=str(tmp_path / "missing"), img_size=32, progress=False))


def test_target_registry():
    assert set(TARGETS) == {"tflite", "onnx"}
    assert target("tflite").filename("m_int8") == "m_int8.tflite"
    assert target("onnx").filename("m_int8") == "m_int8_qdq.onnx"
    with pytest.raises(CareQError, match="unknown target 'coreml'"):
        target("coreml")
    arts = {"tflite": {"verification": {"top1_agreement": 0.995}}, "onnx": {"verification": {"top1_agreement": 0.97}}}
    msg = agreement_failure(arts, 0.99, "r.md")
    assert msg.startswith("artifact(s) disagree") and "onnx 97.0%" in msg and "tflite" not in msg
    assert agreement_failure(arts, 0.9, "r.md") is None
