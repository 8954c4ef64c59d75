"""Where a prepared plan's fidelity stops: its fake-quant logits against FP32, split by what is int8.

    prep = prepare(PrepareConfig("care_s0", weights=..., recipe="ptq_int8_recon", calib="cifar10_train", ...))
    c = fidelity_ceiling(prep, test_images, calib_images)
    c["held_out"]["weights_alone"]   # {"top1_agreement", "logit_sqnr_db"}: int8 weights, every activation float
    c["calibration"]["int8"]         # the whole int8 model on the images its reconstruction fitted

On the held-out images: the whole int8 model (``int8``), its int8 weights with every activation float
(``weights_alone``: what the weights' grid and rounding give on their own) and its int8 activations on
the float weights (``activations_alone``); on the calibration images, the whole int8 model (what the
plan reaches on the data it was fitted to, reconstruction included). A target above
``weights_alone`` asks more than the int8 weights give before any activation is rounded; one above
the calibration fit asks more than the fit reaches on its own data. Fake quantization (`QuantOps`,
not the runtimes' exact kernels): on the CIFAR-10 proxy's 10k test images its ``int8`` agreement is
within 0.3 pt of the artifacts' own (make bench prints both).
"""

from __future__ import annotations

import torch

from care_q.pipeline import Prepared
from care_q.pipeline.fidelity import fidelity, fp32_logits, reference_logits
from care_q.quant.fakequant import QuantOps
from care_q.quant.mixed import MixedOps, float_weights

SPLITS = ("int8", "weights_alone", "activations_alone")


class WeightsAloneOps(QuantOps):
    """`QuantOps` with int8 weights (and int32 biases) but every activation left float."""

    def _out(self, name: str, y: torch.Tensor, op: str = "") -> torch.Tensor:
        if self.record is not None:
            self.record[name] = y.detach()
        return y


def _ops(prep: Prepared, split: str) -> QuantOps:
    if split == "weights_alone":
        return WeightsAloneOps(prep.plan, "quant")
    if split == "activations_alone":
        return MixedOps(float_weights(prep.plan), "quant")
    return QuantOps(prep.plan, "quant")


def split_fidelity(prep: Prepared, x: torch.Tensor, splits=SPLITS) -> dict:
    """{split: {"top1_agreement", "logit_sqnr_db"}} of the plan's fake-quant logits against FP32 on ``x``."""
    ref = fp32_logits(prep.net, x)
    return {s: fidelity(ref, reference_logits(prep.dmodel, _ops(prep, s), x)) for s in splits}


def fidelity_ceiling(prep: Prepared, held_out: torch.Tensor, calibration: torch.Tensor) -> dict:
    """See the module docstring: {"held_out": `split_fidelity` on ``held_out``, "calibration": the
    whole int8 model on ``calibration``, "images": {"held_out", "calibration"} (how many)}."""
    return {"held_out": split_fidelity(prep, held_out),
            "calibration": split_fidelity(prep, calibration, ("int8",)),
            "images": {"held_out": int(held_out.shape[0]), "calibration": int(calibration.shape[0])}}
