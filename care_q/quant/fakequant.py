"""Calibration and fake quantization as interpretations of the deploy form's ops.

`QuantOps(plan, mode)` runs `DeployCARE.forward(x, ops)`:

- mode "observe": float compute; every quantized tensor updates its `HistogramObserver`;
- mode "quant": the PyTorch reference of the int8 artifacts: weights quantized per channel
  (symmetric, [-127, 127]), biases to int32 at s_in * s_w, every activation rounded to its
  tensor's grid; the head after the pool in float, as the exporters emit it;
- mode "float": plain float compute (for side-by-side SQNR with `record=True`).

`exact=True` (quant mode) computes convolutions, 1x1 constant convs and matmuls the way the
integer runtimes do: exact integer accumulation (float64), then float32 requantization
``round_half_even(float32(acc) * (s_in * s_w / s_out))`` as XNNPACK and onnxruntime's MLAS
compute it. This is the verification reference: float32 accumulation alone differs from the
runtimes by one step on ~1e-5 of the outputs, which a low-SNR network amplifies.
``exact="xnnpack"`` also computes int8 ADDs as XNNPACK does (fixed-point multipliers, rounding
half up), and MUL, MEAN, LOGISTIC (and SiLU's LOGISTIC + MUL), L2_NORMALIZATION and RELU as
ai-edge-litert's kernels do (XNNPACK's or TFLite's own; `care_q.quant.emulation` names the sources):
the TFLite reference, bit for bit on the NPU recipe's graph. ``exact="onnxruntime"`` computes
int8 Adds as onnxruntime's QLinearAdd does on x86 (float32 fused multiply-adds on the stored
codes): the QDQ reference. Those emulations run only where no gradient is wanted.

Where the exporters choose how to lay an op out (scalar constants, ``x + c`` as a 1x1 conv,
TFLite's own kernel for large depthwise convs), this module follows `care_q.quant.layout_policy`.

Gradients pass straight through the rounding (STE), so QAT trains this same module.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from care_q.graph.ops import Ops
from care_q.quant.emulation.integer import F32_EXACT, integer_product
from care_q.quant.emulation.onnxruntime import (
    onnxruntime_add_codes,
    onnxruntime_mul_codes,
    onnxruntime_quantize_codes,
)
from care_q.quant.emulation.tflite import (
    tflite_conv_requant_codes,
    tflite_div_codes,
    tflite_l2norm_codes,
    tflite_relu_codes,
    tflite_rsqrt_codes,
)
from care_q.quant.emulation.xnnpack import (
    xnnpack_add_codes,
    xnnpack_mean_codes,
    xnnpack_mul_codes,
    xnnpack_sigmoid_table,
)
from care_q.quant.layout_policy import (
    SIGMOID_QPARAMS,
    scalar_const,
    scalar_value,
    tflite_builtin_dwconv,
    unit_weight_and_bias,
    weight_qmax,
)
from care_q.quant.observers import HistogramObserver
from care_q.quant.plan import SHARED_OPS, QuantPlan
from care_q.quant.qtypes import DType, QParams


def fake_quant(x: torch.Tensor, qp: QParams | None) -> torch.Tensor:
    if qp is None:
        return x
    if x.requires_grad or x.dtype != torch.float32:
        return torch.fake_quantize_per_tensor_affine(x, qp.scale[0], qp.zero_point[0], qp.qmin, qp.qmax)
    # Inference: the same arithmetic as PyTorch's fake-quant kernel (float32 x * (1f / scale),
    # round half to even, + zero point, clamp, - zero point, * scale), in place, about 2x faster
    # on CPU (verification runs a 224 model over hundreds of images).
    sc = np.float32(qp.scale[0])
    zp = float(qp.zero_point[0])
    inv = float(np.float32(1.0) / sc)
    y = torch.mul(x, inv).round_()
    return y.add_(zp).clamp_(qp.qmin, qp.qmax).sub_(zp).mul_(float(sc))


def weight_scales(w: torch.Tensor, per_channel: bool = True, qmax: int = 127) -> torch.Tensor:
    """Symmetric weight scales over [-qmax, qmax] (int8: 127), per output channel (dim 0)."""
    if per_channel:
        amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)
    else:
        amax = w.detach().abs().max().expand(w.shape[0])
    return torch.clamp(amax, min=1e-12) / float(qmax)


def quantize_weight(w: torch.Tensor, scales: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    zp = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scales.float(), zp, 0, -qmax, qmax)


def quantize_bias(b: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Round a bias to int32 at the given per-channel scales (s_in * s_w)."""
    q = torch.clamp(torch.round(b / scales), -(2 ** 31), 2 ** 31 - 1)
    return b + (q * scales - b).detach()


