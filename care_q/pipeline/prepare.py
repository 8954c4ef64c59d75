"""The preparation pipeline every command shares: model -> deploy form -> recipe substitutions ->
transforms -> traced graph -> per-tensor plan -> calibration -> bias correction -> reconstruction
(recipes with a ``reconstruction`` section: care_q.quant.reconstruction).

    prep = prepare(PrepareConfig("care_s0", weights="w.pth", calib="cifar10_train", num_calib=1000))
    prep.plan       # the calibrated QuantPlan the exporters emit
    prep.dmodel     # the deploy form it was calibrated on (substitutions and transforms applied)

`care-q ptq`, `care-q qat` (its starting point), `care-q sensitivity`, `care-q eval --analysis` and
the bench's analysis all call `prepare`, so every report analyses the plan that ships. `build`
is the part without data (QAT rebuilds a checkpoint's model with it).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from care_q.data import get_dataset, make_loader
from care_q.errors import CareQError
from care_q.graph.trace import Graph, trace
from care_q.models import create_model, load_sidecar
from care_q.pipeline.config import PrepareConfig
from care_q.pipeline.fidelity import deploy_form_fidelity
from care_q.quant.bias_correction import bias_correction, images_for
from care_q.quant.calibrate import calibrate
from care_q.quant.plan import QuantPlan, build_plan
from care_q.quant.recipe import Recipe, load_recipe
from care_q.quant.reconstruction import reconstruct, resolve_device
from care_q.transforms import deploy
from care_q.transforms.equalize import cross_layer_equalization
from care_q.transforms.substitute import apply_substitutions
from care_q.utils.layout import channels_last

RANDOM_WEIGHTS_NOTE = ("no --weights: the weights are random, so accuracy figures are meaningless "
                       "(latency, size and runtime agreement are still valid)")


@dataclass
class Built:
    """A deploy form with its graph and (uncalibrated) plan: what `build` returns."""

    dmodel: torch.nn.Module
    graph: Graph
    plan: QuantPlan
    equalization: dict | None
    notes: list[str]
    original: torch.nn.Module | None = None  # the deploy form before substitutions (None: the recipe has none)


@dataclass
class Prepared:
    """The calibrated, transformed plan and the models it belongs to (see `prepare`)."""

    config: PrepareConfig
    recipe: Recipe
    net: torch.nn.Module            # the original CARE model (FP32)
    dmodel: torch.nn.Module         # its deploy form, with the recipe's substitutions and transforms
    graph: Graph
    plan: QuantPlan                 # calibrated (plan.observers set), biases corrected when the recipe says
    preprocess: object
    img_size: int
    calib: str                      # the set calibrated on (synthetic_bn after a fallback)
    calib_dataset: object
    calib_images: int
    calib_seconds: float
    equalization: dict | None = None
    bias_correction: dict | None = None
    notes: list[str] = field(default_factory=list)
    reconstruction: dict | None = None  # care_q.quant.reconstruction.reconstruct's summary
    deploy_vs_fp32: dict | None = None  # `deploy_form_fidelity` before calibration: what the substitutions cost

    @property
    def model(self) -> str:
        return self.config.model

    @property
    def weights(self) -> str | None:
        return str(self.config.weights) if self.config.weights else None


def _note(notes: list[str], text: str) -> None:
    notes.append(text)
    warnings.warn(text, stacklevel=3)


def load_network(model: str, weights: str | Path | None, seed: int) -> torch.nn.Module:
    """The CARE model; without weights, random weights drawn from ``seed`` (the same model every run)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return create_model(model, weights=weights)


def build(net: torch.nn.Module, rec: Recipe, size: int, first_batch: torch.Tensor | None = None) -> Built:
    """Deploy form -> substitutions -> cross-layer equalization -> trace -> plan (no data but
    ``first_batch``, which sets the NPU attention's output scales)."""
    original = deploy(net)
    dmodel, notes = apply_substitutions(original, rec, first_batch)
    # before calibration: an exact FP32 rewrite that calibration and the exporters then see
    equalized = cross_layer_equalization(dmodel) if rec.cross_layer_equalization else None
    graph = trace(dmodel, torch.zeros(1, 3, size, size))
    return Built(dmodel, graph, build_plan(graph, rec), equalized, notes, None if dmodel is original else original)


