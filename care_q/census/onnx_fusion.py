"""Which QDQ groups onnxruntime's CPU execution provider fuses into integer kernels.

Read from the optimized graph onnxruntime itself writes (``SessionOptions.optimized_model_filepath``
at ORT_ENABLE_ALL, the level care-q's runner uses), not predicted: after its QDQ transformers,
a DequantizeLinear -> op -> QuantizeLinear group is either one integer kernel (QLinearConv,
QLinearMatMul, QLinearAdd, ..., com.microsoft domain), data movement on the integers (Transpose,
Reshape, Split with the Q/DQ pair dropped), or left as a float island: the op reads a
DequantizeLinear output and (usually) feeds a QuantizeLinear.

Each op of the optimized graph is classified as

- ``integer``: an integer kernel (QLinear*, *Integer, DynamicQuantize*, QGemm, QAttention, ...);
- ``integer_data_movement``: a non-arithmetic op whose activation inputs are all integer tensors;
- ``float_island``: reads a DequantizeLinear of an activation (a float op between DQ and Q);
- ``float``: any other float op (e.g. a head that was never quantized);
- ``qdq``: the QuantizeLinear / DequantizeLinear left at the island borders.

MACs (Conv, ConvTranspose, MatMul, Gemm in the original graph, shapes from ONNX shape inference)
are attributed to the optimized node that carries the original node's name (onnxruntime keeps the
name, adding ``_token_<n>`` when it rewrites a node).
"""

from __future__ import annotations

import collections
import math
import re
import tempfile
from pathlib import Path

from care_q.errors import CareQError
from care_q.runtime import load_runner

QDQ = ("QuantizeLinear", "DequantizeLinear")
_INTEGER_PREFIXES = ("QLinear", "QGemm", "QAttention", "QOrderedMatMul", "DynamicQuantize")
_INTEGER_SUFFIXES = ("Integer", "IntegerToFloat")
_DATA_MOVEMENT = {"Transpose", "Reshape", "Split", "Squeeze", "Unsqueeze", "Flatten", "Concat", "Slice",
                  "Gather", "Identity", "MaxPool", "Resize", "DepthToSpace", "SpaceToDepth", "Pad", "Expand",
                  "Tile"}
_TOKEN = re.compile(r"_token_\d+$")
_MAC_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def base_name(name: str) -> str:
    """The original node name onnxruntime derived a rewritten node's name from."""
    return _TOKEN.sub("", name)


def is_integer_kernel(op_type: str) -> bool:
    """Whether an ONNX op runs in integer arithmetic (care-q's one list of onnxruntime's integer
    kernels). ``op_type`` may carry its domain, as `care_q.runtime.onnx_op_census` writes it
    (``com.microsoft.QLinearConv``)."""
    leaf = op_type.rsplit(".", 1)[-1]
    return leaf.startswith(_INTEGER_PREFIXES) or leaf.endswith(_INTEGER_SUFFIXES)


def onnx_fusion(path: str | Path, threads: int = 1) -> dict:
    """Run onnxruntime's optimizer on `path` and classify the optimized graph's ops (see module doc)."""
    import onnx

    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise CareQError(f"{path}: not an .onnx file")
    if not path.is_file():
        raise CareQError(f"model file not found: {path}")
    try:
        original = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise CareQError(f"{path}: not a readable ONNX model ({str(e).strip().splitlines()[0][:120]})") from None
    with tempfile.TemporaryDirectory(prefix="care_q_ort_") as d:
        opt_path = Path(d) / "optimized.onnx"
        load_runner(path, threads=threads, optimized_model_path=opt_path)
        if not opt_path.exists():
            raise CareQError(f"{path}: onnxruntime did not write its optimized graph")
        optimized = onnx.load(str(opt_path), load_external_data=False)
    return classify(optimized, original)


