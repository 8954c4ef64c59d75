"""Quantization-aware training: `care_q.qat.qat(...)`, the API behind `care-q qat`.

Pipeline: checkpoint -> deploy form (BatchNorms folded; ``gelu: sigmoid`` substituted) -> traced
graph -> plan from the (QAT) recipe -> PTQ calibration of that plan, so QAT starts where PTQ of
the same recipe ends -> fine-tuning of the fake-quant model (`QATOps`: straight-through
rounding, int4 weights where the recipe says, LSQ scales when ``qat.learn_scales``) with
distillation from the FP32 model -> learnt scales written into the plan, int4 weights baked ->
the PTQ exporters (int8 TFLite, QDQ ONNX), each artifact verified in its runtime against the
fake-quant model -> report.json + report.md.

Loss: ``ce_weight * CE(student, labels) + distill_weight * T^2 * KL(teacher_T || student_T)``,
logits softened by the temperature T; the teacher is the FP32 deploy form of the same checkpoint.

BatchNorm (``qat.freeze_bn``): the deploy form has every BN folded into its conv, so QAT trains
the folded weights and biases directly; the BN statistics are frozen into them (``true``, the
only mode: re-estimating BN statistics would need the unfolded model, whose fake-quant graph is
not what the exporters emit).

Optimisation: AdamW (weight decay on conv/linear weights only), per-step schedule over all
steps (``schedule``: cosine to zero or constant, after ``warmup_steps`` of linear warmup).
``epochs`` may be fractional; ``max_steps`` stops the run after that many steps in all without
changing the schedule (a pause: ``resume`` continues it, and the result is that of one
uninterrupted run).

Checkpoints (``OUT/last.pt``, atomic, rank 0): student weights and learnt scales, the plan's
calibrated parameters, optimizer, scheduler, epoch/step, RNG states, history, baseline
accuracies; written after every epoch, every ``checkpoint_every`` steps and when ``max_steps``
stops the run. ``resume`` after any interruption (``kill -9`` included) loses at most the steps
since the last checkpoint: the data order comes from (seed, epoch) and each sample's
augmentation from (seed, epoch, index), so the resumed run is the uninterrupted one.

Scale-out: under ``torchrun --nproc_per_node=K`` the model is wrapped in DDP (gloo on CPU, NCCL
on GPU), each rank trains on its `DistributedSampler` shard with per-rank batch
``batch_size / K`` (``batch_size`` is the global batch), and only rank 0 writes (checkpoints,
evaluation, artifacts, report). See `care_q.qat.distributed`.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from care_q.errors import CareQError
from care_q.graph.trace import trace
from care_q.models import create_model, load_sidecar
from care_q.qat.distributed import Dist
from care_q.qat.ops import QATNet, bake_int4_weights, qparams_from_state, qparams_to_state, weight_bits_of
from care_q.quant.calibrate import calibrate
from care_q.quant.fakequant import QuantOps
from care_q.quant.plan import build_plan
from care_q.quant.recipe import Recipe, load_recipe
from care_q.train import rng_state as _rng_state
from care_q.train import set_rng_state as _set_rng_state
from care_q.transforms import deploy
from care_q.transforms.substitute import apply_substitutions
from care_q.utils.io import atomic_torch_save, atomic_write_json, atomic_write_text, load_resume_state

MIN_AGREEMENT = 0.99
TARGET_AGREEMENT = 0.995  # the target, reported next to the measured agreement
# Settings that must match for --resume to continue a run (the others may change).
RESUME_KEYS = ("model", "weights", "dataset", "dataset_path", "recipe", "img_size", "epochs", "global_batch",
               "lr", "seed", "limit", "calib", "calib_images", "total_steps")


def _artifact_names(model: str, rec: Recipe) -> dict[str, str]:
    return {"tflite": f"{model}_{rec.name}.tflite", "onnx": f"{model}_{rec.name}_qdq.onnx"}


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, ce_weight: float,
                 distill_weight: float, temperature: float) -> tuple[torch.Tensor, float, float]:
    """(loss, CE, KL): ``ce_weight * CE + distill_weight * T^2 * KL(softmax(t/T) || softmax(s/T))``."""
    ce = F.cross_entropy(student, labels)
    t = float(temperature)
    kd = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1), reduction="batchmean",
                  log_target=True) * (t * t)
    return ce_weight * ce + distill_weight * kd, float(ce.detach()), float(kd.detach())


def _lr_lambda(warmup: int, total: int, schedule: str):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    return f


@torch.no_grad()
def top1(forward, loader, device, description: str = "eval", progress: bool | None = None,
         ) -> tuple[float, torch.Tensor]:
    """(top-1 accuracy in percent, predicted classes) of ``forward(x) -> logits`` over a loader of (x, y)."""
    from care_q.data import track

    preds, labels = [], []
    for x, y in track(loader, description, enabled=progress):
        preds.append(forward(x.to(device)).argmax(1).cpu())
        labels.append(y)
    p, y = torch.cat(preds), torch.cat(labels)
    return 100.0 * float((p == y).double().mean()), p


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Percent of images where two models predict the same class."""
    return 100.0 * float((a == b).double().mean())


