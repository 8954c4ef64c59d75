"""The suite's tables: eval/BENCHMARKS.md (no figures) and out/bench/report.{md,json,html} (with).

Built from `care_q.bench.suite.run_suite`'s result with the report blocks of `care_q.eval.report`.
"""

from __future__ import annotations

from pathlib import Path

from care_q.bench.issue_targets import PT2E_ANCHOR
from care_q.bench.targets import anchor_rows
from care_q.eval import plots
from care_q.eval import report as R
from care_q.utils.machine import busy_warning

SECTIONS = ("accuracy", "qat", "latency", "ptq_time")  # the suite's sections (`care_q.bench.suite`), in order


def _status(v) -> str:
    return "–" if v is None else ("PASS" if v else "**FAIL**")


def _fmt_target_value(v) -> str:
    return "–" if v is None else (str(v) if isinstance(v, int) else f"{v:.2f}")


PLAIN_INT8_GAIN = 0.9  # a plain CNN's int8 / FP32 at or above this: the host's int8 kernels give (almost) nothing


def target_blocks(res: dict) -> list:
    rows = [[t["what"], t["target"], _fmt_target_value(t["value"]), _status(t["ok"])] for t in res["targets"]]
    out = [R.H(2, "Targets (issues 3, 5, 7, 19, 20 and 21)"), R.T(["what", "target", "measured", "status"], rows, "lrrl")]
    an = [a for a in anchor_rows(res) if a["stats"].get("ratio") is not None]
    if an:  # the latency targets beside what int8 gave outside care-q in the same run
        out.append(R.P("Latency targets in context, the same run's anchors (int8 / own FP32): " + "; ".join(
            f"{a['anchor']} {'TFLite' if a['runtime'] == 'tflite' else 'onnxruntime'} {a['stats']['ratio']:.2f}x"
            for a in an) + "."))
        plain = [a for a in an if a["runtime"] == "tflite" and a["name"] != PT2E_ANCHOR]
        if plain and min(a["stats"]["ratio"] for a in plain) >= PLAIN_INT8_GAIN:
            out.append(R.P(f"**On this host plain CNNs gain nothing from int8 in TFLite (every TFLite anchor at "
                           f">= {PLAIN_INT8_GAIN}x its FP32): its int8 kernels, not care-q's graph, set the TFLite "
                           f"ratios; compare care-q with the anchors, not with a ratio measured on another host.**"))
    return out


def accuracy_blocks(res: dict) -> list:
    acc = res.get("accuracy")
    if not acc:
        return []
    ev = acc["eval"]
    A = res["config"]["accuracy"]
    ref = ev["reference"]
    cal = acc["ptq"]["calibration"]
    out = [R.H(2, f"Accuracy: {A['model']} proxy on {ev['dataset']['name']} ({ev['dataset']['images']} images, "
                  f"{ev['img_size']}x{ev['img_size']})"),
           R.L([f"checkpoint: `{Path(A['weights']).name}`; FP32 PyTorch top-1 {R.pct(ref['top1'])}, top-5 {R.pct(ref['top5'])}",
                f"calibration: the same {cal['images']} images of `{cal['set']}` for care-q (recipe `{A['recipe']}`) and "
                f"every baseline",
                "every artifact runs in its runtime (onnxruntime CPU EP; TFLite with XNNPACK) on the same images; agreement: "
                "same top-1 class as the FP32 PyTorch model"])]
    headers = ["method", "file", "top-1", "top-5", "top-1 drop (pt)", "agreement", "logit SQNR (dB)", "size (MB)",
               "float ops", "XNNPACK partitions", "status"]
    rows = []
    for r in res["rows"]:
        if "file" not in r:
            continue
        c = r.get("census") or {}
        parts = (c.get("xnnpack") or {}).get("partitions") if r["runtime"] == "tflite" else None
        if "accuracy" in r:
            m = r["accuracy"]
            rows.append([r["label"], f"`{r['file']}`", R.pct(m["top1"]), R.pct(m["top5"]), R.pts(m["drop_top1_pt"]),
                         R.pct(m["agreement"]), R.num(m.get("logit_sqnr_db"), ".1f"), R.mb(r.get("size_bytes")),
                         c.get("float_ops"), parts, "ok"])
        else:
            rows.append([r["label"], f"`{r['file']}`", "", "", "", "", "", "", "", "",
                         R.failure_text(r.get("failure") or {"message": "no result"})])
    out.append(R.T(headers, rows, "llrrrrrrrrl"))
    pq = acc["ptq"]["artifacts"]
    ver = "; ".join(f"{t}: {R.pct(a['verification']['top1_agreement'], 1)} top-1 agreement, logit SQNR "
                    f"{a['verification']['logit_sqnr_db']:.1f} dB" for t, a in pq.items())
    out.append(R.P(f"care-q artifacts against their PyTorch fake-quant reference ({acc['ptq']['verification_images']} "
                   f"held-out calibration-set images): {ver}."))
    return out


