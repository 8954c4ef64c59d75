"""The targets of issues 19 (reconstruction PTQ), 20 (NPU by PTQ) and 21 (CPU latency) as rows of the
suite's target table, from a finished run's result (`care_q.bench.suite.run_suite`).

Each check is ``{"what", "target", "value", "ok"}`` like `care_q.bench.targets`' (``ok`` None: not
measured in this run). A check whose recipe, model or section is not in the suite is left out.
The thresholds are the suite's ``targets:`` (`care_q.bench.schema.DEFAULT_TARGETS`).
"""

from __future__ import annotations

from care_q.bench.targets import anchor_rows

LATENCY_MODEL = "care_s0"          # the issues' latency targets are on care_s0 at 224
PT2E_ANCHOR = "care_s0_backbone"   # litert-torch PT2E's int8 CARE backbone (`care_q.bench.anchors`)
VELA_TARGETS = ("ethos-u55-128", "ethos-u85-256")
RULE_TARGETS = (("edgetpu", "Edge TPU"), ("nnapi:FL6", "NNAPI FL6"))


def _check(what: str, op: str, target: float, value) -> dict:
    ok = None if value is None else (value <= target if op == "<=" else value >= target)
    return {"what": what, "target": f"{op} {target:g}", "value": value, "ok": ok}


def _metrics(rows: dict, key: str) -> dict:
    return rows.get(key, {}).get("accuracy") or {}


def _pct(v):
    return None if v is None else 100 * v


def cpu_checks(res: dict, rows: dict, T: dict) -> list[dict]:
    """Issue 21: care-q's TFLite time against PT2E's int8 CARE backbone, the one-op sum against its bound,
    and the suite recipe's accuracy on the proxy (drop, and agreement at least ptq_int8's, same runtime).
    The ratios to FP32 are `care_q.bench.targets.target_checks`' rows."""
    out = []
    e = rows.get("careq_tflite", {}).get("latency", {}).get(LATENCY_MODEL)
    pt2e = [a for a in anchor_rows(res) if a["name"] == PT2E_ANCHOR and a["runtime"] == "tflite"]
    if e is not None and pt2e:
        theirs, ours = pt2e[0]["stats"].get("median_ms"), (e.get("stats") or {}).get("median_ms")
        v = None if not theirs or ours is None else ours / theirs
        out.append(_check(f"issue 21: care-q int8 TFLite / litert-torch PT2E int8 backbone (no head), median time, "
                          f"{LATENCY_MODEL}", "<=", T["pt2e_time_ratio"], v))
    p = (res.get("profiles") or {}).get(LATENCY_MODEL)
    if p:
        v = p["ms"] / p["bound_ms"] if p.get("bound_ms") else None
        out.append(_check(f"issue 21: care-q int8 TFLite one-op sum / its per-op bound, {LATENCY_MODEL}", "<=",
                          T["bound_ratio"], v))
    for key, p in ((res.get("ort_profiles") or {}).get(LATENCY_MODEL) or {}).items():
        v = p["ms"] / p["bound_ms"] if p.get("bound_ms") else None
        label = "x86 recipe" if key.endswith("_x86") else "suite recipe"
        out.append(_check(f"issue 21: care-q int8 ONNX QDQ ({label}) node sum / its per-kind bound (onnxruntime "
                          f"profiler), {LATENCY_MODEL}", "<=", T["bound_ratio"], v))
    for key, ref in (("careq_tflite", "careq_tflite:ptq_int8"), ("careq_onnx", "careq_onnx:ptq_int8"),
                     ("careq_onnx_x86", "careq_onnx:ptq_int8")):
        m = _metrics(rows, key)
        if not m:
            continue
        label = rows[key]["label"]
        out.append(_check(f"issue 21: {label}: top-1 drop on the proxy (pt)", "<=", T["cpu_drop_pt"],
                          m.get("drop_top1_pt")))
        r = _metrics(rows, ref)
        if r.get("agreement") is not None:
            out.append(_check(f"issue 21: {label}: top-1 agreement with FP32, % (target: {rows[ref]['label']}'s)",
                              ">=", round(100 * r["agreement"], 2), _pct(m.get("agreement"))))
    return out


