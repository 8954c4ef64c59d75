"""The op vocabulary the deploy form is written in.

`DeployCARE.forward(x, ops)` calls these methods instead of torch functions, each with a
stable tensor name (``stages.2.blocks.0.attn.phi_q``). The same forward is then interpreted
by different backends:

- `FloatOps` (here): plain PyTorch, the FP32 deploy form.
- `care_q.graph.trace.TraceOps`: records a graph for the exporters.
- `care_q.quant.fakequant.QuantOps`: observes (calibration) or fake-quantizes every
  named tensor (the PyTorch reference of the int8 artifacts, and QAT).

A tensor's role (`care_q.graph.roles.Role`, what recipes address) is given where the op producing
it is called: ``ops.tag(Role.ATTN_PHI, ops.add_const(...))``. `tag` computes nothing; the tracer
records the role on the producing node.

Tensors are NCHW for images and (B, heads, N, D) for attention tokens, as in PyTorch; the
exporters own the target layouts.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from care_q.graph.roles import Role


class Ops:
    """Interface; `FloatOps` is the reference semantics of every op."""

    def input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x

    def output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x

    def tag(self, role: Role, x):
        """``x`` (a tensor, or the tuple a split returns), whose producing op gives it ``role``."""
        return x

    # --- linear ops with weights ---------------------------------------------------
    def conv(self, name: str, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                        conv.groups)

    def linear(self, name: str, x: torch.Tensor, fc: nn.Linear) -> torch.Tensor:
        return F.linear(x, fc.weight, fc.bias)

    # --- elementwise ---------------------------------------------------------------
    def add(self, name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b

    def mul(self, name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b

    def add_const(self, name: str, x: torch.Tensor, value: float) -> torch.Tensor:
        return x + value

    def mul_const(self, name: str, x: torch.Tensor, value: torch.Tensor | float) -> torch.Tensor:
        """Multiply by a constant (a scalar, or a per-channel vector broadcast on dim 1)."""
        if isinstance(value, torch.Tensor) and value.dim() == 1:
            value = value.reshape(1, -1, *([1] * (x.dim() - 2)))
        return x * value

    def div(self, name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a / b

    def sub(self, name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a - b (broadcasting; the NPU head's LayerNorm centring, TFLite SUB)."""
        return a - b

    def rsqrt(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """1 / sqrt(x) (TFLite RSQRT; the NPU normalisers). x = 0 gives +inf, which int8 clamps."""
        return torch.rsqrt(x)

    def reciprocal(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """1 / x (the attention normaliser's reciprocal, see `DeployAttention.normaliser`)."""
        return 1.0 / x

    def gelu(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x)

    def elu(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x)

    def silu(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x * sigmoid(x): the GELU substitute (see `care_q.transforms.substitute`)."""
        return F.silu(x)

    def relu(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)

    def sigmoid(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)

    def l2_norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x / ||x|| over the last dim (TFLite L2_NORMALIZATION; its epsilon 1e-6 on ||x||^2)."""
        return x * torch.rsqrt(torch.clamp((x * x).sum(-1, keepdim=True), min=1e-6))

    # --- data movement (output shares the input's quantization) --------------------
    def split(self, name: str, x: torch.Tensor, sizes: list[int], dim: int = 1):
        return torch.split(x, sizes, dim=dim)

    def cat(self, name: str, xs: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
        return torch.cat(xs, dim=dim)

    def to_heads(self, name: str, x: torch.Tensor, num_heads: int) -> torch.Tensor:
        """(B, C, H, W) -> (B, heads, N=H*W, D=C/heads)."""
        b, c, h, w = x.shape
        return x.reshape(b, num_heads, c // num_heads, h * w).transpose(-2, -1)

    def from_heads(self, name: str, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """(B, heads, N, D) -> (B, C, H, W)."""
        b, nh, n, d = x.shape
        return x.transpose(-2, -1).reshape(b, nh * d, hw[0], hw[1])

    def to_tokens(self, name: str, x: torch.Tensor, kind: str) -> torch.Tensor:
        """(B, C, H, W) -> (B, N=H*W, C, 1) (``kind="col"``) or (B, N, 1, C) (``"row"``): the
        NPU attention's token layout, one RESHAPE of the NHWC tensor in TFLite."""
        b, c, h, w = x.shape
        t = x.permute(0, 2, 3, 1)
        return t.reshape(b, h * w, c, 1) if kind == "col" else t.reshape(b, h * w, 1, c)

    def from_tokens(self, name: str, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """(B, N, 1, C) -> (B, C, H, W)."""
        b, n, _, c = x.shape
        return x.reshape(b, hw[0], hw[1], c).permute(0, 3, 1, 2)

    def retoken(self, name: str, x: torch.Tensor, kind: str) -> torch.Tensor:
        """(B, N, 1, C) -> (B, N, C, 1) (``kind="col"``) or back (``"row"``): the same element
        order, one RESHAPE in TFLite (puts a token's channels on a 'spatial' axis for the NPUs' MEAN)."""
        b, n = x.shape[0], x.shape[1]
        c = x.shape[2] * x.shape[3]
        return x.reshape(b, n, c, 1) if kind == "col" else x.reshape(b, n, 1, c)

    def mean_axis(self, name: str, x: torch.Tensor, axis: int) -> torch.Tensor:
        """Mean over one axis of a token tensor, kept (MEAN over an 'x/y' axis for the NPUs)."""
        return x.mean(dim=axis, keepdim=True)

    # --- reductions and products ---------------------------------------------------
    def matmul(self, name: str, a: torch.Tensor, b: torch.Tensor, transpose_a: bool = False,
               transpose_b: bool = False) -> torch.Tensor:
        if transpose_a:
            a = a.transpose(-2, -1)
        if transpose_b:
            b = b.transpose(-2, -1)
        return a @ b

    def mean_tokens(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, D) -> (B, heads, 1, D): mean over tokens."""
        return x.mean(dim=-2, keepdim=True)

    def global_pool(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C): spatial mean, written as a flatten + mean over one axis."""
        return x.flatten(2).mean(dim=-1)

    def layer_norm(self, name: str, x: torch.Tensor, eps: float) -> torch.Tensor:
        """LayerNorm over the last dim without affine (the affine is folded into the Linear)."""
        return F.layer_norm(x, x.shape[-1:], None, None, eps)


class FloatOps(Ops):
    """Plain PyTorch: the FP32 deploy form (what the FP32 exporters trace)."""

    def elu(self, name: str, x: torch.Tensor) -> torch.Tensor:
        # elu(x) = relu(x) + exp(min(x, 0)) - 1, exactly. Written this way because litert-torch
        # lowers F.elu to GREATER_EQUAL + SELECT, which XNNPACK rejects (one CPU island per ELU);
        # RELU, MINIMUM, EXP and ADD all stay in one XNNPACK partition.
        return F.relu(x) + torch.exp(torch.clamp(x, max=0.0)) - 1.0
