"""The deploy form: the inference graph quantization starts from.

`deploy(model)` returns a `DeployCARE` equal to the original in FP32, with

- every BatchNorm folded into the adjacent conv: the stem BN into the stem conv (post-norm),
  the downsample BN and both pre-norm BNs of each interaction module into the following
  convs (pre-norm: exact because those convs have no padding);
- layer scale folded into ``inter2_fc2``; the official block scales the whole interaction
  output, inner residual included, so that residual keeps an explicit per-channel multiply;
- the two classifier heads merged into one affine-free LayerNorm + one Linear
  (``(fc1(LN1(y)) + fc2(LN2(y))) / 2`` is linear in the shared normalised ``y``);
- the linear attention written as explicit named ops (``elu``, ``+1``, the k^T v product, the
  token mean, the normaliser, one divide), and the spatial mean as flatten + mean over one
  axis instead of ``x.mean((2, 3))``.

The forward is written against `care_q.graph.ops.Ops` so calibration, fake quantization and
export interpret the very same graph, tensor names included. Each op call that produces a tensor
a recipe may address by role wraps it in ``ops.tag(Role...., ...)`` (untagged: ``conv``).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from care_q.graph.ops import FloatOps, Ops
from care_q.graph.roles import Role
from care_q.models.care import CARE, CAREBlock, Head

# ----------------------------------------------------------------------------- folding


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """BN(x) = a * x + t in eval mode."""
    a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return a, bn.bias - bn.running_mean * a


def _conv_like(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, conv.groups, bias=True)
    new.weight.data.copy_(weight)
    new.bias.data.copy_(bias)
    return new


def _bias(conv: nn.Conv2d) -> torch.Tensor:
    return conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)


@torch.no_grad()
def fold_bn_after(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """conv -> BN as one conv."""
    a, t = _bn_affine(bn)
    return _conv_like(conv, conv.weight * a.reshape(-1, 1, 1, 1), _bias(conv) * a + t)


@torch.no_grad()
def fold_bn_before(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> nn.Conv2d:
    """BN -> conv as one conv; exact only for a dense conv without padding."""
    if conv.groups != 1 or any(p != 0 for p in conv.padding):
        raise ValueError("a BatchNorm folds into a following conv only if it is dense and unpadded")
    a, t = _bn_affine(bn)
    w = conv.weight * a.reshape(1, -1, 1, 1)
    b = _bias(conv) + (conv.weight * t.reshape(1, -1, 1, 1)).sum(dim=(1, 2, 3))
    return _conv_like(conv, w, b)


@torch.no_grad()
def scale_out_channels(conv: nn.Conv2d, scale: torch.Tensor) -> nn.Conv2d:
    return _conv_like(conv, conv.weight * scale.reshape(-1, 1, 1, 1), _bias(conv) * scale)


@torch.no_grad()
def merge_heads(h1: Head, h2: Head) -> tuple[nn.Linear, float]:
    """(fc1(LN1(y)) + fc2(LN2(y))) / 2 == fc(LN(y)) with an affine-free LN."""
    if h1.norm.eps != h2.norm.eps:
        raise ValueError("heads with different LayerNorm eps cannot be merged")
    w = (h1.fc.weight * h1.norm.weight + h2.fc.weight * h2.norm.weight) / 2
    b = (h1.fc.weight @ h1.norm.bias + h1.fc.bias + h2.fc.weight @ h2.norm.bias + h2.fc.bias) / 2
    fc = nn.Linear(w.shape[1], w.shape[0])
    fc.weight.data.copy_(w)
    fc.bias.data.copy_(b)
    return fc, h1.norm.eps


# ----------------------------------------------------------------------------- modules


class DeployAttention(nn.Module):
    """Linear attention of stages 3-4, op by op."""

    def __init__(self, qk: nn.Conv2d, mem_dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.qk = copy.deepcopy(qk)
        self.mem_dim = mem_dim
        self.num_heads = num_heads
        self.eps = eps

    mode = "exact"  # "npu" after care_q.transforms.substitute.npu_attention
    # "reciprocal" (`reciprocal_normaliser` below, recipe transforms.reciprocal_normaliser): num * (1 / den), the same
    # function in FP32; the int8 division then runs on the (B, h, N, 1) normaliser only, D times
    # fewer elements, and the product on the full tensor is an int8 MUL (XNNPACK, onnxruntime).
    normaliser = "div"

    def forward(self, att: torch.Tensor, ops: Ops, n: str) -> torch.Tensor:
        if self.mode == "npu":
            return self.forward_npu(att, ops, n)
        hw = (att.shape[2], att.shape[3])
        tokens = hw[0] * hw[1]
        qk = ops.tag(Role.ATTN_QK, ops.conv(f"{n}.qk", att, self.qk))
        q, k = ops.split(f"{n}.qk_split", qk, [self.mem_dim] * 2)
        v = ops.to_heads(f"{n}.v", att, self.num_heads)
        q, k = ops.to_heads(f"{n}.q", q, self.num_heads), ops.to_heads(f"{n}.k", k, self.num_heads)
        elu_q = ops.tag(Role.ATTN_ELU, ops.elu(f"{n}.elu_q", q))
        phi_q = ops.tag(Role.ATTN_PHI, ops.add_const(f"{n}.phi_q", elu_q, 1.0))   # elu + 1 kernels
        elu_k = ops.tag(Role.ATTN_ELU, ops.elu(f"{n}.elu_k", k))
        phi_k = ops.tag(Role.ATTN_PHI, ops.add_const(f"{n}.phi_k", elu_k, 1.0))
        kv = ops.tag(Role.ATTN_KV, ops.matmul(f"{n}.kTv", phi_k, v, transpose_a=True))   # (B, h, D, D)
        kv = ops.tag(Role.ATTN_KV, ops.mul_const(f"{n}.kv", kv, 1.0 / tokens))
        k_mean = ops.tag(Role.ATTN_KMEAN, ops.mean_tokens(f"{n}.k_mean", phi_k))       # (B, h, 1, D)
        den = ops.tag(Role.ATTN_DEN, ops.matmul(f"{n}.den", phi_q, k_mean, transpose_b=True))  # (B, h, N, 1)
        den = ops.tag(Role.ATTN_DEN, ops.add_const(f"{n}.den_eps", den, self.eps))  # the divisor guard
        num = ops.tag(Role.ATTN_NUM, ops.matmul(f"{n}.num", phi_q, kv))             # (B, h, N, D)
        if self.normaliser == "reciprocal":
            out = ops.mul(f"{n}.out", num, ops.tag(Role.ATTN_DEN_INV, ops.reciprocal(f"{n}.den_inv", den)))
        else:
            out = ops.div(f"{n}.out", num, den)
        return ops.tag(Role.ATTN_OUT, ops.from_heads(f"{n}.merge", ops.tag(Role.ATTN_OUT, out), hw))

    def forward_npu(self, att: torch.Tensor, ops: Ops, n: str) -> torch.Tensor:
        """The NPU form (see `care_q.transforms.substitute.npu_attention`): a positive kernel from
        RELU/LOGISTIC, the products as MUL + MEAN per head, the normaliser as an L2 normalisation."""
        hw = (att.shape[2], att.shape[3])
        qk = ops.tag(Role.ATTN_QK, ops.conv(f"{n}.qk", att, self.qk))
        aff = ops.tag(Role.ATTN_ELU, ops.conv(f"{n}.phi_aff", qk, self.phi_aff))
        e = ops.tag(Role.ATTN_ELU, ops.mul_const(f"{n}.phi_exp", ops.tag(Role.ATTN_ELU, ops.sigmoid(f"{n}.phi_sig", aff)),
                                                 self.phi_exp_scale))
        phi = ops.tag(Role.ATTN_PHI, ops.add(f"{n}.phi", ops.tag(Role.ATTN_ELU, ops.relu(f"{n}.phi_relu", qk)), e))
        d = self.mem_dim // self.num_heads
        qk_heads = ops.split(f"{n}.phi_split", phi, [d] * (2 * self.num_heads))  # q heads, then k heads
        vs = ops.split(f"{n}.v", att, [d] * self.num_heads) if self.num_heads > 1 else (att,)
        outs = []
        for i in range(self.num_heads):
            h = f"{n}.h{i}"
            q = ops.to_tokens(f"{h}.q", qk_heads[i], "col")                 # (B, N, D, 1)
            k = ops.to_tokens(f"{h}.k", qk_heads[self.num_heads + i], "col")
            v = ops.to_tokens(f"{h}.v", vs[i], "row")                       # (B, N, 1, D)
            kv = ops.tag(Role.ATTN_KV, ops.mul(f"{h}.kv_prod", k, v))
            kv = ops.tag(Role.ATTN_KV, ops.mean_axis(f"{h}.kv", kv, 1))        # (B, 1, D, D)
            num = ops.tag(Role.ATTN_NUM, ops.mul(f"{h}.num_prod", q, kv))
            num = ops.tag(Role.ATTN_NUM, ops.mean_axis(f"{h}.num", num, 2))    # (B, N, 1, D)
            out = self.npu_normalise(ops, h, num, q, k, i)
            outs.append(ops.tag(Role.ATTN_OUT, ops.from_tokens(f"{h}.out", out, hw)))
        heads = ops.tag(Role.ATTN_OUT, ops.cat(f"{n}.heads", outs)) if len(outs) > 1 else outs[0]
        return ops.tag(Role.ATTN_OUT, ops.mul_const(f"{n}.out", heads, self.out_scale))

    def npu_normalise(self, ops: Ops, h: str, num: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      head: int) -> torch.Tensor:
        """The NPU form's normaliser of one head's numerator (B, N, 1, D), given the head's kernel
        features q and k (B, N, D, 1): an L2 normalisation (`care_q.transforms.substitute.NPUAttention`
        offers other forms)."""
        return ops.tag(Role.ATTN_OUT, ops.l2_norm(f"{h}.l2", num))


class DeployBlock(nn.Module):
    def __init__(self, blk: CAREBlock):
        super().__init__()
        tm, it = blk.token_mixer, blk.inter_layer
        self.last = blk.last
        self.split = list(tm.split)
        self.attention = tm.attention
        if tm.attention:
            self.attn = DeployAttention(tm.qk, tm.mem_dim, tm.num_heads)
        else:
            self.dwconvatt_1 = copy.deepcopy(tm.dwconvatt_1)
            self.dwconvatt_2 = copy.deepcopy(tm.dwconvatt_2)
        self.dwconv1 = copy.deepcopy(tm.dwconv1)
        self.dwconv2 = copy.deepcopy(tm.dwconv2)
        self.inter1_fc1 = fold_bn_before(it.inter1_norm, it.inter1_fc1)
        self.inter1_conv = copy.deepcopy(it.inter1_conv)
        self.inter1_fc2 = copy.deepcopy(it.inter1_fc2)
        self.inter2_fc1 = fold_bn_before(it.inter2_norm, it.inter2_fc1)
        self.inter2_conv = copy.deepcopy(it.inter2_conv)
        self.act = "gelu"  # or "silu" after care_q.transforms.substitute.gelu_to_silu
        if not self.last:
            gamma = blk.gamma.detach().clone()
            self.inter2_fc2 = scale_out_channels(it.inter2_fc2, gamma)
            self.register_buffer("gamma", gamma)

    def forward(self, x: torch.Tensor, ops: Ops, n: str) -> torch.Tensor:
        mem, att, c1, c2 = ops.split(f"{n}.split", x, self.split)
        if self.attention:
            att = self.attn(att, ops, f"{n}.attn")
        else:
            att = ops.add(f"{n}.dwatt", ops.conv(f"{n}.dwconvatt_1", att, self.dwconvatt_1),
                          ops.conv(f"{n}.dwconvatt_2", att, self.dwconvatt_2))
        c1 = ops.conv(f"{n}.dwconv1", c1, self.dwconv1)
        c2 = ops.conv(f"{n}.dwconv2", c2, self.dwconv2)
        feats = ops.cat(f"{n}.feats", [att, c1, c2])
        act = ops.gelu if self.act == "gelu" else ops.silu
        h = ops.tag(Role.GELU, act(f"{n}.inter1_act", ops.conv(f"{n}.inter1_fc1", feats, self.inter1_fc1)))
        h = ops.conv(f"{n}.inter1_fc2", ops.conv(f"{n}.inter1_conv", h, self.inter1_conv), self.inter1_fc2)
        feats = ops.tag(Role.RESIDUAL, ops.add(f"{n}.inter1_res", h, feats))
        cat = ops.tag(Role.RESIDUAL, ops.cat(f"{n}.cat", [mem, feats]))
        h = ops.tag(Role.GELU, act(f"{n}.inter2_act", ops.conv(f"{n}.inter2_fc1", cat, self.inter2_fc1)))
        h = ops.conv(f"{n}.inter2_conv", h, self.inter2_conv)
        if self.last:
            return h
        y = ops.conv(f"{n}.inter2_fc2", h, self.inter2_fc2)
        skip = ops.tag(Role.RESIDUAL, ops.add(f"{n}.skip", x, ops.tag(Role.LAYER_SCALE,
                                                                       ops.mul_const(f"{n}.ls_res", cat, self.gamma))))
        return ops.tag(Role.RESIDUAL, ops.add(f"{n}.out", y, skip))


class DeployCARE(nn.Module):
    """CARE in deploy form; `forward(x)` is FP32, `forward(x, ops)` any interpretation."""

    def __init__(self, model: CARE):
        super().__init__()
        self.arch = getattr(model, "care_q_name", None)
        self.num_classes = model.num_classes
        self.pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}))
        self.stem = fold_bn_after(model.stem[0], model.stem[1])
        self.downsample = nn.ModuleList()
        self.blocks = nn.ModuleList()
        self.stage_of_block: list[int] = []
        for i, stage in enumerate(model.stages):
            if isinstance(stage.downsample, nn.Sequential):
                self.downsample.append(fold_bn_before(stage.downsample[0], stage.downsample[1]))
            else:
                self.downsample.append(nn.Identity())
            for blk in stage.blocks:
                self.blocks.append(DeployBlock(blk))
                self.stage_of_block.append(i)
        self.fc, self.ln_eps = merge_heads(model.head, model.dist_head)
        self.eval()

    def block_names(self) -> list[str]:
        counts: dict[int, int] = {}
        names = []
        for s in self.stage_of_block:
            names.append(f"stages.{s}.blocks.{counts.get(s, 0)}")
            counts[s] = counts.get(s, 0) + 1
        return names

    def forward_features(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        x = ops.conv("stem", ops.input("input", x), self.stem)
        prev = 0
        for name, s, blk in zip(self.block_names(), self.stage_of_block, self.blocks):
            if s != prev:  # entering a new stage: every stage after the first downsamples
                prev = s
                x = ops.conv(f"stages.{s}.downsample", x, self.downsample[s])
            x = blk(x, ops, name)
        return x

    def forward(self, x: torch.Tensor, ops: Ops | None = None) -> torch.Tensor:
        ops = ops or FloatOps()
        return self.forward_head(self.forward_features(x, ops), ops)

    def forward_head(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        """The logits from the last block's output: pool -> GELU -> LayerNorm -> FC."""
        x = ops.tag(Role.POOL, ops.global_pool("head.pool", x))
        x = ops.tag(Role.HEAD, ops.gelu("head.act", x))
        x = ops.tag(Role.HEAD, ops.layer_norm("head.norm", x, self.ln_eps))
        return ops.output("logits", ops.tag(Role.HEAD, ops.linear("head.fc", x, self.fc)))


def deploy(model: CARE) -> DeployCARE:
    """The FP32-equivalent inference form of a CARE model (see module docstring)."""
    if isinstance(model, DeployCARE):
        return model
    if not isinstance(model, CARE):
        raise TypeError(f"deploy() takes a care_q CARE model, got {type(model).__name__}")
    return DeployCARE(model).eval()


def reciprocal_normaliser(model: DeployCARE) -> DeployCARE:
    """A copy of ``model`` whose exact linear attentions compute num * (1 / den) instead of num / den:
    the same function in FP32 (equal to round-off). In int8 the division, which XNNPACK has no
    int8 kernel for (TFLite's own DIV runs it) and onnxruntime runs in float, then covers the
    (B, heads, N, 1) normaliser alone, and the full (B, heads, N, D) tensor is an int8 MUL. One more
    rounding (1 / den on its own int8 grid, role ``attn_den_inv``)."""
    model = copy.deepcopy(model)
    for blk in model.blocks:
        if blk.attention and blk.attn.mode == "exact":
            blk.attn.normaliser = "reciprocal"
    return model