def calibration_set(cfg: PrepareConfig, pre, net, notes: list[str]) -> tuple[object, str]:
    """(dataset, name of the set used): ``cfg.calib``, or synthetic_bn when it is unavailable and
    ``cfg.fallback_synthetic``."""
    try:
        ds = get_dataset(cfg.calib, pre, data_root=cfg.data_root, limit=cfg.num_calib, seed=cfg.seed, model=net,
                         progress=cfg.progress)
        used = str(cfg.calib)
    except CareQError as e:
        if not cfg.fallback_synthetic:
            raise
        _note(notes, f"calibration set '{cfg.calib}' unavailable ({e}); fell back to data-free "
                     f"'synthetic_bn' (inputs optimised to match BatchNorm statistics)")
        used = "synthetic_bn"
        ds = get_dataset(used, pre, data_root=cfg.data_root, limit=cfg.num_calib or 64, seed=cfg.seed, model=net,
                         progress=cfg.progress)
    if cfg.num_calib is not None and len(ds) < cfg.num_calib:
        _note(notes, f"asked for {cfg.num_calib} calibration images, '{used}' has {len(ds)}; calibrating on {len(ds)}")
    return ds, used


def _first_images(batches, limit: int):
    """The first ``limit`` images of a loader, as batches."""
    seen = 0
    for b in batches:
        x = b[0] if isinstance(b, (list, tuple)) else b
        if seen >= limit:
            return
        yield x[:limit - seen]
        seen += x.shape[0]


def calibrate_built(built: Built, rec: Recipe, ds, size: int, progress: bool | None = None,
                    checkpoint: Path | None = None, device: str = "auto", seed: int = 0) -> dict:
    """Calibrate ``built.plan`` on ``ds`` and, when the recipe says, correct the biases and
    reconstruct: {"images", "seconds", "bias_correction", "reconstruction"}."""
    def batches():
        return make_loader(ds, batch_size=rec.batch_size)

    t0 = time.time()
    with channels_last(built.dmodel):  # ~40% faster forwards (see care_q/utils/layout.py)
        n = calibrate(built.plan, built.dmodel, batches(), total=None, progress=progress)
        seconds = round(time.time() - t0, 1)
        corrected = None
        if rec.bias_correction:  # after calibration: it measures the fake-quant model (see the module)
            t0 = time.time()
            corrected = bias_correction(built.plan, built.dmodel, _first_images(batches(), images_for(size)),
                                        progress=progress)
            corrected["seconds"] = round(time.time() - t0, 1)
        recon = None
        if rec.reconstruction is not None:
            images = _images(ds, len(ds))  # what `calib_tensor` gives back
            # the original model's unit outputs are the targets (reconstruction.target: original), so
            # reconstruction also makes up for what the substitutions changed
            reference = built.original if rec.reconstruction.target == "original" else None
            recon = reconstruct(built.plan, built.dmodel, images, rec.reconstruction, reference=reference,
                                checkpoint=checkpoint, device=device, seed=seed, progress=progress)
    return {"images": n, "seconds": seconds, "bias_correction": corrected, "reconstruction": recon}


def with_recon_steps(rec: Recipe, steps: int | None) -> Recipe:
    """``rec`` with ``steps`` reconstruction steps per unit (None: the recipe's own)."""
    if steps is None:
        return rec
    if rec.reconstruction is None:
        raise CareQError(f"recipe '{rec.name}' has no reconstruction section: reconstruction steps do not apply "
                         f"(recipes with one: ptq_int8_recon, ptq_w4a8_recon, npu_int8_ptq)")
    if steps < 1:
        raise CareQError(f"reconstruction steps must be at least 1, got {steps}")
    return dataclasses.replace(rec, reconstruction=dataclasses.replace(rec.reconstruction, iterations=steps))


