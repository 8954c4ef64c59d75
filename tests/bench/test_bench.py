"""Latency harness (interleaving order, statistics), the bench runner on small artifacts, the
memory probe's crash check, and the suite definition / step cache of `make bench`."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from care_q.errors import CareQError
from care_q.utils.timing import measure, measure_rotated, rotations, summarize

SIZE = 32


class FakeRunner:
    """Records every prepare/invoke in a shared log."""

    def __init__(self, name, log):
        self.name, self.log = name, log
        self.prepared = None

    def prepare(self, x):
        self.prepared = x
        self.log.append(("prepare", self.name))

    def invoke(self):
        self.log.append(("invoke", self.name))


def test_measure_interleaves_after_warmup():
    log = []
    runners = {"a": FakeRunner("a", log), "b": FakeRunner("b", log)}
    res = measure(runners, np.zeros((1, 3, 4, 4), np.float32), runs=3, warmup=2)
    assert log[:6] == [("prepare", "a"), ("invoke", "a"), ("invoke", "a"),
                       ("prepare", "b"), ("invoke", "b"), ("invoke", "b")]
    assert [n for _, n in log[6:]] == ["a", "b", "a", "b", "a", "b"]
    assert res["a"]["runs"] == 3 and res["b"]["runs"] == 3


def test_rotated_order_and_statistics():
    assert rotations(["a", "b", "c"], 4) == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    log = []
    runners = {k: FakeRunner(k, log) for k in "abc"}
    # a fake clock: each invoke of X takes (1 + round index) ms for a, 10 ms for b, 2 ms for c
    durations = {"a": iter(range(1, 11)), "b": iter([10] * 10), "c": iter([2] * 10)}
    state = {"t": 0.0, "pending": None}

    def clock():
        if state["pending"] is None:  # start of a timed invoke: the runner about to run is the next in log
            state["pending"] = True
            return state["t"]
        name = log[-1][1]
        state["t"] += next(durations[name]) / 1e3
        state["pending"] = None
        return state["t"]

    rounds = []
    res = measure_rotated(runners, np.zeros((1, 3, 4, 4), np.float32), runs=10, warmup=1,
                          advance=lambda n: rounds.append(n), clock=clock)
    timed = [n for kind, n in log if kind == "invoke"][3:]  # after 1 warm-up each
    assert timed[:6] == ["a", "b", "c", "b", "c", "a"]
    assert len(rounds) == 10
    assert res["a"]["median_ms"] == pytest.approx(5.5)           # median of 1..10
    assert res["a"]["p90_ms"] == pytest.approx(9.1)              # numpy's linear interpolation
    assert res["a"]["min_ms"] == pytest.approx(1.0) and res["a"]["mean_ms"] == pytest.approx(5.5)
    assert res["b"]["median_ms"] == pytest.approx(10.0) and res["c"]["p90_ms"] == pytest.approx(2.0)
    assert summarize([3.0, 1.0, 2.0]) == {"median_ms": 2.0, "p90_ms": pytest.approx(2.8), "runs": 3}
    with pytest.raises(ValueError):
        measure_rotated(runners, np.zeros((1, 3, 4, 4), np.float32), runs=0)


# ----------------------------------------------------------------------------- bench on artifacts


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    torch.set_num_threads(1)
    from care_q import create_model
    from care_q.export.onnx_qdq import emit_onnx_qdq, save_onnx
    from care_q.export.tflite_int8 import emit_tflite_int8
    from care_q.graph.trace import trace
    from care_q.quant.calibrate import calibrate
    from care_q.quant.plan import build_plan
    from care_q.quant.recipe import load_recipe
    from care_q.transforms import deploy

    root = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    d = deploy(create_model("care_test", num_classes=10))
    plan = build_plan(trace(d, torch.zeros(1, 3, SIZE, SIZE)), load_recipe("ptq_int8"))
    calibrate(plan, d, [torch.randn(8, 3, SIZE, SIZE)], progress=False)
    (root / "m_int8.tflite").write_bytes(emit_tflite_int8(plan))
    save_onnx(emit_onnx_qdq(plan), root / "m_int8_qdq.onnx")
    return root


def test_bench_runner_and_report(arts, tmp_path):
    """The same int8 file declared once as the FP32 reference: pairing, ratios and sizes are exact."""
    from care_q.bench.host import bench

    x = tmp_path / "x"
    x.mkdir()
    shutil.copy(arts / "m_int8.tflite", x / "m_fp32.tflite")   # stands in for the FP32 artifact
    shutil.copy(arts / "m_int8.tflite", x / "m_int8.tflite")
    shutil.copy(arts / "m_int8_qdq.onnx", x / "m_int8_qdq.onnx")
    res = bench(x, threads=1, runs=5, warmup=1, tflite_delegates=("xnnpack", "builtin", "reference"), slow_runs=3,
                progress=False, out=tmp_path / "out")
    a = res["artifacts"]
    assert a["m_fp32.tflite"]["source"] == "fp32" and a["m_int8.tflite"]["source"] == "int8"
    assert a["m_int8.tflite"]["fp32"] == "m_fp32.tflite" and a["m_int8.tflite"]["size_ratio"] == 1.0
    assert a["m_int8_qdq.onnx"]["fp32"] is None and a["m_int8_qdq.onnx"]["size_ratio"] is None  # no FP32 ONNX
    assert set(res["latency"]) == {"onnxruntime", "tflite/xnnpack", "tflite/builtin", "tflite/reference"}
    # TFLite's reference kernels have no ELU: recorded per artifact, not timed, the rest goes on
    assert res["latency"]["tflite/reference"] == {}
    ref_fail = res["latency_failures"]["tflite/reference"]
    assert set(ref_fail) == {"m_fp32.tflite", "m_int8.tflite"} and "ELU" in ref_fail["m_int8.tflite"]["message"]
    assert "failure" not in a["m_int8.tflite"]                      # XNNPACK (the default) is fine
    for setting, n in (("tflite/xnnpack", 6), ("tflite/builtin", 3)):  # runs 5 -> 3 blocks of 2; 3 -> 3 of 1
        g = res["latency"][setting]
        assert set(g) == {"m_fp32.tflite", "m_int8.tflite"}
        i8 = g["m_int8.tflite"]
        assert i8["runs"] == n and i8["blocks"] == 3 and len(i8["block_ratios"]) == 3 and i8["fp32"] == "m_fp32.tflite"
        assert i8["ratio_spread"] == [min(i8["block_ratios"]), max(i8["block_ratios"])]
        assert i8["ratio_spread"][0] <= i8["ratio"] <= i8["ratio_spread"][1]
        assert g["m_fp32.tflite"]["ratio"] == 1.0 and g["m_fp32.tflite"]["pairs"] == 1
        assert g["m_fp32.tflite"]["median_ms"] == i8["fp32_median_ms"] and 0 <= i8["other_cpu_share"] <= 1
        assert 0 < i8["median_ms"] <= i8["p90_ms"]
    assert res["latency"]["onnxruntime"]["m_int8_qdq.onnx"]["ratio"] is None
    assert res["latency"]["onnxruntime"]["m_int8_qdq.onnx"]["runs"] == 6
    for e in a.values():
        assert e["memory"]["peak_mb"] >= e["memory"]["baseline_mb"] > 0
    assert a["m_int8.tflite"]["census"]["xnnpack"]["partitions"] >= 1
    assert a["m_int8_qdq.onnx"]["census"]["integer_kernels"] > 0
    assert res["machine"]["cores"] >= 1 and res["machine"]["versions"]["onnxruntime"]
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["latency"]["tflite/xnnpack"]["m_int8.tflite"]["runs"] == 6
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 1 and "tflite/builtin" in html and "Not timed" in html
    with pytest.raises(CareQError, match="unknown TFLite delegate"):
        bench(x, tflite_delegates=("gpu",))


def test_bench_command_prints_ratio_and_spread(arts, tmp_path, capsys):
    """`care-q bench`: each int8 file against its FP32, the blocks' ratio range beside the ratio;
    fewer than 3 blocks is refused."""
    from care_q.cli import main

    x = tmp_path / "x"
    x.mkdir()
    shutil.copy(arts / "m_int8.tflite", x / "m_fp32.tflite")
    shutil.copy(arts / "m_int8.tflite", x / "m_int8.tflite")
    assert main(["bench", "--artifacts", str(x), "--out", str(tmp_path / "o"), "--runs", "4", "--warmup", "1",
                 "--threads", "1", "--tflite-delegates", "xnnpack", "--no-memory"]) == 0
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    s = rep["latency"]["tflite/xnnpack"]["m_int8.tflite"]
    assert rep["blocks"] == 3 and rep["rounds_per_block"] == 2 and s["runs"] == 6
    out = capsys.readouterr().out
    assert "tflite/xnnpack: batch 1, 1 threads, 3 blocks of 2 rounds" in out
    row = next(line for line in out.splitlines() if line.lstrip("│ ").startswith("m_int8.tflite"))
    lo, hi = s["ratio_spread"]
    assert f"{s['ratio']:.2f}x" in row and f"{lo:.2f}-{hi:.2f}" in row
    assert main(["bench", "--artifacts", str(x), "--out", str(tmp_path / "o"), "--blocks", "2"]) == 2
    assert "blocks >= 3" in capsys.readouterr().err


def test_memory_probe_reports_crash(tmp_path, arts, monkeypatch):
    from care_q.bench import memory

    ok = memory.probe(arts / "m_int8_qdq.onnx", threads=1)
    assert ok["ok"] and ok["delta_mb"] > 0
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nkill -ABRT $$\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(memory.sys, "executable", str(fake))
    res = memory.probe(arts / "m_int8.tflite")
    assert not res["ok"] and res["failure"]["signal"] == "SIGABRT"


# ----------------------------------------------------------------------------- make bench


def test_suite_definition(tmp_path):
    from care_q.bench.schema import SUITE, load_suite

    s = load_suite(SUITE, shared=tmp_path)
    assert s["accuracy"]["weights"] == str(tmp_path / "models" / "care_s0_cifar10_64.pth")
    assert s["accuracy"]["limit"] is None and s["latency"]["models"] == ["care_s0", "care_s1", "care_s2"]
    q = load_suite(SUITE, quick=True, shared=tmp_path)
    assert q["accuracy"]["limit"] == 500 and q["latency"]["models"] == ["care_s0"]
    assert q["accuracy"]["num_calib"] < s["accuracy"]["num_calib"] and q["latency"]["img_size"] == 224
    text = SUITE.read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("  num_calib: 1000", "  num_calib: 1000\n  num_calbi: 3"))
    line = bad.read_text().splitlines().index("  num_calbi: 3") + 1
    with pytest.raises(CareQError, match=rf"bad.yaml:{line}: unknown key 'accuracy.num_calbi'"):
        load_suite(bad)
    bad.write_text(text.replace("runs: 60", "runs: fifty"))
    with pytest.raises(CareQError, match=r"'latency.runs' must be a non-negative integer"):
        load_suite(bad)
    assert s["latency"]["blocks"] == 3 and s["latency"]["anchors"] == ["mobilenet_v2", "resnet18", "care_s0_backbone"]
    assert q["latency"]["anchors"] == ["resnet18"] and q["latency"]["blocks"] == 3
    bad.write_text(text.replace("  blocks: 3", "  blocks: 2"))
    line = bad.read_text().splitlines().index("  blocks: 2") + 1
    with pytest.raises(CareQError, match=rf"bad.yaml:{line}: 'latency.blocks' must be at least 3"):
        load_suite(bad)
    bad.write_text(text.replace("  anchors: [mobilenet_v2,", "  anchors: [vgg16,"))
    with pytest.raises(CareQError, match=r"unknown anchor\(s\) \['vgg16'\]; known: \['mobilenet_v2', 'resnet18', "
                                         r"'care_s0_backbone'\]"):
        load_suite(bad)
    bad.write_text(text.replace("[ort_quantize_static, nncf, ai_edge_quantizer, aimet_adaround]\n  analysis",
                                "[ort_quantize_static, tensorrt]\n  analysis"))
    with pytest.raises(CareQError, match=r"unknown baseline\(s\) \['tensorrt'\]"):
        load_suite(bad)
    # AIMET's AdaRound: a baseline of the accuracy proxy only (not of the quick run, nor of the latency models)
    assert s["accuracy"]["baselines"][-1] == "aimet_adaround" and "aimet_adaround" not in q["accuracy"]["baselines"]
    bad.write_text(text.replace("  baselines: [ort_quantize_static, nncf, ai_edge_quantizer]\n  # TFLite",
                                "  baselines: [nncf, aimet_adaround]\n  # TFLite"))
    with pytest.raises(CareQError, match=r"unknown baseline\(s\) \['aimet_adaround'\]; known: "
                                         r"\['ort_quantize_static', 'nncf', 'ai_edge_quantizer'\]"):
        load_suite(bad)
    assert s["accuracy"]["onnx_x86_recipe"] == "ptq_int8_x86"
    bad.write_text(text.replace("onnx_x86_recipe: ptq_int8_x86", "onnx_x86_recipe: qat_int8"))
    line = bad.read_text().splitlines().index("  onnx_x86_recipe: qat_int8") + 1
    with pytest.raises(CareQError, match=rf"bad.yaml:{line}: recipe 'qat_int8' must be a PTQ recipe with the onnx target"):
        load_suite(bad)
    bad.write_text(text.replace("onnx_x86_recipe: ptq_int8_x86", "onnx_x86_recipe: null"))
    assert load_suite(bad)["accuracy"]["onnx_x86_recipe"] is None
    # issue 20's recipes at 224: the NPU PTQ recipe first, then any recipe with a .tflite, each once
    npu = "npu_recipes: [npu_int8_ptq_ethosu, npu_int8_ptq, npu_int8, ptq_int8]"
    assert npu in text and s["latency"]["npu_recipes"][2] == "npu_int8"
    for given, match in (("[ptq_int8, npu_int8_ptq]", "the first recipe, 'ptq_int8', must be a PTQ recipe of the NPU "
                                                      "graph"),
                         ("[npu_int8, npu_int8_ptq]", "the first recipe, 'npu_int8', must be a PTQ recipe"),
                         ("[npu_int8_ptq, ptq_int8, npu_int8_ptq]", "recipe 'npu_int8_ptq' is listed twice"),
                         ("[npu_int8_ptq, ptq_int8_x86x]", "unknown recipe|not found|no recipe")):
        bad.write_text(text.replace(npu, f"npu_recipes: {given}"))
        line = next(i for i, ln in enumerate(bad.read_text().splitlines(), 1) if "npu_recipes:" in ln)
        with pytest.raises(CareQError, match=rf"bad.yaml:{line}: .*({match})"):
            load_suite(bad)
    bad.write_text(text.replace(npu, "npu_recipes: []"))
    assert load_suite(bad)["latency"]["npu_recipes"] == []


def test_ptq_time_runs_the_users_command_fresh_and_checks_the_budget(tmp_path, monkeypatch):
    """Issue 3's 5-minute budget: the command as typed, in a new process, an empty output folder
    (FP32 files left by an earlier run would skip their export), wall time against the target."""
    import subprocess

    from care_q.bench import ptq_time as S
    from care_q.bench.benchmarks import ptq_time_blocks
    from care_q.bench.schema import SUITE, load_suite
    from care_q.bench.steps import Steps
    from care_q.bench.targets import time_checks

    cfg = load_suite(SUITE, shared=tmp_path)
    P = cfg["ptq_time"]
    assert (P["model"], P["calib"], P["num_calib"], P["target_seconds"]) == ("care_s1", "imagenet_1k_subset", None, 300)
    assert load_suite(SUITE, quick=True, shared=tmp_path)["ptq_time"]["num_calib"] == 64
    seen = []

    def fake_run(argv, env, stdout, stderr):
        out = Path(argv[argv.index("--out") + 1])
        seen.append((argv[1:], sorted(p.name for p in out.glob("*")) if out.exists() else None))
        out.mkdir(parents=True)
        (out / "care_s1_fp32.onnx").write_text("left for the next run")
        rep = {"seconds": 250.0, "calibration": {"images": 1000, "seconds": 70.0}, "bias_correction": {"seconds": 20.0},
               "artifacts": {"tflite": {"seconds": 30.0}, "onnx": {"seconds": 30.0}}, "latency_seconds": 90.0}
        (out / "report.json").write_text(json.dumps(rep))
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(S.subprocess, "run", fake_run)
    steps = Steps(tmp_path / "bench", log=lambda m: None)
    r = S.run_ptq_time(cfg, P, tmp_path / "bench", steps, "/data")
    assert seen == [(["-m", "care_q", "ptq", "--model", "care_s1", "--calib", "imagenet_1k_subset", "--out",
                      str(tmp_path / "bench" / "ptq_time" / "care_s1" / "out")], None)]
    assert r["command"] == "care-q ptq --model care_s1 --calib imagenet_1k_subset"
    assert r["stages"]["other (model, data, tracing, SQNR, report)"] == 10.0
    assert S.run_ptq_time(cfg, P, tmp_path / "bench", steps, "/data") == r and len(seen) == 1  # cached
    monkeypatch.setattr(S, "package_digest", lambda: "changed")
    S.run_ptq_time(cfg, P, tmp_path / "bench", steps, "/data")
    assert seen[1][1] is None  # code changed: timed again, from an empty folder
    (tmp_path / "bench" / "ptq_time" / "care_s1.step.json").unlink()  # killed before it finished: same config
    S.run_ptq_time(cfg, P, tmp_path / "bench", steps, "/data")
    assert seen[2][1] is None  # the killed run's FP32 files are not reused either
    [t] = time_checks({**r, "seconds": 301.0}, P)
    assert t["ok"] is False and t["target"] == "<= 300"
    assert time_checks(r, P)[0]["ok"] is True and "from process start" in str(ptq_time_blocks({"ptq_time": r}))
    assert time_checks({"command": "c", "seconds": 3.0, "failure": "exit code 2: x"}, P)[0]["ok"] is None


def test_rows_and_targets_of_the_x86_recipe(tmp_path):
    """The x86 recipe's ONNX gets its own row and target lines where the suite has it, none otherwise."""
    from care_q.bench.artifacts import method_paths
    from care_q.bench.schema import DEFAULT_TARGETS
    from care_q.bench.targets import method_rows, target_checks

    def lat(x86):
        methods = method_paths("care_s0", tmp_path / "fp32", tmp_path / "ptq", {}, x86)
        ratio = {"care_s0_int8_qdq.onnx": 0.9, "care_s0_int8_x86_qdq.onnx": 0.8}
        stats = {f: {"ratio": r} for f, r in ratio.items()}
        return {"care_s0": {"methods": methods, "bench": {"artifacts": {}, "latency": {"onnxruntime": stats}}}}

    rows = method_rows(None, lat(tmp_path / "ptq_x86"))
    x86 = [r for r in rows if r["method"] == "careq_onnx_x86"]
    assert len(x86) == 1 and x86[0]["latency"]["care_s0"]["file"] == "care_s0_int8_x86_qdq.onnx"
    t = {c["what"]: c["value"] for c in target_checks(rows, DEFAULT_TARGETS, None, ["care_s0"])}
    assert t["issue 21: care-q int8 ONNX QDQ, x86 recipe: latency / FP32, care_s0 (batch 1)"] == 0.8
    assert t["issue 21: care-q int8 ONNX QDQ: latency / FP32, care_s0 (batch 1)"] == 0.9
    rows = method_rows(None, lat(None))
    assert "careq_onnx_x86" not in {r["method"] for r in rows}
    assert not any("x86" in c["what"] for c in target_checks(rows, DEFAULT_TARGETS, None, ["care_s0"]))