def _fid(f: dict | None) -> str:
    if not f:
        return "–"
    noise = f" (noise {R.pct(f['noise_agreement'])})" if "noise_agreement" in f else ""
    return f"{R.pct(f['top1_agreement'])} / {f['logit_sqnr_db']:.1f} dB{noise}"


def _noise_sentence(nz: dict | None, T: dict) -> str:
    """What white noise at issue 19's SQNR target gives (`care_q.eval.ceiling.noise_reference`)."""
    if not nz:
        return ""
    a = nz["top1_agreement"]
    text = (f" I.i.d. Gaussian noise on the FP32 logits at the target's {nz['logit_sqnr_db']:g} dB ({nz['draws']} draws "
            f"on the {nz['images']} test images) keeps the top-1 of {R.pct(a['mean'])} of them ({R.pct(a['low'])}–"
            f"{R.pct(a['high'])}, 5th–95th percentile)")
    d = nz.get("top1_drop")
    if d:
        met = sum(v <= T["recon_drop_pt"] for v in d["draws"])
        text += (f" and drops top-1 by {d['mean']:.2f} pt (sd {d['sd']:.2f}, {d['low']:+.2f} to {d['high']:+.2f}): "
                 f"{met} of the {len(d['draws'])} draws meet the drop target (<= {T['recon_drop_pt']:g} pt), the "
                 f"share of such runs a model exactly at the SQNR target with an error as benign as white noise "
                 f"would pass")
    return text + "."


def ceiling_blocks(res: dict) -> list:
    """Issue 19's anchors: where each ``ceiling_recipes`` plan's fidelity stops (`care_q.eval.ceiling`)."""
    ceilings = (res.get("accuracy") or {}).get("ceilings") or {}
    if not ceilings:
        return []
    T = res["config"]["targets"]
    n = next(iter(ceilings.values()))["images"]
    rows = [[f"`{r}`", _fid(c["held_out"]["int8"]), _fid(c["held_out"]["weights_alone"]),
             _fid(c["held_out"]["activations_alone"]), _fid(c["calibration"]["int8"])] for r, c in ceilings.items()]
    return [R.H(3, "Where the int8 fidelity stops (issue 19's anchors)"),
            R.P(f"Each recipe's plan in fake quantization against FP32 (top-1 agreement / logit SQNR): on the "
                f"{n['held_out']} test images whole, with its int8 weights alone (every activation float), with its int8 "
                f"activations alone (float weights), and whole on the {n['calibration']} calibration images it was "
                f"calibrated (and reconstructed) on. Issue 19 asks every backbone op int8 at >= "
                f"{T['recon_agreement_pct']:g}% agreement and >= {T['recon_sqnr_db']:g} dB on the test images: a "
                f"column below {T['recon_agreement_pct']:g}% shows a part of the model that misses the agreement "
                f"on its own. Fake quantization, not the runtimes' kernels: compare the first column with the "
                f"artifacts' rows above. (noise X%): the agreement i.i.d. Gaussian noise of the same logit SQNR on the "
                f"FP32 logits keeps; below it, the error lands on the images whose top two classes are close."
                + _noise_sentence((res.get("accuracy") or {}).get("noise"), T)),
            R.T(["recipe", "int8 (test)", "int8 weights alone (test)", "int8 activations alone (test)",
                 "int8 (calibration images)"], rows, "lrrrr")]


