"""XNNPACK delegate rules: which TFLite ops the XNNPACK delegate takes, decided as it decides.

Source: google-ai-edge/LiteRT ``tflite/delegates/xnnpack/xnnpack_delegate.cc`` (read at commit
f6745779, Aug 2026; ai-edge-litert 2.3.0 behaves the same on every rule the tests exercise).
``Subgraph::VisitNode`` is called with ``subgraph == nullptr`` for every node of the execution plan
(``Delegate::PrepareOpsToDelegate``); a node is delegated when its ``Visit*Node`` returns kTfLiteOk.
Each check below names the function it mirrors. Delegate options are the Python interpreter's
defaults: signed and unsigned 8-bit quantization on, dynamically quantized ops on, dynamic
fully-connected off, no forced FP16.

Static weights: a DEQUANTIZE of a constant int8/fp16 tensor into float32 is not visited; it is
"unpacked" at delegate creation and delegated when no CPU node reads its output
(``static_unpack_nodes_``).
"""

from __future__ import annotations

import math

from care_q.census.tflite_reader import Op, Tensor, TFLiteGraph
from care_q.census.verdict import FLOAT_TYPES, Verdict, first_failure, no, ok

XNN_MAX_TENSOR_DIMS = 6
_ACT_NAMES = {0: "NONE", 1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6", 4: "TANH", 5: "SIGN_BIT"}
# Unary ops with only float kernels (VisitUnaryNode: CheckTensorFloatType on input and output).
_FLOAT_ONLY_UNARY = {"ABS", "CEIL", "COS", "EXP", "FLOOR", "GELU", "HARD_SWISH", "LOG", "NEG", "RELU_N1_TO_1",
                     "RELU", "RELU6", "ROUND", "RSQRT", "SIN", "SQRT", "SQUARE"}
# Binary ops with only float kernels (VisitBinaryNode: CheckTensorFloatType on all three tensors).
_FLOAT_ONLY_BINARY = {"DIV", "MAXIMUM", "MINIMUM", "PRELU", "SQUARED_DIFFERENCE"}
_SRC = "xnnpack_delegate.cc"


# ----------------------------------------------------------------------------- tensor type checks
def _name(t: Tensor) -> str:
    return f"'{t.name}' ({t.describe()})"


def _float(t: Tensor) -> str | None:
    """CheckTensorFloatType: FLOAT32 or FLOAT16."""
    return None if t.dtype in FLOAT_TYPES else f"{_name(t)} is not float: float-only kernel"


def _per_tensor_q(t: Tensor) -> str | None:
    if not t.quantized:
        return f"{_name(t)} has no quantization parameters"
    if t.per_channel or t.axis != 0:
        return f"{_name(t)} is quantized per channel; only per-tensor quantization is supported here"
    return None


def _float_or_qs8(t: Tensor) -> str | None:
    """CheckTensorFloatOrQInt8Type: float, or INT8 per-tensor (no UINT8)."""
    if t.dtype in FLOAT_TYPES:
        return None
    if t.dtype == "INT8":
        return _per_tensor_q(t)
    return f"{_name(t)}: type {t.dtype} unsupported (float or int8 only)"


def _float_or_q8(t: Tensor, fp16: bool = True) -> str | None:
    """CheckTensorFloatOrQUInt8Type (fp16=True) / CheckTensorFloat32OrQUInt8Type (fp16=False):
    float, or INT8 / UINT8 per-tensor."""
    if t.dtype == "FLOAT32" or (fp16 and t.dtype == "FLOAT16"):
        return None
    if t.dtype in ("INT8", "UINT8"):
        return _per_tensor_q(t)
    return f"{_name(t)}: type {t.dtype} unsupported (float, int8 or uint8 only)"


def _q8_in(t: Tensor) -> str | None:
    """CheckTensorQInt8OrQUInt8Type."""
    if t.dtype in ("INT8", "UINT8"):
        return _per_tensor_q(t)
    return f"{_name(t)}: type {t.dtype} unsupported (int8 or uint8 only)"


def _valid_scale(s: float) -> bool:
    return math.isfinite(s) and s > 0 and s >= 1.1754944e-38  # xnn_validate_*: positive normal scale


def _filter(t: Tensor, expected_dim: int) -> str | None:
    """CheckTensorFloat32OrQCInt8Type: float, INT8 per-tensor or per-channel on `expected_dim`
    (xnn_validate_channelwise_quantized_tensor: zero point 0, positive scales, one per channel),
    UINT8 per-tensor."""
    if t.dtype in FLOAT_TYPES:
        return None
    if t.dtype == "INT8":
        if not t.quantized:
            return f"{_name(t)} has no quantization parameters"
        if t.per_channel:
            if t.axis != expected_dim:
                return (f"{_name(t)}: per-channel quantization on axis {t.axis}, XNNPACK needs the "
                        f"output-channel axis {expected_dim}")
            if t.axis >= t.rank or len(t.scales) != t.shape[t.axis]:
                return f"{_name(t)}: {len(t.scales)} scales for {t.shape[t.axis] if t.axis < t.rank else '?'} channels"
            if any(z != 0 for z in t.zero_points[:1]) or not all(_valid_scale(s) for s in t.scales):
                return f"{_name(t)}: per-channel int8 needs zero point 0 and positive scales"
            return None
        if not -128 <= t.zero_point <= 127 or not _valid_scale(t.scale):
            return f"{_name(t)}: invalid int8 quantization (scale {t.scale}, zero point {t.zero_point})"
        return None
    if t.dtype == "UINT8":
        return _per_tensor_q(t)
    return f"{_name(t)}: type {t.dtype} unsupported for weights"


def _bias(t: Tensor) -> str | None:
    """CheckTensorFloat32OrFloat16OrQCInt32Type."""
    if t.dtype in FLOAT_TYPES:
        return None
    if t.dtype == "INT32":
        if not t.quantized or t.axis != 0:
            return f"bias {_name(t)} needs quantization parameters on axis 0"
        return None
    return f"bias {_name(t)}: type {t.dtype} unsupported"


def _rank(t: Tensor, lo: int, hi: int) -> str | None:
    """CheckTensorShape: lo <= rank <= hi and every dimension > 0."""
    if not lo <= t.rank <= hi:
        want = str(lo) if lo == hi else f"{lo}..{hi}"
        return f"{_name(t)}: rank {t.rank}, expected {want}"
    if any(d <= 0 for d in t.shape):
        return f"{_name(t)}: a dimension is <= 0"
    return None


def _activation(op: Op) -> str | None:
    """ConvertActivationToOutputRange: NONE / RELU / RELU_N1_TO_1 / RELU6 only."""
    a = op.fused_activation
    return None if a in (0, 1, 2, 3) else f"fused activation {_ACT_NAMES.get(a, a)} unsupported"


def _padding(op: Op) -> str | None:
    """CalculatePadding: SAME (0) or VALID (1)."""
    p = op.option("padding", 0)
    return None if p in (0, 1) else f"padding type {p} unsupported"


def _scale_ratio(a: Tensor, out: Tensor, lo: float, hi: float, what: str) -> str | None:
    """CheckTensorsInputOutputScale: input/output scale ratio in [lo, hi) for 8-bit tensors."""
    if a.dtype != out.dtype or a.dtype not in ("INT8", "UINT8"):
        return None
    r = a.scale / out.scale if out.scale else math.inf
    if not lo <= r < hi:
        return f"{what}: input/output scale ratio {r:.4g} outside [{lo:.4g}, {hi:g})"
    return None


# ----------------------------------------------------------------------------- rules
class XnnpackRules:
    """``check(op)`` for one op; ``select(graph)`` reproduces PrepareOpsToDelegate's node list."""

    target = "xnnpack"

    def __init__(self, graph: TFLiteGraph):
        self.g = graph
        self.quasi_static: set[int] = set()   # outputs of static-unpack DEQUANTIZE nodes

    def t(self, i: int) -> Tensor:
        return self.g.tensors[i]

    def _static(self, i: int) -> bool:
        """CheckTensorStaticAllocation, or a quasi-static (unpacked) tensor."""
        return self.t(i).constant or i in self.quasi_static

    # PrepareOpsToDelegate (the loop over the execution plan)
    def select(self) -> tuple[dict[int, Verdict], set[int]]:
        verdicts: dict[int, Verdict] = {}
        delegated: set[int] = set()
        unpack: dict[int, int] = {}           # static-unpack node -> its output tensor
        producer_of_qs: dict[int, int] = {}
        for op in self.g.ops:
            if self._is_static_unpack(op):
                unpack[op.index] = op.outputs[0]
                producer_of_qs[op.outputs[0]] = op.index
                self.quasi_static.add(op.outputs[0])
                continue
            v = self.check(op)
            verdicts[op.index] = v
            if v.mapped:
                delegated.add(op.index)
            else:  # a CPU node reading an unpacked weight keeps its DEQUANTIZE on the CPU
                for i in op.inputs:
                    if i in producer_of_qs:
                        unpack.pop(producer_of_qs[i], None)
        for op in self.g.ops:
            if op.index in verdicts:
                continue
            if op.index in unpack:
                verdicts[op.index] = ok("DEQUANTIZE of a constant weight: unpacked once at delegate "
                                        "creation (static_unpack_nodes_)")
                delegated.add(op.index)
            else:
                verdicts[op.index] = no("DEQUANTIZE of a constant weight read by a CPU op: stays on the CPU "
                                        "(static_unpack_nodes_)")
        return verdicts, delegated

    def _is_static_unpack(self, op: Op) -> bool:
        if op.name not in ("DEQUANTIZE", "DENSIFY") or len(op.inputs) != 1 or len(op.outputs) != 1:
            return False
        x, y = self.t(op.inputs[0]), self.t(op.outputs[0])
        if op.name == "DENSIFY":
            return False  # sparse tensors are not read by care-q; DENSIFY is left to the runtime
        static = x.constant or op.inputs[0] in self.quasi_static
        int8_ok = x.dtype == "INT8" and x.quantized
        return static and (x.dtype == "FLOAT16" or int8_ok) and y.dtype == "FLOAT32"

    # Subgraph::VisitNode
    def check(self, op: Op) -> Verdict:
        n = op.name
        fn = getattr(self, f"_v_{n.lower()}", None)
        if n in _FLOAT_ONLY_UNARY or n in ("ELU", "LOGISTIC", "TANH", "LEAKY_RELU", "QUANTIZE", "DEQUANTIZE"):
            return self._unary(op)
        if n in _FLOAT_ONLY_BINARY or n in ("ADD", "MUL", "SUB"):
            return self._binary(op)
        if fn is None:
            return no(f"{n} has no XNNPACK visitor (VisitNode default case, {_SRC})")
        return fn(op)

    # VisitUnaryNode
    def _unary(self, op: Op) -> Verdict:
        n = op.name
        if len(op.inputs) != 1 or len(op.outputs) != 1:
            return no(f"{n}: expected 1 input and 1 output")
        x, y = self.t(op.inputs[0]), self.t(op.outputs[0])
        where = f"VisitUnaryNode, {_SRC}"
        fail = _rank(x, 0, XNN_MAX_TENSOR_DIMS)
        if fail:
            return no(f"{n}: {fail} ({where})")
        if n in _FLOAT_ONLY_UNARY:
            fail = first_failure(_float(x), _float(y))
            if fail:
                return no(f"{n} {x.dtype}: XNNPACK has a float {n} only ({where})")
            return ok(f"{n} float")
        if n == "DEQUANTIZE":
            fail = first_failure(_q8_in(x), _float(y))
            return no(f"DEQUANTIZE: {fail} ({where})") if fail else ok(f"DEQUANTIZE {x.dtype} -> {y.dtype}")
        if n == "ELU":
            fail = first_failure(_float_or_qs8(x), _float_or_qs8(y))
            return no(f"ELU: {fail} ({where})") if fail else ok(f"ELU {x.dtype} (float or int8 per-tensor)")
        if n in ("LOGISTIC", "TANH"):
            fail = first_failure(_float_or_q8(x), _float_or_q8(y))
            return no(f"{n}: {fail} ({where})") if fail else ok(f"{n} {x.dtype}")
        if n == "LEAKY_RELU":
            fail = first_failure(_float_or_q8(x), _float_or_q8(y))
            if fail:
                return no(f"LEAKY_RELU: {fail} ({where})")
            alpha = float(op.option("alpha", 0.0) or 0.0)
            if alpha == 0.0 or not math.isfinite(alpha):
                return no(f"LEAKY_RELU: alpha {alpha} unsupported ({where})")
            if x.quantized and y.quantized and not x.per_channel and not y.per_channel:
                pos = x.scale / y.scale
                if not 1 / 256 <= pos <= 128:
                    return no(f"LEAKY_RELU: input/output scale ratio {pos:.4g} outside [1/256, 128] ({where})")
                neg = pos * alpha
                if not -127.99609375 <= neg <= 128 or abs(neg) < 1 / 256:
                    return no(f"LEAKY_RELU: negative-side scale {neg:.4g} out of range ({where})")
            return ok(f"LEAKY_RELU {x.dtype}")
        # QUANTIZE: float -> 8-bit, or 8-bit -> 8-bit of the same type with ratio in [1/256, 128]
        fail = first_failure(_float_or_q8(x), _float_or_q8(y))
        if fail:
            return no(f"QUANTIZE: {fail} ({where})")
        if x.dtype in FLOAT_TYPES:
            return ok(f"QUANTIZE {x.dtype} -> {y.dtype}")
        if x.dtype != y.dtype:
            return no(f"QUANTIZE {x.dtype} -> {y.dtype}: type change between 8-bit types unsupported ({where})")
        r = x.scale / y.scale
        if not 1 / 256 <= r <= 128:
            return no(f"QUANTIZE: input/output scale ratio {r:.4g} outside [1/256, 128] ({where})")
        return ok(f"QUANTIZE (requantize {x.dtype}, scale ratio {r:.3g})")

    # VisitBinaryNode
    def _binary(self, op: Op) -> Verdict:
        n = op.name
        where = f"VisitBinaryNode, {_SRC}"
        if len(op.inputs) != 2 or len(op.outputs) != 1:
            return no(f"{n}: expected 2 inputs and 1 output ({where})")
        a, b, y = self.t(op.inputs[0]), self.t(op.inputs[1]), self.t(op.outputs[0])
        fail = first_failure(_rank(a, 0, XNN_MAX_TENSOR_DIMS), _rank(b, 0, XNN_MAX_TENSOR_DIMS))
        if fail:
            return no(f"{n}: {fail} ({where})")
        if n in _FLOAT_ONLY_BINARY:
            if first_failure(_float(a), _float(b), _float(y)):
                return no(f"{n} {a.dtype}: XNNPACK has a float {n} only ({where})")
            if n == "PRELU" and not self._static(op.inputs[1]):
                return no(f"PRELU: slope '{b.name}' is not a constant ({where})")
            return ok(f"{n} float")
        fail = first_failure(_float_or_q8(a), _float_or_q8(b), _float_or_q8(y))
        if fail:
            return no(f"{n}: {fail} ({where})")
        if not a.dtype == b.dtype == y.dtype:
            return no(f"{n}: mixed types {a.dtype}, {b.dtype} -> {y.dtype} ({where})")
        fail = _activation(op)
        if fail:
            return no(f"{n}: {fail} ({where})")
        if a.dtype not in ("INT8", "UINT8"):
            return ok(f"{n} {a.dtype}")
        if n in ("ADD", "SUB"):
            # CheckTensorsInputOutputScale(input_i, output, 1/1024, 256) for both inputs
            fail = first_failure(_scale_ratio(a, y, 1 / 1024, 256, f"{n} input 0"),
                                 _scale_ratio(b, y, 1 / 1024, 256, f"{n} input 1"))
            if fail:
                return no(f"{fail} ({where})")
            return ok(f"{n} {a.dtype}: input/output scale ratios {a.scale / y.scale:.3g}, {b.scale / y.scale:.3g} "
                      f"within [1/1024, 256)")
        # MUL: CheckTensorsInputProductOutputScale(1/65536, 256)
        r = a.scale * b.scale / y.scale
        if not 1 / 65536 <= r < 256:
            return no(f"MUL: input-product/output scale ratio {r:.4g} outside [1/65536, 256) ({where})")
        return ok(f"MUL {a.dtype}: product/output scale ratio {r:.3g} within [1/65536, 256)")

    # VisitBatchMatMulNode
    def _v_batch_matmul(self, op: Op) -> Verdict:
        where = f"VisitBatchMatMulNode, {_SRC}"
        a, b, y = self.t(op.inputs[0]), self.t(op.inputs[1]), self.t(op.outputs[0])
        fail = _float_or_q8(a)
        if fail:
            return no(f"BATCH_MATMUL: {fail} ({where})")
        adj_y = bool(op.option("adjY", False))
        fail = _filter(b, b.rank - 2 if adj_y else b.rank - 1)
        if fail:
            return no(f"BATCH_MATMUL: {fail} ({where})")
        dyn = a.dtype == "FLOAT32" and b.dtype == "INT8"
        if b.dtype == "INT8" and not dyn and b.zero_point != 0:
            return no(f"int8 BATCH_MATMUL: RHS '{b.name}' has zero point {b.zero_point}; XNNPACK needs 0 ({where})")
        fail = _float_or_q8(y)
        if fail:
            return no(f"BATCH_MATMUL: {fail} ({where})")
        if _xnn_type(a) != _xnn_type(b) and not dyn:
            return no(f"BATCH_MATMUL: mixed types {_xnn_type(a)} x {_xnn_type(b)} ({where})")
        if a.rank < 2 or b.rank < 2:
            return no(f"BATCH_MATMUL: operands need rank >= 2 ({where})")
        if b.dtype == "INT8" and not dyn:
            return ok("int8 BATCH_MATMUL, RHS zero point 0")
        return ok(f"BATCH_MATMUL {a.dtype} x {b.dtype}" + (" (dynamically quantized)" if dyn else ""))

    # VisitConcatenationNode (+ xnn_define_concatenate at delegate creation)
    def _v_concatenation(self, op: Op) -> Verdict:
        where = f"VisitConcatenationNode, {_SRC}"
        if not 2 <= len(op.inputs) <= 5:
            return no(f"CONCATENATION of {len(op.inputs)} inputs: XNNPACK takes 2..5 ({where})")
        y = self.t(op.outputs[0])
        fail = _float_or_q8(y)
        if fail:
            return no(f"CONCATENATION: {fail} ({where})")
        axis = int(op.option("axis", 0) or 0)
        ins = [self.t(i) for i in op.inputs]
        if any(axis >= x.rank for x in ins):
            return no(f"CONCATENATION along new dimension {axis} unsupported ({where})")
        mismatch = [x for x in ins if x.quantized and (x.scale != y.scale or x.zero_point != y.zero_point)]
        if y.dtype == "UINT8" and mismatch:
            return no(f"uint8 CONCATENATION: input {_name(mismatch[0])} does not share the output's quantization "
                      f"(s={y.scale:.3g} zp={y.zero_point}) ({where})")
        fail = first_failure(*[_float_or_q8(x) for x in ins])
        if fail:
            return no(f"CONCATENATION: {fail} ({where})")
        if y.dtype == "INT8" and mismatch:
            # The delegate's check only compares uint8; XNNPACK's subgraph definition then rejects the
            # node and the delegate fails to prepare (measured with ai-edge-litert 2.3.0: load error).
            return Verdict(True, "int8 CONCATENATION accepted by the delegate's check",
                           fatal=f"input {_name(mismatch[0])} does not share the output's quantization "
                                 f"(s={y.scale:.3g} zp={y.zero_point}): xnn_define_concatenate fails and the "
                                 f"interpreter cannot prepare the delegate")
        return ok(f"CONCATENATION {y.dtype}" + (": inputs share the output's quantization" if y.quantized else ""))

    # VisitConv2DNode
    def _v_conv_2d(self, op: Op) -> Verdict:
        return self._conv(op, "CONV_2D", filter_dim=0, dyn_ok=True, where=f"VisitConv2DNode, {_SRC}")

    # VisitDepthwiseConv2DNode
    def _v_depthwise_conv_2d(self, op: Op) -> Verdict:
        return self._conv(op, "DEPTHWISE_CONV_2D", filter_dim=3, dyn_ok=False,
                          where=f"VisitDepthwiseConv2DNode, {_SRC}")

    def _conv(self, op: Op, n: str, filter_dim: int, dyn_ok: bool, where: str) -> Verdict:
        if op.option("strideW", 1) <= 0 or op.option("strideH", 1) <= 0:
            return no(f"{n}: non-positive stride ({where})")
        if op.option("dilationWFactor", 1) <= 0 or op.option("dilationHFactor", 1) <= 0:
            return no(f"{n}: non-positive dilation ({where})")
        if len(op.inputs) != 3 or len(op.outputs) != 1:
            return no(f"{n}: expected 3 inputs (input, filter, bias) and 1 output ({where})")
        x, w, y = self.t(op.inputs[0]), self.t(op.inputs[1]), self.t(op.outputs[0])
        fail = first_failure(_float_or_q8(x), _rank(x, 4, 4), _filter(w, filter_dim), _rank(w, 4, 4))
        if fail:
            return no(f"{n}: {fail} ({where})")
        if not self._static(op.inputs[1]):
            return no(f"{n}: filter '{w.name}' is not a constant (dynamic filters are rejected) ({where})")
        if op.inputs[2] < 0:
            return no(f"{n} without bias unsupported ({where})")
        b = self.t(op.inputs[2])
        fail = first_failure(_bias(b), _rank(b, 1, 1))
        if fail:
            return no(f"{n}: {fail} ({where})")
        if not self._static(op.inputs[2]):
            return no(f"{n}: bias '{b.name}' is not a constant ({where})")
        if w.dtype in FLOAT_TYPES and b.dtype != w.dtype and not (w.dtype == "FLOAT16" and b.dtype == "FLOAT32"):
            return no(f"{n}: filter and bias types {w.dtype}, {b.dtype} differ ({where})")
        fail = first_failure(_float_or_q8(y), _rank(y, 4, 4))
        if fail:
            return no(f"{n}: {fail} ({where})")
        dyn = dyn_ok and x.dtype == "FLOAT32" and w.dtype == "INT8"
        if x.dtype != y.dtype or (x.dtype != w.dtype and not dyn):
            return no(f"{n}: mixed types {x.dtype} input, {w.dtype} filter, {y.dtype} output ({where})")
        if n == "DEPTHWISE_CONV_2D":
            dm = int(op.option("depthMultiplier", 1) or 1)
            if dm <= 0 or w.shape[3] % dm:
                return no(f"{n}: depth multiplier {dm} incompatible with {w.shape[3]} channels ({where})")
        fail = first_failure(_padding(op), _activation(op))
        if fail:
            return no(f"{n}: {fail} ({where})")
        q = ""
        if w.dtype == "INT8":
            q = (f", per-channel weights on axis {filter_dim}" if w.per_channel else ", per-tensor weights")
        return ok(f"{n} {x.dtype}{' (dynamically quantized)' if dyn else ''}{q}, constant filter and bias")

    # VisitFullyConnectedNode
    def _v_fully_connected(self, op: Op) -> Verdict:
        where = f"VisitFullyConnectedNode, {_SRC}"
        if op.version == 8:
            return no(f"FULLY_CONNECTED version 8 (sparse weights) unsupported ({where})")
        if int(op.option("weightsFormat", 0) or 0) != 0:
            return no(f"FULLY_CONNECTED: non-default weights format ({where})")
        if not 2 <= len(op.inputs) <= 3:
            return no(f"FULLY_CONNECTED: expected 2 or 3 inputs ({where})")
        x, w, y = self.t(op.inputs[0]), self.t(op.inputs[1]), self.t(op.outputs[0])
        fail = first_failure(_float_or_q8(x), _rank(w, 2, 2))
        if fail:
            return no(f"FULLY_CONNECTED: {fail} ({where})")
        fail = _filter(w, 0)
        if fail:
            return no(f"FULLY_CONNECTED: {fail} ({where})")
        if not self._static(op.inputs[1]):
            return no(f"FULLY_CONNECTED: weights '{w.name}' are not a constant ({where})")
        if len(op.inputs) == 3 and op.inputs[2] >= 0:
            b = self.t(op.inputs[2])
            if math.prod(b.shape) != w.shape[0]:
                return no(f"FULLY_CONNECTED: bias has {math.prod(b.shape)} elements for {w.shape[0]} outputs ({where})")
            fail = _bias(b)
            if fail:
                return no(f"FULLY_CONNECTED: {fail} ({where})")
            if not self._static(op.inputs[2]):
                return no(f"FULLY_CONNECTED: bias '{b.name}' is not a constant ({where})")
        fail = _float_or_q8(y)
        if fail:
            return no(f"FULLY_CONNECTED: {fail} ({where})")
        dyn = x.dtype in FLOAT_TYPES and w.dtype == "INT8"
        srq = x.dtype == "INT8" and w.dtype == "INT8"
        if x.dtype != y.dtype or (x.dtype != w.dtype and not (dyn or srq)):
            return no(f"FULLY_CONNECTED: mixed types {x.dtype} input, {w.dtype} weights, {y.dtype} output ({where})")
        if not dyn and w.dtype == "INT8" and w.zero_point != 0:
            return no(f"FULLY_CONNECTED: int8 weights with zero point {w.zero_point} ({where})")
        fail = _activation(op)
        if fail:
            return no(f"FULLY_CONNECTED: {fail} ({where})")
        return ok(f"FULLY_CONNECTED {x.dtype}" + (" (dynamically quantized)" if dyn else "") + ", constant weights")

    # VisitReduceNode
    def _reduce(self, op: Op) -> Verdict:
        where = f"VisitReduceNode, {_SRC}"
        x, axes, y = self.t(op.inputs[0]), self.t(op.inputs[1]), self.t(op.outputs[0])
        fail = _float_or_q8(x)
        if fail:
            return no(f"{op.name}: {fail} ({where})")
        if axes.dtype != "INT32" or axes.rank > 1 or not axes.constant:
            return no(f"{op.name}: axes must be a constant int32 vector ({where})")
        n_axes = math.prod(axes.shape)
        if not 0 < n_axes <= XNN_MAX_TENSOR_DIMS:
            return no(f"{op.name}: {n_axes} reduction axes unsupported ({where})")
        fail = _float_or_q8(y)
        if fail:
            return no(f"{op.name}: {fail} ({where})")
        return ok(f"{op.name} {x.dtype}")

    _v_mean = _v_sum = _v_reduce_max = _v_reduce_min = _reduce

    # VisitReshapeNode
    def _v_reshape(self, op: Op) -> Verdict:
        where = f"VisitReshapeNode, {_SRC}"
        x, y = self.t(op.inputs[0]), self.t(op.outputs[0])
        fail = first_failure(_float_or_q8(x), _rank(x, 0, XNN_MAX_TENSOR_DIMS), _float_or_q8(y),
                             _rank(y, 0, XNN_MAX_TENSOR_DIMS))
        if fail:
            return no(f"RESHAPE: {fail} ({where})")
        if y.dtype in ("INT8", "UINT8") and (x.zero_point != y.zero_point or x.scale != y.scale):
            return no(f"RESHAPE: 8-bit input and output quantization differ ({where})")
        if len(op.inputs) == 2 and op.inputs[1] >= 0:
            s = self.t(op.inputs[1])
            if s.dtype != "INT32" or not s.constant:
                return no(f"RESHAPE: shape '{s.name}' must be a constant int32 tensor ({where})")
        return ok(f"RESHAPE {x.dtype}")

    # VisitTransposeNode
    def _v_transpose(self, op: Op) -> Verdict:
        where = f"VisitTransposeNode, {_SRC}"
        x, y = self.t(op.inputs[0]), self.t(op.outputs[0])
        fail = first_failure(_float_or_q8(x), _rank(x, 1, XNN_MAX_TENSOR_DIMS), _float_or_q8(y))
        if fail:
            return no(f"TRANSPOSE: {fail} ({where})")
        if not self.t(op.inputs[1]).constant:
            return no(f"TRANSPOSE: permutation is not a constant ({where})")
        return ok(f"TRANSPOSE {x.dtype}, constant permutation")

    # VisitSliceNode
    def _v_slice(self, op: Op) -> Verdict:
        where = f"VisitSliceNode, {_SRC}"
        x, begin, size, y = (self.t(op.inputs[0]), self.t(op.inputs[1]), self.t(op.inputs[2]),
                             self.t(op.outputs[0]))
        if not (begin.constant and size.constant) or begin.dtype not in ("INT32", "INT64"):
            return no(f"SLICE: begin and size must be constant int32/int64 ({where})")
        fail = first_failure(_float_or_q8(x), _float_or_q8(y))
        if fail:
            return no(f"SLICE: {fail} ({where})")
        if size.data is not None and any(int(s) <= 0 for s in size.data.ravel()):
            return no(f"SLICE: a size <= 0 (e.g. -1 'to the end') is rejected ({where})")
        return ok(f"SLICE {x.dtype}")

    # VisitStridedSliceNode
    def _v_strided_slice(self, op: Op) -> Verdict:
        where = f"VisitStridedSliceNode, {_SRC}"
        if op.option("ellipsisMask", 0) or op.option("newAxisMask", 0) or op.option("shrinkAxisMask", 0):
            return no(f"STRIDED_SLICE: ellipsis/new-axis/shrink-axis masks unsupported ({where})")
        x, y = self.t(op.inputs[0]), self.t(op.outputs[0])
        consts = [self.t(i) for i in op.inputs[1:4]]
        if not all(c.constant for c in consts):
            return no(f"STRIDED_SLICE: begin/end/strides must be constants ({where})")
        strides = consts[2].data
        if strides is not None and any(int(s) != 1 for s in strides.ravel()):
            return no(f"STRIDED_SLICE: strides other than 1 unsupported ({where})")
        fail = first_failure(_float_or_q8(x), _float_or_q8(y))
        return no(f"STRIDED_SLICE: {fail} ({where})") if fail else ok(f"STRIDED_SLICE {x.dtype}")

    # VisitSplitNode
    def _v_split(self, op: Op) -> Verdict:
        where = f"VisitSplitNode, {_SRC}"
        if not 2 <= len(op.outputs) <= 4:
            return no(f"SPLIT into {len(op.outputs)} outputs: XNNPACK takes 2..4 ({where})")
        dim = self.t(op.inputs[0])
        if dim.dtype != "INT32" or not dim.constant:
            return no(f"SPLIT: split dimension must be a constant int32 ({where})")
        fail = first_failure(_float_or_q8(self.t(op.inputs[1])), *[_float_or_q8(self.t(o)) for o in op.outputs])
        return no(f"SPLIT: {fail} ({where})") if fail else ok("SPLIT")

    # VisitSoftmaxNode
    def _v_softmax(self, op: Op) -> Verdict:
        where = f"VisitSoftmaxNode, {_SRC}"
        if float(op.option("beta", 1.0)) != 1.0:
            return no(f"SOFTMAX: beta != 1 unsupported ({where})")
        x, y = self.t(op.inputs[0]), self.t(op.outputs[0])
        if first_failure(_float(x), _float(y)):
            return no(f"SOFTMAX {x.dtype}: XNNPACK has a float SOFTMAX only ({where})")
        return ok("SOFTMAX float")

    # VisitPadNode
    def _v_pad(self, op: Op) -> Verdict:
        where = f"VisitPadNode, {_SRC}"
        x, p, y = self.t(op.inputs[0]), self.t(op.inputs[1]), self.t(op.outputs[0])
        fail = first_failure(_float_or_q8(x), _float_or_q8(y))
        if fail:
            return no(f"PAD: {fail} ({where})")
        if not p.constant:
            return no(f"PAD: paddings must be a constant ({where})")
        if p.data is not None and (p.data < 0).any():
            return no(f"PAD: negative padding unsupported ({where})")
        return ok(f"PAD {x.dtype}")

    def _pool_params(self, op: Op) -> str | None:
        """CheckPoolingParams."""
        sw, sh = op.option("strideW", 1), op.option("strideH", 1)
        fw, fh = op.option("filterWidth", 1), op.option("filterHeight", 1)
        if min(sw, sh, fw, fh) <= 0:
            return "non-positive stride or filter size"
        if sw > fw or sh > fh:
            return f"stride {sw}x{sh} exceeds filter {fw}x{fh}"
        if fw == 1 and fh == 1 and max(sw, sh) > 1:
            return "1x1 pooling with stride > 1"
        return None

    # VisitMaxPool2DNode
    def _v_max_pool_2d(self, op: Op) -> Verdict:
        where = f"VisitMaxPool2DNode, {_SRC}"
        x, y = self.t(op.inputs[0]), self.t(op.outputs[0])
        fail = first_failure(_float_or_q8(x, fp16=False), _float_or_q8(y), self._pool_params(op), _padding(op),
                             _activation(op))
        return no(f"MAX_POOL_2D: {fail} ({where})") if fail else ok(f"MAX_POOL_2D {x.dtype}")

    # VisitAveragePool2DNode
    def _v_average_pool_2d(self, op: Op) -> Verdict:
        where = f"VisitAveragePool2DNode, {_SRC}"
        x, y = self.t(op.inputs[0]), self.t(op.outputs[0])
        if first_failure(_float(x), _float(y)):
            return no(f"AVERAGE_POOL_2D {x.dtype}: XNNPACK has a float AVERAGE_POOL_2D only ({where})")
        fail = first_failure(self._pool_params(op), _padding(op), _activation(op))
        return no(f"AVERAGE_POOL_2D: {fail} ({where})") if fail else ok("AVERAGE_POOL_2D float")

    # VisitExpandDimsNode
    def _v_expand_dims(self, op: Op) -> Verdict:
        where = f"VisitExpandDimsNode, {_SRC}"
        x, axis, y = self.t(op.inputs[0]), self.t(op.inputs[1]), self.t(op.outputs[0])
        fail = first_failure(_float_or_q8(x), _float_or_q8(y))
        if fail:
            return no(f"EXPAND_DIMS: {fail} ({where})")
        if not axis.constant or math.prod(axis.shape) != 1 or axis.dtype not in ("INT32", "INT64"):
            return no(f"EXPAND_DIMS: axis must be one constant int32/int64 ({where})")
        return ok(f"EXPAND_DIMS {x.dtype}")

    # VisitResizeBilinearNode
    def _v_resize_bilinear(self, op: Op) -> Verdict:
        where = f"VisitResizeBilinearNode, {_SRC}"
        x, s, y = self.t(op.inputs[0]), self.t(op.inputs[1]), self.t(op.outputs[0])
        fail = first_failure(_float_or_q8(x, fp16=False), _rank(x, 4, 4), _float_or_q8(y), _rank(y, 4, 4))
        if fail:
            return no(f"RESIZE_BILINEAR: {fail} ({where})")
        if s.dtype != "INT32" or not s.constant:
            return no(f"RESIZE_BILINEAR: size must be a constant int32 ({where})")
        return ok(f"RESIZE_BILINEAR {x.dtype}")

    # VisitDepthToSpaceNode / VisitSpaceToDepthNode
    def _v_depth_to_space(self, op: Op) -> Verdict:
        x, y = self.t(op.inputs[0]), self.t(op.outputs[0])
        fail = first_failure(_float_or_q8(x), _float_or_q8(y))
        if not fail and int(op.option("blockSize", 0) or 0) <= 1:
            fail = "block size <= 1"
        return no(f"{op.name}: {fail} (Visit{op.name.title().replace('_', '')}Node, {_SRC})") if fail else ok(
            f"{op.name} {x.dtype}")

    _v_space_to_depth = _v_depth_to_space

    # VisitTransposeConvNode
    def _v_transpose_conv(self, op: Op) -> Verdict:
        where = f"VisitTransposeConvNode, {_SRC}"
        shape, w, x = self.t(op.inputs[0]), self.t(op.inputs[1]), self.t(op.inputs[2])
        if shape.dtype != "INT32" or not shape.constant:
            return no(f"TRANSPOSE_CONV: output shape must be a constant int32 ({where})")
        if not self._static(op.inputs[1]):
            return no(f"TRANSPOSE_CONV: filter '{w.name}' is not a constant ({where})")
        fail = first_failure(_float_or_q8(x, fp16=False), _rank(x, 4, 4), _filter(w, 0))
        return no(f"TRANSPOSE_CONV: {fail} ({where})") if fail else ok(f"TRANSPOSE_CONV {x.dtype}")


def _xnn_type(t: Tensor) -> str:
    """GetXNNPackDatatype: fp32 / fp16 / qint8 / qcint8 / quint8."""
    if t.dtype == "INT8":
        return "qcint8" if t.per_channel else "qint8"
    return {"FLOAT32": "fp32", "FLOAT16": "fp16", "UINT8": "quint8"}.get(t.dtype, t.dtype.lower())
