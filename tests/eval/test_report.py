"""Reports: md/json/html from a small evaluation with the quantization analysis; every plot
embedded; the HTML renders in a headless browser (Debian's chromium) with its plots decoded."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

SIZE = 32
CLASSES = [f"c{i}" for i in range(10)]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """evaluate() of one int8 artifact of care_test at 32x32 on 20 images, with the analysis."""
    from PIL import Image

    from care_q import create_model
    from care_q.eval.analysis import prepare_plan, quant_analysis
    from care_q.eval.evaluate import evaluate
    from care_q.export.tflite_int8 import emit_tflite_int8
    from care_q.models import PreprocessConfig, save_checkpoint

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / "data" / c).mkdir(parents=True)
        for j in range(2):
            Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / "data" / c / f"{j}.png")
    torch.manual_seed(0)
    weights = root / "t.pth"
    save_checkpoint(create_model("care_test", num_classes=10), weights,
                    PreprocessConfig(input_size=(3, SIZE, SIZE), label_names=CLASSES, crop_pct=1.0))
    prep = prepare_plan("care_test", weights=weights, calib=str(root / "data"), num_calib=10, progress=False)
    (root / "arts").mkdir()
    (root / "arts" / "t_int8.tflite").write_bytes(emit_tflite_int8(prep.plan))
    analysis = quant_analysis(prep, num_images=4)
    out = root / "out"
    res = evaluate("care_test", weights=weights, artifacts=root / "arts", dataset=str(root / "data"), out=out,
                   threads=1, isolate=False, progress=False, analysis=analysis)
    return {"res": res, "out": out, "analysis": analysis, "prep": prep}


def _pngs(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_report_files(small_run):
    from PIL import Image

    out, res = small_run["out"], small_run["res"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["artifacts"]["t_int8.tflite"]["metrics"]["agreement"] == res["artifacts"]["t_int8.tflite"]["metrics"]["agreement"]
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    # the numbers people read are in both
    top1 = f"{100 * res['reference']['top1']:.2f}%"
    agree = f"{100 * res['artifacts']['t_int8.tflite']['metrics']['agreement']:.2f}%"
    for text in (md, html):
        assert top1 in text and agree in text and "t_int8.tflite" in text
    # figures: accuracy, per-tensor SQNR, attention histograms; files for the md, inline for the html
    figs = re.findall(r"!\[[^\]]*\]\((plots/[a-z_0-9]+\.png)\)", md)
    assert sorted(figs) == ["plots/accuracy.png", "plots/histograms.png", "plots/sqnr.png"]
    pngs = _pngs(html)
    assert len(pngs) == 3
    for p in figs:
        assert (out / p).read_bytes() in pngs
    for b in pngs:
        w, h = Image.open(io.BytesIO(b)).size
        assert w > 300 and h > 150
    assert "http://" not in html and "https://" not in html   # self-contained: nothing to fetch
    # the histograms show the attention tensors with the ranges the plan chose
    a = small_run["analysis"]
    plan = small_run["prep"].plan
    name = next(n for n in a["histograms"] if n.endswith("attn.den"))
    assert a["histograms"][name]["range"] == pytest.approx([plan.qp(name).lo, plan.qp(name).hi])
    assert sum(a["histograms"][name]["counts"]) == pytest.approx(plan.observers[name].hist.sum())
    assert f"`{name}`" in md


def test_tradeoff_and_blocks_render():
    from care_q.eval import plots
    from care_q.eval.report import F, H, L, P, T, to_html, to_markdown

    png = plots.tradeoff([{"label": "care-q", "ratio": 0.4, "drop": 0.3, "group": "care-q", "runtime": "tflite"},
                          {"label": "ORT", "ratio": 1.1, "drop": 2.2, "group": "baseline", "runtime": "onnx"},
                          {"label": "crashed", "ratio": None, "drop": None, "group": "baseline", "runtime": "tflite"}])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    blocks = [H(1, "t <x>"), P("a `b` **c**"), L(["i"]), T(["k", "v"], [["a|b", 1.5], ["n", None]]), F("f", png, "cap")]
    md = to_markdown(blocks)
    assert "| a\\|b | 1.5 |" in md and "| n | – |" in md and "![cap](plots/f.png)" in md
    html = to_html(blocks, "t")
    assert "<h1>t &lt;x&gt;</h1>" in html and "<code>b</code>" in html and "<b>c</b>" in html
    assert _pngs(html) == [png]
    from care_q.eval.report import device_blocks

    dev = to_markdown(device_blocks({"device": "Pixel 8", "delegate": "xnnpack", "threads": 4, "runs": 50, "rounds": 3,
                                     "results": {"a.tflite": {"avg_ms": 3.25, "std_ms": 0.5, "min_ms": 3.0,
                                                              "ratio_to_first": 1.0}}}))
    assert "On device: Pixel 8 (xnnpack, 4 threads" in dev and "| `a.tflite` | 3.25 | 0.50 | 3.00 | 1.00x |" in dev


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no headless browser: install Debian's chromium "
                                                "(apt-get install -y chromium) to check that report.html renders")
def test_html_renders_in_headless_browser(small_run, tmp_path):
    html = small_run["out"] / "report.html"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--user-data-dir=" + str(tmp_path / "profile"), "--virtual-time-budget=5000",
           "--dump-dom", html.as_uri()]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    dom = p.stdout
    assert "<table" in dom and "care-q eval" in dom, p.stderr[-2000:]
    # the page's onload script counts the plots the browser decoded
    m = re.search(r'data-plots-loaded="(\d+)"', dom)
    assert m is not None, p.stderr[-2000:]
    assert int(m.group(1)) == 3 == len(re.findall(r"<img ", dom))
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--user-data-dir=" + str(tmp_path / "profile2"), "--window-size=1200,2000",
                    f"--screenshot={shot}", html.as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000


def test_analysis_says_why_the_global_minmax_logits_are_not_finite(small_run):
    """One global min/max has no divisor guard: where a normaliser rounds to its zero point the
    division overflows; the report says so instead of printing 'nan dB'."""
    from care_q.eval.report import analysis_blocks, to_markdown

    a = small_run["analysis"]
    share = a["logit_sqnr_db"]["minmax_nonfinite"]
    assert 0.0 <= share <= 1.0
    bad = {**a, "logit_sqnr_db": {**a["logit_sqnr_db"], "minmax": float("nan"), "minmax_nonfinite": 0.25}}
    md = to_markdown(analysis_blocks(bad))
    assert "nan dB" not in md and "25% of its logits are inf or NaN" in md
    ok = {**a, "logit_sqnr_db": {**a["logit_sqnr_db"], "minmax": 12.34, "minmax_nonfinite": 0.0}}
    assert "one global min/max everywhere 12.3 dB." in to_markdown(analysis_blocks(ok))