def test_suite_qat_section(tmp_path):
    from care_q.bench.qat_steps import qat_epochs
    from care_q.bench.schema import SUITE, load_suite
    from care_q.bench.targets import qat_checks

    s = load_suite(SUITE, shared=tmp_path)
    assert s["qat"]["recipes"] == ["npu_int8", "qat_w4a8_mlp", "qat_int8"] and s["qat"]["limit"] is None
    assert [qat_epochs(s["qat"], n) for n in s["qat"]["recipes"]] == [3.0, 0.25, 2.0]
    q = load_suite(SUITE, quick=True, shared=tmp_path)["qat"]
    assert q["limit"] == 640 and [qat_epochs(q, n) for n in q["recipes"]] == [1.0, 1.0, 1.0]  # quick: one for all
    text = SUITE.read_text()
    recipes = "recipes: [npu_int8, qat_w4a8_mlp, qat_int8]"
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(recipes, "recipes: [qat_int8, ptq_int8]").replace("{npu_int8: 3, qat_int8: 2}", "{}"))
    line = bad.read_text().splitlines().index("  recipes: [qat_int8, ptq_int8]") + 1
    with pytest.raises(CareQError, match=rf"bad.yaml:{line}: recipe 'ptq_int8' is a ptq recipe"):
        load_suite(bad)
    bad.write_text(text.replace(f"  {recipes}\n", ""))
    with pytest.raises(CareQError, match=r"missing key\(s\) \['qat.recipes'\]"):
        load_suite(bad)
    bad.write_text(text.replace(recipes, "recipes: [qat_int8, qat_w4a8_mlp]"))
    with pytest.raises(CareQError, match=r"'qat.recipe_epochs' names 'npu_int8', which is not in qat.recipes"):
        load_suite(bad)
    bad.write_text(text.replace("{npu_int8: 3,", "{npu_int8: -1,"))
    with pytest.raises(CareQError, match=r"'qat.recipe_epochs.npu_int8' must be positive"):
        load_suite(bad)
    # targets: qat_int8 within 0.1 pt; the aggressive recipe recovers half of its PTQ drop; npu_int8 within 1 pt
    qt = {"qat_int8": {"accuracy": {"fp32_top1": 75.5, "ptq_top1": 75.0, "qat_top1": 75.45}},
          "qat_w4a8_mlp": {"accuracy": {"fp32_top1": 75.5, "ptq_top1": 71.5, "qat_top1": 73.0}},
          "npu_int8": {"accuracy": {"fp32_top1": 75.5, "ptq_top1": 70.0, "qat_top1": 74.0}}}
    t = qat_checks(qt, {"epochs": 1, "target_drop_pt": 0.1})
    assert [round(c["value"], 4) for c in t] == [0.05, 0.375, 1.5] and [c["ok"] for c in t] == [True, False, False]
    # issue 5: every recipe's artifacts agree with its fake-quant model on >= 99.5%; the worst one is the check
    assert s["qat"]["num_verify"] == 1000
    qt["qat_int8"]["artifacts"] = {"tflite": {"agreement": 1.0}, "onnx": {"agreement": 0.994}}
    qt["npu_int8"]["artifacts"] = {"tflite": {"agreement": 0.995}}
    t = qat_checks(qt, {"epochs": 1, "target_drop_pt": 0.1, "num_verify": 1000})
    agree = [(c["what"], c["value"], c["ok"]) for c in t if "agreement" in c["what"]]
    assert agree == [("QAT qat_int8: lowest artifact top-1 agreement with the fake-quant model, % (onnx, 1000 images)",
                      pytest.approx(99.4), False),
                     ("QAT npu_int8: lowest artifact top-1 agreement with the fake-quant model, % (tflite, 1000 images)",
                      pytest.approx(99.5), True)]


