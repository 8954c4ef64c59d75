"""The suite's NPU comparison (issues 7, 20): the census of care-q's PTQ proxy artifacts (the suite's recipe
and its extra recipes, npu_int8_ptq among them), ai-edge-quantizer's int8 model and every QAT recipe's
.tflite, per NPU target (Edge TPU and NNAPI FL6/FL7 by published rules, Ethos-U55/U85 compiled by Vela),
side by side with their accuracy."""

from __future__ import annotations

from pathlib import Path

from care_q.bench.artifacts import artifact_file, extra_file
from care_q.census import check

NPU_TARGETS = ("xnnpack", "nnapi:6", "nnapi:7", "edgetpu", "ethos-u55-128", "ethos-u85-256")


def coverage(path: Path) -> dict:
    """Static census of one .tflite for the NPU comparison: per target, the share of MACs on the
    accelerator (Edge TPU: before its single cut), partitions, the ops left on the CPU."""
    rep = check(path, targets=NPU_TARGETS, runtime=False)
    out = {}
    for key, t in rep.targets.items():
        d = t.to_dict(rep.ops)
        e = {"mac_share": d["mac_share"], "partitions": d["partitions"], "cpu_ops": d["cpu_ops"],
             "source": d["source"]}
        if d.get("compiled"):  # Vela: its estimate of the NPU's time, its segments
            e["time_ms"] = None if d["compiled"].get("inference_time_s") is None else \
                1e3 * d["compiled"]["inference_time_s"]
            e["segments"] = len(d["segments"])
        if d.get("edgetpu") and d["edgetpu"]["first_unmapped"]:
            f = d["edgetpu"]["first_unmapped"]
            e["first_unmapped"] = f"#{f['index']} {f['op']} ({f['output']})"
        out[key] = e
    return out


def npu_coverage(acc: dict | None, qt: dict, A: dict, root: Path) -> dict:
    """Issue 7: the NPU census of care-q's ptq_int8 proxy artifact and of every QAT recipe's .tflite, side by side
    with their accuracy."""
    rows = {}
    if acc:
        arts = (acc.get("eval") or {}).get("artifacts") or {}
        fp = (arts.get(artifact_file("fp32_tflite", A["model"])) or {}).get("metrics") or {}
        d = root / A["name"]
        files = {A["recipe"]: (d / "ptq" / artifact_file("careq_tflite", A["model"]), "ptq")}
        files |= {r: (d / f"ptq_{r}" / extra_file(A["model"], r, "tflite"), "ptq") for r in A.get("extra_recipes") or ()}
        files["ai_edge_quantizer"] = (d / "baselines" / artifact_file("ai_edge_quantizer", A["model"]), "baseline")
        for name, (f, kind) in files.items():
            if f.exists():
                m = (arts.get(f.name) or {}).get("metrics") or {}
                rows[name] = {"file": f.name, "coverage": coverage(f), "top1": m.get("top1"),
                              "fp32_top1": fp.get("top1"), "kind": kind}
    for name, r in qt.items():
        arts = r.get("artifacts") or {}
        tfl = next((v["file"] for v in arts.values() if v["file"].endswith(".tflite")), None)
        f = root / "qat" / name / tfl if tfl else None
        if f is None or not f.exists():
            continue
        a = r.get("accuracy") or {}
        rows[name] = {"file": f.name, "coverage": coverage(f), "kind": "qat",
                      "top1": None if a.get("qat_top1") is None else a["qat_top1"] / 100,
                      "fp32_top1": None if a.get("fp32_top1") is None else a["fp32_top1"] / 100}
    return rows
