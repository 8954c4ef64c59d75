"""int8 TFLite export: runs in ai-edge-litert, matches the fake-quant reference, no float islands."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from one_op import run_one_op

from care_q import create_model
from care_q.export.tflite_int8 import emit_tflite_int8
from care_q.graph.trace import trace
from care_q.quant.calibrate import calibrate
from care_q.quant.emulation.tflite import (
    multiply_by_quantized_multiplier,
    tflite_conv_requant_codes,
    tflite_div_codes,
    tflite_l2norm_codes,
    tflite_quantize_multiplier,
    tflite_relu_codes,
)
from care_q.quant.emulation.xnnpack import (
    xnnpack_add_codes,
    xnnpack_mean_codes,
    xnnpack_mul_codes,
    xnnpack_sigmoid_table,
)
from care_q.quant.fakequant import QuantOps, weight_scales
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


# ---------------------------------------------------------------------- TFLite's int8 kernels, emulated
# Each of `exact="xnnpack"`'s kernels equals one op run by ai-edge-litert's default interpreter
# (XNNPACK where it takes the op) bit for bit, on inputs where the float reference (the op in
# float, rounded once) does not.

def _old_float_path(y: torch.Tensor, scale: float, zp: int) -> np.ndarray:
    """Output codes of the float reference: the op's float result on the output grid."""
    from care_q.quant.fakequant import fake_quant
    from care_q.quant.qtypes import DType, QParams

    y = fake_quant(y, QParams((scale,), (zp,), DType.INT8)).double().numpy()
    return np.round(y / np.float32(scale)).astype(np.int64) + zp


def _deq(q: np.ndarray, scale: float, zp: int) -> torch.Tensor:
    return torch.from_numpy((q.astype(np.float32) - np.float32(zp)) * np.float32(scale))


def test_tflite_int8_l2_normalization_emulation():
    """L2_NORMALIZATION (TFLite's kernel: fixed-point 1/sqrt, MultiplyByQuantizedMultiplier)."""
    from ai_edge_litert import schema_py_generated as fb

    from care_q.export.tflite_builder import options
    from care_q.graph.ops import FloatOps

    rng = np.random.default_rng(0)
    zp, d = 19, 16
    q = rng.integers(-128, 128, size=(100000, d))
    q[:64] = zp  # all zero: the kernel's multiplier for 0 and 1
    q[64:128, 1:] = zp
    q[64:128, 0] = zp + np.arange(-32, 32)
    q[128:4096] = zp + rng.integers(-3, 4, size=(3968, d))  # small norms: the shift goes negative
    q = q.astype(np.int8)
    shape = (1, q.shape[0], 1, d)
    got = run_one_op(fb.BuiltinOperator.L2_NORMALIZATION, [(shape, 5.99, zp)], (shape, 1 / 128, 0), [q.reshape(shape)],
                      fb.BuiltinOptions.L2NormOptions, options(fb.L2NormOptionsT)).reshape(q.shape)
    emu = tflite_l2norm_codes(torch.from_numpy(q.astype(np.int64) - zp)).numpy().astype(np.int64)
    assert (emu == got).all(), int((emu != got).sum())
    old = _old_float_path(FloatOps().l2_norm("", _deq(q, 5.99, zp)), 1 / 128, 0)
    assert (old != got).any()  # the float reference misses the fixed-point 1/sqrt on some rows


@pytest.mark.parametrize("axes,keep,scales,float_misses", [
    ((1,), True, (0.05, -3, 0.01, 5), True), ((2,), True, (0.05, -3, 0.01, 5), True),  # mean * 5: ties
    ((1, 2), False, (0.8, 7, 0.1, 5), True),                                         # the global pool's MEAN
    ((1,), True, (3.7185768277037377, 30, 1.5686670639935663, 18), False),          # the NPU attention's (care_s0)
    ((2,), True, (22.173539187921264, 20, 5.992405934651694, 19), False)])
