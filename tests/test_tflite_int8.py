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
    # with SiLU only the DIVs (one per attention block) stay outside XNNPACK; every int8 ADD is
    # taken although this random-init model's residual branches are ~1e-4 of their skip paths
    # (the plan floors ADD input scales at 2^-10 of the output's)
    assert info["undelegated_ops"].get("DIV") == 3
    assert "ADD" not in info["undelegated_ops"]
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


@pytest.mark.parametrize("scales,naive_differs", [((0.05, 0.031, 0.06), True), ((0.011, 0.2, 0.17), True),
                                                  ((0.1, 0.1, 0.1), False), ((0.003, 0.0045, 0.0021), False)])
def test_xnnpack_int8_add_emulation(tmp_path, scales, naive_differs):
    """One int8 ADD run by XNNPACK equals `xnnpack_add_codes` on every input pair; the float
    rounding (round half to even of the exact sum) does not."""
    from ai_edge_litert import schema_py_generated as fb

    from care_q.export.tflite_builder import TFLiteBuilder, options
    from care_q.quant.fakequant import xnnpack_add_codes

    s_a, s_b, s_o = scales
    za, zb, zo = 3, -7, -2
    b = TFLiteBuilder()
    a_t = b.tensor("a", (1, 256, 256), np.int8, s_a, za)
    b_t = b.tensor("b", (1, 256, 256), np.int8, s_b, zb)
    o_t = b.tensor("o", (1, 256, 256), np.int8, s_o, zo)
    b.op(fb.BuiltinOperator.ADD, [a_t, b_t], [o_t], fb.BuiltinOptions.AddOptions, options(fb.AddOptionsT), version=2)
    b.inputs, b.outputs = [a_t, b_t], [o_t]
    path = tmp_path / "add.tflite"
    path.write_bytes(b.to_bytes())
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=1)
    it.allocate_tensors()
    grid = np.arange(-128, 128, dtype=np.int8)
    qa, qb = np.meshgrid(grid, grid, indexing="ij")  # every pair of int8 codes
    ins = it.get_input_details()
    it.set_tensor(ins[0]["index"], qa[None])
    it.set_tensor(ins[1]["index"], qb[None])
    it.invoke()
    got = it.get_tensor(it.get_output_details()[0]["index"])[0].astype(np.int64)
    ia, ib = torch.from_numpy(qa.astype(np.int64) - za), torch.from_numpy(qb.astype(np.int64) - zb)
    emu = xnnpack_add_codes(ia, ib, s_a, s_b, s_o, -128 - zo, 127 - zo).numpy().astype(np.int64) + zo
    assert (emu == got).all(), int((emu != got).sum())
    naive = np.clip(np.round((ia.numpy() * np.float32(s_a) + ib.numpy() * np.float32(s_b)) / np.float32(s_o)) + zo, -128, 127)
    assert (naive != got).any() == naive_differs  # float rounding misses XNNPACK's on some pairs


def test_app_metadata_normalisation_and_labels(tmp_path):
    """TFLite Support metadata: mean/std in pixel units, labels.txt packed; the model runs unchanged."""
    from care_q.export.tflite_metadata import read_metadata
    from care_q.models import PreprocessConfig

    model, plan, path = _build(tmp_path)
    names = [f"class {i}" for i in range(10)]
    pre = PreprocessConfig(input_size=(3, SIZE, SIZE), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5), label_names=names)
    with_meta = tmp_path / "meta.tflite"
    with_meta.write_bytes(emit_tflite_int8(plan, preprocess=pre, model_name="care_test"))
    md = read_metadata(with_meta.read_bytes())
    assert md["name"] == "care_test" and md["min_parser_version"] == "1.0.0"
    assert md["input"]["name"] == "input_float" and md["input"]["normalization_type"] == 1
    assert md["input"]["mean"] == pytest.approx([127.5, 102.0, 76.5])
    assert md["input"]["std"] == pytest.approx([51.0, 63.75, 127.5])
    assert md["output"]["files"] == [{"name": "labels.txt", "type": 2}]  # TENSOR_AXIS_LABELS
    assert md["packed_files"]["labels.txt"].decode().splitlines() == names
    assert read_metadata(path.read_bytes()) == {}
    x = np.random.RandomState(0).randn(3, 3, SIZE, SIZE).astype(np.float32)
    assert np.array_equal(load_runner(path, threads=1)(x), load_runner(with_meta, threads=1)(x))


