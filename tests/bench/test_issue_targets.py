"""Issues 19, 20 and 21's targets in the suite's table: values computed from a run's result, the
thresholds from the suite file, checks left out where the run did not measure them."""

import math

import pytest

from care_q.bench.issue_targets import issue_checks
from care_q.bench.schema import DEFAULT_TARGETS, SUITE, load_suite
from care_q.errors import CareQError


def _row(method, label, **acc):
    return {"method": method, "label": label, "latency": {}, "accuracy": acc or None}


def _result():
    rows = [_row("careq_tflite", "care-q int8 TFLite", drop_top1_pt=0.25, agreement=0.9571),
            _row("careq_onnx", "care-q int8 ONNX QDQ", drop_top1_pt=0.42, agreement=0.9563),
            _row("careq_tflite:ptq_int8", "care-q int8 TFLite, ptq_int8", drop_top1_pt=0.36, agreement=0.9569),
            _row("careq_onnx:ptq_int8", "care-q int8 ONNX QDQ, ptq_int8", drop_top1_pt=0.42, agreement=0.9563),
            _row("careq_tflite:ptq_int8_recon", "care-q int8 TFLite, ptq_int8_recon", drop_top1_pt=0.05,
                 agreement=0.979, logit_sqnr_db=23.0),
            _row("careq_tflite:ptq_w4a8_recon", "care-q int8 TFLite, ptq_w4a8_recon", drop_top1_pt=-0.19),
            _row("careq_tflite:npu_int8_ptq", "care-q int8 TFLite, npu_int8_ptq", drop_top1_pt=0.82),
            _row("careq_tflite:npu_int8_ptq_ethosu", "care-q int8 TFLite, npu_int8_ptq_ethosu", drop_top1_pt=0.45)]
    rows[0]["latency"]["care_s0"] = {"stats": {"median_ms": 6.3, "ratio": 0.55}}
    recon = {"iterations": 300, "images": 1000, "seconds": 480.0, "device": "cpu"}
    return {"rows": rows,
            "anchors": {"built": {"care_s0_backbone": {"artifacts": {
                "b_fp32.tflite": {"source": "fp32", "route": "tflite", "tool": "litert-torch"},
                "b_int8.tflite": {"source": "int8", "route": "tflite", "tool": "litert-torch PT2E int8"}}}},
                "bench": {"latency": {"tflite/xnnpack": {"b_int8.tflite": {"median_ms": 9.0},
                                                         "b_fp32.tflite": {"median_ms": 11.0}}}}},
            "profiles": {"care_s0": {"ms": 9.9, "bound_ms": 8.25}},
            "ort_profiles": {"care_s0": {"careq_onnx_x86": {"ms": 18.0, "bound_ms": 16.0}}, "care_s1": {}},
            "accuracy": {"extra_ptq": {
                "ptq_int8": {"artifacts": {}},
                "ptq_int8_recon": {"reconstruction": recon},
                "ptq_w4a8_recon": {"reconstruction": {**recon, "seconds": 610.5}},
                "npu_int8_ptq": {"reconstruction": {**recon, "seconds": 2000.0}, "artifacts": {"tflite": {
                    "verification": {"images": 128, "max_abs_diff": 0.0}}}}}},
            "npu": {"npu_int8_ptq": {"coverage": {
                "ethos-u55-128": {"cpu_ops": {"L2_NORMALIZATION": 24}}, "ethos-u85-256": {"cpu_ops": {}},
                "edgetpu": {"mac_share": 1.0}, "nnapi:FL6": {"mac_share": 0.9}}},
                    "npu_int8_ptq_ethosu": {"coverage": {
                "ethos-u55-128": {"cpu_ops": {"RSQRT": 24, "MEAN": 1}}, "ethos-u85-256": {"cpu_ops": {}},
                "edgetpu": {"mac_share": 0.995}, "nnapi:FL6": {"mac_share": 0.43}}}}}


