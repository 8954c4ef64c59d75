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
  of out depends on den, so the division becomes a normalisation of num per head times a
  learned per-channel scale initialised to the median calibration norm. Not exact: measured
  -0.8 pt in FP32 before fine-tuning. Two forms of the same FP32 function (recipe
  ``npu.normaliser``, `NPUAttention`):
  ``l2``: L2_NORMALIZATION (Edge TPU, NNAPI from FL3; not an Ethos-U op);
  ``rsqrt``: num * RSQRT(MEAN(num * num)) over the head's channels, laid out on a 'spatial' axis
  (a RESHAPE to (1, N, D, 1)) so the MEAN is one the Edge TPU maps (Ethos-U, Edge TPU; NNAPI
  takes int8 RSQRT from FL7 only). The scale then starts at the median norm / sqrt(D).
  ``l2den``: the L2 normalisation of [num, c den] (the head's denominator, weighted by a learnt
  per-head c, appended as one more channel; CONCATENATION, L2_NORMALIZATION, SLICE), which is
  num / den / sqrt(||out||^2 / c^2 + 1): out itself, its norm compressed only where it reaches c,
  where ``l2`` makes every token's norm the same. den is mean_d(q_d mean_n(k_n,d)), from the same
  MUL + MEAN products. c starts at DEN_WEIGHT_FACTOR times the median calibration norm: a larger c
  is closer to out in FP32 but leaves num fewer int8 levels beside c den in the one tensor
  (measured on the proxy in FP32, top-1 agreement with the exact attention: l2 92.8%; l2den 96.1%
  at c = 1x the median norm, 96.9% at 1.5x, 97.9% from 4x up, the kernel's own limit).
  The output scale starts at c sqrt(1 + 1 / DEN_WEIGHT_FACTOR^2): out's own scale at the median norm.
  ``rsqrtden``: no approximation: num / den = (num r) r with r = RSQRT(den), den from the same MUL + MEAN
  products as ``l2den`` (den > 0: the kernel is positive), so the output scale starts at 1. Ops: MEAN, MUL,
  MEAN, RSQRT, MUL, MUL: Ethos-U (Vela compiles the whole graph), Edge TPU, NNAPI FL7; its head's LayerNorm
  is ``rsqrt``'s. RSQRT of den, not of a mean of squares, keeps den's int8 grid (the square of its range
  would span decades, as in ``rsqrt``). Measured on the proxy (10k test images): FP32 agreement with the
  exact model 97.4%; int8 calibration alone -0.51 pt / 94.5% (``l2den``: -0.79 / 93.7%).

`npu_head`: the classifier head from int8 NPU ops (`NPUHeadCARE`): GELU as SiLU with its 1.702
folded into the last depthwise conv (the global pool is linear; the LayerNorm after the GELU is
invariant to the remaining 1/1.702 up to its eps), the LayerNorm as MEAN, SUB and the
normaliser form above over the channels of the pooled vector (eps dropped; with ``l2`` the
sqrt(C) it lacks is folded into the classifier's weights).

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

from care_q.errors import CareQError
from care_q.graph.ops import FloatOps, Ops
from care_q.graph.roles import Role
from care_q.transforms.deploy import DeployAttention, DeployCARE, reciprocal_normaliser

GELU_SIGMOID_SLOPE = 1.702
# exp(m) ~= sigmoid(a m + b) / sigmoid(b) for m <= 0, with a = 1 / (1 - sigmoid(b)) (value and
# slope match at 0; the tail decays as e^(a m)). b = -2: within 0.02 of exp on [-3, 0], and the
# int8 LOGISTIC output (scale 1/256) still has 30 levels below sigmoid(b).
NPU_KERNEL_BIAS = -2.0
# ``l2den``'s initial c over the median norm of the attention output. The int8 .tflite of npu_int8_ptq without
# reconstruction on the proxy (10k test images, top-1 drop / agreement with FP32): 1x 0.88 pt / 93.0%,
# 1.5x 0.82 / 93.4%, 2.5x 0.79 / 93.7%, 4x 1.31 / 92.7% (l2: 1.40 / 90.8%): a larger c is closer to the
# exact output but leaves num fewer int8 levels beside c den in the one tensor (docs/npu.md)
DEN_WEIGHT_FACTOR = 2.5


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


NORMALISERS = ("l2", "l2den", "rsqrt", "rsqrtden")


def _normalise(ops: Ops, form: str, n: str, x: torch.Tensor, role_sq: Role, role_inv: Role, role_out: Role,
               axis: int) -> torch.Tensor:
    """x / ||x|| over ``axis`` (``l2``: L2_NORMALIZATION over the last dim) or x / rms(x) (``rsqrt``:
    MUL, MEAN over ``axis``, RSQRT, broadcast MUL)."""
    if form == "l2":
        return ops.tag(role_out, ops.l2_norm(n, x))
    sq = ops.tag(role_sq, ops.mul(f"{n}.sq", x, x))
    ms = ops.tag(role_sq, ops.mean_axis(f"{n}.ms", sq, axis))
    r = ops.tag(role_inv, ops.rsqrt(f"{n}.rsqrt", ms))
    return ops.tag(role_out, ops.mul(n, x, r))


class NPUAttention(DeployAttention):
    """The NPU attention (`DeployAttention.forward_npu`) with the normaliser form ``npu_normaliser``
    (l2 | l2den | rsqrt | rsqrtden)."""

    npu_normaliser = "l2"

    def npu_normalise(self, ops: Ops, h: str, num: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      head: int) -> torch.Tensor:
        if self.npu_normaliser == "l2":
            return super().npu_normalise(ops, h, num, q, k, head)
        if self.npu_normaliser == "rsqrtden":  # num / den = (num r) r, r = RSQRT(den): exact (module docstring)
            r = ops.tag(Role.ATTN_DEN_INV, ops.rsqrt(f"{h}.den_rsqrt", self._den(ops, h, q, k, head, Role.ATTN_DEN)))
            half = ops.tag(Role.ATTN_NUM, ops.mul(f"{h}.num_r", num, r))
            return ops.tag(Role.ATTN_OUT, ops.mul(f"{h}.norm", half, r))
        if self.npu_normaliser == "l2den":  # L2 of [num, c den] (module docstring), then num's channels
            den = self._den(ops, h, q, k, head, Role.ATTN_NUM)  # one int8 grid with num: they are concatenated
            both = ops.tag(Role.ATTN_NUM, ops.cat(f"{h}.num_den", [num, den], dim=3))       # (B, N, 1, D + 1)
            unit = ops.tag(Role.ATTN_OUT, ops.l2_norm(f"{h}.l2", both))
            out, _ = ops.split(f"{h}.l2_num", unit, [num.shape[-1], 1], dim=3)
            return ops.tag(Role.ATTN_OUT, out)
        # channels on axis 2, (B, N, D, 1): the MEAN over them is an 'x/y' reduction
        col = ops.tag(Role.ATTN_NUM, ops.retoken(f"{h}.num_col", num, "col"))
        out = _normalise(ops, "rsqrt", f"{h}.norm", col, Role.ATTN_DEN, Role.ATTN_DEN_INV, Role.ATTN_OUT, 2)
        return ops.tag(Role.ATTN_OUT, ops.retoken(f"{h}.norm_row", out, "row"))


    def _den(self, ops: Ops, h: str, q: torch.Tensor, k: torch.Tensor, head: int, role: Role) -> torch.Tensor:
        """The head's denominator mean_d(q_d mean_n(k_n,d)), (B, N, 1, 1), from MEAN, MUL, MEAN (``l2den``: mean(k)
        weighted by the head's c); ``role``: its output's."""
        k_mean = ops.tag(Role.ATTN_KMEAN, ops.mean_axis(f"{h}.k_mean", k, 1))          # (B, 1, D, 1)
        if self.npu_normaliser == "l2den":
            k_mean = ops.tag(Role.ATTN_KMEAN, ops.mul_const(f"{h}.k_mean_c", k_mean, self.den_weight[head]))
        den = ops.tag(Role.ATTN_DEN, ops.mul(f"{h}.den_prod", q, k_mean))
        return ops.tag(role, ops.mean_axis(f"{h}.den", den, 2))


class NPUHeadCARE(DeployCARE):
    """`DeployCARE` whose head after the global pool is SiLU and a LayerNorm from NPU ops (`npu_head`)."""

    npu_normaliser = "l2"

    def forward_head(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        x = ops.tag(Role.POOL, ops.global_pool("head.pool", x))
        x = ops.tag(Role.HEAD, ops.silu("head.act", x))  # the 1.702 is in the last conv (npu_head)
        mu = ops.tag(Role.HEAD, ops.mean_axis("head.norm.mean", x, 1))
        x = ops.tag(Role.HEAD, ops.sub("head.norm.centred", x, mu))
        x = _normalise(ops, self.npu_normaliser, "head.norm", x, Role.HEAD, Role.HEAD, Role.HEAD, 1)
        return ops.output("logits", ops.tag(Role.HEAD, ops.linear("head.fc", x, self.fc)))


@torch.no_grad()
def npu_head(model: DeployCARE, normaliser: str = "l2") -> DeployCARE:
    """A copy of ``model`` with the NPU head (module docstring), an `NPUHeadCARE`."""
    if normaliser not in NORMALISERS:
        raise CareQError(f"NPU normaliser '{normaliser}': expected one of {', '.join(NORMALISERS)}")
    if isinstance(model, NPUHeadCARE):
        return model
    if not model.blocks[-1].last:
        raise CareQError("the NPU head folds GELU's 1.702 into the last block's last conv, which this model lacks")
    model = copy.deepcopy(model)
    conv = model.blocks[-1].inter2_conv
    conv.weight.mul_(GELU_SIGMOID_SLOPE)  # pool(a h) = a pool(h): the SiLU's input is 1.702 x
    if conv.bias is not None:
        conv.bias.mul_(GELU_SIGMOID_SLOPE)
    normaliser = _HEAD_FORM.get(normaliser, normaliser)
    if normaliser == "l2":  # d / ||d|| = LayerNorm(d) / sqrt(C)
        model.fc.weight.mul_(math.sqrt(model.fc.in_features))
    model.__class__ = NPUHeadCARE
    model.npu_normaliser = normaliser
    return model


@torch.no_grad()
def npu_attention(model: DeployCARE, calib: torch.Tensor | None = None, normaliser: str = "l2") -> DeployCARE:
    """A copy of ``model`` whose linear attention uses only NPU-mapped ops (module docstring).

    ``calib``: a few input images; each head's output scale starts at the median norm of the
    exact attention output on them (else 1), divided by sqrt(D) for the ``rsqrt`` normaliser (``l2den``: see
    DEN_WEIGHT_FACTOR; ``rsqrtden`` is exact: 1)."""
    if normaliser not in NORMALISERS:
        raise CareQError(f"NPU normaliser '{normaliser}': expected one of {', '.join(NORMALISERS)}")
    rec = _OutNorms()
    if calib is not None and normaliser != "rsqrtden":  # rsqrtden is exact: no scale to start from the norms
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
        if normaliser == "rsqrt":  # num / rms(num) = sqrt(D) num / ||num||
            g = g / math.sqrt(d)
        if normaliser == "l2den":  # c = f m: at the median norm m, out / (m sqrt(1 + f^2)) comes out of the L2
            c = g * DEN_WEIGHT_FACTOR
            att.den_weight = nn.ParameterList([nn.Parameter(v.float().clone()) for v in c])
            g = c * math.sqrt(1 + 1 / DEN_WEIGHT_FACTOR ** 2)
        att.out_scale = nn.Parameter(g.repeat_interleave(d).float())
        att.mode = "npu"
        att.__class__ = NPUAttention
        att.npu_normaliser = normaliser
    return model


def substitution_params(module: nn.Module) -> dict[str, nn.Parameter]:
    """The float parameters of the substitutions inside ``module`` that reconstruction can learn
    (``reconstruction.learn: substitution``), by name: each NPU attention's kernel affine (the
    per-channel a and b of ``sigmoid(a x + b)``: ``phi_aff``'s weight and bias) and its output scale.
    Per-channel, so their int8 forms (a 1x1 depthwise conv, the scale's 1x1 depthwise conv) are exact."""
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, NPUAttention):
            pre = f"{name}." if name else ""
            for key, p in (("phi_aff.weight", m.phi_aff.weight), ("phi_aff.bias", m.phi_aff.bias),
                           ("out_scale", m.out_scale)):
                out[pre + key] = p
            for i, p in enumerate(getattr(m, "den_weight", [])):
                out[f"{pre}den_weight.{i}"] = p
    return out


def unit_output_gains(model: DeployCARE) -> dict[str, float]:
    """Per block name, how much larger the substituted ``model``'s block output is than the original's:
    the NPU head folds GELU's 1.702 into the last block's last conv (`npu_head`)."""
    if isinstance(model, NPUHeadCARE):
        return {model.block_names()[-1]: GELU_SIGMOID_SLOPE}
    return {}


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
    form = getattr(recipe, "npu_normaliser", "l2")
    if recipe.attention == "npu":
        model = npu_attention(model, calib, form)
        notes.append("linear attention in its NPU form (positive kernel relu(x) + sigmoid(a x + b) / sigmoid(b), "
                     f"products as MUL + MEAN, normaliser as {_FORMS[form]}): approximate; fine-tune (QAT)")
    if getattr(recipe, "head_form", "exact") == "npu":
        model = npu_head(model, form)
        notes.append(f"head in its int8 NPU form (GELU as SiLU, 1.702 folded into the last conv; LayerNorm as MEAN, "
                     f"SUB, {_FORMS[_HEAD_FORM.get(form, form)]}, eps dropped): approximate")
    return model, notes


_FORMS = {"l2": "L2_NORMALIZATION", "l2den": "L2_NORMALIZATION of [num, c den]", "rsqrt": "MUL, MEAN, RSQRT, MUL",
          "rsqrtden": "num RSQRT(den) RSQRT(den)"}
# the head's LayerNorm has no denominator: l2den's head is l2's, rsqrtden's rsqrt's
_HEAD_FORM = {"l2den": "l2", "rsqrtden": "rsqrt"}
