"""Classification metrics on logits: top-k accuracy, agreement with a reference, confusions.

Pure NumPy on arrays, so they can be checked against hand-computed cases:

    top = topk(logits, 5)                       # (N, 5) class indices, best first
    topk_accuracy(top, labels, 1)               # fraction in [0, 1]
    agreement(top_ref[:, 0], top[:, 0])         # top-1 agreement with the reference
    confusion_pairs(ref_pred, pred, names)      # most frequent (reference -> artifact) flips

`agreement` is `care_q.utils.metrics.agreement`, which training and QAT use too. A `Tally`
accumulates what these need batch by batch (top-5 indices, the top-1 probability, labels and
logit SQNR sums against a reference), so a 50k-image run never holds all logits.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from care_q.errors import CareQError
from care_q.utils.metrics import agreement

__all__ = ["Tally", "agreement", "biggest_flips", "confusion_pairs", "drop_points", "softmax_max", "summarize",
           "topk", "topk_accuracy"]


def _as_2d(logits) -> np.ndarray:
    a = np.asarray(logits)
    if a.ndim != 2 or a.shape[0] == 0:
        raise CareQError(f"expected logits of shape (N, classes) with N >= 1, got {a.shape}")
    return a


def topk(logits, k: int = 5) -> np.ndarray:
    """Indices of the k largest logits per row, best first (ties: the lower index first)."""
    a = _as_2d(logits)
    k = min(int(k), a.shape[1])
    # stable sort of -logits: equal logits keep index order, as argmax does
    return np.argsort(-a, axis=1, kind="stable")[:, :k].astype(np.int64)


def topk_accuracy(top: np.ndarray, labels, k: int) -> float:
    """Fraction of rows whose label is among the first k entries of ``top`` (from `topk`)."""
    top = np.asarray(top)
    labels = np.asarray(labels).reshape(-1)
    if top.shape[0] != labels.shape[0]:
        raise CareQError(f"{top.shape[0]} predictions but {labels.shape[0]} labels")
    if k > top.shape[1]:
        raise CareQError(f"top-{k} asked for, but only the top {top.shape[1]} classes were kept")
    return float((top[:, :k] == labels[:, None]).any(axis=1).mean())


def drop_points(acc_ref: float, acc: float) -> float:
    """Accuracy drop in percentage points (positive: worse than the reference)."""
    return 100.0 * (float(acc_ref) - float(acc))


def softmax_max(logits) -> np.ndarray:
    """The top-1 softmax probability of every row (numerically stable)."""
    a = _as_2d(logits).astype(np.float64)
    z = a - a.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (1.0 / e.sum(axis=1)).astype(np.float32)  # exp(0) / sum


def confusion_pairs(pred_ref, pred, names: list[str] | None = None, labels=None, top: int = 10) -> list[dict]:
    """The most frequent disagreements: (reference class -> artifact class) with counts.

    Each entry: ``ref``, ``got`` (class index), ``ref_name``/``got_name`` when ``names`` is
    given, ``count``, and with ``labels`` how many of those images the reference had right
    (``ref_correct``) and the artifact had right (``got_correct``). Sorted by count, then by
    class indices, so the order is deterministic.
    """
    a, b = np.asarray(pred_ref).reshape(-1), np.asarray(pred).reshape(-1)
    if a.shape != b.shape:
        raise CareQError(f"cannot compare {a.shape[0]} reference predictions with {b.shape[0]}")
    flip = a != b
    pairs = Counter(zip(a[flip].tolist(), b[flip].tolist()))
    lab = None if labels is None else np.asarray(labels).reshape(-1)
    out = []
    for (r, g), n in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:top]:
        e = {"ref": int(r), "got": int(g), "count": int(n)}
        if names is not None:
            e["ref_name"], e["got_name"] = names[r], names[g]
        if lab is not None:
            sel = flip & (a == r) & (b == g)
            e["ref_correct"] = int((lab[sel] == r).sum())
            e["got_correct"] = int((lab[sel] == g).sum())
        out.append(e)
    return out


def biggest_flips(pred_ref, pred, conf_ref, labels=None, top: int = 10) -> list[dict]:
    """The disagreements where the reference was most confident: image index, classes, its
    top-1 probability (sorted by that probability, highest first; ties by index)."""
    a, b = np.asarray(pred_ref).reshape(-1), np.asarray(pred).reshape(-1)
    conf = np.asarray(conf_ref).reshape(-1)
    idx = np.nonzero(a != b)[0]
    order = idx[np.lexsort((idx, -conf[idx]))][:top]
    out = []
    for i in order.tolist():
        e = {"index": int(i), "ref": int(a[i]), "got": int(b[i]), "ref_prob": float(conf[i])}
        if labels is not None:
            e["label"] = int(np.asarray(labels).reshape(-1)[i])
        out.append(e)
    return out


class Tally:
    """Accumulates one model's predictions batch by batch.

    ``update(logits, ref_logits=None)``: keeps the top-5 indices and the top-1 probability, and
    (with a reference) the sums for the logit SQNR against it.
    """

    def __init__(self, k: int = 5):
        self.k = k
        self._top: list[np.ndarray] = []
        self._conf: list[np.ndarray] = []
        self.signal = 0.0
        self.noise = 0.0

    def update(self, logits, ref_logits=None) -> None:
        a = _as_2d(logits).astype(np.float32, copy=False)
        if not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).sum())
            raise CareQError(f"{bad} NaN/inf logit(s) in a batch of {a.shape[0]}")
        self._top.append(topk(a, self.k))
        self._conf.append(softmax_max(a))
        if ref_logits is not None:
            r = np.asarray(ref_logits, np.float64)
            if r.shape != a.shape:
                raise CareQError(f"logits of shape {a.shape} cannot be compared with the reference's {r.shape}")
            self.signal += float((r ** 2).sum())
            self.noise += float(((r - a) ** 2).sum())

    @property
    def count(self) -> int:
        return int(sum(t.shape[0] for t in self._top))

    @property
    def top(self) -> np.ndarray:
        return np.concatenate(self._top) if self._top else np.zeros((0, self.k), np.int64)

    @property
    def conf(self) -> np.ndarray:
        return np.concatenate(self._conf) if self._conf else np.zeros(0, np.float32)

    @property
    def sqnr_db(self) -> float | None:
        """Logit SQNR (dB) against the reference seen in `update`; None without one."""
        if self.signal == 0 and self.noise == 0:
            return None
        if self.noise == 0:
            return math.inf
        return 10.0 * math.log10(max(self.signal, 1e-30) / self.noise)


def summarize(top: np.ndarray, labels, ref_top: np.ndarray | None = None, ref_conf=None,
              names: list[str] | None = None, top_confusions: int = 10) -> dict:
    """Metrics of one model's predictions (``top`` from `topk`), and against a reference's.

    Returns ``images``, ``top1``, ``top5`` (fractions; top5 None with fewer than 5 classes
    kept), and with ``ref_top``: ``agreement``, ``drop_top1_pt``, ``drop_top5_pt``,
    ``disagreements``, ``confusions`` (`confusion_pairs`) and ``biggest_flips``.
    """
    labels = np.asarray(labels).reshape(-1)
    res = {"images": int(labels.shape[0]), "top1": topk_accuracy(top, labels, 1),
           "top5": topk_accuracy(top, labels, 5) if top.shape[1] >= 5 else None}
    if ref_top is not None:
        p_ref, p = ref_top[:, 0], top[:, 0]
        ref1 = topk_accuracy(ref_top, labels, 1)
        res["agreement"] = agreement(p_ref, p)
        res["disagreements"] = int((p_ref != p).sum())
        res["drop_top1_pt"] = drop_points(ref1, res["top1"])
        res["drop_top5_pt"] = (drop_points(topk_accuracy(ref_top, labels, 5), res["top5"])
                               if res["top5"] is not None and ref_top.shape[1] >= 5 else None)
        res["confusions"] = confusion_pairs(p_ref, p, names, labels, top_confusions)
        if ref_conf is not None:
            res["biggest_flips"] = biggest_flips(p_ref, p, ref_conf, labels, top_confusions)
    return res
