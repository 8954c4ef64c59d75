"""Ethos-U targets of `care-q check`, compiled by Arm's Vela (`care_q.census.vela`).

care-q's NPU graph (recipe npu_int8, care_test at 32x32) compiled live for ethos-u55-128 and
ethos-u85-256; a recorded Vela run on a tiny model (tests/recorded/vela_u55_128_tiny) parsed to
exact values, without Vela, and through the command line; the error cases."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as fb

from care_q import cli
from care_q.census import check, parse_targets
from care_q.census import vela as vela_mod
from care_q.census.tflite_reader import read_tflite
from care_q.census.vela import VelaOutput, compiled_result, parse_reasons, run_vela
from care_q.errors import CareQError
from care_q.export.tflite_builder import TFLiteBuilder, options
from care_q.pipeline import PrepareConfig, artifacts, prepare

OP = fb.BuiltinOperator
RECORDED = Path(__file__).resolve().parents[1] / "recorded" / "vela_u55_128_tiny"
CONFIGS = ("ethos-u55-128", "ethos-u85-256")
FLOAT_REASON = "Operation has tensor with unsupported DataType Float32"


# ----------------------------------------------------------------------------- care-q's NPU graph
@pytest.fixture(scope="module")
def npu_graph(tmp_path_factory, data_root, one_torch_thread):
    """npu_int8's graph for care_test at 32x32 (calibrated on 16 images, untrained), int8 in and out."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)        # random weights: placement does not depend on them
        prep = prepare(PrepareConfig("care_test", recipe="npu_int8", calib="cifar10_test", num_calib=16,
                                     img_size=32, data_root=data_root, progress=False))
    assert prep.recipe.io == "int8" and prep.recipe.targets == ("tflite",)
    path = tmp_path_factory.mktemp("vela") / "care_test_npu_int8.tflite"
    artifacts.emit("tflite", prep.plan, prep.recipe.io, path)
    return path, check(path, targets=",".join(CONFIGS) + ",edgetpu", runtime=False)


def test_npu_graph_compiles_backbone_on_the_npu(npu_graph):
    path, report = npu_graph
    names = [o.name for o in report.ops]
    l2 = [i for i, n in enumerate(names) if n == "L2_NORMALIZATION"]  # 6 attention heads + the head's LayerNorm
    assert len(l2) == 7 and "DEQUANTIZE" not in names and names[-2] == "CONV_2D"  # int8 head, classifier as conv
    for cfg in CONFIGS:
        t = report.targets[cfg]
        assert t.source == "compiled" and t.compiled["accelerator"] == cfg
        assert set(range(len(names))) - t.on_accelerator == set(l2)
        assert all(t.verdicts[i].rule == "Unsupported opType" for i in l2)
        assert t.verdicts[len(names) - 2].mapped and t.verdicts[0].rule == "NPU: Conv2D"
        # each L2 cuts the graph: 8 NPU segments from input to logits, the L2s between them
        seq = [(s.delegated, sorted(s.nodes)) for s in t.segments]
        assert [d for d, _ in seq] == [True, False] * 7 + [True]
        assert sorted(n for d, nodes in seq[1::2] for n in nodes) == l2
        assert t.partitions == len(l2) + 1
        assert sorted(i for _, nodes in seq for i in nodes) == list(range(len(names)))
        assert t.mac_share == 1.0                  # the L2s have no MACs
        c = t.compiled
        assert c["npu_segments"] == t.partitions
        assert c["inference_time_s"] == pytest.approx(c["cycles_total"] / c["clock_hz"], rel=1e-6)
        assert c["memory_kib"]["SRAM"] > 0
    u55, u85 = (report.targets[c].compiled for c in CONFIGS)
    assert u55["system_config"] == "Ethos_U55_High_End_Embedded" and u55["weights_area"] == "Off-chip Flash"
    assert u85["system_config"] == "Ethos_U85_SYS_DRAM_Mid" and u85["weights_area"] == "DRAM"
    assert u85["inference_time_s"] < u55["inference_time_s"]  # 256 MACs/cycle at 1 GHz vs 128 at 500 MHz
    d = report.to_dict()
    assert d["targets"]["ethos-u55-128"]["cpu_reasons"] == {"L2_NORMALIZATION": {"Unsupported opType": 7}}
    assert d["targets"]["edgetpu"]["source"] == "rules"
    assert "compiled, the authority: ethos-u55-128 (Vela 5.2.0), ethos-u85-256 (Vela 5.2.0)" in report.sources_line()
    assert "rule-based (care-q's static rules): edgetpu" in report.sources_line()


