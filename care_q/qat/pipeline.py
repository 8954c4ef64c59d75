"""Quantization-aware training: `care_q.qat.qat(...)`, the API behind `care-q qat`.

Pipeline: checkpoint -> `care_q.pipeline.build` (deploy form with BatchNorms folded, the
recipe's substitutions, traced graph, plan) -> `care_q.pipeline.calibrate_built` (PTQ calibration
of that plan, so QAT starts where PTQ of the same recipe ends) -> fine-tuning of the fake-quant model (`QATOps`: straight-through
rounding, int4 weights where the recipe says, LSQ scales when ``qat.learn_scales``) with
distillation from the FP32 model -> learnt scales written into the plan, int4 weights baked ->
`care_q.pipeline.artifacts` (the PTQ exporters: int8 TFLite, QDQ ONNX), each artifact verified
in its runtime against the fake-quant model -> report.json + report.md.

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

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from care_q.data import check_classes, get_dataset, make_loader
from care_q.errors import CareQError
from care_q.models import create_model, load_sidecar
from care_q.pipeline import ExportConfig, build
from care_q.pipeline.artifacts import agreement_failure, export_artifacts, resolve_targets
from care_q.pipeline.prepare import calibrate_built, draw_images
from care_q.qat.config import RESUME_KEYS, TARGET_AGREEMENT, QATConfig, check_recipe, recipe_key, without_source
from care_q.qat.distributed import Dist
from care_q.qat.ops import QATNet, bake_int4_weights, qparams_from_state, qparams_to_state
from care_q.qat.report import render_markdown
from care_q.quant.fakequant import QuantOps
from care_q.quant.lowbit import weight_bits_of
from care_q.quant.observers import HistogramObserver
from care_q.quant.qtypes import DType, Method, qparams_from_range
from care_q.quant.recipe import Recipe, load_recipe
from care_q.train import rng_state, set_rng_state
from care_q.transforms import deploy
from care_q.utils.io import atomic_torch_save, atomic_write_json, atomic_write_text, load_resume_state
from care_q.utils.metrics import percent_agreement, top1
from care_q.utils.progress import progress_bar
from care_q.utils.schedule import lr_lambda

__all__ = ["QATConfig", "QATRun", "build_student", "distill_loss", "load_qat", "qat", "run_qat"]


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, ce_weight: float,
                 distill_weight: float, temperature: float) -> tuple[torch.Tensor, float, float]:
    """(loss, CE, KL): ``ce_weight * CE + distill_weight * T^2 * KL(softmax(t/T) || softmax(s/T))``."""
    ce = F.cross_entropy(student, labels)
    t = float(temperature)
    kd = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1), reduction="batchmean",
                  log_target=True) * (t * t)
    return ce_weight * ce + distill_weight * kd, float(ce.detach()), float(kd.detach())


def _device_name(dev: torch.device) -> str:
    """Where an epoch ran, for the training log: 'cpu', or 'cuda (GPU name)'."""
    return f"cuda ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else dev.type


def build_student(net, rec: Recipe, size: int, calib: torch.Tensor | None = None):
    """(teacher, student, plan, weight bits): the FP32 deploy form, the deploy form QAT trains (with the
    recipe's substitutions; ``calib`` images initialise the NPU attention's output scales), the recipe's
    plan traced on the student (uncalibrated), conv -> weight bits."""
    teacher = deploy(net)
    built = build(net, rec, size, calib)  # deploy() builds new modules: independent of the teacher's
    return teacher.eval(), built.dmodel, built.plan, weight_bits_of(built.plan)


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
    saved = without_source("recipe", cfg["recipe"])  # older checkpoints keep the path in it
    source = cfg.get("recipe_source") or cfg["recipe"].get("source")
    rec = load_recipe(source if source and Path(source).exists() else saved["name"])  # else: moved, by name
    if recipe_key(rec) != saved:
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
        min_agreement: float = 0.99, device: str = "auto", progress: bool | None = None,
        log=print) -> dict:
    """Fine-tune a CARE checkpoint with quantization in the loop; export and verify. Returns the report.

    The keyword form of `run_qat(QATConfig(...))`. ``dataset``: labelled training set (named or
    ImageFolder path) whose classes must match the checkpoint's head; ``calib`` (default ``dataset``)
    with ``calib_images`` images calibrates the starting plan; ``eval_dataset`` (``eval_limit``
    images) measures FP32 / PTQ / QAT top-1; ``num_verify`` held-out images verify the artifacts
    (from ``eval_dataset`` when given). ``epochs``, ``lr``, ``batch_size`` (global),
    ``checkpoint_every`` override the recipe's ``qat`` section. ``targets=[]`` trains without
    exporting. When ``max_steps`` stops the run before its end, nothing is evaluated or exported
    (``report["finished"]`` is False).

    Every input problem (a recipe that is not a QAT recipe, weights of another architecture, a
    dataset whose classes do not match the checkpoint, ...) is a CareQError before training.
    """
    if weights is None:
        raise CareQError("qat fine-tunes a trained model: give its weights (an official-format checkpoint)")
    cfg = QATConfig(model, Path(weights), dataset, recipe=recipe, epochs=epochs, max_steps=max_steps, lr=lr,
                    batch_size=batch_size, out=Path(out), resume=resume, calib=calib, calib_images=calib_images,
                    data_root=data_root, seed=seed, eval_dataset=eval_dataset, eval_limit=eval_limit,
                    num_verify=num_verify, targets=None if targets is None else tuple(targets), io=io,
                    img_size=img_size, limit=limit, workers=workers, threads=threads,
                    checkpoint_every=checkpoint_every, min_agreement=min_agreement, device=device, progress=progress)
    return run_qat(cfg, log)


def run_qat(cfg: QATConfig, log=print) -> dict:
    """`qat` with a typed configuration."""
    rec = load_recipe(cfg.recipe)
    check_recipe(rec)
    cfg = cfg.resolved(rec)
    targets, io = resolve_targets(rec, cfg.targets, cfg.io)
    dist = Dist.from_env(cfg.device)
    try:
        run = _start(cfg, rec, targets, io, dist, log)
        stopped = _train(run)
        report = run.report(stopped)
        if stopped:
            log(f"stopped at step {run.step}/{run.total_steps} (max_steps {cfg.max_steps}); continue with --resume")
            dist.barrier()
            return report
        error = None
        if dist.main:
            try:
                report = _finish(run, report)
            except BaseException as e:  # release the other ranks before failing
                error = e
        dist.barrier()
        if error is not None:
            raise error
        if report.get("failed_agreement"):
            raise CareQError(report["failed_agreement"])
        return report
    finally:
        dist.close()


@dataclass
class _Data:
    """A run's datasets and the checkpoint's model, checked before any training."""

    net: torch.nn.Module
    pre: object
    size: int
    train_ds: object
    eval_ds: object
    cal_ds: object


def _data(cfg: QATConfig, show: bool | None) -> _Data:
    net = create_model(cfg.model, weights=cfg.weights)
    pre = load_sidecar(cfg.weights).with_size(cfg.img_size)
    what = f"checkpoint {cfg.weights}"
    train_ds = get_dataset(cfg.dataset, pre, data_root=cfg.data_root, limit=cfg.limit, seed=cfg.seed, train=True,
                           progress=show)
    check_classes(train_ds, net.num_classes, pre.label_names, what=what)
    eval_ds = None
    if cfg.eval_dataset is not None:
        eval_ds = get_dataset(cfg.eval_dataset, pre, data_root=cfg.data_root, limit=cfg.eval_limit, seed=cfg.seed,
                              progress=show)
        check_classes(eval_ds, net.num_classes, pre.label_names, what=what)
    cal_ds = get_dataset(cfg.calib, pre, data_root=cfg.data_root, limit=cfg.calib_images, seed=cfg.seed, model=net,
                         progress=show)
    return _Data(net, pre, pre.input_size[1], train_ds, eval_ds, cal_ds)


def _notes(rec: Recipe, bits: dict[str, int]) -> list[str]:
    notes = []
    if rec.gelu == "sigmoid":
        notes.append("GELU substituted by x*sigmoid(1.702x) in the student; the teacher keeps the exact GELU")
    if rec.attention == "npu":
        notes.append("linear attention in its NPU form in the student (relu + sigmoid kernel, MUL + MEAN products, "
                     "L2-normalised output); the teacher keeps the exact attention")
    n_int4 = sum(1 for b in bits.values() if b == 4)
    if n_int4:
        notes.append(f"{n_int4} of {len(bits)} convs have int4 weights (15 levels per channel, simulated in fake "
                     f"quantization, stored as int8 containers in the artifacts)")
    return notes


@dataclass
class _Run:
    """Everything one QAT run holds while it trains: inputs, models, optimisation and progress."""

    cfg: QATConfig
    rec: Recipe
    targets: tuple[str, ...]
    io: str
    dist: Dist
    log: Callable
    show: bool | None
    data: _Data
    config: dict                    # what the checkpoint records (RESUME_KEYS must match on --resume)
    total_steps: int
    steps_per_epoch: int
    per_rank: int
    teacher: torch.nn.Module
    qnet: QATNet
    plan: object
    bits: dict
    notes: list[str]
    n_cal: int | None
    t_cal: float | None
    t_start: float
    baseline: dict = field(default_factory=dict)
    fp32_preds: torch.Tensor | None = None
    opt: torch.optim.Optimizer | None = None
    sched: object = None
    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    history: list = field(default_factory=list)
    ep: dict = field(default_factory=lambda: {"loss": 0.0, "ce": 0.0, "kd": 0.0, "n": 0, "seconds": 0.0})
    train_seconds: float = 0.0
    train_images: int = 0

    @property
    def ckpt_path(self) -> Path:
        return self.cfg.out / "last.pt"

    def save(self) -> None:
        if self.dist.main:
            atomic_torch_save({"model": self.qnet.state_dict(), "plan": qparams_to_state(self.plan),
                               "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                               "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "step": self.step,
                               "rng": rng_state(), "config": self.config, "history": self.history,
                               "baseline": self.baseline, "calibration_images": self.n_cal,
                               "calibration_seconds": self.t_cal, "epoch_sums": dict(self.ep),
                               "fp32_preds": self.fp32_preds}, self.ckpt_path)

    def report(self, stopped: bool) -> dict:
        cfg, dist = self.cfg, self.dist
        ips = self.train_images / self.train_seconds if self.train_seconds > 0 else None
        return {"command": "qat", "model": cfg.model, "weights": str(cfg.weights), "img_size": self.data.size,
                "recipe": self.rec.to_json(), "io": self.io, "targets": list(self.targets),
                "dataset": str(cfg.dataset), "finished": not stopped,
                "train": {"steps": self.step, "total_steps": self.total_steps, "epochs": cfg.epochs,
                          "steps_per_epoch": self.steps_per_epoch, "global_batch": cfg.batch_size,
                          "processes": dist.world, "per_process_batch": self.per_rank, "backend": dist.backend,
                          "device": str(dist.device), "lr": cfg.lr,
                          "this_session_seconds": round(self.train_seconds, 1),
                          "this_session_images_per_s": round(ips, 2) if ips else None, "history": self.history},
                "calibration": {"set": str(cfg.calib), "images": self.n_cal, "seconds": self.t_cal},
                "checkpoint": str(self.ckpt_path), "notes": self.notes}


def _start(cfg: QATConfig, rec: Recipe, targets, io: str, dist: Dist, log) -> _Run:
    """Inputs checked, the run's state (fresh: built and calibrated; --resume: from its checkpoint),
    the PTQ baseline, the optimizer; the starting checkpoints written."""
    t_start = time.time()
    show = cfg.progress if dist.main else False
    log = log if dist.main else (lambda *a, **k: None)
    if cfg.batch_size % dist.world:
        raise CareQError(f"the global batch size {cfg.batch_size} is not divisible by the {dist.world} processes")
    data = _data(cfg, show)
    steps_per_epoch = len(data.train_ds) // cfg.batch_size
    if steps_per_epoch == 0:
        raise CareQError(f"dataset '{cfg.dataset}' has {len(data.train_ds)} images, fewer than the global batch "
                         f"size {cfg.batch_size}")
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    config = {"model": cfg.model, "weights": str(cfg.weights.resolve()), "dataset": str(cfg.dataset),
              "dataset_path": str(data.train_ds.root), "recipe": recipe_key(rec), "img_size": int(data.size),
              "epochs": cfg.epochs, "global_batch": cfg.batch_size, "lr": cfg.lr, "seed": int(cfg.seed),
              "limit": cfg.limit, "calib": str(cfg.calib), "calib_images": cfg.calib_images,
              "total_steps": total_steps,
              "recipe_source": str(rec.source)}  # where the recipe was read (not compared on --resume)
    state = None
    if cfg.resume:
        state = load_resume_state(cfg.out / "last.pt", config, RESUME_KEYS, cfg.out, normalize=without_source)
    elif (cfg.out / "last.pt").exists():
        raise CareQError(f"{cfg.out} already holds a QAT run (last.pt); pass --resume to continue it, "
                         f"or choose another --out")
    # teacher (FP32) and student (the deploy form the exporters emit), plan, PTQ calibration
    first = next(iter(make_loader(data.cal_ds, rec.batch_size)))[0] if rec.attention == "npu" else None
    teacher = deploy(data.net).eval()
    built = build(data.net, rec, data.size, first)
    bits = weight_bits_of(built.plan)
    if state is not None:
        qparams_from_state(built.plan, state["plan"])
        n_cal, t_cal = state.get("calibration_images"), state.get("calibration_seconds")
    else:
        cal = calibrate_built(built, rec, data.cal_ds, data.size, show)
        n_cal, t_cal = cal["images"], cal["seconds"]
    qnet = QATNet(built.dmodel, built.plan, bits, rec.qat.learn_scales)
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.to(dist.device)
    qnet.to(dist.device)
    run = _Run(cfg, rec, targets, io, dist, log, show, data, config, total_steps, steps_per_epoch,
               cfg.batch_size // dist.world, teacher, qnet, built.plan, bits, _notes(rec, bits), n_cal, t_cal, t_start)
    _baseline(run, state)
    if state is not None:
        qnet.load_state_dict(state["model"])
    _optimizer(run, state)
    if dist.main:
        cfg.out.mkdir(parents=True, exist_ok=True)
    log(f"QAT {cfg.model} with recipe {rec.name}: {total_steps} steps ({cfg.epochs:g} epochs of {steps_per_epoch}), "
        f"global batch {cfg.batch_size} ({dist.world} process(es) x {run.per_rank}), lr {cfg.lr:g}, on {dist.device}")
    if state is None:
        run.save()  # the calibrated starting point: a run killed before its first checkpoint resumes from here
        if dist.main:  # kept: the PTQ starting point of this run (`load_qat(OUT/start.pt)`)
            atomic_torch_save({"model": qnet.state_dict(), "plan": qparams_to_state(built.plan), "config": config,
                               "step": 0}, cfg.out / "start.pt")
    return run


def _eval_loader(run: _Run, ds):
    return make_loader(ds, batch_size=max(run.per_rank, 64), workers=run.cfg.workers)


def _baseline(run: _Run, state: dict | None) -> None:
    """FP32 and PTQ top-1 on the eval set, measured before the trained weights are loaded (qnet is then
    the PTQ starting point: calibrated plan, original weights); kept from the checkpoint when it has them."""
    run.baseline = dict(state.get("baseline", {})) if state is not None else {}
    run.fp32_preds = state.get("fp32_preds") if state is not None else None
    eval_ds, dev = run.data.eval_ds, run.dist.device
    if eval_ds is None or "fp32_top1" in run.baseline or not run.dist.main:
        return
    b = run.baseline
    run.qnet.eval()
    b["fp32_top1"], run.fp32_preds = top1(run.teacher, _eval_loader(run, eval_ds), dev, "eval fp32", run.show)
    b["ptq_top1"], ptq_preds = top1(run.qnet, _eval_loader(run, eval_ds), dev, "eval PTQ (fake-quant)", run.show)
    b["ptq_fp32_agreement"] = percent_agreement(ptq_preds, run.fp32_preds)
    run.log(f"before QAT: FP32 top-1 {b['fp32_top1']:.2f}%, PTQ ({run.rec.name}) top-1 {b['ptq_top1']:.2f}% on "
            f"{len(eval_ds)} images (same class as FP32 on {b['ptq_fp32_agreement']:.2f}%)")


def _optimizer(run: _Run, state: dict | None) -> None:
    """AdamW (weight decay on conv/linear weights only) and the per-step schedule; resumed from ``state``."""
    q, qnet, lr = run.rec.qat, run.qnet, run.cfg.lr
    decay = [p for p in qnet.student.parameters() if p.ndim >= 2]
    no_decay = [p for p in qnet.student.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": q.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if qnet.log_scales is not None:
        groups.append({"params": [qnet.log_scales], "weight_decay": 0.0, "lr": q.scale_lr or lr})
    run.opt = torch.optim.AdamW(groups, lr=lr)
    warmup = min(int(q.warmup_steps), run.total_steps)
    run.sched = torch.optim.lr_scheduler.LambdaLR(run.opt, lr_lambda(warmup, run.total_steps, q.schedule))
    if state is None:
        return
    if "optimizer" in state:
        run.opt.load_state_dict(state["optimizer"])
    elif state["step"] < run.total_steps:  # a finished run's checkpoint may be slimmed for transfer
        raise CareQError(f"{run.ckpt_path} has no optimizer state, so its run (step {state['step']} of "
                         f"{run.total_steps}) cannot continue; only a finished run can be resumed without it")
    run.sched.load_state_dict(state["scheduler"])
    run.epoch, run.step_in_epoch, run.step = state["epoch"], state["step_in_epoch"], state["step"]
    run.history = list(state.get("history", []))
    run.ep.update(state.get("epoch_sums", {}))
    set_rng_state(state.get("rng", {}))
    if run.step >= run.total_steps:
        run.log(f"{run.cfg.out}: the run finished ({run.step} steps); evaluating and exporting it again")
    else:
        run.log(f"resuming {run.cfg.out} at step {run.step}/{run.total_steps} (epoch {run.epoch + 1}, "
                f"step {run.step_in_epoch})")


def _train(run: _Run) -> bool:
    """The training loop, from the run's step to its end or ``max_steps``; True when stopped early."""
    cfg, dist, q, dev = run.cfg, run.dist, run.rec.qat, run.dist.device
    ddp = run.qnet
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(run.qnet, device_ids=[dist.local_rank] if dev.type == "cuda" else None)
    it = None
    run.qnet.train()
    with progress_bar(f"QAT {run.rec.name}", run.total_steps, enabled=run.show) as advance:
        advance(run.step)
        while run.step < run.total_steps:
            epoch_steps = min(run.steps_per_epoch, run.total_steps - run.epoch * run.steps_per_epoch)
            if it is None:
                ds = run.data.train_ds
                ds.set_epoch(run.epoch)
                idx = dist.shard(ds, run.epoch, cfg.seed, run.per_rank, run.step_in_epoch, epoch_steps)
                it = iter(make_loader(ds, run.per_rank, workers=cfg.workers, sampler=idx, drop_last=True))
            t_step = time.perf_counter()
            x, y = next(it)
            x, y = x.to(dev), y.to(dev)
            with torch.no_grad():
                t_logits = run.teacher(x)
            loss, ce, kd = distill_loss(ddp(x), t_logits, y, q.ce_weight, q.distill_weight, q.temperature)
            if not dist.all_ok(bool(torch.isfinite(loss))):
                raise CareQError(f"QAT diverged at step {run.step + 1} (loss {float(loss)}); try a lower --lr")
            run.opt.zero_grad(set_to_none=True)
            loss.backward()
            run.opt.step()
            run.sched.step()
            _count_step(run, time.perf_counter() - t_step, float(loss.detach()), ce, kd)
            advance(1, loss=run.ep["loss"] / run.ep["n"], lr=run.sched.get_last_lr()[0])
            if run.step_in_epoch == epoch_steps:
                _end_epoch(run)
                it = None
            elif cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0:
                run.save()
            if cfg.max_steps is not None and cfg.max_steps <= run.step < run.total_steps:
                if run.step_in_epoch != 0 and not (cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0):
                    run.save()
                return True
    return False


