"""Run one int8 TFLite op in ai-edge-litert: the reference the kernel emulations are tested against
(tests/export/test_tflite_int8.py, tests/transforms/test_npu_graph.py); small ONNX models for the
onnxruntime profile (tests/export/test_onnx_profile.py, tests/test_cli.py)."""

from __future__ import annotations

import numpy as np


def run_one_op(op, in_specs, out_spec, inputs, opt_type=0, opts=None, consts=()) -> np.ndarray:
    """Output codes of a one-op int8 TFLite model: ``in_specs`` [(shape, scale, zero point)],
    ``out_spec`` (shape, scale, zero point), ``consts`` extra constant inputs (axes)."""
    from ai_edge_litert.interpreter import Interpreter

    from care_q.export.tflite_builder import TFLiteBuilder

    b = TFLiteBuilder()
    ins = [b.tensor(f"in{i}", s, np.int8, sc, zp) for i, (s, sc, zp) in enumerate(in_specs)]
    cs = [b.const(f"c{i}", c) for i, c in enumerate(consts)]
    o = b.tensor("out", out_spec[0], np.int8, out_spec[1], out_spec[2])
    b.op(op, ins + cs, [o], opt_type, opts, version=2)
    b.inputs, b.outputs = ins, [o]
    it = Interpreter(model_content=b.to_bytes(), num_threads=1)
    it.allocate_tensors()
    for d, x in zip(it.get_input_details(), inputs):
        it.set_tensor(d["index"], x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"]).astype(np.int64)


SA, SB, SO, ZO = 0.05, 0.02, 0.1, -3  # div_chain: scales of a, b (zero point 0) and of the output (zero point ZO)


def div_chain(n: int = 2, shape=(1, 4, 8, 3)) -> bytes:
    """``n`` int8 DIVs of the same shape, each dividing the previous result by b."""
    from ai_edge_litert import schema_py_generated as fb

    from care_q.export.tflite_builder import TFLiteBuilder, options

    b = TFLiteBuilder("test")
    a = b.tensor("a", shape, np.int8, SA, 0)
    d = b.tensor("b", shape, np.int8, SB, 0)
    b.inputs += [a, d]
    x = a
    for i in range(n):
        y = b.tensor(f"y{i}", shape, np.int8, SO if i == n - 1 else SA, ZO if i == n - 1 else 0)
        b.op(fb.BuiltinOperator.DIV, [x, d], [y], fb.BuiltinOptions.DivOptions, options(fb.DivOptionsT), version=2)
        x = y
    b.outputs.append(x)
    return b.to_bytes()


C = 8  # the ONNX models' channels


def _onnx(nodes, inits):
    from onnx import TensorProto, helper

    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    return m


def _c(name, v):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(v), name)


def onnx_fp32_model():
    """1x1 conv, depthwise 3x3, GELU and ELU as torch.onnx writes them (x/sqrt2 -> Erf -> +1 -> *x -> *0.5;
    relu(x) + exp(clip(x, max 0)) - 1)."""
    from onnx import helper

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="pw"),
             helper.make_node("Conv", ["a", "w2"], ["b"], name="dw", group=C, pads=[1, 1, 1, 1]),
             helper.make_node("Div", ["b", "sqrt2"], ["g0"], name="node_Div_1"),
             helper.make_node("Erf", ["g0"], ["g1"], name="node_Erf_2"),
             helper.make_node("Add", ["g1", "one"], ["g2"], name="node_Add_3"),
             helper.make_node("Mul", ["b", "g2"], ["g3"], name="node_Mul_4"),
             helper.make_node("Mul", ["g3", "half"], ["c"], name="node_gelu"),
             helper.make_node("Relu", ["c"], ["e0"], name="node_relu"),
             helper.make_node("Clip", ["c", "", "zero"], ["e1"], name="node_clamp"),
             helper.make_node("Exp", ["e1"], ["e2"], name="node_exp"),
             helper.make_node("Add", ["e0", "e2"], ["e3"], name="node_add_9"),
             helper.make_node("Sub", ["e3", "one"], ["d"], name="node_sub_10"),
             helper.make_node("Add", ["d", "c"], ["y"], name="node_residual")]
    inits = [_c("w1", rng.standard_normal((C, C, 1, 1)).astype(np.float32)), _c("b1", np.zeros(C, np.float32)),
             _c("w2", rng.standard_normal((C, 1, 3, 3)).astype(np.float32)),
             _c("sqrt2", np.float32(2 ** 0.5)), _c("one", np.float32(1)), _c("half", np.float32(0.5)),
             _c("zero", np.float32(0))]
    return _onnx(nodes, inits)


def onnx_int8_model():
    """The same 1x1 conv in QDQ (int8 weights), then GELU as a float island."""
    from onnx import helper

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="x/Quantize"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="x/Dequantize"),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="w/Dequantize", axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["a"], name="pw"),
             helper.make_node("QuantizeLinear", ["a", "s", "z"], ["aq"], name="pw/Quantize"),
             helper.make_node("DequantizeLinear", ["aq", "s", "z"], ["ad"], name="act/Dequantize"),
             helper.make_node("Gelu", ["ad"], ["y"], name="act", domain="com.microsoft")]
    inits = [_c("s", np.float32(0.05)), _c("z", np.uint8(128)),
             _c("wq", rng.integers(-127, 128, (C, C, 1, 1)).astype(np.int8)),
             _c("ws", np.full(C, 0.01, np.float32)), _c("wz", np.zeros(C, np.int8))]
    return _onnx(nodes, inits)