def test_issue_checks_values_and_verdicts():
    got = {c["what"]: c for c in issue_checks(_result(), DEFAULT_TARGETS)}

    def one(part):
        [c] = [c for w, c in got.items() if part in w]
        return c

    pt2e = one("PT2E")
    assert pt2e["value"] == pytest.approx(0.7) and pt2e["target"] == "<= 0.7" and pt2e["ok"] is True
    bound = one("one-op sum")
    assert bound["value"] == pytest.approx(1.2) and bound["ok"] is False
    ort_bound = one("ONNX QDQ (x86 recipe) node sum")
    assert ort_bound["value"] == pytest.approx(1.125) and ort_bound["ok"] is True
    # the suite recipe's drop, and its agreement against ptq_int8's in the same runtime (both to 2 decimals)
    assert one("int8 TFLite: top-1 drop")["ok"] is True
    a = one("int8 TFLite: top-1 agreement")
    assert a["target"] == ">= 95.69" and a["value"] == pytest.approx(95.71) and a["ok"] is True
    assert one("int8 ONNX QDQ: top-1 drop")["ok"] is False
    assert one("int8 ONNX QDQ: top-1 agreement")["ok"] is True  # equal counts
    # issue 19
    assert one("ptq_int8_recon: top-1 drop")["ok"] is True
    assert one("ptq_int8_recon: top-1 agreement")["value"] == pytest.approx(97.9)
    assert one("ptq_int8_recon: top-1 agreement")["ok"] is False
    assert one("ptq_int8_recon: logit SQNR")["ok"] is True
    assert one("ptq_w4a8_recon: top-1 drop")["ok"] is True
    assert one("ptq_int8_recon: reconstruction")["ok"] is True
    assert one("ptq_w4a8_recon: reconstruction")["ok"] is False
    assert not any("npu_int8_ptq: reconstruction" in w for w in got)  # the time target is issue 19's recipes'
    # issue 20, per NPU recipe: the drop, bit-exact, and on the targets the recipe is for (npu_int8_ptq: Edge TPU
    # and NNAPI FL6 by rules; npu_int8_ptq_ethosu: Ethos-U by Vela, its CPU ops counted, and Edge TPU)
    assert one("npu_int8_ptq .tflite: top-1 drop")["ok"] is False
    assert one("npu_int8_ptq_ethosu .tflite: top-1 drop")["ok"] is True
    assert one("largest logit difference")["ok"] is True  # only npu_int8_ptq's verification was recorded
    assert not any("npu_int8_ptq .tflite: ops on the CPU" in w for w in got)  # Ethos-U is the other recipe's
    u55, u85 = one("ethos-u55-128"), one("ethos-u85-256")
    assert (u55["value"], u55["ok"], u85["value"], u85["ok"]) == (25, False, 0, True)
    assert one("npu_int8_ptq .tflite: share of MACs on Edge TPU")["ok"] is True
    assert one("npu_int8_ptq_ethosu .tflite: share of MACs on Edge TPU")["value"] == pytest.approx(99.5)
    assert one("NNAPI FL6")["value"] == pytest.approx(90.0) and one("NNAPI FL6")["ok"] is False


def test_issue_checks_leave_out_what_was_not_measured():
    res = _result()
    res.pop("anchors"), res.pop("profiles"), res.pop("ort_profiles"), res.pop("npu")
    res["rows"] = res["rows"][:2]
    whats = [c["what"] for c in issue_checks(res, DEFAULT_TARGETS)]
    assert not any("PT2E" in w or "bound" in w or "agreement" in w or "Vela" in w for w in whats)
    assert any("ptq_int8_recon: reconstruction" in w for w in whats)  # the ptq report is still there
    assert not issue_checks({"rows": []}, DEFAULT_TARGETS)
    # a run that timed nothing: a check with no value is neither pass nor fail
    res = _result()
    res["profiles"]["care_s0"]["bound_ms"] = 0
    [b] = [c for c in issue_checks(res, DEFAULT_TARGETS) if "one-op sum" in c["what"]]
    assert b["value"] is None and b["ok"] is None