class QuantOps(Ops):
    def __init__(self, plan: QuantPlan, mode: str = "quant", record: bool = False,
                 observers: dict[str, HistogramObserver] | None = None, exact: bool | str = False,
                 ort_act_offset: int = 128):
        if mode not in ("observe", "quant", "float"):
            raise ValueError(mode)
        if exact not in (False, True, "xnnpack", "onnxruntime"):
            raise ValueError(f"exact={exact!r}")
        self.exact = bool(exact) and mode == "quant"
        self.xnnpack = exact == "xnnpack" and mode == "quant"  # TFLite's int8 kernels (care_q.quant.emulation)
        # onnxruntime's QLinearAdd (x86); int8 grids stored with this offset (the QDQ file's act_type)
        self.ort = exact == "onnxruntime" and mode == "quant"
        self.ort_act_offset = ort_act_offset
        self.plan = plan
        self.mode = mode
        self.observers = observers if observers is not None else {}
        self.record: dict[str, torch.Tensor] | None = {} if record else None
        self.per_channel = plan.recipe.weight_granularity == "per_channel"
        self.w_qmax = weight_qmax(plan)
        self._tables: dict[tuple, torch.Tensor] = {}  # XNNPACK LOGISTIC tables by quantization

    # ------------------------------------------------------------------ helpers
    def _out(self, name: str, y: torch.Tensor, op: str = "") -> torch.Tensor:
        spec = self.plan.specs.get(name)
        if self.record is not None:
            self.record[name] = y.detach()
        if spec is None or spec.dtype == DType.FLOAT or self.mode == "float":
            return y
        if self.mode == "observe":
            if op not in SHARED_OPS:
                obs = self.observers.get(name)
                if obs is None:
                    obs = self.observers[name] = HistogramObserver(name)
                obs.update(y)
            return y
        y = fake_quant(y, self.plan.qp(name))
        if self.record is not None:
            self.record[name] = y.detach()
        return y

    def _wq(self) -> bool:
        return self.mode == "quant"

    def _exact_ok(self, name: str, inputs: list[str]) -> bool:
        return self.exact and all(self.plan.qp(t) is not None for t in [name, *inputs])

    def _ints(self, x: torch.Tensor, tensor: str) -> torch.Tensor:
        """Integer values (minus zero point) of a tensor on its grid, as float64."""
        qp = self.plan.qp(tensor)
        return torch.round(x.double() / qp.scale[0])

    def _requant(self, name: str, acc: torch.Tensor, scale_in: torch.Tensor, channel_dim: int | None) -> torch.Tensor:
        """float32(acc) * float32(scale_in / s_out), round half to even, clamp: dequantized output."""
        qp = self.plan.qp(name)
        s_out = torch.tensor(qp.scale[0], dtype=torch.float32)
        scale = scale_in.float() / s_out
        if channel_dim is not None:
            shape = [1] * acc.dim()
            shape[channel_dim] = -1
            scale = scale.reshape(shape)
        y = acc.float()  # in place from here: a float32 acc is the caller's temporary
        y.mul_(scale).round_().clamp_(qp.qmin - qp.zero_point[0], qp.qmax - qp.zero_point[0])
        return y.mul_(s_out)

    def _int_weights(self, w: torch.Tensor, b: torch.Tensor | None, in_name: str):
        """(integer weight codes, float32 per-channel scales, int32-rounded bias at s_in * s_w), as
        float64 tensors: what the exporters write for a conv or linear module."""
        q = self.w_qmax
        s_w = weight_scales(w, self.per_channel, q).float()
        w_int = torch.clamp(torch.round(w.detach().double() / s_w.double().reshape((-1,) + (1,) * (w.dim() - 1))), -q, q)
        # s_in as the exporters take it (the plan's float64 value, not its float32 rounding): the
        # bias codes round(b / s_b) must be theirs, else one code in ~1e-7 differs by one.
        s_b = s_w.double() * float(self.plan.qp(in_name).scale[0])
        b0 = b.detach().double() if b is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        return w_int, s_w, torch.clamp(torch.round(b0 / s_b), -(2 ** 31), 2 ** 31 - 1)  # int32, as the exporters

    @staticmethod
    def _w_abs_sum(w_int: torch.Tensor) -> float:
        """max over output channels of sum |w|: `integer_product`'s bound."""
        return float(w_int.abs().reshape(w_int.shape[0], -1).sum(1).max())

    def _conv_acc(self, x, in_name, w_int, b_int, conv_args, w_abs_sum: float) -> torch.Tensor:
        """Exact int32 accumulators (bias added) of a conv over the integer codes of x, as float64."""
        acc = integer_product(lambda a, b: F.conv2d(a, b, None, *conv_args), self._ints(x, in_name), w_int, w_abs_sum)
        return acc + b_int.double().reshape(1, -1, 1, 1)

    def _exact_conv(self, name, x, in_name, w_int, s_w, b_int, conv_args) -> torch.Tensor:
        s_in = torch.tensor(self.plan.qp(in_name).scale[0], dtype=torch.float32)
        w_abs_sum = self._w_abs_sum(w_int)
        fast = self._exact_conv_f32(name, x, in_name, w_int, s_w, b_int, conv_args, s_in, w_abs_sum)
        if fast is not None:
            return fast
        acc = self._conv_acc(x, in_name, w_int, b_int, conv_args, w_abs_sum)
        return self._requant(name, acc, s_in * s_w.float(), 1)

    def _tflite_conv(self, name, x, in_name, w_int, s_w, b_int, conv_args) -> torch.Tensor:
        """A conv in TFLite's own int8 kernel (`tflite_builtin_dwconv`): exact int32 accumulation,
        TFLite's fixed-point requantization (`tflite_conv_requant_codes`)."""
        acc = self._conv_acc(x, in_name, w_int, b_int, conv_args, self._w_abs_sum(w_int))
        qp = self.plan.qp(name)
        codes = tflite_conv_requant_codes(acc, self.plan.qp(in_name).scale[0], s_w, qp.scale[0])
        codes = codes.clamp(qp.qmin - qp.zero_point[0], qp.qmax - qp.zero_point[0])
        return codes.float().mul_(torch.tensor(qp.scale[0], dtype=torch.float32))

    def _exact_conv_f32(self, name, x, in_name, w_int, s_w, b_int, conv_args, s_in, w_abs_sum):
        """`_exact_conv` in float32 throughout, where that is provably the same arithmetic (the
        verification of a 224 model spends most of its time converting to and from float64):
        the integer codes of x are exact in float32 (|code| <= 255; x / float32(scale) is within
        1e-5 of its code), the accumulation is exact when max|x| * sum|w| < 2^24 (as in
        `integer_product`), and float32(acc) + float32(bias) is one correctly rounded addition
        of two float32-exact integers when |bias| < 2^24: float32(acc + bias), what the float64
        path rounds to before its float32 requantization. None where a bound fails."""
        qp = self.plan.qp(in_name)
        x_int = torch.round(x / np.float32(qp.scale[0]))
        x_max = float(x_int.abs().max()) if x_int.numel() else 0.0
        if x_max * w_abs_sum >= F32_EXACT or (b_int.numel() and float(b_int.abs().max()) >= F32_EXACT):
            return None
        acc = F.conv2d(x_int, w_int.float(), None, *conv_args)
        acc.add_(b_int.float().reshape(1, -1, 1, 1))
        return self._requant(name, acc, s_in * s_w.float(), 1)

    # ------------------------------------------------------------------ ops
    def input(self, name, x):
        return self._out(name, x)

    def conv(self, name, x, conv):
        w, b = conv.weight, conv.bias
        in_name = self.plan.graph_inputs[name][0]
        if self._exact_ok(name, [in_name]):
            w_int, s_w, b_int = self._int_weights(w, b, in_name)
            args = (conv.stride, conv.padding, conv.dilation, conv.groups)
            if self.xnnpack and tflite_builtin_dwconv(self.plan, name, conv):
                return self._out(name, self._tflite_conv(name, x, in_name, w_int, s_w, b_int, args))
            return self._out(name, self._exact_conv(name, x, in_name, w_int, s_w, b_int, args))
        if self._wq():
            s_w = weight_scales(w, self.per_channel, self.w_qmax)
            w = quantize_weight(w, s_w, self.w_qmax)
            in_qp = self.plan.qp(self.plan.graph_inputs[name][0])
            if b is not None and in_qp is not None:
                b = quantize_bias(b, s_w * in_qp.scale[0])
        y = F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)
        return self._out(name, y)

    def linear(self, name, x, fc):
        # Float classifier unless the recipe says ``head.dtype: int8``: then (plan) the input and
        # the logits are int8 and this is a static int8 FC, weights per output channel, int32 bias
        # (the same arithmetic as a 1x1 conv). Int8 weights with a float input are never emitted:
        # XNNPACK turns DEQUANTIZE + FULLY_CONNECTED into a dynamically quantized FC whose input
        # rounding this reference cannot see (measured 8% of the logit scale).
        in_name = self.plan.graph_inputs[name][0]
        if self.mode != "quant" or not (self.plan.quantized(name) and self.plan.quantized(in_name)):
            return self._out(name, F.linear(x, fc.weight, fc.bias))
        w, b = fc.weight, fc.bias
        s_in = self.plan.qp(in_name).scale[0]
        if self.exact:
            w_int, s_w, b_int = self._int_weights(w, b, in_name)
            acc = F.linear(self._ints(x, in_name), w_int, b_int)
            return self._out(name, self._requant(name, acc, torch.tensor(s_in, dtype=torch.float32) * s_w, 1))
        q = self.w_qmax
        s_w = weight_scales(w, self.per_channel, q)
        return self._out(name, F.linear(x, quantize_weight(w, s_w, q), quantize_bias(b, s_w * s_in)))

    def add(self, name, a, b):
        ins = self.plan.graph_inputs[name]
        if self._tflite_int8_kernel(name) and len(ins) == 2 and self._exact_ok(name, ins):
            y = self._xnnpack_add(name, a, b, ins)
            if y is not None:
                return self._out(name, y)
        if self.ort and len(ins) == 2 and self._int8_ok(name, ins, a, b):
            qa, qb, qo = (self.plan.qp(t) for t in (*ins, name))
            q = onnxruntime_add_codes(self._ints(a, ins[0]), self._ints(b, ins[1]), qa, qb, qo, self.ort_act_offset)
            return self._out(name, self._dq(name, q))
        return self._out(name, a + b)

    def _xnnpack_add(self, name, a, b, ins) -> torch.Tensor | None:
        qa, qb, qo = (self.plan.qp(t) for t in (*ins, name))
        q = xnnpack_add_codes(self._ints(a, ins[0]), self._ints(b, ins[1]), qa.scale[0], qb.scale[0], qo.scale[0],
                              qo.qmin - qo.zero_point[0], qo.qmax - qo.zero_point[0])
        return None if q is None else self._dq(name, q)

    def mul(self, name, a, b):
        ins = self.plan.graph_inputs[name]
        if self._tflite_ok(name, ins, a, b):
            y = self._xnnpack_mul(name, self._ints(a, ins[0]), self._ints(b, ins[1]), self.plan.qp(ins[0]),
                                  self.plan.qp(ins[1]))
            if y is not None:
                return self._out(name, y.to(a.dtype))
        if self.ort and self._int8_ok(name, ins, a, b):
            qa, qb, qo = (self.plan.qp(t) for t in (*ins, name))
            q = onnxruntime_mul_codes(self._ints(a, ins[0]), self._ints(b, ins[1]), qa, qb, qo, self.ort_act_offset)
            return self._out(name, self._dq(name, q).to(a.dtype))
        return self._out(name, a * b)

    def _tflite_int8_kernel(self, name: str) -> bool:
        """The TFLite reference, and node ``name`` runs TFLite's int8 kernel (not a float island, plan.float_kernels)."""
        return self.xnnpack and name not in self.plan.float_kernels

    def _tflite_ok(self, name: str, inputs: list[str], *xs: torch.Tensor) -> bool:
        """Emulate TFLite's int8 kernel: the TFLite reference, every tensor int8, no gradient
        wanted (QAT trains the float path)."""
        return self._tflite_int8_kernel(name) and self._int8_ok(name, inputs, *xs)

    def _int8_ok(self, name: str, inputs: list[str], *xs: torch.Tensor) -> bool:
        """A runtime's int8 kernel can be emulated: exact mode, every tensor int8, no gradient."""
        return (self._exact_ok(name, inputs) and not any(x.requires_grad for x in xs)
                and all(self.plan.qp(t).dtype == DType.INT8 for t in [name, *inputs]))

    def _dq(self, name: str, codes: torch.Tensor) -> torch.Tensor:
        """Output codes (minus the zero point) of tensor `name` as its float32 values."""
        return (codes * float(np.float32(self.plan.qp(name).scale[0]))).float()

    def _xnnpack_mul(self, name, ia, ib, qa: QParams, qb: QParams) -> torch.Tensor | None:
        qo = self.plan.qp(name)
        q = xnnpack_mul_codes(ia, ib, qa.scale[0], qb.scale[0], qo.scale[0], qo.qmin - qo.zero_point[0],
                              qo.qmax - qo.zero_point[0])
        return None if q is None else self._dq(name, q)

    def sub(self, name, a, b):
        # XNNPACK's int8 SUBTRACT: its ADD with the second input negated (the same fixed-point multipliers;
        # bit for bit on every code pair, tests/transforms/test_npu_graph.py)
        ins = self.plan.graph_inputs[name]
        if self._tflite_ok(name, ins, a, b):
            y = self._xnnpack_add(name, a, -b, ins)
            if y is not None:
                return self._out(name, y)
        return self._out(name, a - b)

    def rsqrt(self, name, x):
        in_name = self.plan.graph_inputs[name][0]
        if self._tflite_ok(name, [in_name], x):  # TFLite's own int8 RSQRT (emulated)
            qi, qo = self.plan.qp(in_name), self.plan.qp(name)
            return self._out(name, self._dq(name, tflite_rsqrt_codes(self._ints(x, in_name), qi.scale[0], qo.scale[0],
                                                                     qo.zero_point[0])))
        return self._out(name, torch.rsqrt(x.clamp(min=1e-12)))

    def add_const(self, name, x, value):
        if self.mode != "quant" or not self.plan.quantized(name):
            return self._out(name, x + value)
        value = self.plan.consts.get(name, value)  # the divisor guard (QuantPlan.finalize)
        in_name = self.plan.graph_inputs[name][0]
        if self.ort and self._int8_ok(name, [in_name], x):
            # the QDQ file's QLinearAdd of x and the scalar constant as the exporter writes it
            qa, qo = self.plan.qp(in_name), self.plan.qp(name)
            code, scale = scalar_const(float(value))
            qc = QParams((scale,), (0,), DType.INT8)
            q = onnxruntime_add_codes(self._ints(x, in_name), torch.tensor(float(code), dtype=torch.float64),
                                      qa, qc, qo, self.ort_act_offset)
            return self._out(name, self._dq(name, q))
        if self._exact_ok(name, [in_name]):
            ch = x.shape[1]
            s_w = torch.full((ch,), 1.0 / 127.0, dtype=torch.float32)
            s_b = s_w.double() * torch.tensor(self.plan.qp(in_name).scale[0], dtype=torch.float32).double()
            b_int = torch.round(torch.full((ch,), float(value), dtype=torch.float64) / s_b)
            w_int = torch.full((ch, 1, 1, 1), 127.0, dtype=torch.float64)
            return self._out(name, self._exact_conv(name, x, in_name, w_int, s_w, b_int, (1, 0, 1, ch)))
        # Exported as a 1x1 depthwise conv with weight 1 (int8 127 at scale 1/127) and the
        # constant as its int32 bias: the same kernel as every conv, so runtimes match this
        # reference bit for bit (an int8 ADD of a constant rounds differently in XNNPACK).
        in_qp = self.plan.qp(in_name)
        if in_qp is None:  # float input (mixed precision): a float add, then this tensor's grid
            return self._out(name, x + value)
        w, b = unit_weight_and_bias(float(value), in_qp.scale[0])
        return self._out(name, x * w + b)

    def mul_const(self, name, x, value):
        in_name = self.plan.graph_inputs[name][0]
        if isinstance(value, torch.Tensor) and value.dim() == 1 and self._exact_ok(name, [in_name]):
            g = value.detach()
            s_w = (torch.clamp(g.abs().double(), min=1e-12) / 127.0).float()
            w_int = torch.clamp(torch.round(g.double() / s_w.double()), -127, 127).reshape(-1, 1, 1, 1)
            b_int = torch.zeros(g.numel(), dtype=torch.float64)
            return self._out(name, self._exact_conv(name, x, in_name, w_int, s_w, b_int, (1, 0, 1, g.numel())))
        scalar = scalar_value(value)
        if scalar is not None and self._tflite_ok(name, [in_name], x):
            # the exporter's MUL by the constant code 127 at scale value / 127 (`scalar_const`)
            code, s_c = scalar_const(scalar)
            y = self._xnnpack_mul(name, self._ints(x, in_name), torch.full_like(x, float(code), dtype=torch.float64),
                                  self.plan.qp(in_name), QParams((s_c,), (0,), DType.INT8))
            if y is not None:
                return self._out(name, y.to(x.dtype))
        return self._out(name, super().mul_const(name, x, value))

    def div(self, name, a, b):
        ins = self.plan.graph_inputs[name]
        if self._tflite_ok(name, ins, a, b):  # TFLite's own int8 DIV kernel (emulated)
            qa, qb, qo = (self.plan.qp(t) for t in (*ins, name))
            q = tflite_div_codes(self._ints(a, ins[0]), self._ints(b, ins[1]), qa.scale[0], qb.scale[0], qo.scale[0],
                                 qo.zero_point[0])
            return self._out(name, self._dq(name, q))
        return self._out(name, a / b)

    def reciprocal(self, name, x):
        # TFLite: an int8 DIV of the constant 1 (code 127 at scale 1/127) by x, in TFLite's own
        # fixed-point kernel (emulated); onnxruntime: a float Reciprocal between DQ and Q.
        ins = self.plan.graph_inputs[name]
        if self._tflite_ok(name, ins, x):
            qx, qo = self.plan.qp(ins[0]), self.plan.qp(name)
            one, s_one = scalar_const(1.0)
            q = tflite_div_codes(torch.tensor(float(one)), self._ints(x, ins[0]), s_one, qx.scale[0], qo.scale[0],
                                 qo.zero_point[0])
            return self._out(name, self._dq(name, q))
        if self.ort and self._int8_ok(name, ins, x):  # QuantizeLinear divides by the scale
            return self._out(name, self._dq(name, onnxruntime_quantize_codes(1.0 / x.float(), self.plan.qp(name))))
        return self._out(name, 1.0 / x)

    def gelu(self, name, x):
        return self._out(name, F.gelu(x))

    def silu(self, name, x):
        in_name = self.plan.graph_inputs[name][0]
        if self._tflite_ok(name, [in_name], x):  # LOGISTIC + MUL (the emitter's op_silu), as XNNPACK runs them
            qs = SIGMOID_QPARAMS[DType.INT8]
            ix, s_codes = self._ints(x, in_name), self._xnnpack_sigmoid(x, in_name, qs)
            y = self._xnnpack_mul(name, ix, s_codes - qs.zero_point[0], self.plan.qp(in_name), qs)
            if y is not None:
                return self._out(name, y)
        s = torch.sigmoid(x)
        if self.mode == "quant" and self.plan.quantized(name):
            s = fake_quant(s, SIGMOID_QPARAMS[self.plan.specs[name].dtype])
        return self._out(name, x * s)

    def elu(self, name, x):
        return self._out(name, F.elu(x))

    def relu(self, name, x):
        in_name = self.plan.graph_inputs[name][0]
        if self._tflite_ok(name, [in_name], x):
            qi, qo = self.plan.qp(in_name), self.plan.qp(name)
            return self._out(name, self._dq(name, tflite_relu_codes(self._ints(x, in_name), qi.scale[0], qo.scale[0],
                                                                    qo.zero_point[0])))
        return self._out(name, F.relu(x))

    def sigmoid(self, name, x):
        in_name = self.plan.graph_inputs[name][0]
        if self._tflite_ok(name, [in_name], x):
            qo = self.plan.qp(name)
            return self._out(name, self._dq(name, self._xnnpack_sigmoid(x, in_name, qo) - qo.zero_point[0]))
        return self._out(name, torch.sigmoid(x))

    def _xnnpack_sigmoid(self, x, in_name: str, qo: QParams) -> torch.Tensor:
        """Output codes (with the zero point) of XNNPACK's LOGISTIC table for `x` on its grid."""
        qi = self.plan.qp(in_name)
        key = (qi.scale[0], qi.zero_point[0], qo.scale[0], qo.zero_point[0])
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = xnnpack_sigmoid_table(*key)
        return table[(self._ints(x, in_name) + qi.zero_point[0] + 128).clamp(0, 255).long()]

    def l2_norm(self, name, x):
        in_name = self.plan.graph_inputs[name][0]
        if self._tflite_ok(name, [in_name], x):  # output parameters fixed by TFLite: 1/128, zero point 0
            return self._out(name, self._dq(name, tflite_l2norm_codes(self._ints(x, in_name))))
        return self._out(name, super().l2_norm(name, x))

    def to_tokens(self, name, x, kind):
        return self._out(name, super().to_tokens(name, x, kind), "to_tokens")

    def from_tokens(self, name, x, hw):
        return self._out(name, super().from_tokens(name, x, hw), "from_tokens")

    def retoken(self, name, x, kind):
        return self._out(name, super().retoken(name, x, kind), "retoken")

    def mean_axis(self, name, x, axis):
        y = self._xnnpack_mean(name, x, (axis,), True)
        return self._out(name, y if y is not None else super().mean_axis(name, x, axis))

    def _xnnpack_mean(self, name, x, dims: tuple[int, ...], keepdim: bool) -> torch.Tensor | None:
        """An int8 MEAN over `dims` as XNNPACK computes it; None where the float path applies."""
        in_name = self.plan.graph_inputs[name][0]
        if not self._tflite_ok(name, [in_name], x):
            return None
        qi, qo = self.plan.qp(in_name), self.plan.qp(name)
        q_sum = (self._ints(x, in_name) + qi.zero_point[0]).sum(dim=dims, keepdim=keepdim)
        n = int(np.prod([x.shape[d] for d in dims]))
        return self._dq(name, xnnpack_mean_codes(q_sum, n, qi.scale[0], qi.zero_point[0], qo.scale[0], qo.zero_point[0]))

    def split(self, name, x, sizes, dim=1):
        outs = torch.split(x, sizes, dim=dim)
        return tuple(self._out(f"{name}:{i}", o, "split") for i, o in enumerate(outs))

    def cat(self, name, xs, dim=1):
        return self._out(name, torch.cat(xs, dim=dim), "cat")

    def to_heads(self, name, x, num_heads):
        return self._out(name, super().to_heads(name, x, num_heads), "to_heads")

    def from_heads(self, name, x, hw):
        return self._out(name, super().from_heads(name, x, hw), "from_heads")

    def matmul(self, name, a, b, transpose_a=False, transpose_b=False):
        ins = self.plan.graph_inputs[name]
        if self._exact_ok(name, ins):
            bi = self._ints(b, ins[1])
            k = a.shape[-2] if transpose_a else a.shape[-1]
            acc = integer_product(lambda u, v: super(QuantOps, self).matmul(name, u, v, transpose_a, transpose_b),
                                  self._ints(a, ins[0]), bi, bi.abs().max() * k)
            s_in = (torch.tensor(self.plan.qp(ins[0]).scale[0], dtype=torch.float32)
                    * torch.tensor(self.plan.qp(ins[1]).scale[0], dtype=torch.float32))
            return self._out(name, self._requant(name, acc, s_in, None))
        return self._out(name, super().matmul(name, a, b, transpose_a, transpose_b))

    def mean_tokens(self, name, x):
        y = self._xnnpack_mean(name, x, (-2,), True)
        return self._out(name, y if y is not None else x.mean(dim=-2, keepdim=True))

    def global_pool(self, name, x):  # TFLite: MEAN over H and W of the NHWC map
        y = self._xnnpack_mean(name, x, (2, 3), False)
        return self._out(name, y if y is not None else x.flatten(2).mean(dim=-1))

    def layer_norm(self, name, x, eps):
        return self._out(name, F.layer_norm(x, x.shape[-1:], None, None, eps))