def latency_blocks(res: dict) -> list:
    lat = res.get("latency") or {}
    if not lat:
        return []
    L = res["config"]["latency"]
    out = [R.H(2, f"Latency at {L['img_size']}x{L['img_size']}, batch 1, {res['config']['threads']} threads"),
           R.P(f"Random weights (latency does not depend on their values), {L['num_calib']} calibration images of "
               f"`{L['calib']}`. {method_text(L)} "
               f"Peak: resident-memory high-water mark of a process that loads and runs only that artifact.")]
    for model in lat:
        rows = []
        for r in res["rows"]:
            e = r["latency"].get(model)
            if e is None:
                continue
            s = e.get("stats") or {}
            c = e.get("census") or {}
            parts = (c.get("xnnpack") or {}).get("partitions") if r["runtime"] == "tflite" else c.get("integer_kernels")
            mem = e.get("memory") or {}
            status = R.failure_text(e["failure"]) if "failure" in e else "ok"
            rows.append([r["label"], "TFLite XNNPACK" if r["runtime"] == "tflite" else "onnxruntime CPU",
                         R.num(s.get("median_ms")), R.num(s.get("p90_ms")),
                         "–" if s.get("ratio") is None else f"{s['ratio']:.2f}x", spread_text(s), load_text(s),
                         R.mb(e.get("size_bytes")),
                         "–" if e.get("size_ratio") is None else f"{e['size_ratio']:.2f}x",
                         R.num(mem.get("peak_mb"), ".0f"), c.get("float_ops"), parts, status])
        warn = busy_warning(lat[model])
        out += [R.H(3, model)] + ([R.P(f"**Warning: {warn}.**")] if warn else []) + [
                R.T(["method", "runtime", "median (ms)", "p90 (ms)", "ratio", "ratio per block (min–max)",
                     "other processes' CPU", "size (MB)", "size ratio", "peak RSS (MB)", "float ops",
                     "XNNPACK partitions / ORT int kernels", "status"], rows, "llrrrrrrrrrrl")]
        slow = [(r["label"], s, v) for r in res["rows"] for s, v in
                ((r["latency"].get(model) or {}).get("slow") or {}).items()]
        if slow:
            out.append(R.T(["method", "setting", "median (ms)", "p90 (ms)", "ratio", "ratio per block (min–max)"],
                           [[lbl, s, R.num(v["median_ms"]), R.num(v["p90_ms"]),
                             "–" if v.get("ratio") is None else f"{v['ratio']:.2f}x", spread_text(v)]
                            for lbl, s, v in slow], "llrrrr"))
    return out


def method_text(L: dict) -> str:
    blocks = L.get("blocks", 3)
    return (f"Every int8 artifact is timed against the FP32 artifact of its runtime in processes that load only "
            f"those two: {blocks} blocks of {-(-L['runs'] // blocks)} rounds, each block in a fresh process after "
            f"{L['warmup']} warm-up runs of each, the order rotated each round, the blocks of all comparisons taken in "
            f"turn (so a comparison's blocks spread over the whole measurement). Median and p90 over the rounds; ratio: "
            f"the median of the blocks' int8 / FP32 median ratios; its spread: the lowest and highest of them. FP32 "
            f"rows: the median over the comparisons it was in.")


def spread_text(s: dict) -> str:
    sp = s.get("ratio_spread")
    if not sp or "pairs" in s:  # an FP32 artifact: its own reference
        return "–"
    return f"{sp[0]:.2f}–{sp[1]:.2f}"


def load_text(s: dict) -> str:
    """The share of the cores other processes took while this comparison ran."""
    v = s.get("other_cpu_share")
    return "–" if v is None else f"{100 * v:.0f}%"


