"""Per-node latency profile of ONNX models in onnxruntime (its own profiler), by op kind, and the bound.

    p = profile_onnx("out/care_s0_int8_x86_qdq.onnx", fp32="out/care_s0_fp32.onnx", threads=2)
    p["ms"], p["bound_ms"], p["kinds"][0]       # where the int8 graph's time goes, beside FP32's

onnxruntime times every node of the graph it runs, after its own fusions (QLinearConv from
DequantizeLinear / Conv / QuantizeLinear, NCHWc convolutions with their reorders), when
profiling is on. Each file is profiled in a fresh process (`run_isolated`) with the session
options of `care_q.runtime.OnnxRunner` (the ones `care-q bench` times with), on one seeded random
input: ``warmup`` runs, then ``runs`` runs whose node times are kept; a node's time is its
median over them. With the FP32 file, the two are profiled in turn, ``blocks`` times each (int8,
FP32, int8, FP32, ...: a fresh process each), and a node's time is the median of its blocks' times:
a machine whose speed drifts during the profile then moves both files alike (one pass each moved
the same FP32 file's node sum from 25.6 to 34.7 ms between two bench steps). Profiling adds a
fixed cost per node, so the profiled run is slower than
`care-q bench` measures: compare sums measured alike, not a sum with a bench time.

The int8 and the FP32 graphs are not node for node alike (the fusions differ; torch.onnx writes
GELU as Div, Erf, Add, Mul, Mul and ELU as Relu, Clip, Exp, Add, Sub), so they are compared by
*kind*: what a node computes, whatever its precision. Convolutions by kernel and whether they
are depthwise; GELU and ELU (onnxruntime's own ops in the int8 file, torch.onnx's
decompositions in the FP32 file, found from their Erf / Exp); matmul; fully connected; the other
ops by type (QLinearAdd is an add); ``conversions`` (QuantizeLinear, DequantizeLinear) and
``layout`` (reorders, transposes, reshapes).

The bound: every kind at the faster of its int8 and its FP32 time, plus the int8 file's
conversions and layout. It is optimistic (a kind moved to float needs conversions the int8 file
does not have yet), so an int8 graph near it has nothing left to gain by choosing float kinds.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

from care_q.errors import CareQError
from care_q.utils.timing import run_isolated

CONVERSIONS = "conversions"
LAYOUT = "layout"
_LAYOUT_OPS = {"ReorderInput", "ReorderOutput", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
               "Identity"}
_KIND_OF_OP = {"QuantizeLinear": CONVERSIONS, "DequantizeLinear": CONVERSIONS, "DynamicQuantizeLinear": CONVERSIONS,
               "MatMul": "matmul", "FusedMatMul": "matmul", "MatMulInteger": "matmul",
               "Gemm": "fully connected", "QGemm": "fully connected", "Gelu": "gelu", "FastGelu": "gelu",
               "Elu": "elu", "GlobalAveragePool": "global pool"}
# torch.onnx's decompositions: the seed op, the ops feeding it, how many single-consumer
# elementwise steps after it, and the ops beside it on the same input (ELU's Relu)
_PATTERNS = {"Erf": ("gelu", {"Div", "Mul"}, 3, set()), "Exp": ("elu", {"Clip", "Min"}, 2, {"Relu"})}


def _conv_kind(node, inits: dict, producer: dict) -> str:
    attrs = {a.name: a for a in node.attribute}
    group = attrs["group"].i if "group" in attrs else 1
    w = node.input[3] if node.op_type == "QLinearConv" else node.input[1] if len(node.input) > 1 else ""
    dq = producer.get(w)
    if w not in inits and dq is not None and dq.op_type == "DequantizeLinear":  # QDQ: the weight's DQ
        w = dq.input[0]
    dims = inits.get(w)
    if dims is not None and len(dims) >= 4:
        k = "x".join(str(d) for d in dims[2:4])
        depthwise = group > 1 and dims[1] == 1
    else:
        ks = list(attrs["kernel_shape"].ints) if "kernel_shape" in attrs else []
        k = "x".join(map(str, ks)) or "?"
        depthwise = group > 1
    return f"{'depthwise' if depthwise else 'conv'} {k}"


def node_kinds(model) -> dict[str, str]:
    """Node name -> kind for an onnx ModelProto (onnxruntime's optimized graph: the nodes it profiles)."""
    g = model.graph
    inits = {i.name: list(i.dims) for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    kinds: dict[str, str] = {}
    for n in g.node:
        if n.op_type not in _PATTERNS:
            continue
        kind, feeding, steps, beside = _PATTERNS[n.op_type]
        members = [n]
        p = producer.get(n.input[0])
        if p is not None and p.op_type in feeding:
            members.append(p)
            sources = [p.input[0]]
            src = producer.get(p.input[0])
            if src is not None and src.op_type == "ReorderOutput":  # NCHWc: ops beside may read the blocked tensor
                sources.append(src.input[0])
            members += [c for x in sources for c in consumers.get(x, []) if c.op_type in beside]
        cur = n
        for _ in range(steps):
            nxt = consumers.get(cur.output[0], [])
            if len(nxt) != 1 or nxt[0].op_type not in ("Add", "Sub", "Mul"):
                break
            cur = nxt[0]
            members.append(cur)
        for m in members:
            kinds[m.name] = kind
    for n in g.node:
        if n.name in kinds:
            continue
        op = n.op_type
        if op in ("Conv", "FusedConv", "QLinearConv", "NhwcFusedConv"):
            kinds[n.name] = _conv_kind(n, inits, producer)
        elif op in _LAYOUT_OPS:
            kinds[n.name] = LAYOUT
        else:
            kinds[n.name] = _KIND_OF_OP.get(op) or _KIND_OF_OP.get(op.removeprefix("QLinear")) \
                or op.removeprefix("QLinear").lower()
    return kinds


def _node_times(events: list, runs: int) -> tuple[dict[str, dict], float]:
    """(node name -> {"op", "ms": median over the last ``runs`` model runs}, median run time in ms)."""
    model_runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                        key=lambda e: e["ts"])[-runs:]
    if not model_runs:
        raise CareQError("onnxruntime's profile has no model_run events")
    spans = [(r["ts"], r["ts"] + r["dur"]) for r in model_runs]
    per: dict[str, dict] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        run = next((i for i, (a, b) in enumerate(spans) if a <= e["ts"] <= b), None)
        if run is None:
            continue
        name = e["name"][:-len("_kernel_time")]
        rec = per.setdefault(name, {"op": e["args"].get("op_name", "?"), "us": [0.0] * len(spans)})
        rec["us"][run] += e["dur"]
    nodes = {n: {"op": r["op"], "ms": statistics.median(r["us"]) / 1e3} for n, r in per.items()}
    return nodes, statistics.median(r["dur"] for r in model_runs) / 1e3


def _profile_in_child(path: str, threads: int, runs: int, warmup: int, seed: int) -> dict:
    import onnx

    from care_q.runtime import OnnxRunner

    with tempfile.TemporaryDirectory(prefix="care_q_ort_profile_") as tmp:
        opt = Path(tmp) / "optimized.onnx"
        r = OnnxRunner(Path(path), threads=threads, optimized_model_path=opt, profile_prefix=Path(tmp) / "profile")
        shape = [d or 1 for d in r.input_shape]  # (N, C, H, W) whatever the file's layout
        x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        r.prepare(x)
        for _ in range(warmup + runs):
            r.invoke()
        events = json.loads(Path(r.session.end_profiling()).read_text())
        kinds = node_kinds(onnx.load(str(opt)))
    nodes, run_ms = _node_times(events, runs)
    for name, n in nodes.items():
        n["kind"] = kinds.get(name, n["op"].removeprefix("QLinear").lower())
    return {"run_ms": run_ms, "nodes": nodes}


def _by_kind(nodes: dict[str, dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for n in nodes.values():
        k = out.setdefault(n["kind"], {"ms": 0.0, "nodes": 0})
        k["ms"] += n["ms"]
        k["nodes"] += 1
    return out


def _merge_blocks(blocks: list[dict]) -> dict:
    """One profile from several of the same file: each node's and the run's median over the blocks."""
    nodes = {name: {**n, "ms": statistics.median(b["nodes"][name]["ms"] for b in blocks if name in b["nodes"])}
             for name, n in blocks[0]["nodes"].items()}
    return {"run_ms": statistics.median(b["run_ms"] for b in blocks), "nodes": nodes,
            "run_ms_blocks": [b["run_ms"] for b in blocks]}


def profile_onnx(path: str | Path, fp32: str | Path | None = None, *, threads: int = 2, runs: int = 20,
                 warmup: int = 5, seed: int = 0, blocks: int = 3) -> dict:
    """onnxruntime's per-node profile of ``path`` by kind (and of ``fp32`` beside it, with the bound), each
    file profiled ``blocks`` times in turn (module docstring).
    Returns {"artifact", "threads", "runs", "blocks", "run_ms", "run_ms_blocks", "ms", "kinds": [{"kind", "ms",
    "nodes", "fp32_ms", "fp32_nodes", "best_ms", "faster": "int8" | "fp32" | "-"}], "bound_ms", "fp32":
    {"artifact", "run_ms", "run_ms_blocks", "ms"}, "ratio_sum", "ratio_bound"}; kinds sorted by the int8 file's time."""
    if blocks < 1:
        raise CareQError(f"blocks must be at least 1, got {blocks}")
    for p in (path, fp32):
        if p is not None and Path(p).suffix.lower() != ".onnx":
            raise CareQError(f"the onnxruntime profile reads .onnx files; got '{p}'")
        if p is not None and not Path(p).is_file():
            raise CareQError(f"model file not found: {p}")
    files = [(key, p) for key, p in (("int8", path), ("fp32", fp32)) if p is not None]
    done: dict[str, list[dict]] = {key: [] for key, _ in files}
    for _ in range(blocks):
        for key, p in files:
            done[key].append(run_isolated(_profile_in_child, str(p), threads, runs, warmup, seed,
                                          what=f"onnxruntime profile of {Path(p).name}"))
    prof = {key: _merge_blocks(b) for key, b in done.items()}
    q = _by_kind(prof["int8"]["nodes"])
    f = _by_kind(prof["fp32"]["nodes"]) if "fp32" in prof else {}
    kinds = []
    for kind, v in q.items():
        fv = f.get(kind)
        row = {"kind": kind, "ms": v["ms"], "nodes": v["nodes"], "fp32_ms": fv["ms"] if fv else None,
               "fp32_nodes": fv["nodes"] if fv else 0, "best_ms": v["ms"], "faster": "-"}
        if fv is not None and kind not in (CONVERSIONS, LAYOUT):
            row["best_ms"] = min(v["ms"], fv["ms"])
            row["faster"] = "fp32" if fv["ms"] < v["ms"] else "int8"
        kinds.append(row)
    kinds.sort(key=lambda r: -r["ms"])
    out = {"artifact": str(path), "threads": threads, "runs": runs, "blocks": blocks, "run_ms": prof["int8"]["run_ms"],
           "run_ms_blocks": prof["int8"]["run_ms_blocks"], "ms": sum(r["ms"] for r in kinds), "kinds": kinds,
           "bound_ms": sum(r["best_ms"] for r in kinds)}
    if "fp32" in prof:
        fms = sum(v["ms"] for v in f.values())
        out["fp32"] = {"artifact": str(fp32), "run_ms": prof["fp32"]["run_ms"],
                       "run_ms_blocks": prof["fp32"]["run_ms_blocks"], "ms": fms,
                       "only_fp32": sorted(k for k in f if k not in q)}
        out["ratio_sum"] = out["ms"] / fms
        out["ratio_bound"] = out["bound_ms"] / fms
    return out
