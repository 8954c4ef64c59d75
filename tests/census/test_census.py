"""Compatibility census (`care_q.census`, `care-q check`).

XNNPACK verdicts are checked against ai-edge-litert on the same file: tiny single-op models per
rule family (built with care-q's TFLite writer), a graph where TFLite's greedy partitioning
matters, and a real care-q int8 artifact (care_test at 32x32). NNAPI and Edge TPU rules are
checked against the published rules they encode (no device here)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ai_edge_litert import schema_py_generated as fb

from care_q import cli, create_model
from care_q.census import check, parse_targets
from care_q.census.groundtruth import xnnpack_partitions
from care_q.census.tflite_reader import read_tflite
from care_q.errors import CareQError
from care_q.export.tflite_builder import TFLiteBuilder, options
from care_q.export.tflite_int8 import emit_tflite_int8
from care_q.graph.trace import trace
from care_q.quant.calibrate import calibrate
from care_q.quant.plan import build_plan
from care_q.quant.recipe import load_recipe
from care_q.transforms import deploy

OP = fb.BuiltinOperator
SHAPE = (1, 4, 4, 8)
SIZE = 32


# ----------------------------------------------------------------------------- model builders
def _write(tmp_path, name, build) -> object:
    b = TFLiteBuilder("care-q census test")
    build(b)
    p = tmp_path / f"{name}.tflite"
    p.write_bytes(b.to_bytes())
    return p


def _q(b, name, dtype, scale=0.1, zp=0, shape=SHAPE):
    if dtype == np.float32:
        return b.tensor(name, shape, dtype)
    return b.tensor(name, shape, dtype, scale, zp)


def _bool(b, name, shape=SHAPE):
    i = b.tensor(name, shape, np.float32)
    b.tensors[i].type = fb.TensorType.BOOL   # the writer has no numpy bool mapping
    return i


def _unary(op, dtype, opts=None):
    def build(b):
        x, y = _q(b, "x", dtype), _q(b, "y", dtype, 0.05, -3)
        b.inputs.append(x)
        b.outputs.append(y)
        b.op(op, [x], [y], *(opts or (0, None)), version=2 if dtype != np.float32 else 1)
    return build


def _binary(op, dtype, scales=(0.1, 0.1, 0.1), opt=None):
    def build(b):
        a, c, y = _q(b, "a", dtype, scales[0], 1), _q(b, "c", dtype, scales[1], -2), _q(b, "y", dtype, scales[2], 0)
        b.inputs += [a, c]
        b.outputs.append(y)
        b.op(op, [a, c], [y], *(opt or (0, None)), version=2 if dtype != np.float32 else 1)
    return build


def _bmm(rhs_zp):
    def build(b):
        a = b.tensor("a", (1, 2, 4, 8), np.int8, 0.1, 3)
        c = b.tensor("kv", (1, 2, 8, 4), np.int8, 0.05, rhs_zp)
        y = b.tensor("y", (1, 2, 4, 4), np.int8, 0.2, -1)
        b.inputs += [a, c]
        b.outputs.append(y)
        b.op(OP.BATCH_MATMUL, [a, c], [y], fb.BuiltinOptions.BatchMatMulOptions,
             options(fb.BatchMatMulOptionsT, adjX=False, adjY=False), version=2)
    return build


def _concat(dtype, scale2):
    def build(b):
        a, c = _q(b, "a", dtype, 0.1, 0), _q(b, "c", dtype, scale2, 0)
        y = _q(b, "y", dtype, 0.1, 0, shape=(1, 4, 4, 16))
        b.inputs += [a, c]
        b.outputs.append(y)
        b.op(OP.CONCATENATION, [a, c], [y], fb.BuiltinOptions.ConcatenationOptions,
             options(fb.ConcatenationOptionsT, axis=3), version=2)
    return build


def _conv(b, x, name, cout, dynamic=False, axis=0):
    """int8 3x3 SAME conv, per-channel weights on `axis` (0 = output channels)."""
    cin = b.shape_of(x)[-1]
    n = cout if axis == 0 else cin
    rng = np.random.default_rng(0)
    if dynamic:
        w = b.tensor(f"{name}.w", (cout, 3, 3, cin), np.int8, np.full(n, 0.01), np.zeros(n, np.int64), axis=axis)
        b.inputs.append(w)
    else:
        w = b.const(f"{name}.w", rng.integers(-100, 100, (cout, 3, 3, cin)).astype(np.int8), np.full(n, 0.01),
                    np.zeros(n, np.int64), axis=axis)
    bias = b.const(f"{name}.b", np.zeros(cout, np.int32), np.full(cout, 0.001), np.zeros(cout, np.int64))
    h, wd = b.shape_of(x)[1:3]
    y = b.tensor(name, (1, h, wd, cout), np.int8, 0.2, 0)
    b.op(OP.CONV_2D, [x, w, bias], [y], fb.BuiltinOptions.Conv2DOptions,
         options(fb.Conv2DOptionsT, padding=fb.Padding.SAME, strideW=1, strideH=1, dilationWFactor=1,
                 dilationHFactor=1), version=3)
    return y


def _conv_model(dynamic=False, axis=0):
    def build(b):
        x = b.tensor("x", (1, 8, 8, 8), np.int8, 0.1, 1)
        b.inputs.insert(0, x)
        b.outputs.append(_conv(b, x, "conv", 8, dynamic, axis))
    return build


def _reshape(out_scale):
    def build(b):
        x, y = _q(b, "x", np.int8, 0.1, 0), _q(b, "y", np.int8, out_scale, 0, shape=(1, 16, 8))
        b.inputs.append(x)
        b.outputs.append(y)
        b.op(OP.RESHAPE, [x, b.const("shape", np.array([1, 16, 8], np.int32))], [y],
             fb.BuiltinOptions.ReshapeOptions, options(fb.ReshapeOptionsT, newShape=[1, 16, 8]))
    return build


def _select(op):
    def build(b):
        c, x, e = _bool(b, "cond"), _q(b, "x", np.float32), _q(b, "e", np.float32)
        y = _q(b, "y", np.float32)
        b.inputs += [c, x, e]
        b.outputs.append(y)
        b.op(op, [c, x, e], [y])
    return build


def _greater_equal(b):
    a, c = _q(b, "a", np.float32), _q(b, "c", np.float32)
    y = _bool(b, "y")
    b.inputs += [a, c]
    b.outputs.append(y)
    b.op(OP.GREATER_EQUAL, [a, c], [y])


GELU = (fb.BuiltinOptions.GeluOptions, options(fb.GeluOptionsT, approximate=False))
DIV = (fb.BuiltinOptions.DivOptions, options(fb.DivOptionsT))
ADD = (fb.BuiltinOptions.AddOptions, options(fb.AddOptionsT))
MUL = (fb.BuiltinOptions.MulOptions, options(fb.MulOptionsT))

# name -> (builder, delegated by XNNPACK, a phrase the census rule must contain)
XNNPACK_CASES = {
    "bmm_int8_rhs_zp0": (_bmm(0), True, "RHS zero point 0"),
    "bmm_int8_rhs_zp5": (_bmm(5), False, "zero point 5"),
    "elu_int8": (_unary(OP.ELU, np.int8), True, "ELU INT8"),
    "gelu_int8": (_unary(OP.GELU, np.int8, GELU), False, "float GELU only"),
    "gelu_float": (_unary(OP.GELU, np.float32, GELU), True, "GELU float"),
    "rsqrt_int8": (_unary(OP.RSQRT, np.int8), False, "float RSQRT only"),
    "exp_int8": (_unary(OP.EXP, np.int8), False, "float EXP only"),
    "logistic_int8": (_unary(OP.LOGISTIC, np.int8), True, "LOGISTIC INT8"),
    "div_int8": (_binary(OP.DIV, np.int8, opt=DIV), False, "float DIV only"),
    "div_float": (_binary(OP.DIV, np.float32, opt=DIV), True, "DIV float"),
    "greater_equal_float": (_greater_equal, False, "no XNNPACK visitor"),
    "select_v2_float": (_select(OP.SELECT_V2), False, "no XNNPACK visitor"),
    "add_int8_ratio_ok": (_binary(OP.ADD, np.int8, (0.1, 0.2, 0.15), ADD), True, "within [1/1024, 256)"),
    "add_int8_ratio_too_small": (_binary(OP.ADD, np.int8, (1e-5, 0.1, 0.1), ADD), False, "ratio 0.0001"),
    "add_int8_ratio_too_large": (_binary(OP.ADD, np.int8, (30.0, 0.1, 0.1), ADD), False, "ratio 300"),
    "mul_int8_ratio_ok": (_binary(OP.MUL, np.int8, (0.1, 0.1, 0.1), MUL), True, "within [1/65536, 256)"),
    "mul_int8_ratio_too_large": (_binary(OP.MUL, np.int8, (30.0, 30.0, 0.1), MUL), False, "9000"),
    "concat_uint8_scale_mismatch": (_concat(np.uint8, 0.2), False, "does not share the output's quantization"),
    "concat_int8_same_scale": (_concat(np.int8, 0.1), True, "inputs share the output's quantization"),
    "conv_int8_per_channel_axis0": (_conv_model(), True, "per-channel weights on axis 0"),
    "conv_int8_per_channel_axis3": (_conv_model(axis=3), False, "axis 3"),
    "conv_int8_dynamic_filter": (_conv_model(dynamic=True), False, "dynamic filters"),
    "reshape_int8_same_quant": (_reshape(0.1), True, "RESHAPE INT8"),
    "reshape_int8_requantizes": (_reshape(0.2), False, "quantization differ"),
}


@pytest.mark.parametrize("case", list(XNNPACK_CASES))
def test_xnnpack_verdict_matches_ai_edge_litert(tmp_path, case):
    build, delegated, phrase = XNNPACK_CASES[case]
    path = _write(tmp_path, case, build)
    report = check(path, targets="xnnpack")
    x = report.targets["xnnpack"]
    (v,) = x.verdicts.values()
    assert v.mapped is delegated, v.rule
    assert phrase in v.rule, v.rule
    truth = xnnpack_partitions(path)                   # what the interpreter actually did
    assert "error" not in truth, truth
    assert (truth["delegated"] == [0]) is delegated
    assert x.runtime["match"] is True and x.partitions == len(truth["partitions"])


def test_int8_concat_with_mismatched_scales_fails_to_load(tmp_path):
    """XNNPACK's delegate check compares only uint8 CONCATENATION quantization; for int8 the node is
    claimed, XNNPACK's subgraph rejects it and the interpreter cannot prepare: the census says so."""
    path = _write(tmp_path, "concat_int8_bad", _concat(np.int8, 0.2))
    report = check(path, targets="xnnpack")
    x = report.targets["xnnpack"]
    assert x.verdicts[0].mapped and "does not share the output's quantization" in x.verdicts[0].fatal
    assert "error" in x.runtime and x.runtime["match"] is True
    assert "CONCATENATION" in x.runtime["error"]
    assert "LOAD FAILS" in report.summary_lines()[0]
    assert cli.main(["check", str(path), "--target", "xnnpack"]) == 1