def anchor_blocks(res: dict) -> list:
    rows = anchor_rows(res)
    if not rows:
        return []
    L = res["config"]["latency"]
    out = [R.H(2, "Anchors: what int8 gives on this CPU"),
           R.P(f"The same run and method, outside care-q: torchvision MobileNetV2 and ResNet-18 (random weights) "
               f"converted by litert-torch (FP32) and its PT2E int8 route (symmetric, per-channel, static) for TFLite, "
               f"and by torch.onnx (FP32) and onnxruntime `quantize_static` (its default uint8 activations and int8 "
               f"weights, per-channel, QDQ, MinMax) for onnxruntime; and litert-torch PT2E's int8 care_s0 backbone "
               f"(no head: its conversion fails with the head) against its own FP32 TFLite. "
               f"{L['img_size']}x{L['img_size']}, batch 1, "
               f"{res['config']['threads']} threads, calibration on 8 random images. {method_text(L)}")]
    tbl = [[r["anchor"], "TFLite XNNPACK" if r["runtime"] == "tflite" else "onnxruntime CPU", r["tool"], f"`{r['file']}`",
            R.num(r["fp32_ms"]), R.num(r["stats"].get("median_ms")),
            "–" if r["stats"].get("ratio") is None else f"{r['stats']['ratio']:.2f}x", spread_text(r["stats"]),
            load_text(r["stats"]), "–" if r["size_ratio"] is None else f"{r['size_ratio']:.2f}x",
            R.failure_text(r["failure"]) if r["failure"] else "ok"] for r in rows]
    warn = busy_warning(res["anchors"]["bench"]) if res["anchors"].get("bench") else None
    out += ([R.P(f"**Warning: {warn}.**")] if warn else []) + [
        R.T(["anchor", "runtime", "int8 by", "file", "FP32 median (ms)", "int8 median (ms)", "ratio",
             "ratio per block (min–max)", "other processes' CPU", "size ratio", "status"], tbl, "llllrrrrrrl")]
    return out


def profile_blocks(res: dict) -> list:
    """Per model: the care-q .tflite's one-op profile by op kind, its bound, and the FP32 file's sum."""
    profs = {m: p for m, p in (res.get("profiles") or {}).items() if p}
    if not profs:
        return []
    out = [R.H(2, "Per-op profile and bound (TFLite, XNNPACK)"),
           R.P("Each op of the care-q .tflite timed as a model of its own (`care_q/export/tflite_profile.py`), int8 ops "
               "also as float islands (DEQUANTIZE, the op in float, QUANTIZE); ops of one signature once, an empty "
               "model's invoke cost subtracted. Bound: every op in its faster form. One-op sums are not the graph's "
               "time (a whole graph fuses and partitions), so they are compared with each other: the care-q file's "
               "sum against its bound, and against the FP32 file's ops timed alike.")]
    for model, p in profs.items():
        fp = p.get("fp32") or {}
        within = p["ms"] / p["bound_ms"] if p["bound_ms"] else None
        rows = [[g["op"], g["dtype"], g["count"], R.num(g["ms"], ".3f"), R.num(g["best_ms"], ".3f"), g["float_faster"]]
                for g in p["groups"][:10]]
        out += [R.H(3, model),
                R.P(f"Sums: care-q file {p['ms']:.2f} ms, its bound {p['bound_ms']:.2f} ms "
                    f"({'–' if within is None else f'{within:.2f}x'} the bound), FP32 file {R.num(fp.get('ms'))} ms "
                    f"(care-q / FP32 {R.num(p.get('ratio_sum'))}, bound / FP32 {R.num(p.get('ratio_bound'))})."),
                R.T(["op", "type", "ops", "as written (ms)", "faster form (ms)", "float island faster"], rows,
                    "llrrrr")]
    return out


ORT_PROFILE_LABELS = {"careq_onnx": "care-q int8 ONNX QDQ", "careq_onnx_x86": "care-q int8 ONNX QDQ, x86 recipe"}


