"""int8 TFLite export: runs in ai-edge-litert, matches the fake-quant reference, no float islands."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from care_q import create_model
from care_q.export.tflite_int8 import emit_tflite_int8
from care_q.graph.trace import trace
from care_q.quant.calibrate import calibrate
from care_q.quant.fakequant import QuantOps
from care_q.quant.plan import build_plan
from care_q.quant.recipe import load_recipe
from care_q.runtime import load_runner, tflite_op_census
from care_q.transforms import deploy
from care_q.transforms.substitute import gelu_to_silu

SIZE = 32


def _model(silu=False):
    torch.manual_seed(0)
    m = deploy(create_model("care_test", num_classes=10))
    return gelu_to_silu(m) if silu else m


def _build(tmp_path, silu=False, recipe="ptq_int8", io="float"):
    torch.manual_seed(0)
    model = _model(silu)
    plan = build_plan(trace(model, torch.zeros(1, 3, SIZE, SIZE)), load_recipe(recipe))
    cal = torch.randn(32, 3, SIZE, SIZE)
    calibrate(plan, model, [cal[i:i + 16] for i in range(0, 32, 16)], progress=False)
    path = tmp_path / "m.tflite"
    path.write_bytes(emit_tflite_int8(plan, io=io))
    return model, plan, path


@pytest.mark.parametrize("silu", [False, True])
def test_tflite_matches_fake_quant(tmp_path, silu):
    model, plan, path = _build(tmp_path, silu)
    x = torch.randn(24, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x, QuantOps(plan, "quant", exact=True)).numpy()
    runner = load_runner(path, threads=1)
    got = runner(x.numpy())
    scale = np.abs(ref).max()
    # the exact reference emulates the integer kernels: XNNPACK's output is the same up to
    # float round-off in the float head (measured 3e-7 of the logit scale)
    assert np.abs(got - ref).max() <= 1e-4 * scale
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_op_census_no_float_islands(tmp_path):
    _, plan, path = _build(tmp_path)
    census = tflite_op_census(path)
    # QUANTIZE: the input and the LayerNorm output (int8 head); DEQUANTIZE: before the head's
    # float GELU/LayerNorm and at the logits; nothing else converts
    assert census["QUANTIZE"] == 2 and census["DEQUANTIZE"] == 2
    assert "EXP" not in census and "SELECT" not in census and "SELECT_V2" not in census  # ELU stays ELU
    assert census["ELU"] == 2 * 3  # two kernels in each of the 3 attention blocks of care_test
    assert census["BATCH_MATMUL"] == 3 * 3 and census["DIV"] == 3
    from ai_edge_litert import schema_py_generated as fb

    m = fb.ModelT.InitFromPackedBuf(path.read_bytes(), 0)
    sg = m.subgraphs[0]
    head_ops = {"DEQUANTIZE", "GELU", "MEAN", "SUB", "MUL", "ADD", "RSQRT", "QUANTIZE", "FULLY_CONNECTED"}
    names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    seen_dequant = False
    for op in sg.operators:
        code = names[m.operatorCodes[op.opcodeIndex].builtinCode]
        if code == "DEQUANTIZE":
            seen_dequant = True
        if not seen_dequant and code != "QUANTIZE":
            # backbone: every activation int8 (constants: int8 weights, int32 bias/shapes)
            float_t = [sg.tensors[i].name for i in list(op.outputs) if sg.tensors[i].type == fb.TensorType.FLOAT32]
            assert not float_t, (code, float_t)
        if seen_dequant:
            assert code in head_ops, code
        if code == "FULLY_CONNECTED":  # the classifier: static int8, per-channel weights, int32 bias
            assert [sg.tensors[i].type for i in op.inputs] == [fb.TensorType.INT8, fb.TensorType.INT8,
                                                               fb.TensorType.INT32]
            assert len(sg.tensors[op.inputs[1]].quantization.scale) == 10
            assert sg.tensors[op.outputs[0]].type == fb.TensorType.INT8
    for t in sg.tensors:
        if t.type == fb.TensorType.INT8 and t.quantization is not None and t.buffer == 0:
            assert len(t.quantization.scale) == 1


def test_xnnpack_delegation(tmp_path):
    _, _, path = _build(tmp_path, silu=True)
    info = load_runner(path, threads=1).delegate_info
    # with SiLU only the DIVs (one per attention block) stay outside XNNPACK
    assert info["undelegated_ops"].get("DIV") == 3
    assert "GELU" not in info["undelegated_ops"] or info["undelegated_ops"]["GELU"] <= 1  # float head GELU


def test_int8_io(tmp_path):
    model, plan, path = _build(tmp_path, io="int8")
    runner = load_runner(path, threads=1)
    assert runner.input_dtype == np.int8
    x = torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x, QuantOps(plan, "quant", exact=True)).numpy()
    got = runner(x.numpy())
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.75
