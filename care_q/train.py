"""FP32 training of a CARE model from scratch on an ImageFolder set (`care-q train`).

AdamW (no weight decay on biases, norms and layer scales), a per-step schedule of linear warmup
then cosine decay to zero over all ``epochs``, label smoothing, random crop + flip. In training
mode a CARE model returns both heads' logits; the loss is the mean of the two cross-entropies.

Outputs in ``out``:

- ``<model>_<dataset>_<size>.pth`` + ``.json``: the official checkpoint format ``{'model': sd}``
  and its preprocessing sidecar (the dataset definition's mean/std/interpolation/crop, the class
  names as ``label_names``), written atomically after every epoch and when the run stops;
- ``last.pt``: model, optimizer, scheduler, epoch, step and RNG state, written atomically after
  every epoch, every ``save_every`` steps and when ``max_steps`` stops the run; ``resume``
  continues from it;
- ``train_log.txt``: one line per epoch (appended).

Reproducibility: the shuffle order of each epoch comes from (seed, epoch) and each sample's
augmentation from (seed, epoch, index), so an interrupted and resumed run ends with the same
weights as an uninterrupted one (CPU; any number of workers). ``max_steps`` stops after that many
optimizer steps in all (resumed steps included) without changing the schedule, which always
spans ``epochs``: stop with ``max_steps`` and ``resume`` later, and the result is the same.
The model is initialised after ``torch.manual_seed(seed)`` (so torch's global RNG is reseeded).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from care_q.data.datasets import _named_or_path, check_classes, dataset_tag, get_dataset, make_loader
from care_q.errors import CareQError
from care_q.models import CARE_CONFIGS, create_model, save_checkpoint
from care_q.utils.io import atomic_torch_save, load_resume_state
from care_q.utils.metrics import predict
from care_q.utils.progress import progress_bar
from care_q.utils.schedule import lr_lambda

# Settings that must match for --resume to continue a run (the others may change).
RESUME_KEYS = ("model", "dataset", "dataset_path", "img_size", "epochs", "batch_size", "lr",
               "weight_decay", "label_smoothing", "warmup_steps", "seed", "limit", "num_classes")


@dataclass
class TrainResult:
    checkpoint: Path
    last: Path
    log: Path
    step: int
    epoch: int
    total_steps: int
    finished: bool
    train_loss: float | None = None
    test_top1: float | None = None
    images_per_s: float | None = None
    history: list[dict] = field(default_factory=list)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g).tolist()


def evaluate_top1(model: nn.Module, loader, progress: bool | None = None,
                  description: str = "eval") -> float:
    """Top-1 accuracy (percent) of the model in eval mode (both heads averaged), as the training
    log reports it: ``100 * correct / images``, one rounding (`care_q.utils.metrics.top1` computes
    ``100 * (correct / images)``, which can differ in the last bit)."""
    was = model.training
    model.eval()
    try:
        preds, labels = predict(model, loader, description=description, progress=progress)
    finally:
        model.train(was)
    return 100.0 * int((preds == labels).sum()) / max(int(labels.numel()), 1)


def rng_state() -> dict:
    """The random state a resumable run checkpoints (torch and Python's)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        v, internal, gauss = state["python"]
        random.setstate((v, tuple(internal), gauss))



def _check_settings(model: str, epochs: int, batch_size: int, img_size: int, lr: float, weight_decay: float,
                    label_smoothing: float, max_steps: int | None) -> None:
    """A CareQError for an unknown model or an out-of-range setting, before any data is read."""
    if model not in CARE_CONFIGS:
        create_model(model)  # raises the standard unknown-model error
    for key, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("img_size", img_size, 8)):
        if int(value) < low:
            raise CareQError(f"{key} must be at least {low}, got {value}")
    if lr <= 0 or weight_decay < 0 or not 0 <= label_smoothing < 1:
        raise CareQError(f"need lr > 0, weight_decay >= 0 and 0 <= label_smoothing < 1 (got lr={lr}, "
                         f"weight_decay={weight_decay}, label_smoothing={label_smoothing})")
    if max_steps is not None and max_steps < 1:
        raise CareQError(f"max_steps must be positive, got {max_steps}")


@dataclass
class _Data:
    """The training set and what it decides: classes, steps, the preprocessing the checkpoint records."""

    train_ds: object
    preprocess: object
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_loader: object = None

    @property
    def classes(self) -> list[str]:
        return list(self.train_ds.classes)


