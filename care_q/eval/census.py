"""Graph census of an artifact: what runs in integer kernels, what is left in float.

    census = artifact_census("out/care_s0_int8.tflite")
    census["float_ops"], census["xnnpack"]["partitions"]

TFLite: the op census (`care_q.runtime.tflite_op_census`), the ops whose output tensor is float32
(DEQUANTIZE excluded: it is the boundary itself), QUANTIZE/DEQUANTIZE counts and how XNNPACK
partitioned the graph (`Runner.delegate_info`).
ONNX: the file's census and the census of the graph onnxruntime actually runs (its optimized
graph, written by the session): integer kernels (`care_q.census.onnx_fusion.is_integer_kernel`:
QLinear*, QGemm, *Integer, ...) against the float ops that remain between DequantizeLinear and
QuantizeLinear.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from care_q.census.onnx_fusion import QDQ, is_integer_kernel
from care_q.errors import CareQError
from care_q.runtime import load_runner, onnx_op_census, tflite_op_census

_ONNX_MOVES = ("Reshape", "Transpose", "Split", "Slice", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Shape")


def tflite_float_ops(path: str | Path) -> dict[str, int]:
    """Op name -> count of ops in subgraph 0 whose first output is float32 (DEQUANTIZE excluded)."""
    from ai_edge_litert import schema_py_generated as schema

    path = Path(path)
    try:
        model = schema.Model.GetRootAsModel(path.read_bytes(), 0)
        names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
        codes = []
        for i in range(model.OperatorCodesLength()):
            oc = model.OperatorCodes(i)
            codes.append(names.get(max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode()), "CUSTOM"))
        sg = model.Subgraphs(0)
        out: dict[str, int] = {}
        for i in range(sg.OperatorsLength()):
            op = sg.Operators(i)
            name = codes[op.OpcodeIndex()]
            if name == "DEQUANTIZE" or op.OutputsLength() == 0:
                continue
            t = sg.Tensors(op.Outputs(0))
            if t.Type() == schema.TensorType.FLOAT32:
                out[name] = out.get(name, 0) + 1
    except OSError as e:
        raise CareQError(f"{path}: cannot read it: {e.strerror}") from None
    except Exception as e:
        raise CareQError(f"{path}: not a readable TFLite flatbuffer ({type(e).__name__}: {e})") from None
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def _tflite_integer_outputs(path: Path) -> int:
    """How many ops of subgraph 0 write an int8 / uint8 / int16 tensor (0 in an FP32 file)."""
    from ai_edge_litert import schema_py_generated as schema

    try:
        sg = schema.Model.GetRootAsModel(path.read_bytes(), 0).Subgraphs(0)
        ints = {schema.TensorType.INT8, schema.TensorType.UINT8, schema.TensorType.INT16}
        return sum(1 for i in range(sg.OperatorsLength()) for j in range(sg.Operators(i).OutputsLength())
                   if sg.Tensors(sg.Operators(i).Outputs(j)).Type() in ints)
    except OSError as e:
        raise CareQError(f"{path}: cannot read it: {e.strerror}") from None
    except Exception as e:
        raise CareQError(f"{path}: not a readable TFLite flatbuffer ({type(e).__name__}: {e})") from None


def detect_source(path: str | Path) -> str:
    """'fp32' or 'int8': from the file name (``*fp32*`` / ``*float*``), else from its ops: a .tflite is int8
    if any op computes in integers (an int8-in, int8-out file has no QUANTIZE), an .onnx if it quantizes."""
    path = Path(path)
    stem = path.stem.lower()
    if "fp32" in stem or "float" in stem:
        return "fp32"
    try:
        if path.suffix.lower() == ".tflite":
            return "int8" if _tflite_integer_outputs(path) else "fp32"
        return "int8" if onnx_op_census(path).get("QuantizeLinear", 0) else "fp32"
    except CareQError:
        return "int8"


def artifact_census(path: str | Path, threads: int = 1, runner=None) -> dict:
    """Census of one .tflite / .onnx artifact (see the module docstring). Loads it, never runs it."""
    path = Path(path)
    kind = "tflite" if path.suffix.lower() == ".tflite" else "onnx"
    if kind == "tflite":
        ops = tflite_op_census(path)
        runner = runner or load_runner(path, threads=threads)
        floats = tflite_float_ops(path)
        info = dict(runner.delegate_info or {})
        return {"kind": kind, "ops": sum(ops.values()), "census": ops,
                "quantize": ops.get("QUANTIZE", 0), "dequantize": ops.get("DEQUANTIZE", 0),
                "float_ops": sum(floats.values()), "float_op_types": floats,
                "int8": ops.get("QUANTIZE", 0) > 0,
                "xnnpack": {k: info.get(k) for k in ("partitions", "delegated_nodes", "total_nodes",
                                                      "undelegated_ops")}}
    ops = onnx_op_census(path)
    with tempfile.TemporaryDirectory(prefix="care_q_census_") as tmp:
        opt = Path(tmp) / "optimized.onnx"
        load_runner(path, threads=threads, optimized_model_path=opt)
        run_ops = onnx_op_census(opt) if opt.exists() else {}
    integer = {k: v for k, v in run_ops.items() if is_integer_kernel(k)}
    floats = {k: v for k, v in run_ops.items()
              if not is_integer_kernel(k) and k not in QDQ and k not in _ONNX_MOVES}
    return {"kind": kind, "ops": sum(ops.values()), "census": ops, "runtime_census": run_ops,
            "quantize": ops.get("QuantizeLinear", 0), "dequantize": ops.get("DequantizeLinear", 0),
            "integer_kernels": sum(integer.values()), "float_ops": sum(floats.values()),
            "float_op_types": floats, "int8": ops.get("QuantizeLinear", 0) > 0}