def test_steps_cache_and_resume(tmp_path):
    from care_q.bench.steps import Steps

    calls = []
    steps = Steps(tmp_path, log=lambda m: None)

    def work(tag):
        def fn():
            calls.append(tag)
            (tmp_path / "f").mkdir(exist_ok=True)
            (tmp_path / "f" / f"{tag}.txt").write_text(tag)
            return {"tag": tag}
        return fn

    assert steps.run("s", {"n": 1}, work("a"), tmp_path / "f") == {"tag": "a"}
    assert steps.run("s", {"n": 1}, work("b"), tmp_path / "f") == {"tag": "a"}   # cached
    assert calls == ["a"]
    assert steps.run("s", {"n": 2}, work("c"), tmp_path / "f") == {"tag": "c"}   # changed config: rerun
    assert calls == ["a", "c"]
    assert not (tmp_path / "f" / "a.txt").exists()                               # the old partial work is gone
    # a killed step (no marker) with the same config keeps its folder's partial work
    (tmp_path / "s.step.json").unlink()
    (tmp_path / "f" / "partial.txt").write_text("x")
    steps.run("s", {"n": 2}, work("d"), tmp_path / "f")
    assert (tmp_path / "f" / "partial.txt").exists()
    # a config change outside the folder's tag re-runs the step on the folder's work (QAT: re-verify a run)
    assert steps.run("s", {"n": 2, "verify": 5}, work("e"), tmp_path / "f", tag={"n": 2}) == {"tag": "e"}
    assert (tmp_path / "f" / "partial.txt").exists() and calls[-1] == "e"
    assert steps.run("s", {"n": 3, "verify": 5}, work("g"), tmp_path / "f", tag={"n": 3}) == {"tag": "g"}
    assert not (tmp_path / "f" / "partial.txt").exists()                         # the tag changed: wiped


