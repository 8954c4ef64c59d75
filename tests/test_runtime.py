"""care_q.runtime on tiny hand-built ONNX and TFLite graphs: layouts, integer I/O, batching,
delegate accounting, errors. No conversion: each model is a few nodes, built in the test."""

from __future__ import annotations

import flatbuffers
import numpy as np
import onnx
import pytest
from ai_edge_litert import schema_py_generated as fb
from onnx import TensorProto, helper, numpy_helper

from care_q.errors import CareQError
from care_q.runtime import EXACT_U8S8_FLAGS, load_runner, onnx_op_census, tflite_op_census
from care_q.utils.machine import cpu_flags

RNG = np.random.default_rng(0)
W = RNG.standard_normal((3, 5)).astype(np.float32)  # 3 channels -> 5 "classes"


def _x(n, h=8, w=8):
    return np.random.default_rng(n).standard_normal((n, 3, h, w)).astype(np.float32)


# ----------------------------------------------------------------------------- ONNX builders


def _save(model: onnx.ModelProto, path) -> str:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def _onnx_pool_fc(path, shape, nhwc: bool):
    """logits = spatial mean of the image @ W; ``shape`` is the input shape in the file."""
    axes = [1, 2] if nhwc else [2, 3]
    nodes = [helper.make_node("ReduceMean", ["input", "axes"], ["pooled"], keepdims=0),
             helper.make_node("MatMul", ["pooled", "W"], ["logits"])]
    graph = helper.make_graph(
        nodes, "pool_fc",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [shape[0], 5])],
        initializer=[numpy_helper.from_array(np.array(axes, np.int64), "axes"),
                     numpy_helper.from_array(W, "W")])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def _onnx_int8_input(path, scale=0.05, zp=-3):
    """int8 NCHW input -> DequantizeLinear -> spatial mean @ W."""
    nodes = [helper.make_node("DequantizeLinear", ["input", "s", "zp"], ["xf"]),
             helper.make_node("ReduceMean", ["xf", "axes"], ["pooled"], keepdims=0),
             helper.make_node("MatMul", ["pooled", "W"], ["logits"])]
    graph = helper.make_graph(
        nodes, "int8_in",
        [helper.make_tensor_value_info("input", TensorProto.INT8, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5])],
        initializer=[numpy_helper.from_array(np.array(scale, np.float32), "s"),
                     numpy_helper.from_array(np.array(zp, np.int8), "zp"),
                     numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
                     numpy_helper.from_array(W, "W")])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def _ref(x):
    return x.mean((2, 3)) @ W


