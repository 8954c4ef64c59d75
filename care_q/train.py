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

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from care_q.errors import CareQError
from care_q.utils.io import atomic_torch_save, load_resume_state

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


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    return f


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g).tolist()


@torch.no_grad()
def evaluate_top1(model: nn.Module, loader, progress: bool | None = None,
                  description: str = "eval") -> float:
    """Top-1 accuracy (percent) of the model in eval mode (both heads averaged)."""
    from care_q.data.datasets import track

    was = model.training
    model.eval()
    correct = total = 0
    try:
        for x, y in track(loader, description, enabled=progress):
            correct += int((model(x).argmax(dim=1) == y).sum())
            total += int(y.numel())
    finally:
        model.train(was)
    return 100.0 * correct / max(total, 1)


def rng_state() -> dict:
    """The random state a resumable run checkpoints (torch and Python's)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        v, internal, gauss = state["python"]
        random.setstate((v, tuple(internal), gauss))


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
    from care_q.data.datasets import (
        _named_or_path,
        check_classes,
        dataset_tag,
        get_dataset,
        make_loader,
        progress_bar,
    )
    from care_q.models import CARE_CONFIGS, create_model, save_checkpoint

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
    out = Path(out)
    defn, _ = _named_or_path(dataset, data_root)
    if defn.kind != "imagefolder":
        raise CareQError(f"dataset '{dataset}' has no labels and cannot be trained on")
    preprocess = defn.train_preprocess(img_size)
    train_ds = get_dataset(dataset, preprocess, data_root=data_root, limit=limit, seed=seed, train=True,
                           progress=progress)
    num_classes = len(train_ds.classes)
    n = len(train_ds)
    steps_per_epoch = n // batch_size
    if steps_per_epoch == 0:
        raise CareQError(f"dataset '{dataset}' has {n} images, fewer than the batch size {batch_size}")
    total_steps = steps_per_epoch * epochs
    if warmup_steps is None:
        warmup_steps = min(steps_per_epoch, round(0.05 * total_steps))
    preprocess.architecture, preprocess.num_classes = model, num_classes
    preprocess.label_names = list(train_ds.classes)

    eval_loader = None
    if eval_dataset is not None:
        eval_ds = get_dataset(eval_dataset, preprocess.with_size(img_size), data_root=data_root,
                              limit=eval_limit, seed=seed, progress=progress)
        check_classes(eval_ds, num_classes, train_ds.classes, what=f"training set '{dataset}'")
        eval_loader = make_loader(eval_ds, batch_size=max(batch_size, 64), workers=workers)

    config = {"model": model, "dataset": str(dataset), "dataset_path": str(train_ds.root),
              "img_size": int(img_size), "epochs": int(epochs), "batch_size": int(batch_size),
              "lr": float(lr), "weight_decay": float(weight_decay),
              "label_smoothing": float(label_smoothing), "warmup_steps": int(warmup_steps),
              "seed": int(seed), "limit": limit, "num_classes": num_classes}

    torch.manual_seed(seed)
    net = create_model(model, num_classes=num_classes)
    opt = torch.optim.AdamW(_param_groups(net, weight_decay), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(warmup_steps, total_steps))
    epoch, step_in_epoch, step = 0, 0, 0
    history: list[dict] = []
    last_path = out / "last.pt"
    ckpt_path = out / f"{model}_{dataset_tag(dataset)}_{img_size}.pth"
    log_path = out / "train_log.txt"

    if resume:
        state = load_resume_state(last_path, config, RESUME_KEYS, out)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        epoch, step_in_epoch, step = state["epoch"], state["step_in_epoch"], state["step"]
        history = list(state.get("history", []))
        set_rng_state(state.get("rng", {}))
        log(f"resuming {out} at epoch {epoch + 1}, step {step}/{total_steps}")
    else:
        if last_path.exists():
            raise CareQError(f"{out} already holds a training run ({last_path.name}); pass --resume to "
                             f"continue it, or choose another --out")
        out.mkdir(parents=True, exist_ok=True)

    def save_last():
        atomic_torch_save({"model": net.state_dict(), "optimizer": opt.state_dict(),
                           "scheduler": sched.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch,
                           "step": step, "rng": rng_state(), "config": config, "history": history},
                          last_path)

    def append_log(line: str):
        with open(log_path, "a") as f:
            f.write(line + "\n")

    append_log(f"# {'resume' if resume else 'start'} {time.strftime('%Y-%m-%d %H:%M:%S')} "
               + " ".join(f"{k}={v}" for k, v in config.items()))
    crit = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    stopped = False
    loss_avg = None
    seen, busy = 0, 0.0
    while epoch < epochs and not stopped:
        train_ds.set_epoch(epoch)
        order = _epoch_order(n, seed, epoch)[step_in_epoch * batch_size: steps_per_epoch * batch_size]
        loader = make_loader(train_ds, batch_size, workers=workers, sampler=order, drop_last=True)
        net.train()
        loss_sum, loss_n = 0.0, 0
        t0 = time.perf_counter()
        with progress_bar(f"epoch {epoch + 1}/{epochs}", steps_per_epoch, enabled=progress) as advance:
            advance(step_in_epoch)
            for x, y in loader:
                out_logits, dist_logits = net(x)
                loss = (crit(out_logits, y) + crit(dist_logits, y)) / 2
                if not torch.isfinite(loss):
                    raise CareQError(f"training diverged at step {step + 1} (loss {float(loss)}); "
                                     f"try a lower --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                step_in_epoch += 1
                loss_sum += float(loss.detach()) * x.shape[0]
                loss_n += x.shape[0]
                advance(1, loss=loss_sum / loss_n, lr=sched.get_last_lr()[0])
                if max_steps is not None and step >= max_steps and step_in_epoch < steps_per_epoch:
                    stopped = True
                    break
                if save_every and step % save_every == 0 and step_in_epoch < steps_per_epoch:
                    save_last()
        dt = time.perf_counter() - t0
        seen += loss_n
        busy += dt
        loss_avg = loss_sum / max(loss_n, 1)
        if stopped:
            save_last()
            save_checkpoint(net, ckpt_path, preprocess)
            log(f"stopped at step {step} (--max-steps {max_steps}), epoch {epoch + 1} step "
                f"{step_in_epoch}/{steps_per_epoch}; continue with --resume")
            append_log(f"stopped epoch {epoch + 1} step {step} train_loss {loss_avg:.4f}")
            break
        top1 = evaluate_top1(net, eval_loader, progress, f"eval {epoch + 1}") if eval_loader else None
        epoch += 1
        step_in_epoch = 0
        rec = {"epoch": epoch, "step": step, "train_loss": round(loss_avg, 5),
               "images_per_s": round(loss_n / dt, 2) if dt > 0 else None}
        if top1 is not None:
            rec["test_top1"] = round(top1, 2)
        history.append(rec)
        save_checkpoint(net, ckpt_path, preprocess)
        save_last()
        line = f"epoch {epoch} step {step} train_loss {loss_avg:.4f}"
        if top1 is not None:
            line += f" test_top1 {top1:.2f}"
        line += f" img/s {rec['images_per_s']}"
        append_log(line)
        log(line)
        if max_steps is not None and step >= max_steps and epoch < epochs:
            stopped = True
            log(f"stopped at step {step} (--max-steps {max_steps}); continue with --resume")
    if not ckpt_path.exists():
        save_checkpoint(net, ckpt_path, preprocess)  # resumed a finished run whose .pth is gone
    last_top1 = next((h["test_top1"] for h in reversed(history) if "test_top1" in h), None)
    return TrainResult(checkpoint=ckpt_path, last=last_path, log=log_path, step=step, epoch=epoch,
                       total_steps=total_steps, finished=epoch >= epochs, train_loss=loss_avg,
                       test_top1=last_top1, images_per_s=(seen / busy) if busy > 0 else None,
                       history=history)
