"""Typed, frozen configurations of the preparation pipeline and of the commands built on it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MIN_AGREEMENT = 0.99  # an artifact agreeing with its fake-quant reference on fewer images fails


@dataclass(frozen=True)
class PrepareConfig:
    """What `care_q.pipeline.prepare` needs: the model, its weights, the recipe and the calibration set.

    ``calib`` is a named set (``care-q datasets``) or an ImageFolder path; ``num_calib`` limits it
    (a seeded draw, ``seed``). ``fallback_synthetic``: when the set cannot be loaded, calibrate on
    the data-free ``synthetic_bn`` set instead (noted and warned). ``img_size`` overrides the
    weights' sidecar resolution. For a recipe with a ``reconstruction`` section: ``checkpoint``, where
    what has been learnt is saved after each unit (a killed run resumes there; None: no
    checkpoint), and ``device`` (auto: CUDA when torch sees one, else cpu); ``recon_steps`` replaces
    the recipe's ``reconstruction.iterations`` (fewer: faster, less exact).
    """

    model: str
    weights: str | Path | None = None
    recipe: str | Path = "ptq_int8"
    calib: str = "imagenet_1k_subset"
    num_calib: int | None = None
    img_size: int | None = None
    data_root: str | Path | None = None
    seed: int = 0
    fallback_synthetic: bool = False
    progress: bool | None = None
    checkpoint: Path | None = None
    device: str = "auto"
    recon_steps: int | None = None


@dataclass(frozen=True)
class ExportConfig:
    """Which artifacts to write from a prepared plan and how to verify them."""

    targets: tuple[str, ...]
    io: str
    out: Path
    stem: str                      # file names: <stem>.tflite, <stem>_qdq.onnx
    num_verify: int = 128
    threads: int = 2
    min_agreement: float = MIN_AGREEMENT
    progress: bool | None = None