# ----------------------------------------------------------------------------- recorded Vela output
def _recorded() -> VelaOutput:
    log = (RECORDED / "vela_stdout.txt").read_text()
    return VelaOutput.read(RECORDED, "ethos-u55-128", log, "5.2.0")


TINY_SEGMENTS = [(False, [3], 0), (True, [0], 73728), (False, [1], 0), (True, [2], 73728), (False, [4, 5], 25088)]
TINY_RULES = ["NPU: Conv2D", "Unsupported opType", "NPU: Conv2D", "Operation does not support per-axis quantization",
              "Operation has non-constant bias tensor.", "Unsupported opType"]


def test_recorded_vela_output_parses_exactly():
    g = read_tflite(RECORDED / "tiny.tflite")
    assert [o.name for o in g.ops] == ["CONV_2D", "L2_NORMALIZATION", "CONV_2D", "RESHAPE", "DEPTHWISE_CONV_2D",
                                       "DEQUANTIZE"]
    t = compiled_result(g, _recorded())
    assert [t.verdicts[i].rule for i in range(6)] == TINY_RULES
    assert t.on_accelerator == {0, 2}
    assert [(s.delegated, s.nodes, s.macs) for s in t.segments] == TINY_SEGMENTS
    # 8x8 pixels x 16 out x 3x3x8 in; 8x8 x 8 out x 3x3x16; the 7x7 depthwise conv 8x8 x 8 x 49 on the CPU
    assert t.macs_total == 73728 * 2 + 25088 and t.mac_share == pytest.approx(147456 / 172544)
    assert t.compiled == {"compiler": "Vela 5.2.0", "accelerator": "ethos-u55-128",
                          "system_config": "Ethos_U55_High_End_Embedded", "memory_mode": "Shared_Sram",
                          "clock_hz": 500e6, "memory_kib": {"SRAM": 2.5, "Off-chip Flash": 2.890625},
                          "weights_area": "Off-chip Flash", "feature_map_area": "SRAM",
                          "inference_time_s": 5.952e-06, "cycles_total": 2976, "cycles_npu": 2816,
                          "nn_macs": 147456, "npu_segments": 2}
    ops = read_tflite(RECORDED / "tiny.tflite").ops
    assert t.cpu_reasons(ops) == {"L2_NORMALIZATION": {"Unsupported opType": 1},
                                  "RESHAPE": {"Operation does not support per-axis quantization": 1},
                                  "DEPTHWISE_CONV_2D": {"Operation has non-constant bias tensor.": 1},
                                  "DEQUANTIZE": {"Unsupported opType": 1}}


def test_live_vela_matches_the_recording():
    """This Vela gives the recorded result on the recorded model (the recording is not stale)."""
    g = read_tflite(RECORDED / "tiny.tflite")
    live = compiled_result(g, run_vela(RECORDED / "tiny.tflite", "ethos-u55-128"))
    rec = compiled_result(g, _recorded())
    assert live.verdicts == rec.verdicts and live.compiled == rec.compiled
    assert [(s.delegated, s.nodes) for s in live.segments] == [(s.delegated, s.nodes) for s in rec.segments]


