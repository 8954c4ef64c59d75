"""Top-1 accuracy and agreement, shared by training (`care_q.train`), QAT and evaluation.

    acc, preds = top1(model, loader)              # percent, and the predicted class per image
    agreement(preds_fp32, preds_int8)             # fraction of images with the same class
    percent_agreement(preds_fp32, preds_int8)     # the same, in percent

``agreement`` takes NumPy arrays or CPU tensors; `care_q.eval.metrics` builds the evaluation's
metrics (top-k, confusions, logit SQNR) on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from care_q.errors import CareQError
from care_q.utils.progress import track


def agreement(pred_ref, pred) -> float:
    """Fraction of rows where two top-1 predictions are the same class."""
    a, b = np.asarray(pred_ref).reshape(-1), np.asarray(pred).reshape(-1)
    if a.shape != b.shape:
        raise CareQError(f"cannot compare {a.shape[0]} reference predictions with {b.shape[0]}")
    return float((a == b).mean())


def percent_agreement(pred_ref, pred) -> float:
    """`agreement` in percent."""
    return 100.0 * agreement(pred_ref, pred)


@torch.no_grad()
def predict(forward: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device=None,
            description: str = "eval", progress: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted classes, labels), on the CPU, of ``forward(x) -> logits`` over a loader of (x, y);
    ``x`` is moved to ``device`` first when one is given. A progress bar named ``description``."""
    preds, labels = [], []
    for x, y in track(loader, description, enabled=progress):
        if device is not None:
            x = x.to(device)
        preds.append(forward(x).argmax(1).cpu())
        labels.append(y)
    if not preds:
        raise CareQError(f"{description}: the loader yielded no images")
    return torch.cat(preds), torch.cat(labels)


def top1(forward: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device=None,
         description: str = "eval", progress: bool | None = None) -> tuple[float, torch.Tensor]:
    """(top-1 accuracy in percent, predicted classes) of ``forward`` over a loader of (x, y)
    (see `predict`)."""
    preds, labels = predict(forward, loader, device, description, progress)
    return 100.0 * float((preds == labels).double().mean()), preds