def test_xnnpack_int8_mean_emulation(axes, keep, scales, float_misses):
    """MEAN (XNNPACK: int32 sum, then float32 scale with the zero point folded in before rounding)."""
    from ai_edge_litert import schema_py_generated as fb

    from care_q.export.tflite_builder import options

    s_in, z_in, s_out, z_out = scales
    rng = np.random.default_rng(1)
    hi = 12 if s_in / s_out > 2.4 else 128
    q = rng.integers(-hi, hi, size=(32, 16, 16, 16)).astype(np.int8)
    out_shape = tuple(1 if i in axes else n for i, n in enumerate(q.shape) if keep or i not in axes)
    got = run_one_op(fb.BuiltinOperator.MEAN, [(q.shape, s_in, z_in)], (out_shape, s_out, z_out), [q],
                      fb.BuiltinOptions.ReducerOptions, options(fb.ReducerOptionsT, keepDims=keep),
                      consts=[np.array(axes, np.int32)])
    q_sum = torch.from_numpy(q.astype(np.int64)).sum(dim=axes, keepdim=keep)
    n = int(np.prod([q.shape[a] for a in axes]))
    emu = xnnpack_mean_codes(q_sum, n, s_in, z_in, s_out, z_out).numpy().astype(np.int64) + z_out
    assert (emu == got).all(), int((emu != got).sum())
    old = _old_float_path(_deq(q, s_in, z_in).mean(dim=axes, keepdim=keep), s_out, z_out)
    assert (old != got).any() == float_misses  # ties: the float reference rounds before the zero point


@pytest.mark.parametrize("s_in,z_in", [(0.00781257450580597, 0), (0.26198983607572673, 36), (0.0233, -100), (0.9, 5)])
def test_xnnpack_int8_logistic_emulation(s_in, z_in):
    """LOGISTIC (XNNPACK: a table of the double-precision sigmoid of every input code). At
    x = 0.0078125745 the sigmoid is 0.501953125 (128.5 / 256, a tie) in float32 from double
    precision, one float32 step above it from torch.sigmoid."""
    from ai_edge_litert import schema_py_generated as fb


    codes = np.arange(-128, 128, dtype=np.int8).reshape(1, 256)
    got = run_one_op(fb.BuiltinOperator.LOGISTIC, [((1, 256), s_in, z_in)], ((1, 256), 1 / 256, -128), [codes])[0]
    emu = xnnpack_sigmoid_table(s_in, z_in, 1 / 256, -128).numpy().astype(np.int64)
    assert (emu == got).all(), int((emu != got).sum())
    old = _old_float_path(torch.sigmoid(_deq(codes[0], s_in, z_in)), 1 / 256, -128)
    assert (old != got).any() == (s_in < 0.01)


@pytest.mark.parametrize("scales,shapes", [
    ((0.046833597123622894, 0, 0.7787519097328186, 0, 2.6152493953704834, 0), None),  # every pair of codes
    ((0.11333333333332636, -128, 0.08805882352940128, -6, 3.7185768277037377, 30), ((8, 16, 16, 1), (8, 16, 1, 16))),
    ((0.5, 3, 0.25, -5, 0.25, 7), ((8, 16, 16, 1), (8, 1, 16, 16)))])
def test_xnnpack_int8_mul_emulation(scales, shapes):
    """(Broadcast) MUL (XNNPACK qs8 vmul: exact product, float32 scale, round half to even)."""
    from ai_edge_litert import schema_py_generated as fb

    from care_q.export.tflite_builder import options

    s_a, z_a, s_b, z_b, s_o, z_o = scales
    rng = np.random.default_rng(2)
    if shapes is None:
        grid = np.arange(-128, 128, dtype=np.int8)
        qa, qb = (g[None] for g in np.meshgrid(grid, grid, indexing="ij"))
    else:
        qa, qb = (rng.integers(-128, 128, size=s).astype(np.int8) for s in shapes)
    out_shape = np.broadcast_shapes(qa.shape, qb.shape)
    got = run_one_op(fb.BuiltinOperator.MUL, [(qa.shape, s_a, z_a), (qb.shape, s_b, z_b)], (out_shape, s_o, z_o),
                      [qa, qb], fb.BuiltinOptions.MulOptions, options(fb.MulOptionsT))
    ia, ib = (torch.from_numpy(q.astype(np.int64) - z) for q, z in ((qa, z_a), (qb, z_b)))
    emu = xnnpack_mul_codes(ia, ib, s_a, s_b, s_o, -128 - z_o, 127 - z_o).numpy().astype(np.int64) + z_o
    assert (emu == got).all(), int((emu != got).sum())
    if shapes is None:  # 4 of the 65536 products: the float reference's three roundings miss XNNPACK's one
        old = _old_float_path(_deq(qa, s_a, z_a) * _deq(qb, s_b, z_b), s_o, z_o)
        assert (old != got).sum() == 4


@pytest.mark.parametrize("scales,float_misses", [
    ((0.3, 4, 0.2, -128), True), ((0.05, -7, 0.1, 3), True),  # s_in / s_out = 1.5, 0.5: ties
    ((0.19539215686272557, 22, 0.09581679310518154, -128), False)])  # care_s0's phi_relu
