"""Edge TPU rules: Coral's published model requirements and supported-operations table.

Source: Coral, "TensorFlow models on the Edge TPU" (coral.ai/docs/edgetpu/models-intro),
"Model requirements" and "Supported operations" (Edge TPU compiler 16). Requirements applied to
every op:

- tensor parameters are 8-bit (int8 or uint8); int32 is allowed for biases and constant
  shape/axis operands only;
- tensor sizes are constant at compile time (no dynamic dimensions);
- model parameters (weights, biases) are constant at compile time;
- tensors are 1-, 2- or 3-dimensional; a tensor with more dimensions may have a size > 1 only in
  its 3 innermost dimensions;
- the op is in the table, with that row's "known limitations".

Not in the table (so on the CPU): BATCH_MATMUL, ELU, DIV, GELU (reported to abort the compiler), EXP,
LOG, SELECT, GREATER_EQUAL, DEQUANTIZE (float output), among others. The compiler cuts the graph
once: the first unmapped op and everything after it run on the CPU (`partitions.edgetpu_cut`).
What this module cannot see: the compiler's size-dependent refusals ("may not be mapped ... to
avoid loss in precision"), its on-chip memory planning, and the compiler version installed.
"""

from __future__ import annotations

import math

from care_q.census.tflite_reader import Op, Tensor, TFLiteGraph
from care_q.census.verdict import Verdict, first_failure, no, ok

_SRC = "Coral Edge TPU supported-operations table"
# op -> known limitation checked in `_limits` (empty: none beyond the general requirements)
SUPPORTED = {
    "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "EXPAND_DIMS",
    "FULLY_CONNECTED", "L2_NORMALIZATION", "LOGISTIC", "LSTM", "UNIDIRECTIONAL_SEQUENCE_LSTM",
    "MAXIMUM", "MAX_POOL_2D", "MEAN", "MINIMUM", "MUL", "PACK", "PAD", "PRELU", "QUANTIZE",
    "REDUCE_MAX", "REDUCE_MIN", "RELU", "RELU6", "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR",
    "RESIZE_NEAREST_NEIGHBOR", "RSQRT", "SLICE", "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT",
    "SQUARED_DIFFERENCE", "SQUEEZE", "STRIDED_SLICE", "SUB", "SUM", "TANH", "TRANSPOSE", "TRANSPOSE_CONV",
}
_NOTES = {"GELU": "GELU is not in the table (compiling it is reported to abort the Edge TPU compiler; "
                  "not verified here)",
          "BATCH_MATMUL": "BATCH_MATMUL is not in the table (no dynamic matrix multiply)",
          "DEQUANTIZE": "DEQUANTIZE produces float: runs on the CPU"}
_8BIT = ("INT8", "UINT8")
_WEIGHTED = {"CONV_2D": (1, 2), "DEPTHWISE_CONV_2D": (1, 2), "FULLY_CONNECTED": (1, 2), "TRANSPOSE_CONV": (1, 3)}