def ort_profile_blocks(res: dict) -> list:
    """Per model and care-q ONNX file: onnxruntime's profile by kind beside the FP32 ONNX's, and the bound."""
    profs = {m: p for m, p in (res.get("ort_profiles") or {}).items() if p}
    if not profs:
        return []
    out = [R.H(2, "Per-op profile and bound (onnxruntime)"),
           R.P("onnxruntime's own profiler (`care_q/export/onnx_profile.py`): every node of the graph it runs (after "
               "its fusions), median over 20 runs in a process of its own, the int8 and the FP32 file profiled in "
               "turn, in blocks (`latency_suite.PROFILE_BLOCKS` each), each node at the median of its blocks' times. "
               "The int8 and FP32 graphs are "
               "compared by kind (what a node computes, whatever its precision: torch.onnx's GELU and ELU "
               "decompositions count as GELU and ELU). Bound: every kind at the faster of its int8 and FP32 time, "
               "plus the int8 file's conversions (Q/DQ) and layout. Profiling adds a cost per node: the sums are "
               "compared with each other, not with the bench's times.")]
    for model, files in profs.items():
        out.append(R.H(3, model))
        for key, p in files.items():
            fp = p.get("fp32") or {}
            within = p["ms"] / p["bound_ms"] if p.get("bound_ms") else None
            rows = [[k["kind"], k["nodes"], R.num(k["ms"], ".3f"), k["fp32_nodes"] or "–", R.num(k["fp32_ms"], ".3f"),
                     k["faster"]] for k in p["kinds"][:12]]
            out += [R.P(f"**{ORT_PROFILE_LABELS.get(key, key)}**: node sum {p['ms']:.2f} ms, its bound "
                        f"{p['bound_ms']:.2f} ms ({'–' if within is None else f'{within:.2f}x'} the bound), FP32 "
                        f"{R.num(fp.get('ms'))} ms (int8 / FP32 {R.num(p.get('ratio_sum'))}, bound / FP32 "
                        f"{R.num(p.get('ratio_bound'))})"
                        + (f"; profiled run per block, int8 {'/'.join(f'{v:.1f}' for v in p['run_ms_blocks'])} ms, FP32 "
                           f"{'/'.join(f'{v:.1f}' for v in fp['run_ms_blocks'])} ms" if fp.get("run_ms_blocks") else "")
                        + "."),
                    R.T(["kind", "int8 nodes", "int8 (ms)", "FP32 nodes", "FP32 (ms)", "faster"], rows, "lrrrrl")]
    return out


def qat_blocks(res: dict) -> list:
    qt = res.get("qat") or {}
    if not qt:
        return []
    Q = res["config"]["qat"]
    A = res["config"]["accuracy"]
    out = [R.H(2, f"QAT on the {A['model']} proxy (issue 5)"),
           R.P(f"Each recipe starts from its own PTQ calibration ({A['num_calib']} images of `{A['calib']}`), "
               f"fine-tunes on `{Q['dataset']}` (epochs per recipe in the table)"
               + (f" ({Q['limit']} images)" if Q.get("limit") else "")
               + f" with distillation from FP32, and is evaluated on `{A['dataset']}`"
               + (f" ({Q['eval_limit']} images)" if Q.get("eval_limit") else "")
               + " in fake quantization (the graph the exporters write); the artifacts are verified in their "
                 "runtimes against it on held-out images.")]
    rows = []
    for name, r in qt.items():
        a = r.get("accuracy") or {}
        t = r.get("train") or {}
        per_epoch = (t["this_session_seconds"] / (t["steps"] / t["steps_per_epoch"])) if t.get("steps") and \
            t.get("this_session_seconds") else None
        ips = t.get("this_session_images_per_s")
        hist = t.get("history") or [{}]
        last = hist[-1]
        if ips is None and last.get("images_per_s"):  # re-exported after a finished run: its training log
            ips = last["images_per_s"]  # (each entry: one epoch's seconds and steps up to its end)
            per_epoch = sum(h["seconds"] for h in hist) / (last["step"] / t["steps_per_epoch"]) \
                if last.get("step") else None
        arts = r.get("artifacts") or {}
        def p(k, a=a):  # the QAT report holds percentages
            return "–" if a.get(k) is None else f"{a[k]:.2f}%"

        eps = (t["steps"] / t["steps_per_epoch"]) if t.get("steps") and t.get("steps_per_epoch") else None
        rows.append([f"`{name}`", R.num(eps, ".2g"), p("fp32_top1"), p("ptq_top1"),
                     R.pts(a["ptq_top1"] - a["fp32_top1"]) if "ptq_top1" in a else "–", p("qat_top1"),
                     R.pts(a["qat_top1"] - a["fp32_top1"]) if "qat_top1" in a else "–",
                     ", ".join(f"{k} {R.pct(v['agreement'], 1)}" for k, v in arts.items()) or "–",
                     t.get("steps"), R.num(ips, ".1f"), R.num(per_epoch, ".0f"),
                     last.get("device") or t.get("device") or "–"])
    out.append(R.T(["recipe", "epochs", "FP32", "PTQ", "PTQ vs FP32", "QAT", "QAT vs FP32", "artifacts vs fake-quant",
                    "steps", "img/s", "s/epoch", "trained on"], rows, "lrrrrrrlrrrl"))
    return out


