"""Emit the quantized deploy graph as an ONNX QDQ model (onnxruntime's integer format).

The sibling of `care_q.export.tflite_int8`: one ONNX op (or a short fixed sequence) per graph
node, with exactly the plan's parameters, so onnxruntime computes what the PyTorch fake-quant
reference (`QuantOps(plan, "quant")`) computes (without graph optimizations the two agree to
float round-off). Layout NCHW; input ``input`` (N, 3, H, W) with a dynamic batch ``N``, output
``logits`` (N, classes). Nodes are named after the graph's nodes (``stages.2.blocks.0.attn.kTv``),
helpers after their tensor (``<tensor>/Quantize``, ``<tensor>/Dequantize``, ``<node>/Reshape``).

QDQ form (what onnxruntime's CPU EP fuses into integer kernels):

- every quantized activation T: ``QuantizeLinear(T) -> T/q -> DequantizeLinear -> T/dq``, and
  every consumer reads ``T/dq``; DQ -> op -> Q becomes one integer kernel (QLinearConv,
  QLinearAdd, QLinearMul, QLinearMatMul, QLinearSigmoid, QLinearConcat,
  QLinearGlobalAveragePool) or, for data movement (Split, Reshape, Transpose), loses its Q/DQ
  pair (the plan gives input and output identical parameters) and moves integers;
- weights: int8 initializers (per-channel symmetric over [-127, 127], axis 0, zero point 0) +
  DequantizeLinear (the zero point a tensor only where the op stays float: int16 neighbours, the
  Gemm; see `_Emitter.weight_dq`); biases: int32 initializers at s_in * s_w (axis 0) + DequantizeLinear;
- scalar constants (``elu + 1``, ``kv / N``, the divisor guard): the top code at scale
  |value| / 127 (exact), as the TFLite emitter's ``scalar_q``; the per-channel layer scale: a 1x1
  depthwise Conv with weights +-127 at |gamma| / 127 (exact) and a zero bias;
- ops without an integer kernel in onnxruntime (Gelu, Elu, Div, Reciprocal, ReduceMean) run float between
  their DQ and Q; GELU is com.microsoft ``Gelu`` below opset 20 and ai.onnx ``Gelu`` from 20
  (one fused kernel either way: ~0.5 ms per 128x56x56 on 2 threads, the Erf formula ~1.35 ms);
- the head after the global pool (GELU, LayerNormalization, Gemm) is float, as in the plan; with
  the recipe's ``head.dtype: int8`` the Gemm is QDQ int8 (onnxruntime: QGemm).

Storage types (`act_type`, `weight_type`); the represented values are the plan's either way:

- activations on the plan's int8 grid are stored as **uint8** by default: (s, z) -> (s, z + 128),
  the same values and clamping range. onnxruntime on x86 runs U8S8 kernels only; it re-encodes
  int8 Q/DQ pairs itself, but only where a QuantizeLinear has a single consumer, so every
  fan-out tensor of CARE (split inputs, residuals, concat outputs) would leave its consumers as
  float Conv/Add/MatMul. ``act_type="int8"`` emits the literal int8 form (what ARM/NPU flows take).
- weights are int8. On x86 CPUs onnxruntime's U8S8 kernels sum pairs of products in saturating
  int16 (VPMADDUBSW), which is wrong for full-range [-127, 127] weights (care_s0, random weights:
  17% logit error, top-1 agreement 1/4). Sessions must set ``ORT_SESSION_CONFIG``
  (``session.x64quantprecision=1``: onnxruntime re-encodes the weights as uint8 and runs exact
  U8U8 kernels), or emit ``weight_type="uint8"`` (the same thing done at export). CPUs with VNNI
  accumulate in int32 and need neither (`care_q.runtime.file_session_config` leaves it out there).

Opset 17 when every activation is 8-bit (per-channel DequantizeLinear needs >= 13), 21 when the
plan has int16 activations (16-bit QuantizeLinear/DequantizeLinear).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from care_q.errors import CareQError
from care_q.quant.fakequant import weight_scales
from care_q.quant.layout_policy import SIGMOID_QPARAMS, scalar_const, weight_qmax
from care_q.quant.plan import QuantPlan
from care_q.quant.qtypes import DType, QParams
from care_q.utils.io import atomic_path

_NP = {DType.INT8: np.int8, DType.UINT8: np.uint8, DType.INT16: np.int16}
MIN_OPSET = 13            # per-channel DequantizeLinear, Split with a `split` input
INT16_OPSET = 21          # 16-bit QuantizeLinear / DequantizeLinear
DEFAULT_OPSET = 17
ACT_TYPES = ("uint8", "int8")
# onnxruntime session config entries the int8-weight QDQ model needs on x86 for exact results
# (full-range weights overflow the 16-bit u8s8 kernel; 7-bit weights do not and skip it)
ORT_SESSION_CONFIG = {"session.x64quantprecision": "1"}
WEIGHT_TYPES = ("int8", "uint8")


def _conv_attrs(conv) -> dict:
    if isinstance(conv.padding, str):
        raise CareQError(f"conv padding '{conv.padding}' is not emitted (expected explicit pads)")
    (ph, pw), (sh, sw), (dh, dw) = conv.padding, conv.stride, conv.dilation
    return {"kernel_shape": list(conv.kernel_size), "pads": [ph, pw, ph, pw], "strides": [sh, sw],
            "dilations": [dh, dw], "group": conv.groups}


class _Emitter:
    def __init__(self, plan: QuantPlan, io: str, opset: int | None, act_type: str, weight_type: str):
        if io not in ("float", "int8"):
            raise CareQError(f"io must be 'float' or 'int8', got '{io}'")
        if act_type not in ACT_TYPES:
            raise CareQError(f"act_type must be one of {', '.join(ACT_TYPES)}, got '{act_type}'")
        if weight_type not in WEIGHT_TYPES:
            raise CareQError(f"weight_type must be one of {', '.join(WEIGHT_TYPES)}, got '{weight_type}'")
        self.plan = plan
        self.io = io
        self.act_type = act_type
        self.weight_type = weight_type
        self.graph = plan.graph
        dtypes = {qp.dtype for qp in (self._qp(t) for t in self.graph.tensors()) if qp is not None}
        need = INT16_OPSET if DType.INT16 in dtypes else DEFAULT_OPSET
        if opset is None:
            opset = need
        if opset < MIN_OPSET:
            raise CareQError(f"opset {opset}: the QDQ model needs opset >= {MIN_OPSET} (per-channel DQ)")
        if DType.INT16 in dtypes and opset < INT16_OPSET:
            raise CareQError(f"opset {opset}: the plan has int16 activations, which need opset "
                             f">= {INT16_OPSET}")
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.names: set[str] = set()
        self.val: dict[str, str] = {}   # graph tensor -> the ONNX value its consumers read
        # attention tensors stored with their last two dims swapped (see op_to_heads)
        self.swapped: set[str] = set()
        self.ms_domain = False

    # ---------------------------------------------------------------- plumbing
    def _qp(self, tensor: str) -> QParams | None:
        qp = self.plan.qp(tensor)
        if qp is None and self.plan.quantized(tensor):
            raise CareQError(f"tensor '{tensor}' has no quantization parameters: calibrate the plan "
                             f"(plan.finalize) before exporting")
        return qp

    def init(self, name: str, array) -> str:
        if name in self.names:
            raise CareQError(f"duplicate ONNX name '{name}'")
        self.names.add(name)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op_type: str, inputs: list[str], outputs: list[str], name: str, domain: str = "",
             **attrs) -> list[str]:
        if name in self.names:
            raise CareQError(f"duplicate ONNX node name '{name}'")
        self.names.add(name)
        if domain == "com.microsoft":
            self.ms_domain = True
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def storage(self, qp: QParams) -> tuple[DType, int]:
        """The integer type and zero point a tensor is stored with in the model.

        With act_type="uint8" an int8 grid (s, z) is stored as uint8 (s, z + 128): the same real
        values and clamping range, in the format onnxruntime's x86 kernels take (U8S8)."""
        if qp.dtype == DType.INT8 and self.act_type == "uint8":
            return DType.UINT8, qp.zero_point[0] + 128
        return qp.dtype, qp.zero_point[0]

    def zero_point(self, dtype: DType, value: int) -> str:
        """A scalar zero point, one initializer per (type, value) shared by every Q/DQ that uses it
        (the activation zero points take few distinct values: a smaller file)."""
        name = f"zp/{dtype.value}/{int(value)}"
        if name not in self.names:
            self.init(name, np.array(value, _NP[dtype]))
        return name

    def qdq(self, base: str, raw: str, qp: QParams) -> str:
        """QuantizeLinear(raw) -> base/q -> DequantizeLinear -> base/dq (per tensor)."""
        if qp.axis is not None:
            raise CareQError(f"'{base}': per-channel activation parameters are not emitted")
        dtype, zero_point = self.storage(qp)
        scale = self.init(f"{base}/scale", np.array(qp.scale[0], np.float32))
        zp = self.zero_point(dtype, zero_point)
        self.node("QuantizeLinear", [raw, scale, zp], [f"{base}/q"], f"{base}/Quantize")
        self.node("DequantizeLinear", [f"{base}/q", scale, zp], [f"{base}/dq"], f"{base}/Dequantize")
        return f"{base}/dq"

    def raw(self, tensor: str) -> str:
        """The ONNX name of a node's float output (the graph output is `logits` with float I/O)."""
        if tensor == self.graph.output and self.io == "float" and self.plan.qp(tensor) is None:
            return "logits"
        return tensor

    def out(self, tensor: str, raw: str | None = None) -> str:
        """Register a node output: Q/DQ when the plan quantizes it."""
        raw = raw or self.raw(tensor)
        qp = self._qp(tensor)
        self.val[tensor] = self.qdq(tensor, raw, qp) if qp is not None else raw
        return self.val[tensor]

    def requant(self, base: str, raw: str, like: str) -> str:
        """Q/DQ of an intermediate value with the parameters of graph tensor `like` (if quantized)."""
        qp = self._qp(like)
        return self.qdq(base, raw, qp) if qp is not None else raw

    def const(self, name: str, value: float, rank: int, like: QParams | None) -> str:
        """A scalar constant. Next to a quantized tensor (`like`): qmax at scale |value| / qmax + DQ
        (int8 127 at value / 127, as the TFLite emitter; exact), in that tensor's storage type."""
        shape = [1] * rank
        if like is None:
            return self.init(name, np.full(shape, value, np.float32))
        dtype, _ = self.storage(like)
        qmin, qmax = dtype.qrange
        zero = (qmin + qmax + 1) // 2 if dtype == DType.UINT8 else 0
        code, scale = scalar_const(value, qmax - zero)
        q = zero + code
        c = self.init(f"{name}/q", np.full(shape, q, _NP[dtype]))
        s = self.init(f"{name}/scale", np.array(scale, np.float32))
        return self.node("DequantizeLinear", [c, s, self.zero_point(dtype, zero)], [name], f"{name}/Dequantize")[0]

    def weight_dq(self, name: str, qw: np.ndarray, scales: np.ndarray, per_channel: bool,
                  explicit_zero: bool = False) -> str:
        """Symmetric weights q in [-127, 127]: int8 (zero point 0) or uint8 (q + 128, zero point 128).

        Per-channel int8 weights get no zero-point tensor (ONNX's default, 0) unless `explicit_zero`:
        weights whose op does not fuse into an 8-bit integer kernel (the Gemm; convs next to int16 or
        float tensors, `_weights_unfused`) need one, as onnxruntime's x86 int8->uint8 weight rewrite
        (session.x64quantprecision) then adds a scalar zero point that its per-axis
        DequantizeLinear rejects."""
        dtype, zero = (np.uint8, 128) if self.weight_type == "uint8" else (np.int8, 0)
        w = self.init(f"{name}/q", (qw.astype(np.int64) + zero).astype(dtype))
        if per_channel:
            s = self.init(f"{name}/scale", scales.astype(np.float32))
            if zero == 0 and not explicit_zero:
                return self.node("DequantizeLinear", [w, s], [name], f"{name}/Dequantize", axis=0)[0]
            z = self.init(f"{name}/zero_point", np.full(len(scales), zero, dtype))
            return self.node("DequantizeLinear", [w, s, z], [name], f"{name}/Dequantize", axis=0)[0]
        s = self.init(f"{name}/scale", np.array(scales[0], np.float32))
        z = self.init(f"{name}/zero_point", np.array(zero, dtype))
        return self.node("DequantizeLinear", [w, s, z], [name], f"{name}/Dequantize")[0]

    def _weight_dq(self, name: str, weight, explicit_zero: bool = False) -> tuple[str, np.ndarray]:
        """The plan's int8 weights of a conv/linear module (symmetric, per output channel) + DQ,
        and their float32 scales."""
        per_channel = self.plan.recipe.weight_granularity == "per_channel"
        qmax = weight_qmax(self.plan)
        s_w = weight_scales(weight, per_channel, qmax).detach().float().numpy()
        w = weight.detach().double().numpy()
        qw = np.clip(np.round(w / s_w.astype(np.float64).reshape((-1,) + (1,) * (w.ndim - 1))), -qmax, qmax)
        return self.weight_dq(name, qw, s_w, per_channel, explicit_zero), s_w

    def _weights_unfused(self, n) -> bool:
        """Whether conv node `n` stays a float Conv in onnxruntime (its input or output is not on an
        8-bit grid: int16 attention, mixed precision), so that its weights' DequantizeLinear runs
        as a node of its own and needs an explicit per-channel zero point (see `weight_dq`)."""
        qps = (self._qp(n.inputs[0]), self._qp(n.outputs[0]))
        return not all(qp is not None and qp.dtype in (DType.INT8, DType.UINT8) for qp in qps)

    def bias_dq(self, name: str, bias: np.ndarray, scales: np.ndarray) -> str:
        """int32 bias at per-channel scales s_in * s_w, + DQ (axis 0)."""
        qb = np.clip(np.round(bias / scales), -(2 ** 31), 2 ** 31 - 1).astype(np.int32)
        b = self.init(f"{name}/int32", qb)
        s = self.init(f"{name}/scale", scales.astype(np.float32))  # zero point: the default 0
        return self.node("DequantizeLinear", [b, s], [name], f"{name}/Dequantize", axis=0)[0]

    def i64(self, name: str, values) -> str:
        return self.init(name, np.asarray(values, dtype=np.int64))

    # ---------------------------------------------------------------- model
    def emit(self) -> onnx.ModelProto:
        g = self.graph
        shape = list(g.shapes[g.input])
        qin = self._qp(g.input)
        if self.io == "float":
            inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *shape[1:]])
            self.names.add("input")
            self.val[g.input] = self.qdq(g.input, "input", qin) if qin is not None else "input"
        else:
            if qin is None or qin.dtype != DType.INT8:
                raise CareQError("io=int8 needs an int8 input tensor in the plan")
            qout = self.plan.output_qparams
            if qout is None:
                raise CareQError("io=int8 needs plan.output_qparams (the logits range): calibrate with "
                                 "care_q.quant.calibrate.calibrate")
            if qout.dtype != DType.INT8:
                raise CareQError(f"io=int8 needs int8 output parameters, the plan has {qout.dtype.value}")
            inp = helper.make_tensor_value_info("input", TensorProto.INT8, ["N", *shape[1:]])
            self.names.add("input")
            s = self.init("input/int8/scale", np.array(qin.scale[0], np.float32))
            z = self.init("input/int8/zero_point", np.array(qin.zero_point[0], np.int8))
            x = self.node("DequantizeLinear", ["input", s, z], ["input/int8/dq"], "input/int8/Dequantize")[0]
            if self.storage(qin)[0] == DType.INT8:
                self.val[g.input] = x
            else:  # re-encode to the storage type once (exact: same grid)
                self.val[g.input] = self.qdq(g.input, x, qin)
        for n in g.nodes:
            fn = getattr(self, f"op_{n.op}", None)
            if fn is None:
                raise CareQError(f"{n.name}: op '{n.op}' has no ONNX QDQ form")
            self._layout_inputs(n)
            fn(n)
            if n.op in (*self.SWAP_TRANSPARENT, *self.SWAP_BINARY) and all(t in self.swapped for t in n.inputs):
                self.swapped.add(n.outputs[0])
        final = self.val[g.output]
        n_classes = g.shapes[g.output][-1]
        if self.io == "float":
            if final != "logits":
                self.node("Identity", [final], ["logits"], "logits/Identity")
            out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_classes])
        else:
            qp = self.plan.output_qparams
            s = self.init("logits/scale", np.array(qp.scale[0], np.float32))
            z = self.init("logits/zero_point", np.array(qp.zero_point[0], np.int8))
            self.node("QuantizeLinear", [final, s, z], ["logits"], "logits/Quantize")
            out = helper.make_tensor_value_info("logits", TensorProto.INT8, ["N", n_classes])
        graph = helper.make_graph(self.nodes, "care_q_qdq", [inp], [out], self.inits)
        opsets = [helper.make_opsetid("", self.opset)]
        if self.ms_domain:
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="care-q",
                                  doc_string=f"care-q int8 QDQ, recipe {self.plan.recipe.name}, io={self.io}")
        model.ir_version = helper.find_min_ir_version_for([helper.make_opsetid("", self.opset)])
        helper.set_model_props(model, self.metadata())
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as e:
            raise CareQError(f"emitted QDQ model fails onnx.checker: {e}") from None
        return model

    def metadata(self) -> dict[str, str]:
        """What a runner needs and the file does not say otherwise: the integer I/O grids and
        the session config entries for exact results (see ORT_SESSION_CONFIG)."""
        meta = {"care_q.recipe": self.plan.recipe.name, "care_q.io": self.io,
                "care_q.act_type": self.act_type, "care_q.weight_type": self.weight_type,
                "care_q.ort_session_config": json.dumps(ORT_SESSION_CONFIG if self.weight_type == "int8"
                                                        and weight_qmax(self.plan) > 63
                                                        else {})}
        if self.io == "int8":
            for key, qp in (("input", self.plan.qp(self.graph.input)), ("output", self.plan.output_qparams)):
                meta[f"care_q.{key}_scale"] = repr(float(qp.scale[0]))
                meta[f"care_q.{key}_zero_point"] = str(int(qp.zero_point[0]))
        return meta

    # ---------------------------------------------------------------- head-major layout
    # The attention runs "head-major": every (B, h, N, D) tensor is stored as (B, h, D, N), which
    # is what the channels reshape to without a Transpose. onnxruntime's QLinearMatMul has no
    # transpose flags and its layout pass wraps every Transpose near its NHWC convs in more
    # Transposes (12 per attention block in the token-major form); computing C^T = B^T A^T
    # instead needs one (phi_k for k^T v). Same integer products, same requantization: the
    # values are the reference's, only stored transposed.
    SWAP_TRANSPARENT = ("elu", "add_const", "mul_const", "reciprocal")  # per element or per dim-1 channel
    SWAP_BINARY = ("div", "mul")  # per element with broadcasting: either both inputs swapped or neither

    def _layout_inputs(self, n) -> None:
        """Give node `n` its inputs in the layout it reads: ops that are not layout-aware get
        swapped tensors transposed back (once)."""
        aware = n.op in ("matmul", "mean_tokens", "from_heads", *self.SWAP_TRANSPARENT)
        if n.op in self.SWAP_BINARY:
            aware = all(t in self.swapped for t in n.inputs) or not any(t in self.swapped for t in n.inputs)
        for t in n.inputs:
            if t in self.swapped and not aware:
                self.val[t] = self._swap_last(t, self.val[t], f"{t}/token_major", like=t)
                self.swapped.discard(t)

    def _swap_last(self, tensor: str, value: str, base: str, like: str) -> str:
        """`value` (shaped as graph tensor `tensor`, or its swap) with its last two dims swapped,
        re-quantized like `like`: a Reshape where one of them is 1 (the same data order)."""
        shape = list(self.graph.shapes[tensor])
        if 1 in shape[-2:]:
            target = [0, *shape[1:]] if tensor in self.swapped else [0, *shape[1:-2], shape[-1], shape[-2]]
            t = self.node("Reshape", [value, self.i64(f"{base}/shape", target)], [base], f"{base}/Reshape")[0]
        else:
            t = self.node("Transpose", [value], [base], f"{base}/Transpose", perm=[0, 1, 3, 2])[0]
        return self.requant(f"{base}/rq", t, like=like)

    # ---------------------------------------------------------------- ops
    def op_conv(self, n):
        conv = n.module
        x = self.val[n.inputs[0]]
        wt, s_w = self._weight_dq(f"{n.name}.weight", conv.weight, explicit_zero=self._weights_unfused(n))
        inputs = [x, wt]
        cout = conv.weight.shape[0]
        bias = conv.bias.detach().double().numpy() if conv.bias is not None else None
        in_qp = self._qp(n.inputs[0])
        if in_qp is not None:
            s_b = s_w.astype(np.float64) * in_qp.scale[0]
            inputs.append(self.bias_dq(f"{n.name}.bias", bias if bias is not None else np.zeros(cout), s_b))
        elif bias is not None:
            inputs.append(self.init(f"{n.name}.bias", bias.astype(np.float32)))
        raw = self.node("Conv", inputs, [self.raw(n.outputs[0])], n.name, **_conv_attrs(conv))[0]
        self.out(n.outputs[0], raw)

    def _binary(self, n, op_type):
        a, b = self.val[n.inputs[0]], self.val[n.inputs[1]]
        self.out(n.outputs[0], self.node(op_type, [a, b], [self.raw(n.outputs[0])], n.name)[0])

    def op_add(self, n):
        self._binary(n, "Add")

    def op_mul(self, n):
        self._binary(n, "Mul")

    def op_div(self, n):
        self._binary(n, "Div")

    def op_reciprocal(self, n):
        x = self.val[n.inputs[0]]
        self.out(n.outputs[0], self.node("Reciprocal", [x], [self.raw(n.outputs[0])], n.name)[0])

    def _const_value(self, n) -> float:
        # the divisor guard of `*.den_eps` nodes is fixed by QuantPlan.finalize
        return float(self.plan.consts.get(n.name, n.attrs["value"]))

    def _scalar_op(self, n, op_type, value: float):
        x = self.val[n.inputs[0]]
        like = self._qp(n.inputs[0]) or self._qp(n.outputs[0])
        c = self.const(f"{n.name}.const", value, len(self.graph.shapes[n.inputs[0]]), like)
        self.out(n.outputs[0], self.node(op_type, [x, c], [self.raw(n.outputs[0])], n.name)[0])

    def op_add_const(self, n):
        value = self._const_value(n)
        in_qp, out_qp = self._qp(n.inputs[0]), self._qp(n.outputs[0])
        if in_qp is None or (out_qp is not None and in_qp.dtype == out_qp.dtype == DType.INT8):
            # int8: DQ(x) + DQ(c) -> Q, one QLinearAdd with a scalar, whose arithmetic the
            # reference computes (QuantOps.add_const, exact="onnxruntime"). Not a conv: in the
            # attention onnxruntime would wrap each such conv in NHWC layout Transposes.
            self._scalar_op(n, "Add", value)
            return
        # x + c as a 1x1 depthwise Conv over dim 1 (weight 1 = 127 at 1/127, bias c in int32):
        # the reference computes exactly this (QuantOps.add_const), as the TFLite file does.
        x, o = self.val[n.inputs[0]], n.outputs[0]
        ch = int(self.graph.shapes[n.inputs[0]][1])
        s_w = np.full(ch, np.float32(1.0 / 127.0), np.float32)
        wt = self.weight_dq(f"{n.name}.weight", np.full((ch, 1, 1, 1), 127.0), s_w, per_channel=True,
                            explicit_zero=self._weights_unfused(n))
        s_b = s_w.astype(np.float64) * np.float32(in_qp.scale[0])
        bt = self.bias_dq(f"{n.name}.bias", np.full(ch, value), s_b)
        raw = self.node("Conv", [x, wt, bt], [self.raw(o)], n.name, kernel_shape=[1, 1], pads=[0, 0, 0, 0],
                        strides=[1, 1], dilations=[1, 1], group=ch)[0]
        self.out(o, raw)

    def op_mul_const(self, n):
        v = n.attrs["value"]
        if isinstance(v, (int, float)) or v.dim() == 0:
            self._scalar_op(n, "Mul", float(v))
            return
        g = v.detach().double().numpy().reshape(-1)
        x, o = self.val[n.inputs[0]], n.outputs[0]
        in_qp = self._qp(n.inputs[0])
        if in_qp is None:  # float input: a plain broadcast Mul
            c = self.init(f"{n.name}.const", g.astype(np.float32).reshape(1, -1, 1, 1))
            self.out(o, self.node("Mul", [x, c], [self.raw(o)], n.name)[0])
            return
        # per-channel constant: a 1x1 depthwise conv, int8 weights +-127 at |g| / 127 (exact)
        s_w = (np.maximum(np.abs(g), 1e-12) / 127.0).astype(np.float32)
        qw = np.clip(np.round(g / s_w.astype(np.float64)), -127, 127).reshape(-1, 1, 1, 1)
        wt = self.weight_dq(f"{n.name}.weight", qw, s_w, per_channel=True, explicit_zero=self._weights_unfused(n))
        bt = self.bias_dq(f"{n.name}.bias", np.zeros(g.size), s_w.astype(np.float64) * in_qp.scale[0])
        raw = self.node("Conv", [x, wt, bt], [self.raw(o)], n.name, kernel_shape=[1, 1], pads=[0, 0, 0, 0],
                        strides=[1, 1], dilations=[1, 1], group=int(g.size))[0]
        self.out(o, raw)

    def _unary(self, n, op_type, domain="", **attrs):
        x = self.val[n.inputs[0]]
        self.out(n.outputs[0], self.node(op_type, [x], [self.raw(n.outputs[0])], n.name, domain, **attrs)[0])

    def op_gelu(self, n):
        if self.opset >= 20:
            self._unary(n, "Gelu")
        else:
            self._unary(n, "Gelu", "com.microsoft")

    def op_elu(self, n):
        self._unary(n, "Elu", alpha=1.0)

    def op_silu(self, n):
        x, o = self.val[n.inputs[0]], n.outputs[0]
        s = self.node("Sigmoid", [x], [f"{o}/sigmoid"], f"{n.name}/Sigmoid")[0]
        if self.plan.quantized(o):
            s = self.qdq(f"{o}/sigmoid", s, SIGMOID_QPARAMS[self.plan.specs[o].dtype])
        self.out(o, self.node("Mul", [x, s], [self.raw(o)], n.name)[0])

    def op_split(self, n):
        x = self.val[n.inputs[0]]
        sizes = self.i64(f"{n.name}/sizes", n.attrs["sizes"])
        raws = self.node("Split", [x, sizes], [self.raw(o) for o in n.outputs], n.name, axis=n.attrs["dim"])
        for o, r in zip(n.outputs, raws):
            self.out(o, r)

    def op_cat(self, n):
        xs, o = [self.val[i] for i in n.inputs], n.outputs[0]
        self.out(o, self.node("Concat", xs, [self.raw(o)], n.name, axis=n.attrs["dim"])[0])

    def op_to_heads(self, n):
        o = n.outputs[0]
        _, nh, tokens, d = self.graph.shapes[o]
        shape = self.i64(f"{n.name}/shape", [0, nh, d, tokens])   # 0: keep the (dynamic) batch
        self.out(o, self.node("Reshape", [self.val[n.inputs[0]], shape], [self.raw(o)], n.name)[0])
        self.swapped.add(o)   # (B, h, D, N): head-major, see _layout_inputs

    def op_from_heads(self, n):
        o = n.outputs[0]
        _, c, h, w = self.graph.shapes[o]
        if n.inputs[0] in self.swapped:  # (B, h, D, N) is the channels' order already
            shape = self.i64(f"{n.name}/shape", [0, c, h, w])
            self.out(o, self.node("Reshape", [self.val[n.inputs[0]], shape], [self.raw(o)], n.name)[0])
            return
        t = self.node("Transpose", [self.val[n.inputs[0]]], [f"{o}/tokens"], f"{n.name}/Transpose",
                      perm=[0, 1, 3, 2])[0]
        t = self.requant(f"{o}/tokens", t, like=o)
        shape = self.i64(f"{n.name}/shape", [0, c, h, w])
        self.out(o, self.node("Reshape", [t, shape], [self.raw(o)], n.name)[0])

    def op_matmul(self, n):
        """C = op(A) op(B) (op: the node's transpose flags) from operands stored either way: as
        C, or as C^T = op(B)^T op(A)^T (stored swapped), whichever needs fewer Transposes
        (a tie goes to C^T, the attention's head-major layout)."""
        ta = (n.inputs[0] in self.swapped) != n.attrs["transpose_a"]   # stored A is op(A)^T
        tb = (n.inputs[1] in self.swapped) != n.attrs["transpose_b"]

        def cost(tensor, need_swap):
            return 0 if not need_swap else (0.5 if 1 in self.graph.shapes[tensor][-2:] else 1)

        direct = cost(n.inputs[0], ta) + cost(n.inputs[1], tb)
        swapped = cost(n.inputs[0], not ta) + cost(n.inputs[1], not tb)

        def operand(i, side, need_swap):
            t = n.inputs[i]
            return self._swap_last(t, self.val[t], f"{n.name}/{side}_t", like=t) if need_swap else self.val[t]

        if swapped <= direct:
            ops = [operand(1, "b", not tb), operand(0, "a", not ta)]
        else:
            ops = [operand(0, "a", ta), operand(1, "b", tb)]
        self.out(n.outputs[0], self.node("MatMul", ops, [self.raw(n.outputs[0])], n.name)[0])
        if swapped <= direct:
            self.swapped.add(n.outputs[0])

    def op_mean_tokens(self, n):
        x, o = self.val[n.inputs[0]], n.outputs[0]
        axis = 3 if n.inputs[0] in self.swapped else 2
        if self.opset >= 18:
            axes = self.i64(f"{n.name}/axes", [axis])
            raw = self.node("ReduceMean", [x, axes], [self.raw(o)], n.name, keepdims=1)[0]
        else:
            raw = self.node("ReduceMean", [x], [self.raw(o)], n.name, axes=[axis], keepdims=1)[0]
        self.out(o, raw)
        if axis == 3:
            self.swapped.add(o)

    def op_global_pool(self, n):
        o = n.outputs[0]
        p = self.node("GlobalAveragePool", [self.val[n.inputs[0]]], [f"{o}/pooled"], n.name)[0]
        p = self.requant(f"{o}/pooled", p, like=o)    # DQ -> GAP -> Q: QLinearGlobalAveragePool
        self.val[o] = self.node("Flatten", [p], [self.raw(o)], f"{n.name}/Flatten", axis=1)[0]

    def op_layer_norm(self, n):
        x, o = self.val[n.inputs[0]], n.outputs[0]
        c = self.graph.shapes[n.inputs[0]][-1]
        ones = self.init(f"{n.name}/gamma", np.ones(c, np.float32))
        zeros = self.init(f"{n.name}/beta", np.zeros(c, np.float32))
        raw = self.node("LayerNormalization", [x, ones, zeros], [self.raw(o)], n.name, axis=-1,
                        epsilon=float(n.attrs["eps"]))[0]
        self.out(o, raw)

    def op_linear(self, n):
        fc, o = n.module, n.outputs[0]
        in_qp = self._qp(n.inputs[0])
        if self._qp(o) is None or in_qp is None:  # float classifier, as in the reference (QuantOps.linear)
            w = self.init(f"{n.name}.weight", fc.weight.detach().numpy().astype(np.float32))
            inputs = [self.val[n.inputs[0]], w]
            if fc.bias is not None:
                inputs.append(self.init(f"{n.name}.bias", fc.bias.detach().numpy().astype(np.float32)))
            self.out(o, self.node("Gemm", inputs, [self.raw(o)], n.name, transB=1)[0])
            return
        # static int8 classifier (recipe head.dtype int8): DQ(int8 W per row) -> Gemm -> Q, a QGemm in onnxruntime
        wt, s_w = self._weight_dq(f"{n.name}.weight", fc.weight, explicit_zero=True)
        s_b = s_w.astype(np.float64) * in_qp.scale[0]
        bias = fc.bias.detach().double().numpy() if fc.bias is not None else np.zeros(fc.weight.shape[0])
        inputs = [self.val[n.inputs[0]], wt, self.bias_dq(f"{n.name}.bias", bias, s_b)]
        self.out(o, self.node("Gemm", inputs, [self.raw(o)], n.name, transB=1)[0])


def emit_onnx_qdq(plan: QuantPlan, io: str = "float", opset: int | None = None,
                  act_type: str = "uint8", weight_type: str = "int8") -> onnx.ModelProto:
    """The ONNX QDQ model of a calibrated plan (float or int8 I/O), checked by onnx.checker.

    `opset` defaults to 17 (21 when the plan has int16 activations). `act_type` is how the
    plan's int8 activations are stored: "uint8" (default; zero point + 128, the same values,
    the U8S8 form onnxruntime's x86 kernels run) or "int8" (literal; see the module docstring
    for why onnxruntime on x86 then leaves fan-out tensors' consumers unfused)."""
    return _Emitter(plan, io, opset, act_type, weight_type).emit()


def save_onnx(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write `model` to `path` atomically (one self-contained file)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))
    return path