def test_suite_targets_default_and_override(tmp_path):
    s = load_suite(SUITE, shared=tmp_path)
    assert s["targets"] == {**DEFAULT_TARGETS, "recon_seconds": 600}
    text = SUITE.read_text()
    f = tmp_path / "s.yaml"
    start, end = text.index("targets:\n  accuracy_drop_pt"), text.index("npu_drop_pt: 0.5")
    f.write_text(text[:start] + "targets:\n  npu_drop_pt: 0.25" + text[end + len("npu_drop_pt: 0.5"):])
    t = load_suite(f, shared=tmp_path)["targets"]
    assert t["npu_drop_pt"] == 0.25 and t["tflite_latency_ratio"] == DEFAULT_TARGETS["tflite_latency_ratio"]
    f.write_text(text.replace("  npu_drop_pt: 0.5", "  npu_drop: 0.5"))
    with pytest.raises(CareQError, match=r"unknown key 'targets.npu_drop'"):
        load_suite(f, shared=tmp_path)
    f.write_text(text.replace("  npu_drop_pt: 0.5", "  npu_drop_pt: half"))
    with pytest.raises(CareQError, match=r"'targets.npu_drop_pt' must be a number"):
        load_suite(f, shared=tmp_path)


def test_table_says_which_sections_were_left_out():
    from care_q.bench.benchmarks import suite_blocks, target_blocks

    res = {"source": "eval/suite.yaml", "started": "now", "steps": {}, "config": {}, "rows": [],
           "sections": ["accuracy", "latency"],
           "targets": [{"what": "w", "target": "<= 0", "value": 0, "ok": True},
                       {"what": "v", "target": ">= 22.5", "value": math.inf, "ok": True}]}
    text = str(suite_blocks(res, figures=False))
    assert "Sections not run this time: qat, ptq_time" in text and "--skip qat --skip ptq_time" in text
    assert "Sections not run" not in str(suite_blocks({**res, "sections": ["accuracy", "qat", "latency", "ptq_time"]},
                                                      figures=False))
    _, headers, rows, _ = target_blocks(res)[1]
    assert headers[2] == "measured" and [r[2] for r in rows] == ["0", "inf"]  # counts stay integers


def test_latency_targets_beside_the_same_runs_anchors():
    """Under the targets: each anchor's int8 / FP32; a warning where plain CNNs gain nothing from int8 in TFLite."""
    from care_q.bench.benchmarks import target_blocks

    def res(resnet_ratio):
        built = {"resnet18": {"label": "torchvision ResNet-18", "artifacts": {
            "r_int8.tflite": {"source": "int8", "route": "tflite", "tool": "PT2E"},
            "r_int8.onnx": {"source": "int8", "route": "onnx", "tool": "ORT"}}},
            "care_s0_backbone": {"label": "care_s0 backbone (no head)", "artifacts": {
                "b_int8.tflite": {"source": "int8", "route": "tflite", "tool": "PT2E"}}}}
        lat = {"tflite/xnnpack": {"r_int8.tflite": {"ratio": resnet_ratio}, "b_int8.tflite": {"ratio": 1.57}},
               "onnxruntime": {"r_int8.onnx": {"ratio": 0.56}}}
        return {"targets": [], "anchors": {"built": built, "bench": {"latency": lat}}}

    text = str(target_blocks(res(1.07)))
    assert "torchvision ResNet-18 TFLite 1.07x; torchvision ResNet-18 onnxruntime 0.56x; care_s0 backbone (no head) " \
           "TFLite 1.57x" in text
    assert "plain CNNs gain nothing from int8 in TFLite" in text
    assert "gain nothing" not in str(target_blocks(res(0.33)))  # the backbone's 1.57x is care-q's rival, not the host
    assert len(target_blocks({"targets": []})) == 2  # no anchors: the table alone