def npu_blocks(res: dict) -> list:
    rows = res.get("npu") or {}
    if not rows:
        return []
    A = res["config"]["accuracy"]
    Q = res["config"].get("qat") or {}
    out = [R.H(2, f"NPU coverage and accuracy on the {A['model']} proxy (issues 7, 20)"),
           R.P("Census (`care-q check`, no device) of each recipe's int8 .tflite: Edge TPU and NNAPI FL6/FL7 by published "
               "rules (share of MACs on the accelerator, Edge TPU: before its single CPU cut; ops left on the CPU), "
               "Ethos-U55-128 and U85-256 compiled by Arm's Vela (ops it leaves on the CPU, NPU segments, its "
               "estimate of the NPU's time at the proxy's input size). "
               "Accuracy: the artifact on the proxy test set (PTQ) or the fake-quant model the artifact is "
               "verified against (QAT); `npu_int8` is fine-tuned "
               + f"{(Q.get('recipe_epochs') or {}).get('npu_int8', Q.get('epochs', '?'))} epoch(s). "
               "In the CPU recipes' files the ops after the classifier's global pool (float GELU/LayerNorm, the FC) "
               "stay on the CPU by design (the MAC shares just below 100% are the FC's); `npu_int8_ptq`, "
               "`npu_int8_ptq_ethosu` and QAT `npu_int8` are int8 from input to logits. One graph family, two "
               "normalisers: `npu_int8_ptq`'s L2_NORMALIZATION is not an Ethos-U op, `npu_int8_ptq_ethosu`'s int8 "
               "RSQRT is not an NNAPI op before FL7. NPU segments: the stretches Vela compiles for the NPU "
               "(each CPU op between two of them hands the tensor back to the host).")]
    tbl = []
    for name, r in rows.items():
        drop = None if r.get("top1") is None or r.get("fp32_top1") is None else 100 * (r["top1"] - r["fp32_top1"])
        tbl.append([f"`{name}` ({r['kind']})", R.pct(r.get("top1")), R.pts(drop) if drop is not None else "–",
                    *_npu_cells(r["coverage"])])
    out.append(R.T(["recipe", "top-1", "vs FP32", *NPU_HEADERS], tbl, "lrrrlrlrllrr"))
    return out


NPU_HEADERS = ["Edge TPU MACs", "Edge TPU first unmapped op", "NNAPI FL6 MACs", "NNAPI FL6 CPU ops", "NNAPI FL7 MACs",
               "Ethos-U55-128 (Vela)", "Ethos-U85-256 (Vela)", "XNNPACK MACs", "XNNPACK partitions"]


def _npu_cells(c: dict) -> list:
    """One file's NPU census (`care_q.bench.npu.coverage`) as the cells of NPU_HEADERS."""
    def share(t):
        return R.pct((c.get(t) or {}).get("mac_share"), 2)

    def vela(t):
        v = c.get(t)
        if not v:
            return "–"
        return f"{sum((v.get('cpu_ops') or {}).values())} CPU ops, {v.get('partitions', '?')} NPU segments, " \
               f"{R.num(v.get('time_ms'))} ms"

    cpu = ", ".join(f"{k} x{v}" for k, v in sorted(((c.get("nnapi:FL6") or {}).get("cpu_ops") or {}).items()))
    return [share("edgetpu"), (c.get("edgetpu") or {}).get("first_unmapped", "–"), share("nnapi:FL6"), cpu or "–",
            share("nnapi:FL7"), vela("ethos-u55-128"), vela("ethos-u85-256"), share("xnnpack"),
            (c.get("xnnpack") or {}).get("partitions", "–")]


