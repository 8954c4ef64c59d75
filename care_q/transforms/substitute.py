"""Op substitutions that change the function slightly (need fine-tuning to be lossless).

`npu_attention`: the linear attention from ops every NPU maps (Edge TPU, NNAPI FL6):

- kernel: elu(x) + 1 = relu(x) + exp(min(x, 0)) becomes relu(x) + sigmoid(a x + b) / sigmoid(b)
  (RELU, a 1x1 depthwise conv, LOGISTIC, MUL, ADD; no ELU). The exp-like part keeps growing
  for x > 0 (to 1 / sigmoid(b)); measured on the CIFAR-10 proxy in FP32 without fine-tuning it
  is as accurate as elu + 1 (72.1% vs 71.8% on 5,000 test images, GELU already substituted).
- products: k^T v and q (k^T v) as broadcast MUL + MEAN per head, in a (1, N, D, E) layout
  whose reductions run over the two 'spatial' axes (Edge TPU: at most 3 dims > 1, MEAN over x/y
  only). MEAN instead of SUM: the 1/N and 1/D factors cancel in the normalised output.
- normaliser: out = num / den is invariant to the scale of phi(q) and only the per-token norm
  of out depends on den, so the division becomes an L2 normalisation of num per head
  (L2_NORMALIZATION, on both lists) times a learned per-channel scale initialised to the
  median calibration norm. Not exact: measured -0.8 pt in FP32 before fine-tuning.

`gelu_to_silu`: GELU(x) ~= x * sigmoid(1.702 x). With u = 1.702 x this is silu(u) / 1.702,
so the 1.702 folds into the preceding 1x1 conv and the 1/1.702 into the following depthwise
conv: the block then runs SiLU = LOGISTIC + MUL, both int8 kernels in XNNPACK and
onnxruntime, where GELU has none. Max abs error vs exact GELU is about 0.02.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from care_q.graph.ops import FloatOps
from care_q.transforms.deploy import DeployCARE, reciprocal_normaliser

GELU_SIGMOID_SLOPE = 1.702
# exp(m) ~= sigmoid(a m + b) / sigmoid(b) for m <= 0, with a = 1 / (1 - sigmoid(b)) (value and
# slope match at 0; the tail decays as e^(a m)). b = -2: within 0.02 of exp on [-3, 0], and the
# int8 LOGISTIC output (scale 1/256) still has 30 levels below sigmoid(b).
NPU_KERNEL_BIAS = -2.0


@torch.no_grad()
def gelu_to_silu(model: DeployCARE) -> DeployCARE:
    model = copy.deepcopy(model)
    a = GELU_SIGMOID_SLOPE
    for blk in model.blocks:
        if blk.act != "gelu":
            continue
        for fc1, dw in ((blk.inter1_fc1, blk.inter1_conv), (blk.inter2_fc1, blk.inter2_conv)):
            fc1.weight.mul_(a)
            fc1.bias.mul_(a)
            dw.weight.div_(a)
        blk.act = "silu"
    return model


class _OutNorms(FloatOps):
    """Records the per-token norm of every attention head's output (num / den)."""

    def __init__(self):
        self.norms: dict[str, list[torch.Tensor]] = {}

    def div(self, name, a, b):
        out = a / b  # (B, heads, N, D)
        self.norms.setdefault(name, []).append(out.norm(dim=-1).transpose(0, 1).reshape(out.shape[1], -1))
        return out


@torch.no_grad()
def npu_attention(model: DeployCARE, calib: torch.Tensor | None = None) -> DeployCARE:
    """A copy of ``model`` whose linear attention uses only NPU-mapped ops (module docstring).

    ``calib``: a few input images; each head's output scale starts at the median norm of the
    exact attention output on them (else 1)."""
    rec = _OutNorms()
    if calib is not None:
        model(calib, rec)
    model = copy.deepcopy(model)
    b = NPU_KERNEL_BIAS
    sb = 1.0 / (1.0 + math.exp(-b))
    a = 1.0 / (1.0 - sb)
    for name, blk in zip(model.block_names(), model.blocks):
        if not blk.attention or blk.attn.mode == "npu":
            continue
        att = blk.attn
        ch = 2 * att.mem_dim
        att.phi_aff = nn.Conv2d(ch, ch, 1, groups=ch)
        att.phi_aff.weight.fill_(a)
        att.phi_aff.bias.fill_(b)
        att.phi_exp_scale = 1.0 / sb
        d = att.mem_dim // att.num_heads
        norms = rec.norms.get(f"{name}.attn.out")
        g = torch.ones(att.num_heads)
        if norms:
            g = torch.cat(norms, dim=1).median(dim=1).values.clamp(min=1e-3)
        att.out_scale = nn.Parameter(g.repeat_interleave(d).float())
        att.mode = "npu"
    return model


def apply_substitutions(model: DeployCARE, recipe, calib: torch.Tensor | None = None) -> tuple[DeployCARE, list[str]]:
    """The recipe's ``substitutions`` applied to a deploy form: (model, notes for the report)."""
    notes = []
    if getattr(recipe, "reciprocal_normaliser", False):
        model = reciprocal_normaliser(model)
        notes.append("attention normaliser as num * (1 / den) (transforms.reciprocal_normaliser): exact in FP32; "
                     "the int8 division runs on the normaliser only")
    if recipe.gelu == "sigmoid":
        model = gelu_to_silu(model)
        notes.append("GELU substituted by x*sigmoid(1.702x) (SiLU with folded scales): approximate; "
                     "fine-tune (QAT) to recover the difference")
    if recipe.attention == "npu":
        model = npu_attention(model, calib)
        notes.append("linear attention in its NPU form (positive kernel relu(x) + sigmoid(a x + b) / sigmoid(b), "
                     "products as MUL + MEAN, normaliser as L2 normalisation): approximate; fine-tune (QAT)")
    return model, notes
