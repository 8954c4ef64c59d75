"""Per-op latency profile of a TFLite model, and the bound it implies.

    prof = profile_tflite("out/care_s0_int8.tflite", threads=2)
    prof["int8_ms"], prof["bound_ms"], prof["groups"][0]      # where the time goes, by op kind

ai-edge-litert's Python interpreter has no op profiler (and XNNPACK runs its partitions as one
node), so each op is timed as a model of its own, made from the file (timed sub-graphs): the op
with its tensors, its constants copied, its other inputs as model inputs. An int8 op is timed in
two forms: as written, and as a *float island*: DEQUANTIZE of its int8 inputs, the same op in
float32 (int8 constants dequantized offline, int32 biases at their scales), QUANTIZE to its int8
output. The island computes the op on the same int8 grids (only its arithmetic is float), so it
changes no tensor's parameters: choosing it costs no fidelity beyond round-off ties.

Ops with the same signature (kind, options, tensor shapes and types) are timed once. The
*bound* of a graph is the sum over its ops of the faster form; the report sets it beside the
sum of the int8 forms and of the FP32 model's ops (the same method on the FP32 file). The sum
of one-op times is not the whole graph's time (XNNPACK fuses, partitions cost), so ratios are
taken between sums measured alike.

A profile measured elsewhere (a phone, `care-q bench --kernel-profile`) is the same JSON: op
signatures -> milliseconds per form; `choose_float_kernels` reads either.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as fb

from care_q.errors import CareQError
from care_q.export.tflite_builder import TFLiteBuilder, options
from care_q.utils.timing import run_isolated

PROFILE_FORMAT = "care-q kernel profile 1"
_OP_NAMES = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
_TYPE_NAMES = {v: k.lower() for k, v in vars(fb.TensorType).items() if not k.startswith("_")}
_QUANTIZED = (fb.TensorType.INT8, fb.TensorType.UINT8)
_NP = {fb.TensorType.FLOAT32: np.float32, fb.TensorType.INT8: np.int8, fb.TensorType.UINT8: np.uint8,
       fb.TensorType.INT32: np.int32, fb.TensorType.INT64: np.int64, fb.TensorType.INT16: np.int16}


@dataclass
class OpForms:
    """One op of a model: its position, kind, output tensor, signature and one-op models."""

    index: int
    op: str
    output: str
    dtype: str                    # its output's type
    signature: str
    int8: bytes                   # the op as written (float ops of an FP32 model too)
    island: bytes | None          # the float island, or None (not an int8 op, or no float form)


def _name(t) -> str:
    return t.name.decode() if isinstance(t.name, bytes) else (t.name or "")


def _load(data: bytes):
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise CareQError("not a TFLite flatbuffer (no TFL3 identifier)")
    return fb.ModelT.InitFromObj(fb.Model.GetRootAsModel(data, 0))


def _pack(m) -> bytes:
    b = flatbuffers.Builder(1 << 16)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def _const(m, t) -> np.ndarray | None:
    buf = m.buffers[t.buffer].data if t.buffer < len(m.buffers) else None
    if buf is None or len(buf) == 0:
        return None
    return np.frombuffer(np.asarray(buf, np.uint8).tobytes(), _NP[t.type]).reshape(list(t.shape))


def _kind(m, op) -> str:
    c = m.operatorCodes[op.opcodeIndex]
    return _OP_NAMES.get(max(c.builtinCode, c.deprecatedBuiltinCode), str(c.builtinCode))


def _dequantized(t, values: np.ndarray) -> np.ndarray:
    q = t.quantization
    scale = np.asarray(q.scale, np.float64)
    zp = np.asarray(q.zeroPoint if q.zeroPoint is not None else np.zeros(len(scale)), np.float64)
    if scale.size > 1:
        shape = [1] * values.ndim
        shape[q.quantizedDimension] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return ((values.astype(np.float64) - zp) * scale).astype(np.float32)


class _OneOp:
    """A one-op model under construction, sharing the source model's operator codes."""

    def __init__(self, src):
        self.src = src
        self.m = fb.ModelT()
        self.m.version = src.version
        self.m.operatorCodes = [copy.copy(c) for c in src.operatorCodes]
        self.m.buffers = [fb.BufferT()]
        self.sg = fb.SubGraphT()
        self.sg.tensors, self.sg.operators, self.sg.inputs, self.sg.outputs = [], [], [], []

    def tensor(self, like, dtype=None, data: np.ndarray | None = None, keep_quant: bool = True) -> int:
        t = copy.copy(like)
        if dtype is not None:
            t.type = dtype
        if not keep_quant:
            t.quantization = None
        b = fb.BufferT()
        if data is not None:
            b.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
        self.m.buffers.append(b)
        t.buffer = len(self.m.buffers) - 1
        self.sg.tensors.append(t)
        return len(self.sg.tensors) - 1

    def code(self, builtin: int, version: int = 1) -> int:
        for i, c in enumerate(self.m.operatorCodes):
            if max(c.builtinCode, c.deprecatedBuiltinCode) == builtin and c.version == version:
                return i
        c = fb.OperatorCodeT()
        c.builtinCode, c.deprecatedBuiltinCode, c.version = builtin, min(builtin, 127), version
        self.m.operatorCodes.append(c)
        return len(self.m.operatorCodes) - 1

    def add(self, code: int, inputs, outputs, like=None) -> None:
        op = copy.copy(like) if like is not None else fb.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = code, list(inputs), list(outputs)
        self.sg.operators.append(op)

    def finish(self) -> bytes:
        self.m.subgraphs = [self.sg]
        return _pack(self.m)