def _load_data(model: str, dataset: str, img_size: int, epochs: int, batch_size: int, workers: int, seed: int,
               eval_dataset: str | None, data_root, warmup_steps: int | None, limit: int | None,
               eval_limit: int | None, progress: bool | None) -> _Data:
    """The training set (with its augmentation), the schedule's length and the evaluation loader."""
    defn, _ = _named_or_path(dataset, data_root)
    if defn.kind != "imagefolder":
        raise CareQError(f"dataset '{dataset}' has no labels and cannot be trained on")
    preprocess = defn.train_preprocess(img_size)
    train_ds = get_dataset(dataset, preprocess, data_root=data_root, limit=limit, seed=seed, train=True,
                           progress=progress)
    n = len(train_ds)
    steps_per_epoch = n // batch_size
    if steps_per_epoch == 0:
        raise CareQError(f"dataset '{dataset}' has {n} images, fewer than the batch size {batch_size}")
    total_steps = steps_per_epoch * epochs
    if warmup_steps is None:
        warmup_steps = min(steps_per_epoch, round(0.05 * total_steps))
    preprocess.architecture, preprocess.num_classes = model, len(train_ds.classes)
    preprocess.label_names = list(train_ds.classes)
    data = _Data(train_ds, preprocess, steps_per_epoch, total_steps, warmup_steps)
    if eval_dataset is not None:
        eval_ds = get_dataset(eval_dataset, preprocess.with_size(img_size), data_root=data_root,
                              limit=eval_limit, seed=seed, progress=progress)
        check_classes(eval_ds, len(train_ds.classes), train_ds.classes, what=f"training set '{dataset}'")
        data.eval_loader = make_loader(eval_ds, batch_size=max(batch_size, 64), workers=workers)
    return data


