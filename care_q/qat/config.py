"""A QAT run's typed configuration, its checks, and what identifies a run for --resume."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from care_q.errors import CareQError
from care_q.pipeline import MIN_AGREEMENT
from care_q.quant.recipe import Recipe

TARGET_AGREEMENT = 0.995  # the QAT issue's target, reported next to the measured agreement
# Settings that must match for --resume to continue a run (the others may change).
RESUME_KEYS = ("model", "weights", "dataset", "dataset_path", "recipe", "img_size", "epochs", "global_batch",
               "lr", "seed", "limit", "calib", "calib_images", "total_steps")
EXPORT_ONLY = ("tflite",)  # recipe sections that change what is exported, not what is trained


@dataclass(frozen=True)
class QATConfig:
    """`care-q qat`'s options (see `care_q.qat.qat`). ``epochs``, ``lr``, ``batch_size`` and
    ``checkpoint_every`` default to the recipe's ``qat`` section (`resolved` fills them in)."""

    model: str
    weights: Path
    dataset: str
    recipe: str | Path = "qat_int8"
    epochs: float | None = None
    max_steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    out: Path = Path("out/qat")
    resume: bool = False
    calib: str | None = None          # default: dataset
    calib_images: int | None = 1000
    data_root: str | Path | None = None
    seed: int = 0
    eval_dataset: str | None = None
    eval_limit: int | None = None
    num_verify: int = 200
    targets: tuple[str, ...] | None = None
    io: str | None = None
    img_size: int | None = None
    limit: int | None = None
    workers: int = 0
    threads: int = 2
    checkpoint_every: int | None = None
    min_agreement: float = MIN_AGREEMENT
    device: str = "auto"
    progress: bool | None = None

    def resolved(self, rec: Recipe) -> QATConfig:
        """This configuration with the recipe's defaults filled in, checked (a CareQError before any work)."""
        q = rec.qat
        cfg = replace(self, epochs=float(q.epochs if self.epochs is None else self.epochs),
                      lr=float(q.lr if self.lr is None else self.lr),
                      batch_size=int(q.batch_size if self.batch_size is None else self.batch_size),
                      checkpoint_every=int(q.checkpoint_every if self.checkpoint_every is None else self.checkpoint_every),
                      calib=self.calib or self.dataset, out=Path(self.out), weights=Path(self.weights))
        if cfg.epochs <= 0 or cfg.lr <= 0 or cfg.batch_size < 1:
            raise CareQError(f"need epochs > 0, lr > 0 and batch_size >= 1 (got epochs={cfg.epochs}, lr={cfg.lr}, "
                             f"batch_size={cfg.batch_size})")
        if cfg.max_steps is not None and cfg.max_steps < 1:
            raise CareQError(f"max_steps must be positive, got {cfg.max_steps}")
        if cfg.checkpoint_every < 0:
            raise CareQError(f"checkpoint_every must be >= 0, got {cfg.checkpoint_every}")
        return cfg


def check_recipe(rec: Recipe) -> None:
    """A CareQError unless ``rec`` is a QAT recipe whose ``qat`` section can train."""
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


def training_content(rec: Recipe) -> dict:
    """``rec.to_json()`` without the export-only settings."""
    return {k: v for k, v in rec.to_json().items() if k not in EXPORT_ONLY}


def export_content(rec: Recipe) -> dict:
    """The export-only settings of ``rec.to_json()`` (what `training_content` leaves out)."""
    return {k: v for k, v in rec.to_json().items() if k in EXPORT_ONLY}


def without_source(key: str, value):
    """A recipe's key without its file path (a moved checkout resumes; so do checkpoints written
    while the key still held the path)."""
    return {k: v for k, v in value.items() if k != "source"} if key == "recipe" and isinstance(value, dict) else value


def recipe_key(rec: Recipe) -> dict:
    """What a run was trained under: the recipe's content without its path, checkpoint interval
    and export-only settings (``tflite``: which TFLite kernel runs a conv; a finished run can be
    exported again under a changed one)."""
    j = without_source("recipe", training_content(rec))  # the content decides, not where the file lies
    j.get("qat", {}).pop("checkpoint_every", None)  # may change between a run and its resume
    return j