def recon_checks(res: dict, rows: dict, T: dict) -> list[dict]:
    """Issue 19: ptq_int8_recon's artifacts near FP32 (drop, agreement, logit SQNR), ptq_w4a8_recon's drop,
    and each reconstruction recipe's reconstruction time on the proxy."""
    out = []
    for key, row in rows.items():
        if key.partition(":")[2] == "ptq_int8_recon" and row.get("accuracy"):
            m, label = row["accuracy"], row["label"]
            out += [_check(f"issue 19: {label}: top-1 drop on the proxy (pt)", "<=", T["recon_drop_pt"],
                           m.get("drop_top1_pt")),
                    _check(f"issue 19: {label}: top-1 agreement with FP32, %", ">=", T["recon_agreement_pct"],
                           _pct(m.get("agreement"))),
                    _check(f"issue 19: {label}: logit SQNR against FP32 (dB)", ">=", T["recon_sqnr_db"],
                           m.get("logit_sqnr_db"))]
        elif key.partition(":")[2] == "ptq_w4a8_recon" and row.get("accuracy"):
            out.append(_check(f"issue 19: {row['label']}: top-1 drop on the proxy (pt)", "<=", T["w4a8_drop_pt"],
                              row["accuracy"].get("drop_top1_pt")))
    for name, rep in ((res.get("accuracy") or {}).get("extra_ptq") or {}).items():
        rc = (rep or {}).get("reconstruction")
        if rc and name in ("ptq_int8_recon", "ptq_w4a8_recon"):
            out.append(_check(f"issue 19: {name}: reconstruction on the proxy ({rc['images']} images, "
                              f"{rc['iterations']} steps per unit, {rc['device']}), seconds", "<=",
                              T["recon_seconds"], rc.get("seconds")))
    return out


# issue 20's NPU recipes and the targets each is for: one graph family, two normalisers (docs/npu.md): NNAPI FL6
# has no int8 RSQRT, Ethos-U no L2_NORMALIZATION
NPU_RECIPE_TARGETS = {"npu_int8_ptq": ((), RULE_TARGETS),
                      "npu_int8_ptq_ethosu": (VELA_TARGETS, RULE_TARGETS[:1])}


def npu_checks(res: dict, rows: dict, T: dict) -> list[dict]:
    """Issue 20, per NPU recipe the run measured: its drop on the proxy, its .tflite bit-exact with its reference,
    and on the targets it is for (NPU_RECIPE_TARGETS) no CPU op (Ethos-U, Vela) or all MACs (Edge TPU, NNAPI
    FL6: rules)."""
    out = []
    for recipe, (vela, rules) in NPU_RECIPE_TARGETS.items():
        out += _npu_recipe_checks(res, rows, T, recipe, vela, rules)
    return out


def _npu_recipe_checks(res: dict, rows: dict, T: dict, recipe: str, vela: tuple, rules: tuple) -> list[dict]:
    out = []
    m = _metrics(rows, f"careq_tflite:{recipe}")
    if m:
        out.append(_check(f"issue 20: {recipe} .tflite: top-1 drop on the proxy (pt)", "<=", T["npu_drop_pt"],
                          m.get("drop_top1_pt")))
    ver = ((((res.get("accuracy") or {}).get("extra_ptq") or {}).get(recipe) or {}).get("artifacts") or {}) \
        .get("tflite", {}).get("verification")
    if ver:
        out.append(_check(f"issue 20: {recipe} .tflite against its reference ({ver['images']} images): "
                          f"largest logit difference", "<=", 0, ver.get("max_abs_diff")))
    cov = ((res.get("npu") or {}).get(recipe) or {}).get("coverage") or {}
    for t in vela:
        if cov.get(t):
            n = sum((cov[t].get("cpu_ops") or {}).values())
            out.append(_check(f"issue 20: {recipe} .tflite: ops on the CPU, input to logits, {t} (Vela)", "<=", 0, n))
    for t, label in rules:
        if (cov.get(t) or {}).get("mac_share") is not None:
            out.append(_check(f"issue 20: {recipe} .tflite: share of MACs on {label} (rules), %", ">=", 100,
                              _pct(cov[t]["mac_share"])))
    return out


def issue_checks(res: dict, T: dict) -> list[dict]:
    """Every check of issues 21, 19 and 20 that this run measured."""
    rows = {r["method"]: r for r in res.get("rows") or []}
    return cpu_checks(res, rows, T) + recon_checks(res, rows, T) + npu_checks(res, rows, T)