class EdgeTpuRules:
    target = "edgetpu"

    def __init__(self, graph: TFLiteGraph):
        self.g = graph

    def t(self, i: int) -> Tensor:
        return self.g.tensors[i]

    def check(self, op: Op) -> Verdict:
        if op.name not in SUPPORTED:
            return no(_NOTES.get(op.name, f"{op.name} is not in the {_SRC}"))
        fail = first_failure(self._general(op), self._limits(op))
        if fail:
            return no(f"{fail} ({_SRC})")
        return ok(f"{op.name}: 8-bit, static shapes, constant parameters, <= 3 dims > 1")

    # ------------------------------------------------------------------ model requirements
    def _general(self, op: Op) -> str | None:
        params = set(i for k in _WEIGHTED.get(op.name, ()) if k < len(op.inputs) for i in [op.inputs[k]] if i >= 0)
        for i in params:
            if not self.t(i).constant:
                return f"{op.name}: parameter '{self.t(i).name}' is not a compile-time constant"
        for i in list(op.inputs) + list(op.outputs):
            if i < 0:
                continue
            x = self.t(i)
            if x.dynamic:
                return f"{op.name}: '{x.name}' has a dynamic size {list(x.signature)}"
            if x.dtype not in _8BIT:
                # int32: biases and constant shape / axis / permutation operands
                if x.dtype == "INT32" and x.constant:
                    continue
                if op.name == "QUANTIZE" and i == op.inputs[0]:
                    return f"QUANTIZE from {x.dtype}: the Edge TPU takes 8-bit input only"
                return f"{op.name}: '{x.name}' is {x.dtype}, not 8-bit"
            if not x.constant and x.rank > 3 and any(d > 1 for d in x.shape[:-3]):
                return (f"{op.name}: '{x.name}' {list(x.shape)} has a dimension > 1 outside its 3 innermost "
                        f"(rank limit)")
        return None

    # ------------------------------------------------------------------ known limitations per row
    def _limits(self, op: Op) -> str | None:
        n = op.name
        if n in ("AVERAGE_POOL_2D", "MAX_POOL_2D") and op.fused_activation:
            return f"{n}: no fused activation function"
        if n == "CONCATENATION":
            if op.fused_activation:
                return "CONCATENATION: no fused activation function"
            consts = [i for i in op.inputs if self.t(i).constant]
            if consts and (len(op.inputs) != 2 or any(self.t(i).data is None or self.t(i).data.any() for i in consts)):
                return "CONCATENATION with a constant input: only 2 inputs and an all-zero constant (zero padding)"
        if n in ("CONV_2D", "DEPTHWISE_CONV_2D") and op.option("dilationWFactor", 1) != op.option("dilationHFactor", 1):
            return f"{n}: dilation must be the same in x and y"
        if n == "FULLY_CONNECTED":
            if int(op.option("weightsFormat", 0) or 0) != 0:
                return "FULLY_CONNECTED: only the default weights format"
            y = self.t(op.outputs[0])
            if sum(1 for d in y.shape if d > 1) > 1:
                return f"FULLY_CONNECTED: output {list(y.shape)} is not one-dimensional"
        if n in ("MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN"):
            x, axes = self.t(op.inputs[0]), self.t(op.inputs[1])
            if axes.data is None:
                return f"{n}: axes are not a constant"
            ax = sorted({int(a) % max(x.rank, 1) for a in axes.data.ravel()})
            if n == "MEAN" and x.rank >= 3 and not set(ax) <= {x.rank - 3, x.rank - 2}:
                return f"MEAN over axes {ax} of {list(x.shape)}: reduction along x and/or y only"
            if 0 in ax and x.rank == 4:
                return f"{n}: no reduction over the batch dimension"
        if n == "PAD":
            p, x = self.t(op.inputs[1]), self.t(op.inputs[0])
            if p.data is not None and x.rank == 4 and (p.data[0].any() or p.data[3].any()):
                return "PAD: padding along x and/or y only"
        if n == "SOFTMAX":
            x = self.t(op.inputs[0])
            if sum(1 for d in x.shape if d > 1) > 1 or math.prod(x.shape) > 16000:
                return f"SOFTMAX of {list(x.shape)}: 1-D input of at most 16,000 elements only"
        if n in ("RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR"):
            x = self.t(op.inputs[0])
            if x.rank == 4 and x.shape[0] != 1:
                return f"{n}: input/output must be 3-dimensional (batch 1)"
        if n == "STRIDED_SLICE":
            s = self.t(op.inputs[3]) if len(op.inputs) > 3 else None
            if s is None or s.data is None or (s.data != 1).any():
                return "STRIDED_SLICE: all strides must be 1"
            if op.option("ellipsisMask", 0) or op.option("newAxisMask", 0):
                return "STRIDED_SLICE: ellipsis and new-axis masks must be 0"
        if n in ("SPLIT", "PACK"):
            axis = (self.t(op.inputs[0]).data if n == "SPLIT" else None)
            a = int(axis.ravel()[0]) if axis is not None else int(op.option("axis", 0) or 0)
            if a == 0:
                return f"{n}: not along the batch dimension"
        return None
