"""Multiply-accumulates of the ops that carry them: convolutions, fully-connected, batch matmul.

Counted from the tensor shapes in the file (batch included); every other op counts 0. These are
the ops an accelerator exists for, so "share of MACs on the accelerator" is the share of these.
"""

from __future__ import annotations

import math


def op_macs(op, graph) -> int:
    t = graph.tensor
    try:
        if op.name == "CONV_2D":
            out, w = t(op.outputs[0]), t(op.inputs[1])            # w: (O, KH, KW, I / groups)
            return math.prod(out.shape) * w.shape[1] * w.shape[2] * w.shape[3]
        if op.name == "DEPTHWISE_CONV_2D":
            out, w = t(op.outputs[0]), t(op.inputs[1])            # w: (1, KH, KW, O)
            return math.prod(out.shape) * w.shape[1] * w.shape[2]
        if op.name == "FULLY_CONNECTED":
            out, w = t(op.outputs[0]), t(op.inputs[1])            # w: (O, I)
            return math.prod(out.shape) * w.shape[1]
        if op.name == "BATCH_MATMUL":
            a, out = t(op.inputs[0]), t(op.outputs[0])
            k = a.shape[-2] if op.option("adjX", False) else a.shape[-1]
            return math.prod(out.shape) * k
        if op.name == "TRANSPOSE_CONV":
            w, x = t(op.inputs[1]), t(op.inputs[2])               # w: (O, KH, KW, I)
            return math.prod(x.shape) * w.shape[0] * w.shape[1] * w.shape[2]
    except (AttributeError, IndexError, TypeError):  # malformed shapes: no MACs rather than a crash
        return 0
    return 0