def _inputs(m, op, take) -> list[int] | None:
    """The op's inputs in a one-op model: absent ones (-1) kept, each other ``take(src, constant data or None)``
    (its index there, or None: the op has no such form)."""
    out = []
    for t in op.inputs:
        if t < 0:
            out.append(-1)
            continue
        src = m.subgraphs[0].tensors[t]
        i = take(src, _const(m, src))
        if i is None:
            return None
        out.append(i)
    return out


def _as_written(m, op) -> bytes:
    sg, one = m.subgraphs[0], _OneOp(m)

    def take(src, data):
        i = one.tensor(src, data=data)
        if data is None:
            one.sg.inputs.append(i)
        return i

    ins = _inputs(m, op, take)
    outs = [one.tensor(sg.tensors[t]) for t in op.outputs]
    one.add(op.opcodeIndex, ins, outs, like=op)
    one.sg.outputs = outs
    return one.finish()


def _island(m, op) -> bytes | None:
    """DEQUANTIZE -> the op in float32 -> QUANTIZE, or None where the op has no float form here."""
    sg = m.subgraphs[0]
    if any(sg.tensors[t].type not in _QUANTIZED for t in op.outputs):
        return None
    one = _OneOp(m)
    dq, qz = one.code(fb.BuiltinOperator.DEQUANTIZE, 2), one.code(fb.BuiltinOperator.QUANTIZE, 2)

    def take(src, data):
        quant = src.quantization is not None and src.quantization.scale is not None and len(src.quantization.scale)
        if data is not None:
            if src.type in _QUANTIZED or (src.type == fb.TensorType.INT32 and quant):  # weights, biases
                return one.tensor(src, fb.TensorType.FLOAT32, _dequantized(src, data), keep_quant=False)
            return one.tensor(src, data=data)  # shapes, axes, permutations
        if src.type not in _QUANTIZED:  # a run-time int32 operand (a bias made at run time): no float form
            return None
        q = one.tensor(src)
        one.sg.inputs.append(q)
        f = one.tensor(src, fb.TensorType.FLOAT32, keep_quant=False)
        one.add(dq, [q], [f])
        return f

    ins = _inputs(m, op, take)
    if ins is None:
        return None
    fouts = [one.tensor(sg.tensors[t], fb.TensorType.FLOAT32, keep_quant=False) for t in op.outputs]
    c = m.operatorCodes[op.opcodeIndex]
    one.add(one.code(max(c.builtinCode, c.deprecatedBuiltinCode), 1), ins, fouts, like=op)
    outs = []
    for t, f in zip(op.outputs, fouts):
        outs.append(one.tensor(sg.tensors[t]))
        one.add(qz, [f], [outs[-1]])
    one.sg.outputs = outs
    return one.finish()


