"""Run one int8 TFLite op in ai-edge-litert: the reference the kernel emulations are tested against
(tests/export/test_tflite_int8.py, tests/transforms/test_npu_graph.py)."""

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
