"""QAT: steps lower the loss, exports agree with the fake-quant model, exact resume, recipe/input errors."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image

from care_q import CareQError
from care_q.cli import main
from care_q.data import get_dataset
from care_q.models import load_sidecar
from care_q.qat import distill_loss, load_qat, qat
from care_q.quant.recipe import parse_recipe
from care_q.train import train

COLORS = {"blue": (40, 60, 200), "green": (40, 200, 60), "red": (210, 50, 40)}

W4_RECIPE = """\
name: w4_everywhere
kind: qat
weights: {dtype: int4}
activations: {method: minmax}
qat: {lr: 0.0001, batch_size: 8, ce_weight: 0.0, distill_weight: 1.0, temperature: 4.0,
      learn_scales: true, scale_lr: 0.0001, checkpoint_every: 0}
"""

INT8_RECIPE = """\
name: int8_resume
kind: qat
weights: {dtype: int8}
activations: {method: minmax}
qat: {lr: 0.001, batch_size: 8, learn_scales: true, checkpoint_every: 2, warmup_steps: 2}
"""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_toy(root: Path, classes=tuple(COLORS), n: int = 16) -> Path:
    """Easy classes (coloured noise), ``n`` 32x32 images each."""
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng(zlib.crc32(f"{c}{i}".encode()))
            arr = np.clip(np.array(COLORS[c])[None, None] + rng.integers(-90, 90, (32, 32, 3)), 0, 255)
            Image.fromarray(arr.astype(np.uint8)).save(root / c / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qat")


@pytest.fixture(scope="module")
def toy(work) -> Path:
    return make_toy(work / "toy")


@pytest.fixture(scope="module")
def fp32(work, toy) -> Path:
    """care_test trained briefly in FP32 on the toy set (separates the classes), with its sidecar."""
    res = train("care_test", str(toy), img_size=32, epochs=4, out=work / "fp32", batch_size=8, lr=3e-3,
                warmup_steps=0, seed=0, progress=False, log=lambda *a: None)
    return res.checkpoint


def _recipe(work: Path, text: str, name: str) -> Path:
    p = work / f"{name}.yaml"
    p.write_text(text)
    return p


def _run(work, toy, fp32, out, recipe, **kw):
    args = dict(calib_images=16, seed=0, progress=False, log=lambda *a: None, threads=1, batch_size=8)
    args.update(kw)
    return qat("care_test", fp32, str(toy), recipe=recipe, out=work / out, **args)


@pytest.fixture(scope="module")
def w4run(work, toy, fp32):
    rep = _run(work, toy, fp32, "w4", _recipe(work, W4_RECIPE, "w4"), epochs=3, eval_dataset=str(toy),
               num_verify=48)
    return work / "w4", rep


def _fixed_batch(toy, fp32):
    ds = get_dataset(str(toy), load_sidecar(fp32))
    return torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor(ds.targets)


def _kd(run, x, y) -> float:
    with torch.no_grad():
        return float(distill_loss(run.qnet(x), run.teacher(x), y, 0.0, 1.0, 4.0)[0])


def test_qat_run_lowers_the_loss(w4run, toy, fp32):
    """The fixed batch's distillation loss: PTQ start (start.pt) vs after 18 QAT steps (last.pt)."""
    out, rep = w4run
    x, y = _fixed_batch(toy, fp32)
    start, last = load_qat(out / "start.pt"), load_qat(out / "last.pt")
    before, after = _kd(start, x, y), _kd(last, x, y)
    assert before > 2e-4 and after < 0.5 * before, (before, after)
    # straight-through gradients reached the weights and the LSQ scales
    assert float((last.qnet.log_scales - start.qnet.log_scales).detach().abs().max()) > 2e-4
    w0, w1 = start.qnet.student.stem.weight, last.qnet.student.stem.weight
    assert float((w1 - w0).detach().abs().max()) > 2e-4
    assert rep["finished"] and rep["train"]["steps"] == 18 and len(rep["train"]["history"]) == 3
    assert rep["train"]["this_session_images_per_s"] > 0


