"""onnxruntime's per-node profile by kind (`care_q.export.onnx_profile`): kinds of torch.onnx's
decompositions and of QDQ graphs, the per-run medians, and a real profile of a small int8 / FP32 pair."""

from pathlib import Path

import onnx
import pytest
from one_op import onnx_fp32_model as _fp32_model
from one_op import onnx_int8_model as _int8_model

from care_q.errors import CareQError
from care_q.export.onnx_profile import _node_times, node_kinds, profile_onnx


def test_kinds_of_torch_onnx_decompositions_and_convolutions():
    k = node_kinds(_fp32_model())
    assert k["pw"] == "conv 1x1" and k["dw"] == "depthwise 3x3"
    assert sorted(n for n, v in k.items() if v == "gelu") == ["node_Add_3", "node_Div_1", "node_Erf_2", "node_Mul_4",
                                                              "node_gelu"]
    assert sorted(n for n, v in k.items() if v == "elu") == ["node_add_9", "node_clamp", "node_exp", "node_relu",
                                                             "node_sub_10"]
    assert k["node_residual"] == "add"  # past the decomposition: an add of its own
    q = node_kinds(_int8_model())
    assert q["act"] == "gelu" and q["pw"] == "conv 1x1"
    assert q["x/Quantize"] == q["w/Dequantize"] == "conversions"


def test_node_times_are_medians_over_the_last_runs():
    def run(ts, dur):
        return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}

    def node(name, ts, dur, op="Conv"):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    # a warm-up run (dropped), then three kept runs; node "a" runs twice in the last one (summed)
    ev = [run(0, 100), node("a", 10, 999), run(200, 100), node("a", 210, 10), node("b", 250, 40, "Add"),
          run(400, 100), node("a", 410, 30), node("b", 450, 20, "Add"),
          run(600, 200), node("a", 610, 20), node("a", 650, 30), node("b", 700, 60, "Add")]
    nodes, run_ms = _node_times(ev, runs=3)
    assert nodes["a"]["ms"] == pytest.approx(0.030) and nodes["a"]["op"] == "Conv"  # median of 10, 30, 50
    assert nodes["b"]["ms"] == pytest.approx(0.040)
    assert run_ms == pytest.approx(0.1)


def test_profile_of_an_int8_file_beside_its_fp32(tmp_path):
    q, f = tmp_path / "q.onnx", tmp_path / "f.onnx"
    onnx.save(_int8_model(), q)
    onnx.save(_fp32_model(), f)
    p = profile_onnx(q, fp32=f, runs=5, warmup=2)
    kinds = {k["kind"]: k for k in p["kinds"]}
    # onnxruntime fused DQ -> Conv -> Q into one QLinearConv, and this GELU decomposition into its Gelu
    assert kinds["conv 1x1"]["nodes"] == 1 and kinds["conv 1x1"]["fp32_nodes"] == 1
    assert kinds["gelu"]["nodes"] == 1 and kinds["gelu"]["fp32_nodes"] == 1
    assert "conversions" in kinds and kinds["conversions"]["fp32_ms"] is None
    assert p["fp32"]["only_fp32"] == ["add", "depthwise 3x3", "elu"]
    # the bound takes each shared kind's faster form; conversions and layout stay as the int8 file has them
    for k in p["kinds"]:
        want = min(k["ms"], k["fp32_ms"]) if k["fp32_ms"] is not None and k["kind"] not in ("conversions", "layout") \
            else k["ms"]
        assert k["best_ms"] == pytest.approx(want)
    assert p["bound_ms"] == pytest.approx(sum(k["best_ms"] for k in p["kinds"])) and p["bound_ms"] <= p["ms"]
    assert p["ms"] <= p["run_ms"] * 1.05  # node times are inside the runs
    assert p["blocks"] == 3 and len(p["run_ms_blocks"]) == 3 and len(p["fp32"]["run_ms_blocks"]) == 3
    assert p["ratio_sum"] == pytest.approx(p["ms"] / p["fp32"]["ms"])


def test_files_are_profiled_in_turn_and_merged_by_median(tmp_path, monkeypatch):
    """int8, FP32, int8, FP32, ...: a drifting machine moves both alike; each node's time is its blocks' median."""
    from care_q.export import onnx_profile

    q, f = tmp_path / "q.onnx", tmp_path / "f.onnx"
    q.write_bytes(b"q")
    f.write_bytes(b"f")
    order, slow = [], iter([1.0, 1.0, 3.0, 3.0, 2.0, 2.0])  # the machine slows down, then recovers a little

    def child(fn, path, *args, what=""):
        order.append(Path(path).name)
        k = next(slow)
        int8 = path == str(q)
        conv = {"op": "QLinearConv" if int8 else "Conv", "kind": "conv 1x1", "ms": k * (1.0 if int8 else 2.0)}
        dq = {"op": "DequantizeLinear", "kind": "conversions", "ms": 0.1 * k}
        return {"run_ms": k * 10, "nodes": {"c": conv, "dq": dq} if int8 else {"c": conv}}

    monkeypatch.setattr(onnx_profile, "run_isolated", child)
    p = profile_onnx(q, fp32=f, blocks=3)
    assert order == ["q.onnx", "f.onnx"] * 3
    kinds = {k["kind"]: k for k in p["kinds"]}
    assert kinds["conv 1x1"]["ms"] == pytest.approx(2.0) and kinds["conv 1x1"]["fp32_ms"] == pytest.approx(4.0)
    assert kinds["conversions"]["ms"] == pytest.approx(0.2)
    assert p["run_ms"] == pytest.approx(20.0) and p["run_ms_blocks"] == [10.0, 30.0, 20.0]
    assert p["ratio_sum"] == pytest.approx(2.2 / 4.0)
    with pytest.raises(CareQError, match="blocks must be at least 1"):
        profile_onnx(q, fp32=f, blocks=0)