def test_onnx_nchw_dynamic_batch(tmp_path):
    r = load_runner(_onnx_pool_fc(tmp_path / "m.onnx", ["N", 3, 8, 8], nhwc=False), threads=1)
    assert (r.kind, r.input_layout, r.input_shape, r.input_dtype) == ("onnx", "NCHW", (None, 3, 8, 8),
                                                                       np.float32)
    assert r.batch is None and r.delegate_info is None
    x = _x(5)
    y = r(x)
    assert y.shape == (5, 5) and y.dtype == np.float32
    np.testing.assert_allclose(y, _ref(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r(x, max_batch=2), y, rtol=1e-6, atol=1e-7)  # chunked
    r.prepare(x[:2])                                   # latency split: convert once ...
    for _ in range(3):
        r.invoke()                                     # ... invoke repeatedly
    np.testing.assert_allclose(r.output(), y[:2], rtol=1e-6, atol=1e-7)


def test_onnx_nhwc_fixed_batch_is_transposed_and_looped(tmp_path):
    r = load_runner(_onnx_pool_fc(tmp_path / "m.onnx", [1, 8, 8, 3], nhwc=True), threads=1)
    assert r.input_layout == "NHWC"
    assert r.input_shape == (1, 3, 8, 8)  # reported as N, C, H, W
    x = _x(3)
    x[:, 0] += 5.0  # channel 0 stands out: a missing transpose would mix channels
    np.testing.assert_allclose(r(x), _ref(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(CareQError, match="exactly the model's batch of 1"):
        r.prepare(x)


def test_onnx_int8_input_needs_and_uses_quantization(tmp_path):
    path = _onnx_int8_input(tmp_path / "q.onnx")
    with pytest.raises(CareQError, match="input_quant"):
        load_runner(path)
    r = load_runner(path, input_quant=(0.05, -3))
    assert r.input_dtype == np.int8 and r.input_quant == (0.05, -3)
    x = _x(2, 4, 4)
    xq = np.clip(np.round(x / 0.05) - 3, -128, 127)
    np.testing.assert_allclose(r(x), _ref((xq + 3) * 0.05), rtol=1e-5, atol=1e-5)


def test_onnx_int8_io_from_care_q_metadata(tmp_path, monkeypatch):
    """The QDQ emitter records integer I/O grids and needed session entries as metadata_props."""
    nodes = [helper.make_node("DequantizeLinear", ["input", "s", "zp"], ["xf"]),
             helper.make_node("ReduceMean", ["xf", "axes"], ["pooled"], keepdims=0),
             helper.make_node("MatMul", ["pooled", "W"], ["y"]),
             helper.make_node("QuantizeLinear", ["y", "so", "zpo"], ["logits"])]
    graph = helper.make_graph(
        nodes, "int8_io",
        [helper.make_tensor_value_info("input", TensorProto.INT8, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.INT8, [1, 5])],
        initializer=[numpy_helper.from_array(np.array(0.05, np.float32), "s"),
                     numpy_helper.from_array(np.array(-3, np.int8), "zp"),
                     numpy_helper.from_array(np.array(0.02, np.float32), "so"),
                     numpy_helper.from_array(np.array(4, np.int8), "zpo"),
                     numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
                     numpy_helper.from_array(W, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    helper.set_model_props(model, {"care_q.input_scale": "0.05", "care_q.input_zero_point": "-3",
                                   "care_q.output_scale": "0.02", "care_q.output_zero_point": "4",
                                   "care_q.ort_session_config": '{"session.x64quantprecision": "1"}'})
    monkeypatch.setattr("care_q.utils.machine.cpu_flags", lambda: {"avx2", "fma"})  # an x86 CPU without VNNI
    r = load_runner(_save(model, tmp_path / "q.onnx"), session_config={"session.intra_op.allow_spinning": "0"})
    assert r.input_quant == (0.05, -3) and r.output_quant == (0.02, 4)
    assert r.session_config == {"session.x64quantprecision": "1", "session.intra_op.allow_spinning": "0"}
    # with VNNI the exact u8u8 path is not needed; a caller can still ask for it
    monkeypatch.setattr("care_q.utils.machine.cpu_flags", lambda: {"avx2", "avx512_vnni"})
    assert load_runner(tmp_path / "q.onnx").session_config == {}
    assert load_runner(tmp_path / "q.onnx", session_config={"session.x64quantprecision": "1"}).session_config == {
        "session.x64quantprecision": "1"}
    x = _x(2, 4, 4)
    xq = np.clip(np.round(x / 0.05) - 3, -128, 127)
    yq = np.clip(np.round(_ref((xq + 3) * 0.05) / 0.02) + 4, -128, 127)
    np.testing.assert_allclose(r(x), (yq - 4) * 0.02, atol=0.02 + 1e-6)  # one output step


def test_onnx_optimized_model_is_saved(tmp_path):
    opt = tmp_path / "opt" / "m.opt.onnx"
    load_runner(_onnx_pool_fc(tmp_path / "m.onnx", ["N", 3, 8, 8], nhwc=False), optimized_model_path=opt)
    assert opt.exists()
    assert onnx_op_census(opt) == {"ReduceMean": 1, "MatMul": 1}


# ----------------------------------------------------------------------------- TFLite builder


def _tflite(path, ops, tensors, inputs, outputs, consts=None):
    """A one-subgraph .tflite: tensors = [(name, shape, type, (scale, zp) | None)],
    ops = [(BuiltinOperator, [in], [out], options_type, options)], consts = {tensor: array}."""
    consts = consts or {}
    m = fb.ModelT()
    m.version = 3
    m.buffers = [fb.BufferT()]
    sg = fb.SubGraphT()
    sg.tensors = []
    for i, (name, shape, ttype, q) in enumerate(tensors):
        t = fb.TensorT()
        t.name, t.shape, t.type = name.encode(), np.array(shape, np.int32), ttype
        buf = fb.BufferT()
        if i in consts:
            buf.data = np.frombuffer(consts[i].tobytes(), np.uint8)
        m.buffers.append(buf)
        t.buffer = len(m.buffers) - 1
        if q is not None:
            t.quantization = fb.QuantizationParametersT()
            t.quantization.scale, t.quantization.zeroPoint = [q[0]], [q[1]]
        sg.tensors.append(t)
    codes = sorted({op[0] for op in ops})
    m.operatorCodes = []
    for c in codes:
        oc = fb.OperatorCodeT()
        oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = c, min(c, 127), 1
        m.operatorCodes.append(oc)
    sg.operators = []
    for code, ins, outs, otype, opts in ops:
        o = fb.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = codes.index(code), ins, outs
        o.builtinOptionsType, o.builtinOptions = otype, opts
        sg.operators.append(o)
    sg.inputs, sg.outputs = inputs, outputs
    m.subgraphs = [sg]
    b = flatbuffers.Builder(1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    path.write_bytes(bytes(b.Output()))
    return path


def _mean_opts():
    o = fb.ReducerOptionsT()
    o.keepDims = False
    return o


OP, TT = fb.BuiltinOperator, fb.TensorType


def _tflite_int8_nhwc(path):
    """int8 NHWC (1,4,4,3) -> DEQUANTIZE -> MEAN(H,W) -> QUANTIZE -> int8 (1,3)."""
    tensors = [("input", [1, 4, 4, 3], TT.INT8, (0.05, -3)), ("xf", [1, 4, 4, 3], TT.FLOAT32, None),
               ("axes", [2], TT.INT32, None), ("m", [1, 3], TT.FLOAT32, None),
               ("logits", [1, 3], TT.INT8, (0.01, 5))]
    ops = [(OP.DEQUANTIZE, [0], [1], 0, None),
           (OP.MEAN, [1, 2], [3], fb.BuiltinOptions.ReducerOptions, _mean_opts()),
           (OP.QUANTIZE, [3], [4], 0, None)]
    return _tflite(path, ops, tensors, [0], [4], consts={2: np.array([1, 2], np.int32)})


def _tflite_with_select(path):
    """x -> ADD -> GREATER_EQUAL -> SELECT_V2 -> ADD -> MEAN: XNNPACK takes neither the compare
    nor the select, so it delegates {ADD} and {ADD, MEAN}: 2 partitions, 3 of 5 ops."""
    tensors = [("input", [1, 4, 4, 3], TT.FLOAT32, None), ("a", [1, 4, 4, 3], TT.FLOAT32, None),
               ("zero", [1], TT.FLOAT32, None), ("c", [1, 4, 4, 3], TT.BOOL, None),
               ("s", [1, 4, 4, 3], TT.FLOAT32, None), ("d", [1, 4, 4, 3], TT.FLOAT32, None),
               ("axes", [2], TT.INT32, None), ("logits", [1, 3], TT.FLOAT32, None)]
    add = fb.AddOptionsT()
    ops = [(OP.ADD, [0, 0], [1], fb.BuiltinOptions.AddOptions, add),
           (OP.GREATER_EQUAL, [1, 2], [3], 0, None),
           (OP.SELECT_V2, [3, 1, 0], [4], 0, None),
           (OP.ADD, [4, 4], [5], fb.BuiltinOptions.AddOptions, add),
           (OP.MEAN, [5, 6], [7], fb.BuiltinOptions.ReducerOptions, _mean_opts())]
    return _tflite(path, ops, tensors, [0], [7],
                   consts={2: np.zeros(1, np.float32), 6: np.array([1, 2], np.int32)})


@pytest.mark.parametrize("delegate", ["xnnpack", "builtin", "reference"])
def test_tflite_int8_nhwc(tmp_path, delegate):
    r = load_runner(_tflite_int8_nhwc(tmp_path / "q.tflite"), threads=1, tflite_delegate=delegate)
    assert (r.kind, r.input_layout, r.input_shape) == ("tflite", "NHWC", (1, 3, 4, 4))
    assert (r.input_dtype, r.output_dtype) == (np.int8, np.int8)
    assert r.input_quant == pytest.approx((0.05, -3)) and r.output_quant == pytest.approx((0.01, 5))
    x = _x(3, 4, 4)
    x[:, 1] += 1.0
    xq = np.clip(np.round(x / 0.05) - 3, -128, 127)
    m = ((xq + 3) * 0.05).mean((2, 3))
    want = (np.clip(np.round(m / 0.01) + 5, -128, 127) - 5) * 0.01
    y = r(x)  # batch 3 through a batch-1 model
    assert y.dtype == np.float32 and y.shape == (3, 3)
    np.testing.assert_allclose(y, want, atol=0.01 + 1e-6)  # one output step of rounding freedom
    assert tflite_op_census(r.path) == {"DEQUANTIZE": 1, "MEAN": 1, "QUANTIZE": 1}


def test_tflite_delegate_info_counts_partitions(tmp_path):
    path = _tflite_with_select(tmp_path / "s.tflite")
    x = _x(2, 4, 4)
    xh = x.transpose(0, 2, 3, 1)
    a = xh + xh
    want = np.where(a >= 0, a, xh) * 2
    r = load_runner(path, threads=1)
    np.testing.assert_allclose(r(x), want.mean((1, 2)), rtol=1e-5, atol=1e-6)
    info = r.delegate_info
    assert info["delegate"] == "XNNPACK"
    assert (info["partitions"], info["delegated_nodes"], info["total_nodes"]) == (2, 3, 5)
    assert info["undelegated_ops"] == {"GREATER_EQUAL": 1, "SELECT_V2": 1}
    ref = load_runner(path, threads=1, tflite_delegate="reference")
    assert ref.delegate_info["partitions"] == 0 and ref.delegate_info["delegated_nodes"] == 0
    np.testing.assert_allclose(ref(x), r(x), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(CareQError, match="not found.*nope.onnx"):
        load_runner(tmp_path / "nope.onnx")


def test_wrong_extension(tmp_path):
    p = tmp_path / "model.pt"
    p.write_bytes(b"x")
    with pytest.raises(CareQError, match=r"model.pt: not a model artifact.*\.onnx and \.tflite"):
        load_runner(p)


@pytest.mark.parametrize("suffix,runtime", [(".onnx", "onnxruntime"), (".tflite", "TFLite interpreter")])
def test_corrupt_file(tmp_path, suffix, runtime):
    p = tmp_path / f"broken{suffix}"
    p.write_bytes(b"\x00garbage, not a model" * 10)
    with pytest.raises(CareQError, match=f"broken{suffix}.*{runtime} could not load it: .+"):
        load_runner(p)


def test_corrupt_tflite_census(tmp_path):
    p = tmp_path / "broken.tflite"
    p.write_bytes(b"\x00" * 3)
    with pytest.raises(CareQError, match="broken.tflite"):
        tflite_op_census(p)


def test_wrong_input_shape_names_both(tmp_path):
    r = load_runner(_onnx_pool_fc(tmp_path / "m.onnx", [1, 8, 8, 3], nhwc=True))
    with pytest.raises(CareQError, match=r"\(2, 3, 16, 16\) does not fit m.onnx.*\(1, 3, 8, 8\).*NHWC"):
        r(_x(2, 16, 16))
    with pytest.raises(CareQError, match=r"\(3, 8, 8\) does not fit"):
        r(_x(1)[0])
    tfl = load_runner(_tflite_int8_nhwc(tmp_path / "q.tflite"))
    with pytest.raises(CareQError, match=r"\(1, 4, 4, 3\) does not fit q.tflite.*\(1, 3, 4, 4\)"):
        tfl(np.zeros((1, 4, 4, 3), np.float32))  # NHWC given where NCHW is expected


def test_bad_options(tmp_path):
    path = _onnx_pool_fc(tmp_path / "m.onnx", [1, 3, 8, 8], nhwc=False)
    with pytest.raises(CareQError, match="threads"):
        load_runner(path, threads=0)
    with pytest.raises(CareQError, match="unknown TFLite delegate 'gpu'"):
        load_runner(_tflite_int8_nhwc(tmp_path / "q.tflite"), tflite_delegate="gpu")


@pytest.mark.skipif(not EXACT_U8S8_FLAGS & cpu_flags(),
                    reason="needs an x86 CPU with VNNI (the fast u8s8 path is exact only there)")
def test_vnni_u8s8_path_equals_the_exact_path(tmp_path):
    """On a VNNI CPU onnxruntime's default u8s8 kernels give what its exact u8u8 path
    (session.x64quantprecision) gives, for full-range int8 weights and inputs at the ends of their
    range, where AVX2's pairwise int16 sums (255 * 127 * 2 > 32767) would saturate."""
    from one_op import onnx_int8_model

    path = tmp_path / "q.onnx"
    onnx.save(onnx_int8_model(), path)
    x = np.random.default_rng(0).choice([-6.4, 6.35], size=(4, 8, 16, 16)).astype(np.float32)  # codes 0 and 255
    fast = load_runner(path, session_config={"session.x64quantprecision": "0"})
    exact = load_runner(path, session_config={"session.x64quantprecision": "1"})
    y = fast(x)
    np.testing.assert_array_equal(y, exact(x))
    assert np.abs(y).max() > 1.0  # the conv's sums are large: not a model that outputs nothing
