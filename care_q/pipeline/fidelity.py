"""How close a prepared plan is to FP32: per-tensor SQNR, logit SQNR and top-1 agreement.

The *shipped* logits are those of the TFLite artifact, computed by its exact reference (XNNPACK's /
TFLite's int8 kernels): `care-q ptq` verifies the artifact against that reference image for image,
so the numbers here equal the artifact's own (`verification.vs_fp32` in a ptq report) on the same
images. FP32 is the original model, before the deploy form's substitutions.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from care_q.quant.fakequant import QuantOps
from care_q.quant.mixed import MixedOps, float_weights
from care_q.quant.plan import QuantPlan, build_plan
from care_q.quant.qtypes import Method, sqnr_db
from care_q.utils.layout import channels_last

CHUNK = 25  # images per forward: at 224 whole-batch float64 intermediates thrash the cache
NOT_COMPARED = ("split", "to_heads", "from_heads")  # data movement: the SQNR of its input


def fidelity(ref: np.ndarray, got: np.ndarray) -> dict:
    """Top-1 agreement and logit SQNR (dB) of ``got`` against ``ref``."""
    return {"top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean()), "logit_sqnr_db": sqnr_db(ref, got)}


@torch.no_grad()
def reference_logits(model, ops: QuantOps | None, x: np.ndarray | torch.Tensor) -> np.ndarray:
    """``model(x, ops)`` (``model(x)`` without ops) in chunks of `CHUNK` images, channels_last weights."""
    xt = torch.as_tensor(x)
    with channels_last(model):
        return np.concatenate([(model(xt[i:i + CHUNK]) if ops is None else model(xt[i:i + CHUNK], ops))
                               .contiguous().numpy() for i in range(0, len(xt), CHUNK)])


@torch.no_grad()
def fp32_logits(net, x: torch.Tensor) -> np.ndarray:
    """The original FP32 model's logits."""
    return np.concatenate([net(x[i:i + CHUNK]).numpy() for i in range(0, len(x), CHUNK)])


def deploy_form_fidelity(net, dmodel, x: torch.Tensor) -> dict:
    """The deploy form in float, as built (the recipe's substitutions, before calibration changes its biases
    and weights), against the original FP32 model on ``x``: float round-off for an exact deploy form, else
    what the substitutions cost before any int8 (reconstruction with ``target: original`` fits the units to
    the original model's outputs, and wins part of it back)."""
    return {**fidelity(fp32_logits(net, x), reference_logits(dmodel, None, x)), "images": int(x.shape[0])}


def shipped_logits(dmodel, plan: QuantPlan, x: torch.Tensor) -> np.ndarray:
    """The TFLite artifact's logits, by its exact reference."""
    return reference_logits(dmodel, QuantOps(plan, "quant", exact="xnnpack"), x)


@torch.no_grad()
def tensor_sqnr(model, plan: QuantPlan, x: torch.Tensor) -> dict[str, float]:
    """SQNR (dB) of every quantized tensor: fake-quant model vs float model on ``x``."""
    f_ops, q_ops = QuantOps(plan, "float", record=True), QuantOps(plan, "quant", record=True)
    model(x, f_ops)
    model(x, q_ops)
    return {name: sqnr_db(ref, q_ops.record[name]) for name, ref in f_ops.record.items()
            if plan.quantized(name) and name in q_ops.record and plan.specs[name].op not in NOT_COMPARED}


def minmax_plan(plan: QuantPlan) -> QuantPlan:
    """The same graph with every tensor at one global min/max of the same calibration (what generic
    tools do); the kernels' constraints (shared parameters, symmetric matmul operands, the divisor
    guard) still apply, so only the choice of ranges differs."""
    naive = build_plan(plan.graph, dataclasses.replace(plan.recipe, rules=(), method=Method.MINMAX))
    naive.finalize(plan.observers)
    return naive


@torch.no_grad()
def recipe_vs_minmax(dmodel, plan: QuantPlan, x: torch.Tensor) -> dict:
    """Per-tensor SQNR and the logit SQNR (fake quantization vs the deploy form in float) of the
    recipe's plan, of `minmax_plan`, and of the recipe's int8 activations on float weights
    (``float_weights``: what the activation grid alone costs; the gap to ``recipe`` is what the
    weights' rounding costs, which reconstruction reduces and, learning against the output, can
    turn into a small gain), on ``x``."""
    naive = minmax_plan(plan)
    with channels_last(dmodel):
        sq_recipe, sq_naive = tensor_sqnr(dmodel, plan, x), tensor_sqnr(dmodel, naive, x)
        fl = dmodel(x).numpy()
        naive_logits = dmodel(x, QuantOps(naive, "quant")).numpy()
        logits = {"recipe": sqnr_db(fl, dmodel(x, QuantOps(plan, "quant")).numpy()),
                  "minmax": sqnr_db(fl, naive_logits),
                  "float_weights": sqnr_db(fl, dmodel(x, MixedOps(float_weights(plan), "quant")).numpy()),
                  "minmax_nonfinite": float(np.mean(~np.isfinite(naive_logits)))}
    return {"naive": naive, "logit_sqnr_db": logits,
            "sqnr_db": {k: {"recipe": v, "minmax": sq_naive.get(k)} for k, v in sq_recipe.items()}}
