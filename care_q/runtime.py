"""Run exported artifacts (.onnx, .tflite) on NumPy batches: one interface for every verifier
and benchmark.

    runner = load_runner("out/care_s0_fp32.tflite", threads=2)
    logits = runner(x)              # x: float32 NCHW batch -> float32 (batch, classes)

    runner.prepare(x1)              # latency: convert and set the input once ...
    runner.invoke()                 # ... and time only this
    runner.output()

A `Runner` hides the artifact's conventions: NHWC inputs get transposed, int8/uint8 inputs get
quantized with the model's input quantization and int8/uint8 outputs dequantized, and a batch
larger than the model's fixed batch (TFLite models have batch 1) is run in chunks.

ONNX runs in onnxruntime's CPUExecutionProvider; TFLite in ai-edge-litert's interpreter with
the default XNNPACK delegate, without it (``builtin``), or with the reference kernels
(``reference``). `Runner.delegate_info` reports how much of a TFLite graph XNNPACK took.
"""

from __future__ import annotations

import collections
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from care_q.errors import CareQError

KINDS = {".onnx": "onnx", ".tflite": "tflite"}
TFLITE_DELEGATES = ("xnnpack", "builtin", "reference")

# ai-edge-litert prints this at VERBOSE level only (not shown by the 2.3.0 Python package); it is
# parsed when present, otherwise the same numbers are derived from the interpreter's nodes.
_REPLACING_RE = re.compile(r"Replacing (\d+) out of (\d+) node\(s\) with delegate \((\w+)\) node, "
                           r"yielding (\d+) partitions")

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextmanager
def capture_stderr():
    """Redirect file descriptor 2 (native libraries' logging) into a buffer.

    Yields a list that holds the captured text (one string) after the block.
    """
    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.append(tmp.read().decode("utf-8", "replace"))