def _signature(m, op) -> str:
    sg = m.subgraphs[0]

    def desc(t):
        if t < 0:
            return "-"
        x = sg.tensors[t]
        return f"{_TYPE_NAMES.get(x.type, x.type)}{list(x.shape)}{'c' if _const(m, x) is not None else ''}"

    opts = op.builtinOptions
    o = sorted((k, v) for k, v in vars(opts).items()) if opts is not None else []
    text = f"{_kind(m, op)}|{','.join(desc(t) for t in op.inputs)}|{','.join(desc(t) for t in op.outputs)}|{o}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def op_forms(data: bytes, islands: bool = True, only: set[str] | None = None) -> list[OpForms]:
    """Every op of the model's first subgraph (or those whose output tensor is in ``only``) as one-op
    models, with float islands where they exist."""
    m = _load(data)
    sg = m.subgraphs[0]
    out = []
    for i, op in enumerate(sg.operators):
        t = sg.tensors[op.outputs[0]]
        if only is not None and _name(t) not in only:
            continue
        out.append(OpForms(i, _kind(m, op), _name(t), _TYPE_NAMES.get(t.type, str(t.type)), _signature(m, op),
                           _as_written(m, op), _island(m, op) if islands else None))
    return out


def _random_inputs(interp) -> None:
    rng = np.random.default_rng(0)
    for d in interp.get_input_details():
        if d["dtype"] == np.float32:
            v = rng.standard_normal(d["shape"]).astype(np.float32)
        else:
            info = np.iinfo(d["dtype"])
            v = rng.integers(max(info.min, -100), min(info.max, 100), size=d["shape"]).astype(d["dtype"])
        interp.set_tensor(d["index"], v)


def _time_models(models: dict[str, bytes], threads: int, runs: int, warmup: int) -> dict[str, float]:
    """Median ms per model; the models' rounds interleaved so that drift hits every form alike."""
    from ai_edge_litert.interpreter import Interpreter

    interps = {}
    for k, data in models.items():
        it = Interpreter(model_content=data, num_threads=threads)
        it.allocate_tensors()
        _random_inputs(it)
        for _ in range(warmup):
            it.invoke()
        interps[k] = it
    times = {k: [] for k in interps}
    for _ in range(runs):
        for k, it in interps.items():
            t0 = time.perf_counter()
            it.invoke()
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) * 1e3 for k, v in times.items()}


def _empty_model() -> bytes:
    """A model of one ADD of two float scalars: what an invoke costs when the op costs nothing."""
    b = TFLiteBuilder("care-q invoke overhead")
    x, y, z = (b.tensor(n, (1,), np.float32) for n in ("x", "y", "z"))
    b.inputs += [x, y]
    b.op(fb.BuiltinOperator.ADD, [x, y], [z], fb.BuiltinOptions.AddOptions, options(fb.AddOptionsT), version=1)
    b.outputs.append(z)
    return b.to_bytes()


def _time_unique(forms: list[OpForms], threads: int, runs: int, warmup: int, batch: int = 1) -> dict:
    """{"ops": signature -> {"int8_ms", "float_ms"}, "overhead_ms"}: each distinct signature's forms
    timed side by side (in this process), less the invoke overhead of an empty model."""
    overhead = _time_models({"empty": _empty_model()}, threads, runs * 5, warmup)["empty"]
    first: dict[str, OpForms] = {}
    for f in forms:
        first.setdefault(f.signature, f)
    out: dict[str, dict] = {}
    sigs = list(first)
    for i in range(0, len(sigs), batch):  # a few signatures at a time: interleaved, bounded memory
        models = {}
        for s in sigs[i:i + batch]:
            models[f"{s}/int8"] = first[s].int8
            if first[s].island is not None:
                models[f"{s}/float"] = first[s].island
        ms = {k: max(v - overhead, 0.0) for k, v in _time_models(models, threads, runs, warmup).items()}
        for s in sigs[i:i + batch]:
            out[s] = {"int8_ms": ms[f"{s}/int8"], "float_ms": ms.get(f"{s}/float")}
    return {"ops": out, "overhead_ms": overhead}