def npu_latency_blocks(res: dict) -> list:
    """Issue 20 at deployment resolution: each latency model's NPU graph beside care-q's CPU file and
    ai-edge-quantizer's, Ethos-U compiled by Vela (its estimated time at this size)."""
    per = {m: v for m, v in (res.get("npu_latency") or {}).items() if v}
    if not per:
        return []
    L = res["config"]["latency"]
    out = [R.H(2, f"NPU compile at {L['img_size']}x{L['img_size']} (issue 20)"),
           R.P(f"Random weights; each of {', '.join(f'`{n}`' for n in L.get('npu_recipes') or [])} calibrated on at "
               f"least 32 images, a reconstruction recipe with one reconstruction step (what Vela and the rules see is "
               f"the graph, not its values); a QAT recipe's file is its PTQ starting point, whose graph its training "
               f"keeps (only the values change). Columns as in the proxy's NPU table; Vela's time: its estimate for "
               f"that accelerator at this input size.")]
    for model, rows in per.items():
        out += [R.H(3, model), R.T(["file", *NPU_HEADERS], [[f"`{r['file']}` ({name})",
                                                              *_npu_cells(r["coverage"])]
                                                             for name, r in rows.items()], "lrlrlrllrr")]
    return out


def tradeoff_points(res: dict) -> list[dict]:
    lat_models = list(res.get("latency") or {})
    model = "care_s0" if "care_s0" in lat_models else (lat_models[0] if lat_models else None)
    pts = []
    for r in res["rows"]:
        if model is None:
            continue
        if r["group"] == "fp32":  # both FP32 artifacts sit at (1, 0) by definition: one point
            if not any(p["group"] == "fp32" for p in pts):
                pts.append({"label": "FP32", "ratio": 1.0, "drop": 0.0, "group": "fp32", "runtime": None})
            continue
        s = (r["latency"].get(model) or {}).get("stats") or {}
        pts.append({"label": r["label"].split(" (")[0], "ratio": s.get("ratio"),
                    "drop": (r.get("accuracy") or {}).get("drop_top1_pt"), "group": r["group"], "runtime": r["runtime"]})
    return pts


def failure_blocks(res: dict) -> list:
    items = []
    for r in res["rows"]:
        if "failure" in r:
            items.append(f"{r['label']} (proxy): {R.failure_text(r['failure'])}")
        for model, e in r["latency"].items():
            if "failure" in e:
                items.append(f"{r['label']} ({model}): {R.failure_text(e['failure'])}")
    if not items:
        return []
    return [R.H(2, "Failures (reported, not hidden)"), R.L(items)]


def ptq_time_blocks(res: dict) -> list:
    pt = res.get("ptq_time")
    if not pt:
        return []
    out = [R.H(2, "Time of `care-q ptq` (issue 3)")]
    if "failure" in pt:
        return out + [R.P(f"`{pt['command']}` failed after {pt['seconds']:.0f} s: {pt['failure']}")]
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in pt["stages"].items())
    return out + [R.P(f"`{pt['command']}`, {pt['images']} calibration images, in a new process and an empty output "
                      f"folder: {pt['seconds']:.0f} s from process start to exit ({pt['report_seconds']:.0f} s in "
                      f"`care_q.ptq`, the rest is starting Python and importing torch; stages: {stages}).")]