@dataclass
class _Run:
    """One training run: the model, optimizer and schedule, where it is, and where it writes."""

    net: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    config: dict
    out: Path
    checkpoint: Path
    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    seen: int = 0        # images trained on in this call, for images_per_s
    busy: float = 0.0    # seconds spent on them
    loss_avg: float | None = None

    @property
    def last(self) -> Path:
        return self.out / "last.pt"

    @property
    def log_path(self) -> Path:
        return self.out / "train_log.txt"

    def save_last(self) -> None:
        atomic_torch_save({"model": self.net.state_dict(), "optimizer": self.opt.state_dict(),
                           "scheduler": self.sched.state_dict(), "epoch": self.epoch,
                           "step_in_epoch": self.step_in_epoch, "step": self.step, "rng": rng_state(),
                           "config": self.config, "history": self.history}, self.last)

    def append_log(self, line: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(line + "\n")


def _start_run(model: str, data: _Data, config: dict, out: Path, checkpoint: Path, lr: float,
               weight_decay: float, seed: int, resume: bool, log) -> _Run:
    """A fresh run (seeded model, AdamW, warmup + cosine) in an empty ``out``, or the one in
    ``out/last.pt`` restored (weights, optimizer, schedule, position, history, RNG state)."""
    torch.manual_seed(seed)
    net = create_model(model, num_classes=len(data.classes))
    opt = torch.optim.AdamW(_param_groups(net, weight_decay), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(data.warmup_steps, data.total_steps))
    run = _Run(net, opt, sched, config, out, checkpoint)
    if resume:
        state = load_resume_state(run.last, config, RESUME_KEYS, out)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        run.epoch, run.step_in_epoch, run.step = state["epoch"], state["step_in_epoch"], state["step"]
        run.history = list(state.get("history", []))
        set_rng_state(state.get("rng", {}))
        log(f"resuming {out} at epoch {run.epoch + 1}, step {run.step}/{data.total_steps}")
    else:
        if run.last.exists():
            raise CareQError(f"{out} already holds a training run ({run.last.name}); pass --resume to "
                             f"continue it, or choose another --out")
        out.mkdir(parents=True, exist_ok=True)
    return run


def _train_epoch(run: _Run, data: _Data, crit: nn.Module, epochs: int, batch_size: int, workers: int,
                 seed: int, max_steps: int | None, save_every: int, progress: bool | None) -> tuple[int, float, bool]:
    """Train the rest of epoch ``run.epoch`` (from ``run.step_in_epoch``); stop early at ``max_steps``.
    Returns (images, seconds, stopped); ``run.loss_avg`` is this epoch's mean loss."""
    spe = data.steps_per_epoch
    data.train_ds.set_epoch(run.epoch)
    order = _epoch_order(len(data.train_ds), seed, run.epoch)[run.step_in_epoch * batch_size: spe * batch_size]
    loader = make_loader(data.train_ds, batch_size, workers=workers, sampler=order, drop_last=True)
    run.net.train()
    loss_sum, loss_n, stopped = 0.0, 0, False
    t0 = time.perf_counter()
    with progress_bar(f"epoch {run.epoch + 1}/{epochs}", spe, enabled=progress) as advance:
        advance(run.step_in_epoch)
        for x, y in loader:
            out_logits, dist_logits = run.net(x)
            loss = (crit(out_logits, y) + crit(dist_logits, y)) / 2
            if not torch.isfinite(loss):
                raise CareQError(f"training diverged at step {run.step + 1} (loss {float(loss)}); "
                                 f"try a lower --lr")
            run.opt.zero_grad(set_to_none=True)
            loss.backward()
            run.opt.step()
            run.sched.step()
            run.step += 1
            run.step_in_epoch += 1
            loss_sum += float(loss.detach()) * x.shape[0]
            loss_n += x.shape[0]
            advance(1, loss=loss_sum / loss_n, lr=run.sched.get_last_lr()[0])
            if max_steps is not None and run.step >= max_steps and run.step_in_epoch < spe:
                stopped = True
                break
            if save_every and run.step % save_every == 0 and run.step_in_epoch < spe:
                run.save_last()
    dt = time.perf_counter() - t0
    run.seen += loss_n
    run.busy += dt
    run.loss_avg = loss_sum / max(loss_n, 1)
    return loss_n, dt, stopped


def _stop_mid_epoch(run: _Run, data: _Data, max_steps: int, log) -> None:
    """``max_steps`` reached inside an epoch: save everything ``resume`` needs and say so."""
    run.save_last()
    save_checkpoint(run.net, run.checkpoint, data.preprocess)
    log(f"stopped at step {run.step} (--max-steps {max_steps}), epoch {run.epoch + 1} step "
        f"{run.step_in_epoch}/{data.steps_per_epoch}; continue with --resume")
    run.append_log(f"stopped epoch {run.epoch + 1} step {run.step} train_loss {run.loss_avg:.4f}")


def _end_epoch(run: _Run, data: _Data, images: int, seconds: float, progress: bool | None, log) -> None:
    """A finished epoch: evaluate, record it in the history, write the checkpoint, last.pt and the log."""
    top1 = (evaluate_top1(run.net, data.eval_loader, progress, f"eval {run.epoch + 1}")
            if data.eval_loader else None)
    run.epoch += 1
    run.step_in_epoch = 0
    rec = {"epoch": run.epoch, "step": run.step, "train_loss": round(run.loss_avg, 5),
           "images_per_s": round(images / seconds, 2) if seconds > 0 else None}
    if top1 is not None:
        rec["test_top1"] = round(top1, 2)
    run.history.append(rec)
    save_checkpoint(run.net, run.checkpoint, data.preprocess)
    run.save_last()
    line = f"epoch {run.epoch} step {run.step} train_loss {run.loss_avg:.4f}"
    if top1 is not None:
        line += f" test_top1 {top1:.2f}"
    line += f" img/s {rec['images_per_s']}"
    run.append_log(line)
    log(line)


def train(model: str = "care_s0", dataset: str = "cifar10_train", img_size: int = 64, epochs: int = 10,
          out: str | Path = "out/train", batch_size: int = 128, lr: float = 1e-3,
          weight_decay: float = 0.05, workers: int = 0, resume: bool = False,
          max_steps: int | None = None, seed: int = 0, eval_dataset: str | None = None,
          data_root: str | Path | None = None, label_smoothing: float = 0.1,
          warmup_steps: int | None = None, save_every: int = 200, limit: int | None = None,
          eval_limit: int | None = None, progress: bool | None = None, log=print) -> TrainResult:
    """Train ``model`` from scratch on ``dataset``; see the module docstring for outputs.

    ``warmup_steps`` defaults to 5% of all steps, at most one epoch. ``limit`` / ``eval_limit``
    train / evaluate on a stratified subset. ``log`` receives one line per epoch and event.
    """
    _check_settings(model, epochs, batch_size, img_size, lr, weight_decay, label_smoothing, max_steps)
    out = Path(out)
    data = _load_data(model, dataset, img_size, epochs, batch_size, workers, seed, eval_dataset, data_root,
                      warmup_steps, limit, eval_limit, progress)
    config = {"model": model, "dataset": str(dataset), "dataset_path": str(data.train_ds.root),
              "img_size": int(img_size), "epochs": int(epochs), "batch_size": int(batch_size),
              "lr": float(lr), "weight_decay": float(weight_decay),
              "label_smoothing": float(label_smoothing), "warmup_steps": int(data.warmup_steps),
              "seed": int(seed), "limit": limit, "num_classes": len(data.classes)}
    checkpoint = out / f"{model}_{dataset_tag(dataset)}_{img_size}.pth"
    run = _start_run(model, data, config, out, checkpoint, lr, weight_decay, seed, resume, log)
    run.append_log(f"# {'resume' if resume else 'start'} {time.strftime('%Y-%m-%d %H:%M:%S')} "
                   + " ".join(f"{k}={v}" for k, v in config.items()))
    crit = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    while run.epoch < epochs:
        images, seconds, stopped = _train_epoch(run, data, crit, epochs, batch_size, workers, seed, max_steps,
                                                save_every, progress)
        if stopped:
            _stop_mid_epoch(run, data, max_steps, log)
            break
        _end_epoch(run, data, images, seconds, progress, log)
        if max_steps is not None and run.step >= max_steps and run.epoch < epochs:
            log(f"stopped at step {run.step} (--max-steps {max_steps}); continue with --resume")
            break
    if not run.checkpoint.exists():
        save_checkpoint(run.net, run.checkpoint, data.preprocess)  # resumed a finished run whose .pth is gone
    last_top1 = next((h["test_top1"] for h in reversed(run.history) if "test_top1" in h), None)
    return TrainResult(checkpoint=run.checkpoint, last=run.last, log=run.log_path, step=run.step, epoch=run.epoch,
                       total_steps=data.total_steps, finished=run.epoch >= epochs, train_loss=run.loss_avg,
                       test_top1=last_top1, images_per_s=(run.seen / run.busy) if run.busy > 0 else None,
                       history=run.history)