def test_other_load_counts_other_processes_only():
    """Our own busy threads are not 'other load'; a separate spinning process is."""
    import subprocess
    import sys
    import time

    from care_q.utils.machine import OtherLoad, busy_warning

    quiet = OtherLoad()
    time.sleep(0.6)
    if quiet.share() > 0.1:  # the premise (nothing else running) does not hold: the measurement is the point
        pytest.skip(f"other processes already use {100 * quiet.share():.0f}% of the CPUs")
    probe = OtherLoad()
    t = time.monotonic()
    while time.monotonic() - t < 0.6:  # this process spinning
        pass
    assert probe.share() < 0.15
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<3: pass"])
    try:
        time.sleep(0.3)
        probe = OtherLoad()
        time.sleep(1.2)
        other = probe.share()
    finally:
        spin.kill()
        spin.wait()
    cores = len(os.sched_getaffinity(0))
    assert other > 0.6 / cores  # one spinning process of `cores`
    assert "other processes used" in busy_warning({"other_cpu_share": other})


def test_busy_warning():
    """Other processes' share of the cores decides; older results fall back on the load average."""
    from care_q.utils.machine import busy_warning

    assert busy_warning({"other_cpu_share": 0.2}).startswith("other processes used 20% of the cores")
    assert busy_warning({"other_cpu_share": 0.15}) is None
    assert busy_warning({"other_cpu_share": 0.02, "load_avg": {"start": 9.0}}) is None
    old = {"load_avg": {"start": 3.0, "end": None}, "machine": {"usable_cores": 2}}
    assert busy_warning(old).startswith("the machine was busy during this measurement (load average up to 3.0 on 2 cores)")
    assert busy_warning({**old, "load_avg": {"start": 1.5, "end": 2.0}}) is None


def test_file_key_is_the_content(tmp_path):
    """An input file is keyed by its bytes: the proxy's cache key survives a re-provisioned shared/
    (same bytes, new mtime) and a copy elsewhere, not new bytes."""
    import hashlib

    from care_q.bench.keys import file_key

    f = tmp_path / "w.pth"
    f.write_bytes(b"weights")
    a = file_key(f)
    assert a == {"size": 7, "sha256": hashlib.sha256(b"weights").hexdigest()}
    os.utime(f, (1, 1))
    assert file_key(f) == a
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(f, tmp_path / "elsewhere" / "w.pth")
    assert file_key(tmp_path / "elsewhere" / "w.pth") == a
    f.write_bytes(b"weightz")
    assert file_key(f) != a and file_key(None) is None
    with pytest.raises(CareQError, match="file not found"):
        file_key(tmp_path / "missing.pth")