def measure(data: bytes, threads: int = 2, runs: int = 20, warmup: int = 3, islands: bool = True,
            only: set[str] | None = None, blocks: int = 1) -> dict:
    """Time every distinct op of a model (or those writing a tensor in ``only``), both forms, on this
    machine, each of ``blocks`` blocks in a process of its own: a profile (see the module docstring).
    With several blocks an op's times are the median of its blocks', and ``"blocks"`` keeps each
    block's [int8_ms, float_ms] for `choose_float_kernels`."""
    forms = op_forms(data, islands, only)
    timed = [run_isolated(_time_unique, forms, threads, runs, warmup, what="timing one-op models")
             for _ in range(blocks)]
    prof = {"format": PROFILE_FORMAT, "device": "host", "threads": threads, "runs": runs, **timed[0]}
    if blocks > 1:
        prof["blocks"] = blocks
        prof["overhead_ms"] = float(np.median([t["overhead_ms"] for t in timed]))
        for sig, t in prof["ops"].items():
            per = [[b["ops"][sig]["int8_ms"], b["ops"][sig]["float_ms"]] for b in timed]
            t["int8_ms"] = float(np.median([i for i, _ in per]))
            t["float_ms"] = None if t["float_ms"] is None else float(np.median([f for _, f in per]))
            t["blocks"] = per
    return prof


def measure_on_device(data: bytes, device: str, binary: str | Path, threads: int = 4, runs: int = 20,
                      only: set[str] | None = None, runner=None) -> dict:
    """The same profile as `measure`, timed on an Android device with TFLite's ``benchmark_model``
    (`care_q.device.adb`; ``device``: adb or adb:SERIAL): each distinct one-op model and the empty
    model pushed and run with XNNPACK, less the empty model's time."""
    import subprocess
    import tempfile

    from care_q.device.adb import parse_device, run_device_bench

    serial = parse_device(device)
    first: dict[str, OpForms] = {}
    for f in op_forms(data, only=only):
        first.setdefault(f.signature, f)
    with tempfile.TemporaryDirectory(prefix="care_q_kernels_") as tmp:
        files = {"empty": Path(tmp) / "empty.tflite"}
        files["empty"].write_bytes(_empty_model())
        for sig, f in first.items():
            for form, model in (("int8", f.int8), ("float", f.island)):
                if model is not None:
                    files[f"{sig}_{form}"] = Path(tmp) / f"{sig}_{form}.tflite"
                    files[f"{sig}_{form}"].write_bytes(model)
        res = run_device_bench(files, serial, binary, "xnnpack", threads, runs, rounds=1,
                               runner=runner or subprocess.run)["results"]
    overhead = res["empty"]["avg_ms"]
    ops = {sig: {"int8_ms": max(res[f"{sig}_int8"]["avg_ms"] - overhead, 0.0),
                 "float_ms": (max(res[f"{sig}_float"]["avg_ms"] - overhead, 0.0) if f"{sig}_float" in res else None)}
           for sig in first}
    return {"format": PROFILE_FORMAT, "device": device, "threads": threads, "runs": runs, "ops": ops,
            "overhead_ms": overhead}


