"""Read a .tflite flatbuffer into plain Python objects the delegate rules can inspect.

Uses the schema shipped with ai-edge-litert (``ModelT.InitFromPackedBuf``); no TensorFlow. Only
the main subgraph (subgraph 0) is read: that is the one delegates partition.

    graph = read_tflite("m.tflite")
    for op in graph.ops:                       # execution order
        x = graph.tensor(op.inputs[0])         # Tensor: shape, dtype, scales, zero_points, axis, constant
        op.name, op.version, op.options, op.macs
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from care_q.census.macs import op_macs
from care_q.errors import CareQError

_FILE_ID = b"TFL3"
_ITEMSIZE = {"FLOAT32": 4, "FLOAT16": 2, "INT32": 4, "UINT8": 1, "INT64": 8, "BOOL": 1, "INT16": 2,
             "INT8": 1, "FLOAT64": 8, "UINT64": 8, "UINT32": 4, "UINT16": 2, "BFLOAT16": 2}


@dataclass
class Tensor:
    index: int
    name: str
    shape: tuple[int, ...]
    signature: tuple[int, ...]            # shape_signature (-1 for a dynamic dimension), else shape
    dtype: str                            # TFLite type name: FLOAT32, INT8, UINT8, INT32, ...
    scales: tuple[float, ...] = ()        # empty: not quantized
    zero_points: tuple[int, ...] = ()
    axis: int = 0                         # quantized_dimension
    constant: bool = False                # has data in the file (kTfLiteMmapRo in the interpreter)
    data: np.ndarray | None = field(default=None, repr=False)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def quantized(self) -> bool:
        return len(self.scales) > 0

    @property
    def per_channel(self) -> bool:
        return len(self.scales) > 1

    @property
    def scale(self) -> float:
        """Per-tensor scale (TfLiteTensor.params.scale: the first scale), 0.0 when not quantized."""
        return self.scales[0] if self.scales else 0.0

    @property
    def zero_point(self) -> int:
        return self.zero_points[0] if self.zero_points else 0

    @property
    def dynamic(self) -> bool:
        return any(d < 0 for d in self.signature)

    def describe(self) -> str:
        q = ""
        if self.quantized:
            q = (f" s={self.scale:.3g} zp={self.zero_point}" if not self.per_channel
                 else f" per-channel[{len(self.scales)}] axis {self.axis}")
        return f"{self.dtype}{list(self.shape)}{q}"


@dataclass
class Op:
    index: int                            # position in the subgraph's operator list (= node index)
    name: str                             # builtin name (CONV_2D) or CUSTOM:<code>
    version: int
    inputs: tuple[int, ...]               # tensor indices; -1 for an omitted optional input
    outputs: tuple[int, ...]
    options: object | None = field(default=None, repr=False)   # the schema's *OptionsT object
    macs: int = 0

    def option(self, attr: str, default=None):
        return getattr(self.options, attr, default) if self.options is not None else default

    @property
    def fused_activation(self) -> int:
        """ActivationFunctionType of the op's fused activation (0 = NONE)."""
        return int(self.option("fusedActivationFunction", 0) or 0)


