"""Run calibration data through the deploy form and fix every tensor's parameters."""

from __future__ import annotations

import torch

from care_q.data import track
from care_q.quant.fakequant import QuantOps
from care_q.quant.observers import HistogramObserver
from care_q.quant.plan import QuantPlan
from care_q.quant.qtypes import DType, Method, qparams_from_range


@torch.no_grad()
def calibrate(plan: QuantPlan, model, batches, total: int | None = None, progress: bool | None = None) -> int:
    """Observe every quantized tensor on `batches` (iterable of input tensors or (x, y) pairs).

    Sets `plan.qparams`, and `plan.output_qparams` (logits range, for int8 output). Returns the
    number of images seen.
    """
    observers: dict[str, HistogramObserver] = {}
    logits = HistogramObserver("logits")
    ops = QuantOps(plan, "observe", observers=observers)
    seen = 0
    for batch in track(batches, "calibrating", total=total, enabled=progress):
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        logits.update(model(x, ops))
        seen += x.shape[0]
    plan.finalize(observers)
    lo, hi = logits.range(Method.MINMAX, DType.INT8, False)
    plan.output_qparams = qparams_from_range(lo, hi, DType.INT8, False)
    out = plan.graph.output
    if plan.quantized(out):  # int8 head: the int8 output is the logits tensor itself
        plan.output_qparams = plan.qp(out)
    plan.observers = observers
    return seen
