"""Evaluation: metrics against hand-computed cases, `evaluate` end to end on care_test at 32x32,
isolation of runtime crashes, and the bad-input errors (artifact, classes, input size)."""

from __future__ import annotations

import math
import stat

import numpy as np
import pytest
import torch

from care_q.errors import CareQError
from care_q.eval import metrics as M

SIZE = 32
CLASSES = [f"c{i}" for i in range(10)]


# ----------------------------------------------------------------------------- metrics


def test_topk_and_accuracy_hand_computed():
    logits = np.array([[0.1, 0.9, 0.0, 0.3, 0.2, 0.5],    # ranking 1, 5, 3, 4, 0, 2
                       [2.0, 1.0, 3.0, 0.0, -1.0, 0.5],   # ranking 2, 0, 1, 5, 3, 4
                       [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])   # ranking 5, then ties 0, 1, 2, 3 (index order)
    top = M.topk(logits, 5)
    assert top.tolist() == [[1, 5, 3, 4, 0], [2, 0, 1, 5, 3], [5, 0, 1, 2, 3]]
    labels = np.array([1, 0, 4])
    assert M.topk_accuracy(top, labels, 1) == pytest.approx(1 / 3)   # only row 0
    assert M.topk_accuracy(top, labels, 2) == pytest.approx(2 / 3)   # row 1's label is 2nd
    assert M.topk_accuracy(top, labels, 5) == pytest.approx(2 / 3)   # row 2's label 4 is 6th
    with pytest.raises(CareQError, match="labels"):
        M.topk_accuracy(top, labels[:2], 1)
    with pytest.raises(CareQError, match="top 5"):
        M.topk_accuracy(top, labels, 6)


def test_agreement_drop_confusions_hand_computed():
    ref = np.array([0, 1, 2, 2, 3, 3, 3, 1])
    got = np.array([0, 2, 2, 1, 1, 1, 3, 2])
    labels = np.array([0, 1, 2, 1, 1, 3, 3, 2])
    assert M.agreement(ref, got) == pytest.approx(3 / 8)
    assert M.drop_points(0.7559, 0.7510) == pytest.approx(0.49)
    pairs = M.confusion_pairs(ref, got, names=["a", "b", "c", "d"], labels=labels)
    # flips: 1->2 (twice: rows 1, 7), 2->1 (row 3), 3->1 (rows 4, 5)
    assert [(p["ref"], p["got"], p["count"]) for p in pairs] == [(1, 2, 2), (3, 1, 2), (2, 1, 1)]
    assert pairs[0]["ref_name"] == "b" and pairs[0]["got_name"] == "c"
    assert (pairs[0]["ref_correct"], pairs[0]["got_correct"]) == (1, 1)   # row 1 label 1, row 7 label 2
    assert (pairs[1]["ref_correct"], pairs[1]["got_correct"]) == (1, 1)   # row 4 label 1, row 5 label 3
    assert (pairs[2]["ref_correct"], pairs[2]["got_correct"]) == (0, 1)   # row 3 label 1
    conf = np.array([0.9, 0.8, 0.9, 0.95, 0.3, 0.99, 0.5, 0.8])
    flips = M.biggest_flips(ref, got, conf, labels, top=3)
    assert [f["index"] for f in flips] == [5, 3, 1]   # 0.99, 0.95, then 0.8 (rows 1 and 7: lower index)


def test_summarize_and_tally():
    ref_logits = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0], [2.0, 0.0, 1.0]])
    art_logits = np.array([[3.0, 1.0, 0.0], [0.0, 1.0, 2.0], [1.0, 0.0, 2.0], [0.0, 2.0, 1.0]])
    labels = np.array([0, 1, 2, 1])
    t_ref, t_art = M.Tally(k=2), M.Tally(k=2)
    for i in range(0, 4, 2):  # two batches
        t_ref.update(ref_logits[i:i + 2])
        t_art.update(art_logits[i:i + 2], ref_logits[i:i + 2])
    assert t_art.count == 4
    s = M.summarize(t_art.top, labels, t_ref.top, t_ref.conf, names=["x", "y", "z"])
    assert s["top1"] == pytest.approx(0.75) and s["top5"] is None        # 2 classes kept
    assert s["agreement"] == pytest.approx(0.5) and s["disagreements"] == 2
    assert s["drop_top1_pt"] == pytest.approx(0.0)   # both 3/4 right: the artifact's flips cancel out
    assert [(c["ref"], c["got"]) for c in s["confusions"]] == [(0, 1), (1, 2)]
    # SQNR: signal = sum(ref^2) = 10 + 5 + 5 + 5 = 25; noise = (2-1)^2+(1-2)^2 + 2^2+2^2 = 10
    assert t_art.sqnr_db == pytest.approx(10 * math.log10(25 / 10))
    assert M.softmax_max(np.array([[0.0, 0.0]]))[0] == pytest.approx(0.5)
    with pytest.raises(CareQError, match="NaN"):
        M.Tally().update(np.array([[np.nan, 1.0]]))