def _branches(b):
    """x -> ELU -> ELU -> y1 and x -> GREATER_EQUAL(x, x) -> y2, with the CPU op between the ELUs in
    the plan: TFLite's greedy partitioning still makes one XNNPACK partition of both ELUs."""
    x = _q(b, "x", np.float32)
    e1, e2 = _q(b, "e1", np.float32), _q(b, "e2", np.float32)
    ge = _bool(b, "ge")
    b.inputs.append(x)
    b.outputs += [e2, ge]
    b.op(OP.ELU, [x], [e1])
    b.op(OP.GREATER_EQUAL, [x, x], [ge])
    b.op(OP.ELU, [e1], [e2])


def test_greedy_partitioning_matches_interpreter(tmp_path):
    path = _write(tmp_path, "branches", _branches)
    x = check(path, targets="xnnpack").targets["xnnpack"]
    assert [(s.delegated, s.nodes) for s in x.segments] == [(True, [0, 2]), (False, [1])]
    assert xnnpack_partitions(path)["partitions"] == [[0, 2]]
    assert x.runtime["match"]


def _chain(b, acts=("GELU", "ELU", "GELU")):
    """int8 conv, then for each act: act + conv. Activations cut accelerator partitions."""
    x = b.tensor("x", (1, 8, 8, 8), np.int8, 0.1, 1)
    b.inputs.append(x)
    y = _conv(b, x, "conv0", 8)
    for i, a in enumerate(acts):
        z = b.tensor(f"act{i}", (1, 8, 8, 8), np.int8, 0.05, -3)
        if a == "GELU":
            b.op(OP.GELU, [y], [z], *GELU, version=2)
        else:
            b.op(getattr(OP, a), [y], [z], version=2)
        y = _conv(b, z, f"conv{i + 1}", 8)
    b.outputs.append(y)