def _recipe_key(rec: Recipe) -> dict:
    """What a run was trained under: the recipe's content without its path, checkpoint interval
    and export-only settings (``tflite``: which TFLite kernel runs a conv; a finished run can be
    exported again under a changed one)."""
    j = _without_source("recipe", training_content(rec))  # the content decides, not where the file lies
    j.get("qat", {}).pop("checkpoint_every", None)  # may change between a run and its resume
    return j


EXPORT_ONLY = ("tflite",)  # recipe sections that change what is exported, not what is trained


def training_content(rec: Recipe) -> dict:
    """``rec.to_json()`` without the export-only settings."""
    return {k: v for k, v in rec.to_json().items() if k not in EXPORT_ONLY}


def export_content(rec: Recipe) -> dict:
    """The export-only settings of ``rec.to_json()`` (what `training_content` leaves out)."""
    return {k: v for k, v in rec.to_json().items() if k in EXPORT_ONLY}


def _device_name(dev: torch.device) -> str:
    """Where an epoch ran, for the training log: 'cpu', or 'cuda (GPU name)'."""
    return f"cuda ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else dev.type


def _without_source(key: str, value):
    """A recipe's key without its file path (a moved checkout resumes; so do checkpoints written
    while the key still held the path)."""
    return {k: v for k, v in value.items() if k != "source"} if key == "recipe" and isinstance(value, dict) else value


def _check_recipe(rec: Recipe) -> None:
    if rec.kind != "qat" or rec.qat is None:
        raise CareQError(f"recipe '{rec.name}' ({rec.source}) is a {rec.kind} recipe; care-q qat needs a QAT "
                         f"recipe (kind: qat, with a 'qat' section), e.g. qat_int8, qat_int8_full, qat_w4a8_mlp")
    q = rec.qat
    if not q.freeze_bn:
        raise CareQError(f"{rec.source}: qat.freeze_bn: false is not supported: QAT trains the deploy form, whose "
                         f"BatchNorms are folded into the convs (their statistics frozen into the weights); "
                         f"set freeze_bn: true")
    for key, value in (("epochs", q.epochs), ("lr", q.lr), ("batch_size", q.batch_size),
                       ("temperature", q.temperature)):
        if value <= 0:
            raise CareQError(f"{rec.source}: qat.{key} must be positive, got {value}")
    for key, value in (("weight_decay", q.weight_decay), ("distill_weight", q.distill_weight),
                       ("ce_weight", q.ce_weight), ("warmup_steps", q.warmup_steps),
                       ("checkpoint_every", q.checkpoint_every)):
        if value < 0:
            raise CareQError(f"{rec.source}: qat.{key} must be >= 0, got {value}")
    if q.ce_weight == 0 and q.distill_weight == 0:
        raise CareQError(f"{rec.source}: qat.ce_weight and qat.distill_weight are both 0: nothing to train on")
    if q.scale_lr is not None and q.scale_lr <= 0:
        raise CareQError(f"{rec.source}: qat.scale_lr must be positive, got {q.scale_lr}")


def build_student(net, rec: Recipe, size: int, calib: torch.Tensor | None = None):
    """(teacher, student, plan, weight bits): the FP32 deploy form, the deploy form QAT trains (with the
    recipe's substitutions; ``calib`` images initialise the NPU attention's output scales), the recipe's
    plan traced on the student (uncalibrated), conv -> weight bits."""
    teacher = deploy(net)
    student, _ = apply_substitutions(deploy(net), rec, calib)  # deploy() builds new modules: independent
    plan = build_plan(trace(student, torch.zeros(1, 3, size, size)), rec)
    return teacher.eval(), student, plan, weight_bits_of(plan)


