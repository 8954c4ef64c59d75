"""On-device benchmark plumbing (`care_q.device.adb`), with no device: the parser on recorded
outputs and a fake `runner` standing in for subprocess.run to check the exact adb command lines.

tests/recorded/benchmark_model_*.txt are written by hand in the format TFLite's benchmark_model prints
(tflite/tools/benchmark/benchmark_model.cc and benchmark_tflite_model.cc in the LiteRT
repository): their numbers are invented, only the format is real."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from care_q.device.adb import parse_benchmark_output, parse_device, run_device_bench
from care_q.device.litert_host import run_host_litert_bench
from care_q.errors import CareQError

DATA = Path(__file__).resolve().parents[1] / "recorded"


def _text(name: str) -> str:
    return (DATA / f"benchmark_model_{name}.txt").read_text()


def test_parse_xnnpack_output():
    r = parse_benchmark_output(_text("xnnpack_int8"))
    assert (r["init_us"], r["first_inference_us"], r["warmup_avg_us"], r["inference_avg_us"]) == \
        (38412, 9731, 8452.6, 8206.37)
    assert r["warmup"] == {"count": 5, "first": 9731, "curr": 8144, "min": 8087, "max": 9731, "avg": 8452.6,
                           "std": 638}
    assert r["runs"] == {"count": 30, "first": 8130, "curr": 8211, "min": 7968, "max": 8840, "avg": 8206.37,
                         "std": 171}
    assert r["memory"] == {"init_mb": 14.2031, "overall_mb": 17.4414, "peak_mb": 19.875}
    assert r["delegate"] == {"name": "XNNPACK", "mode": "partially", "kernels": 49}
    assert r["model_size_mb"] == 6.6164


def test_parse_nnapi_gpu_logcat_and_failure():
    n = parse_benchmark_output(_text("nnapi_partial"))
    assert n["delegate"] == {"name": "NNAPI", "mode": "partially", "kernels": 3}
    assert n["runs"]["count"] == 30 and n["runs"]["avg"] == 14021.4 and n["memory"]["peak_mb"] == 47.2383
    g = parse_benchmark_output(_text("gpu_fp32_profiling"))
    assert g["delegate"]["mode"] == "completely"
    # the op-profiling table's "Timings (microseconds): count=1" line is not the run statistics
    assert g["runs"]["count"] == 10 and g["runs"]["avg"] == 5998.1 and g["warmup"]["count"] == 2
    assert g["memory"] == {"init_mb": None, "overall_mb": None, "peak_mb": None}
    lc = parse_benchmark_output(_text("logcat"))                       # `adb logcat | grep` lines
    assert lc["inference_avg_us"] == 11876.2 and lc["delegate"]["kernels"] == 5 and lc["runs"] is None
    with pytest.raises(CareQError, match="no 'Inference timings in us"):
        parse_benchmark_output(_text("failed"))


class FakeAdb:
    """Records commands; answers benchmark runs with a recorded output (scaled per model)."""

    def __init__(self, outputs: dict[str, str], fail_on: str | None = None):
        self.outputs = outputs
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, cmd, capture_output, text, timeout, check):
        assert capture_output and text and not check and timeout > 0
        self.calls.append(list(cmd))
        if self.fail_on and self.fail_on in " ".join(cmd):
            return subprocess.CompletedProcess(cmd, 1, "", "adb: no devices/emulators found\n")
        joined = " ".join(cmd)
        for key, out in self.outputs.items():
            if "--graph=" in joined and f"/{key}.tflite" in joined:
                return subprocess.CompletedProcess(cmd, 0, out, "")
        return subprocess.CompletedProcess(cmd, 0, "", "")


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "benchmark_model").write_bytes(b"\x7fELF")
    for n in ("fp32", "int8"):
        (tmp_path / f"care_s0_{n}.tflite").write_bytes(b"TFL3")
    return tmp_path


def _scaled(text: str, factor: float) -> str:
    """The recorded output with every timing multiplied (a slower model)."""
    def mul(m):
        return f"{m.group(1)}={float(m.group(2)) * factor:g}"
    text = re.sub(r"\b(first|curr|min|max|avg|std)=([\d.]+)", mul, text)
    return re.sub(r"(Inference \(avg\): )([\d.]+)", lambda m: f"{m.group(1)}{float(m.group(2)) * factor:g}", text)


def test_run_device_bench_commands_and_aggregation(files):
    out = _text("xnnpack_int8")
    fake = FakeAdb({"fp32": _scaled(out, 1.5), "int8": out})
    arts = {"fp32": files / "care_s0_fp32.tflite", "int8": files / "care_s0_int8.tflite"}
    res = run_device_bench(arts, "R58M12ABC", files / "benchmark_model", delegate="nnapi", threads=4, runs=60,
                           runner=fake, rounds=2, warmup_runs=5)
    d = "/data/local/tmp/care_q"
    adb = ["adb", "-s", "R58M12ABC"]
    bench = (f"{d}/benchmark_model --graph={d}/{{m}}.tflite --num_threads=4 --num_runs=30 --warmup_runs=5 "
             f"--min_secs=0 --warmup_min_secs=0 --report_peak_memory_footprint=true --use_nnapi=true")
    assert fake.calls == [
        adb + ["shell", "mkdir", "-p", d],
        adb + ["push", str(files / "benchmark_model"), f"{d}/benchmark_model"],
        adb + ["shell", "chmod", "755", f"{d}/benchmark_model"],
        adb + ["push", str(arts["fp32"]), f"{d}/fp32.tflite"],
        adb + ["push", str(arts["int8"]), f"{d}/int8.tflite"],
        # interleaved: FP32, INT8, FP32, INT8
        adb + ["shell", bench.format(m="fp32")], adb + ["shell", bench.format(m="int8")],
        adb + ["shell", bench.format(m="fp32")], adb + ["shell", bench.format(m="int8")],
    ]
    assert res["commands"] == fake.calls
    i8, f32 = res["results"]["int8"], res["results"]["fp32"]
    # two rounds of the recorded 30 runs each: 60 runs, the recorded mean and spread
    assert i8["count"] == 60 and i8["avg_ms"] == pytest.approx(8.20637)
    assert i8["std_ms"] == pytest.approx(0.171) and i8["min_ms"] == pytest.approx(7.968)
    assert i8["init_ms"] == pytest.approx(38.412) and i8["memory"]["peak_mb"] == 19.875
    assert i8["delegate"]["kernels"] == 49 and len(i8["per_round"]) == 2
    assert f32["avg_ms"] == pytest.approx(1.5 * 8.20637, rel=1e-5) and f32["ratio_to_first"] == 1.0
    assert i8["ratio_to_first"] == pytest.approx(1 / 1.5, rel=1e-5)


def test_run_device_bench_default_device_uneven_rounds_and_paths(files):
    fake = FakeAdb({"care_s0_int8": _text("xnnpack_int8")})
    res = run_device_bench([files / "care_s0_int8.tflite"], None, files / "benchmark_model", delegate="gpu",
                           threads=1, runs=7, runner=fake, rounds=3)
    benches = [c for c in fake.calls if "--graph=" in " ".join(c)]
    assert all(c[0] == "adb" and c[1] in ("shell", "push") for c in fake.calls)   # no -s: the only device
    assert [re.search(r"--num_runs=(\d+)", c[2]).group(1) for c in benches] == ["3", "2", "2"]
    assert all(c[2].endswith("--use_gpu=true") for c in benches)
    assert res["device"].startswith("adb") and res["rounds"] == 3


def test_run_device_bench_errors(files):
    arts = {"int8": files / "care_s0_int8.tflite"}
    binary = files / "benchmark_model"
    with pytest.raises(CareQError, match="unknown delegate 'hexagon'"):
        run_device_bench(arts, None, binary, delegate="hexagon", runner=FakeAdb({}))
    with pytest.raises(CareQError, match="benchmark binary not found"):
        run_device_bench(arts, None, files / "nope", runner=FakeAdb({}))
    onnx = files / "m.onnx"
    onnx.write_bytes(b"")
    with pytest.raises(CareQError, match=".tflite files only"):
        run_device_bench({"m": onnx}, None, binary, runner=FakeAdb({}))
    with pytest.raises(CareQError, match="no devices/emulators found"):
        run_device_bench(arts, "XYZ", binary, runner=FakeAdb({}, fail_on="mkdir"))
    bad = FakeAdb({"int8": _text("failed")})
    with pytest.raises(CareQError, match="Could not open|Benchmarking failed"):
        run_device_bench(arts, None, binary, runs=2, rounds=1, runner=bad)
    with pytest.raises(CareQError, match="threads must be >= 1"):
        run_device_bench(arts, None, binary, threads=0, runner=FakeAdb({}))
    assert parse_device("adb") is None and parse_device("adb:emulator-5554") == "emulator-5554"
    with pytest.raises(CareQError, match="unknown device 'usb'"):
        parse_device("usb")


def test_host_litert_bench_fake_runner(files):
    seen = []

    def fake(cmd, capture_output, text, timeout, check):
        seen.append(cmd)
        out = next(a.split("=", 1)[1] for a in cmd if a.startswith("--result_json="))
        runs = int(next(a.split("=", 1)[1] for a in cmd if a.startswith("--num_runs=")))
        avg = 4.0 if "int8" in " ".join(cmd) else 8.0
        Path(out).write_text(json.dumps({"latency": {"init_ms": 20.0, "avg_ms": avg, "min_ms": avg - 1,
                                                     "max_ms": avg + 1, "median_ms": avg, "std_ms": 0.5,
                                                     "num_runs": runs}}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    res = run_host_litert_bench([files / "care_s0_fp32.tflite", files / "care_s0_int8.tflite"], threads=2,
                                runs=10, rounds=2, runner=fake)
    assert [Path(next(a for a in c if a.startswith("--model=")).split("=", 1)[1]).stem for c in seen] == \
        ["care_s0_fp32", "care_s0_int8"] * 2
    assert all("--num_threads=2" in c and "--num_runs=5" in c for c in seen)
    assert res["results"]["care_s0_int8"]["avg_ms"] == 4.0 and res["results"]["care_s0_fp32"]["count"] == 10


def test_host_litert_bench_real_run(tmp_path):
    """One real run of ai-edge-litert's CompiledModel benchmark on a one-conv model."""
    from ai_edge_litert import schema_py_generated as fb

    from care_q.export.tflite_builder import TFLiteBuilder, options

    b = TFLiteBuilder()
    # 2.4 M multiply-adds: well above the tool's 0.01 ms rounding (an 8x8x4 conv reads 0.00 ms)
    x = b.tensor("x", (1, 32, 32, 16), np.float32)
    w = b.const("w", np.ones((16, 3, 3, 16), np.float32))
    bias = b.const("b", np.zeros(16, np.float32))
    y = b.tensor("y", (1, 32, 32, 16), np.float32)
    b.inputs.append(x)
    b.outputs.append(y)
    b.op(fb.BuiltinOperator.CONV_2D, [x, w, bias], [y], fb.BuiltinOptions.Conv2DOptions,
         options(fb.Conv2DOptionsT, padding=fb.Padding.SAME, strideW=1, strideH=1, dilationWFactor=1,
                 dilationHFactor=1))
    p = tmp_path / "conv.tflite"
    p.write_bytes(b.to_bytes())
    res = run_host_litert_bench([p], threads=1, runs=3, rounds=1, warmup_runs=1)
    r = res["results"]["conv"]
    eps = 1e-9  # the average is a weighted mean of rounded values: equal runs give it a last-bit error
    assert r["count"] == 3 and 0 < r["min_ms"] <= r["avg_ms"] + eps and r["avg_ms"] <= r["max_ms"] + eps < 1000