def test_edgetpu_single_cut_and_mac_share(tmp_path):
    path = _write(tmp_path, "chain", lambda b: _chain(b, ("RELU", "ELU", "RELU")))
    r = check(path, targets="edgetpu")
    e = r.targets["edgetpu"]
    g = read_tflite(path)
    names = [op.name for op in g.ops]
    assert names == ["CONV_2D", "RELU", "CONV_2D", "ELU", "CONV_2D", "RELU", "CONV_2D"]
    conv_macs = 8 * 8 * 8 * 3 * 3 * 8
    assert all(op.macs == conv_macs for op in g.ops if op.name == "CONV_2D")
    # ELU is not on the Edge TPU: it and everything after it (even the mapped convs) run on the CPU
    assert e.edgetpu.first_unmapped == 3 and e.edgetpu.tpu == [0, 1, 2]
    assert e.verdicts[4].mapped and 4 not in e.on_accelerator
    assert e.mac_share == pytest.approx(0.5)
    assert "ELU is not in the Coral" in e.verdicts[3].rule
    assert "first unmapped op #3 ELU" in r.summary_lines()[0]


def test_edgetpu_rules(tmp_path):
    def rank4(b):   # a 4-D activation with a dimension > 1 outside the 3 innermost: rank limit
        x = _q(b, "x", np.int8, shape=(2, 3, 4, 8))
        y = _q(b, "y", np.int8, shape=(2, 3, 4, 8))
        b.inputs.append(x)
        b.outputs.append(y)
        b.op(OP.LOGISTIC, [x], [y], version=2)

    e = check(_write(tmp_path, "rank4", rank4), targets="edgetpu").targets["edgetpu"]
    assert not e.verdicts[0].mapped and "3 innermost" in e.verdicts[0].rule
    f = check(_write(tmp_path, "gelu_f", _unary(OP.GELU, np.float32, GELU)), targets="edgetpu").targets["edgetpu"]
    assert not f.verdicts[0].mapped and "GELU" in f.verdicts[0].rule
    m = check(_write(tmp_path, "logi8", _unary(OP.LOGISTIC, np.int8)), targets="edgetpu").targets["edgetpu"]
    assert m.verdicts[0].mapped
    d = check(_write(tmp_path, "conv_dyn", _conv_model(dynamic=True)), targets="edgetpu").targets["edgetpu"]
    assert not d.verdicts[0].mapped and "not a compile-time constant" in d.verdicts[0].rule


