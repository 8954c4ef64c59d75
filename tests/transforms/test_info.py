"""Parameters and MACs (care_q.transforms.profile) and `care-q info`."""

from __future__ import annotations

import pytest

from care_q import create_model
from care_q.cli import main
from care_q.models import CARE_CONFIGS
from care_q.transforms.profile import model_info


def _attention_matmul_macs(cfg, img_size: int) -> int:
    """k^T v and q (k^T v): h*N*D*D each; q . mean(k): h*N*D; per attention block."""
    total = 0
    for i in range(cfg.attention_from_stage, 4):
        n = (img_size // (4 * 2 ** i)) ** 2
        d = cfg.head_dims[i]
        h = cfg.mem_dims[i] // d
        total += cfg.depths[i] * (2 * h * n * d * d + h * n * d)
    return total


@pytest.fixture(scope="module")
def s0():
    return create_model("care_s0")


def test_care_s0_224(s0):
    info = model_info(s0, img_size=224)
    assert abs(info["macs"] / 0.72e9 - 1) <= 0.03  # reference value 0.72 GMACs
    assert info["macs"] == 716_772_096
    assert abs(info["params"] - 7.34e6) <= 0.005e6  # reference value 7.34 M
    by = info["macs_by_type"]
    assert sum(by.values()) == info["macs"]
    assert by["linear"] == 1024 * 1000                      # one merged head in the deploy form
    assert by["matmul"] == _attention_matmul_macs(CARE_CONFIGS["care_s0"], 224) == 2_471_168
    assert by["conv"] > 10 * by["dwconv"] > 0
    assert info["deploy_params"] < info["params"]           # BNs folded, two heads merged


def test_macs_scale_with_resolution(s0):
    """Every conv and attention matmul is linear in the token count; the head is not."""
    a, b = model_info(s0, img_size=224), model_info(s0, img_size=64)
    head = a["macs_by_type"]["linear"]
    assert b["macs_by_type"]["linear"] == head
    assert (a["macs"] - head) * 64 * 64 == (b["macs"] - head) * 224 * 224


@pytest.mark.parametrize("name,gmacs", [("care_s1", 1.0), ("care_s2", 1.9)])
def test_larger_variants(name, gmacs):
    info = model_info(name, img_size=224)
    assert abs(info["macs"] / (gmacs * 1e9) - 1) <= 0.05
    assert info["macs_by_type"]["matmul"] == _attention_matmul_macs(CARE_CONFIGS[name], 224)


def test_cli_info(capsys):
    assert main(["info", "--model", "care_s0"]) == 0
    out = capsys.readouterr().out
    assert "care_s0 @ 224x224, 1000 classes" in out
    assert "7.34 M" in out and "716.77 M (0.717 G)" in out and "matmul" in out


def test_cli_info_uses_sidecar_size(capsys, proxy_ckpt):
    assert main(["info", "--model", "care_s0", "--weights", str(proxy_ckpt)]) == 0
    out = capsys.readouterr().out
    assert "@ 64x64, 10 classes" in out
    assert "58.44 M" in out  # (716.77 M - 1.02 M head) * (64/224)^2 + 10.24 K head


def test_cli_info_errors(capsys):
    assert main(["info", "--model", "care_s9"]) == 2
    assert "unknown model 'care_s9'" in capsys.readouterr().err
    assert main(["info", "--model", "care_s0", "--img-size", "50"]) == 2
    assert "multiple of 32" in capsys.readouterr().err


def test_cli_parser_starts_without_torch():
    # `care-q --help` / `care-q recipes` answer at once: torch and timm load with the first model
    import subprocess
    import sys

    code = ("import sys, care_q.cli; care_q.cli.build_parser(); import care_q; care_q.list_models; "
            "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code.replace("care_q.list_models; ", "")], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "[]"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "['timm', 'torch']"  # the model API loads them on first use