def test_qat_table_reports_where_a_finished_run_was_trained():
    """A run trained elsewhere (GPU) and finished here: epochs, throughput and device from its log."""
    from care_q.bench.benchmarks import qat_blocks
    from care_q.eval import report as R

    hist = [{"epoch": e, "step": 781 * e, "seconds": 130.0, "images_per_s": 390.0, "device": "cuda (NVIDIA H200)"}
            for e in (1, 2)]
    res = {"config": {"qat": {"dataset": "cifar10_train"},
                      "accuracy": {"model": "care_s0", "num_calib": 1000, "calib": "cifar10_train",
                                   "dataset": "cifar10_test"}},
           "qat": {"qat_int8": {"accuracy": {"fp32_top1": 75.59, "ptq_top1": 75.19, "qat_top1": 75.44},
                                "train": {"steps": 1562, "steps_per_epoch": 781, "device": "cpu",
                                          "this_session_seconds": 0.0, "this_session_images_per_s": None,
                                          "history": hist},
                                "artifacts": {"tflite": {"agreement": 1.0}}}}}
    text = R.to_markdown(qat_blocks(res))
    row = next(line for line in text.splitlines() if line.startswith("| `qat_int8`"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2" and cells[5] == "75.44%" and cells[6] == "-0.15"
    assert cells[-3:] == ["390.0", "130", "cuda (NVIDIA H200)"]


def test_adopt_qat_seeds_the_step_folder(tmp_path):
    """A run trained elsewhere becomes the step's last.pt under the step's tag (so the bench resumes
    it instead of wiping the folder); a run of another recipe or length is refused, nothing touched."""
    import json

    import torch

    from care_q.bench.qat_steps import adopt_qat, qat_step_config
    from care_q.bench.schema import SUITE, load_suite
    from care_q.bench.suite import main

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "care_s0_cifar10_64.pth").write_bytes(b"w")
    cfg = load_suite(SUITE, shared=tmp_path)
    ckpt = tmp_path / "run.pt"
    torch.save({"config": {"model": "care_s0", "epochs": 2.0, "recipe": {"name": "qat_int8"}}, "step": 1562}, ckpt)
    root = tmp_path / "bench"
    (root / "qat" / "qat_int8").mkdir(parents=True)
    (root / "qat" / "qat_int8" / "stale.tflite").write_bytes(b"old")
    dst = adopt_qat(cfg, root, "qat_int8", ckpt)
    assert dst == root / "qat" / "qat_int8" / "last.pt" and dst.read_bytes() == ckpt.read_bytes()
    assert sorted(p.name for p in dst.parent.iterdir()) == [".step-config.json", "last.pt"]
    tag = json.loads((dst.parent / ".step-config.json").read_text())
    assert tag == json.loads(json.dumps(qat_step_config(cfg, "qat_int8"), default=str)) and tag["epochs"] == 2.0
    with pytest.raises(CareQError, match=r"is a run of .*'npu_int8'.* the suite's step is .*'qat_int8'"):
        torch.save({"config": {"model": "care_s0", "epochs": 3.0, "recipe": {"name": "npu_int8"}}}, ckpt)
        adopt_qat(cfg, root, "qat_int8", ckpt)
    assert dst.exists()
    with pytest.raises(CareQError, match="not a QAT recipe of this suite"):
        adopt_qat(cfg, root, "ptq_int8", ckpt)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(CareQError, match="is not a care-q QAT checkpoint"):
        adopt_qat(cfg, root, "qat_int8", ckpt)
    assert main(["--shared", str(tmp_path), "--out", str(root), "--adopt-qat", "qat_int8"]) == 2


# ----------------------------------------------------------------------------- cache keys


def _package_copy(dst: Path) -> Path:
    from care_q.bench.keys import PACKAGE_DIR

    shutil.copytree(PACKAGE_DIR, dst / "care_q", ignore=shutil.ignore_patterns("__pycache__"))
    return dst / "care_q"


def _touch(f: Path) -> None:
    f.write_bytes(f.read_bytes() + b"\n# one more line\n")


def test_code_digest_follows_the_modules_a_step_runs(tmp_path):
    """A byte more in a module a step's code reaches changes that step's key; a module it does
    not reach leaves the key alone; the same sources elsewhere give the same digests."""
    from care_q.bench.keys import STEP_CODE, closure, code_digest

    pkg = _package_copy(tmp_path / "a")
    files = {f.relative_to(pkg).as_posix() for f in closure(*STEP_CODE["fp32"], package_dir=pkg)}
    assert {"export/fp32.py", "models/care.py", "models/timm_registry.py", "export/__init__.py"} <= files
    assert "eval/report.py" not in files and "bench/benchmarks.py" not in files
    qat_train = {f.relative_to(pkg).as_posix() for f in closure(*STEP_CODE["qat_train"], package_dir=pkg)}
    assert "quant/fakequant.py" in qat_train and not any(f.startswith(("export/", "eval/")) for f in qat_train)

    kinds = sorted(STEP_CODE)
    before = {k: code_digest(k, pkg) for k in kinds}
    elsewhere = shutil.copytree(pkg, tmp_path / "b" / "care_q")
    assert before == {k: code_digest(k, elsewhere) for k in kinds}  # no path in the digest
    _touch(pkg / "bench" / "benchmarks.py")         # the report's tables: no step runs them
    _touch(pkg / "commands" / "ptq.py")
    assert {k: code_digest(k, pkg) for k in kinds} == before
    _touch(pkg / "export" / "onnx_qdq.py")          # an exporter: PTQ and QAT's export, not training nor FP32
    after = {k: code_digest(k, pkg) for k in kinds}
    changed = {k for k in kinds if after[k] != before[k]}
    assert {"ptq", "qat"} <= changed and not {"weights", "fp32", "qat_train"} & changed
    assert not {"profile", "ort_profile"} & changed  # the op profilers read files, not the exporters
    _touch(pkg / "export" / "tflite_profile.py")
    # ptq_int8_cpu times ops; the NPU census step reads files through the bench helpers that import ptq
    assert {k for k in kinds if code_digest(k, pkg) != after[k]} == {"npu", "profile", "ptq"}
    after = {k: code_digest(k, pkg) for k in kinds}
    _touch(pkg / "models" / "care.py")              # the model: every step that builds or runs one
    assert {k for k in kinds if code_digest(k, pkg) == after[k]} == {"profile", "ort_profile"}  # they read files


def test_closure_reads_every_kind_of_import(tmp_path):
    """Relative imports, `from package import submodule`, imports inside functions and module
    names spelled as strings (importlib) all count; a package's __init__ comes with its modules."""
    from care_q.bench.keys import closure

    pkg = tmp_path / "care_q"
    (pkg / "sub").mkdir(parents=True)
    sources = {"__init__.py": "import care_q.never\n", "a.py": "from . import b\nfrom .sub import c\n",
               "b.py": "def f():\n    from care_q.sub.d import g\n", "sub/__init__.py": "", "sub/c.py": "x = 1\n",
               "sub/d.py": "LAZY = {'e': 'care_q.e'}\n", "e.py": "", "never.py": "", "other.py": "import care_q.a\n"}
    for name, text in sources.items():
        (pkg / name).write_text(text)
    got = [f.relative_to(pkg).as_posix() for f in closure(["care_q.a"], package_dir=pkg)]
    assert got == ["__init__.py", "a.py", "b.py", "e.py", "sub/__init__.py", "sub/c.py", "sub/d.py"]
    got = [f.relative_to(pkg).as_posix() for f in closure(["care_q.a"], ["care_q.sub"], package_dir=pkg)]
    assert got == ["__init__.py", "a.py", "b.py"]
    with pytest.raises(CareQError, match="no module care_q.gone"):
        closure(["care_q.gone"], package_dir=pkg)


def test_keys_are_the_same_in_another_process(tmp_path):
    """No hash seed, dict order or path in a key: two fresh interpreters agree with this one (on a
    frozen copy of the sources)."""
    import subprocess
    import sys

    from care_q.bench import keys

    pkg = _package_copy(tmp_path)
    script = ("import json, sys; from pathlib import Path; from care_q.bench import keys as k; p = Path(sys.argv[1]); "
              "print(json.dumps([{n: k.code_digest(n, p) for n in sorted(k.STEP_CODE)}, k.package_digest(p), "
              "k.dataset_key('cifar10_train'), k.json_digest(k.recipe_content('ptq_int8'))]))")
    here = json.loads(json.dumps([{n: keys.code_digest(n, pkg) for n in sorted(keys.STEP_CODE)}, keys.package_digest(pkg),
                                  keys.dataset_key("cifar10_train"), keys.json_digest(keys.recipe_content("ptq_int8"))]))
    assert len(here[0]["ptq"]) == 64 and here[2]["definition"] and "source" not in keys.recipe_content("ptq_int8")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", script, str(pkg)], capture_output=True, text=True, check=True,
                             cwd="/", env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        assert json.loads(out) == here


@pytest.fixture
def fake_steps(monkeypatch):
    """The suite's accuracy and latency sections with every expensive call replaced by a fake that
    records its arguments and writes the files the real one would."""
    from types import SimpleNamespace

    from care_q.bench import accuracy, artifacts, latency_suite

    calls = []

    def rec(step, **kw):
        calls.append((step, kw))

    def export_fp32(net, out_dir, name, img, num_samples, threads):
        rec("fp32", name=name, img=img, samples=num_samples)
        arts = {}
        for fmt in ("onnx", "tflite"):
            p = Path(out_dir) / f"{name}_fp32.{fmt}"
            p.write_bytes(b"fp32")
            arts[fmt] = {"path": str(p), "size_bytes": 4, "verify": {"ok": True}, "exporter": "fake", "seconds": 1.0}
        return {"ok": True, "artifacts": arts}

    def ptq(model, *, recipe, out, targets=None, **kw):
        rec("ptq", model=model, recipe=recipe, targets=targets, **kw)
        files = {"onnx": Path(out) / f"{model}_int8_qdq.onnx", "tflite": Path(out) / f"{model}_int8.tflite"}
        files = {t: f for t, f in files.items() if targets is None or t in targets}
        for f in files.values():
            f.write_bytes(recipe.encode())
        return {"model": model, "calibration": {"images": kw["num_calib"], "set": kw["calib"]},
                "artifacts": {t: {"path": str(f)} for t, f in files.items()}, "seconds": 1.0}

    def run_baselines(onnx, tflite, x, out_dir, names, prefix, threads, cache, say):
        rec("baselines", names=names, shape=x.shape)
        out = {}
        for n in names:
            p = Path(out_dir) / artifacts.artifact_file(n, prefix)
            p.write_bytes(n.encode())
            out[n] = {"ok": True, "path": str(p)}
        return out

    def calibration_images(model, **kw):
        rec("calibration_images", **kw)
        return np.zeros((kw["num_calib"], 3, kw.get("img_size", 64), kw.get("img_size", 64)), np.float32)

    def save_checkpoint(net, path):
        rec("random_weights", path=path)
        Path(path).write_bytes(b"random")

    monkeypatch.setattr(artifacts, "export_fp32", export_fp32)
    monkeypatch.setattr(artifacts, "ptq", ptq)
    monkeypatch.setattr(artifacts, "run_baselines", run_baselines)
    monkeypatch.setattr(artifacts, "calibration_images", calibration_images)
    monkeypatch.setattr(artifacts, "create_model", lambda *a, **k: None)
    monkeypatch.setattr(latency_suite, "create_model", lambda *a, **k: None)
    monkeypatch.setattr(latency_suite, "randomize_like_trained", lambda net, seed: net)
    monkeypatch.setattr(latency_suite, "save_checkpoint", save_checkpoint)
    monkeypatch.setattr(latency_suite, "bench", lambda arts, **kw: rec("bench", files=sorted(arts), **kw) or {"n": 1})
    monkeypatch.setattr(latency_suite, "ptq", ptq)
    monkeypatch.setattr(latency_suite, "coverage", lambda path: rec("npu", file=Path(path).name) or {"u85": 1})
    monkeypatch.setattr(latency_suite, "profile_tflite",
                        lambda path, **kw: rec("profile", file=Path(path).name, fp32=Path(kw["fp32"]).name)
                        or {"rows": [], "ms": 1.0})
    monkeypatch.setattr(latency_suite, "profile_onnx",
                        lambda path, **kw: rec("ort_profile", file=Path(path).name, fp32=Path(kw["fp32"]).name)
                        or {"ms": 2.0})
    monkeypatch.setattr(accuracy, "load_sidecar", lambda w: SimpleNamespace(input_size=(3, 64, 64)))
    monkeypatch.setattr(accuracy, "evaluate", lambda model, **kw: rec("eval", files=sorted(kw["artifacts"])) or {"e": 1})
    monkeypatch.setattr(accuracy, "prepare_plan", lambda model, **kw: rec("prepare_plan", **kw) or "plan")
    monkeypatch.setattr(accuracy, "quant_analysis", lambda prep, **kw: {"plan": prep, **kw})
    return calls


def test_accuracy_and_latency_run_one_sequence_and_resume(tmp_path, fake_steps, monkeypatch):
    """Both sections make their artifacts through the same steps (FP32, PTQ, baselines, x86 recipe),
    with their own arguments; a second run reuses every step; a changed module reruns only the
    steps whose code reaches it; a killed step reruns alone."""
    from care_q.bench import latency_suite
    from care_q.bench.accuracy import run_accuracy
    from care_q.bench.latency_suite import run_latency
    from care_q.bench.schema import SUITE, load_suite
    from care_q.bench.steps import Steps

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "care_s0_cifar10_64.pth").write_bytes(b"trained")
    cfg = load_suite(SUITE, quick=True, shared=tmp_path)
    A, Lc, root = cfg["accuracy"], cfg["latency"], tmp_path / "bench"

    def run_both():
        steps = Steps(root, log=lambda m: None)
        acc = run_accuracy(cfg, A, root, steps, "/data", False)
        lat = run_latency(cfg, Lc, A, root, steps, "/data", False)
        return steps, acc, lat

    steps, acc, lat = run_both()
    calls = list(fake_steps)
    ptqs = [kw for name, kw in calls if name == "ptq"]
    common = {"model": "care_s0", "data_root": "/data", "threads": 2, "progress": False, "seed": 0,
              "latency_runs": 0, "min_agreement": 0.0}
    assert ptqs[0] == {**common, "recipe": "ptq_int8_cpu", "targets": None, "weights": Path(A["weights"]),
                       "calib": "cifar10_train", "num_calib": 200}
    assert ptqs[1] == {**ptqs[0], "recipe": "ptq_int8_x86", "targets": ["onnx"]}
    lat_weights = root / "latency" / "care_s0" / "weights" / "care_s0_random.pth"
    assert ptqs[2] == {**common, "recipe": "ptq_int8_cpu", "targets": None, "weights": lat_weights,
                       "calib": "imagenet_1k_subset", "num_calib": 8, "img_size": 224, "num_verify": 16}
    assert ptqs[3] == {**ptqs[2], "recipe": "ptq_int8_x86", "targets": ["onnx"]}
    assert [kw for name, kw in calls if name == "fp32"] == [{"name": "care_s0", "img": 64, "samples": 8},
                                                            {"name": "care_s0", "img": 224, "samples": 2}]
    assert [kw.get("img_size") for name, kw in calls if name == "calibration_images"] == [None, 224]
    files = ["care_s0_aeq_int8.tflite", "care_s0_fp32.onnx", "care_s0_fp32.tflite", "care_s0_int8.tflite",
             "care_s0_int8_qdq.onnx", "care_s0_int8_x86_qdq.onnx", "care_s0_nncf_int8.onnx", "care_s0_ort_qdq.onnx"]
    assert [kw["files"] for name, kw in calls if name in ("eval", "bench")] == [files, files]
    x86 = root / "proxy" / "ptq_x86" / "care_s0_int8_x86_qdq.onnx"
    assert acc["methods"]["careq_onnx_x86"]["path"] == str(x86) and x86.read_bytes() == b"ptq_int8_x86"
    assert acc["fp32"]["onnx"] == {"path": str(root / "proxy" / "fp32" / "care_s0_fp32.onnx"), "size_bytes": 4,
                                   "verify": {"ok": True}, "exporter": "fake"}
    assert acc["analysis"] == {"plan": "plan", "num_images": 16, "data_root": "/data", "seed": 1}
    assert lat["care_s0"]["bench"] == {"n": 1} and len(steps.timings) == 20 and steps.cached == []
    # issue 20 at 224: the .tflite of each of the suite's npu_recipes (a reconstruction recipe with one
    # reconstruction step; QAT npu_int8 by PTQ of its plan, its starting graph), then the NPU census of them, of
    # care-q's CPU file and of ai-edge-quantizer's
    npu_ptq = {**common, "targets": None, "weights": lat_weights, "calib": "imagenet_1k_subset", "num_calib": 32,
               "img_size": 224, "num_verify": 16}
    assert ptqs[4:] == [{**npu_ptq, "recipe": "npu_int8_ptq_ethosu", "recon_steps": 1},  # one reconstruction batch
                        {**npu_ptq, "recipe": "npu_int8_ptq", "recon_steps": 1},
                        {**npu_ptq, "recipe": "npu_int8", "recon_steps": None},
                        {**npu_ptq, "recipe": "ptq_int8", "recon_steps": None}]
    assert [kw["file"] for name, kw in calls if name == "npu"] == ["care_s0_int8.tflite"] * 5 + ["care_s0_aeq_int8.tflite"]
    assert list(lat["care_s0"]["npu"]) == ["npu_int8_ptq_ethosu", "npu_int8_ptq", "QAT npu_int8's graph", "ptq_int8",
                                           "ptq_int8_cpu", "ai_edge_quantizer"]
    assert lat["care_s0"]["npu"]["ai_edge_quantizer"] == {"file": "care_s0_aeq_int8.tflite", "coverage": {"u85": 1}}
    # the per-op profile: care-q's .tflite beside its FP32 file (rows dropped from the cached result)
    assert [kw for name, kw in calls if name == "profile"] == [{"file": "care_s0_int8.tflite",
                                                               "fp32": "care_s0_fp32.tflite"}]
    assert lat["care_s0"]["profile"] == {"ms": 1.0}
    # onnxruntime's profile: each care-q ONNX file beside the FP32 ONNX, a step each
    assert [kw for name, kw in calls if name == "ort_profile"] == [
        {"file": "care_s0_int8_qdq.onnx", "fp32": "care_s0_fp32.onnx"},
        {"file": "care_s0_int8_x86_qdq.onnx", "fp32": "care_s0_fp32.onnx"}]
    assert lat["care_s0"]["ort_profile"] == {"careq_onnx": {"ms": 2.0}, "careq_onnx_x86": {"ms": 2.0}}

    fake_steps.clear()
    steps, acc2, lat2 = run_both()                    # everything cached
    assert fake_steps == [] and (acc2, lat2) == (acc, lat) and len(steps.cached) == 20

    real = latency_suite.code_digest
    monkeypatch.setattr(latency_suite, "code_digest", lambda kind: "edited" if kind == "bench" else real(kind))
    steps, *_ = run_both()                            # the timing harness changed: only the timing reruns
    assert [name for name, _ in fake_steps] == ["bench"] and set(steps.timings) - set(steps.cached) == {
        "latency/care_s0/bench"}
    fake_steps.clear()
    (root / "proxy" / "eval.step.json").unlink()      # killed while evaluating
    steps, *_ = run_both()
    assert [name for name, _ in fake_steps] == ["eval"] and len(steps.cached) == 19