def test_tflite_int8_relu_emulation(scales, float_misses):
    """RELU with its own output parameters (TFLite's kernel; XNNPACK takes float RELU only)."""
    from ai_edge_litert import schema_py_generated as fb


    s_in, z_in, s_out, z_out = scales
    codes = np.arange(-128, 128, dtype=np.int8).reshape(1, 256)
    got = run_one_op(fb.BuiltinOperator.RELU, [((1, 256), s_in, z_in)], ((1, 256), s_out, z_out), [codes])[0]
    emu = tflite_relu_codes(torch.from_numpy(codes[0].astype(np.int64) - z_in), s_in, s_out, z_out).numpy()
    assert (emu.astype(np.int64) + z_out == got).all()
    old = _old_float_path(torch.relu(_deq(codes[0], s_in, z_in)), s_out, z_out)
    assert (old != got).any() == float_misses  # ties: TFLite rounds them away from zero, not to even


def test_exact_reference_bias_codes_are_the_emitters(tmp_path):
    """The exact reference's int32 conv biases are the emitted ones, also where b / (s_in * s_w)
    is a half code for the float32 rounding of s_in and not for its float64 value."""
    from ai_edge_litert import schema_py_generated as fb

    _, plan, _ = _build(tmp_path)
    n = next(n for n in plan.graph.nodes if n.op == "conv" and n.module.bias is not None)
    conv, in_name = n.module, n.inputs[0]
    s_w = weight_scales(conv.weight).double()
    s_in = plan.qp(in_name).scale[0]
    s64, s32 = s_w * s_in, s_w * float(np.float32(s_in))
    with torch.no_grad():  # between the two roundings of b / s_b: the codes differ by one if s_b does
        conv.bias.copy_((1e6 + 0.5) * (s64 + s32) / 2)
    m = fb.ModelT.InitFromPackedBuf(emit_tflite_int8(plan), 0)
    t = next(t for t in m.subgraphs[0].tensors if t.name.decode() == f"{n.name}.bias")
    emitted = np.frombuffer(bytes(m.buffers[t.buffer].data), np.int32)
    _, _, b_int = QuantOps(plan, "quant", exact="xnnpack")._int_weights(conv.weight, conv.bias, in_name)
    assert (s64 != s32).any() and (b_int.numpy() == emitted).all()


def test_npu_int8_exact_reference_is_the_tflite_runtime(tmp_path, monkeypatch):
    """`exact="xnnpack"` is the int8 TFLite model of the NPU recipe bit for bit: every op (convs,
    ADD, LOGISTIC, MUL, MEAN, L2_NORMALIZATION, RELU, the int8 head) emulated. (This random-init
    model has no tie the float reference would miss: the kernel tests above show those.)"""
    from care_q.quant import fakequant
    from care_q.transforms.substitute import npu_attention

    calls = {}

    def counting(name, fn):
        def counted(*args):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args)
        return counted

    for name in ("tflite_l2norm_codes", "xnnpack_mean_codes", "xnnpack_sigmoid_table", "xnnpack_mul_codes",
                 "tflite_relu_codes"):
        monkeypatch.setattr(fakequant, name, counting(name, getattr(fakequant, name)))
    torch.manual_seed(0)
    cal = torch.randn(32, 3, SIZE, SIZE)
    model = npu_attention(_model(silu=True), cal[:8])
    plan = build_plan(trace(model, torch.zeros(1, 3, SIZE, SIZE)), load_recipe("npu_int8"))
    calibrate(plan, model, [cal[i:i + 16] for i in range(0, 32, 16)], progress=False)
    plan.output_qparams = plan.qp(plan.graph.output)
    # as QAT does after tracing: the learned out_scale changes (its data replaced, as .to(device)
    # does); the artifact must hold the trained values, not the ones seen at trace time
    g = torch.Generator().manual_seed(1)
    scales = [m.out_scale for m in model.modules() if isinstance(getattr(m, "out_scale", None), torch.nn.Parameter)]
    assert scales
    for p in scales:
        p.data = p.data * (1.0 + 0.2 * torch.rand(p.shape, generator=g))
    path = tmp_path / "npu.tflite"
    path.write_bytes(emit_tflite_int8(plan, io="int8"))
    x = torch.randn(48, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x, QuantOps(plan, "quant", exact="xnnpack")).numpy()
    got = load_runner(path, threads=1)(x.numpy())
    assert np.array_equal(got, ref)
    assert len(calls) == 5, calls  # each op went through its kernel's emulation