def test_one_agreement_and_one_integer_op_list():
    from care_q.census.onnx_fusion import is_integer_kernel
    from care_q.utils import metrics as UM

    assert M.agreement is UM.agreement   # training, QAT and evaluation share it
    assert UM.percent_agreement(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2])) == 75.0
    integer = ["QLinearConv", "com.microsoft.QLinearAdd", "com.microsoft.QGemm", "QAttention", "MatMulInteger",
               "ConvInteger", "MatMulIntegerToFloat", "DynamicQuantizeLinear", "QOrderedMatMul"]
    other = ["Conv", "MatMul", "com.microsoft.Gelu", "QuantizeLinear", "DequantizeLinear", "QuickGelu", "Softmax"]
    assert [op for op in integer if not is_integer_kernel(op)] == []
    assert [op for op in other if is_integer_kernel(op)] == []


# ----------------------------------------------------------------------------- fixtures


def _folder(root, classes, per_class=2, size=SIZE, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{j}.png")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """care_test (10 classes) checkpoint with a 32x32 sidecar, a 20-image folder, int8 artifacts."""
    torch.set_num_threads(1)
    from care_q import create_model
    from care_q.export.onnx_qdq import emit_onnx_qdq, save_onnx
    from care_q.export.tflite_int8 import emit_tflite_int8
    from care_q.graph.trace import trace
    from care_q.models import PreprocessConfig, save_checkpoint
    from care_q.quant.calibrate import calibrate
    from care_q.quant.plan import build_plan
    from care_q.quant.recipe import load_recipe
    from care_q.transforms import deploy

    root = tmp_path_factory.mktemp("eval")
    data = _folder(root / "data", CLASSES)
    torch.manual_seed(0)
    net = create_model("care_test", num_classes=10)
    weights = root / "care_test.pth"
    save_checkpoint(net, weights, PreprocessConfig(input_size=(3, SIZE, SIZE), label_names=CLASSES, crop_pct=1.0))
    d = deploy(net)
    plan = build_plan(trace(d, torch.zeros(1, 3, SIZE, SIZE)), load_recipe("ptq_int8"))
    calibrate(plan, d, [torch.randn(16, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))], progress=False)
    arts = root / "arts"
    arts.mkdir()
    (arts / "t_int8.tflite").write_bytes(emit_tflite_int8(plan))
    save_onnx(emit_onnx_qdq(plan), arts / "t_int8_qdq.onnx")
    return {"root": root, "data": data, "weights": weights, "arts": arts, "net": net, "plan": plan}


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_end_to_end(setup):
    from care_q.data import get_dataset, make_loader
    from care_q.eval.evaluate import evaluate
    from care_q.models import load_sidecar
    from care_q.runtime import load_runner

    out = setup["root"] / "out"
    res = evaluate("care_test", weights=setup["weights"], artifacts=setup["arts"], dataset=str(setup["data"]),
                   out=out, threads=1, batch_size=8, isolate=False, progress=False, report=False)
    # the same numbers computed directly
    ds = get_dataset(str(setup["data"]), load_sidecar(setup["weights"]))
    x = torch.cat([b[0] for b in make_loader(ds, 20)])
    y = np.array(ds.targets)
    with torch.no_grad():
        ref = setup["net"](x).numpy()
    assert res["dataset"]["images"] == 20 and res["img_size"] == SIZE
    assert res["reference"]["top1"] == pytest.approx(float((ref.argmax(1) == y).mean()))
    assert set(res["artifacts"]) == {"t_int8.tflite", "t_int8_qdq.onnx"}
    for name, a in res["artifacts"].items():
        got = load_runner(setup["arts"] / name, threads=1)(x.numpy())
        m = a["metrics"]
        assert m["images"] == 20
        assert m["top1"] == pytest.approx(float((got.argmax(1) == y).mean()))
        assert m["agreement"] == pytest.approx(float((got.argmax(1) == ref.argmax(1)).mean()))
        assert m["drop_top1_pt"] == pytest.approx(100 * (res["reference"]["top1"] - m["top1"]))
        assert m["disagreements"] == int((got.argmax(1) != ref.argmax(1)).sum())
        assert a["source"] == "int8" and a["census"]["int8"]
    assert res["artifacts"]["t_int8.tflite"]["census"]["xnnpack"]["partitions"] >= 1
    assert (out / "report.json").exists()
    # the cache: a second run reuses every prediction file and gives identical metrics
    cached = sorted(p.name for p in (out / ".cache").iterdir())
    assert len(cached) == 3
    again = evaluate("care_test", weights=setup["weights"], artifacts=setup["arts"], dataset=str(setup["data"]),
                     out=out, threads=1, batch_size=8, isolate=False, progress=False, report=False)
    assert sorted(p.name for p in (out / ".cache").iterdir()) == cached
    assert again["artifacts"]["t_int8.tflite"]["metrics"] == res["artifacts"]["t_int8.tflite"]["metrics"]

    # isolated in a child process: the same predictions
    iso = evaluate("care_test", weights=setup["weights"], artifacts=[setup["arts"] / "t_int8_qdq.onnx"],
                   dataset=str(setup["data"]), threads=1, batch_size=8, isolate=True, cache=False, progress=False)
    assert iso["artifacts"]["t_int8_qdq.onnx"]["metrics"]["top1"] == res["artifacts"]["t_int8_qdq.onnx"]["metrics"]["top1"]
    assert iso["artifacts"]["t_int8_qdq.onnx"]["metrics"]["agreement"] == \
        res["artifacts"]["t_int8_qdq.onnx"]["metrics"]["agreement"]


def test_onnx_census_and_fusion_agree_on_integer_kernels(setup):
    """The artifact census and the fusion census read onnxruntime's optimized graph with one list
    of integer kernels: they count the same ones, and none of them is a float op."""
    from care_q.census.onnx_fusion import onnx_fusion
    from care_q.eval.census import artifact_census

    path = setup["arts"] / "t_int8_qdq.onnx"
    census, fusion = artifact_census(path), onnx_fusion(path)
    assert census["integer_kernels"] == sum(fusion["integer_ops"].values()) > 0
    assert census["integer_kernels"] >= census["runtime_census"]["com.microsoft.QLinearConv"] > 0
    leaves = {op.rsplit(".", 1)[-1] for op in census["float_op_types"]}
    assert leaves.isdisjoint(fusion["integer_ops"]) and "Gelu" in leaves   # care_test's GELU stays float


def test_runtime_abort_is_a_recorded_failure(setup, tmp_path, monkeypatch):
    """A child that dies of SIGABRT (TFLite's int8 DIV kernel does that) becomes a failure entry."""
    from care_q.eval import worker

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'F tensorflow/lite/kernels/div.cc] Check failed: divisor' >&2\nkill -ABRT $$\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(worker.sys, "executable", str(fake))
    res = worker.run_isolated({"path": "x.tflite", "out": str(tmp_path / "never.npz")})
    assert res["failure"]["type"] == "abort" and res["failure"]["signal"] == "SIGABRT"
    assert "Check failed" in res["failure"]["message"]


def test_bad_inputs(setup, tmp_path):
    from care_q.eval.evaluate import evaluate

    kw = {"weights": setup["weights"], "threads": 1, "isolate": False, "progress": False}
    # an artifact that does not load: named
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.tflite").write_bytes(b"not a flatbuffer at all" * 10)
    with pytest.raises(CareQError, match=r"artifact broken.tflite does not load"):
        evaluate("care_test", artifacts=bad, dataset=str(setup["data"]), **kw)
    # dataset classes != model head: both sides named
    three = _folder(tmp_path / "three", ["a", "b", "c"], per_class=1)
    with pytest.raises(CareQError, match=r"has 3 classes but model 'care_test' .* has 10 outputs"):
        evaluate("care_test", artifacts=setup["arts"], dataset=str(three), **kw)
    # model/artifact input-size mismatch: both sizes named
    with pytest.raises(CareQError, match=r"artifact .*t_int8.tflite takes 3x32x32 inputs, but model 'care_test'.* "
                                         r"is evaluated at 3x64x64"):
        evaluate("care_test", artifacts=setup["arts"], dataset=str(setup["data"]), img_size=64, **kw)
    # artifact head != model head: both counts named
    from care_q import create_model
    from care_q.models import PreprocessConfig, save_checkpoint

    five = [f"c{i}" for i in range(5)]
    w5 = tmp_path / "five.pth"
    save_checkpoint(create_model("care_test", num_classes=5), w5,
                    PreprocessConfig(input_size=(3, SIZE, SIZE), label_names=five, crop_pct=1.0))
    data5 = _folder(tmp_path / "five", five, per_class=1)
    for art in ("t_int8.tflite", "t_int8_qdq.onnx"):
        with pytest.raises(CareQError, match=rf"class mismatch: artifact .*{art} outputs 10 classes, but model "
                                             r"'care_test' .*five.pth\) has a 5-class head"):
            evaluate("care_test", artifacts=[setup["arts"] / art], dataset=str(data5), threads=1, isolate=False,
                     progress=False, weights=w5)
    with pytest.raises(CareQError, match="holds no .tflite or .onnx"):
        evaluate("care_test", artifacts=tmp_path / "three", dataset=str(setup["data"]), **kw)
    with pytest.raises(CareQError, match="does not exist"):
        evaluate("care_test", artifacts=tmp_path / "missing", dataset=str(setup["data"]), **kw)


def test_eval_cli(setup, tmp_path, capsys):
    from care_q.cli import main

    out = tmp_path / "cli"
    rc = main(["eval", "--model", "care_test", "--weights", str(setup["weights"]), "--artifacts",
               str(setup["arts"] / "t_int8_qdq.onnx"), "--dataset", str(setup["data"]), "--threads", "1",
               "--no-isolate", "--out", str(out)])
    assert rc == 0
    assert (out / "report.md").exists() and (out / "report.html").exists()
    text = capsys.readouterr().out
    assert "t_int8_qdq.onnx" in text and "PyTorch FP32" in text
    rc = main(["eval", "--model", "care_test", "--weights", str(setup["weights"]), "--artifacts",
               str(setup["arts"]), "--dataset", str(setup["data"]), "--img-size", "64", "--out", str(out)])
    assert rc == 2
    assert "input size mismatch" in capsys.readouterr().err


def test_label_names_checked_against_dataset(setup, tmp_path):
    """A dataset whose class names differ from the sidecar's labels is refused, naming the first."""
    from care_q.eval.evaluate import evaluate

    other = _folder(tmp_path / "other", [f"k{i}" for i in range(10)], per_class=1)
    with pytest.raises(CareQError, match=r"first at index 0: dataset 'k0' vs model 'c0'"):
        evaluate("care_test", weights=setup["weights"], artifacts=setup["arts"], dataset=str(other), threads=1,
                 isolate=False, progress=False)


# ----------------------------------------------------------------------------- sensitivity


def test_sensitivity(setup, tmp_path):
    from care_q.eval.analysis import prepare_plan
    from care_q.eval.sensitivity import WEIGHT_OPS, float_except, layer_groups, sensitivity
    from care_q.quant.fakequant import QuantOps
    from care_q.quant.mixed import MixedOps

    prep = prepare_plan("care_test", weights=setup["weights"], calib=str(setup["data"]), num_calib=10, progress=False)
    plan, d = prep.plan, prep.dmodel
    groups = layer_groups(plan, "block")
    assert "stem" in groups and "stages.2.blocks.0" in groups and "stages.1.downsample" in groups
    assert all(plan.quantized(t) or plan.specs[t].op in WEIGHT_OPS for ts in groups.values() for t in ts)
    assert "head.fc" in groups["head"]   # float activations, int8 weights
    everything = {t for ts in groups.values() for t in ts}
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fp = d(x)
        # nothing quantized: exactly the float interpretation (weights included); everything: exactly QuantOps
        assert torch.equal(d(x, MixedOps(float_except(plan, set()), "quant")), d(x, QuantOps(plan, "float")))
        assert torch.allclose(d(x, QuantOps(plan, "float")), fp, rtol=0, atol=1e-6 * float(fp.abs().max()))
        assert torch.equal(d(x, MixedOps(float_except(plan, everything), "quant")), d(x, QuantOps(plan, "quant")))
        one = d(x, MixedOps(float_except(plan, set(groups["stages.2.blocks.0"])), "quant"))
        assert not torch.equal(one, fp)
    assert plan.quantized("stem")  # the original plan is untouched
    roles = layer_groups(plan, "role")
    assert "attn_den" in roles and all(plan.specs[t].role.value == "attn_den" for t in roles["attn_den"])

    res = sensitivity("care_test", weights=setup["weights"], calib=str(setup["data"]), num_eval=12, prepared=prep,
                      by="stage", out=tmp_path / "sens", progress=False)
    stages = layer_groups(plan, "stage")
    assert set(stages) == {"stem", "stages.0", "stages.1", "stages.2", "stages.3", "head"}
    assert set(res["groups"]) == set(stages) and sorted(res["ranking"]) == sorted(stages)
    assert sum(r["tensors"] for r in res["groups"].values()) == len(everything)
    assert res["eval"]["labelled"] and res["eval"]["images"] == 12
    assert res["fp32"]["agreement"] == 1.0 and 0.0 <= res["full_int8"]["agreement"] <= 1.0
    first = res["groups"][res["ranking"][0]]
    last = res["groups"][res["ranking"][-1]]
    assert first["only"]["agreement"] <= last["only"]["agreement"] or \
        first["all_but"]["agreement"] >= last["all_but"]["agreement"]
    assert (tmp_path / "sens" / "report.md").exists() and (tmp_path / "sens" / "report.html").exists()
    with pytest.raises(CareQError, match="unknown grouping"):
        layer_groups(plan, "layer")


def test_detect_source_of_int8_io_and_float_files(tmp_path):
    """An int8-in, int8-out .tflite (the NPU recipe's: no QUANTIZE op) is int8; a float one is fp32."""
    from ai_edge_litert import schema_py_generated as fb
    from one_op import div_chain

    from care_q.eval.census import detect_source
    from care_q.export.tflite_builder import TFLiteBuilder, options

    (tmp_path / "npu.tflite").write_bytes(div_chain(1))
    b = TFLiteBuilder("float")
    x, y = b.tensor("x", (1, 4), np.float32), b.tensor("y", (1, 4), np.float32)
    b.op(fb.BuiltinOperator.ADD, [x, x], [y], fb.BuiltinOptions.AddOptions, options(fb.AddOptionsT))
    b.inputs, b.outputs = [x], [y]
    (tmp_path / "net.tflite").write_bytes(b.to_bytes())
    assert detect_source(tmp_path / "npu.tflite") == "int8"
    assert detect_source(tmp_path / "net.tflite") == "fp32"
    (tmp_path / "npu_fp32.tflite").write_bytes(div_chain(1))  # the name decides first
    assert detect_source(tmp_path / "npu_fp32.tflite") == "fp32"