# ---------------------------------------------------------------------- NPU form (recipe npu_int8)

def test_npu_attention_products_are_exact_and_normaliser_is_the_direction():
    """The NPU form's MUL + MEAN products equal the matmuls (the 1/N, 1/D cancel), and its output is
    the exact attention output's direction per token and head, scaled by out_scale."""
    from care_q.graph.ops import FloatOps
    from care_q.transforms.deploy import DeployAttention

    torch.manual_seed(0)
    ops = FloatOps()
    k, v, q = torch.rand(2, 49, 8, 1), torch.randn(2, 49, 1, 8), torch.rand(2, 49, 8, 1)
    kv = ops.mean_axis("kv", ops.mul("p", k, v), 1)
    ref_kv = k[..., 0].transpose(1, 2) @ v[:, :, 0, :] / 49
    assert torch.allclose(kv[:, 0], ref_kv, atol=1e-6)
    num = ops.mean_axis("num", ops.mul("p", q, kv), 2)
    assert torch.allclose(num[:, :, 0], q[..., 0] @ ref_kv / 8, atol=1e-6)

    class ExactKernel(FloatOps):  # the NPU graph with elu + 1 back, to isolate the rewrite
        def relu(self, name, x):
            return torch.nn.functional.elu(x) + 1

        def mul_const(self, name, x, value):
            return x if name.endswith("phi_exp") else super().mul_const(name, x, value)

        def add(self, name, a, b):
            return a if name.endswith(".phi") else a + b

    att = DeployAttention(torch.nn.Conv2d(16, 32, 1), 16, 2)
    x = torch.randn(2, 16, 7, 7)
    exact = att(x, FloatOps(), "a")
    att.phi_aff, att.phi_exp_scale = torch.nn.Conv2d(32, 32, 1, groups=32), 1.0
    att.out_scale = torch.nn.Parameter(torch.full((16,), 2.0))
    att.mode = "npu"
    got = att(x, ExactKernel(), "a")
    per_head = exact.reshape(2, 2, 8, 49)
    direction = per_head / per_head.norm(dim=2, keepdim=True)
    assert torch.allclose(got.reshape(2, 2, 8, 49), 2.0 * direction, atol=1e-5)


def test_npu_int8_maps_whole_on_edgetpu_and_nnapi_fl6(tmp_path):
    from care_q.census import check
    from care_q.transforms.substitute import npu_attention

    torch.manual_seed(0)
    cal = torch.randn(32, 3, SIZE, SIZE)
    model = npu_attention(_model(silu=True), cal[:8])
    plan = build_plan(trace(model, torch.zeros(1, 3, SIZE, SIZE)), load_recipe("npu_int8"))
    calibrate(plan, model, [cal[i:i + 16] for i in range(0, 32, 16)], progress=False)
    assert plan.qp("stages.2.blocks.0.attn.h0.l2").scale[0] == 1 / 128  # TFLite's fixed L2 output
    assert plan.qp("stages.2.blocks.0.attn.h0.out") == plan.qp("stages.2.blocks.0.attn.h0.l2")
    path = tmp_path / "npu.tflite"
    path.write_bytes(emit_tflite_int8(plan, io="int8"))
    census = tflite_op_census(path)
    for op in ("ELU", "DIV", "BATCH_MATMUL", "EXP", "SELECT"):
        assert op not in census, op
    assert census["GELU"] == 1 and census["L2_NORMALIZATION"] == 3 * 2  # head GELU; 3 blocks x 2 heads
    rep = check(path, targets=("edgetpu", "nnapi:6"), runtime=False)
    ops = rep.ops
    pool = next(i for i, o in enumerate(ops) if o.output_name == "head.pool")
    for key, t in rep.targets.items():  # every op up to the classifier head on the accelerator
        off = [f"#{i} {ops[i].name}" for i in range(pool + 1) if i not in t.on_accelerator]
        assert not off, (key, off)
    assert rep.targets["edgetpu"].edgetpu.first_unmapped == pool + 1  # the head's DEQUANTIZE
    # the runtime computes what the fake-quant reference computes (the runner quantizes the input
    # and dequantizes the int8 logits with the model's parameters)
    x = torch.randn(24, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x, QuantOps(plan, "quant")).numpy()
    got = load_runner(path, threads=1)(x.numpy())
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.95
    assert np.abs(got - ref).max() <= 8 * plan.qp(plan.graph.output).scale[0]