def test_extra_recipes_are_evaluated_beside_the_suite_recipe(tmp_path, fake_steps):
    """accuracy.extra_recipes (issue 19's reconstruction recipes): a ptq step each, their files named by recipe,
    evaluated with the rest and one table row per recipe and target."""
    from care_q.bench.accuracy import run_accuracy
    from care_q.bench.schema import SUITE, load_suite
    from care_q.bench.steps import Steps
    from care_q.bench.targets import method_rows

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "care_s0_cifar10_64.pth").write_bytes(b"trained")
    cfg = load_suite(SUITE, quick=True, shared=tmp_path)
    A = {**cfg["accuracy"], "extra_recipes": ["ptq_int8_recon", "ptq_w4a8_recon"]}
    root = tmp_path / "bench"
    acc = run_accuracy(cfg, A, root, Steps(root, log=lambda m: None), "/data", False)
    assert [kw["recipe"] for name, kw in fake_steps if name == "ptq"] == [
        "ptq_int8_cpu", "ptq_int8_x86", "ptq_int8_recon", "ptq_w4a8_recon"]
    f = root / "proxy" / "ptq_ptq_w4a8_recon" / "care_s0_int8_ptq_w4a8_recon.tflite"
    assert acc["methods"]["careq_tflite:ptq_w4a8_recon"]["path"] == str(f) and f.read_bytes() == b"ptq_w4a8_recon"
    evaluated = [kw["files"] for name, kw in fake_steps if name == "eval"][0]
    assert {"care_s0_int8_ptq_int8_recon.tflite", "care_s0_int8_ptq_int8_recon_qdq.onnx",
            "care_s0_int8_ptq_w4a8_recon.tflite", "care_s0_int8_ptq_w4a8_recon_qdq.onnx"} <= set(evaluated)
    labels = [r["label"] for r in method_rows({**acc, "eval": {"artifacts": {}}}, {})]
    assert labels[-4:] == ["care-q int8 TFLite, ptq_int8_recon", "care-q int8 ONNX QDQ, ptq_int8_recon",
                           "care-q int8 TFLite, ptq_w4a8_recon", "care-q int8 ONNX QDQ, ptq_w4a8_recon"]


