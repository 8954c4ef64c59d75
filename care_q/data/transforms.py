"""Image transforms from a model's timm-style preprocessing (`PreprocessConfig`).

Eval: timm's own ``create_transform`` (``transforms_imagenet_eval``): resize the shorter side to
``floor(size / crop_pct)`` with the configured interpolation (PIL), centre-crop to ``size``,
ToTensor, Normalize(mean, std). For the CIFAR proxy (crop_pct 1.0, bilinear, 32 -> 64) that is
exactly PIL bilinear resize to 64x64, ToTensor, Normalize.

Train ("basic augmentation"): the same resize, then a random crop of ``size`` (reflect-padded by
size/8 when the resize leaves no margin, as for CIFAR), a random horizontal flip, ToTensor,
Normalize. The random draws use torch's global RNG; the datasets seed it per sample.
"""

from __future__ import annotations

import math

from torchvision import transforms as T

from care_q.errors import CareQError
from care_q.models import PreprocessConfig

INTERPOLATIONS = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
                  "nearest": T.InterpolationMode.NEAREST, "lanczos": T.InterpolationMode.LANCZOS,
                  "box": T.InterpolationMode.BOX, "hamming": T.InterpolationMode.HAMMING}
CROP_MODES = ("center", "squash", "border")


def _check(preprocess: PreprocessConfig) -> None:
    if preprocess.interpolation not in INTERPOLATIONS:
        raise CareQError(f"preprocessing ({preprocess.source}): unknown interpolation "
                         f"'{preprocess.interpolation}'; known: {', '.join(INTERPOLATIONS)}")
    if preprocess.crop_mode not in CROP_MODES:
        raise CareQError(f"preprocessing ({preprocess.source}): unknown crop_mode "
                         f"'{preprocess.crop_mode}'; known: {', '.join(CROP_MODES)}")
    if not 0.0 < float(preprocess.crop_pct) <= 1.0:
        raise CareQError(f"preprocessing ({preprocess.source}): crop_pct must be in (0, 1], "
                         f"got {preprocess.crop_pct}")


def build_transform(preprocess: PreprocessConfig, train: bool = False):
    """PIL image -> normalised CHW float tensor, as the model's preprocessing says."""
    _check(preprocess)
    if not train:
        from timm.data import create_transform

        return create_transform(**preprocess.to_timm(), is_training=False)
    _, h, w = preprocess.input_size
    interp = INTERPOLATIONS[preprocess.interpolation]
    sh, sw = math.floor(h / preprocess.crop_pct), math.floor(w / preprocess.crop_pct)
    if preprocess.crop_mode == "squash" or h != w:
        resize = T.Resize((sh, sw), interpolation=interp)
    else:
        resize = T.Resize(sh, interpolation=interp)
    pad = h // 8 if (sh, sw) == (h, w) else 0
    return T.Compose([
        resize,
        T.RandomCrop((h, w), padding=pad or None, padding_mode="reflect", pad_if_needed=True),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean=preprocess.mean, std=preprocess.std),
    ])