def test_cli_check_on_recorded_vela_output(tmp_path, monkeypatch, capsys):
    model = tmp_path / "tiny.tflite"
    shutil.copy(RECORDED / "tiny.tflite", model)
    monkeypatch.setattr(vela_mod, "run_vela", lambda path, config: _recorded())
    out = tmp_path / "census.json"
    assert cli.main(["check", str(model), "--target", "ethos-u55-128,xnnpack", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ethos-u55-128 (Vela)" in printed                    # the table column says who decided
    assert "2 NPU segment(s) (1 CPU op(s) between them), 2/6 ops" in printed
    assert "estimated 0.00595 ms (2,976 cycles at 500 MHz" in printed
    assert "compiled, the authority: ethos-u55-128 (Vela 5.2.0); rule-based (care-q's static rules): xnnpack" in printed
    d = json.loads(out.read_text())
    u55 = d["targets"]["ethos-u55-128"]
    assert u55["source"] == "compiled" and d["targets"]["xnnpack"]["source"] == "rules"
    assert u55["partitions"] == 2 and u55["compiled"]["cycles_total"] == 2976
    assert [op["ethos-u55-128"]["rule"] for op in d["ops"]] == TINY_RULES


def test_parse_reasons_keeps_every_reason_of_an_op():
    log = ("Warning: No configuration file specified.\n\n"
           "Warning (supported operators) operator: DEPTHWISE_CONV_2D, ofm: 'a b'\n"
           "Reason: Operation has non-constant bias tensor.\nBias tensors must be constant\n\n"
           "Warning (supported operators) operator: DEPTHWISE_CONV_2D, ofm: 'a b'\n"
           "Reason: Operation does not support per-axis quantization\n\n"
           "Warning (supported operators) operator: DIV, ofm: 'c'\nReason: Unsupported opType\n")
    assert parse_reasons(log) == {
        ("DEPTHWISE_CONV_2D", "a b"): ["Operation has non-constant bias tensor.",
                                       "Operation does not support per-axis quantization"],
        ("DIV", "c"): ["Unsupported opType"]}


# ----------------------------------------------------------------------------- bad input
def _float_model(path):
    b = TFLiteBuilder("float")
    x, y = b.tensor("x", (1, 4, 4, 8), np.float32), b.tensor("y", (1, 4, 4, 8), np.float32)
    b.inputs.append(x)
    b.outputs.append(y)
    b.op(OP.ADD, [x, x], [y], fb.BuiltinOptions.AddOptions, options(fb.AddOptionsT))
    path.write_bytes(b.to_bytes())
    return path


def test_bad_inputs(tmp_path):
    with pytest.raises(CareQError, match=r"unknown Ethos-U accelerator config 'ethos-u99'; Vela 5\.2\.0 accepts "
                                         r"ethos-u55-32, .*ethos-u55-128, .*ethos-u85-2048$"):
        parse_targets("edgetpu,ethos-u99")
    assert parse_targets("ETHOS-U85-256,nnapi:6,ethos-u85-256") == [("ethos-u85-256", None), ("nnapi", 6)]
    with pytest.raises(CareQError, match="not an int8 model .*FLOAT32.*Vela would leave every op on the CPU"):
        check(_float_model(tmp_path / "f.tflite"), targets="ethos-u55-128")
    data = (RECORDED / "tiny.tflite").read_bytes()
    cut = tmp_path / "cut.tflite"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CareQError, match="truncated"):
        check(cut, targets="ethos-u55-128")
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CareQError) as e:          # past care-q's reader: Vela's own failure, in one line
        run_vela(junk, "ethos-u55-128")
    assert "Vela failed for ethos-u55-128 (exit 1): RuntimeError: Compilation failed" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(CareQError, match="ethos-u55-128 is a Vela target and Vela compiles .tflite files only"):
        check(tmp_path / "model.onnx", targets="edgetpu,ethos-u55-128")


def test_unexpected_vela_output_is_an_error(tmp_path):
    """A debug database without the column that maps Vela's ops to the input's (another Vela version)."""
    rec = tmp_path / "rec"
    shutil.copytree(RECORDED, rec)
    db = rec / "tiny_debug.xml"
    db.write_text(db.read_text().replace('"ext_key"', '"key"'))
    out = VelaOutput.read(rec, "ethos-u55-128", "", "9.9.9")
    with pytest.raises(CareQError, match=r"Vela 9\.9\.9's outputs for ethos-u55-128 are not in the format care-q "
                                         r"reads \(KeyError: 'ext_key'\)"):
        compiled_result(read_tflite(rec / "tiny.tflite"), out)
    (rec / "tiny_debug.xml").unlink()
    with pytest.raises(CareQError, match="Vela failed for ethos-u55-128: no output"):
        VelaOutput.read(rec, "ethos-u55-128", "", "5.2.0")
