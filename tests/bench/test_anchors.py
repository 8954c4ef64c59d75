"""The latency section's anchors (care_q.bench.anchors: generic int8 routes, each against its own
FP32), their cached steps and table, and how the bench pairs every int8 file with its FP32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from care_q.bench import anchors as A
from care_q.errors import CareQError


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 64, 3, padding=1)
        self.c2 = torch.nn.Conv2d(64, 64, 3, padding=1)
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(x.mean((2, 3)))


def _tflite_dtypes(path):
    from collections import Counter

    from ai_edge_litert.interpreter import Interpreter

    return Counter(np.dtype(d["dtype"]).name for d in Interpreter(model_path=str(path)).get_tensor_details())


def _activation_zero_point_types(path):
    import onnx

    m = onnx.load(str(path))
    init = {t.name: t for t in m.graph.initializer}
    zps = [n.input[2] for n in m.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    return {onnx.TensorProto.DataType.Name(init[z].data_type) for z in zps if z in init}


def _sqnr_db(ref, got):
    return 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2))


def test_routes_write_an_int8_file_beside_its_fp32(tmp_path):
    """Both routes on a small CNN: FP32 and int8 files that load, the int8 one with int8 weights
    (about a quarter of the FP32 file) and close to FP32 on the calibration inputs."""
    from care_q.runtime import load_runner, onnx_op_census, tflite_op_census

    torch.manual_seed(0)
    net = SmallCNN().eval()
    x = A.calibration_inputs(4, 16, seed=0)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    for route in ("tflite", "onnx"):
        made, failed = A.export_route("small", route, net, x, tmp_path)
        assert failed == {}
        fp32, int8 = (made[f"anchor_small_fp32.{route}"],
                      made[f"anchor_small_int8_{'pt2e' if route == 'tflite' else 'ort_qdq'}.{route}"])
        assert (fp32["source"], int8["source"]) == ("fp32", "int8") and int8["route"] == route
        assert 0.2 < int8["size_bytes"] / fp32["size_bytes"] < 0.4          # 38k weights: int8 vs float32
        if route == "tflite":  # PT2E: int8 convs (on this all-int8 graph, int8 input and output too)
            assert tflite_op_census(int8["path"]) == {"TRANSPOSE": 2, "CONV_2D": 2, "MEAN": 1, "FULLY_CONNECTED": 1}
            assert _tflite_dtypes(int8["path"])["float32"] == 0 and _tflite_dtypes(fp32["path"])["int8"] == 0
        else:
            assert onnx_op_census(int8["path"])["QuantizeLinear"] >= 3      # input, two conv outputs at least
            assert _activation_zero_point_types(int8["path"]) == {"UINT8"}   # u8s8: onnxruntime's fast x86 kernels
            assert int8["settings"]["activation_type"] == "QUInt8"
        r32, r8 = load_runner(fp32["path"], threads=1), load_runner(int8["path"], threads=1)
        np.testing.assert_allclose(r32(x), ref, rtol=1e-4, atol=1e-4)    # the FP32 file is the module
        assert _sqnr_db(ref, r8(x)) > 20                                  # the int8 one an 8-bit version of it


def test_a_failing_route_is_a_result(tmp_path, monkeypatch):
    def broken(net, x, path):
        raise RuntimeError("Unsupported op aten.foo\nmore")

    monkeypatch.setattr(A, "onnx_fp32", broken)
    made, failed = A.export_route("small", "onnx", SmallCNN().eval(), A.calibration_inputs(1, 8), tmp_path)
    assert made == {} and list(failed) == ["anchor_small_fp32.onnx"]     # no FP32: no quantize_static either
    assert failed["anchor_small_fp32.onnx"]["message"] == "RuntimeError: Unsupported op aten.foo"
    with pytest.raises(CareQError, match="unknown anchor 'vgg16'; known: \\['mobilenet_v2', 'resnet18'"):
        A.build_anchor("vgg16", tmp_path)


def test_anchor_models():
    """torchvision's architectures with their published parameter counts (no weights downloaded);
    the CARE backbone is the deploy form's feature map."""
    assert sum(p.numel() for p in A.anchor_model("resnet18").parameters()) == 11_689_512
    assert sum(p.numel() for p in A.anchor_model("mobilenet_v2").parameters()) == 3_504_872
    from care_q.graph.ops import FloatOps

    b = A.anchor_model("care_test_backbone", seed=3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = b(x)
        assert torch.equal(y, b.net.forward_features(x, FloatOps()))
        full = b.net(x)
    assert y.ndim == 4 and full.shape == (2, b.net.num_classes)


def test_bench_pairs_each_int8_file_with_its_own_fp32():
    from care_q.bench.host import _jobs

    def e(source, kind="tflite", shape=(1, 3, 224, 224)):
        return {"kind": kind, "source": source, "input_shape": list(shape)}

    entries = {"anchor_resnet18_fp32.tflite": e("fp32"), "anchor_resnet18_int8_pt2e.tflite": e("int8"),
               "anchor_mobilenet_v2_fp32.tflite": e("fp32"), "anchor_mobilenet_v2_int8_pt2e.tflite": e("int8"),
               "anchor_care_s0_backbone_fp32.tflite": e("fp32"), "odd_int8.tflite": e("int8", shape=(1, 3, 64, 64))}
    same = {n: v for n, v in entries.items() if v["input_shape"][2] == 224}
    assert A.ANCHORS["care_s0_backbone"][1] == ("tflite",)
    assert _jobs(same, "tflite", (1, 3, 224, 224), entries) == [
        ("anchor_resnet18_fp32.tflite", ["anchor_resnet18_fp32.tflite", "anchor_resnet18_int8_pt2e.tflite"]),
        ("anchor_mobilenet_v2_fp32.tflite", ["anchor_mobilenet_v2_fp32.tflite", "anchor_mobilenet_v2_int8_pt2e.tflite"]),
        (None, ["anchor_care_s0_backbone_fp32.tflite"])]                   # an FP32 without int8: timed alone
    assert _jobs({"odd_int8.tflite": entries["odd_int8.tflite"]}, "tflite", (1, 3, 64, 64), entries) == [
        (None, ["odd_int8.tflite"])]                                       # no FP32 of its shape


def test_run_anchors_caches_each_build_and_times_them_together(tmp_path, monkeypatch):
    from care_q.bench import latency_suite
    from care_q.bench.steps import Steps

    calls = []

    def build(name, folder, **kw):
        calls.append(("build", name, kw))
        Path(folder).mkdir(parents=True, exist_ok=True)
        arts = {}
        for src in ("fp32", "int8"):
            p = Path(folder) / f"anchor_{name}_{src}.tflite"
            p.write_bytes(f"{name}{src}".encode())
            arts[p.name] = {"path": str(p), "source": src, "anchor": name, "route": "tflite", "tool": src}
        return {"anchor": name, "label": name, "artifacts": arts, "failures": {}}

    def bench(arts, **kw):
        calls.append(("bench", sorted((n, a["source"]) for n, a in arts.items()), kw))
        return {"n": len(arts)}

    monkeypatch.setattr(latency_suite, "build_anchor", build)
    monkeypatch.setattr(latency_suite, "bench", bench)
    cfg = {"seed": 0, "threads": 2}
    Lc = {"anchors": ["resnet18", "mobilenet_v2"], "img_size": 224, "runs": 21, "blocks": 3, "warmup": 5}
    res = latency_suite.run_anchors(cfg, Lc, tmp_path, Steps(tmp_path, log=lambda m: None), False)
    assert [c[:2] for c in calls] == [("build", "resnet18"), ("build", "mobilenet_v2"), ("bench", [
        ("anchor_mobilenet_v2_fp32.tflite", "fp32"), ("anchor_mobilenet_v2_int8.tflite", "int8"),
        ("anchor_resnet18_fp32.tflite", "fp32"), ("anchor_resnet18_int8.tflite", "int8")])]
    assert calls[0][2] == {"img_size": 224, "num_calib": 8, "seed": 0}
    assert {k: calls[2][2][k] for k in ("runs", "blocks", "warmup", "tflite_delegates")} == {
        "runs": 21, "blocks": 3, "warmup": 5, "tflite_delegates": ("xnnpack",)}
    assert res["bench"] == {"n": 4} and set(res["built"]) == {"resnet18", "mobilenet_v2"}
    calls.clear()
    steps = Steps(tmp_path, log=lambda m: None)
    assert latency_suite.run_anchors(cfg, Lc, tmp_path, steps, False) == res and calls == []   # all cached
    assert len(steps.cached) == 3
    assert latency_suite.run_anchors(cfg, {**Lc, "anchors": []}, tmp_path, steps, False) == {}
    # a re-measured care-q bench (the medians set against the anchors') re-times the anchors, builds cached
    assert latency_suite.run_anchors(cfg, Lc, tmp_path, steps, False, {"care_s0": {"median": 7.1}}) == res
    assert [c[0] for c in calls] == ["bench"]
    calls.clear()
    assert latency_suite.run_anchors(cfg, Lc, tmp_path, steps, False, {"care_s0": {"median": 7.1}}) == res
    assert calls == []


def test_anchor_table_and_summary():
    from care_q.bench.benchmarks import anchor_blocks, summary_lines
    from care_q.bench.targets import anchor_rows
    from care_q.eval import report as R

    built = {"resnet18": {"label": "torchvision ResNet-18", "artifacts": {
        "r_fp32.tflite": {"source": "fp32", "route": "tflite", "tool": "litert-torch FP32"},
        "r_int8.tflite": {"source": "int8", "route": "tflite", "tool": "litert-torch PT2E int8"}},
        "failures": {"r_int8_ort_qdq.onnx": {"type": "error", "message": "ValueError: bad", "stage": "ort"}}}}
    stats = {"median_ms": 10.0, "p90_ms": 11.0, "ratio": 0.4, "ratio_spread": [0.38, 0.47], "fp32_median_ms": 25.0,
             "other_cpu_share": 0.125}
    bench = {"latency": {"tflite/xnnpack": {"r_int8.tflite": stats}}, "artifacts": {"r_int8.tflite": {"size_ratio": 0.26}},
             "other_cpu_share": 0.0}
    res = {"anchors": {"built": built, "bench": bench}, "config": {"latency": {"img_size": 224, "runs": 60, "blocks": 3,
                                                                              "warmup": 10}, "threads": 2},
           "targets": [], "rows": [], "seconds": 1.0}
    rows = anchor_rows(res)
    assert [(r["file"], r["stats"].get("ratio"), r["fp32_ms"]) for r in rows] == [
        ("r_int8.tflite", 0.4, 25.0), ("r_int8_ort_qdq.onnx", None, None)]
    md = R.to_markdown(anchor_blocks(res))
    assert "## Anchors: what int8 gives on this CPU" in md and "3 blocks of 20 rounds, each block in a fresh process" in md
    assert "| torchvision ResNet-18 | TFLite XNNPACK | litert-torch PT2E int8 | `r_int8.tflite` | 25.00 | 10.00 | " \
           "0.40x | 0.38–0.47 | 12% | 0.26x | ok |" in md
    assert "ValueError: bad" in md
    lines = summary_lines(res)
    assert "  anchor torchvision ResNet-18, litert-torch PT2E int8: 0.40x FP32 (blocks 0.38–0.47)" in lines


def test_latency_table_shows_the_ratio_its_spread_and_the_load():
    from care_q.bench.benchmarks import latency_blocks
    from care_q.eval import report as R

    s8 = {"median_ms": 30.0, "p90_ms": 33.0, "ratio": 0.75, "ratio_spread": [0.7, 0.81], "other_cpu_share": 0.4}
    s32 = {"median_ms": 40.0, "p90_ms": 41.0, "ratio": 1.0, "ratio_spread": [1.0, 1.0], "pairs": 2}
    rows = [{"label": "care-q int8 TFLite", "runtime": "tflite", "latency": {"care_s0": {"stats": s8, "size_bytes": 7e6,
                                                                                          "size_ratio": 0.28}}},
            {"label": "FP32 TFLite", "runtime": "tflite", "latency": {"care_s0": {"stats": s32, "size_bytes": 25e6,
                                                                                   "size_ratio": 1.0}}}]
    res = {"latency": {"care_s0": {"other_cpu_share": 0.4}}, "rows": rows,
           "config": {"threads": 2, "latency": {"img_size": 224, "num_calib": 8, "calib": "imagenet_1k_subset",
                                                "runs": 60, "blocks": 3, "warmup": 10}}}
    md = R.to_markdown(latency_blocks(res))
    assert "3 blocks of 20 rounds, each block in a fresh process after 10 warm-up runs" in md
    assert "**Warning: other processes used 40%" in md
    assert "| care-q int8 TFLite | TFLite XNNPACK | 30.00 | 33.00 | 0.75x | 0.70–0.81 | 40% | 7.00 | 0.28x |" in md
    assert "| FP32 TFLite | TFLite XNNPACK | 40.00 | 41.00 | 1.00x | – | – | 25.00 | 1.00x |" in md


def test_profile_table_sets_the_file_beside_its_bound():
    from care_q.bench.benchmarks import profile_blocks
    from care_q.eval import report as R

    groups = [{"op": "CONV_2D", "dtype": "int8", "count": 87, "ms": 3.25, "best_ms": 3.25, "float_faster": 0},
              {"op": "DIV", "dtype": "float32", "count": 12, "ms": 0.1, "best_ms": 0.1, "float_faster": 0}]
    res = {"profiles": {"care_s0": {"ms": 8.4, "bound_ms": 8.0, "groups": groups, "ratio_sum": 0.75,
                                    "ratio_bound": 0.714, "fp32": {"ms": 11.2}}, "care_s1": None}}
    md = R.to_markdown(profile_blocks(res))
    assert "## Per-op profile and bound (TFLite, XNNPACK)" in md and "### care_s1" not in md
    assert "Sums: care-q file 8.40 ms, its bound 8.00 ms (1.05x the bound), FP32 file 11.20 ms " \
           "(care-q / FP32 0.75, bound / FP32 0.71)." in md
    assert "| CONV_2D | int8 | 87 | 3.250 | 3.250 | 0 |" in md
    assert profile_blocks({"profiles": {}}) == []


def test_ort_profile_table_sets_kinds_beside_fp32():
    from care_q.bench.benchmarks import ort_profile_blocks
    from care_q.eval import report as R

    kinds = [{"kind": "conv 1x1", "ms": 4.8, "nodes": 83, "fp32_ms": 13.0, "fp32_nodes": 83, "best_ms": 4.8,
              "faster": "int8"},
             {"kind": "conversions", "ms": 2.15, "nodes": 184, "fp32_ms": None, "fp32_nodes": 0, "best_ms": 2.15,
              "faster": "-"}]
    res = {"ort_profiles": {"care_s0": {"careq_onnx_x86": {"ms": 18.5, "bound_ms": 17.2, "kinds": kinds,
                                                           "ratio_sum": 0.578, "ratio_bound": 0.537,
                                                           "fp32": {"ms": 32.0}}},
                            "care_s1": {}}}
    md = R.to_markdown(ort_profile_blocks(res))
    assert "## Per-op profile and bound (onnxruntime)" in md and "### care_s1" not in md
    assert "**care-q int8 ONNX QDQ, x86 recipe**: node sum 18.50 ms, its bound 17.20 ms (1.08x the bound), FP32 " \
           "32.00 ms (int8 / FP32 0.58, bound / FP32 0.54)." in md
    assert "| conv 1x1 | 83 | 4.800 | 83 | 13.000 | int8 |" in md
    assert "| conversions | 184 | 2.150 | – | – | - |" in md
    assert ort_profile_blocks({"ort_profiles": {"care_s0": {}}}) == []


def test_npu_table_has_every_ptq_recipe_and_vela_columns(tmp_path):
    """The NPU comparison reads the suite's recipe and its extra recipes (npu_int8_ptq among them) from
    their folders, compiles each with Vela for U55/U85 beside the rule census, and renders one row each."""
    import torch

    from care_q import create_model
    from care_q.bench.benchmarks import npu_blocks
    from care_q.bench.npu import npu_coverage
    from care_q.eval import report as R
    from care_q.export.tflite_int8 import emit_tflite_int8
    from care_q.graph.trace import trace
    from care_q.quant.calibrate import calibrate
    from care_q.quant.plan import build_plan
    from care_q.quant.recipe import load_recipe
    from care_q.transforms import deploy

    torch.manual_seed(0)
    model = deploy(create_model("care_test", num_classes=10))
    plan = build_plan(trace(model, torch.zeros(1, 3, 32, 32)), load_recipe("ptq_int8"))
    calibrate(plan, model, [torch.randn(16, 3, 32, 32)], progress=False)
    data = emit_tflite_int8(plan)
    for sub, name in (("ptq", "care_test_int8.tflite"), ("ptq_npu_int8_ptq", "care_test_int8_npu_int8_ptq.tflite")):
        (tmp_path / "proxy" / sub).mkdir(parents=True)
        (tmp_path / "proxy" / sub / name).write_bytes(data)
    A = {"name": "proxy", "model": "care_test", "recipe": "ptq_int8_cpu", "extra_recipes": ["npu_int8_ptq"]}
    acc = {"eval": {"artifacts": {"care_test_int8_npu_int8_ptq.tflite": {"metrics": {"top1": 0.74}},
                                  "care_test_fp32.tflite": {"metrics": {"top1": 0.75}}}}}
    rows = npu_coverage(acc, {}, A, tmp_path)
    assert list(rows) == ["ptq_int8_cpu", "npu_int8_ptq"]  # no ai-edge-quantizer file: no row
    c = rows["npu_int8_ptq"]["coverage"]
    assert c["ethos-u85-256"]["source"] == "compiled" and c["ethos-u85-256"]["time_ms"] > 0
    assert c["ethos-u85-256"]["segments"] >= 1 and c["nnapi:FL6"]["source"] == "rules"
    res = {"npu": rows, "config": {"accuracy": {"model": "care_test"}, "qat": {}}}
    md = R.to_markdown(npu_blocks(res))
    assert "| Ethos-U55-128 (Vela) | Ethos-U85-256 (Vela) |" in md and "| `npu_int8_ptq` (ptq) | 74.00% | -1.00 |" in md
    u85 = c["ethos-u85-256"]
    # NPU segments: Vela's compiled stretches (partitions), not the CPU ones between them
    assert 1 <= u85["partitions"] < u85["segments"] and u85["cpu_ops"]  # this file has CPU stretches too
    cell = f"| {sum(u85['cpu_ops'].values())} CPU ops, {u85['partitions']} NPU segments, {u85['time_ms']:.2f} ms |"
    assert cell in md
    # the same census per latency model at deployment resolution (issue 20's table at 224)
    from care_q.bench.benchmarks import npu_latency_blocks

    res = {"npu_latency": {"care_s0": {"npu_int8_ptq": rows["npu_int8_ptq"]}, "care_s1": None},
           "config": {"latency": {"img_size": 224, "num_calib": 8, "npu_recipes": ["npu_int8_ptq"]}}}
    md = R.to_markdown(npu_latency_blocks(res))
    assert "## NPU compile at 224x224 (issue 20)" in md and "### care_s1" not in md
    assert "| `care_test_int8_npu_int8_ptq.tflite` (npu_int8_ptq) |" in md and cell in md