@dataclass
class TFLiteGraph:
    path: Path
    tensors: list[Tensor]
    ops: list[Op]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    description: str = ""
    num_subgraphs: int = 1

    def tensor(self, index: int) -> Tensor | None:
        return self.tensors[index] if index >= 0 else None

    def producers(self) -> dict[int, int]:
        """Tensor index -> index of the op that writes it."""
        return {t: op.index for op in self.ops for t in op.outputs if t >= 0}

    def consumers(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for op in self.ops:
            for t in op.inputs:
                if t >= 0:
                    out.setdefault(t, []).append(op.index)
        return out

    @property
    def total_macs(self) -> int:
        return sum(op.macs for op in self.ops)


def _names(enum_cls) -> dict[int, str]:
    return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_")}


def read_tflite(path: str | Path) -> TFLiteGraph:
    """Parse a .tflite file. Raises CareQError for a missing, non-TFLite or truncated file."""
    from ai_edge_litert import schema_py_generated as fb

    path = Path(path)
    if path.suffix.lower() != ".tflite":
        raise CareQError(f"{path}: not a .tflite file")
    if not path.is_file():
        raise CareQError(f"model file not found: {path}")
    buf = path.read_bytes()
    if len(buf) < 8 or buf[4:8] != _FILE_ID:
        got = buf[4:8] if len(buf) >= 8 else b""
        raise CareQError(f"{path}: not a TFLite flatbuffer (file identifier {got!r}, expected {_FILE_ID!r}; "
                         f"{len(buf)} bytes)")
    root = int.from_bytes(buf[0:4], "little")
    if root + 4 > len(buf):
        raise CareQError(f"{path}: truncated TFLite flatbuffer (root table at byte {root}, "
                         f"file has {len(buf)} bytes)")
    try:
        model = fb.ModelT.InitFromPackedBuf(buf, 0)
    except Exception as e:  # a truncated or corrupt buffer fails anywhere in the generated code
        raise CareQError(f"{path}: truncated or corrupt TFLite flatbuffer ({type(e).__name__}: "
                         f"{str(e).strip()[:120]})") from None
    if not model.subgraphs:
        raise CareQError(f"{path}: the TFLite model has no subgraph")
    return _convert(model, path, len(buf), fb)


def _convert(model, path: Path, nbytes: int, fb) -> TFLiteGraph:
    type_names = _names(fb.TensorType)
    op_names = _names(fb.BuiltinOperator)
    buffers = model.buffers or []
    sg = model.subgraphs[0]
    tensors: list[Tensor] = []
    for i, t in enumerate(sg.tensors or []):
        shape = tuple(int(d) for d in (t.shape if t.shape is not None else ()))
        sig = tuple(int(d) for d in t.shapeSignature) if t.shapeSignature is not None and len(t.shapeSignature) else shape
        dtype = type_names.get(t.type, f"TYPE_{t.type}")
        name = t.name.decode() if isinstance(t.name, bytes) else (t.name or f"tensor_{i}")
        scales: tuple[float, ...] = ()
        zps: tuple[int, ...] = ()
        axis = 0
        q = t.quantization
        if q is not None and q.scale is not None and len(q.scale):
            scales = tuple(float(s) for s in q.scale)
            zps = tuple(int(z) for z in q.zeroPoint) if q.zeroPoint is not None and len(q.zeroPoint) else (0,)
            axis = int(q.quantizedDimension or 0)
        data = None
        constant = False
        if 0 < t.buffer < len(buffers):
            b = buffers[t.buffer]
            raw = b.data if b.data is not None else None
            if raw is not None and len(raw):
                constant = True
                raw = np.asarray(raw, dtype=np.uint8)
                size = _ITEMSIZE.get(dtype)
                if size is not None:
                    want = math.prod(shape) * size
                    if len(raw) != want:
                        raise CareQError(f"{path}: truncated or corrupt TFLite flatbuffer: constant tensor "
                                         f"'{name}' {dtype}{list(shape)} has {len(raw)} bytes of data, "
                                         f"expected {want} (file has {nbytes} bytes)")
                    data = raw.view(np.dtype(_np_dtype(dtype))).reshape(shape) if shape else raw.view(
                        np.dtype(_np_dtype(dtype)))
            elif b.offset and b.offset > 1:  # data stored outside the flatbuffer (models > 2 GB)
                constant = True
        tensors.append(Tensor(i, name, shape, sig, dtype, scales, zps, axis, constant, data))
    ops: list[Op] = []
    codes = model.operatorCodes or []
    for i, o in enumerate(sg.operators or []):
        if o.opcodeIndex >= len(codes):
            raise CareQError(f"{path}: corrupt TFLite flatbuffer: operator #{i} uses opcode {o.opcodeIndex}, "
                             f"the model has {len(codes)}")
        oc = codes[o.opcodeIndex]
        code = max(int(oc.builtinCode), int(oc.deprecatedBuiltinCode))
        if code == fb.BuiltinOperator.CUSTOM:
            cc = oc.customCode.decode() if isinstance(oc.customCode, bytes) else (oc.customCode or "")
            name = f"CUSTOM:{cc}"
        else:
            name = op_names.get(code, f"BUILTIN_{code}")
        ins = tuple(int(x) for x in (o.inputs if o.inputs is not None else ()))
        outs = tuple(int(x) for x in (o.outputs if o.outputs is not None else ()))
        for tix in ins + outs:
            if tix >= len(tensors):
                raise CareQError(f"{path}: corrupt TFLite flatbuffer: operator #{i} ({name}) refers to tensor "
                                 f"{tix}, the subgraph has {len(tensors)}")
        ops.append(Op(i, name, int(oc.version or 1), ins, outs, o.builtinOptions))
    graph = TFLiteGraph(path, tensors, ops,
                        tuple(int(x) for x in (sg.inputs if sg.inputs is not None else ())),
                        tuple(int(x) for x in (sg.outputs if sg.outputs is not None else ())),
                        (model.description.decode() if isinstance(model.description, bytes)
                         else model.description or ""),
                        len(model.subgraphs))

    for op in graph.ops:
        op.macs = op_macs(op, graph)
    return graph


def _np_dtype(dtype: str):
    return {"FLOAT32": np.float32, "FLOAT16": np.float16, "INT32": np.int32, "UINT8": np.uint8,
            "INT64": np.int64, "BOOL": np.bool_, "INT16": np.int16, "INT8": np.int8, "FLOAT64": np.float64,
            "UINT64": np.uint64, "UINT32": np.uint32, "UINT16": np.uint16, "BFLOAT16": np.uint16}[dtype]