def test_export_agrees_with_fake_quant(w4run):
    out, rep = w4run
    assert set(rep["artifacts"]) == {"tflite", "onnx"}
    for t, a in rep["artifacts"].items():
        v = a["verification"]
        assert v["images"] == 48 and v["top1_agreement"] == 1.0 and v["max_abs_diff"] < 1e-5, (t, v)
        assert Path(a["path"]).exists()
    saved = json.loads((out / "report.json").read_text())
    assert saved["accuracy"]["qat_top1"] >= 90.0  # the toy classes stay separated with int4 weights
    assert "## Artifacts" in (out / "report.md").read_text()
    # int4 weights are stored as int8 containers holding at most 15 levels per output channel
    m = onnx.load(out / "care_test_w4_everywhere_qdq.onnx")
    w = numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == "stages.2.blocks.0.inter1_fc1.weight/q"))
    levels = max(len(np.unique(w[c])) for c in range(w.shape[0]))
    assert 8 <= levels <= 15, levels
    assert len(rep["int4_convs"]) > 20


def test_write_back_dithers_learnt_scales_off_rounding_ties(w4run):
    """LSQ settles scales on rounding ties; write_back moves each by its own factor within 1e-4."""
    q = load_qat(w4run[0] / "last.pt").qnet
    learnt = {r: float(torch.exp(q.log_scales[i].detach().double())) for r, i in q.index.items()}
    q.write_back()
    ratios = torch.tensor([q.plan.qparams[r].scale[0] / s for r, s in learnt.items()], dtype=torch.float64)
    assert float((ratios - 1).abs().max()) <= 1.0001e-4
    assert float((ratios - 1).abs().median()) > 1e-6 and len(set(ratios.tolist())) > 0.9 * len(ratios)
    # the divisor guards follow the written-back scales (one LSB)
    den = [n for n in q.plan.graph.nodes if n.name.endswith(".den_eps")]
    assert den and all(q.plan.consts[n.name] >= q.plan.qp(n.outputs[0]).scale[0] for n in den)


def test_int8_io_recipe_exports_and_agrees(work, toy, fp32):
    """qat_int8_full: int8 input and output (logits range re-measured after training); one step."""
    rep = _run(work, toy, fp32, "full_io", "qat_int8_full", epochs=0.2, lr=1e-4, num_verify=32)
    assert rep["finished"] and rep["train"]["steps"] == 1 and rep["io"] == "int8"
    for t, a in rep["artifacts"].items():
        assert a["verification"]["max_abs_diff"] == 0.0 and a["verification"]["top1_agreement"] == 1.0, (t, a["verification"])
    m = onnx.load(rep["artifacts"]["onnx"]["path"])
    assert m.graph.input[0].type.tensor_type.elem_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)


@pytest.fixture(scope="module")
def full(work, toy, fp32):
    """An uninterrupted 9-step run (checkpoints every 2 steps)."""
    rep = _run(work, toy, fp32, "full", _recipe(work, INT8_RECIPE, "int8"), epochs=1.5, targets=[])
    assert rep["finished"] and rep["train"]["steps"] == 9
    return work / "full"


def _same_final_state(a_dir: Path, b_dir: Path) -> None:
    a = torch.load(a_dir / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(b_dir / "last.pt", map_location="cpu", weights_only=True)
    assert a["step"] == b["step"] == 9
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=1e-6, msg=k)
    start = _start(a_dir)
    moved = max(float((v - start[k]).abs().max()) for k, v in a["model"].items())
    assert moved > 1e-4  # the weights did train
    assert a["plan"] == b["plan"]
    keys = ("epoch", "step", "loss", "ce", "kd")
    assert [{k: h[k] for k in keys} for h in a["history"]] == [{k: h[k] for k in keys} for h in b["history"]]


def test_resume_after_max_steps_equals_uninterrupted(work, toy, fp32, full):
    recipe = work / "int8.yaml"
    part = _run(work, toy, fp32, "part", recipe, epochs=1.5, targets=[], max_steps=4)
    assert not part["finished"] and part["train"]["steps"] == 4
    ck = torch.load(work / "part" / "last.pt", map_location="cpu", weights_only=True)
    assert ck["step"] == 4 and {"model", "plan", "optimizer", "scheduler", "rng", "config"} <= set(ck)
    assert "log_scales" in ck["model"]
    with pytest.raises(CareQError, match="already holds a QAT run"):
        _run(work, toy, fp32, "part", recipe, epochs=1.5, targets=[])
    with pytest.raises(CareQError, match="other settings.*lr"):
        _run(work, toy, fp32, "part", recipe, epochs=1.5, targets=[], resume=True, lr=5e-4)
    # an export-only change (which TFLite kernel runs the 7x7 depthwise convs) does not block the resume
    export_only = work / "int8_builtin_dw.yaml"
    export_only.write_text(recipe.read_text() + "tflite: {large_dwconv: builtin}\n")
    done = _run(work, toy, fp32, "part", export_only, epochs=1.5, targets=[], resume=True)
    assert done["finished"] and done["train"]["steps"] == 9
    _same_final_state(full, work / "part")


