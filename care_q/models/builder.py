"""Build CARE models and load official checkpoints, with clear errors.

The one place where checkpoints are read and adapted; the family file (`care.py`) only
defines the architecture and a pure key filter.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from care_q.errors import CareQError
from care_q.models.care import CARE, CARE_CONFIGS, checkpoint_filter_fn
from care_q.utils.io import atomic_torch_save, atomic_write_json

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class PreprocessConfig:
    """timm-style preprocessing, from a checkpoint's sidecar JSON or ImageNet defaults."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    crop_mode: str = "center"
    label_names: list[str] | None = None
    architecture: str | None = None
    num_classes: int | None = None
    source: str = "ImageNet defaults"
    extra: dict = field(default_factory=dict)

    def with_size(self, img_size: int | None) -> PreprocessConfig:
        if img_size is None:
            return self
        c = PreprocessConfig(**{**self.__dict__})
        c.input_size = (self.input_size[0], img_size, img_size)
        return c

    def to_timm(self) -> dict:
        return {"input_size": tuple(self.input_size), "mean": tuple(self.mean), "std": tuple(self.std),
                "interpolation": self.interpolation, "crop_pct": self.crop_pct,
                "crop_mode": self.crop_mode}

    def to_json(self) -> dict:
        d = {"architecture": self.architecture, "num_classes": self.num_classes,
             **{k: list(v) if isinstance(v, tuple) else v for k, v in self.to_timm().items()}}
        if self.label_names is not None:
            d["label_names"] = list(self.label_names)
        return d


SIDECAR_KEYS = {"architecture", "num_classes", "input_size", "mean", "std", "interpolation",
                "crop_pct", "crop_mode", "label_names"}


def list_models(include_test: bool = False) -> list[str]:
    return [n for n in CARE_CONFIGS if include_test or n != "care_test"]


def _check_name(name: str) -> None:
    if name not in CARE_CONFIGS:
        raise CareQError(f"unknown model '{name}'; known models: {', '.join(list_models())}")


def sidecar_path(weights: str | Path) -> Path:
    p = Path(weights)
    return p.with_suffix(".json")


