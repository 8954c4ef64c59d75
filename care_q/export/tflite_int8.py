"""Emit the quantized deploy graph as an int8 TFLite model.

One TFLite op (or a short fixed sequence) per graph node, with exactly the parameters of the
plan, so the file computes what the PyTorch fake-quant reference computes. Layout: images
NHWC, attention tokens (1, heads, N, D). The backbone is int8 from the first QUANTIZE (float
I/O) to the global pool; the head's GELU and LayerNorm run float on one 1024-vector after one
DEQUANTIZE; the classifier is a static int8 FULLY_CONNECTED (recipe ``head.dtype: int8``) or
float.

Kernel choices (XNNPACK is the CPU engine of TFLite):
- conv / depthwise conv: per-channel int8 weights, int32 bias;
- per-channel layer scale: a 1x1 DEPTHWISE_CONV_2D (per-channel weights represent gamma
  exactly, where a MUL constant would be per-tensor);
- channel split: SLICE (shares parameters with its input);
- heads: RESHAPE + TRANSPOSE; attention products: BATCH_MATMUL with a zero-point-0 RHS;
- normaliser: DIV (TFLite's int8 kernel; the divisor carries a one-LSB guard so it never
  equals its zero point), or with recipe ``transforms.reciprocal_normaliser`` a DIV of the
  constant 1 by the (1, heads, N, 1) normaliser and a broadcast int8 MUL (XNNPACK);
- the NPU attention (recipe ``substitutions.attention: npu``): RELU, LOGISTIC, broadcast MUL,
  MEAN over axis 1 or 2 of (1, N, D, E) token tensors (RESHAPEs of the NHWC maps),
  L2_NORMALIZATION (``npu.normaliser: l2den``: of the numerator CONCATENATED with the weighted
  denominator, then a SLICE), or (``rsqrt``) MUL, MEAN, RSQRT and a broadcast MUL, or (``rsqrtden``) the
  denominator's RSQRT and two broadcast MULs;
- the NPU head (``npu.head: int8``): int8 MEAN, LOGISTIC + MUL, SUB, then MUL/MEAN/RSQRT/MUL or
  L2_NORMALIZATION, and the int8 FULLY_CONNECTED: no DEQUANTIZE from input to logits.
"""

from __future__ import annotations

import numpy as np
from ai_edge_litert import schema_py_generated as fb

from care_q.errors import CareQError
from care_q.export.tflite_builder import TFLiteBuilder, options
from care_q.export.tflite_metadata import app_metadata, append_associated_files
from care_q.quant.fakequant import weight_scales
from care_q.quant.layout_policy import SIGMOID_QPARAMS, scalar_const, scalar_value, tflite_builtin_dwconv, weight_qmax
from care_q.quant.plan import QuantPlan
from care_q.quant.qtypes import DType

OP = fb.BuiltinOperator
# graph ops the emitter can write as float islands (plan.float_kernels): DEQUANTIZE of the int8 inputs,
# the op in float32, QUANTIZE to its int8 output
FLOAT_KERNEL_OPS = ("div", "gelu", "elu", "add", "mul", "sub")
_NP = {DType.INT8: np.int8, DType.UINT8: np.uint8, DType.INT16: np.int16}


def _layouts(plan: QuantPlan) -> dict[str, str]:
    g = plan.graph
    lay = {g.input: "nchw"}
    for n in g.nodes:
        if n.op == "to_heads" or n.op == "matmul":
            kind = "heads"
        elif n.op == "to_tokens":
            kind = "tokens"  # (B, N, C, 1) / (B, N, 1, C): the same order in TFLite
        elif n.op in ("from_heads", "from_tokens", "conv"):
            kind = "nchw"
        elif n.op in ("global_pool", "linear"):
            kind = "vec"
        else:
            kind = lay[n.inputs[0]]
        for o in n.outputs:
            lay[o] = kind
    return lay


def _tfl_shape(shape, layout: str) -> tuple[int, ...]:
    if layout == "nchw" and len(shape) == 4:
        b, c, h, w = shape
        return (b, h, w, c)
    return tuple(shape)


def _padding(conv) -> int:
    (kh, kw), (ph, pw), (sh, sw) = conv.kernel_size, conv.padding, conv.stride
    if ph == 0 and pw == 0:
        return fb.Padding.VALID
    if (sh, sw) == (1, 1) and kh % 2 and kw % 2 and ph == (kh - 1) // 2 and pw == (kw - 1) // 2:
        return fb.Padding.SAME
    raise CareQError(f"conv padding {conv.padding} with kernel {conv.kernel_size} has no TFLite form")