def _count_step(run: _Run, seconds: float, loss: float, ce: float, kd: float) -> None:
    run.step += 1
    run.step_in_epoch += 1
    run.train_seconds += seconds
    run.train_images += run.cfg.batch_size
    for k, v in (("loss", loss), ("ce", ce), ("kd", kd)):
        run.ep[k] += v
    run.ep["n"] += 1
    run.ep["seconds"] += seconds


def _end_epoch(run: _Run) -> None:
    """Log the epoch, reset its sums and checkpoint."""
    ep, dist = run.ep, run.dist
    rec_ep = {"epoch": run.epoch + 1, "step": run.step, "device": _device_name(dist.device),
              **{k: round(dist.mean(ep[k] / ep["n"]), 5) for k in ("loss", "ce", "kd")},
              "seconds": round(ep["seconds"], 1),
              "images_per_s": round(ep["n"] * run.cfg.batch_size / ep["seconds"], 2) if ep["seconds"] else None}
    run.history.append(rec_ep)
    run.log(f"epoch {rec_ep['epoch']} step {run.step}/{run.total_steps} loss {rec_ep['loss']:.4f} "
            f"(ce {rec_ep['ce']:.4f}, kd {rec_ep['kd']:.4f}), {rec_ep['images_per_s']} img/s")
    run.epoch += 1
    run.step_in_epoch = 0
    run.ep = {"loss": 0.0, "ce": 0.0, "kd": 0.0, "n": 0, "seconds": 0.0}
    run.save()