def load_sidecar(weights: str | Path | None) -> PreprocessConfig:
    """The checkpoint's `<stem>.json` preprocessing, or ImageNet defaults where there is none."""
    if weights is None:
        return PreprocessConfig()
    path = sidecar_path(weights)
    if not path.exists():
        return PreprocessConfig()
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CareQError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise CareQError(f"{path}: expected a JSON object with preprocessing keys")
    unknown = set(data) - SIDECAR_KEYS
    if unknown:
        raise CareQError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(SIDECAR_KEYS)}")
    cfg = PreprocessConfig(source=str(path))
    for key in ("input_size", "mean", "std"):
        if key in data:
            setattr(cfg, key, tuple(data[key]))
    for key in ("interpolation", "crop_pct", "crop_mode", "label_names", "architecture",
                "num_classes"):
        if key in data:
            setattr(cfg, key, data[key])
    if len(cfg.input_size) != 3 or len(cfg.mean) != 3 or len(cfg.std) != 3:
        raise CareQError(f"{path}: input_size, mean and std must have 3 entries each")
    return cfg


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an official-format checkpoint safely (``weights_only=True``)."""
    path = Path(path)
    if not path.exists():
        raise CareQError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CareQError(f"checkpoint {path} is empty")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CareQError(
            f"checkpoint {path} was refused by the safe loader (weights_only=True): it contains "
            f"objects other than tensors and plain containers ({msg}). care-q never unpickles "
            f"arbitrary code; re-save it as {{'model': state_dict}}.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CareQError(f"checkpoint {path} could not be read (truncated or corrupt?): {msg}") from None
    if not isinstance(obj, dict):
        raise CareQError(f"checkpoint {path} holds a {type(obj).__name__}, expected a state dict "
                         f"or {{'model': state_dict}}")
    sd = checkpoint_filter_fn(obj)
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CareQError(f"checkpoint {path}: entries that are not tensors: {bad[:5]}")
    return sd


def infer_num_classes(sd: dict[str, torch.Tensor]) -> int | None:
    w = sd.get("head.fc.weight")
    return int(w.shape[0]) if w is not None else None


def infer_architecture(sd: dict[str, torch.Tensor]) -> str | None:
    """Guess the variant from block counts and widths (for error messages)."""
    for name, cfg in CARE_CONFIGS.items():
        depth_ok = all(f"stages.{i}.blocks.{d - 1}.token_mixer.dwconv1.weight" in sd
                       and f"stages.{i}.blocks.{d}.token_mixer.dwconv1.weight" not in sd
                       for i, d in enumerate(cfg.depths))
        w = sd.get("stem.0.weight")
        if depth_ok and w is not None and w.shape[0] == cfg.dims[0] and \
                sd.get("head.norm.weight", torch.empty(0)).shape[0] == cfg.cls_dim:
            return name
    return None


def load_weights(model: CARE, sd: dict[str, torch.Tensor], name: str, path: str | Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        guess = infer_architecture(sd)
        hint = f" It looks like a '{guess}' checkpoint." if guess and guess != name else ""
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
        raise CareQError(f"checkpoint {path} does not fit model '{name}': "
                         + "; ".join(parts) + "." + hint)
    wrong = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in own.items()
             if tuple(sd[k].shape) != tuple(v.shape)]
    if wrong:
        k, got, want = wrong[0]
        guess = infer_architecture(sd)
        hint = f" It looks like a '{guess}' checkpoint." if guess and guess != name else ""
        raise CareQError(f"checkpoint {path} does not fit model '{name}': {len(wrong)} tensor(s) of "
                         f"another shape, e.g. '{k}' is {got} in the checkpoint but {want} in the "
                         f"model.{hint}")
    model.load_state_dict(sd, strict=True)


def create_model(name: str, weights: str | Path | None = None, num_classes: int | None = None,
                 **kwargs) -> CARE:
    """Create a CARE model in eval mode, optionally loading an official-format checkpoint.

    ``num_classes`` defaults to what the checkpoint's head says (1000 without weights).
    """
    _check_name(name)
    sd = None
    if weights is not None:
        sd = read_state_dict(weights)
        ck_classes = infer_num_classes(sd)
        if num_classes is not None and ck_classes is not None and num_classes != ck_classes:
            raise CareQError(f"num_classes={num_classes} was asked for, but checkpoint {weights} has a "
                             f"{ck_classes}-class head")
        num_classes = num_classes or ck_classes
    model = CARE(CARE_CONFIGS[name], num_classes=num_classes or 1000, **kwargs)
    if sd is not None:
        load_weights(model, sd, name, weights)
    model.eval()
    model.care_q_name = name
    model.pretrained_cfg = {"architecture": name, "num_classes": model.num_classes,
                            **load_sidecar(weights).to_timm()}
    return model


def save_checkpoint(model: CARE, path: str | Path, preprocess: PreprocessConfig | None = None) -> None:
    """Write an official-format checkpoint ``{'model': state_dict}`` (+ sidecar JSON), atomically."""

    path = Path(path)
    atomic_torch_save({"model": model.state_dict()}, path)
    if preprocess is not None:
        atomic_write_json(preprocess.to_json(), sidecar_path(path))


@torch.no_grad()
def randomize_like_trained(model: CARE, seed: int = 0) -> CARE:
    """Random weights with trained-like statistics, for latency work where no trained weights exist.

    The official init leaves every layer scale at 1e-6 and every BatchNorm at identity: an int8 graph
    of such a model has residual ADDs whose two inputs differ in scale by ~1e6, beyond XNNPACK's
    ADD scale-ratio limits, so those ADDs fall to TFLite's own kernels and the timing is not that of a
    real model. Like the shared fixture, this draws the layer scales (|gamma| ~ 0.02..0.35, the range
    of the trained proxy), BatchNorm statistics and affines, and LayerNorm affines at random.
    """
    g = torch.Generator().manual_seed(seed)

    def u(t, lo, hi):
        return torch.rand(t.shape, generator=g) * (hi - lo) + lo

    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            p.copy_(u(p, 0.02, 0.35))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.copy_(u(m.weight, 0.5, 1.5))
            m.bias.copy_(u(m.bias, -0.2, 0.2))
            m.running_mean.copy_(u(m.running_mean, -0.2, 0.2))
            m.running_var.copy_(u(m.running_var, 0.5, 2.0))
        elif isinstance(m, torch.nn.LayerNorm) and m.elementwise_affine:
            m.weight.copy_(u(m.weight, 0.5, 1.5))
            m.bias.copy_(u(m.bias, -0.1, 0.1))
    return model