def _forward_log(text: str) -> None:
    """Re-emit captured native log lines except routine INFO chatter."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("INFO:")]
    if lines:
        print("\n".join(lines), file=sys.stderr)


class Runner:
    """A loaded artifact. Subclasses implement `_set_input`, `invoke` and `_get_output`.

    Attributes:
        path, kind ('onnx' | 'tflite'), input_layout ('NCHW' | 'NHWC'),
        input_shape: (N, C, H, W) whatever the layout; None for a dynamic dimension,
        input_dtype / output_dtype: numpy dtypes of the artifact's tensors,
        input_quant / output_quant: (scale, zero_point) of integer tensors, else None,
        threads, delegate_info: dict (TFLite) or None,
        metadata: the file's metadata_props (ONNX; empty for TFLite).
    `OnnxRunner` adds ``session_config`` (the
    onnxruntime config entries applied: the file's ``care_q.ort_session_config``, then the
    caller's); integer I/O grids come from ``care_q.{input,output}_{scale,zero_point}``.
    """

    kind = ""

    def __init__(self, path: Path, threads: int):
        self.path = path
        self.threads = threads
        self.metadata: dict[str, str] = {}
        self.input_layout = "NCHW"
        self.input_shape: tuple[int | None, ...] = ()
        self.input_dtype = np.dtype(np.float32)
        self.output_dtype = np.dtype(np.float32)
        self.input_quant: tuple[float, int] | None = None
        self.output_quant: tuple[float, int] | None = None
        self.delegate_info: dict | None = None

    # --- layout and dtype -------------------------------------------------------------
    @staticmethod
    def _layout_of(raw_shape) -> str:
        """NHWC when the last dim is 3 and dim 1 is not (a 3-channel image input)."""
        if len(raw_shape) == 4 and raw_shape[3] == 3 and raw_shape[1] != 3:
            return "NHWC"
        return "NCHW"

    def _set_io_shape(self, raw_shape) -> None:
        raw = tuple(d if isinstance(d, int) and d > 0 else None for d in raw_shape)
        if len(raw) != 4:
            raise CareQError(f"{self.path}: expected a 4-D image input, the model's input has shape "
                             f"{_fmt_shape(raw)}")
        self.input_layout = self._layout_of(raw)
        self.input_shape = (raw[0], raw[3], raw[1], raw[2]) if self.input_layout == "NHWC" else raw

    @property
    def batch(self) -> int | None:
        """The model's fixed batch size, or None for a dynamic batch."""
        return self.input_shape[0] if self.input_shape else None

    def check_input(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        want = self.input_shape
        ok = x.ndim == 4 and all(w is None or w == g for w, g in zip(want[1:], x.shape[1:]))
        if not ok:
            raise CareQError(f"input of shape {_fmt_shape(x.shape)} does not fit {self.path.name}, "
                             f"which takes (N, C, H, W) = {_fmt_shape(want)} "
                             f"({self.input_layout} in the file); pass a float32 NCHW batch")
        return x

    def _convert(self, x: np.ndarray) -> np.ndarray:
        """Float NCHW -> the artifact's layout and dtype."""
        if self.input_layout == "NHWC":
            x = x.transpose(0, 2, 3, 1)
        if self.input_quant is not None:
            scale, zp = self.input_quant
            info = np.iinfo(self.input_dtype)
            x = np.clip(np.round(x / scale) + zp, info.min, info.max)
        return np.ascontiguousarray(x, dtype=self.input_dtype)

    def _dequant(self, y: np.ndarray) -> np.ndarray:
        if self.output_quant is not None:
            scale, zp = self.output_quant
            return ((y.astype(np.float32) - zp) * scale).astype(np.float32)
        return y.astype(np.float32, copy=False)

    # --- running ---------------------------------------------------------------------
    def prepare(self, x) -> None:
        """Convert one batch (exactly the model's batch if it is fixed) and set it as the input."""
        x = self.check_input(x)
        if self.batch is not None and x.shape[0] != self.batch:
            raise CareQError(f"prepare() takes exactly the model's batch of {self.batch}, "
                             f"got {x.shape[0]}; use runner(x) for any batch")
        self._set_input(self._convert(x))

    def invoke(self) -> None:
        raise NotImplementedError

    def output(self) -> np.ndarray:
        """The last invoke's output as float32 (batch, classes)."""
        y = self._dequant(self._get_output())
        return y.reshape(y.shape[0], -1)

    def run_once(self, x) -> np.ndarray:
        """`prepare(x)`, `invoke()`, `output()`."""
        self.prepare(x)
        self.invoke()
        return self.output()

    def __call__(self, x, max_batch: int = 64) -> np.ndarray:
        """Float32 logits (batch, classes) for a float32 NCHW batch of any size."""
        x = self.check_input(x)
        n = x.shape[0]
        if n == 0:
            raise CareQError("empty input batch")
        step = self.batch or max_batch
        outs = []
        for i in range(0, n, step):
            chunk = x[i:i + step]
            m = chunk.shape[0]
            if self.batch is not None and m < self.batch:  # pad the last chunk of a fixed batch
                chunk = np.concatenate([chunk, np.zeros((self.batch - m, *chunk.shape[1:]), np.float32)])
            outs.append(self.run_once(chunk)[:m])
        return np.concatenate(outs) if len(outs) > 1 else outs[0]

    def _set_input(self, x: np.ndarray) -> None:
        raise NotImplementedError

    def _get_output(self) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.path.name}, input {_fmt_shape(self.input_shape)} "
                f"{self.input_layout} {self.input_dtype}, threads={self.threads})")


def _fmt_shape(shape) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


# ----------------------------------------------------------------------------- ONNX


