"""Reports people read: report.md, report.json and a self-contained report.html (plots inline).

    paths = write_report(result, "out/eval")     # result of evaluate / bench / sensitivity

A report is a list of blocks (headings, paragraphs, lists, tables, figures) built from a result
dict, rendered twice: Markdown (figures written to ``plots/*.png`` beside it) and HTML (the same
PNGs embedded as base64 data URIs: no network, no external files). report.json is the result.
Every file is written atomically.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path

from care_q.errors import CareQError
from care_q.eval import plots
from care_q.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from care_q.utils.machine import busy_warning, describe

# ----------------------------------------------------------------------------- blocks


def H(level: int, text: str):
    return ("h", level, text)


def P(text: str):
    return ("p", text)


def L(items: list[str]):
    return ("list", list(items))


def T(headers: list[str], rows: list[list], align: str | None = None):
    """A table; ``align``: one char per column, 'l' or 'r' (default: first left, rest right)."""
    align = align or ("l" + "r" * (len(headers) - 1))
    return ("table", list(headers), [[_cell(c) for c in r] for r in rows], align)


def F(name: str, png: bytes, caption: str):
    return ("fig", name, png, caption)


def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    return str(v)


# ----------------------------------------------------------------------------- formatting


def pct(v, digits: int = 2) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f}%"


def pts(v, digits: int = 2) -> str:
    return "–" if v is None else f"{v:+.{digits}f}"


def num(v, fmt: str = ".2f") -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, fmt)


def mb(nbytes) -> str:
    return "–" if nbytes is None else f"{nbytes / 1e6:.2f}"


def failure_text(f: dict) -> str:
    kind = {"abort": "crashed", "timeout": "timed out", "error": "failed"}.get(f.get("type"), "failed")
    where = f" during {f['stage']}" if f.get("stage") else ""
    return f"{kind}{where}: {f.get('message', '')}"


# ----------------------------------------------------------------------------- sections


def machine_blocks(m: dict | None) -> list:
    if not m:
        return []

    vers = ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items() if v)
    load = f"; load average {m['load_avg']}" if m.get("load_avg") else ""
    return [H(2, "Machine"), L([describe(m) + load, f"versions: {vers}"])]


def eval_table(res: dict) -> list:
    """The accuracy table of an eval result: the FP32 reference, then every artifact."""
    ref = res["reference"]
    headers = ["model / artifact", "source", "top-1", "top-5", "top-1 drop (pt)", "agreement with FP32",
               "logit SQNR (dB)", "size (MB)", "float ops", "XNNPACK partitions"]
    rows = [[f"PyTorch FP32 ({res['model']})", "reference", pct(ref["top1"]), pct(ref["top5"]), "0", "100%", "–",
             "–", "–", "–"]]
    for name, a in res["artifacts"].items():
        c = a.get("census") or {}
        parts = (c.get("xnnpack") or {}).get("partitions") if a.get("kind") == "tflite" else None
        if "failure" in a:
            rows.append([f"`{name}`", a.get("source"), "**" + failure_text(a["failure"]) + "**", "", "", "", "",
                         mb(a.get("size_bytes")), c.get("float_ops"), parts])
            continue
        m = a["metrics"]
        rows.append([f"`{name}`", a.get("source"), pct(m["top1"]), pct(m["top5"]), pts(m["drop_top1_pt"]),
                     pct(m["agreement"]), num(m.get("logit_sqnr_db"), ".1f"), mb(a.get("size_bytes")),
                     c.get("float_ops"), parts])
    return [T(headers, rows, "ll" + "r" * (len(headers) - 2))]


def eval_blocks(res: dict, title: bool = True) -> list:

    ds = res["dataset"]
    out = []
    if title:
        out.append(H(1, f"care-q eval: {res['model']} on {ds['name']} ({ds['images']} images, "
                        f"{res['img_size']}x{res['img_size']})"))
    rt = res.get("runtime", {})
    out.append(L([f"weights: {res['weights'] or 'random (accuracy meaningless)'}",
                  f"dataset: `{ds['name']}`, {ds['images']} images, {ds['classes']} classes"
                  + (f" (subset of {ds['limit']}, seed {ds['seed']})" if ds.get("limit") else ""),
                  f"runtimes: {rt.get('threads')} threads, batch {rt.get('batch_size')} where the runtime allows "
                  f"(TFLite: batch 1, {rt.get('tflite_delegate')}), artifacts isolated in child processes: "
                  f"{rt.get('isolated')}",
                  f"total time: {res.get('seconds')} s"] + [f"note: {n}" for n in res.get("notes", [])]))
    out.append(H(2, "Accuracy, same images for every model"))
    out += eval_table(res)
    rows = [{"label": n, "drop": a["metrics"]["drop_top1_pt"], "agreement": a["metrics"]["agreement"],
             "group": a.get("source")} for n, a in res["artifacts"].items() if "metrics" in a]
    if rows:
        out.append(F("accuracy", plots.accuracy_bars(rows), "Top-1 drop and agreement with the FP32 PyTorch model"))
    if res.get("tradeoff"):
        out.append(tradeoff_figure(res["tradeoff"]))
    fails = {n: a["failure"] for n, a in res["artifacts"].items() if "failure" in a}
    if fails:
        out += [H(2, "Failures"), L([f"`{n}`: {failure_text(f)}" for n, f in fails.items()])]
    out += confusion_blocks(res)
    if res.get("analysis"):
        out += analysis_blocks(res["analysis"])
    out += machine_blocks(res.get("machine"))
    return out


def tradeoff_points(eval_res: dict, bench_res: dict, setting: dict | None = None) -> list[dict]:
    """Accuracy drop (eval) against latency ratio (bench) for the artifacts both measured, by file
    name; TFLite artifacts read from ``tflite/xnnpack``, ONNX from ``onnxruntime``."""
    setting = setting or {"tflite": "tflite/xnnpack", "onnx": "onnxruntime"}
    pts = []
    for name, a in eval_res["artifacts"].items():
        kind = a.get("kind") or ("tflite" if name.endswith(".tflite") else "onnx")
        stats = (bench_res.get("latency", {}).get(setting[kind]) or {}).get(name)
        if stats is None and a.get("path"):
            stats = (bench_res.get("latency", {}).get(setting[kind]) or {}).get(Path(a["path"]).name)
        pts.append({"label": name, "runtime": kind, "group": a.get("source"),
                    "drop": (a.get("metrics") or {}).get("drop_top1_pt"), "ratio": (stats or {}).get("ratio")})
    return pts


def tradeoff_figure(points: list[dict], caption: str = "Top-1 drop vs latency relative to FP32 in the same runtime"):

    missing = [p["label"] for p in points if p.get("drop") is None or p.get("ratio") is None]
    if missing:
        caption += f"; not shown (no accuracy or no latency): {', '.join(missing)}"
    return F("tradeoff", plots.tradeoff(points), caption)


def load_peer_report(path, command: str) -> dict:
    """A report.json of another command (``path``: the file or its folder), checked to be ``command``'s."""
    import json


    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    try:
        data = json.loads(p.read_text())
    except OSError as e:
        raise CareQError(f"{p}: cannot read the {command} report ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise CareQError(f"{p}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if data.get("command") != command:
        raise CareQError(f"{p} is a '{data.get('command')}' report; a 'care-q {command}' report.json is needed")
    return data


def confusion_blocks(res: dict, top: int = 5) -> list:
    rows = []
    for name, a in res["artifacts"].items():
        m = a.get("metrics")
        if not m or not m.get("confusions"):
            continue
        pairs = "; ".join(f"{c.get('ref_name', c['ref'])} → {c.get('got_name', c['got'])}: {c['count']}"
                          for c in m["confusions"][:top])
        flips = m.get("biggest_flips") or []
        conf = (f"#{flips[0]['index']} ({100 * flips[0]['ref_prob']:.0f}% FP32 confidence)" if flips else "–")
        rows.append([f"`{name}`", m["disagreements"], pairs, conf])
    if not rows:
        return []
    return [H(2, "Biggest disagreements with FP32"),
            P("Most frequent (FP32 prediction → artifact prediction) pairs, and the image where FP32 was most "
              "confident among those the artifact flips; full lists in report.json."),
            T(["artifact", "disagreements", "most frequent flips", "most confident flip"], rows, "lrll")]


def _spread(s: dict) -> str:
    """An int8 row's block ratios as 'lo–hi' ('–' for FP32 rows and results without blocks)."""
    lo_hi = s.get("ratio_spread")
    return "–" if not lo_hi or "pairs" in s else f"{lo_hi[0]:.2f}–{lo_hi[1]:.2f}"


def bench_blocks(res: dict, title: bool = True) -> list:

    out = []
    if title:
        out.append(H(1, f"care-q bench: {len(res['artifacts'])} artifacts, batch {res.get('batch', 1)}, "
                        f"{res['threads']} threads"))
    method = ([f"each int8 artifact against the FP32 artifact of its runtime and input size, in processes that load "
               f"only those two: {res['blocks']} blocks of {res.get('rounds_per_block')} rounds, each block in a fresh "
               f"process after {res['warmup']} warm-up runs, the order rotated every round, the blocks of all pairs "
               f"taken in turn",
               "ratio: the median of the blocks' int8 / FP32 median ratios; spread: their lowest and highest; FP32 "
               "rows: the median over their pairs"] if "blocks" in res else
              [f"{res['runs']} timed rounds after {res['warmup']} warm-up runs; every round runs each artifact once, "
               f"the order rotated every round; median and p90 per artifact",
               "ratio: median / median of the FP32 artifact of the same runtime and input size, same run"])
    out.append(L([*method, f"total time: {res.get('seconds')} s"]))

    warn = busy_warning(res)
    if warn:
        out.append(P(f"**Warning: {warn}.**"))
    if res.get("tradeoff"):
        out.append(tradeoff_figure(res["tradeoff"]))
    for setting, group in res["latency"].items():
        if not group:
            continue
        rows = [[f"`{n}`", num(s["median_ms"]), num(s["p90_ms"]), num(s.get("min_ms")),
                 "–" if s.get("ratio") is None else f"{s['ratio']:.2f}x", _spread(s), s.get("fp32") or "–"]
                for n, s in group.items()]
        out += [H(2, f"Latency: {setting}"),
                T(["artifact", "median (ms)", "p90 (ms)", "min (ms)", "ratio to FP32", "ratio per block (min–max)",
                   "FP32 reference"], rows, "lrrrrrl")]
    lf = [f"`{n}` ({setting}): {failure_text(f)}" for setting, g in (res.get("latency_failures") or {}).items()
          for n, f in g.items()]
    if lf:
        out += [H(2, "Not timed"), L(lf)]
    if any(res["latency"].values()):
        out.append(F("latency", plots.latency_bars(res["latency"]), "Latency per runtime setting (batch 1)"))
    rows = []
    for n, a in res["artifacts"].items():
        c = a.get("census") or {}
        x = c.get("xnnpack") or {}
        mem = a.get("memory") or {}
        rows.append([f"`{n}`", a["source"], mb(a["size_bytes"]),
                     "–" if a.get("size_ratio") is None else f"{a['size_ratio']:.2f}x",
                     num(mem.get("peak_mb"), ".0f"), num(mem.get("delta_mb"), ".0f"), c.get("ops"),
                     f"{c.get('quantize', '–')}/{c.get('dequantize', '–')}", c.get("float_ops"),
                     x.get("partitions") if a["kind"] == "tflite" else c.get("integer_kernels"),
                     failure_text(a["failure"]) if "failure" in a else "ok"])
    out += [H(2, "Size, memory and graph census"),
            P("peak: the high-water mark of a process that loads the artifact and runs it; delta: peak minus the "
              "process before loading. float ops: TFLite ops with a float32 output (DEQUANTIZE excluded); ONNX: "
              "float ops left in the graph onnxruntime runs. last column: XNNPACK partitions (TFLite) or "
              "onnxruntime integer kernels (ONNX)."),
            T(["artifact", "source", "size (MB)", "size / FP32", "peak RSS (MB)", "delta (MB)", "ops", "Q/DQ",
               "float ops", "XNNPACK partitions / int kernels", "status"], rows, "llrrrrrrrrl")]
    if res.get("device"):
        out += device_blocks(res["device"])
    out += machine_blocks(res.get("machine"))
    return out


def device_blocks(dev: dict) -> list:
    """On-device results: what `care_q.device.adb.run_device_bench` returns, stored by `care-q bench
    --device ...` under the result's ``device`` key (``results[name]``: avg/std/min ms, ratio)."""
    rows = []
    for n, r in (dev.get("results") or {}).items():
        mem = r.get("memory")
        rows.append([f"`{n}`", num(r.get("avg_ms")), num(r.get("std_ms")), num(r.get("min_ms")),
                     "–" if r.get("ratio_to_first") is None else f"{r['ratio_to_first']:.2f}x",
                     mem if not isinstance(mem, dict) else ", ".join(f"{k} {v}" for k, v in mem.items())])
    return [H(2, f"On device: {dev.get('device', 'device')} ({dev.get('delegate', '?')}, {dev.get('threads', '?')} "
                 f"threads, {dev.get('runs', '?')} runs in {dev.get('rounds', '?')} rounds)"),
            T(["artifact", "avg (ms)", "std (ms)", "min (ms)", "ratio to first", "memory"], rows, "lrrrrl")]


def analysis_blocks(a: dict) -> list:
    """Per-tensor SQNR and attention histograms (from `care_q.eval.analysis.quant_analysis`)."""

    ls = a["logit_sqnr_db"]
    bad = ls.get("minmax_nonfinite") or 0.0
    naive = (f"{num(ls['minmax'], '.1f')} dB" if not bad else
             f"no finite SQNR: {100 * bad:.3g}% of its logits are inf or NaN (a normaliser rounds to its zero point "
             f"and the division overflows; ai-edge-quantizer's int8 DIV aborts there)")
    out = [H(2, f"Quantization analysis: recipe `{a['recipe']}`, calibrated on {a['calib_images']} images of "
                f"`{a['calib']}`"),
           P(f"Logit SQNR, fake-quant vs the deploy form in float on {a['images']} held-out images: recipe "
             f"{num(ls['recipe'], '.1f')} dB, one global min/max everywhere {naive}.")]
    if a.get("shipped_vs_fp32"):
        s = a["shipped_vs_fp32"]
        out.append(P(f"The shipped plan (the TFLite artifact's exact reference) vs FP32 on the same images: logit SQNR "
                     f"{num(s['logit_sqnr_db'], '.1f')} dB, top-1 agreement {pct(s['top1_agreement'])}."))
    by_role: dict[str, list] = {}
    for v in a["sqnr_db"].values():
        by_role.setdefault(v["role"], []).append(v)
    rows = []
    for role, vals in sorted(by_role.items()):
        rec = [v["recipe"] for v in vals if _fin(v["recipe"])]
        mm = [v["minmax"] for v in vals if _fin(v.get("minmax"))]
        rows.append([role, len(vals), num(sum(rec) / len(rec) if rec else None, ".1f"), num(min(rec) if rec else None, ".1f"),
                     num(sum(mm) / len(mm) if mm else None, ".1f")])
    out += [T(["role", "tensors", "mean SQNR recipe (dB)", "min SQNR recipe (dB)", "mean SQNR min/max (dB)"], rows),
            F("sqnr", plots.sqnr_profile(a["sqnr_db"]), "Per-tensor SQNR in execution order (bars: recipe, by role; "
                                                          "dots: one global min/max)")]
    worst = sorted(((n, v) for n, v in a["sqnr_db"].items() if _fin(v["recipe"])), key=lambda kv: kv[1]["recipe"])[:10]
    out += [H(3, "Lowest-SQNR tensors"),
            T(["tensor", "role", "SQNR recipe (dB)", "SQNR min/max (dB)"],
              [[f"`{n}`", v["role"], num(v["recipe"], ".1f"), num(v.get("minmax"), ".1f")] for n, v in worst], "llrr")]
    if a.get("histograms"):
        h = a["histograms"]
        out += [H(3, "Attention tensors: calibration histograms and chosen ranges"),
                F("histograms", plots.histograms(h), "Calibration histograms (log scale); red: the recipe's range, "
                                                     "dashed: min/max"),
                T(["tensor", "method", "observed [min, max]", "chosen range", "min/max range"],
                  [[f"`{n}`", v["method"] + (" sym" if v.get("symmetric") else ""),
                    f"[{v['min']:.3g}, {v['max']:.3g}]",
                    f"[{v['range'][0]:.3g}, {v['range'][1]:.3g}]" if v.get("range") else "float",
                    f"[{v['minmax_range'][0]:.3g}, {v['minmax_range'][1]:.3g}]" if v.get("minmax_range") else "–"]
                   for n, v in h.items()], "lllll")]
    return out


def sensitivity_blocks(res: dict, title: bool = True) -> list:

    out = []
    if title:
        out.append(H(1, f"care-q sensitivity: {res['model']} ({res['img_size']}x{res['img_size']}), recipe "
                        f"`{res['recipe']}`, groups by {res['by']}"))
    ev = res["eval"]
    full, fp = res["full_int8"], res["fp32"]
    out.append(L([f"calibration: `{res['calib']}`, {res['calib_images']} images",
                  f"scored on {ev['images']} held-out images of `{ev['set']}`"
                  + ("" if ev["labelled"] else " (no labels for this head: agreement only)"),
                  f"FP32 top-1 {pct(fp.get('top1'))}; all int8: top-1 {pct(full.get('top1'))}, agreement "
                  f"{pct(full['agreement'])}, logit SQNR {num(full['logit_sqnr_db'], '.1f')} dB",
                  "only: this group int8, the rest float (its damage alone); all but: everything int8 except this "
                  "group (what keeping it float recovers). Ranked most harmful first.",
                  f"time: {res.get('seconds')} s"] + [f"note: {n}" for n in res.get("notes", [])]))
    rows = []
    for i, g in enumerate(res["ranking"], 1):
        r = res["groups"][g]
        o, a = r.get("only", {}), r.get("all_but", {})
        rows.append([i, f"`{g}`", r["tensors"], pct(o.get("agreement"), 1), pct(o.get("top1"), 1),
                     num(o.get("logit_sqnr_db"), ".1f"), pct(a.get("agreement"), 1), pct(a.get("top1"), 1),
                     num(r.get("sqnr_db_mean"), ".1f"), f"`{r.get('worst_tensor')}`"])
    out += [H(2, "Ranking"),
            T(["#", "group", "tensors", "only: agreement", "only: top-1", "only: logit SQNR", "all but: agreement",
               "all but: top-1", "mean tensor SQNR (dB)", "worst tensor"], rows, "rlrrrrrrrl"),
            F("sensitivity", plots.sensitivity_bars(res["groups"], res["ranking"]),
              "Disagreement with FP32 per group (red: only this group int8; blue: all but this group)")]
    sq = {n: {"recipe": v["sqnr_db"], "minmax": None, "role": v["role"]} for n, v in res["tensor_sqnr_db"].items()}
    out.append(F("sqnr", plots.sqnr_profile(sq), "Per-tensor SQNR of the fully int8 model, execution order"))
    return out


def _fin(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


BUILDERS = {"eval": eval_blocks, "bench": bench_blocks, "sensitivity": sensitivity_blocks}


# ----------------------------------------------------------------------------- rendering


def to_markdown(blocks: list, plots_dir: str = "plots") -> str:
    out = []
    for b in blocks:
        if b[0] == "h":
            out += ["#" * b[1] + " " + b[2], ""]
        elif b[0] == "p":
            out += [b[1], ""]
        elif b[0] == "list":
            out += [f"- {i}" for i in b[1]] + [""]
        elif b[0] == "table":
            _, headers, rows, align = b
            out.append("| " + " | ".join(headers) + " |")
            out.append("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|")
            out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
            out.append("")
        elif b[0] == "fig":
            out += [f"![{b[3]}]({plots_dir}/{b[1]}.png)", ""]
    return "\n".join(out)


_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*([^*]+)\*\*")

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}table{border-collapse:collapse;margin:.8em 0;font-size:.88em}th,td{border:1px solid #ccc;
padding:.25em .55em}th{background:#f2f2f2}td.r,th.r{text-align:right}tr:nth-child(even) td{background:#fafafa}
code{background:#f4f4f4;padding:0 .2em;border-radius:3px;font-size:.92em}figure{margin:1em 0}figure img{max-width:100%;
border:1px solid #ddd}figcaption{font-size:.85em;color:#555}h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;
border-bottom:1px solid #ddd}h3{font-size:1.05em}"""

# Sets data-plots-loaded on <body> to the number of decoded plots: a headless browser's DOM dump shows it.
ONLOAD = ("<script>window.addEventListener('load',function(){var n=0;for(var i of document.images)"
          "{if(i.complete&&i.naturalWidth>0)n++}document.body.setAttribute('data-plots-loaded',n)});</script>")


def _inline(text: str) -> str:
    t = html.escape(text, quote=False)
    t = _CODE.sub(r"<code>\1</code>", t)
    return _BOLD.sub(r"<b>\1</b>", t)


def to_html(blocks: list, title: str) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title><style>{CSS}</style></head>",
           f'<body data-plots="{sum(1 for b in blocks if b[0] == "fig")}">']
    for b in blocks:
        if b[0] == "h":
            out.append(f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            out.append(f"<p>{_inline(b[1])}</p>")
        elif b[0] == "list":
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b[1]) + "</ul>")
        elif b[0] == "table":
            _, headers, rows, align = b
            cls = [' class="r"' if a == "r" else "" for a in align]
            out.append("<table><thead><tr>" + "".join(f"<th{c}>{_inline(h)}</th>" for h, c in zip(headers, cls))
                       + "</tr></thead><tbody>")
            out += ["<tr>" + "".join(f"<td{c}>{_inline(v)}</td>" for v, c in zip(r, cls)) + "</tr>" for r in rows]
            out.append("</tbody></table>")
        elif b[0] == "fig":
            data = base64.b64encode(b[2]).decode("ascii")
            out.append(f'<figure id="fig-{html.escape(b[1])}"><img alt="{html.escape(b[3])}" '
                       f'src="data:image/png;base64,{data}"><figcaption>{_inline(b[3])}</figcaption></figure>')
    out += [ONLOAD, "</body></html>", ""]
    return "\n".join(out)


def render(blocks: list, out, title: str, result: dict | None = None, stem: str = "report") -> dict[str, Path]:
    """Write ``stem``.md (+ plots/*.png), ``stem``.html and (with ``result``) ``stem``.json to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for b in blocks:
        if b[0] == "fig":
            atomic_write_bytes(b[2], out / "plots" / f"{b[1]}.png")
    if result is not None:
        paths["json"] = out / f"{stem}.json"
        atomic_write_json(result, paths["json"])
    paths["md"] = out / f"{stem}.md"
    atomic_write_text(to_markdown(blocks), paths["md"])
    paths["html"] = out / f"{stem}.html"
    atomic_write_text(to_html(blocks, title), paths["html"])
    return paths


def write_report(result: dict, out) -> dict[str, Path]:
    """report.md / report.json / report.html for an eval, bench or sensitivity result."""
    cmd = result.get("command")
    if cmd not in BUILDERS:
        raise ValueError(f"no report layout for command {cmd!r}; known: {list(BUILDERS)}")
    blocks = BUILDERS[cmd](result)
    title = next((b[2] for b in blocks if b[0] == "h"), f"care-q {cmd}")
    return render(blocks, out, title, result)
