"""care-q bench --kernel-profile: a profile timed on a phone (fake adb) feeds ptq_int8_cpu's choice."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from one_op import div_chain

from care_q.bench.kernel_profile import kernel_profile
from care_q.errors import CareQError
from care_q.export.tflite_profile import choose_float_kernels, load_profile, op_forms

RECORDED = Path(__file__).resolve().parents[1] / "recorded" / "benchmark_model_xnnpack_int8.txt"


def _output(avg_us: float) -> str:
    """The recorded benchmark_model output with its timed runs' average set to ``avg_us``."""
    text = RECORDED.read_text()
    text = re.sub(r"(count=\d+ first=\S+ curr=\S+ min=\S+ max=\S+ avg=)[\d.]+", lambda m: f"{m.group(1)}{avg_us}", text)
    return re.sub(r"(Inference \(avg\): )[\d.]+", lambda m: f"{m.group(1)}{avg_us}", text)


class PhoneAdb:
    """A phone on which an invoke costs 50 us, TFLite's int8 DIV 400 us and its float island 100 us."""

    def __init__(self):
        self.graphs: list[str] = []

    def __call__(self, cmd, capture_output, text, timeout, check):
        joined = " ".join(cmd)
        m = re.search(r"--graph=\S*/([\w.-]+)\.tflite", joined)
        if not m:
            return subprocess.CompletedProcess(cmd, 0, "", "")
        self.graphs.append(m.group(1))
        us = 50.0 + {"int8": 400.0, "float": 100.0}.get(m.group(1).rsplit("_", 1)[-1], 0.0)
        return subprocess.CompletedProcess(cmd, 0, _output(us), "")


def test_phone_profile_is_written_and_chooses_the_island(tmp_path):
    model = tmp_path / "m_int8.tflite"
    model.write_bytes(div_chain(3))
    (tmp_path / "benchmark_model").write_bytes(b"\x7fELF")
    adb = PhoneAdb()
    s = kernel_profile(model, tmp_path / "phone.json", threads=4, runs=5, device="adb:R5CX",
                       binary=tmp_path / "benchmark_model", runner=adb)
    # one distinct signature: its two forms and the empty model, each run once
    assert sorted(adb.graphs) == sorted(["empty", f"{op_forms(div_chain(3))[0].signature}_int8",
                                         f"{op_forms(div_chain(3))[0].signature}_float"])
    assert s["ms"] == pytest.approx(3 * 0.4) and s["bound_ms"] == pytest.approx(3 * 0.1)
    prof = load_profile(tmp_path / "phone.json")
    assert prof["device"] == "adb:R5CX" and prof["overhead_ms"] == pytest.approx(0.05)
    assert choose_float_kernels(model.read_bytes(), prof, {"y0", "y2"})["float"] == ["y0", "y2"]


def test_kernel_profile_errors(tmp_path):
    with pytest.raises(CareQError, match="times one int8 .tflite file"):
        kernel_profile(tmp_path, tmp_path / "p.json")
    with pytest.raises(CareQError, match="model file not found"):
        kernel_profile(tmp_path / "none.tflite", tmp_path / "p.json")
    model = tmp_path / "m.tflite"
    model.write_bytes(div_chain(1))
    with pytest.raises(CareQError, match="--device needs --benchmark-binary"):
        kernel_profile(model, tmp_path / "p.json", device="adb")
    with pytest.raises(CareQError, match="unknown device 'usb'"):
        kernel_profile(model, tmp_path / "p.json", device="usb", binary=model)