def _int8_output(run: _Run, ref_ops) -> None:
    """The int8 output's parameters: the logits tensor's own with an int8 head, else the logits
    range of the trained model on the calibration images."""
    plan = run.plan
    if plan.quantized(plan.graph.output):
        plan.output_qparams = plan.qp(plan.graph.output)
        return
    obs = HistogramObserver("logits")
    with torch.no_grad():
        for x, _ in make_loader(run.data.cal_ds, run.rec.batch_size):
            obs.update(run.qnet.student(x, ref_ops()))
    lo, hi = obs.range(Method.MINMAX, DType.INT8, False)
    plan.output_qparams = qparams_from_range(lo, hi, DType.INT8, False)


def _evaluate(run: _Run, ref_ops) -> dict:
    """FP32 / PTQ (from the start) and QAT top-1 on the eval set, and the QAT model's agreement with FP32."""
    acc = dict(run.baseline)
    eval_ds = run.data.eval_ds
    if eval_ds is None:
        return acc
    loader = make_loader(eval_ds, batch_size=64)
    acc["qat_top1"], preds = top1(lambda x: run.qnet.student(x, ref_ops()), loader, torch.device("cpu"), "eval QAT",
                                  run.show)
    acc["eval_set"] = {"name": str(getattr(eval_ds, "name", "")), "images": len(eval_ds)}
    msg = f"after QAT: top-1 {acc['qat_top1']:.2f}%"
    if run.fp32_preds is not None:
        acc["qat_fp32_agreement"] = percent_agreement(preds, run.fp32_preds)
        msg += f", same class as FP32 on {acc['qat_fp32_agreement']:.2f}%"
    if "fp32_top1" in acc:
        msg += (f" (FP32 {acc['fp32_top1']:.2f}%, PTQ {acc['ptq_top1']:.2f}%: "
                f"{acc['qat_top1'] - acc['fp32_top1']:+.2f} pt vs FP32)")
    run.log(msg)
    return acc