@dataclass
class QATRun:
    """A QAT checkpoint loaded back: the trained fake-quant model and its FP32 teacher."""

    qnet: QATNet
    teacher: torch.nn.Module
    config: dict
    step: int


def load_qat(checkpoint: str | Path) -> QATRun:
    """Rebuild the fake-quant model of a QAT checkpoint (``OUT/last.pt`` or ``OUT/start.pt``).

    The model, weights and recipe are read from the checkpoint's config (the recipe from its source
    file). ``qnet(x)`` is the model as trained (learnt scales not yet written back).
    """
    path = Path(checkpoint)
    if not path.exists():
        raise CareQError(f"QAT checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    cfg = state["config"]
    saved = _without_source("recipe", cfg["recipe"])  # older checkpoints keep the path in it
    source = cfg.get("recipe_source") or cfg["recipe"].get("source")
    rec = load_recipe(source if source and Path(source).exists() else saved["name"])  # else: moved, by name
    if _recipe_key(rec) != saved:
        raise CareQError(f"{path}: recipe {rec.source} changed since the run was started")
    net = create_model(cfg["model"], weights=cfg["weights"])
    teacher, student, plan, bits = build_student(net, rec, cfg["img_size"])
    qparams_from_state(plan, state["plan"])
    qnet = QATNet(student, plan, bits, rec.qat.learn_scales)
    qnet.load_state_dict(state["model"])
    return QATRun(qnet, teacher, cfg, int(state["step"]))


def qat(model: str, weights: str | Path | None, dataset: str, *, recipe: str | Path = "qat_int8",
        epochs: float | None = None, max_steps: int | None = None, lr: float | None = None,
        batch_size: int | None = None, out: str | Path = "out/qat", resume: bool = False,
        calib: str | None = None, calib_images: int | None = 1000, data_root: str | Path | None = None,
        seed: int = 0, eval_dataset: str | None = None, eval_limit: int | None = None, num_verify: int = 200,
        targets: list[str] | None = None, io: str | None = None, img_size: int | None = None,
        limit: int | None = None, workers: int = 0, threads: int = 2, checkpoint_every: int | None = None,
        min_agreement: float = MIN_AGREEMENT, device: str = "auto", progress: bool | None = None,
        log=print) -> dict:
    """Fine-tune a CARE checkpoint with quantization in the loop; export and verify. Returns the report.

    ``dataset``: labelled training set (named or ImageFolder path) whose classes must match the
    checkpoint's head; ``calib`` (default ``dataset``) with ``calib_images`` images calibrates the
    starting plan; ``eval_dataset`` (``eval_limit`` images) measures FP32 / PTQ / QAT top-1;
    ``num_verify`` held-out images verify the artifacts (from ``eval_dataset`` when given).
    ``epochs``, ``lr``, ``batch_size`` (global), ``checkpoint_every`` override the recipe's
    ``qat`` section. ``targets=[]`` trains without exporting. When ``max_steps`` stops the run
    before its end, nothing is evaluated or exported (``report["finished"]`` is False).

    Every input problem (a recipe that is not a QAT recipe, weights of another architecture, a
    dataset whose classes do not match the checkpoint, ...) is a CareQError before training.
    """
    rec = load_recipe(recipe)
    _check_recipe(rec)
    q = rec.qat
    epochs = float(q.epochs if epochs is None else epochs)
    lr = float(q.lr if lr is None else lr)
    batch_size = int(q.batch_size if batch_size is None else batch_size)
    checkpoint_every = int(q.checkpoint_every if checkpoint_every is None else checkpoint_every)
    if epochs <= 0 or lr <= 0 or batch_size < 1:
        raise CareQError(f"need epochs > 0, lr > 0 and batch_size >= 1 (got epochs={epochs}, lr={lr}, "
                         f"batch_size={batch_size})")
    if max_steps is not None and max_steps < 1:
        raise CareQError(f"max_steps must be positive, got {max_steps}")
    if checkpoint_every < 0:
        raise CareQError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    targets = list(rec.targets if targets is None else targets)
    bad = [t for t in targets if t not in rec.targets]
    if bad:
        raise CareQError(f"recipe '{rec.name}' cannot honour target(s) {bad}: it supports {list(rec.targets)}")
    io = io or rec.io
    if io not in ("float", "int8"):
        raise CareQError(f"io {io!r}: supported are float and int8")
    if io != rec.io and rec.io != "float":
        raise CareQError(f"recipe '{rec.name}' requires io={rec.io}; io={io} contradicts it")
    if weights is None:
        raise CareQError("qat fine-tunes a trained model: give its weights (an official-format checkpoint)")
    dist = Dist.from_env(device)
    try:
        return _run(dist, model=model, weights=Path(weights), dataset=dataset, rec=rec, epochs=epochs,
                    max_steps=max_steps, lr=lr, batch_size=batch_size, out=Path(out), resume=resume,
                    calib=calib or dataset, calib_images=calib_images, data_root=data_root, seed=seed,
                    eval_dataset=eval_dataset, eval_limit=eval_limit, num_verify=num_verify, targets=targets,
                    io=io, img_size=img_size, limit=limit, workers=workers, threads=threads,
                    checkpoint_every=checkpoint_every, min_agreement=min_agreement, progress=progress, log=log)
    finally:
        dist.close()


def _run(dist: Dist, *, model, weights, dataset, rec, epochs, max_steps, lr, batch_size, out, resume, calib,
         calib_images, data_root, seed, eval_dataset, eval_limit, num_verify, targets, io, img_size, limit,
         workers, threads, checkpoint_every, min_agreement, progress, log) -> dict:
    from care_q.data import check_classes, get_dataset, make_loader, progress_bar

    t_start = time.time()
    q = rec.qat
    dev = dist.device
    show = progress if dist.main else False
    log = log if dist.main else (lambda *a, **k: None)
    if batch_size % dist.world:
        raise CareQError(f"the global batch size {batch_size} is not divisible by the {dist.world} processes")
    per_rank = batch_size // dist.world

    # --- inputs, all checked before any training
    net = create_model(model, weights=weights)
    pre = load_sidecar(weights).with_size(img_size)
    size = pre.input_size[1]
    what = f"checkpoint {weights}"
    train_ds = get_dataset(dataset, pre, data_root=data_root, limit=limit, seed=seed, train=True, progress=show)
    check_classes(train_ds, net.num_classes, pre.label_names, what=what)
    eval_ds = None
    if eval_dataset is not None:
        eval_ds = get_dataset(eval_dataset, pre, data_root=data_root, limit=eval_limit, seed=seed, progress=show)
        check_classes(eval_ds, net.num_classes, pre.label_names, what=what)
    cal_ds = get_dataset(calib, pre, data_root=data_root, limit=calib_images, seed=seed, model=net, progress=show)
    n = len(train_ds)
    steps_per_epoch = n // batch_size
    if steps_per_epoch == 0:
        raise CareQError(f"dataset '{dataset}' has {n} images, fewer than the global batch size {batch_size}")
    total_steps = max(1, round(epochs * steps_per_epoch))
    warmup = min(int(q.warmup_steps), total_steps)

    config = {"model": model, "weights": str(weights.resolve()), "dataset": str(dataset),
              "dataset_path": str(train_ds.root), "recipe": _recipe_key(rec), "img_size": int(size),
              "epochs": epochs, "global_batch": batch_size, "lr": lr, "seed": int(seed), "limit": limit,
              "calib": str(calib), "calib_images": calib_images, "total_steps": total_steps,
              "recipe_source": str(rec.source)}  # where the recipe was read (not compared on --resume)
    ckpt_path = out / "last.pt"
    state = None
    if resume:
        state = load_resume_state(ckpt_path, config, RESUME_KEYS, out, normalize=_without_source)
    elif ckpt_path.exists():
        raise CareQError(f"{out} already holds a QAT run ({ckpt_path.name}); pass --resume to continue it, "
                         f"or choose another --out")

    # --- teacher (FP32) and student (the deploy form the exporters emit), plan, PTQ calibration
    first = next(iter(make_loader(cal_ds, rec.batch_size)))[0] if rec.attention == "npu" else None
    teacher, student, plan, bits = build_student(net, rec, size, first)
    notes: list[str] = []
    if rec.gelu == "sigmoid":
        notes.append("GELU substituted by x*sigmoid(1.702x) in the student; the teacher keeps the exact GELU")
    if rec.attention == "npu":
        notes.append("linear attention in its NPU form in the student (relu + sigmoid kernel, MUL + MEAN products, "
                     "L2-normalised output); the teacher keeps the exact attention")
    n_int4 = sum(1 for b in bits.values() if b == 4)
    if n_int4:
        notes.append(f"{n_int4} of {len(bits)} convs have int4 weights (15 levels per channel, simulated in fake "
                     f"quantization, stored as int8 containers in the artifacts)")
    t0 = time.time()
    if state is not None:
        qparams_from_state(plan, state["plan"])
        n_cal = state.get("calibration_images")
        t_cal = state.get("calibration_seconds")
    else:
        n_cal = calibrate(plan, student, make_loader(cal_ds, rec.batch_size), progress=show)
        t_cal = round(time.time() - t0, 1)
    qnet = QATNet(student, plan, bits, q.learn_scales)
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.to(dev)
    qnet.to(dev)

    def eval_loader(ds):
        return make_loader(ds, batch_size=max(per_rank, 64), workers=workers)

    baseline = dict(state.get("baseline", {})) if state is not None else {}
    fp32_preds = state.get("fp32_preds") if state is not None else None
    # Before the trained weights are loaded, qnet is the PTQ starting point (calibrated plan, original
    # weights): a fresh run, or a resumed one that was started without this eval set, measures it here.
    if eval_ds is not None and "fp32_top1" not in baseline and dist.main:
        qnet.eval()
        baseline["fp32_top1"], fp32_preds = top1(teacher, eval_loader(eval_ds), dev, "eval fp32", show)
        baseline["ptq_top1"], ptq_preds = top1(qnet, eval_loader(eval_ds), dev, "eval PTQ (fake-quant)", show)
        baseline["ptq_fp32_agreement"] = _agreement(ptq_preds, fp32_preds)
        log(f"before QAT: FP32 top-1 {baseline['fp32_top1']:.2f}%, PTQ ({rec.name}) top-1 "
            f"{baseline['ptq_top1']:.2f}% on {len(eval_ds)} images (same class as FP32 on "
            f"{baseline['ptq_fp32_agreement']:.2f}%)")
    if state is not None:
        qnet.load_state_dict(state["model"])

    # --- optimisation
    decay = [p for p in qnet.student.parameters() if p.ndim >= 2]
    no_decay = [p for p in qnet.student.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": q.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if qnet.log_scales is not None:
        groups.append({"params": [qnet.log_scales], "weight_decay": 0.0, "lr": q.scale_lr or lr})
    opt = torch.optim.AdamW(groups, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(warmup, total_steps, q.schedule))
    epoch, step_in_epoch, step = 0, 0, 0
    history: list[dict] = []
    ep = {"loss": 0.0, "ce": 0.0, "kd": 0.0, "n": 0, "seconds": 0.0}  # sums over the current epoch
    if state is not None:
        if "optimizer" in state:
            opt.load_state_dict(state["optimizer"])
        elif state["step"] < total_steps:  # a finished run's checkpoint may be slimmed for transfer
            raise CareQError(f"{ckpt_path} has no optimizer state, so its run (step {state['step']} of "
                             f"{total_steps}) cannot continue; only a finished run can be resumed without it")
        sched.load_state_dict(state["scheduler"])
        epoch, step_in_epoch, step = state["epoch"], state["step_in_epoch"], state["step"]
        history = list(state.get("history", []))
        ep.update(state.get("epoch_sums", {}))
        _set_rng_state(state.get("rng", {}))
        if step >= total_steps:
            log(f"{out}: the run finished ({step} steps); evaluating and exporting it again")
        else:
            log(f"resuming {out} at step {step}/{total_steps} (epoch {epoch + 1}, step {step_in_epoch})")
    ddp = qnet
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(qnet, device_ids=[dist.local_rank] if dev.type == "cuda" else None)

    def save() -> None:
        if dist.main:
            atomic_torch_save({"model": qnet.state_dict(), "plan": qparams_to_state(plan),
                               "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch,
                               "step_in_epoch": step_in_epoch, "step": step, "rng": _rng_state(),
                               "config": config, "history": history, "baseline": baseline,
                               "calibration_images": n_cal, "calibration_seconds": t_cal,
                               "epoch_sums": dict(ep), "fp32_preds": fp32_preds}, ckpt_path)

    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    log(f"QAT {model} with recipe {rec.name}: {total_steps} steps ({epochs:g} epochs of {steps_per_epoch}), "
        f"global batch {batch_size} ({dist.world} process(es) x {per_rank}), lr {lr:g}, on {dev}")
    if state is None:
        save()  # the calibrated starting point: a run killed before its first checkpoint resumes from here
        if dist.main:  # kept: the PTQ starting point of this run (`load_qat(OUT/start.pt)`)
            atomic_torch_save({"model": qnet.state_dict(), "plan": qparams_to_state(plan), "config": config,
                               "step": 0}, out / "start.pt")
    stopped = False
    it = None
    train_seconds, train_images = 0.0, 0
    qnet.train()
    with progress_bar(f"QAT {rec.name}", total_steps, enabled=show) as advance:
        advance(step)
        while step < total_steps:
            epoch_steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
            if it is None:
                train_ds.set_epoch(epoch)
                idx = dist.shard(train_ds, epoch, seed, per_rank, step_in_epoch, epoch_steps)
                it = iter(make_loader(train_ds, per_rank, workers=workers, sampler=idx, drop_last=True))
            t_step = time.perf_counter()
            x, y = next(it)
            x, y = x.to(dev), y.to(dev)
            with torch.no_grad():
                t_logits = teacher(x)
            loss, ce, kd = distill_loss(ddp(x), t_logits, y, q.ce_weight, q.distill_weight, q.temperature)
            if not dist.all_ok(bool(torch.isfinite(loss))):
                raise CareQError(f"QAT diverged at step {step + 1} (loss {float(loss)}); try a lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            step_in_epoch += 1
            dt = time.perf_counter() - t_step
            train_seconds += dt
            train_images += batch_size
            for k, v in (("loss", float(loss.detach())), ("ce", ce), ("kd", kd)):
                ep[k] += v
            ep["n"] += 1
            ep["seconds"] += dt
            advance(1, loss=ep["loss"] / ep["n"], lr=sched.get_last_lr()[0])
            if step_in_epoch == epoch_steps:
                rec_ep = {"epoch": epoch + 1, "step": step, "device": _device_name(dev),
                          **{k: round(dist.mean(ep[k] / ep["n"]), 5) for k in ("loss", "ce", "kd")},
                          "seconds": round(ep["seconds"], 1),
                          "images_per_s": round(ep["n"] * batch_size / ep["seconds"], 2) if ep["seconds"] else None}
                history.append(rec_ep)
                log(f"epoch {rec_ep['epoch']} step {step}/{total_steps} loss {rec_ep['loss']:.4f} "
                    f"(ce {rec_ep['ce']:.4f}, kd {rec_ep['kd']:.4f}), {rec_ep['images_per_s']} img/s")
                epoch += 1
                step_in_epoch = 0
                it = None
                ep = {"loss": 0.0, "ce": 0.0, "kd": 0.0, "n": 0, "seconds": 0.0}
                save()
            elif checkpoint_every and step % checkpoint_every == 0:
                save()
            if max_steps is not None and step >= max_steps and step < total_steps:
                if step_in_epoch != 0 and not (checkpoint_every and step % checkpoint_every == 0):
                    save()
                stopped = True
                break
    images_per_s = train_images / train_seconds if train_seconds > 0 else None
    report = {"command": "qat", "model": model, "weights": str(weights), "img_size": size, "recipe": rec.to_json(),
              "io": io, "targets": targets, "dataset": str(dataset), "finished": not stopped,
              "train": {"steps": step, "total_steps": total_steps, "epochs": epochs,
                        "steps_per_epoch": steps_per_epoch, "global_batch": batch_size, "processes": dist.world,
                        "per_process_batch": per_rank, "backend": dist.backend, "device": str(dev), "lr": lr,
                        "this_session_seconds": round(train_seconds, 1),
                        "this_session_images_per_s": round(images_per_s, 2) if images_per_s else None,
                        "history": history},
              "calibration": {"set": str(calib), "images": n_cal, "seconds": t_cal},
              "checkpoint": str(ckpt_path), "notes": notes}
    if stopped:
        log(f"stopped at step {step}/{total_steps} (max_steps {max_steps}); continue with --resume")
        dist.barrier()
        return report
    error = None
    if dist.main:
        try:
            report = _finish(report, qnet, plan, bits, rec, model, out, io, targets, cal_ds, eval_ds, baseline,
                             fp32_preds, eval_dataset, calib, data_root, pre, num_verify, seed, net, threads, min_agreement,
                             show, t_start, log)
        except BaseException as e:  # release the other ranks before failing
            error = e
    dist.barrier()
    if error is not None:
        raise error
    failed = report.get("failed_agreement")
    if failed:
        raise CareQError(failed)
    return report


def _finish(report, qnet, plan, bits, rec, model, out, io, targets, cal_ds, eval_ds, baseline, fp32_preds,
            eval_dataset, calib,
            data_root, pre, num_verify, seed, net, threads, min_agreement, show, t_start, log) -> dict:
    """Rank 0 after training: write back scales, bake int4, evaluate, export, verify, report."""
    from care_q.data import get_dataset, make_loader
    from care_q.ptq import _census, _emit, _verify
    from care_q.quant.observers import HistogramObserver
    from care_q.quant.qtypes import DType, Method, qparams_from_range

    qnet.cpu().eval()
    student = qnet.student
    ratios = qnet.write_back()
    baked = bake_int4_weights(plan, bits)

    def ref_ops():  # the exporters' reference, after the write-back and the baking
        return QuantOps(plan, "quant")

    if io == "int8" and plan.quantized(plan.graph.output):  # int8 head: the logits tensor's own parameters
        plan.output_qparams = plan.qp(plan.graph.output)
    elif io == "int8":  # the logits range of the trained model, for the int8 output
        obs = HistogramObserver("logits")
        with torch.no_grad():
            for x, _ in make_loader(cal_ds, rec.batch_size):
                obs.update(student(x, ref_ops()))
        lo, hi = obs.range(Method.MINMAX, DType.INT8, False)
        plan.output_qparams = qparams_from_range(lo, hi, DType.INT8, False)
    acc = dict(baseline)
    if eval_ds is not None:
        loader = make_loader(eval_ds, batch_size=64)
        acc["qat_top1"], preds = top1(lambda x: student(x, ref_ops()), loader, torch.device("cpu"), "eval QAT", show)
        acc["eval_set"] = {"name": str(getattr(eval_ds, "name", "")), "images": len(eval_ds)}
        msg = f"after QAT: top-1 {acc['qat_top1']:.2f}%"
        if fp32_preds is not None:
            acc["qat_fp32_agreement"] = _agreement(preds, fp32_preds)
            msg += f", same class as FP32 on {acc['qat_fp32_agreement']:.2f}%"
        if "fp32_top1" in acc:
            msg += (f" (FP32 {acc['fp32_top1']:.2f}%, PTQ {acc['ptq_top1']:.2f}%: "
                    f"{acc['qat_top1'] - acc['fp32_top1']:+.2f} pt vs FP32)")
        log(msg)
    report["accuracy"] = acc
    if ratios:
        r = torch.tensor(list(ratios.values()), dtype=torch.float64)
        report["learnt_scales"] = {"groups": len(ratios), "ratio_to_calibrated": {
            "min": float(r.min()), "median": float(r.median()), "max": float(r.max())}}
    report["int4_convs"] = baked

    # --- verification images: held out from training (the eval set when given)
    src = eval_dataset if eval_dataset is not None else calib
    if targets:
        vds = get_dataset(src, pre, data_root=data_root, limit=num_verify, seed=seed + 1, model=net, progress=show)
        xv = torch.cat([b[0] for b in make_loader(vds, 50)])[:num_verify]
    artifacts = {}
    names = _artifact_names(model, rec)
    for t in targets:
        path = out / names[t]
        _emit(t, plan, io, path, preprocess=pre, model_name=model)
        v = _verify(path, student, plan, xv.numpy(), threads)
        artifacts[t] = {"path": str(path), "size_bytes": path.stat().st_size, "verification": v,
                        "census": _census(path)}
        log(f"{t}: {path} ({path.stat().st_size / 1e6:.2f} MB), top-1 agreement with the fake-quant model "
            f"{100 * v['top1_agreement']:.1f}% on {v['images']} images")
    report.update({"artifacts": artifacts,
                   "verification_images": {"set": str(src), "images": int(xv.shape[0]) if targets else 0},
                   "min_agreement": min_agreement, "target_agreement": TARGET_AGREEMENT,
                   "tensors": plan.to_json(),
                   "machine": {"platform": platform.platform(), "python": platform.python_version(),
                               "torch": torch.__version__},
                   "seconds": round(time.time() - t_start, 1)})
    atomic_write_json(report, out / "report.json")
    atomic_write_text(render_markdown(report), out / "report.md")
    failed = {t: a["verification"]["top1_agreement"] for t, a in artifacts.items()
              if a["verification"]["top1_agreement"] < min_agreement}
    if failed:
        report["failed_agreement"] = (
            "artifact(s) disagree with the fake-quant reference: "
            + ", ".join(f"{t} {100 * v:.1f}% top-1 agreement" for t, v in failed.items())
            + f" (< {100 * min_agreement:.1f}%); see {out / 'report.md'}")
    return report


def render_markdown(r: dict) -> str:
    t = r["train"]
    L = [f"# care-q QAT report: {r['model']} ({r['img_size']}x{r['img_size']}), recipe `{r['recipe']['name']}`", "",
         f"- recipe: `{r['recipe']['name']}` ({r['recipe']['source']}), io: {r['io']}",
         f"- weights: {r['weights']}; training set: `{r['dataset']}`",
         f"- start: PTQ calibration of the same recipe on `{r['calibration']['set']}`, "
         f"{r['calibration']['images']} images",
         f"- training: {t['steps']} steps ({t['epochs']:g} epochs of {t['steps_per_epoch']}), global batch "
         f"{t['global_batch']} = {t['processes']} process(es) x {t['per_process_batch']}, lr {t['lr']:g}, "
         f"device {t['device']}" + (f", backend {t['backend']}" if t["backend"] else ""),
         f"- throughput (this session): {t['this_session_images_per_s']} img/s over "
         f"{t['this_session_seconds']} s of training steps",
         f"- total time: {r.get('seconds')} s", ""]
    for n in r["notes"]:
        L.append(f"> note: {n}")
    acc = r.get("accuracy", {})
    if "qat_top1" in acc:
        L += ["", f"## Top-1 on `{acc['eval_set']['name']}` ({acc['eval_set']['images']} images)", "",
              "| model | top-1 | vs FP32 | same class as FP32 |", "|---|---:|---:|---:|"]
        fp = acc.get("fp32_top1")
        for label, key, agree in (("FP32 (teacher)", "fp32_top1", None),
                                  ("PTQ, same recipe (fake-quant)", "ptq_top1", "ptq_fp32_agreement"),
                                  ("QAT (fake-quant = exported graph)", "qat_top1", "qat_fp32_agreement")):
            if key in acc:
                d = f"{acc[key] - fp:+.2f} pt" if fp is not None else ""
                a = f"{acc[agree]:.2f}%" if agree in acc else ""
                L.append(f"| {label} | {acc[key]:.2f}% | {d} | {a} |")
    if t["history"]:
        L += ["", "## Training", "", "| epoch | step | loss | CE | KL | s | img/s |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for h in t["history"]:
            L.append(f"| {h['epoch']} | {h['step']} | {h['loss']:.4f} | {h['ce']:.4f} | {h['kd']:.4f} | "
                     f"{h['seconds']} | {h['images_per_s']} |")
    if "learnt_scales" in r:
        ls = r["learnt_scales"]
        rt = ls["ratio_to_calibrated"]
        L += ["", f"Learnt activation scales (LSQ): {ls['groups']} groups, learnt/calibrated ratio min "
                  f"{rt['min']:.3f}, median {rt['median']:.3f}, max {rt['max']:.3f}."]
    if r.get("artifacts"):
        L += ["", "## Artifacts, verified in their runtimes against the fake-quant model", "",
              f"Verification images: `{r['verification_images']['set']}` ({r['verification_images']['images']}, "
              f"not used for training). Target agreement {100 * r['target_agreement']:.1f}%.", "",
              "| target | file | size (MB) | top-1 agreement | logit SQNR (dB) | max abs diff |",
              "|---|---|---:|---:|---:|---:|"]
        for tg, a in r["artifacts"].items():
            v = a["verification"]
            L.append(f"| {tg} | `{Path(a['path']).name}` | {a['size_bytes'] / 1e6:.2f} | "
                     f"{100 * v['top1_agreement']:.1f}% | {v['logit_sqnr_db']:.1f} | {v['max_abs_diff']:.3g} |")
        L += ["", "## Where the ops run (care-q check)", ""]
        for tg, a in r["artifacts"].items():
            L += [f"- {tg}: " + line for line in a.get("census", [])]
    L += ["", "(every tensor's parameters: `report.json` -> `tensors`; resumable state: "
              f"`{Path(r['checkpoint']).name}`)", ""]
    return "\n".join(L)