def test_tflite_int8_large_depthwise_runs_in_tflite_and_is_emulated(tmp_path):
    """A 7x7 int8 depthwise conv whose bias is made at run time (RESHAPE of the constant, as the
    emitter writes it under ``tflite.large_dwconv: builtin``) stays out of XNNPACK and runs in
    TFLite's optimized kernel, whose requantization `tflite_conv_requant_codes` is bit for bit; the
    reference kernel's rounding (half away from zero) misses some codes."""
    import torch.nn.functional as F
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.interpreter import Interpreter

    from care_q.export.tflite_builder import TFLiteBuilder, options

    rng = np.random.default_rng(0)
    c, s_in, z_in, s_out, z_out = 16, 0.05, 7, 0.11, -3
    w = rng.integers(-127, 128, size=(1, 7, 7, c)).astype(np.int8)
    s_w = rng.uniform(0.002, 0.02, c)
    bias = rng.integers(-4000, 4000, size=c).astype(np.int32)
    b = TFLiteBuilder()
    x_t = b.tensor("x", (1, 64, 64, c), np.int8, s_in, z_in)
    w_t = b.const("w", w, s_w, np.zeros(c, np.int64), axis=3)
    bc = b.const("b.const", bias, s_w * s_in, np.zeros(c, np.int64), axis=0)
    b_t = b.tensor("b", (c,), np.int32, s_w * s_in, np.zeros(c, np.int64), axis=0)
    b.op(fb.BuiltinOperator.RESHAPE, [bc, b.const("shape", np.array([c], np.int32))], [b_t],
         fb.BuiltinOptions.ReshapeOptions, options(fb.ReshapeOptionsT, newShape=[c]))
    y_t = b.tensor("y", (1, 64, 64, c), np.int8, s_out, z_out)
    b.op(fb.BuiltinOperator.DEPTHWISE_CONV_2D, [x_t, w_t, b_t], [y_t], fb.BuiltinOptions.DepthwiseConv2DOptions,
         options(fb.DepthwiseConv2DOptionsT, padding=fb.Padding.SAME, strideW=1, strideH=1, depthMultiplier=1,
                 dilationWFactor=1, dilationHFactor=1), version=3)
    b.inputs, b.outputs = [x_t], [y_t]
    path = tmp_path / "dw.tflite"
    path.write_bytes(b.to_bytes())
    assert load_runner(path, threads=1).delegate_info["undelegated_ops"] == {"RESHAPE": 1, "DEPTHWISE_CONV_2D": 1}
    x = rng.integers(-128, 128, size=(1, 64, 64, c)).astype(np.int8)
    it = Interpreter(model_path=str(path), num_threads=2)
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    got = it.get_tensor(it.get_output_details()[0]["index"]).astype(np.int64)
    xi = torch.from_numpy(x.astype(np.float64) - z_in).permute(0, 3, 1, 2)
    acc = F.conv2d(xi, torch.from_numpy(w.astype(np.float64)).permute(3, 0, 1, 2), None, 1, 3, 1, c)
    acc = acc + torch.from_numpy(bias.astype(np.float64)).reshape(1, -1, 1, 1)
    emu = (tflite_conv_requant_codes(acc, s_in, s_w, s_out) + z_out).clamp(-128, 127).permute(0, 2, 3, 1).numpy()
    assert (emu == got).all(), int((emu != got).sum())
    qs = [tflite_quantize_multiplier(float(np.float32(s_in)) * float(np.float32(s)) / float(np.float32(s_out)))
          for s in s_w]
    m = torch.tensor([q for q, _ in qs]).reshape(1, -1, 1, 1)
    e = torch.tensor([k for _, k in qs]).reshape(1, -1, 1, 1)
    ref_kernel = (multiply_by_quantized_multiplier(acc.long(), m, e) + z_out).clamp(-128, 127).permute(0, 2, 3, 1)
    assert (ref_kernel.numpy() != got).sum() > 10