def _finish(run: _Run, report: dict) -> dict:
    """Rank 0 after training: write back scales, bake int4, evaluate, export, verify, report."""
    cfg, plan = run.cfg, run.plan
    run.qnet.cpu().eval()
    ratios = run.qnet.write_back()
    baked = bake_int4_weights(plan, run.bits)

    def ref_ops():  # the exporters' reference, after the write-back and the baking
        return QuantOps(plan, "quant")

    if run.io == "int8":
        _int8_output(run, ref_ops)
    report["accuracy"] = _evaluate(run, ref_ops)
    if ratios:
        r = torch.tensor(list(ratios.values()), dtype=torch.float64)
        report["learnt_scales"] = {"groups": len(ratios), "ratio_to_calibrated": {
            "min": float(r.min()), "median": float(r.median()), "max": float(r.max())}}
    report["int4_convs"] = baked
    # verification images: held out from training (the eval set when given)
    src = cfg.eval_dataset if cfg.eval_dataset is not None else cfg.calib
    artifacts, n_verify = {}, 0
    if run.targets:
        xv = draw_images(src, run.data.pre, cfg.num_verify, cfg.seed + 1, data_root=cfg.data_root,
                         model=run.data.net, progress=run.show)
        n_verify = int(xv.shape[0])
        export = ExportConfig(run.targets, run.io, cfg.out, f"{cfg.model}_{run.rec.name}", cfg.num_verify,
                              cfg.threads, cfg.min_agreement, False)
        artifacts = export_artifacts(plan, run.qnet.student, export, xv, preprocess=run.data.pre,
                                     model_name=cfg.model, log=run.log)
    report.update({"artifacts": artifacts, "verification_images": {"set": str(src), "images": n_verify},
                   "min_agreement": cfg.min_agreement, "target_agreement": TARGET_AGREEMENT,
                   "tensors": plan.to_json(),
                   "machine": {"platform": platform.platform(), "python": platform.python_version(),
                               "torch": torch.__version__},
                   "seconds": round(time.time() - run.t_start, 1)})
    atomic_write_json(report, cfg.out / "report.json")
    atomic_write_text(render_markdown(report), cfg.out / "report.md")
    failure = agreement_failure(artifacts, cfg.min_agreement, cfg.out / "report.md")
    if failure:
        report["failed_agreement"] = failure
    return report
