"""A small writer for TFLite flatbuffers (the schema shipped with ai-edge-litert).

Tensors, constant buffers, operator codes and builtin options; no TensorFlow needed.
"""

from __future__ import annotations

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as fb

_NP_TO_TFL = {np.dtype(np.float32): fb.TensorType.FLOAT32, np.dtype(np.int8): fb.TensorType.INT8,
              np.dtype(np.uint8): fb.TensorType.UINT8, np.dtype(np.int16): fb.TensorType.INT16,
              np.dtype(np.int32): fb.TensorType.INT32, np.dtype(np.int64): fb.TensorType.INT64}


def tfl_type(dtype) -> int:
    return _NP_TO_TFL[np.dtype(dtype)]


def _byte_array(data) -> np.ndarray:
    """A buffer's bytes as a uint8 numpy array: the generated ``BufferT.Pack`` writes those with one
    ``CreateNumpyVector`` call, and anything else (bytes, lists) one ``PrependUint8`` call per byte
    (measured: 19 s of care_s1's 20 s emit)."""
    if isinstance(data, np.ndarray):
        return np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
    return np.frombuffer(bytes(data), dtype=np.uint8)


class TFLiteBuilder:
    # Op versions written for int8 kernels (a version the runtime lacks fails to load).
    max_version = {fb.BuiltinOperator.CONV_2D: 3, fb.BuiltinOperator.DEPTHWISE_CONV_2D: 3,
                   fb.BuiltinOperator.ADD: 2, fb.BuiltinOperator.MUL: 2,
                   fb.BuiltinOperator.CONCATENATION: 2, fb.BuiltinOperator.QUANTIZE: 2,
                   fb.BuiltinOperator.DEQUANTIZE: 2, fb.BuiltinOperator.MEAN: 2,
                   fb.BuiltinOperator.TRANSPOSE: 2, fb.BuiltinOperator.SLICE: 2,
                   fb.BuiltinOperator.LOGISTIC: 2, fb.BuiltinOperator.DIV: 2,
                   fb.BuiltinOperator.BATCH_MATMUL: 2, fb.BuiltinOperator.GELU: 2,
                   fb.BuiltinOperator.FULLY_CONNECTED: 12}  # 12: per-channel int8 weights

    def __init__(self, description: str = "care-q"):
        self.description = description
        self.tensors: list = []
        self.buffers: list = [fb.BufferT()]  # buffer 0: the empty sentinel
        self.opcodes: list = []
        self._opcode_index: dict[int, int] = {}
        self.operators: list = []
        self.inputs: list[int] = []
        self.outputs: list[int] = []
        self.names: dict[str, int] = {}
        self.metadata: list[tuple[str, bytes]] = []

    # ------------------------------------------------------------------ tensors
    def tensor(self, name: str, shape, dtype, scale=None, zero_point=None, axis: int | None = None,
               data: np.ndarray | None = None) -> int:
        if name in self.names:
            raise ValueError(f"TFLite tensor '{name}' defined twice")
        t = fb.TensorT()
        t.name = name
        t.shape = np.asarray(shape, dtype=np.int32)
        t.type = tfl_type(dtype)
        if scale is not None:
            q = _Quantization()
            q.scale = [float(s) for s in np.atleast_1d(scale)]
            q.zeroPoint = [int(z) for z in np.atleast_1d(zero_point if zero_point is not None else 0)]
            q.quantizedDimension = int(axis or 0)
            t.quantization = q
        if data is not None:
            data = np.ascontiguousarray(np.asarray(data, dtype=dtype))
            if tuple(data.shape) != tuple(shape):
                raise ValueError(f"constant '{name}': data shape {data.shape} != {tuple(shape)}")
            buf = fb.BufferT()
            buf.data = _byte_array(data)
            self.buffers.append(buf)
            t.buffer = len(self.buffers) - 1
        else:
            t.buffer = 0
        self.tensors.append(t)
        self.names[name] = len(self.tensors) - 1
        return self.names[name]

    def const(self, name: str, data: np.ndarray, scale=None, zero_point=None, axis=None) -> int:
        data = np.asarray(data)
        return self.tensor(name, data.shape, data.dtype, scale, zero_point, axis, data=data)

    def shape_of(self, idx: int) -> tuple[int, ...]:
        return tuple(int(s) for s in self.tensors[idx].shape)

    # ------------------------------------------------------------------ operators
    def _opcode(self, op: int) -> int:
        if op not in self._opcode_index:
            oc = fb.OperatorCodeT()
            oc.builtinCode = op
            oc.deprecatedBuiltinCode = min(op, 127)
            oc.version = 1
            self.opcodes.append(oc)
            self._opcode_index[op] = len(self.opcodes) - 1
        return self._opcode_index[op]

    def op(self, op: int, inputs: list[int], outputs: list[int], options_type: int = 0, options=None,
           version: int = 1) -> None:
        o = fb.OperatorT()
        o.opcodeIndex = self._opcode(op)
        self.opcodes[o.opcodeIndex].version = max(self.opcodes[o.opcodeIndex].version, min(version, self.max_version.get(op, 1)))
        o.inputs = np.asarray(inputs, dtype=np.int32)
        o.outputs = np.asarray(outputs, dtype=np.int32)
        if options is not None:
            o.builtinOptionsType = options_type
            o.builtinOptions = options
        self.operators.append(o)

    # ------------------------------------------------------------------ output
    def to_bytes(self) -> bytes:
        sg = fb.SubGraphT()
        sg.tensors = self.tensors
        sg.operators = self.operators
        sg.inputs = np.asarray(self.inputs, dtype=np.int32)
        sg.outputs = np.asarray(self.outputs, dtype=np.int32)
        sg.name = "main"
        m = fb.ModelT()
        m.version = 3
        m.description = self.description
        m.operatorCodes = self.opcodes
        m.subgraphs = [sg]
        m.buffers = list(self.buffers)
        md = []
        for name, data in self.metadata:
            buf = fb.BufferT()
            buf.data = _byte_array(data)
            m.buffers.append(buf)
            meta = fb.MetadataT()
            meta.name = name
            meta.buffer = len(m.buffers) - 1
            md.append(meta)
        m.metadata = md or None
        b = flatbuffers.Builder(1 << 20)
        _Quantization.shared = {}
        try:
            b.Finish(m.Pack(b), file_identifier=b"TFL3")
        finally:
            _Quantization.shared = None
        return bytes(b.Output())


