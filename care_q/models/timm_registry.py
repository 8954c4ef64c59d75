"""Register the CARE variants with timm: `timm.create_model('care_s1', num_classes=10)`."""

from __future__ import annotations

from timm.models import register_model

from care_q.errors import CareQError
from care_q.models.builder import IMAGENET_MEAN, IMAGENET_STD, create_model


def _cfg(**kw) -> dict:
    return {"num_classes": 1000, "input_size": (3, 224, 224), "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD, "interpolation": "bicubic", "crop_pct": 0.875, **kw}


def _make(name: str, pretrained: bool, num_classes: int | None, checkpoint_path: str | None, **kw):
    if pretrained and not checkpoint_path:

        raise CareQError(f"no pretrained weights can be downloaded for {name}; pass "
                         f"checkpoint_path=<official checkpoint> instead")
    # timm passes its own bookkeeping (pretrained_cfg, cache_dir, ...); CARE takes in_chans only.
    kw = {k: v for k, v in kw.items() if k == "in_chans"}
    return create_model(name, weights=checkpoint_path or None, num_classes=num_classes, **kw)


@register_model
def care_s0(pretrained: bool = False, num_classes: int | None = None, checkpoint_path: str = "", **kw):
    return _make("care_s0", pretrained, num_classes, checkpoint_path, **kw)


@register_model
def care_s1(pretrained: bool = False, num_classes: int | None = None, checkpoint_path: str = "", **kw):
    return _make("care_s1", pretrained, num_classes, checkpoint_path, **kw)


@register_model
def care_s2(pretrained: bool = False, num_classes: int | None = None, checkpoint_path: str = "", **kw):
    return _make("care_s2", pretrained, num_classes, checkpoint_path, **kw)
