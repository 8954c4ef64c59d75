"""The suite's table rows (one per method: accuracy on the proxy, latency and size per latency model;
one per anchor: `anchor_rows`) and its target checks (issues 3, 5, 7 and 21's ratios to FP32), from the
sections' results; the rest of issues 19, 20 and 21 are `care_q.bench.issue_targets`'."""

from __future__ import annotations

from care_q.bench.artifacts import METHODS, SETTING
from care_q.bench.qat_steps import QAT_NUM_VERIFY, qat_epochs
from care_q.qat.config import TARGET_AGREEMENT

NPU_TARGET_DROP_PT = 1.0  # issue 7's npu_int8 accuracy goal


def method_rows(acc: dict | None, lat: dict) -> list[dict]:
    """One row per method: accuracy on the proxy, latency/size per latency model."""
    rows = []
    ev = acc["eval"] if acc else None
    for key, label, runtime, group in METHODS + [tuple(m) for m in (acc or {}).get("extra_methods") or []]:
        if not ((acc and key in acc["methods"]) or any(key in res["methods"] for res in lat.values())):
            continue  # not in this suite (the x86 recipe's ONNX without accuracy.onnx_x86_recipe)
        row = {"method": key, "label": label, "runtime": runtime, "group": group, "latency": {}}
        if acc and key in acc["methods"]:
            m = acc["methods"][key]
            row["file"] = m["file"]
            a = ev["artifacts"].get(m["file"]) if ev else None
            if "failure" in m:
                row["failure"] = m["failure"]
            elif a is not None and "failure" in a:
                row["failure"] = {**a["failure"], "stage": "evaluation on the proxy"}
            elif a is not None:
                row["accuracy"] = a["metrics"]
                row["size_bytes"] = a.get("size_bytes")
                row["census"] = a.get("census")
        for model, res in lat.items():
            meth = res["methods"].get(key)
            if meth is None:
                continue
            b = res["bench"]
            entry = {"file": meth["file"]}
            if "failure" in meth:
                entry["failure"] = meth["failure"]
            else:
                art = b["artifacts"].get(meth["file"], {})
                if "failure" in art:
                    entry["failure"] = art["failure"]
                stats = b["latency"].get(SETTING[runtime], {}).get(meth["file"])
                entry.update({"stats": stats, "size_bytes": art.get("size_bytes"), "size_ratio": art.get("size_ratio"),
                              "memory": art.get("memory"), "census": art.get("census"),
                              "slow": {s: v[meth["file"]] for s, v in b["latency"].items()
                                       if s not in SETTING.values() and meth["file"] in v}})
            row["latency"][model] = entry
        rows.append(row)
    return rows


def target_checks(rows: list[dict], T: dict, acc_model: str | None, lat_models: list[str]) -> list[dict]:
    by = {r["method"]: r for r in rows}
    model = "care_s0" if "care_s0" in lat_models else (lat_models[0] if lat_models else None)
    checks = []

    def add(what, target, value, ok):
        checks.append({"what": what, "target": target, "value": value, "ok": ok})

    for key in ("careq_tflite", "careq_onnx", "careq_onnx_x86"):
        r = by.get(key, {})
        if key == "careq_onnx_x86" and "accuracy" not in r:
            continue  # no x86 recipe in this suite
        v = (r.get("accuracy") or {}).get("drop_top1_pt")
        add(f"{r.get('label', key)}: top-1 drop on {acc_model} proxy (pt)", f"<= {T['accuracy_drop_pt']}", v,
            None if v is None else v <= T["accuracy_drop_pt"])
    if model:
        for key, tkey in (("careq_tflite", "tflite_latency_ratio"), ("careq_onnx", "onnx_latency_ratio"),
                          ("careq_onnx_x86", "onnx_latency_ratio")):
            e = by.get(key, {}).get("latency", {}).get(model, {})
            if key == "careq_onnx_x86" and not e:
                continue
            v = (e.get("stats") or {}).get("ratio")
            add(f"issue 21: {by[key]['label']}: latency / FP32, {model} (batch 1)", f"<= {T[tkey]}", v,
                None if v is None else v <= T[tkey])
        for key in ("careq_tflite", "careq_onnx"):
            v = by.get(key, {}).get("latency", {}).get(model, {}).get("size_ratio")
            add(f"{by[key]['label']}: size / FP32 artifact, {model}", f"<= {T['size_ratio']}", v,
                None if v is None else v <= T["size_ratio"])
    return checks


