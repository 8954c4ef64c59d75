"""NNAPI delegate rules by feature level: ``NNAPIDelegateKernel::Validate``, op by op.

Source: google-ai-edge/LiteRT ``tflite/delegates/nnapi/nnapi_delegate.cc`` (``Validate``, read at
commit f6745779, Aug 2026) and ``nnapi_delegate_kernel.h`` for the feature-level constants. The
delegate validates against the device's NNAPI feature level: FL1..FL5 are Android API levels
27..31 (NNAPI 1.0, 1.1, 1.2, 1.3, Android 12), FL6..FL8 the updatable runtime's 1000006..1000008.
No accelerator is named (``is_accelerator_specified`` false), as with the default delegate.

This is the static check only: on a device, the delegate also needs an NNAPI accelerator
(with only the CPU reference device it delegates nothing), the driver may refuse ops it validated
(``ANeuralNetworksModel_getSupportedOperationsForDevices``), and by default only the 3 largest
partitions are delegated (``max_number_delegated_partitions``), which `partitions.limit_partitions`
applies.
"""

from __future__ import annotations

from care_q.census.tflite_reader import Op, Tensor, TFLiteGraph
from care_q.census.verdict import Verdict, no, ok
from care_q.errors import CareQError

FL_TO_SDK = {1: 27, 2: 28, 3: 29, 4: 30, 5: 31, 6: 1000006, 7: 1000007, 8: 1000008}
DEFAULT_FL = 8
MAX_PARTITIONS = 3       # StatefulNnApiDelegate::Options::max_number_delegated_partitions
NNAPI11, NNAPI12, NNAPI13, FL5, FL6, FL7 = 28, 29, 30, 31, 1000006, 1000007
_SRC = "nnapi_delegate.cc Validate"
_Q8 = ("UINT8", "INT8")


def first_failure(*checks: str | None) -> str | None:
    """Every failing expectation, joined: Validate records all of them (OpValidationContext)."""
    fails = [c for c in checks if c]
    return "; ".join(fails) if fails else None


def _fl_name(sdk: int) -> str:
    return next(f"FL{fl}" for fl, s in FL_TO_SDK.items() if s == sdk)