def suite_blocks(res: dict, figures: bool = True) -> list:
    q = " (quick configuration: NOT the benchmark)" if res.get("quick") else ""
    out = [R.H(1, f"care-q benchmarks{q}"),
           R.P(f"Generated by `make bench` ({res['source']}) on {res['started']}; its steps took "
               f"{sum((res.get('steps') or {}).values()):.0f} s"
               + (f" ({len(res['cached_steps'])} reused from an earlier, interrupted or identical run)"
                  if res.get("cached_steps") else "") + ". "
               "Rerun `make bench` to reproduce: accuracy exactly, latency within noise. Do not edit by hand.")]
    left = [s for s in SECTIONS if s not in res.get("sections", SECTIONS)]
    if left:
        out.append(R.P(f"**Sections not run this time: {', '.join(left)}** (`python -m care_q.bench.suite "
                       + " ".join(f"--skip {s}" for s in left) + "`); their last results are in this file's git "
                       "history, measured with the code of that time."))
    if res.get("qat_left_out"):
        out.append(R.P(f"**QAT recipes not run this time: {', '.join(res['qat_left_out'])}** (`--qat-recipe` "
                       f"{', '.join(r for r in res['config']['qat']['recipes'])}); their last results are in this "
                       f"file's git history."))
    out += target_blocks(res) + accuracy_blocks(res) + ceiling_blocks(res) + qat_blocks(res) + npu_blocks(res)
    if figures and res.get("accuracy") and res.get("latency"):
        out.append(R.tradeoff_figure(tradeoff_points(res), "Top-1 drop on the proxy vs latency relative to FP32 in the "
                                                           "same runtime (care_s0 at deployment resolution)"))
    out += latency_blocks(res)
    out += npu_latency_blocks(res)
    out += profile_blocks(res)
    out += ort_profile_blocks(res)
    out += anchor_blocks(res)
    if figures and res.get("latency"):
        for model, b in res["latency"].items():
            out.append(R.F(f"latency_{model}", plots.latency_bars(b["latency"], f"{model}: latency"), f"{model}: latency"))
    out += ptq_time_blocks(res)
    out += failure_blocks(res)
    if res.get("accuracy") and res["accuracy"].get("analysis"):
        a = R.analysis_blocks(res["accuracy"]["analysis"])
        out += a if figures else [b for b in a if b[0] != "fig"]
    out += R.machine_blocks(res.get("machine"))
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in res.get("steps", {}).items())
    if steps:
        out.append(R.P(f"Step times: {steps}."))
    return out


def render_benchmarks(res: dict, report_dir: Path | None = None) -> str:
    """BENCHMARKS.md: the tables without figures (they are in the report next to the cache)."""
    blocks = suite_blocks(res, figures=False)
    if report_dir is not None:
        blocks.insert(2, R.P(f"Plots (accuracy vs latency, per-tensor SQNR, attention histograms): "
                             f"`{Path(report_dir).name}/report.html` in the output folder of the run."))
    return R.to_markdown(blocks)


def write_suite_report(res: dict, out: Path) -> dict[str, Path]:
    blocks = suite_blocks(res, figures=True)
    return R.render(blocks, out, blocks[0][2], res)


def summary_lines(res: dict) -> list[str]:
    lines = [f"care-q benchmarks ({'quick' if res.get('quick') else 'full'}), {res['seconds']:.0f} s this invocation"]
    for t in res["targets"]:
        lines.append(f"  {_status(t['ok']).strip('*'):4} {t['what']}: {_fmt_target_value(t['value'])} (target {t['target']})")
    for r in res["rows"]:
        a = r.get("accuracy")
        acc = f"top-1 {R.pct(a['top1'])} ({R.pts(a['drop_top1_pt'])} pt, agreement {R.pct(a['agreement'], 1)})" if a else \
            (R.failure_text(r["failure"]) if "failure" in r else "")
        lat = ", ".join(f"{m} {e['stats']['ratio']:.2f}x ({spread_text(e['stats'])})" for m, e in r["latency"].items()
                        if (e.get("stats") or {}).get("ratio") is not None)
        lines.append(f"  {r['label']}: {acc}" + (f"; latency ratio {lat}" if lat else ""))
    for a in anchor_rows(res):
        s = a["stats"]
        lines.append(f"  anchor {a['anchor']}, {a['tool']}: " + (
            f"{s['ratio']:.2f}x FP32 (blocks {spread_text(s)})" if s.get("ratio") is not None
            else R.failure_text(a["failure"] or {"message": "not timed"})))
    w = res.get("written") or {}
    if w:
        lines.append(f"  wrote {w.get('benchmarks')} and {w.get('html')}")
    return lines
