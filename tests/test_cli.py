"""The `care-q` command line: one-line warnings, errors, and `care-q ptq` end to end in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from importlib import resources
from pathlib import Path

import pytest

import care_q.commands.recipes as recipes_command
from care_q import CareQError
from care_q.cli import main, warning_line

CARE_Q = Path(sys.executable).with_name("care-q")  # the console script of this environment


def test_warning_line_is_one_line():
    assert warning_line("ptq", UserWarning("set 'x' unavailable\n  fell back to 'synthetic_bn'\n")) == \
        "care-q ptq: warning: set 'x' unavailable; fell back to 'synthetic_bn'"


def _warning_run(args) -> int:
    warnings.warn("calibration set 'x' unavailable\n    fell back", UserWarning, stacklevel=1)
    return 0


def test_warnings_print_as_one_line_and_the_hook_is_restored(monkeypatch, capsys):
    monkeypatch.setattr(recipes_command, "run", _warning_run)
    before = warnings.showwarning
    assert main(["recipes"]) == 0
    assert capsys.readouterr().err == "care-q recipes: warning: calibration set 'x' unavailable; fell back\n"
    assert warnings.showwarning is before


@pytest.mark.parametrize("exc,rc,err", [
    (KeyboardInterrupt, 130, "care-q recipes: interrupted\n"),
    (None, 2, "care-q recipes: warning: first\ncare-q recipes: error: broken\n"),
])
def test_the_hook_is_restored_after_an_error(monkeypatch, capsys, exc, rc, err):
    def run(args):
        if exc is not None:
            raise exc
        warnings.warn("first", UserWarning, stacklevel=1)
        raise CareQError("broken")

    monkeypatch.setattr(recipes_command, "run", run)
    before = warnings.showwarning
    assert main(["recipes"]) == rc
    assert capsys.readouterr().err == err
    assert warnings.showwarning is before


def test_recipes_lists_the_shipped_recipes(capsys):
    assert main(["recipes"]) == 0
    rows = [line.split("│")[1].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
    names = [r for r in rows if r]
    shipped = sorted(f.name[:-5] for f in resources.files("care_q").joinpath("recipes").iterdir()
                     if f.name.endswith(".yaml"))
    assert names == shipped  # every recipe file in the package, one row each, sorted
    assert {"npu_int8", "ptq_a16w8_attention", "ptq_int8", "ptq_int8_full", "ptq_int8_reciprocal", "ptq_int8_x86",
            "qat_int8", "qat_int8_full", "qat_w4a8_mlp"} <= set(names)


def test_unavailable_set_without_fallback_is_one_error_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = main(["ptq", "--model", "care_test", "--img-size", "32", "--calib", "cifar10_train", "--data-root",
               str(tmp_path / "empty"), "--num-calib", "8", "--threads", "1", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2
    assert err == ["care-q ptq: warning: no --weights: the weights are random, so accuracy figures are meaningless "
                   "(latency, size and runtime agreement are still valid)",
                   f"care-q ptq: error: dataset 'cifar10_train' not found under data root {tmp_path / 'empty'}: "
                   f"looked for {tmp_path / 'empty' / 'cifar10' / 'train'}"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ----------------------------------------------------------------------------- care-q ptq in a subprocess


@pytest.fixture(scope="module")
def ptq_cli(tmp_path_factory):
    """`care-q ptq` as a user runs it: a calibration set that is not there, --fallback-synthetic, both
    targets, --latency-runs 2 (care_test at 32x32, random weights, 8 calibration and 16 verification images)."""
    assert CARE_Q.is_file(), f"{CARE_Q}: the environment has no care-q script (pip install -e .)"
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "empty").mkdir()
    out = tmp / "out"
    env = {**os.environ, "COLUMNS": "300"}
    env.pop("CARE_Q_DATA", None)
    cmd = [str(CARE_Q), "ptq", "--model", "care_test", "--img-size", "32", "--calib", "cifar10_train",
           "--data-root", str(tmp / "empty"), "--fallback-synthetic", "--num-calib", "8", "--num-verify", "16",
           "--latency-runs", "2", "--threads", "1", "--out", str(out)]
    p = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p, json.loads((out / "report.json").read_text())


def test_cli_fallback_warns_in_one_line(ptq_cli):
    out, p, report = ptq_cli
    empty = out.parent / "empty"
    assert [line for line in p.stderr.splitlines() if "warning" in line.lower()] == [
        "care-q ptq: warning: no --weights: the weights are random, so accuracy figures are meaningless "
        "(latency, size and runtime agreement are still valid)",
        f"care-q ptq: warning: calibration set 'cifar10_train' unavailable (dataset 'cifar10_train' not found under "
        f"data root {empty}: looked for {empty / 'cifar10' / 'train'}); fell back to data-free 'synthetic_bn' "
        f"(inputs optimised to match BatchNorm statistics)"]
    assert "ptq(" not in p.stderr and ".py:" not in p.stderr  # no Python source line, no file:line
    assert report["calibration"]["set"] == "synthetic_bn" and report["calibration"]["images"] == 8
    assert "fell back to data-free 'synthetic_bn'" in report["notes"][1]


def test_cli_artifacts_are_verified(ptq_cli):
    out, p, report = ptq_cli
    assert sorted(report["artifacts"]) == ["onnx", "tflite"]
    for t, name in (("tflite", "care_test_int8.tflite"), ("onnx", "care_test_int8_qdq.onnx")):
        a = report["artifacts"][t]
        assert Path(a["path"]) == out / name and (out / name).stat().st_size == a["size_bytes"] > 100_000
        v = a["verification"]
        assert v["images"] == 16 and v["max_abs_diff"] == 0.0 and v["top1_agreement"] == 1.0, (t, v)
        line = next(x for x in p.stdout.splitlines() if x.startswith(f"{t}: {out / name} "))
        assert f"({a['size_bytes'] / 1e6:.2f} MB)" in line and "100.0%" in line, line  # agreement with the reference
    assert f"report: {out}/report.md" in p.stdout


def test_cli_latency_section(ptq_cli):
    out, p, report = ptq_cli
    md = (out / "report.md").read_text()
    assert "## Latency (batch 1, this machine)" in md
    assert sorted(report["latency"]) == ["onnx", "tflite"]
    for t, m in report["latency"].items():
        fp32 = out / ("care_test_fp32.tflite" if t == "tflite" else "care_test_fp32.onnx")
        assert m["fp32_size_bytes"] == fp32.stat().st_size
        br = m["block_ratios"]  # --latency-runs 2: 3 blocks of 1 round, each in its own process
        assert len(br) == 3 and m["ratio"] == pytest.approx(sorted(br)[1]) and m["ratio_spread"] == [min(br), max(br)]
        assert m["size_ratio"] == pytest.approx(report["artifacts"][t]["size_bytes"] / fp32.stat().st_size)
        assert 0.2 < m["size_ratio"] < 0.5  # int8 weights: about a third of the FP32 file at this size
        assert f"| {t} | {m['fp32']['median_ms']:.2f} | {m['int8']['median_ms']:.2f} | {m['ratio']:.2f}x | " \
               f"{min(br):.2f}-{max(br):.2f} | {m['size_ratio']:.2f}x |" in md
        line = next(x for x in p.stdout.splitlines() if x.startswith(f"{t}: int8 "))
        assert f"{m['int8']['median_ms']:.2f} ms" in line and f"({m['ratio']:.2f}x)" in line, line


# --for: (recipe, substitution parameters learnt: 3 attentions x (a, b, scale, 2 heads' c); ethos-u: none,
# its normaliser is exact; the normaliser's op)
FOR_NPU = {"npu": ("npu_int8_ptq", 15, "L2_NORMALIZATION"), "ethos-u": ("npu_int8_ptq_ethosu", 0, "RSQRT")}


@pytest.mark.parametrize("device", sorted(FOR_NPU))
def test_for_npu_writes_the_fully_int8_tflite(device, tmp_path, data_root, capsys):
    """`care-q ptq --for npu|ethos-u` leads to the NPU recipes: one .tflite, int8 in and int8 out, no float op,
    verified; the ethos-u one compiles whole for the NPU (Vela: no CPU op)."""
    from care_q.census import check
    from care_q.census.tflite_reader import read_tflite

    recipe, n_subst, norm = FOR_NPU[device]
    out = tmp_path / "npu"
    rc = main(["ptq", "--model", "care_test", "--img-size", "32", "--calib", "cifar10_test", "--data-root",
               str(data_root), "--num-calib", "32", "--num-verify", "16", "--latency-runs", "0", "--threads", "1",
               "--for", device, "--recon-steps", "20", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["name"] == recipe and sorted(report["artifacts"]) == ["tflite"]
    assert [u["name"] for u in report["reconstruction"]["units"]][-1] == "head"  # calibrated, then reconstructed
    assert report["reconstruction"]["iterations"] == 20 == report["recipe"]["reconstruction"]["iterations"]
    # towards the original model's outputs, the substitutions' parameters and the biases learnt too: still bit-exact
    rec_summary = report["reconstruction"]
    assert rec_summary["target"] == "original" and rec_summary["float_params"]["substitution"] == n_subst
    md = (out / "report.md").read_text()
    assert "The FP32 outputs are the original model's" in md
    if n_subst:
        assert f"{n_subst} parameters of the substitutions" in md
    else:
        assert "parameters of the substitutions" not in md
    v = report["artifacts"]["tflite"]["verification"]
    assert v["top1_agreement"] == 1.0 and v["max_abs_diff"] == 0.0
    # the NPU substitutions change the function: their own error, before any int8, is in the report
    assert report["deploy_form_vs_fp32"]["logit_sqnr_db"] < 60
    g = read_tflite(out / "care_test_int8.tflite")
    ops = [op.name for op in g.ops]
    assert not set(ops) & {"QUANTIZE", "DEQUANTIZE", "GELU", "DIV", "ELU"}, ops
    assert ops.count(norm) == 7  # 6 attention heads and the head's LayerNorm
    if device == "ethos-u":
        t = check(out / "care_test_int8.tflite", targets="ethos-u55-128", runtime=False).targets["ethos-u55-128"]
        assert t.source == "compiled" and t.partitions == 1 and len(t.on_accelerator) == len(ops)


def test_ptq_option_errors_before_any_work(tmp_path, capsys):
    for args, why in ((["--for", "npu", "--recon-steps", "0"], "reconstruction steps must be at least 1, got 0"),
                      (["--recon-steps", "5"],
                       "recipe 'ptq_int8_cpu' has no reconstruction section: reconstruction steps do not apply")):
        rc = main(["ptq", "--model", "care_test", *args, "--out", str(tmp_path / "o")])
        assert rc == 2 and why in capsys.readouterr().err
        assert not (tmp_path / "o").exists()
    for device in FOR_NPU:
        rc = main(["ptq", "--model", "care_test", "--for", device, "--target", "tflite,onnx", "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.splitlines()
        assert rc == 2 and err == [f"care-q ptq: error: --for {device} writes a .tflite (the NPU runtimes read TFLite); "
                                   "--target onnx has no NPU form"]
        assert not (tmp_path / "o").exists()


def test_bench_ort_profile(tmp_path, capsys):
    import onnx
    from one_op import onnx_fp32_model, onnx_int8_model

    q, f = tmp_path / "q.onnx", tmp_path / "f.onnx"
    onnx.save(onnx_int8_model(), q)
    onnx.save(onnx_fp32_model(), f)
    rc = main(["bench", "--artifacts", str(q), "--ort-profile", str(f), "--runs", "3", "--warmup", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "conv 1x1" in out and "its bound" in out and "FP32-only kinds: add, depthwise 3x3, elu" in out
    assert main(["bench", "--artifacts", str(tmp_path), "--ort-profile", str(f)]) == 2
    assert "the onnxruntime profile reads .onnx files" in capsys.readouterr().err


def test_bench_kernel_profile(tmp_path, capsys):
    from one_op import div_chain

    model = tmp_path / "m_int8.tflite"
    model.write_bytes(div_chain(2))
    rc = main(["bench", "--artifacts", str(model), "--kernel-profile", str(tmp_path / "p.json"), "--runs", "3",
               "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "DIV" in out and "the bound" in out
    assert len(json.loads((tmp_path / "p.json").read_text())["ops"]) == 1  # the two DIVs share a signature
    for args, why in ((["--device", "adb"], "--device and --benchmark-binary apply to --kernel-profile"),
                      ([], "--out is required")):
        assert main(["bench", "--artifacts", str(model), *args]) == 2
        assert why in capsys.readouterr().err