def summarize(data: bytes, prof: dict, only: set[str] | None = None) -> dict:
    """Per-op rows and per-kind groups of ``data``'s ops (or those in ``only``) under a profile, with the sums."""
    rows, missing = [], 0
    for f in op_forms(data, islands=False, only=only):
        t = prof["ops"].get(f.signature)
        if t is None:
            missing += 1
            continue
        best = min(t["int8_ms"], t["float_ms"]) if t.get("float_ms") is not None else t["int8_ms"]
        rows.append({"index": f.index, "op": f.op, "output": f.output, "dtype": f.dtype, "signature": f.signature,
                     "int8_ms": t["int8_ms"], "float_ms": t.get("float_ms"), "best_ms": best,
                     "form": "float" if best < t["int8_ms"] else "int8"})
    if missing:
        raise CareQError(f"the kernel profile has no timing for {missing} of the model's ops (measured on "
                         f"another model or graph?)")
    groups: dict[tuple, dict] = {}
    for r in rows:
        g = groups.setdefault((r["op"], r["dtype"]), {"op": r["op"], "dtype": r["dtype"], "count": 0, "ms": 0.0,
                                                      "best_ms": 0.0, "float_faster": 0})
        g["count"] += 1
        g["ms"] += r["int8_ms"]
        g["best_ms"] += r["best_ms"]
        g["float_faster"] += r["form"] == "float"
    return {"rows": rows, "groups": sorted(groups.values(), key=lambda g: -g["ms"]),
            "ms": sum(r["int8_ms"] for r in rows), "bound_ms": sum(r["best_ms"] for r in rows)}


def profile_tflite(path: str | Path, threads: int = 2, runs: int = 20, fp32: str | Path | None = None) -> dict:
    """The profile of an int8 .tflite (and of its FP32 file, if given) with the bound; see the module."""
    data = Path(path).read_bytes()
    out = {"artifact": str(path), "threads": threads, **summarize(data, measure(data, threads, runs))}
    if fp32 is not None:
        fdata = Path(fp32).read_bytes()
        f = summarize(fdata, measure(fdata, threads, runs, islands=False))
        out["fp32"] = {"artifact": str(fp32), "ms": f["ms"], "groups": f["groups"]}
        out["ratio_sum"] = out["ms"] / f["ms"]
        out["ratio_bound"] = out["bound_ms"] / f["ms"]
    return out


def save_profile(prof: dict, path: str | Path) -> None:
    from care_q.utils.io import atomic_write_text

    atomic_write_text(json.dumps(prof, indent=1, sort_keys=True), path)


def load_profile(path: str | Path) -> dict:
    try:
        prof = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CareQError(f"kernel profile '{path}' does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CareQError(f"kernel profile '{path}' is not JSON: {e}") from None
    if not isinstance(prof, dict) or prof.get("format") != PROFILE_FORMAT or not isinstance(prof.get("ops"), dict):
        raise CareQError(f"'{path}' is not a care-q kernel profile (format '{PROFILE_FORMAT}')")
    return prof


def _island_votes(t: dict, margin: float) -> tuple[int, int]:
    """(blocks in which the island took at most ``margin`` of the int8 op's time, blocks)."""
    per = t.get("blocks") or [[t["int8_ms"], t["float_ms"]]]
    return sum(f is not None and f <= margin * i for i, f in per), len(per)


def choose_float_kernels(data: bytes, prof: dict, candidates: set[str], margin: float = 0.9) -> dict:
    """The output tensors of ``candidates`` (tensor names) whose float island takes at most ``margin``
    of the int8 op's time under ``prof``, in every block of a profile measured in blocks:
    {"float": sorted names, "saved_ms", "rows", "close": the names kept int8 because their blocks
    disagreed, "close_ms": how much islands there would change the one-op time, by the median times}. Ops within
    the blocks' noise of the margin are where two measurements choose differently; they are kept int8
    so that a choice needs every block, and their time says what the choice among them is worth."""
    rows = [r for r in summarize(data, prof, only=candidates)["rows"] if r["float_ms"] is not None]
    votes = {r["output"]: _island_votes(prof["ops"][r["signature"]], margin) for r in rows}
    chosen = [r for r in rows if votes[r["output"]][0] == votes[r["output"]][1]]
    close = [r for r in rows if 0 < votes[r["output"]][0] < votes[r["output"]][1]]
    return {"float": sorted(r["output"] for r in chosen), "saved_ms": sum(r["int8_ms"] - r["float_ms"] for r in chosen),
            "rows": rows, "close": sorted(r["output"] for r in close),
            "close_ms": sum(abs(r["int8_ms"] - r["float_ms"]) for r in close)}
