"""`synthetic_bn`: data-free calibration images (ZeroQ-style "distilled data").

Random inputs are optimised (Adam on the pixels) so that, layer by layer, the batch statistics of
every ``nn.BatchNorm2d``'s input match that BN's running statistics, in eval mode, on the original
(non-deploy) CARE model:

    L_bn = mean over BN layers of  mean_c (mu_c - running_mean_c)^2 + mean_c (sigma_c - sqrt(running_var_c))^2

plus ``tv_weight`` times a total-variation prior (mean absolute difference of neighbouring pixels),
which keeps the images smooth. Pixels live in the normalised space and are clamped to what a real
image in [0, 1] can give after Normalize(mean, std). Only the inputs change: model weights, BN
statistics and the train/eval flag are left as they were.

Deterministic for a given seed (CPU). The defaults fit a 2-core CPU: 64 images at 64x64 on
care_s0 in well under a minute.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from care_q.errors import CareQError
from care_q.models.builder import IMAGENET_MEAN, IMAGENET_STD
from care_q.utils.progress import progress_bar

DEFAULTS = {"n": 64, "steps": 40, "batch_size": 32, "lr": 0.25, "tv_weight": 0.05}


def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not layers:
        raise CareQError(f"synthetic_bn needs a model with BatchNorm layers; {type(model).__name__} has "
                         f"none (pass the original CARE model, not the deploy form)")
    return layers


@contextlib.contextmanager
def _bn_loss_hooks(model: nn.Module):
    """Yield a list that collects one statistics loss per BN layer during a forward pass."""
    terms: list[torch.Tensor] = []

    def hook(bn, inputs, _output):
        x = inputs[0]
        mu = x.mean(dim=(0, 2, 3))
        sigma = torch.sqrt(x.var(dim=(0, 2, 3), unbiased=False) + bn.eps)
        terms.append(((mu - bn.running_mean) ** 2).mean()
                     + ((sigma - torch.sqrt(bn.running_var + bn.eps)) ** 2).mean())

    handles = [bn.register_forward_hook(hook) for bn in bn_layers(model)]
    try:
        yield terms
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def bn_stat_loss(model: nn.Module, x: torch.Tensor) -> float:
    """L_bn of a batch: how far its per-BN batch statistics are from the running statistics."""
    with _eval_mode(model), _bn_loss_hooks(model) as terms, torch.no_grad():
        model(x)
        return float(torch.stack(terms).mean())


def total_variation(x: torch.Tensor) -> torch.Tensor:
    return ((x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean())


def synthesize_bn_inputs(model: nn.Module, n: int, img_size: int, steps: int = DEFAULTS["steps"],
                         batch_size: int = DEFAULTS["batch_size"], seed: int = 0,
                         lr: float = DEFAULTS["lr"], tv_weight: float = DEFAULTS["tv_weight"],
                         mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         progress: bool | None = None) -> torch.Tensor:
    """(n, 3, img_size, img_size) normalised inputs whose BN statistics match the model's.

    Batches of ``batch_size`` are optimised independently for ``steps`` Adam steps (cosine-decayed
    ``lr``) from N(0, 1) noise drawn with ``seed``.
    """
    if n < 1 or img_size < 1 or steps < 0 or batch_size < 1:
        raise CareQError(f"synthetic_bn: n, img_size and batch_size must be positive and steps >= 0 "
                         f"(got n={n}, img_size={img_size}, batch_size={batch_size}, steps={steps})")
    bn_layers(model)
    m = torch.tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1)
    lo, hi = (0 - m) / s, (1 - m) / s
    gen = torch.Generator().manual_seed(int(seed))
    out = []
    sizes = [min(batch_size, n - i) for i in range(0, n, batch_size)]
    with _eval_mode(model), _bn_loss_hooks(model) as terms, \
            progress_bar("synthetic_bn", steps * len(sizes), enabled=progress) as advance:
        for b in sizes:
            x = torch.randn(b, 3, img_size, img_size, generator=gen)
            x = torch.max(torch.min(x, hi), lo).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            for step in range(steps):
                for g in opt.param_groups:
                    g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))
                terms.clear()
                model(x)
                bn = torch.stack(terms).mean()
                loss = bn + tv_weight * total_variation(x)
                (grad,) = torch.autograd.grad(loss, [x])
                x.grad = grad
                opt.step()
                with torch.no_grad():
                    x.copy_(torch.max(torch.min(x, hi), lo))
                advance(1, bn_loss=float(bn.detach()))
            out.append(x.detach())
    return torch.cat(out)


class SyntheticSet(Dataset):
    """(image tensor, -1) pairs: synthetic data has no labels (``classes`` is None)."""

    def __init__(self, images: torch.Tensor, name: str = "synthetic_bn"):
        self.images = images
        self.name = name
        self.classes = None
        self.root = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], -1


def synthetic_dataset(defn, preprocess, model=None, limit: int | None = None, seed: int = 0,
                      progress: bool | None = None) -> SyntheticSet:
    """The ``synthetic_bn`` set for ``model``, sized ``limit`` (else the definition's ``n``)."""
    if model is None:
        raise CareQError(f"dataset '{defn.name}' is data-free and is made from the model: call "
                         f"get_dataset('{defn.name}', preprocess, model=model)")
    opts = {**DEFAULTS, **defn.synthetic}
    _, h, w = preprocess.input_size
    if h != w:
        raise CareQError(f"synthetic_bn makes square images; the preprocessing asks for {h}x{w}")
    n = int(limit) if limit is not None else int(opts["n"])
    x = synthesize_bn_inputs(model, n, h, steps=int(opts["steps"]), batch_size=int(opts["batch_size"]),
                             seed=seed, lr=float(opts["lr"]), tv_weight=float(opts["tv_weight"]),
                             mean=preprocess.mean, std=preprocess.std, progress=progress)
    return SyntheticSet(x, defn.name)
