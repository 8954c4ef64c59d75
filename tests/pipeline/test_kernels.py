"""recipe tflite.kernels: measured: float islands in the .tflite, chosen from a kernel profile, exact vs the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from care_q import create_model
from care_q.errors import CareQError
from care_q.export.tflite_int8 import emit_tflite_int8
from care_q.export.tflite_profile import PROFILE_FORMAT, op_forms, save_profile
from care_q.graph.trace import trace
from care_q.pipeline.kernels import candidates, choose_kernels
from care_q.ptq import ptq
from care_q.quant.calibrate import calibrate
from care_q.quant.fakequant import QuantOps
from care_q.quant.plan import build_plan
from care_q.quant.recipe import load_recipe
from care_q.runtime import load_runner
from care_q.transforms import deploy

SIZE = 32


@pytest.fixture(scope="module")
def calibrated():
    torch.manual_seed(0)
    model = deploy(create_model("care_test", num_classes=10))
    plan = build_plan(trace(model, torch.zeros(1, 3, SIZE, SIZE)), load_recipe("ptq_int8_cpu"))
    cal = torch.randn(32, 3, SIZE, SIZE)
    calibrate(plan, model, [cal[i:i + 16] for i in range(0, 32, 16)], progress=False)
    return model, plan


def _float_outputs(data: bytes) -> dict[str, int]:
    """op kind -> how many of its ops write float32 tensors."""
    out: dict[str, int] = {}
    for f in op_forms(data, islands=False):
        if f.dtype == "float32":
            out[f.op] = out.get(f.op, 0) + 1
    return out


def _matches_reference(model, plan, data, tmp_path):
    path = tmp_path / "m.tflite"
    path.write_bytes(data)
    x = torch.randn(24, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x, QuantOps(plan, "quant", exact="xnnpack")).numpy()
    got = load_runner(path, threads=1)(x.numpy())
    return np.abs(got - ref).max() / np.abs(ref).max(), (got.argmax(1) == ref.argmax(1)).mean()


def test_profile_picks_the_faster_form_and_the_file_matches_its_reference(calibrated, tmp_path):
    model, plan = calibrated
    cand = candidates(plan)
    assert sorted(set(cand.values())) == ["add", "div", "elu", "gelu"]
    plan.float_kernels = frozenset()
    data = emit_tflite_int8(plan)
    # a profile in which only DIV's island is faster (as measured on x86: TFLite's int8 DIV is slow)
    ops = {f.signature: ({"int8_ms": 1.0, "float_ms": 0.1} if f.op == "DIV" else {"int8_ms": 1.0, "float_ms": 2.0})
           for f in op_forms(data)}
    save_profile({"format": PROFILE_FORMAT, "device": "test phone", "ops": ops}, tmp_path / "p.json")
    section = choose_kernels(plan, profile=tmp_path / "p.json")
    divs = {n for n, op in cand.items() if op == "div"}
    assert plan.float_kernels == divs and section["float_by_op"] == {"div": 3}
    assert section["device"] == "test phone" and section["one_op_ms"]["chosen"] == pytest.approx(
        section["one_op_ms"]["int8"] - 3 * 0.9)
    mixed = emit_tflite_int8(plan)
    fl = _float_outputs(mixed)
    # the 3 DIVs write float (then QUANTIZE); their 2 inputs each are dequantized once
    assert fl["DIV"] == 3 and fl["DEQUANTIZE"] == 2 + 2 * 3
    err, agree = _matches_reference(model, plan, mixed, tmp_path)
    assert err <= 1e-4 and agree == 1.0


def test_every_candidate_as_an_island_matches_the_reference(calibrated, tmp_path):
    model, plan = calibrated
    plan.float_kernels = frozenset(candidates(plan))
    data = emit_tflite_int8(plan)
    fl = _float_outputs(data)
    assert fl["GELU"] >= 6 and fl["ELU"] == 6 and fl["ADD"] > 0
    err, agree = _matches_reference(model, plan, data, tmp_path)
    # measured: bit for bit (max diff 0); the bound leaves the float head's round-off, as for int8 files
    assert err <= 1e-4 and agree == 1.0
    plan.float_kernels = frozenset({"stem"})
    with pytest.raises(CareQError, match="cannot run as a float island"):
        emit_tflite_int8(plan)
    plan.float_kernels = frozenset()


def test_kernel_profile_needs_a_measured_recipe(tmp_path):
    with pytest.raises(CareQError, match="--kernel-profile: recipe 'ptq_int8' writes every op int8"):
        ptq("care_test", recipe="ptq_int8", img_size=SIZE, kernel_profile=tmp_path / "p.json", out=tmp_path / "o")
    with pytest.raises(CareQError, match="does not exist"):
        ptq("care_test", recipe="ptq_int8_cpu", img_size=SIZE, kernel_profile=tmp_path / "p.json", out=tmp_path / "o")