def test_aimet_baseline_is_a_step_of_the_accuracy_section(tmp_path, fake_steps, monkeypatch):
    """Issue 19: AIMET's AdaRound beside the other baselines: a cached step of its own on the same calibration
    images (the file tools do not see it), its QDQ ONNX evaluated with the rest and a table row; where AIMET
    fails (aimet-torch missing) the row carries the recorded failure and nothing of it is evaluated."""
    from care_q.bench import artifacts
    from care_q.bench.accuracy import run_accuracy
    from care_q.bench.schema import SUITE, load_suite
    from care_q.bench.steps import Steps
    from care_q.bench.targets import method_rows
    from care_q.eval import aimet_adaround

    missing = {"type": "error", "exception": "ModuleNotFoundError", "stage": "import",
               "message": "aimet_torch is not importable; install it with `pip install aimet-torch==2.42.0`"}
    record = {}

    def aimet_baseline(model, weights, x, path, *, threads, **settings):
        fake_steps.append(("aimet", {"model": model, "shape": x.shape, "file": Path(path).name, **settings}))
        if "failure" in record:
            return {"tool": "aimet-torch", "path": None, "ok": False, "failure": record["failure"]}
        Path(path).write_bytes(b"aimet")
        return {"tool": "aimet-torch 2.42.0", "path": str(path), "ok": True}

    monkeypatch.setattr(aimet_adaround, "aimet_baseline", aimet_baseline)
    monkeypatch.setattr(artifacts, "versions", lambda names: {"aimet-torch": "2.42.0"})  # as if it were installed
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "care_s0_cifar10_64.pth").write_bytes(b"trained")
    cfg = load_suite(SUITE, quick=True, shared=tmp_path)
    A = {**cfg["accuracy"], "baselines": ["nncf", "aimet_adaround"]}
    root = tmp_path / "bench"
    steps = Steps(root, log=lambda m: None)
    acc = run_accuracy(cfg, A, root, steps, "/data", False)
    assert [kw["names"] for name, kw in fake_steps if name == "baselines"] == [["nncf"]]
    assert [kw for name, kw in fake_steps if name == "aimet"] == [
        {"model": "care_s0", "shape": (200, 3, 64, 64), "file": "care_s0_aimet_adaround_qdq.onnx",
         **artifacts.AIMET_SETTINGS}]
    f = root / "proxy" / "aimet" / "care_s0_aimet_adaround_qdq.onnx"
    assert acc["methods"]["aimet_adaround"] == {"file": f.name, "source": "int8", "path": str(f)}
    assert f.name in [kw["files"] for name, kw in fake_steps if name == "eval"][0] and "proxy/aimet" in steps.timings
    row = [r for r in method_rows({**acc, "eval": {"artifacts": {}}}, {}) if r["method"] == "aimet_adaround"]
    assert [r["label"] for r in row] == ["AIMET AdaRound + QuantSim (QDQ, per-channel)"]

    fake_steps.clear()
    assert run_accuracy(cfg, A, root, Steps(root, log=lambda m: None), "/data", False) == acc and fake_steps == []
    # where AIMET fails the failure is the row's (the bench's "Failures" list), and the eval runs without it
    record["failure"] = missing
    monkeypatch.setattr(artifacts, "versions", lambda names: {"aimet-torch": None})  # a new key: aimet-torch uninstalled
    acc = run_accuracy(cfg, A, root, Steps(root, log=lambda m: None), "/data", False)
    assert [name for name, _ in fake_steps] == ["calibration_images", "aimet", "eval"]
    assert acc["methods"]["aimet_adaround"]["failure"] == missing
    assert f.name not in [kw["files"] for name, kw in fake_steps if name == "eval"][0]
    row = [r for r in method_rows({**acc, "eval": {"artifacts": {}}}, {}) if r["method"] == "aimet_adaround"][0]
    assert row["failure"] == missing and "accuracy" not in row