def qat_checks(qt: dict, Q: dict) -> list[dict]:
    """Issue 5: the plain QAT recipe within ``target_drop_pt`` of FP32; every other (more aggressive)
    recipe recovers at least half of its PTQ drop; every recipe's artifacts agree with its fake-quant
    model on ``TARGET_AGREEMENT`` of the verification images."""
    checks = []
    for name, r in qt.items():
        arts = r.get("artifacts") or {}
        if arts:
            worst = min(arts, key=lambda t: arts[t]["agreement"])
            v = 100 * arts[worst]["agreement"]
            checks.append({"what": f"QAT {name}: lowest artifact top-1 agreement with the fake-quant model, % "
                                   f"({worst}, {Q.get('num_verify', QAT_NUM_VERIFY)} images)",
                           "target": f">= {100 * TARGET_AGREEMENT:g}", "value": v, "ok": v >= 100 * TARGET_AGREEMENT})
        a = r.get("accuracy") or {}
        if not {"fp32_top1", "ptq_top1", "qat_top1"} <= set(a):
            continue
        drop = a["fp32_top1"] - a["qat_top1"]
        if name.startswith("npu"):  # issue 7: within 1.0 pt of FP32 after at most 3 epochs
            checks.append({"what": f"QAT {name}: top-1 drop vs FP32 after {qat_epochs(Q, name):g} epoch(s) (pt)",
                           "target": f"<= {NPU_TARGET_DROP_PT}", "value": drop, "ok": drop <= NPU_TARGET_DROP_PT})
        elif name == "qat_int8":
            t = Q.get("target_drop_pt", 0.1)
            checks.append({"what": f"QAT {name}: top-1 drop vs FP32 after {qat_epochs(Q, name):g} epoch(s) (pt)",
                           "target": f"<= {t}", "value": drop, "ok": drop <= t})
        else:
            ptq_drop = a["fp32_top1"] - a["ptq_top1"]
            share = (ptq_drop - drop) / ptq_drop if ptq_drop > 0 else None
            checks.append({"what": f"QAT {name}: share of its PTQ drop ({ptq_drop:.2f} pt) recovered",
                           "target": ">= 0.50", "value": share, "ok": None if share is None else share >= 0.5})
    return checks


def time_checks(pt: dict | None, P: dict | None) -> list[dict]:
    if not pt:
        return []
    v = None if "failure" in pt else pt["seconds"]
    return [{"what": f"`{pt['command']}`: wall time, process start to exit (s)", "target": f"<= {P['target_seconds']:g}",
             "value": v, "ok": None if v is None else v <= P["target_seconds"]}]


def anchor_rows(res: dict) -> list[dict]:
    """One row per anchor and runtime: its int8 file against its own FP32 in the anchors' bench."""
    an = res.get("anchors") or {}
    b = an.get("bench") or {}
    setting = {"tflite": "tflite/xnnpack", "onnx": "onnxruntime"}
    rows = []
    for name, built in (an.get("built") or {}).items():
        arts, fails = built.get("artifacts") or {}, built.get("failures") or {}
        for f, a in arts.items():
            if a["source"] != "int8":
                continue
            s = ((b.get("latency") or {}).get(setting[a["route"]]) or {}).get(f) or {}
            fail = ((b.get("artifacts") or {}).get(f) or {}).get("failure")
            rows.append({"name": name, "anchor": built.get("label", name), "runtime": a["route"], "tool": a["tool"],
                         "file": f, "stats": s, "fp32_ms": s.get("fp32_median_ms"), "failure": fail,
                         "size_ratio": ((b.get("artifacts") or {}).get(f) or {}).get("size_ratio")})
        for f, fl in fails.items():
            rows.append({"name": name, "anchor": built.get("label", name),
                         "runtime": "tflite" if f.endswith(".tflite") else "onnx",
                         "tool": fl.get("stage", ""), "file": f, "stats": {}, "fp32_ms": None, "failure": fl,
                         "size_ratio": None})
    return rows