def test_nnapi_feature_levels(tmp_path):
    bmm = _write(tmp_path, "bmm", _bmm(0))
    assert not check(bmm, targets="nnapi:5").targets["nnapi:FL5"].verdicts[0].mapped
    assert "needs FL6" in check(bmm, targets="nnapi:5").targets["nnapi:FL5"].verdicts[0].rule
    assert check(bmm, targets="nnapi:FL6").targets["nnapi:FL6"].verdicts[0].mapped
    div_i8 = _write(tmp_path, "div_i8", _binary(OP.DIV, np.int8, opt=DIV))
    div_f = _write(tmp_path, "div_f", _binary(OP.DIV, np.float32, opt=DIV))
    assert "float only" in check(div_i8, targets="nnapi").targets["nnapi:FL8"].verdicts[0].rule
    assert check(div_f, targets="nnapi:2").targets["nnapi:FL2"].verdicts[0].mapped
    assert not check(div_f, targets="nnapi:1").targets["nnapi:FL1"].verdicts[0].mapped
    elu_f = _write(tmp_path, "elu_f", _unary(OP.ELU, np.float32))
    elu_i8 = _write(tmp_path, "elu_i8", _unary(OP.ELU, np.int8))
    assert check(elu_f, targets="nnapi:4").targets["nnapi:FL4"].verdicts[0].mapped
    assert not check(elu_f, targets="nnapi:3").targets["nnapi:FL3"].verdicts[0].mapped
    assert not check(elu_i8, targets="nnapi:8").targets["nnapi:FL8"].verdicts[0].mapped   # ELU float only
    gelu = _write(tmp_path, "gelu_f", _unary(OP.GELU, np.float32, GELU))
    assert not check(gelu, targets="nnapi:8").targets["nnapi:FL8"].verdicts[0].mapped     # no GELU at all


