"""`care-q train`: a few steps lower the loss, outputs in the official format, exact resume."""

from __future__ import annotations

import copy
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from care_q import CareQError, create_model
from care_q.cli import main
from care_q.data import get_dataset
from care_q.models import load_sidecar
from care_q.models.builder import read_state_dict
from care_q.train import evaluate_top1, train
from care_q.utils.metrics import percent_agreement, predict, top1
from care_q.utils.schedule import lr_lambda

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Two easy classes (reddish / bluish noise), 16 images each, 32x32."""
    root = tmp_path_factory.mktemp("data") / "toy"
    for c, color in [("blue", (40, 60, 200)), ("red", (210, 50, 40))]:
        (root / c).mkdir(parents=True)
        for i in range(16):
            rng = np.random.default_rng(zlib.crc32(f"{c}{i}".encode()))
            arr = np.clip(np.array(color)[None, None] + rng.integers(-60, 60, (32, 32, 3)), 0, 255)
            Image.fromarray(arr.astype(np.uint8)).save(root / c / f"{i:02d}.png")
    return root


def _fixed_batch_loss(model, folder) -> float:
    """Cross-entropy on the 32 images (eval transform), BN in batch-statistics mode."""
    pp = load_sidecar(next(Path(folder).parent.glob("out*/care_test_*.pth")))
    ds = get_dataset(str(folder), pp)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor(ds.targets)
    m = copy.deepcopy(model).train()
    with torch.no_grad():
        out, dist = m(x)
    return float((F.cross_entropy(out, y) + F.cross_entropy(dist, y)) / 2)


def test_cli_train_steps_lower_the_loss(folder, capsys):
    out = folder.parent / "out_cli"
    rc = main(["train", "--model", "care_test", "--dataset", str(folder), "--img-size", "32",
               "--epochs", "2", "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "0",
               "--max-steps", "3", "--out", str(out), "--seed", "0"])
    assert rc == 0
    assert "stopped: step 3/8" in capsys.readouterr().out
    ckpt = out / "care_test_toy_32.pth"
    side = json.loads(ckpt.with_suffix(".json").read_text())
    assert side["label_names"] == ["blue", "red"] and side["num_classes"] == 2
    assert side["input_size"] == [3, 32, 32] and side["architecture"] == "care_test"
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert list(raw) == ["model"]  # official format
    trained = create_model("care_test", weights=ckpt)
    torch.manual_seed(0)
    init = create_model("care_test", num_classes=2)  # what train() starts from with --seed 0
    before, after = _fixed_batch_loss(init, folder), _fixed_batch_loss(trained, folder)
    assert after < 0.8 * before, (before, after)
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert (last["step"], last["epoch"], last["step_in_epoch"]) == (3, 0, 3)
    assert {"model", "optimizer", "scheduler", "rng", "config"} <= set(last)
    assert "stopped epoch 1 step 3" in (out / "train_log.txt").read_text()


def test_resume_equals_uninterrupted(folder):
    kw = dict(model="care_test", dataset=str(folder), img_size=32, epochs=2, batch_size=8, lr=2e-3,
              seed=1, eval_dataset=str(folder), progress=False, log=lambda s: None)
    full = train(out=folder.parent / "full", **kw)
    assert full.finished and full.step == 8 and full.epoch == 2
    assert [h["epoch"] for h in full.history] == [1, 2]
    assert 0.0 <= full.history[-1]["test_top1"] <= 100.0
    part = train(out=folder.parent / "part", max_steps=6, save_every=5, **kw)  # stops mid-epoch 2
    assert not part.finished and part.step == 6
    done = train(out=folder.parent / "part", resume=True, **kw)
    assert done.finished and done.step == 8
    a, b = read_state_dict(full.checkpoint), read_state_dict(done.checkpoint)
    assert set(a) == set(b)
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert diff == []
    assert done.history[-1]["test_top1"] == full.history[-1]["test_top1"]
    log = (folder.parent / "part" / "train_log.txt").read_text().splitlines()
    assert log[0].startswith("# start") and any(ln.startswith("# resume") for ln in log)
    assert log[-1].startswith("epoch 2 step 8 ")
    # and the interrupted run really differed before resuming
    mid = torch.load(folder.parent / "part" / "last.pt", map_location="cpu", weights_only=True)
    assert mid["step"] == 8


def test_resume_checks_settings(folder):
    kw = dict(model="care_test", dataset=str(folder), img_size=32, epochs=1, batch_size=16,
              progress=False, log=lambda s: None)
    with pytest.raises(CareQError, match="no .*last.pt to resume"):
        train(out=folder.parent / "fresh", resume=True, **kw)
    train(out=folder.parent / "r", max_steps=1, **kw)
    with pytest.raises(CareQError, match=r"lr: 0\.001 in last\.pt, 0\.01 now"):
        train(out=folder.parent / "r", resume=True, **{**kw, "lr": 1e-2})


def test_train_errors(folder, tmp_path):
    with pytest.raises(CareQError, match="unknown model 'care_xl'"):
        train(model="care_xl", dataset=str(folder), out=tmp_path, progress=False)
    with pytest.raises(CareQError, match="32 images, fewer than the batch size 64"):
        train(model="care_test", dataset=str(folder), img_size=32, batch_size=64, out=tmp_path,
              progress=False)
    with pytest.raises(CareQError, match="cannot be trained on"):
        train(model="care_test", dataset="synthetic_bn", out=tmp_path, progress=False)
    assert main(["train", "--model", "care_test", "--dataset", str(tmp_path / "none"), "--out",
                 str(tmp_path / "o")]) == 2


def test_existing_run_is_not_overwritten(folder):
    kw = dict(model="care_test", dataset=str(folder), img_size=32, epochs=1, batch_size=16,
              max_steps=1, progress=False, log=lambda s: None)
    train(out=folder.parent / "once", **kw)
    with pytest.raises(CareQError, match="already holds a training run"):
        train(out=folder.parent / "once", **kw)


# ----------------------------------------------------------------------------- schedule and top-1


def test_lr_lambda_warmup_then_cosine_or_constant():
    f = lr_lambda(warmup=2, total=6)  # warmup over steps 0, 1; cosine over steps 2..6
    assert [f(s) for s in range(8)] == pytest.approx([0.5, 1.0, 1.0, 0.8535534, 0.5, 0.1464466, 0.0, 0.0])
    g = lr_lambda(warmup=2, total=6, schedule="constant")
    assert [g(s) for s in range(8)] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert lr_lambda(0, 4)(0) == 1.0 and lr_lambda(0, 4)(2) == pytest.approx(0.5)
    with pytest.raises(CareQError, match="unknown learning-rate schedule 'linear'"):
        lr_lambda(2, 6, "linear")


class _Fixed(torch.nn.Module):
    """Predicts class 1 for a positive first pixel, else class 0; counts its calls in eval mode."""

    def __init__(self):
        super().__init__()
        self.eval_calls = 0

    def forward(self, x):
        self.eval_calls += int(not self.training)
        p = x.reshape(x.shape[0], -1)[:, 0]
        return torch.stack([-p, p], dim=1)


def _batches(signs, labels, batch=3):
    x = torch.tensor(signs, dtype=torch.float32).reshape(-1, 1, 1, 1)
    y = torch.tensor(labels)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(labels), batch)]


def test_top1_and_agreement_hand_computed():
    loader = _batches([1, -1, 1, 1, -1, -1, 1], [1, 0, 0, 1, 1, 0, 1])  # predictions 1 0 1 1 0 0 1
    preds, labels = predict(_Fixed(), loader, progress=False)
    assert preds.tolist() == [1, 0, 1, 1, 0, 0, 1] and labels.tolist() == [1, 0, 0, 1, 1, 0, 1]
    acc, p = top1(_Fixed(), loader, device="cpu", progress=False)
    assert acc == pytest.approx(500 / 7) and p.tolist() == preds.tolist()   # 5 of 7 right
    assert percent_agreement(p, torch.tensor([1, 1, 1, 1, 0, 0, 0])) == pytest.approx(500 / 7)
    net = _Fixed().train()
    assert evaluate_top1(net, loader, progress=False) == pytest.approx(500 / 7)
    assert net.training and net.eval_calls == 3   # ran in eval mode (3 batches), left in training mode
    with pytest.raises(CareQError, match="no images"):
        predict(_Fixed(), [], progress=False)


def test_training_log_top1_rounds_once():
    """23 of 160 right: the training log's ``100 * 23 / 160`` is 14.375 exactly (history 14.38);
    `top1`'s ``100 * (23 / 160)`` is one bit lower (what QAT reports, 14.37 at two decimals)."""
    loader = _batches([1] * 23 + [-1] * 137, [1] * 160, batch=64)
    assert evaluate_top1(_Fixed(), loader, progress=False) == 14.375
    assert top1(_Fixed(), loader, progress=False)[0] == 100.0 * (23 / 160) < 14.375