class _Emitter:
    def __init__(self, plan: QuantPlan, io: str, debug_outputs: bool = False):
        self.plan = plan
        self.io = io
        self.debug_outputs = debug_outputs
        self.b = TFLiteBuilder("care-q int8 " + plan.recipe.name)
        self.idx: dict[str, int] = {}
        self.layout = _layouts(plan)
        self._float_out: set[str] = set()      # outputs of the float island being written
        self._dequantized: dict[str, int] = {}  # int8 tensor -> its DEQUANTIZE (shared by islands)

    # ---------------------------------------------------------------- tensors
    def act(self, name: str, shape=None, like: str | None = None) -> int:
        """An activation tensor with the plan's parameters for `like` (default: itself)."""
        spec_name = like or name
        qp = self.plan.qp(spec_name)
        if shape is None:
            shape = _tfl_shape(self.plan.graph.shapes[name], self.layout[name])
        if name in self._float_out:
            return self.b.tensor(f"{name}.float", shape, np.float32)
        if qp is None:
            return self.b.tensor(name, shape, np.float32)
        if qp.dtype == DType.INT16:
            raise CareQError(f"tensor '{name}' is int16: the int8 TFLite exporter keeps int16 tensors "
                             f"float (recipe should mark them float for tflite)")
        return self.b.tensor(name, shape, _NP[qp.dtype], qp.scale[0], qp.zero_point[0])

    def out(self, name: str) -> int:
        self.idx[name] = self.act(name)
        return self.idx[name]

    def i32(self, name: str, values) -> int:
        return self.b.const(name, np.asarray(values, dtype=np.int32))

    def scalar_q(self, name: str, value: float, rank: int) -> int:
        """A positive constant as int8 127 * (value / 127): exact."""
        if value <= 0:
            raise CareQError(f"constant '{name}'={value}: only positive scalar constants are emitted")
        code, scale = scalar_const(value)
        return self.b.const(name, np.full([1] * rank, code, np.int8), scale, 0)

    def in_scale(self, tensor: str) -> float:
        return self.plan.qp(tensor).scale[0]

    # ---------------------------------------------------------------- ops
    def emit(self) -> bytes:
        g, b = self.plan.graph, self.b
        shp = _tfl_shape(g.shapes[g.input], "nchw")
        qin = self.plan.qp(g.input)
        if self.io == "float":
            fin = b.tensor("input_float", shp, np.float32)
            b.inputs.append(fin)
            self.idx[g.input] = self.act(g.input)
            b.op(OP.QUANTIZE, [fin], [self.idx[g.input]], version=2)
        else:
            self.idx[g.input] = self.act(g.input)
            b.inputs.append(self.idx[g.input])
            if qin.dtype != DType.INT8:
                raise CareQError("int8 I/O needs an int8 input tensor")
        for n in g.nodes:
            if n.name in self.plan.float_kernels:
                self._float_island(n)
            else:
                getattr(self, f"op_{n.op}")(n)
        out = self.idx[g.output]
        if self.plan.quantized(g.output) and self.io == "float":  # int8 head: float logits out
            f = b.tensor("logits", b.shape_of(out), np.float32)
            b.op(OP.DEQUANTIZE, [out], [f], version=2)
            out = f
        elif self.plan.quantized(g.output):  # int8 head and int8 output: the logits as computed
            pass
        elif self.io != "float":
            qp = self.plan.output_qparams
            if qp is None:
                raise CareQError("io=int8 needs plan.output_qparams (the logits range): calibrate with "
                                 "care_q.quant.calibrate.calibrate")
            q = b.tensor("logits_int8", b.shape_of(out), np.int8, qp.scale[0], qp.zero_point[0])
            b.op(OP.QUANTIZE, [out], [q], version=2)
            out = q
        b.outputs.append(out)
        if self.debug_outputs:  # every graph tensor readable after invoke (debugging numerics)
            b.outputs.extend(i for n, i in self.idx.items() if i != out and n != g.input)
        return b.to_bytes()

    def _float_island(self, n) -> None:
        """Node ``n`` in float32 on its int8 grids: DEQUANTIZE (once per int8 input tensor), the op, QUANTIZE."""
        if n.op not in FLOAT_KERNEL_OPS:
            raise CareQError(f"{n.name}: '{n.op}' cannot run as a float island (those are {list(FLOAT_KERNEL_OPS)})")
        if not all(self.plan.quantized(t) for t in [*n.inputs, *n.outputs]):
            raise CareQError(f"{n.name}: a float island needs int8 inputs and outputs")
        b, saved = self.b, {t: self.idx[t] for t in n.inputs}
        for t in n.inputs:
            if t not in self._dequantized:
                f = b.tensor(f"{t}.dequantized", b.shape_of(self.idx[t]), np.float32)
                b.op(OP.DEQUANTIZE, [self.idx[t]], [f], version=2)
                self._dequantized[t] = f
            self.idx[t] = self._dequantized[t]
        self._float_out = set(n.outputs)
        try:
            getattr(self, f"op_{n.op}")(n)
        finally:
            self._float_out = set()
            self.idx.update(saved)
        for o in n.outputs:
            q = self.act(o)
            b.op(OP.QUANTIZE, [self.idx[o]], [q], version=2)
            self.idx[o] = q

    def _int8_weights(self, name: str, weight, bias, in_tensor: str):
        """(int8 weight codes in the module's layout, their per-output-channel scales, the int32
        bias constant at s_in * s_w): the arithmetic QuantOps' exact reference uses."""
        qmax = weight_qmax(self.plan)
        per_channel = self.plan.recipe.weight_granularity == "per_channel"
        s_w = weight_scales(weight, per_channel, qmax).double().numpy()
        w = weight.detach().double().numpy()
        qw = np.clip(np.round(w / s_w.reshape((-1,) + (1,) * (w.ndim - 1))), -qmax, qmax).astype(np.int8)
        s_b = s_w * self.in_scale(in_tensor)
        b0 = bias.detach().double().numpy() if bias is not None else np.zeros(w.shape[0])
        qb = np.clip(np.round(b0 / s_b), -(2 ** 31), 2 ** 31 - 1).astype(np.int32)
        bt = self.b.const(f"{name}.bias", qb, s_b, np.zeros(w.shape[0], np.int64), axis=0)
        return qw, s_w, bt

    def op_conv(self, n):
        conv, b = n.module, self.b
        x = self.idx[n.inputs[0]]
        cout = conv.weight.shape[0]
        depthwise = conv.groups > 1
        if depthwise and not (conv.groups == conv.in_channels == cout):
            raise CareQError(f"{n.name}: grouped conv with groups={conv.groups} has no TFLite form")
        qw, s_w, bt = self._int8_weights(n.name, conv.weight, conv.bias, n.inputs[0])
        if tflite_builtin_dwconv(self.plan, n.name, conv):
            bt = self._runtime_made(bt)
        if depthwise:
            wt = b.const(f"{n.name}.weight", qw.transpose(1, 2, 3, 0), s_w, np.zeros(cout, np.int64), axis=3)  # (1,kh,kw,C)
        else:
            wt = b.const(f"{n.name}.weight", qw.transpose(0, 2, 3, 1), s_w, np.zeros(cout, np.int64), axis=0)  # (O,kh,kw,I)
        y = self.out(n.outputs[0])
        pad = _padding(conv)
        sh, sw = conv.stride
        if depthwise:
            b.op(OP.DEPTHWISE_CONV_2D, [x, wt, bt], [y], fb.BuiltinOptions.DepthwiseConv2DOptions,
                 options(fb.DepthwiseConv2DOptionsT, padding=pad, strideW=sw, strideH=sh, depthMultiplier=1,
                         dilationWFactor=1, dilationHFactor=1), version=3)
        else:
            b.op(OP.CONV_2D, [x, wt, bt], [y], fb.BuiltinOptions.Conv2DOptions,
                 options(fb.Conv2DOptionsT, padding=pad, strideW=sw, strideH=sh, dilationWFactor=1,
                         dilationHFactor=1), version=3)

    def _binary(self, n, op, opt_type, opt_cls, version=2):
        a, c = self.idx[n.inputs[0]], self.idx[n.inputs[1]]
        self.b.op(op, [a, c], [self.out(n.outputs[0])], opt_type, options(opt_cls), version=version)

    def op_add(self, n):
        self._binary(n, OP.ADD, fb.BuiltinOptions.AddOptions, fb.AddOptionsT)

    def op_mul(self, n):
        self._binary(n, OP.MUL, fb.BuiltinOptions.MulOptions, fb.MulOptionsT)

    def op_sub(self, n):
        self._binary(n, OP.SUB, fb.BuiltinOptions.SubOptions, fb.SubOptionsT, version=2)

    def op_rsqrt(self, n):
        self._unary(n, OP.RSQRT, version=2)

    def op_div(self, n):
        self._binary(n, OP.DIV, fb.BuiltinOptions.DivOptions, fb.DivOptionsT)

    def op_reciprocal(self, n):
        # 1 / x as an int8 DIV of the constant 1 (code 127 at scale 1/127): TFLite has no RECIPROCAL
        x = self.idx[n.inputs[0]]
        for t in (n.inputs[0], n.outputs[0]):
            qp = self.plan.qp(t)
            if qp is None or qp.dtype != DType.INT8:
                raise CareQError(f"{n.name}: the reciprocal normaliser is emitted for int8 tensors only, '{t}' is "
                                 f"{qp.dtype.value if qp else 'float'} (recipe transforms.reciprocal_normaliser)")
        one = self.scalar_q(f"{n.name}.one", 1.0, len(self.b.shape_of(x)))
        self.b.op(OP.DIV, [one, x], [self.out(n.outputs[0])], fb.BuiltinOptions.DivOptions, options(fb.DivOptionsT),
                  version=2)

    def op_add_const(self, n):
        # x + c as a 1x1 depthwise conv (weight 1, bias c) over the last axis: see
        # care_q.quant.fakequant.QuantOps.add_const for why not an ADD (care_q.quant.layout_policy).
        x, b = self.idx[n.inputs[0]], self.b
        value = float(self.plan.consts.get(n.name, n.attrs["value"]))
        shape = b.shape_of(x)
        if len(shape) != 4:
            raise CareQError(f"{n.name}: add_const is emitted for 4-D tensors only, got {shape}")
        ch = shape[-1]
        s_w = np.full(ch, np.float32(1.0 / 127.0), np.float64)
        s_b = s_w * np.float32(self.in_scale(n.inputs[0]))
        wt = b.const(f"{n.name}.weight", np.full((1, 1, 1, ch), 127, np.int8), s_w, np.zeros(ch, np.int64), axis=3)
        bt = b.const(f"{n.name}.bias", np.round(value / s_b).astype(np.int32), s_b, np.zeros(ch, np.int64), axis=0)
        b.op(OP.DEPTHWISE_CONV_2D, [x, wt, bt], [self.out(n.outputs[0])], fb.BuiltinOptions.DepthwiseConv2DOptions,
             options(fb.DepthwiseConv2DOptionsT, padding=fb.Padding.VALID, strideW=1, strideH=1,
                     depthMultiplier=1, dilationWFactor=1, dilationHFactor=1), version=3)

    def op_mul_const(self, n):
        x, b = self.idx[n.inputs[0]], self.b
        v = n.attrs["value"]
        value = scalar_value(v)
        if value is not None:
            c = self.scalar_q(f"{n.name}.const", value, len(b.shape_of(x)))
            b.op(OP.MUL, [x, c], [self.out(n.outputs[0])], fb.BuiltinOptions.MulOptions,
                 options(fb.MulOptionsT), version=2)
            return
        # per-channel constant: a 1x1 depthwise conv with per-channel weights (exact)
        g = v.detach().double().numpy()
        s_w = np.maximum(np.abs(g), 1e-12) / 127.0
        qw = np.clip(np.round(g / s_w), -127, 127).astype(np.int8).reshape(1, 1, 1, -1)
        wt = b.const(f"{n.name}.weight", qw, s_w, np.zeros(g.size, np.int64), axis=3)
        bt = b.const(f"{n.name}.bias", np.zeros(g.size, np.int32), s_w * self.in_scale(n.inputs[0]),
                     np.zeros(g.size, np.int64), axis=0)
        b.op(OP.DEPTHWISE_CONV_2D, [x, wt, bt], [self.out(n.outputs[0])],
             fb.BuiltinOptions.DepthwiseConv2DOptions,
             options(fb.DepthwiseConv2DOptionsT, padding=fb.Padding.VALID, strideW=1, strideH=1,
                     depthMultiplier=1, dilationWFactor=1, dilationHFactor=1), version=3)

    def _unary(self, n, op, opt_type=0, opts=None, version=2):
        self.b.op(op, [self.idx[n.inputs[0]]], [self.out(n.outputs[0])], opt_type, opts, version=version)

    def op_gelu(self, n):
        self._unary(n, OP.GELU, fb.BuiltinOptions.GeluOptions, options(fb.GeluOptionsT, approximate=False),
                    version=2 if self.plan.quantized(n.outputs[0]) and n.outputs[0] not in self._float_out else 1)

    def op_elu(self, n):
        self._unary(n, OP.ELU, version=2)

    def op_silu(self, n):
        x = self.idx[n.inputs[0]]
        y_name = n.outputs[0]
        if self.plan.quantized(y_name):
            qp = SIGMOID_QPARAMS[DType.INT8]
            s = self.b.tensor(f"{y_name}.sigmoid", self.b.shape_of(x), np.int8, qp.scale[0], qp.zero_point[0])
        else:
            s = self.b.tensor(f"{y_name}.sigmoid", self.b.shape_of(x), np.float32)
        self.b.op(OP.LOGISTIC, [x], [s], version=2)
        self.b.op(OP.MUL, [x, s], [self.out(y_name)], fb.BuiltinOptions.MulOptions, options(fb.MulOptionsT),
                  version=2)

    def op_relu(self, n):
        self._unary(n, OP.RELU, version=2)

    def op_sigmoid(self, n):
        self._unary(n, OP.LOGISTIC, version=2)

    def op_l2_norm(self, n):
        self._unary(n, OP.L2_NORMALIZATION, fb.BuiltinOptions.L2NormOptions, options(fb.L2NormOptionsT), version=2)

    def op_to_tokens(self, n):
        o = n.outputs[0]
        self.idx[o] = self._reshape(self.idx[n.inputs[0]], o, self.plan.graph.shapes[o], like=o)

    def op_from_tokens(self, n):
        o = n.outputs[0]
        self.idx[o] = self._reshape(self.idx[n.inputs[0]], o, _tfl_shape(self.plan.graph.shapes[o], "nchw"), like=o)

    def op_retoken(self, n):
        o = n.outputs[0]
        self.idx[o] = self._reshape(self.idx[n.inputs[0]], o, self.plan.graph.shapes[o], like=o)

    def op_mean_axis(self, n):
        self._mean(self.idx[n.inputs[0]], self.out(n.outputs[0]), [n.attrs["axis"]], True, n.name)

    def op_split(self, n):
        self._last_axis(n, n.inputs[0])
        x = self.idx[n.inputs[0]]
        shape = self.b.shape_of(x)
        off = 0
        for o, size in zip(n.outputs, n.attrs["sizes"]):
            begin = self.i32(f"{o}.begin", [0, 0, 0, off])
            sz = self.i32(f"{o}.size", [shape[0], shape[1], shape[2], size])
            self.b.op(OP.SLICE, [x, begin, sz], [self.out(o)], fb.BuiltinOptions.SliceOptions,
                      options(fb.SliceOptionsT), version=2)
            off += size

    def _last_axis(self, n, tensor: str) -> None:
        """Channel splits and concatenations run on TFLite's last axis: NCHW maps' dim 1, token tensors' dim 3."""
        lay, dim = self.layout[tensor], n.attrs["dim"]
        if not ((lay == "nchw" and dim == 1) or (lay == "tokens" and dim == 3)):
            raise CareQError(f"{n.name}: only {n.op} over channels is emitted (dim {dim} of a {lay} tensor)")

    def op_cat(self, n):
        self._last_axis(n, n.outputs[0])
        self.b.op(OP.CONCATENATION, [self.idx[i] for i in n.inputs], [self.out(n.outputs[0])],
                  fb.BuiltinOptions.ConcatenationOptions, options(fb.ConcatenationOptionsT, axis=3), version=2)

    def _runtime_made(self, const: int) -> int:
        """The constant ``const`` passed through a RESHAPE to its own shape: the same values, made at
        run time, so XNNPACK leaves the op that reads it to TFLite (``tflite_builtin_dwconv``)."""
        b, t = self.b, self.b.tensors[const]
        name = t.name
        t.name = f"{name}.const"
        b.names[t.name] = b.names.pop(name)
        shape = b.shape_of(const)
        q = t.quantization
        y = b.tensor(name, shape, np.int32, q.scale, q.zeroPoint, axis=q.quantizedDimension)
        b.op(OP.RESHAPE, [const, self.i32(f"{name}.shape", shape)], [y], fb.BuiltinOptions.ReshapeOptions,
             options(fb.ReshapeOptionsT, newShape=list(shape)))
        return y

    def _reshape(self, x: int, name: str, shape, like: str) -> int:
        y = self.act(name, shape, like=like)
        self.b.op(OP.RESHAPE, [x, self.i32(f"{name}.shape", shape)], [y], fb.BuiltinOptions.ReshapeOptions,
                  options(fb.ReshapeOptionsT, newShape=list(shape)))
        return y

    def _transpose(self, x: int, y: int, perm) -> None:
        self.b.op(OP.TRANSPOSE, [x, self.i32(f"{self.b.tensors[y].name}.perm", perm)], [y],
                  fb.BuiltinOptions.TransposeOptions, options(fb.TransposeOptionsT), version=2)

    def op_to_heads(self, n):
        o = n.outputs[0]
        bsz, nh, tokens, d = self.plan.graph.shapes[o]
        r = self._reshape(self.idx[n.inputs[0]], f"{o}.tokens", (bsz, tokens, nh, d), like=o)
        self._transpose(r, self.out(o), [0, 2, 1, 3])

    def op_from_heads(self, n):
        o = n.outputs[0]
        bsz, nh, tokens, d = self.plan.graph.shapes[n.inputs[0]]
        t = self.act(f"{o}.tokens", (bsz, tokens, nh, d), like=o)
        self._transpose(self.idx[n.inputs[0]], t, [0, 2, 1, 3])
        bsz, c, h, w = self.plan.graph.shapes[o]
        self.idx[o] = self._reshape(t, o, (bsz, h, w, c), like=o)

    def op_matmul(self, n):
        a, c = self.idx[n.inputs[0]], self.idx[n.inputs[1]]
        self.b.op(OP.BATCH_MATMUL, [a, c], [self.out(n.outputs[0])], fb.BuiltinOptions.BatchMatMulOptions,
                  options(fb.BatchMatMulOptionsT, adjX=n.attrs["transpose_a"], adjY=n.attrs["transpose_b"]),
                  version=2)

    def _mean(self, x: int, y: int, axes, keep: bool, name: str):
        self.b.op(OP.MEAN, [x, self.i32(f"{name}.axes", axes)], [y], fb.BuiltinOptions.ReducerOptions,
                  options(fb.ReducerOptionsT, keepDims=keep), version=2)

    def op_mean_tokens(self, n):
        self._mean(self.idx[n.inputs[0]], self.out(n.outputs[0]), [2], True, n.name)

    def op_global_pool(self, n):
        o = n.outputs[0]
        pooled = self.out(o)
        self._mean(self.idx[n.inputs[0]], pooled, [1, 2], False, n.name)
        float_next = any(not self.plan.quantized(c.outputs[0]) for c in self.plan.graph.consumers().get(o, []))
        if self.plan.quantized(o) and float_next:  # the head's GELU/LayerNorm run float: one DEQUANTIZE
            f = self.b.tensor(f"{o}.float", self.b.shape_of(pooled), np.float32)
            self.b.op(OP.DEQUANTIZE, [pooled], [f], version=2)
            self.idx[o] = f

    def op_layer_norm(self, n):
        b, x, o = self.b, self.idx[n.inputs[0]], n.outputs[0]
        shape = b.shape_of(x)
        red = tuple(shape[:-1]) + (1,)
        mean = b.tensor(f"{o}.mean", red, np.float32)
        self._mean(x, mean, [len(shape) - 1], True, f"{o}.mean")
        d = b.tensor(f"{o}.centered", shape, np.float32)
        b.op(OP.SUB, [x, mean], [d], fb.BuiltinOptions.SubOptions, options(fb.SubOptionsT))
        sq = b.tensor(f"{o}.sq", shape, np.float32)
        b.op(OP.MUL, [d, d], [sq], fb.BuiltinOptions.MulOptions, options(fb.MulOptionsT))
        var = b.tensor(f"{o}.var", red, np.float32)
        self._mean(sq, var, [len(shape) - 1], True, f"{o}.var")
        ve = b.tensor(f"{o}.var_eps", red, np.float32)
        eps = b.const(f"{o}.eps", np.full([1] * len(shape), n.attrs["eps"], np.float32))
        b.op(OP.ADD, [var, eps], [ve], fb.BuiltinOptions.AddOptions, options(fb.AddOptionsT))
        r = b.tensor(f"{o}.rstd", red, np.float32)
        b.op(OP.RSQRT, [ve], [r])
        if not self.plan.quantized(o):
            b.op(OP.MUL, [d, r], [self.out(o)], fb.BuiltinOptions.MulOptions, options(fb.MulOptionsT))
            return
        y = b.tensor(f"{o}.float", shape, np.float32)  # int8 head: the classifier's input quantized
        b.op(OP.MUL, [d, r], [y], fb.BuiltinOptions.MulOptions, options(fb.MulOptionsT))
        b.op(OP.QUANTIZE, [y], [self.out(o)], version=2)

    def op_linear(self, n):
        fc, b = n.module, self.b
        o, x = n.outputs[0], n.inputs[0]
        if not (self.plan.quantized(o) and self.plan.quantized(x)):  # float classifier (QuantOps.linear)
            w = b.const(f"{n.name}.weight", fc.weight.detach().numpy().astype(np.float32))
            bias = b.const(f"{n.name}.bias", fc.bias.detach().numpy().astype(np.float32))
            b.op(OP.FULLY_CONNECTED, [self.idx[x], w, bias], [self.out(o)],
                 fb.BuiltinOptions.FullyConnectedOptions, options(fb.FullyConnectedOptionsT))
            return
        # static int8 FC (recipe head.dtype int8): per-output-channel weights, int32 bias at s_in * s_w
        qw, s_w, bt = self._int8_weights(n.name, fc.weight, fc.bias, x)
        per_channel = self.plan.recipe.weight_granularity == "per_channel"
        if per_channel and getattr(self.plan.recipe, "head_form", "exact") == "npu":
            self._classifier_as_conv(n, qw, s_w, bt)
            return
        wt = b.const(f"{n.name}.weight", qw, s_w, np.zeros(qw.shape[0], np.int64), axis=0)
        b.op(OP.FULLY_CONNECTED, [self.idx[x], wt, bt], [self.out(o)], fb.BuiltinOptions.FullyConnectedOptions,
             options(fb.FullyConnectedOptionsT), version=12 if per_channel else 4)


    def _classifier_as_conv(self, n, qw, s_w, bt):
        """The NPU head's classifier as RESHAPE, 1x1 CONV_2D, RESHAPE: NNAPI takes per-channel int8
        weights in convs only (a per-channel FULLY_CONNECTED is version 12, past the delegate's 5);
        the same integer arithmetic (QuantOps.linear) in XNNPACK, Vela and the Edge TPU."""
        b, o, x = self.b, n.outputs[0], n.inputs[0]
        bsz, cin = self.plan.graph.shapes[x]
        xi = self._reshape(self.idx[x], f"{o}.in4d", (bsz, 1, 1, cin), like=x)
        cout = qw.shape[0]
        wt = b.const(f"{n.name}.weight", qw.reshape(cout, 1, 1, cin), s_w, np.zeros(cout, np.int64), axis=0)
        y4 = self.act(f"{o}.out4d", (bsz, 1, 1, cout), like=o)
        b.op(OP.CONV_2D, [xi, wt, bt], [y4], fb.BuiltinOptions.Conv2DOptions,
             options(fb.Conv2DOptionsT, padding=fb.Padding.VALID, strideW=1, strideH=1, dilationWFactor=1,
                     dilationHFactor=1), version=3)
        self.idx[o] = self._reshape(y4, o, (bsz, cout), like=o)


def emit_tflite_int8(plan: QuantPlan, io: str = "float", debug_outputs: bool = False, preprocess=None,
                     model_name: str = "care") -> bytes:
    """The int8 TFLite flatbuffer for a calibrated plan.

    ``debug_outputs`` makes every graph tensor a model output, so a runtime's intermediate
    values can be compared op by op with the fake-quant reference. ``preprocess`` (a
    `PreprocessConfig`): embed its normalisation and label map as TFLite Support metadata
    (`care_q.export.tflite_metadata`), which Android's ImageClassifier reads.
    """
    e = _Emitter(plan, io, debug_outputs)
    if preprocess is None:
        return e.emit()
    meta, files = app_metadata(preprocess, model_name, f"{model_name} int8 (care-q, recipe {plan.recipe.name})",
                               "input_float" if io == "float" else plan.graph.input, "logits")
    e.b.metadata.append(("TFLITE_METADATA", meta))
    return append_associated_files(e.emit(), files)