def test_ptq_int8_exact_reference_is_the_tflite_runtime(tmp_path):
    """ptq_int8 (7x7 depthwise convs in TFLite's kernel): `exact="xnnpack"` gives the logits of
    the .tflite bit for bit; with ``tflite.large_dwconv: xnnpack`` XNNPACK takes those convs."""
    model, plan, path = _build(tmp_path)
    n7 = sum(1 for n in plan.graph.nodes if n.op == "conv" and tuple(n.module.kernel_size) == (7, 7))
    assert n7 > 0 and plan.recipe.tflite_large_dwconv == "builtin"
    runner = load_runner(path, threads=2)
    und = runner.delegate_info["undelegated_ops"]
    assert und.get("DEPTHWISE_CONV_2D") == n7 and und.get("RESHAPE") == n7
    x = torch.randn(24, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(x, QuantOps(plan, "quant", exact="xnnpack")).numpy()
    assert np.array_equal(runner(x.numpy()), ref)
    (tmp_path / "x").mkdir()
    _, _, path_x = _build(tmp_path / "x", recipe="ptq_int8_full", io="int8")  # no tflite section: XNNPACK's
    assert "DEPTHWISE_CONV_2D" not in load_runner(path_x, threads=1).delegate_info["undelegated_ops"]


@pytest.mark.parametrize("scales,float_misses", [
    ((0.0123, 3, 0.0456, -128, 0.0311, -7), 1344),  # a numerator / a positive normaliser, as num / den
    ((0.37, -20, 0.0013, 40, 2.9, 101), 0),         # large quotients: mostly saturated
    ((0.0021, 0, 0.9, -5, 0.00017, 0), 680)])       # small quotients: right shifts of 32 and more
def test_tflite_int8_div_emulation(scales, float_misses):
    """DIV on every pair of codes (TFLite's fixed-point kernel: GetReciprocal, headroom shifts,
    RoundingDivideByPOT as compiled for x86), divisor codes equal to the zero point left out (the
    kernel aborts on them). Rounding the float quotient to the output grid, the reference before,
    misses up to 2% of the pairs."""
    from ai_edge_litert import schema_py_generated as fb

    from care_q.export.tflite_builder import options

    s_a, z_a, s_b, z_b, s_o, z_o = scales
    grid = np.arange(-128, 128)
    qa, qb = np.meshgrid(grid, grid[grid != z_b], indexing="ij")
    qa, qb = qa[None].astype(np.int8), qb[None].astype(np.int8)
    got = run_one_op(fb.BuiltinOperator.DIV, [(qa.shape, s_a, z_a), (qb.shape, s_b, z_b)], (qa.shape, s_o, z_o),
                      [qa, qb], fb.BuiltinOptions.DivOptions, options(fb.DivOptionsT))
    ia, ib = (torch.from_numpy(q.astype(np.int64) - z) for q, z in ((qa, z_a), (qb, z_b)))
    emu = tflite_div_codes(ia, ib, s_a, s_b, s_o, z_o).numpy().astype(np.int64) + z_o
    assert (emu == got).all(), int((emu != got).sum())
    old = _old_float_path(_deq(qa, s_a, z_a) / _deq(qb, s_b, z_b), s_o, z_o)
    assert int((old != got).sum()) == float_misses


def _reciprocal_recipe():
    import dataclasses

    return dataclasses.replace(load_recipe("ptq_int8"), reciprocal_normaliser=True)


def test_reciprocal_normaliser_is_exact_in_the_tflite_runtime(tmp_path):
    """transforms.reciprocal_normaliser: each attention divides the constant 1 by its (1, heads, N, 1)
    normaliser (TFLite's DIV) and multiplies the numerator by that (an int8 MUL XNNPACK takes); the
    exact reference gives the runtime's logits bit for bit."""
    from care_q.transforms.deploy import reciprocal_normaliser

    torch.manual_seed(0)
    base = deploy(create_model("care_test", num_classes=10))
    model = reciprocal_normaliser(base)
    x = torch.randn(24, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():  # the same function in FP32
        torch.testing.assert_close(model(x), base(x), rtol=1e-5, atol=1e-5)
    plan = build_plan(trace(model, torch.zeros(1, 3, SIZE, SIZE)), _reciprocal_recipe())
    n_attn = sum(1 for n in plan.graph.nodes if n.op == "reciprocal")
    assert n_attn > 0 and not any(n.op == "div" for n in plan.graph.nodes)
    assert all(plan.specs[n.name].role.value == "attn_den_inv" for n in plan.graph.nodes if n.op == "reciprocal")
    cal = torch.randn(32, 3, SIZE, SIZE)
    calibrate(plan, model, [cal[i:i + 16] for i in range(0, 32, 16)], progress=False)
    path = tmp_path / "m.tflite"
    path.write_bytes(emit_tflite_int8(plan))
    runner = load_runner(path, threads=2)
    und = runner.delegate_info["undelegated_ops"]
    assert und.get("DIV") == n_attn and "MUL" not in und
    census = tflite_op_census(path)
    assert census["DIV"] == n_attn
    with torch.no_grad():
        ref = model(x, QuantOps(plan, "quant", exact="xnnpack")).numpy()
    assert np.array_equal(runner(x.numpy()), ref)