class OnnxRunner(Runner):
    kind = "onnx"

    def __init__(self, path: Path, threads: int = 2, optimized_model_path: str | Path | None = None,
                 optimization: str = "all", input_quant: tuple[float, int] | None = None,
                 output_quant: tuple[float, int] | None = None, session_config: dict | None = None,
                 profile_prefix: str | Path | None = None):
        super().__init__(path, threads)
        import onnxruntime as ort

        self.metadata = onnx_metadata(path)

        levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        if optimization not in levels:
            raise CareQError(f"unknown onnxruntime optimization level '{optimization}'; "
                             f"choose from {list(levels)}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = levels[optimization]
        # Spinning worker threads keep cores busy between runs; sessions used one after the
        # other (or in parallel benchmarks) would then steal each other's cores.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Entries the artifact says it needs (care_q's QDQ emitter records them, e.g.
        # session.x64quantprecision for exact int8-weight kernels on x86), then the caller's.
        self.session_config = {**file_session_config(self.metadata, path), **(session_config or {})}
        for key, value in self.session_config.items():
            so.add_session_config_entry(str(key), str(value))
        so.log_severity_level = 3
        if optimized_model_path is not None:
            Path(optimized_model_path).parent.mkdir(parents=True, exist_ok=True)
            so.optimized_model_filepath = str(optimized_model_path)
        if profile_prefix is not None:  # onnxruntime's per-node profiler (`end_profiling` returns its file)
            so.enable_profiling = True
            so.profile_file_prefix = str(profile_prefix)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=so,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own pybind exception types
            raise CareQError(f"{path}: onnxruntime could not load it: {_first_line(e)}") from None
        self.optimized_model_path = optimized_model_path
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise CareQError(f"{path}: expected one input, the model has {len(inputs)}: "
                             f"{[i.name for i in inputs]}")
        self._input = inputs[0]
        outputs = self.session.get_outputs()
        self._output = next((o for o in outputs if o.name == "logits"), outputs[0])
        self._set_io_shape(self._input.shape)
        for attr, meta in (("input_dtype", self._input), ("output_dtype", self._output)):
            if meta.type not in _ORT_TYPES:
                raise CareQError(f"{path}: unsupported tensor type {meta.type} for '{meta.name}'")
            setattr(self, attr, np.dtype(_ORT_TYPES[meta.type]))
        for key, given in (("input", input_quant), ("output", output_quant)):
            meta = self._input if key == "input" else self._output
            if getattr(self, f"{key}_dtype").kind not in "iu":
                continue
            qp = given if given is not None else self._meta_quant(key)
            if qp is None:
                raise CareQError(f"{path}: the {key} '{meta.name}' is {getattr(self, f'{key}_dtype')} "
                                 f"and the file has no care_q.{key}_scale / care_q.{key}_zero_point "
                                 f"metadata; pass {key}_quant=(scale, zero_point)")
            setattr(self, f"{key}_quant", (float(qp[0]), int(qp[1])))
        self._binding = self.session.io_binding()
        self._bound = None

    def _meta_quant(self, key: str) -> tuple[float, int] | None:
        scale, zp = self.metadata.get(f"care_q.{key}_scale"), self.metadata.get(f"care_q.{key}_zero_point")
        if scale is None or zp is None:
            return None
        try:
            return float(scale), int(zp)
        except ValueError:
            raise CareQError(f"{self.path}: bad care_q.{key}_scale / _zero_point metadata "
                             f"({scale!r}, {zp!r})") from None

    def _set_input(self, x: np.ndarray) -> None:
        import onnxruntime as ort

        self._bound = ort.OrtValue.ortvalue_from_numpy(x)  # kept alive while bound
        self._binding.bind_ortvalue_input(self._input.name, self._bound)
        self._binding.bind_output(self._output.name, "cpu")

    def invoke(self) -> None:
        if self._bound is None:
            raise CareQError("invoke() before prepare()")
        self.session.run_with_iobinding(self._binding)

    def _get_output(self) -> np.ndarray:
        return np.array(self._binding.get_outputs()[0].numpy())  # own the memory across invokes


def onnx_metadata(path: Path) -> dict[str, str]:
    """The model's metadata_props, read before the session is made (they may configure it)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise CareQError(f"{path}: onnxruntime could not load it: not a readable ONNX model "
                         f"({_first_line(e)})") from None
    return {p.key: p.value for p in model.metadata_props}


EXACT_U8S8_FLAGS = {"avx512_vnni", "avx_vnni"}  # x86 CPUs whose onnxruntime u8s8 kernels accumulate in int32


def file_session_config(metadata: dict[str, str], path: Path) -> dict:
    """The onnxruntime session entries a file's ``care_q.ort_session_config`` metadata asks for, on this CPU.
    ``session.x64quantprecision`` (the exact u8u8 path for x86 CPUs whose u8s8 kernels sum pairs of products
    in saturating int16, VPMADDUBSW) is left out on CPUs with AVX-512 VNNI or AVX-VNNI: onnxruntime's u8s8
    kernels there accumulate in int32 (VPDPBUSD), exact for full-range int8 weights and faster (care_s0 at 224,
    this repository's 2-core VNNI host: the same logits, 11.6 vs 16.1 ms)."""
    from care_q.utils.machine import cpu_flags

    cfg = _json_dict(metadata.get("care_q.ort_session_config"), path)
    if "session.x64quantprecision" in cfg and EXACT_U8S8_FLAGS & cpu_flags():
        cfg.pop("session.x64quantprecision")
    return cfg


def _json_dict(text: str | None, path: Path) -> dict:
    import json

    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise CareQError(f"{path}: care_q.ort_session_config metadata is not a JSON object: {text[:100]!r}")
    return value


# ----------------------------------------------------------------------------- TFLite


def _tflite_quant(detail: dict) -> tuple[float, int] | None:
    q = detail.get("quantization_parameters") or {}
    scales, zps = q.get("scales", np.zeros(0)), q.get("zero_points", np.zeros(0))
    if len(scales) == 0:
        scale, zp = detail.get("quantization", (0.0, 0))
        return (float(scale), int(zp)) if scale else None
    if len(scales) != 1:
        raise CareQError(f"tensor '{detail['name']}' is quantized per channel ({len(scales)} scales); "
                         f"only per-tensor input/output quantization is supported")
    return float(scales[0]), int(zps[0])


class TFLiteRunner(Runner):
    kind = "tflite"

    def __init__(self, path: Path, threads: int = 2, tflite_delegate: str = "xnnpack"):
        super().__init__(path, threads)
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        if tflite_delegate not in TFLITE_DELEGATES:
            raise CareQError(f"unknown TFLite delegate '{tflite_delegate}'; choose from "
                             f"{list(TFLITE_DELEGATES)}")
        self.tflite_delegate = tflite_delegate
        resolver = {"xnnpack": OpResolverType.BUILTIN,  # BUILTIN applies the default XNNPACK delegate
                    "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                    "reference": OpResolverType.BUILTIN_REF}[tflite_delegate]
        log = [""]
        try:
            with capture_stderr() as log:
                self.interpreter = Interpreter(model_path=str(path), num_threads=threads,
                                               experimental_op_resolver_type=resolver)
                # The default delegate is applied lazily, at the first allocation.
                self.interpreter.allocate_tensors()
        except Exception as e:
            native = " ".join(ln.strip() for ln in log[0].splitlines()
                              if ln.strip() and not ln.startswith("INFO:"))
            first = _first_line(e)
            if len(first) > 400:
                first = first[:400] + " ..."
            detail = first + (f" ({native[:300]})" if native else "")
            raise CareQError(f"{path}: the TFLite interpreter could not load it: {detail}") from None
        _forward_log(log[0])
        inputs = self.interpreter.get_input_details()
        if len(inputs) != 1:
            raise CareQError(f"{path}: expected one input, the model has {len(inputs)}")
        self._in = inputs[0]
        outputs = self.interpreter.get_output_details()
        self._out = next((o for o in outputs if "logits" in o["name"]), outputs[0])
        self._set_io_shape([int(d) for d in self._in["shape"]])
        self.input_dtype = np.dtype(self._in["dtype"])
        self.output_dtype = np.dtype(self._out["dtype"])
        if self.input_dtype.kind in "iu":
            self.input_quant = _tflite_quant(self._in)
            if self.input_quant is None:
                raise CareQError(f"{path}: integer input without quantization parameters")
        if self.output_dtype.kind in "iu":
            self.output_quant = _tflite_quant(self._out)
            if self.output_quant is None:
                raise CareQError(f"{path}: integer output without quantization parameters")
        self.delegate_info = delegate_info(self.interpreter, log[0])

    def _set_input(self, x: np.ndarray) -> None:
        self.interpreter.set_tensor(self._in["index"], x)

    def invoke(self) -> None:
        self.interpreter.invoke()

    def _get_output(self) -> np.ndarray:
        return self.interpreter.get_tensor(self._out["index"])


def delegate_info(interpreter, log: str = "") -> dict:
    """How the delegate split a TFLite graph (subgraph 0).

    Returns ``partitions`` (delegate kernels), ``delegated_nodes`` / ``total_nodes`` (original
    ops), ``undelegated_ops`` (op name -> count of ops the CPU kernels still run) and
    ``source`` ('log' when the runtime printed its "Replacing N out of M node(s)" line, else
    'nodes': derived from the interpreter's node list).
    """
    n = interpreter._interpreter.NumNodes()
    names = [interpreter._interpreter.NodeName(i) for i in range(n)]
    outs = [list(interpreter._interpreter.NodeOutputs(i)) for i in range(n)]
    ins = [list(interpreter._interpreter.NodeInputs(i)) for i in range(n)]
    delegates = [i for i in range(n) if names[i] == "DELEGATE"]
    original = [i for i in range(n) if names[i] != "DELEGATE"]
    producer = {t: i for i in original for t in outs[i]}
    # A partition's ops are those reached backwards from its outputs without crossing its inputs.
    delegated: set[int] = set()
    for d in delegates:
        stop = set(ins[d])
        stack = [producer[t] for t in outs[d] if t in producer]
        while stack:
            i = stack.pop()
            if i in delegated:
                continue
            delegated.add(i)
            stack.extend(producer[t] for t in ins[i] if t in producer and t not in stop and t >= 0)
    undelegated = collections.Counter(names[i] for i in original if i not in delegated)
    info = {"delegate": "XNNPACK" if delegates else None, "partitions": len(delegates),
            "delegated_nodes": len(delegated), "total_nodes": len(original),
            "undelegated_ops": dict(undelegated.most_common()), "source": "nodes"}
    m = _REPLACING_RE.search(log or "")
    if m:
        info.update(delegated_nodes=int(m.group(1)), total_nodes=int(m.group(2)),
                    partitions=int(m.group(4)), source="log")
    return info


# ----------------------------------------------------------------------------- loading


def load_runner(path: str | Path, threads: int = 2, tflite_delegate: str = "xnnpack",
                optimized_model_path: str | Path | None = None, ort_optimization: str = "all",
                input_quant: tuple[float, int] | None = None,
                output_quant: tuple[float, int] | None = None,
                session_config: dict | None = None) -> Runner:
    """Load an .onnx or .tflite artifact for inference on CPU.

    Args:
        threads: intra-op threads (onnxruntime) or interpreter threads (TFLite).
        tflite_delegate: 'xnnpack' (default delegate), 'builtin' (optimized kernels, no
            delegate) or 'reference' (reference kernels: slow, the numerics oracle).
        optimized_model_path: ONNX only; where onnxruntime writes the optimized graph.
        ort_optimization: ONNX only; 'all' | 'extended' | 'basic' | 'disable'.
        input_quant, output_quant: ONNX only; (scale, zero_point) of an integer input/output,
            when the file's care_q.{input,output}_{scale,zero_point} metadata does not say.
        session_config: ONNX only; extra onnxruntime session config entries, on top of those
            the file's care_q.ort_session_config metadata asks for.
    """
    path = Path(path)
    kind = KINDS.get(path.suffix.lower())
    if kind is None:
        raise CareQError(f"{path}: not a model artifact; care-q runs .onnx and .tflite files")
    if not path.exists():
        raise CareQError(f"model file not found: {path}")
    if not path.is_file():
        raise CareQError(f"{path} is not a file")
    if threads < 1:
        raise CareQError(f"threads must be >= 1, got {threads}")
    if kind == "onnx":
        return OnnxRunner(path, threads, optimized_model_path=optimized_model_path,
                          optimization=ort_optimization, input_quant=input_quant,
                          output_quant=output_quant, session_config=session_config)
    return TFLiteRunner(path, threads, tflite_delegate=tflite_delegate)


# ----------------------------------------------------------------------------- op census


def tflite_op_census(path: str | Path, subgraph: int = 0) -> dict[str, int]:
    """Op name -> count in a .tflite flatbuffer (builtin names; custom ops by custom code)."""
    from ai_edge_litert import schema_py_generated as schema

    path = Path(path)
    try:
        buf = path.read_bytes()
        model = schema.Model.GetRootAsModel(buf, 0)
        names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
        codes = []
        for i in range(model.OperatorCodesLength()):
            oc = model.OperatorCodes(i)
            code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
            if code == schema.BuiltinOperator.CUSTOM:
                codes.append(f"CUSTOM:{(oc.CustomCode() or b'').decode()}")
            else:
                codes.append(names.get(code, f"BUILTIN_{code}"))
        sg = model.Subgraphs(subgraph)
        census = collections.Counter(codes[sg.Operators(i).OpcodeIndex()]
                                     for i in range(sg.OperatorsLength()))
    except OSError as e:
        raise CareQError(f"{path}: cannot read it: {_first_line(e)}") from None
    except Exception as e:  # a corrupt flatbuffer fails anywhere in the generated accessors
        raise CareQError(f"{path}: not a readable TFLite flatbuffer ({_first_line(e)})") from None
    return dict(census.most_common())


def onnx_op_census(path: str | Path) -> dict[str, int]:
    """Op type -> count in an ONNX graph (main graph; a domain other than ai.onnx is prefixed)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise CareQError(f"{path}: not a readable ONNX model ({_first_line(e)})") from None
    census = collections.Counter(f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                                 for n in model.graph.node)
    return dict(census.most_common())