def test_ceiling_step_reads_the_reconstruction_of_the_ptq_step(tmp_path, fake_steps, monkeypatch):
    """accuracy.ceiling_recipes (issue 19's anchors): a cached step per recipe; a reconstruction recipe
    prepares from a copy of its ptq step's checkpoint (the same learnt plan as its artifacts), another
    without one; the evaluation images are the eval step's (its dataset, limit and seed); a table row each."""
    from types import SimpleNamespace

    from care_q.bench import accuracy, artifacts, benchmarks
    from care_q.bench.accuracy import run_accuracy
    from care_q.bench.schema import SUITE, load_suite
    from care_q.bench.steps import Steps
    from care_q.quant.recipe import load_recipe

    fake_ptq = artifacts.ptq

    def ptq(model, *, recipe, out, **kw):
        rep = fake_ptq(model, recipe=recipe, out=out, **kw)
        if load_recipe(recipe).reconstruction is not None:
            (Path(out) / "reconstruction.pt").write_bytes(b"learnt " + recipe.encode())
        return rep

    def prepare(cfg):
        ck = cfg.checkpoint
        fake_steps.append(("prepare", {"recipe": cfg.recipe, "checkpoint": ck and (ck.parent.name, ck.read_bytes()),
                                       "num_calib": cfg.num_calib, "seed": cfg.seed}))
        return SimpleNamespace(preprocess="pre", reconstruction={"resumed_units": 23, "seconds": 2.0} if ck else None)

    def draw_images(source, pre, n, seed, data_root=None):
        fake_steps.append(("draw", {"source": source, "n": n, "seed": seed}))
        return torch.zeros(3)

    def draw_labelled(source, pre, n, seed, data_root=None):
        fake_steps.append(("draw_labelled", {"source": source, "pre": pre, "n": n, "seed": seed}))
        return torch.zeros(3), torch.zeros(3)

    def noise_reference(net, x, y, sqnr):
        fake_steps.append(("noise", {"net": net, "sqnr": sqnr}))
        return {"logit_sqnr_db": sqnr, "images": 10000, "draws": 20,
                "top1_agreement": {"mean": 0.9801, "low": 0.9783, "high": 0.9822},
                "top1_drop": {"mean": 0.117, "sd": 0.1, "low": -0.04, "high": 0.28, "draws": [0.05, 0.1, 0.12, 0.3]}}

    split = {"top1_agreement": 0.9712, "logit_sqnr_db": 23.04}
    monkeypatch.setattr(accuracy, "draw_labelled", draw_labelled)
    monkeypatch.setattr(accuracy, "noise_reference", noise_reference)
    monkeypatch.setattr(accuracy, "load_network", lambda model, weights, seed: SimpleNamespace(eval=lambda: model))
    monkeypatch.setattr(accuracy, "load_sidecar", lambda w: SimpleNamespace(input_size=(3, 64, 64),
                                                                           with_size=lambda size: f"pre{size}"))
    monkeypatch.setattr(artifacts, "ptq", ptq)
    monkeypatch.setattr(accuracy, "prepare", prepare)
    monkeypatch.setattr(accuracy, "draw_images", draw_images)
    monkeypatch.setattr(accuracy, "calib_tensor", lambda prep: torch.zeros(2))
    monkeypatch.setattr(accuracy, "fidelity_ceiling", lambda prep, x, c: {
        "held_out": {"int8": {**split, "noise_agreement": 0.9791}, "weights_alone": split, "activations_alone": split},
        "calibration": {"int8": split}, "images": {"held_out": 10000, "calibration": 1000}})
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "care_s0_cifar10_64.pth").write_bytes(b"trained")
    cfg = load_suite(SUITE, quick=True, shared=tmp_path)
    A = {**cfg["accuracy"], "extra_recipes": ["ptq_int8", "ptq_int8_recon"],
         "ceiling_recipes": ["ptq_int8", "ptq_int8_recon"]}
    root = tmp_path / "bench"
    acc = run_accuracy(cfg, A, root, Steps(root, log=lambda m: None), "/data", False)
    assert [kw for name, kw in fake_steps if name == "prepare"] == [
        {"recipe": "ptq_int8", "checkpoint": None, "num_calib": 200, "seed": cfg["seed"]},
        {"recipe": "ptq_int8_recon", "checkpoint": ("ceiling_ptq_int8_recon", b"learnt ptq_int8_recon"),
         "num_calib": 200, "seed": cfg["seed"]}]
    assert [kw for name, kw in fake_steps if name == "draw"] == [
        {"source": A["dataset"], "n": A["limit"], "seed": cfg["seed"]}] * 2
    assert acc["ceilings"]["ptq_int8_recon"]["reconstruction"] == {"resumed_units": 23, "seconds": 2.0}
    from care_q.eval.report import to_markdown
    text = to_markdown(benchmarks.ceiling_blocks({"accuracy": acc, "config": cfg}))
    assert "| `ptq_int8_recon` | 97.12% / 23.0 dB (noise 97.91%) | 97.12% / 23.0 dB |" in text
    assert "on the 10000 test images whole" in text and "the 1000 calibration images" in text
    # one noise reference at issue 19's SQNR target, on the eval step's images and labels, the FP32 proxy model
    assert [kw for name, kw in fake_steps if name == "draw_labelled"] == [
        {"source": A["dataset"], "pre": "pre64", "n": A["limit"], "seed": cfg["seed"]}]
    assert [kw for name, kw in fake_steps if name == "noise"] == [{"net": "care_s0", "sqnr": 22.5}]
    assert ("at the target's 22.5 dB (20 draws on the 10000 test images) keeps the top-1 of 98.01% of them "
            "(97.83%–98.22%, 5th–95th percentile) and drops top-1 by 0.12 pt (sd 0.10, -0.04 to +0.28): 2 of the 4 "
            "draws meet the drop target (<= 0.1 pt)") in text
    fake_steps.clear()
    assert run_accuracy(cfg, A, root, Steps(root, log=lambda m: None), "/data", False)["ceilings"] == acc["ceilings"]
    assert not [name for name, _ in fake_steps if name in ("prepare", "noise")]  # cached


def test_ceiling_recipes_must_be_evaluated(tmp_path):
    from care_q.bench.schema import SUITE, load_suite

    bad = tmp_path / "s.yaml"
    bad.write_text(SUITE.read_text().replace("ceiling_recipes: [ptq_int8, ptq_int8_recon]",
                                             "ceiling_recipes: [ptq_int8, npu_int8]"))
    with pytest.raises(CareQError, match="recipe 'npu_int8' is not evaluated in the accuracy section"):
        load_suite(bad, shared=tmp_path)


@pytest.mark.parametrize(("extra", "match"), [("[qat_int8]", "is a qat recipe"),
                                              ("[ptq_int8_cpu]", "already in the accuracy section"),
                                              ("[nope]", "unknown recipe 'nope'")])
def test_extra_recipes_errors(tmp_path, extra, match):
    from care_q.bench.schema import SUITE, load_suite

    bad = tmp_path / "s.yaml"
    text = SUITE.read_text()
    listed = "extra_recipes: [ptq_int8, ptq_int8_recon, ptq_w4a8_recon, npu_int8_ptq, npu_int8_ptq_ethosu]"
    bad.write_text(text.replace(listed, f"extra_recipes: {extra}"))
    with pytest.raises(CareQError, match=match):
        load_suite(bad, shared=tmp_path)


def test_qat_recipe_option_runs_only_the_named_recipes(tmp_path, monkeypatch):
    """`--qat-recipe npu_int8`: the QAT section trains that recipe only, and the table names the others as not run."""
    from care_q.bench import suite

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "care_s0_cifar10_64.pth").write_bytes(b"trained")
    ran = []
    monkeypatch.setattr(suite, "run_qat", lambda cfg, Q, *a: ran.append(list(Q["recipes"])) or {})
    out = tmp_path / "bench"
    res = suite.run_suite(suite.SUITE, quick=True, out=out, benchmarks=tmp_path / "B.md", shared=tmp_path,
                          sections=("qat",), qat_recipes=["npu_int8"], log=lambda m: None)
    assert ran == [["npu_int8"]] and res["qat_left_out"] == ["qat_w4a8_mlp", "qat_int8"]
    assert ("**QAT recipes not run this time: qat_w4a8_mlp, qat_int8** (`--qat-recipe` npu_int8)"
            in (tmp_path / "B.md").read_text())
    with pytest.raises(CareQError, match=r"--qat-recipe qat_int4: not in the suite's qat.recipes"):
        suite.run_suite(suite.SUITE, quick=True, out=out, shared=tmp_path, sections=("qat",), qat_recipes=["qat_int4"])
    assert suite.main(["--quick", "--out", str(out), "--shared", str(tmp_path), "--only", "qat",
                       "--qat-recipe", "qat_int4"]) == 2