def test_resume_after_a_crash_loses_only_the_steps_since_the_checkpoint(work, toy, fp32, full, monkeypatch):
    """The process dies inside step 6 (as under kill -9, nothing is saved then): last.pt holds step 4."""
    import care_q.qat.pipeline as pipeline

    calls = []
    real = pipeline.distill_loss

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "distill_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        _run(work, toy, fp32, "crash", work / "int8.yaml", epochs=1.5, targets=[])
    monkeypatch.setattr(pipeline, "distill_loss", real)
    assert torch.load(work / "crash" / "last.pt", map_location="cpu", weights_only=True)["step"] == 4
    assert not list((work / "crash").glob(".*.tmp"))  # no half-written files
    done = _run(work, toy, fp32, "crash", work / "int8.yaml", epochs=1.5, targets=[], resume=True)
    assert done["finished"] and done["train"]["steps"] == 9
    _same_final_state(full, work / "crash")


def _start(out: Path) -> dict:
    return torch.load(out / "start.pt", map_location="cpu", weights_only=True)["model"]


# ---------------------------------------------------------------------- errors before training

@pytest.mark.parametrize("text,match", [
    ("name: x\nkind: qat\nqat: {epochs: 1, lrate: 0.1}\n", r"<t>:3: unknown field 'qat.lrate'"),
    ("name: x\nweights: {dtype: int4}\n", r"<t>:2: int4 weights .* QAT recipes only"),
    ("name: x\nrules:\n  - tensors: 'a'\n    weight_dtype: int4\n", r"<t>:3: int4 weights"),
    ("name: x\nkind: qat\nqat: {schedule: linear}\n", r"'qat.schedule' is 'linear'"),
    ("name: x\nkind: qat\nrules:\n  - roles: [conv]\n    weight_dtype: int2\n", r"'rules\[0\].weight_dtype' is 'int2'"),
])
def test_recipe_schema_errors(text, match):
    with pytest.raises(CareQError, match=match):
        parse_recipe(text, "<t>")


def test_ptq_recipe_is_refused_before_anything(work, toy, fp32):
    with pytest.raises(CareQError, match="'ptq_int8' .* is a ptq recipe; care-q qat needs a QAT recipe"):
        _run(work, toy, fp32, "refused", "ptq_int8")
    assert not (work / "refused").exists()


@pytest.mark.parametrize("text,match", [
    ("name: x\nkind: qat\nqat: {freeze_bn: false}\n", "freeze_bn: false is not supported"),
    ("name: x\nkind: qat\nqat: {lr: 0}\n", r"qat.lr must be positive"),
    ("name: x\nkind: qat\nrules:\n  - roles: [gelu]\n    weight_dtype: int4\n",
     r"rule 0 .* sets weight_dtype but selects no conv"),
])
def test_bad_qat_recipes(work, toy, fp32, text, match):
    with pytest.raises(CareQError, match=match):
        _run(work, toy, fp32, "bad", _recipe(work, text, "bad"))
    assert not (work / "bad").exists()


def test_wrong_architecture_and_classes(work, toy, fp32):
    with pytest.raises(CareQError, match=r"does not fit model 'care_s0'.*'care_test' checkpoint"):
        qat("care_s0", fp32, str(toy), out=work / "arch", progress=False)
    two = make_toy(work / "two", classes=("blue", "red"), n=4)
    with pytest.raises(CareQError, match=r"has 2 classes but checkpoint .* has 3 outputs"):
        _run(work, two, fp32, "classes", "qat_int8")
    renamed = make_toy(work / "renamed", classes=("blue", "green", "red"), n=4)
    (renamed / "red").rename(renamed / "zebra")
    with pytest.raises(CareQError, match=r"differ, first at index 2: dataset 'zebra' vs model 'red'"):
        _run(work, renamed, fp32, "classes", "qat_int8")
    assert not (work / "arch").exists() and not (work / "classes").exists()


def test_cli_errors_are_one_line(work, toy, fp32, capsys):
    rc = main(["qat", "--model", "care_test", "--weights", str(fp32), "--dataset", str(toy), "--recipe",
               "ptq_int8_full", "--out", str(work / "cli")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("care-q qat: error: recipe 'ptq_int8_full'") and "\n" not in err