def test_nnapi_keeps_three_largest_partitions(tmp_path):
    """Four conv partitions separated by GELUs (no NNAPI GELU): the delegate keeps the 3 largest."""
    path = _write(tmp_path, "chain", lambda b: _chain(b, ("GELU", "GELU", "GELU")))
    n = check(path, targets="nnapi").targets["nnapi:FL8"]
    assert all(n.verdicts[i].mapped for i in (0, 2, 4, 6)) and not n.verdicts[1].mapped
    assert n.partitions == 3 and len(n.on_accelerator) == 3
    assert n.mac_share == pytest.approx(0.75)
    assert "keeps the 3 largest" in n.note


# ----------------------------------------------------------------------------- a real care-q artifact
def _calibrated_care_test_plan(images: int, batch: int):
    """ptq_int8's plan of a seeded care_test at 32x32, calibrated on ``images`` random images."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = deploy(create_model("care_test", num_classes=10))
    plan = build_plan(trace(model, torch.zeros(1, 3, SIZE, SIZE)), load_recipe("ptq_int8"))
    cal = torch.randn(images, 3, SIZE, SIZE)
    calibrate(plan, model, [cal[i:i + batch] for i in range(0, images, batch)], progress=False)
    return plan


@pytest.fixture(scope="module")
def care_test_int8(tmp_path_factory):
    """care_test int8 TFLite at 32x32, built as tests/export/test_tflite_int8.py builds it."""
    plan = _calibrated_care_test_plan(32, 16)
    path = tmp_path_factory.mktemp("census") / "care_test_int8.tflite"
    path.write_bytes(emit_tflite_int8(plan, io="float"))
    return path


def test_care_q_artifact_partitions_match_interpreter(care_test_int8):
    r = check(care_test_int8, targets="all")
    x = r.targets["xnnpack"]
    truth = xnnpack_partitions(care_test_int8)
    assert sorted(sorted(s.nodes) for s in x.segments if s.delegated) == sorted(truth["partitions"])
    assert sorted(x.on_accelerator) == truth["delegated"]
    assert x.runtime["match"] and x.partitions == len(truth["partitions"]) > 1
    names = {o.index: (o.name, o.dtype) for o in r.ops}
    cpu = {names[i] for i in range(len(r.ops)) if i not in x.on_accelerator}
    assert ("GELU", "INT8") in cpu and ("DIV", "INT8") in cpu             # no int8 kernel in XNNPACK
    builtin_dw = set()  # ptq_int8's 7x7 depthwise convs: their bias is made at run time, for TFLite's kernel
    for i, (name, _dtype) in names.items():
        if name == "DEPTHWISE_CONV_2D" and "is not a constant" in x.verdicts[i].rule:
            assert "bias" in x.verdicts[i].rule and i not in x.on_accelerator
            builtin_dw.add(i)
        elif name in ("ELU", "BATCH_MATMUL", "CONV_2D", "DEPTHWISE_CONV_2D"):
            assert i in x.on_accelerator, (i, name, x.verdicts[i].rule)
    g = read_tflite(care_test_int8)
    assert builtin_dw == {o.index for o in g.ops if o.name == "DEPTHWISE_CONV_2D"
                          and tuple(g.tensors[o.inputs[1]].shape[1:3]) == (7, 7)} != set()
    off = sum(o.macs for o in r.ops if o.index in builtin_dw)
    assert x.mac_share == pytest.approx(1.0 - off / sum(o.macs for o in r.ops))  # every other conv and matmul
    # NNAPI: int8 ELU / GELU / DIV are not mapped; BATCH_MATMUL int8 is from FL6
    n = r.targets["nnapi:FL8"]
    assert all(not n.verdicts[i].mapped for i, (nm, dt) in names.items() if nm in ("ELU", "GELU", "DIV"))
    assert all(n.verdicts[i].mapped for i, (nm, dt) in names.items() if nm == "BATCH_MATMUL")
    assert n.partitions == 3 and 0 < n.mac_share < 1
    # Edge TPU: the input QUANTIZE stays on the CPU; the int32 RESHAPE that makes the first 7x7
    # depthwise conv's bias (ptq_int8 runs those convs in TFLite's kernel) ends the TPU segment
    e = r.targets["edgetpu"]
    assert e.edgetpu.leading_cpu == [0]
    first = e.edgetpu.first_unmapped
    assert names[first] == ("RESHAPE", "INT32") and all(e.verdicts[i].mapped for i in range(1, first))
    before = sum(o.macs for o in r.ops if 0 < o.index < first)
    assert e.mac_share == pytest.approx(before / r.macs_total) and 0 < e.mac_share < 0.5
    d = r.to_dict()
    assert d["targets"]["edgetpu"]["edgetpu"]["first_unmapped"]["op"] == "RESHAPE"
    assert len(d["ops"]) == len(r.ops) and d["ops"][first]["edgetpu"]["mapped"] is False


def test_cli_check_json(care_test_int8, tmp_path, capsys):
    out = tmp_path / "census.json"
    assert cli.main(["check", str(care_test_int8), "--target", "xnnpack,edgetpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "xnnpack:" in printed and "matches the census" in printed and "first unmapped op" in printed
    d = json.loads(out.read_text())
    assert set(d["targets"]) == {"xnnpack", "edgetpu"}
    assert d["targets"]["xnnpack"]["runtime"]["match"] is True
    assert d["targets"]["xnnpack"]["cpu_ops"]["GELU"] == 10


# ----------------------------------------------------------------------------- ONNX QDQ
def test_onnx_qdq_fusion_census(tmp_path):
    from care_q.export.onnx_qdq import emit_onnx_qdq, save_onnx

    plan = _calibrated_care_test_plan(16, 8)
    path = save_onnx(emit_onnx_qdq(plan), tmp_path / "care_test_qdq.onnx")
    r = check(path)
    o = r.onnx
    graph = plan.graph.census()
    assert o["integer_ops"]["QLinearMatMul"] == graph["matmul"]
    assert o["integer_ops"]["QLinearConv"] >= graph["conv"]
    assert o["integer_ops"]["QLinearConcat"] == graph["cat"]
    # ops without an integer kernel in onnxruntime stay float between a DQ and a Q, by name
    assert o["float_islands"]["Elu"] == graph["elu"] == 6
    assert o["float_islands"]["Div"] == 3 and o["float_islands"]["Gelu"] == 10
    island_names = {n["name"] for n in o["float_island_nodes"]}
    assert "stages.2.blocks.0.attn.elu_q" in island_names and "stages.0.blocks.0.inter1_act" in island_names
    assert "Conv" not in o["float_islands"] and "MatMul" not in o["float_islands"]
    assert o["mac_share_integer"] == pytest.approx(1.0, abs=0.02)          # only the float head Gemm
    assert any("integer kernels" in line for line in r.summary_lines())


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs(tmp_path):
    txt = tmp_path / "model.txt"
    txt.write_text("hello")
    with pytest.raises(CareQError, match="reads .tflite and .onnx"):
        check(txt)
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CareQError, match="not a TFLite flatbuffer"):
        check(junk)
    good = _write(tmp_path, "conv", _conv_model())
    data = good.read_bytes()
    for cut in (len(data) // 2, len(data) - 100, 12):
        trunc = tmp_path / f"trunc{cut}.tflite"
        trunc.write_bytes(data[:cut])
        with pytest.raises(CareQError, match="truncated|corrupt"):
            check(trunc)
    with pytest.raises(CareQError, match="unknown target 'tpu'"):
        check(good, targets="tpu")
    with pytest.raises(CareQError, match="unknown NNAPI feature level '9'"):
        check(good, targets="nnapi:9")
    with pytest.raises(CareQError, match="not found"):
        check(tmp_path / "missing.tflite")
    assert parse_targets("all") == [("xnnpack", None), ("nnapi", 8), ("edgetpu", None)]
    assert parse_targets(["nnapi:FL6", "nnapi:6", "xnnpack"]) == [("nnapi", 6), ("xnnpack", None)]
    assert cli.main(["check", str(good), "--target", "gpu"]) == 2