def classify(optimized, original=None) -> dict:
    g = optimized.graph
    inits = {i.name for i in g.initializer}
    int_inputs = {i.name for i in g.input if i.type.tensor_type.elem_type in (2, 3)}   # UINT8, INT8
    producer = {o: n for n in g.node for o in n.output}
    integer_tensors: set[str] = set(int_inputs)
    kinds: dict[str, str] = {}
    rows = []
    for n in g.node:
        acts = [i for i in n.input if i and i not in inits]
        if n.op_type in QDQ:
            kind = "qdq"
        elif is_integer_kernel(n.op_type):
            kind = "integer"
        elif n.op_type in _DATA_MOVEMENT and acts and all(i in integer_tensors for i in acts):
            kind = "integer_data_movement"
        elif any(i in producer and producer[i].op_type == "DequantizeLinear" and producer[i].input[0] not in inits
                 for i in acts):
            kind = "float_island"
        else:
            kind = "float"
        if kind in ("integer", "integer_data_movement") or n.op_type == "QuantizeLinear":
            integer_tensors.update(o for o in n.output if o)
        kinds[n.name] = kind
        rows.append({"name": n.name, "op_type": n.op_type, "kind": kind})
    by_kind: dict[str, collections.Counter] = {k: collections.Counter() for k in
                                               ("integer", "integer_data_movement", "float_island", "float", "qdq")}
    for r in rows:
        by_kind[r["kind"]][r["op_type"]] += 1
    result = {
        "ops": len(rows),
        "integer_ops": dict(by_kind["integer"].most_common()),
        "integer_data_movement": dict(by_kind["integer_data_movement"].most_common()),
        "float_islands": dict(by_kind["float_island"].most_common()),
        "float_ops": dict(by_kind["float"].most_common()),
        "qdq": dict(by_kind["qdq"].most_common()),
        "float_island_nodes": [{"name": base_name(r["name"]), "op_type": r["op_type"]} for r in rows
                               if r["kind"] == "float_island"],
        "float_nodes": [{"name": base_name(r["name"]), "op_type": r["op_type"]} for r in rows if r["kind"] == "float"],
    }
    if original is not None:
        result.update(_mac_share(original, rows))
    return result


def _mac_share(original, rows) -> dict:
    """MACs of the original graph's Conv/MatMul/Gemm, and the share that landed in integer kernels."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(original)
    except Exception:  # shape inference is best effort (custom domains, external data)
        inferred = original
    g = inferred.graph
    shapes = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    for i in g.initializer:
        shapes[i.name] = list(i.dims)
    by_base: dict[str, str] = {}
    for r in rows:
        by_base.setdefault(base_name(r["name"]), r["kind"])
    total = integer = 0
    unknown = 0
    per_node = []
    for n in g.node:
        if n.op_type not in _MAC_OPS:
            continue
        macs = _node_macs(n, shapes)
        if macs is None:
            unknown += 1
            continue
        kind = by_base.get(n.name, "folded")
        total += macs
        if kind == "integer":
            integer += macs
        per_node.append({"name": n.name, "op_type": n.op_type, "macs": macs, "kind": kind})
    return {"macs_total": total, "macs_integer": integer,
            "mac_share_integer": (integer / total) if total else None,
            "mac_nodes_float": [p for p in per_node if p["kind"] != "integer"],
            "mac_nodes_unknown_shape": unknown}


def _node_macs(n, shapes) -> int | None:
    out = shapes.get(n.output[0])
    if not out:
        return None
    if n.op_type in ("Conv", "ConvTranspose"):
        w = shapes.get(n.input[1])
        if not w or len(w) < 3:
            return None
        if n.op_type == "Conv":
            return math.prod(out) * math.prod(w[1:])                       # w: (O, I/g, kh, kw)
        x = shapes.get(n.input[0])
        return math.prod(x) * w[1] * math.prod(w[2:]) if x else None     # w: (I, O/g, kh, kw)
    a = shapes.get(n.input[0])
    if not a:
        return None
    if n.op_type == "Gemm":
        trans_a = next((a_.i for a_ in n.attribute if a_.name == "transA"), 0)
        return math.prod(out) * (a[0] if trans_a else a[-1])
    return math.prod(out) * a[-1]                                           # MatMul
