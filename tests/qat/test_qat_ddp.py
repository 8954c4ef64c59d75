"""QAT under torchrun: 2 gloo processes on CPU equal one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from care_q import create_model
from care_q.models import PreprocessConfig, save_checkpoint
from care_q.qat import qat

RECIPE = """\
name: ddp_test
kind: qat
activations: {method: minmax}
qat: {lr: 0.001, batch_size: 8, learn_scales: true, checkpoint_every: 0, temperature: 2.0, ce_weight: 1.0}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    classes = {"a": (200, 40, 40), "b": (40, 200, 40)}
    for c, color in classes.items():
        (root / "data" / c).mkdir(parents=True)
        for i in range(12):
            rng = np.random.default_rng(zlib.crc32(f"{c}{i}".encode()))
            arr = np.clip(np.array(color)[None, None] + rng.integers(-100, 100, (32, 32, 3)), 0, 255)
            Image.fromarray(arr.astype(np.uint8)).save(root / "data" / c / f"{i}.png")
    torch.manual_seed(0)
    m = create_model("care_test", num_classes=2)
    with torch.no_grad():  # a random model's logits are ~0: widen them so the distillation term matters
        for h in (m.head, m.dist_head):
            h.fc.weight.mul_(20)
    ck = root / "care_test.pth"
    save_checkpoint(m, ck, PreprocessConfig(input_size=(3, 32, 32), interpolation="bilinear", crop_pct=1.0,
                                            label_names=list(classes), architecture="care_test", num_classes=2))
    (root / "recipe.yaml").write_text(RECIPE)
    return root, ck


def _args(root: Path, ck: Path, out: str) -> list[str]:
    return ["qat", "--model", "care_test", "--weights", str(ck), "--dataset", str(root / "data"), "--recipe",
            str(root / "recipe.yaml"), "--epochs", "1.5", "--num-calib", "8", "--target", "none", "--threads", "1",
            "--out", str(root / out)]


def test_two_gloo_processes_match_one(setup):
    root, ck = setup
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = qat("care_test", ck, str(root / "data"), recipe=root / "recipe.yaml", epochs=1.5, calib_images=8,
                  targets=[], out=root / "one", progress=False, log=lambda *a: None)
    finally:
        torch.set_num_threads(n)
    assert one["finished"] and one["train"]["steps"] == 4 and one["train"]["processes"] == 1
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "care_q",
           *_args(root, ck, "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "global batch 8 (2 process(es) x 4)" in proc.stdout
    assert proc.stdout.count("QAT care_test with recipe ddp_test") == 1  # rank 0 alone logs
    a = torch.load(root / "one" / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(root / "two" / "last.pt", map_location="cpu", weights_only=True)
    assert a["step"] == b["step"] == 4
    start = torch.load(root / "one" / "start.pt", map_location="cpu", weights_only=True)["model"]
    moved = max(float((v - start[k]).abs().max()) for k, v in a["model"].items())
    assert moved > 1e-3  # a real difference that DDP has to reproduce
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=1e-5, msg=k)
    assert sorted(p.name for p in (root / "two").iterdir()) == ["last.pt", "report.json", "report.md", "start.pt"]
    rep = json.loads((root / "two" / "report.json").read_text())
    assert rep["train"]["processes"] == 2 and rep["train"]["backend"] == "gloo"
    assert rep["train"]["per_process_batch"] == 4 and rep["train"]["global_batch"] == 8