class NnapiRules:
    def __init__(self, graph: TFLiteGraph, feature_level: int = DEFAULT_FL):
        if feature_level not in FL_TO_SDK:

            raise CareQError(f"unknown NNAPI feature level {feature_level}; choose 1..8")
        self.g = graph
        self.fl = feature_level
        self.sdk = FL_TO_SDK[feature_level]
        self.target = f"nnapi:FL{feature_level}"

    def t(self, i: int) -> Tensor:
        return self.g.tensors[i]

    # ------------------------------------------------------------------ helpers (Expect*)
    def _min_sdk(self, sdk: int, what: str) -> str | None:
        return None if self.sdk >= sdk else f"{what} needs {_fl_name(sdk)} (target FL{self.fl})"

    @staticmethod
    def _max_version(op: Op, v: int) -> str | None:
        return None if op.version <= v else f"{op.name} version {op.version} > {v}"

    @staticmethod
    def _type_in(t: Tensor, types: tuple[str, ...], what: str = "input") -> str | None:
        return None if t.dtype in types else f"{what} '{t.name}' is {t.dtype}, not one of {'/'.join(types)}"

    @staticmethod
    def _rank_le(t: Tensor, r: int) -> str | None:
        return None if t.rank <= r else f"'{t.name}' has rank {t.rank} > {r}"

    def _float_or_q8(self, op: Op) -> str | None:
        """ExpectIsFloatOrQuant8Operator."""
        return self._type_in(self.t(op.inputs[0]), ("FLOAT32",) + _Q8)

    def _float_q8_or_i32(self, op: Op) -> str | None:
        """ExpectIsFloatQuant8OrInt32Operator."""
        return self._type_in(self.t(op.inputs[0]), ("FLOAT32",) + _Q8 + ("INT32",))

    def _float_only(self, op: Op) -> str | None:
        """ExpectIsFloatOperator."""
        x = self.t(op.inputs[0])
        return None if x.dtype == "FLOAT32" else f"NNAPI {op.name} is float only (input {x.dtype})"

    def _const(self, i: int, what: str) -> str | None:
        return None if self.t(i).constant else f"{what} '{self.t(i).name}' must be a constant"

    # ------------------------------------------------------------------ Validate
    def check(self, op: Op) -> Verdict:
        fn = getattr(self, f"_v_{op.name.lower()}", None)
        if fn is None:
            return no(f"{op.name} is not mapped by the NNAPI delegate (Validate default case, {_SRC})")
        fail = fn(op)
        if fail:
            return no(f"{fail} ({_SRC}, FL{self.fl})")
        x = self.t(op.inputs[0]) if op.inputs and op.inputs[0] >= 0 else None
        return ok(f"{op.name} {x.dtype if x is not None else ''} at FL{self.fl}".replace("  ", " "))

    def _binary_rank(self, op: Op) -> str | None:
        return first_failure(self._rank_le(self.t(op.inputs[0]), 4), self._rank_le(self.t(op.inputs[1]), 4))

    def _v_add(self, op):
        return first_failure(self._max_version(op, 2),
                             self._float_q8_or_i32(op) if self.sdk >= NNAPI13 else self._float_or_q8(op),
                             self._binary_rank(op))

    def _v_mul(self, op):
        return first_failure(self._max_version(op, 2),
                             self._float_q8_or_i32(op) if self.sdk >= NNAPI13 else self._float_or_q8(op),
                             self._binary_rank(op))

    def _v_sub(self, op):
        x = self.t(op.inputs[0])
        ok_type = ((self.sdk >= NNAPI11 and x.dtype == "FLOAT32") or (self.sdk >= NNAPI12 and x.dtype in _Q8)
                   or (self.sdk >= NNAPI13 and x.dtype == "INT32"))
        return first_failure(self._max_version(op, 3),
                             None if ok_type else f"SUB {x.dtype} not supported at FL{self.fl}",
                             self._binary_rank(op))

    def _v_div(self, op):
        x = self.t(op.inputs[0])
        return first_failure(self._max_version(op, 1), self._min_sdk(NNAPI11, "DIV"),
                             None if x.dtype == "FLOAT32" else f"NNAPI DIV is float only (input {x.dtype})",
                             self._binary_rank(op))

    def _v_conv_2d(self, op):
        x, w = self.t(op.inputs[0]), self.t(op.inputs[1])
        fails = [self._max_version(op, 5)]
        if self.sdk < NNAPI12:
            fails += [None if not (x.dtype == "FLOAT32" and w.dtype in _Q8) else "hybrid CONV_2D needs FL3",
                      self._type_in(x, ("FLOAT32", "UINT8")),
                      "per-channel CONV_2D needs FL3" if w.per_channel else None]
            if x.dtype == "UINT8":
                fails.append(self._restricted_scales(op))
        fails.append(None if len(op.inputs) == 3 and op.inputs[2] >= 0 else "CONV_2D without bias unsupported")
        if op.option("dilationWFactor", 1) != 1 or op.option("dilationHFactor", 1) != 1:
            fails.append(self._min_sdk(NNAPI12, "dilated CONV_2D"))
        return first_failure(*fails)

    def _restricted_scales(self, op) -> str | None:
        x, w, y = self.t(op.inputs[0]), self.t(op.inputs[1]), self.t(op.outputs[0])
        return None if x.scale * w.scale < y.scale else "NNAPI 1.0/1.1 need input_scale * filter_scale < output_scale"

    def _v_depthwise_conv_2d(self, op):
        x = self.t(op.inputs[0])
        fails = [self._max_version(op, 3)]
        if self.sdk < NNAPI12:
            fails.append(self._type_in(x, ("FLOAT32", "UINT8")))
            if x.dtype == "UINT8":
                fails.append(self._restricted_scales(op))
            if op.option("dilationWFactor", 1) != 1 or op.option("dilationHFactor", 1) != 1:
                fails.append("dilated DEPTHWISE_CONV_2D needs FL3")
        return first_failure(*fails)

    def _v_fully_connected(self, op):
        x, w, y = self.t(op.inputs[0]), self.t(op.inputs[1]), self.t(op.outputs[0])
        fails = [self._max_version(op, 5), "int16 output unsupported" if y.dtype == "INT16" else None]
        if self.sdk < NNAPI12:
            fails += [None if not (x.dtype == "FLOAT32" and w.dtype in _Q8) else "hybrid FULLY_CONNECTED needs FL3",
                      self._type_in(x, ("FLOAT32", "UINT8"))]
            if x.dtype == "UINT8":
                fails.append(self._restricted_scales(op))
        if op.option("keepNumDims", False):
            fails.append(self._min_sdk(NNAPI13, "FULLY_CONNECTED keep_num_dims"))
        return first_failure(*fails)

    def _v_batch_matmul(self, op):
        a, b = self.t(op.inputs[0]), self.t(op.inputs[1])
        bcast = a.rank != b.rank or a.shape[:-2] != b.shape[:-2]
        return first_failure(self._max_version(op, 2), self._min_sdk(FL6, "BATCH_MATMUL"),
                             self._type_in(a, ("FLOAT32", "INT32", "INT8")),
                             None if a.dtype == b.dtype else "hybrid BATCH_MATMUL unsupported",
                             None if 2 <= a.rank <= 4 else f"BATCH_MATMUL rank {a.rank} not in 2..4",
                             "broadcast BATCH_MATMUL unsupported" if bcast else None)

    def _v_concatenation(self, op):
        x = self.t(op.inputs[0])
        fails = [self._max_version(op, 2),
                 "fused activation unsupported" if op.fused_activation else None,
                 self._rank_le(x, 4), self._type_in(x, ("FLOAT16", "FLOAT32", "UINT8", "INT8"))]
        if x.dtype == "UINT8" and self.sdk < NNAPI12:
            for i in op.inputs[1:]:
                o = self.t(i)
                if o.scale != x.scale or o.zero_point != x.zero_point:
                    fails.append("NNAPI 1.0/1.1 concatenate only tensors of one scale and zero point")
                    break
        return first_failure(*fails)

    def _v_dequantize(self, op):
        x = self.t(op.inputs[0])
        if self.sdk >= NNAPI13 and x.dtype == "FLOAT16" and not x.constant:
            return None
        fails = [None if op.version in (1, 2) else f"DEQUANTIZE version {op.version} unsupported"]
        if self.sdk < NNAPI12:
            fails.append(self._type_in(x, ("UINT8",)))
        else:
            fails.append(self._type_in(x, _Q8))
            if self.sdk == NNAPI12 and x.dtype == "INT8" and x.zero_point != 0:
                fails.append("int8 DEQUANTIZE at FL3 needs zero point 0")
        return first_failure(*fails)

    def _v_quantize(self, op):
        x, y = self.t(op.inputs[0]), self.t(op.outputs[0])
        return first_failure(self._max_version(op, 2), self._min_sdk(NNAPI12, "QUANTIZE"),
                             self._type_in(x, ("FLOAT32",) + _Q8),
                             self._type_in(y, ("UINT8",) if self.sdk < NNAPI13 else _Q8, "output"),
                             None if y.scale > 0 else "output scale must be > 0")

    def _v_relu(self, op):
        return first_failure(self._max_version(op, 2), self._float_or_q8(op))

    _v_relu6 = _v_relu_n1_to_1 = _v_logistic = _v_relu

    def _v_tanh(self, op):
        x = self.t(op.inputs[0])
        ok_t = x.dtype == "FLOAT32" or (x.dtype in _Q8 and self.sdk >= NNAPI12)
        return first_failure(self._max_version(op, 2), None if ok_t else f"TANH {x.dtype} unsupported at FL{self.fl}")

    def _v_elu(self, op):
        x = self.t(op.inputs[0])
        return first_failure(self._max_version(op, 1), self._min_sdk(NNAPI13, "ELU"),
                             None if x.dtype == "FLOAT32" else f"NNAPI ELU is float only (input {x.dtype})")

    def _v_hard_swish(self, op):
        return self._float_or_q8(op)

    def _v_rsqrt(self, op):
        return first_failure(self._max_version(op, 2), self._min_sdk(NNAPI12, "RSQRT"),
                             self._float_only(op) if self.sdk < FL7 else self._float_or_q8(op))

    def _float_math(self, op):
        return first_failure(self._max_version(op, 1), self._min_sdk(NNAPI12, op.name), self._float_only(op))

    _v_abs = _v_exp = _v_log = _v_pow = _v_sqrt = _v_sin = _v_cos = _float_math

    def _v_softmax(self, op):
        x, y = self.t(op.inputs[0]), self.t(op.outputs[0])
        fails = [self._max_version(op, 2), self._float_or_q8(op), self._type_in(y, ("FLOAT32",) + _Q8, "output"),
                 self._rank_le(x, 4)]
        if self.sdk < NNAPI12 and x.rank not in (2, 4):
            fails.append("SOFTMAX before FL3 takes 2-D or 4-D input")
        return first_failure(*fails)

    def _v_reshape(self, op):
        x, y = self.t(op.inputs[0]), self.t(op.outputs[0])
        fails = [self._max_version(op, 1),
                 self._float_or_q8(op) if self.sdk < FL6 else self._float_q8_or_i32(op),
                 self._rank_le(x, 4), self._rank_le(y, 4)]
        if len(op.inputs) >= 2 and op.inputs[1] >= 0:
            fails.append(self._const(op.inputs[1], "shape"))
        return first_failure(*fails)

    def _v_transpose(self, op):
        return first_failure(self._max_version(op, 2), self._min_sdk(NNAPI11, "TRANSPOSE"),
                             self._const(op.inputs[1], "permutation") if len(op.inputs) > 1 else "no permutation")

    def _v_slice(self, op):
        x, b, s = self.t(op.inputs[0]), self.t(op.inputs[1]), self.t(op.inputs[2])
        return first_failure(self._max_version(op, 2), self._min_sdk(NNAPI12, "SLICE"),
                             self._type_in(x, ("FLOAT32", "INT32", "UINT8", "INT8")),
                             self._type_in(b, ("INT32",), "begin"), self._type_in(s, ("INT32",), "size"))

    def _v_strided_slice(self, op):
        return first_failure(self._max_version(op, 2), self._float_or_q8(op),
                             self._min_sdk(NNAPI11, "STRIDED_SLICE"))

    def _v_mean(self, op):
        x, y = self.t(op.inputs[0]), self.t(op.outputs[0])
        types = ("FLOAT32",) + _Q8 if self.sdk >= NNAPI12 else ("FLOAT32",)
        return first_failure(self._max_version(op, 2), self._min_sdk(NNAPI11, "MEAN"), self._type_in(x, types),
                             None if y.rank > 0 else "scalar MEAN output unsupported", self._rank_le(x, 4))

    def _v_sum(self, op):
        x, y = self.t(op.inputs[0]), self.t(op.outputs[0])
        return first_failure(self._max_version(op, 1), self._min_sdk(NNAPI12, op.name),
                             None if y.rank else "scalar output unsupported",
                             None if x.dtype == "FLOAT32" else f"NNAPI {op.name} is float only (input {x.dtype})")

    _v_reduce_prod = _v_sum

    def _v_reduce_max(self, op):
        x = self.t(op.inputs[0])
        return first_failure(self._max_version(op, 2), self._min_sdk(NNAPI12, op.name),
                             self._type_in(x, ("FLOAT32",) + _Q8), None if x.rank else "scalar input unsupported")

    _v_reduce_min = _v_reduce_max

    def _v_average_pool_2d(self, op):
        x = self.t(op.inputs[0])
        fails = [self._max_version(op, 2), self._float_or_q8(op)]
        if x.dtype in _Q8 and op.option("filterWidth", 1) * op.option("filterHeight", 1) > 256:
            fails.append("quantized AVERAGE_POOL_2D window > 256 would overflow the reference CPU path")
        return first_failure(*fails)

    def _v_max_pool_2d(self, op):
        return first_failure(self._max_version(op, 2), self._float_or_q8(op))

    def _v_pad(self, op):
        x = self.t(op.inputs[0])
        fails = [self._max_version(op, 2), self._float_or_q8(op), self._min_sdk(NNAPI11, op.name),
                 "empty input unsupported" if 0 in x.shape else None]
        if len(op.inputs) == 3:
            fails.append(self._min_sdk(NNAPI12, "PAD with a padding value"))
        elif self.sdk < NNAPI12 and x.dtype != "FLOAT32":
            fails.append("only float PAD before FL3")
        return first_failure(*fails)

    _v_padv2 = _v_pad

    def _v_maximum(self, op):
        a, b = self.t(op.inputs[0]), self.t(op.inputs[1])
        return first_failure(self._max_version(op, 3), self._min_sdk(NNAPI12, op.name),
                             self._type_in(a, ("FLOAT32", "UINT8", "INT8", "INT32")),
                             "scalar operand must be constant" if (a.rank == 0 and not a.constant)
                             or (b.rank == 0 and not b.constant) else None)

    _v_minimum = _v_maximum

    def _v_greater_equal(self, op):
        return first_failure(self._max_version(op, 2), self._min_sdk(NNAPI12, op.name),
                             self._type_in(self.t(op.inputs[0]), ("FLOAT32", "UINT8", "INT8", "BOOL", "INT32")))

    _v_less = _v_less_equal = _v_greater = _v_equal = _v_not_equal = _v_greater_equal

    def _v_select(self, op):
        c, x = self.t(op.inputs[0]), self.t(op.inputs[1])
        return first_failure(self._max_version(op, 2), self._min_sdk(NNAPI12, "SELECT"),
                             self._type_in(x, ("FLOAT32", "INT32", "UINT8", "INT8")),
                             None if c.shape == x.shape else "condition and inputs must have the same shape")

    def _v_neg(self, op):
        return first_failure(self._max_version(op, 2), self._min_sdk(NNAPI12, "NEG"),
                             self._type_in(self.t(op.inputs[0]), ("FLOAT32", "INT32")))

    def _v_leaky_relu(self, op):
        return first_failure(self._max_version(op, 1), self._min_sdk(NNAPI12, op.name),
                             self._type_in(self.t(op.inputs[0]), ("FLOAT32", "UINT8", "INT8")))

    _v_prelu = _v_leaky_relu

    def _v_squared_difference(self, op):
        x = self.t(op.inputs[0])
        types = (("FLOAT32", "UINT8", "INT8", "INT32") if self.sdk >= NNAPI13
                 else ("FLOAT32", "UINT8") if self.sdk >= NNAPI12 else ("FLOAT32",))
        return first_failure(self._max_version(op, 2), self._min_sdk(NNAPI11, op.name), self._type_in(x, types),
                             self._binary_rank(op))

    def _v_expand_dims(self, op):
        a = self.t(op.inputs[1])
        return first_failure(self._max_version(op, 1), self._min_sdk(NNAPI12, "EXPAND_DIMS"),
                             self._type_in(self.t(op.inputs[0]), ("FLOAT32", "FLOAT16", "INT32", "UINT8", "INT8")),
                             None if a.dtype == "INT32" and a.constant else "axis must be a constant int32")

    def _v_squeeze(self, op):
        fails = [self._max_version(op, 1), self._min_sdk(NNAPI11, "SQUEEZE")]
        if self.sdk == NNAPI11 and not op.option("squeezeDims", None):
            fails.append("NNAPI 1.1 needs explicit squeeze_dims")
        return first_failure(*fails)

    def _v_split(self, op):
        dim, x = self.t(op.inputs[0]), self.t(op.inputs[1])
        types = ("FLOAT32", "UINT8", "INT8", "INT32") if self.sdk >= NNAPI13 else ("FLOAT32", "UINT8", "INT32")
        return first_failure(self._max_version(op, 3), self._min_sdk(NNAPI12, "SPLIT"), self._type_in(x, types),
                             None if dim.dtype == "INT32" and dim.constant else "split axis must be a constant int32")

    def _v_split_v(self, op):
        x, sizes, axis = self.t(op.inputs[0]), self.t(op.inputs[1]), self.t(op.inputs[2])
        return first_failure(self._max_version(op, 2), self._min_sdk(NNAPI13, "SPLIT_V"),
                             self._type_in(x, ("FLOAT32", "UINT8", "INT8", "INT32")),
                             None if sizes.constant and axis.constant else "size_splits and axis must be constants")

    def _v_pack(self, op):
        x = self.t(op.inputs[0])
        fails = [self._max_version(op, 2), self._min_sdk(NNAPI13, "PACK")]
        if self.sdk >= FL6:
            fails.append(self._type_in(x, ("INT32", "FLOAT32", "INT8", "UINT8")))
        else:
            fails.append(self._type_in(x, ("FLOAT32", "INT8")))
            axis = op.option("axis", 0)
            if axis in (-1, x.rank):
                fails.append("PACK along the last dimension needs FL6")
        return first_failure(*fails)

    def _v_resize_bilinear(self, op):
        x = self.t(op.inputs[0])
        return first_failure(self._max_version(op, 3), None if x.rank == 4 else "input must have rank 4",
                             self._float_or_q8(op),
                             self._const(op.inputs[1], "size") if len(op.inputs) > 1 else "size input missing")

    def _v_resize_nearest_neighbor(self, op):
        return first_failure(self._max_version(op, 3), self._min_sdk(NNAPI12, op.name), self._float_or_q8(op),
                             self._const(op.inputs[1], "size") if len(op.inputs) > 1 else "size input missing")

    def _v_space_to_depth(self, op):
        return first_failure(self._max_version(op, 2), self._type_in(self.t(op.inputs[0]), ("FLOAT32", "UINT8", "INT8")))

    def _v_depth_to_space(self, op):
        return self._type_in(self.t(op.inputs[0]), ("FLOAT32", "UINT8", "INT8"))

    def _v_l2_normalization(self, op):
        x = self.t(op.inputs[0])
        fails = [self._max_version(op, 2), "fused activation unsupported" if op.fused_activation else None]
        if self.sdk < NNAPI12:
            fails += [self._float_only(op), None if x.rank == 4 else "L2_NORMALIZATION before FL3 needs rank 4"]
        return first_failure(*fails)

    def _v_transpose_conv(self, op):
        return first_failure(self._max_version(op, 4), self._min_sdk(NNAPI12, "TRANSPOSE_CONV"),
                             self._const(op.inputs[0], "output shape"), self._const(op.inputs[1], "filter"))

    def _v_gather(self, op):
        p = self.t(op.inputs[1])
        return first_failure(self._max_version(op, 2), self._min_sdk(NNAPI12, "GATHER"),
                             self._type_in(self.t(op.inputs[0]), ("FLOAT32", "FLOAT16", "INT32", "UINT8", "INT8")),
                             self._type_in(p, ("INT32",), "positions"), None if p.rank else "0-D positions")

    def _v_cast(self, op):
        x, y = self.t(op.inputs[0]), self.t(op.outputs[0])
        types = ("FLOAT32", "INT32", "UINT8", "INT8") if self.sdk >= NNAPI13 else ("FLOAT32", "INT32", "UINT8")
        return first_failure(self._max_version(op, 1), self._min_sdk(NNAPI12, "CAST"), self._type_in(x, types),
                             self._type_in(y, types, "output"))
