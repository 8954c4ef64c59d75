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

Each held-out split also carries ``noise_agreement`` (`noise_agreement`): the top-1 agreement the FP32
logits keep under i.i.d. Gaussian noise of the split's own logit SQNR. It tells how much of a split's
disagreement its SQNR alone explains: an error that lands on the images whose top two classes are close
loses more decisions than noise of the same power.
"""

from __future__ import annotations

import torch

from care_q.pipeline import Prepared
from care_q.pipeline.fidelity import fidelity, fp32_logits, reference_logits
from care_q.quant.fakequant import QuantOps
from care_q.quant.mixed import MixedOps, float_weights

SPLITS = ("int8", "weights_alone", "activations_alone")
NOISE_DRAWS = 20  # draws per `noise_agreement` (10k proxy images: 5th-95th percentile of the draws +-0.2 pt)


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


def noise_agreement(ref, sqnr: float, labels=None, draws: int = NOISE_DRAWS, seed: int = 0) -> dict:
    """``ref`` (N, classes) logits plus i.i.d. Gaussian noise of logit SQNR ``sqnr`` dB (its power
    ``mean(ref^2) / 10^(sqnr / 10)``), ``draws`` seeded draws: {"top1_agreement": {"mean", "low",
    "high"}} with ``ref``'s top-1 (fractions; low / high: the draws' 5th and 95th percentiles), and
    with ``labels`` also "top1_drop" ({"mean", "sd", "low", "high", "draws": each draw's}, points):
    ``ref``'s top-1 accuracy minus the noisy one's."""
    ref = torch.as_tensor(ref, dtype=torch.float64)
    if ref.dim() != 2 or ref.shape[0] == 0 or draws < 1:
        raise ValueError(f"noise_agreement needs (N, classes) logits and draws >= 1, got {tuple(ref.shape)}, {draws}")
    sigma = float(ref.square().mean().sqrt()) * 10 ** (-float(sqnr) / 20)
    g = torch.Generator().manual_seed(seed)
    top = ref.argmax(1)
    y = None if labels is None else torch.as_tensor(labels)
    ref_right = None if y is None else float((top == y).double().mean())
    agree, drop = [], []
    for _ in range(draws):
        noisy = (ref + sigma * torch.randn(ref.shape, generator=g, dtype=torch.float64)).argmax(1)
        agree.append(float((noisy == top).double().mean()))
        if y is not None:
            drop.append(100 * (ref_right - float((noisy == y).double().mean())))

    def spread(v: list[float]) -> dict:
        t = torch.tensor(v, dtype=torch.float64)
        return {"mean": float(t.mean()), "low": float(t.quantile(0.05)), "high": float(t.quantile(0.95))}

    out = {"top1_agreement": spread(agree)}
    if labels is not None:
        out["top1_drop"] = {**spread(drop), "sd": float(torch.tensor(drop, dtype=torch.float64).std()) if draws > 1 else 0.0,
                            "draws": drop}
    return out


def split_fidelity(prep: Prepared, x: torch.Tensor, splits=SPLITS, noise: bool = False) -> dict:
    """{split: {"top1_agreement", "logit_sqnr_db"}} of the plan's fake-quant logits against FP32 on ``x``;
    with ``noise`` each also has "noise_agreement" (`noise_agreement`'s mean at the split's SQNR)."""
    ref = fp32_logits(prep.net, x)
    out = {s: fidelity(ref, reference_logits(prep.dmodel, _ops(prep, s), x)) for s in splits}
    if noise:
        for f in out.values():
            f["noise_agreement"] = noise_agreement(ref, f["logit_sqnr_db"])["top1_agreement"]["mean"]
    return out


def fidelity_ceiling(prep: Prepared, held_out: torch.Tensor, calibration: torch.Tensor) -> dict:
    """See the module docstring: {"held_out": `split_fidelity` on ``held_out``, "calibration": the
    whole int8 model on ``calibration``, "images": {"held_out", "calibration"} (how many)}."""
    return {"held_out": split_fidelity(prep, held_out, noise=True),
            "calibration": split_fidelity(prep, calibration, ("int8",)),
            "images": {"held_out": int(held_out.shape[0]), "calibration": int(calibration.shape[0])}}


def noise_reference(net, x: torch.Tensor, labels: torch.Tensor | None, sqnr: float, draws: int = NOISE_DRAWS) -> dict:
    """What i.i.d. Gaussian noise of logit SQNR ``sqnr`` dB on ``net``'s FP32 logits of ``x`` does:
    {"logit_sqnr_db", "images", "draws", **`noise_agreement`} (the top-1 drop only where every image has
    a label): the agreement and top-1 drop a quantized model of that SQNR would show if its error were
    white, with their spread over the draws."""
    ref = fp32_logits(net, x)
    y = labels if labels is not None and bool((torch.as_tensor(labels) >= 0).all()) else None
    return {"logit_sqnr_db": float(sqnr), "images": int(x.shape[0]), "draws": draws,
            **noise_agreement(ref, sqnr, y, draws)}