def check_reconstruction(rec: Recipe, images: int | None) -> None:
    """A reconstruction recipe's errors that need the number of calibration images (before any work)."""
    s = rec.reconstruction
    if s is not None and images is not None and min(images, s.images or images) < s.batch_size:
        raise CareQError(f"recipe '{rec.name}': reconstruction.batch_size is {s.batch_size} but there are only "
                         f"{min(images, s.images or images)} calibration images: give at least one batch")


def prepare(cfg: PrepareConfig) -> Prepared:
    """Load, transform, trace, plan and calibrate (see the module docstring)."""
    rec = with_recon_steps(load_recipe(cfg.recipe), cfg.recon_steps)
    check_reconstruction(rec, cfg.num_calib)
    if rec.reconstruction is not None:
        resolve_device(cfg.device)
    notes: list[str] = []
    net = load_network(cfg.model, cfg.weights, cfg.seed)
    if cfg.weights is None:
        _note(notes, RANDOM_WEIGHTS_NOTE)
    pre = load_sidecar(cfg.weights).with_size(cfg.img_size)
    size = pre.input_size[1]
    ds, used = calibration_set(cfg, pre, net, notes)
    check_reconstruction(rec, len(ds))
    first = next(iter(make_loader(ds, batch_size=rec.batch_size)))[0]
    built = build(net, rec, size, first if rec.attention == "npu" else None)
    exactness = deploy_form_fidelity(net, built.dmodel, first)  # before calibration changes biases and weights
    cal = calibrate_built(built, rec, ds, size, cfg.progress, cfg.checkpoint, cfg.device, cfg.seed)
    recon = cal["reconstruction"]
    return Prepared(cfg, rec, net, built.dmodel, built.graph, built.plan, pre, size, used, ds, cal["images"],
                    cal["seconds"], built.equalization, cal["bias_correction"],
                    notes + built.notes + (recon["notes"] if recon else []), recon, exactness)


def _images(ds, n: int) -> torch.Tensor:
    return torch.cat([b[0] for b in make_loader(ds, batch_size=50)])[:n]


def draw_images(source: str, preprocess, n: int, seed: int, *, data_root=None, model=None,
                progress: bool | None = None) -> torch.Tensor:
    """``n`` images of the set ``source``, a seeded draw (``seed``), as one tensor."""
    return draw_labelled(source, preprocess, n, seed, data_root=data_root, model=model, progress=progress)[0]


def draw_labelled(source: str, preprocess, n: int, seed: int, *, data_root=None, model=None,
                  progress: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`draw_images`' images and their labels (-1 where the set has none)."""
    ds = get_dataset(source, preprocess, data_root=data_root, limit=n, seed=seed, model=model, progress=progress)
    batches = list(make_loader(ds, batch_size=50))
    return torch.cat([b[0] for b in batches])[:n], torch.cat([torch.as_tensor(b[1]) for b in batches])[:n]


def calib_tensor(prep: Prepared) -> torch.Tensor:
    """Every image ``prep`` was calibrated on, as reconstruction saw them (`calibrate_built`)."""
    return _images(prep.calib_dataset, len(prep.calib_dataset))


def held_out_images(prep: Prepared, n: int, source: str | None = None, seed: int | None = None) -> torch.Tensor:
    """``n`` images of ``source`` (default: the calibration set) drawn with seed ``config.seed + 1``:
    the images `care-q ptq` verifies its artifacts on. Falls back to the calibration images when
    the set cannot give them (data-free calibration)."""
    seed = prep.config.seed + 1 if seed is None else seed
    try:
        return draw_images(source or prep.calib, prep.preprocess, n, seed, data_root=prep.config.data_root,
                           model=prep.net, progress=prep.config.progress)
    except CareQError:
        if source is not None:
            raise
        return _images(prep.calib_dataset, n)