class _Quantization(fb.QuantizationParametersT):
    """Quantization parameters whose zero-point vector is written once per distinct value.

    TFLite stores zero points as int64, one per channel, and XNNPACK wants one per channel for
    per-channel weights and their int32 biases: ~16 bytes per output channel, ~10% of an int8
    CARE model. A flatbuffer may reference one vector from many tables (the verifier checks each
    reference), so every all-zero vector of a given length is written once.
    """

    shared: dict | None = None  # (zero points) -> vector offset, during one to_bytes()

    def Pack(self, builder):
        zp = self.zeroPoint
        if self.shared is None or zp is None:
            return super().Pack(builder)
        key = tuple(zp)
        if key not in self.shared:
            builder.StartVector(8, len(zp), 8)
            for z in reversed(zp):
                builder.PrependInt64(z)
            self.shared[key] = builder.EndVector()
        self.zeroPoint = None  # pack the rest, then add the shared vector to the table by hand
        try:
            if self.scale is not None:
                scale = builder.CreateNumpyVector(np.asarray(self.scale, dtype=np.float32))
            fb.QuantizationParametersStart(builder)
            if self.scale is not None:
                fb.QuantizationParametersAddScale(builder, scale)
            fb.QuantizationParametersAddZeroPoint(builder, self.shared[key])
            fb.QuantizationParametersAddDetailsType(builder, self.detailsType)
            fb.QuantizationParametersAddQuantizedDimension(builder, self.quantizedDimension)
            return fb.QuantizationParametersEnd(builder)
        finally:
            self.zeroPoint = zp


def options(cls, **kw):
    o = cls()
    for k, v in kw.items():
        setattr(o, k, v)
    return o
