"""Recipes: YAML data validated against one typed schema.

Every key a recipe may set is declared here. Unknown keys, wrong types and rules that match
no tensor are errors that name the file, the field and its line, before any work is done.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path

import yaml

from care_q.errors import CareQError
from care_q.graph.roles import Role
from care_q.paths import RECIPES_DIR, yaml_files
from care_q.quant.qtypes import DType, Method

TARGETS = ("tflite", "onnx")


# In a rule's ``tensors`` regex: the model's last CARE block (e.g. stages.3.blocks.3 in care_s0), the
# only one whose MLP output reaches the head without a residual connection.
LAST_BLOCK = "{last_block}"


@dataclass(frozen=True)
class Rule:
    """Settings for the tensors a rule selects (by role, op kind or name regex); last match wins."""

    index: int
    line: int | None
    roles: tuple[Role, ...] = ()
    ops: tuple[str, ...] = ()
    tensors: str | None = None
    dtype: DType | None = None
    method: Method | None = None
    percentile: float | None = None
    symmetric: bool | None = None
    weight_bits: int | None = None  # `weight_dtype: int4` on a rule (QAT only): the selected convs' weights

    def matches(self, name: str, role: Role, op: str) -> bool:
        if self.roles and role not in self.roles:
            return False
        if self.ops and op not in self.ops:
            return False
        if self.tensors is not None and not re.fullmatch(self.tensors, name):
            return False
        return True

    def for_model(self, last_block: str | None) -> Rule:
        """The rule with `LAST_BLOCK` in ``tensors`` replaced by the model's last block (escaped)."""
        if self.tensors is None or LAST_BLOCK not in self.tensors:
            return self
        if last_block is None:
            raise CareQError(f"{self.describe()} names {LAST_BLOCK}, but this model has no CARE blocks")
        return dataclasses.replace(self, tensors=self.tensors.replace(LAST_BLOCK, re.escape(last_block)))

    def describe(self) -> str:
        sel = []
        if self.roles:
            sel.append("roles=" + ",".join(r.value for r in self.roles))
        if self.ops:
            sel.append("ops=" + ",".join(self.ops))
        if self.tensors:
            sel.append(f"tensors=/{self.tensors}/")
        where = f" (line {self.line})" if self.line else ""
        return f"rule {self.index}{where} [{' '.join(sel)}]"


@dataclass(frozen=True)
class QATSettings:
    epochs: float = 1.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 64
    distill_weight: float = 1.0
    temperature: float = 1.0
    learn_scales: bool = False
    freeze_bn: bool = True
    ce_weight: float = 1.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    checkpoint_every: int = 100
    scale_lr: float | None = None


RECON_LEARNABLES = ("rounding", "act_scales", "biases", "substitution")
RECON_DEFAULT_LEARN = ("rounding", "act_scales")
RECON_TARGETS = ("original", "substituted")


@dataclass(frozen=True)
class ReconSettings:
    """A PTQ recipe's ``reconstruction:`` section (care_q.quant.reconstruction): per unit (the stem,
    each downsample, each CARE block, the head) ``iterations`` Adam steps on batches of
    ``batch_size`` calibration images, minimising the unit's fake-quant vs FP32 output error.

    ``learn``: ``rounding`` (AdaRound: each weight rounds up or down, soft during the steps, with a
    regulariser of weight ``round_weight`` whose exponent anneals from ``beta_start`` to
    ``beta_end`` after the first ``warmup`` fraction of the steps, hard at the end) and/or
    ``act_scales`` (LSQ step sizes of the unit's activations), ``biases`` (the unit's conv / linear
    biases, in float) and/or ``substitution`` (the float parameters of the recipe's op
    substitutions: the NPU attention's kernel affine and output scales); float parameters move at
    ``lr_float`` relative to their mean magnitude. ``drop_prob``: QDrop, each activation element
    keeps its float value with this probability during the steps. ``target``: whose unit outputs
    are fitted, the ``original`` model's (before the recipe's substitutions; the same as the
    deploy form for recipes without them) or the ``substituted`` deploy form's.
    ``images``: at most this many calibration images (default: all).

    ``network_iterations`` (default 0: none): after the units, Adam steps on the whole model, its
    fake-quant logits against the FP32 logits (BRECQ's blocks widened to the network, as NWQ does),
    learning every activation step size (``network_lr_scales``, on log scales), the conv / linear
    biases (``network_lr_biases``, relative to each one's mean magnitude) and the int8 weights in
    float through the exporters' rounding (``network_lr_weights``, relative to each one's mean
    per-channel step); a rate of 0 leaves that part alone. Kept only when the logit error on the
    calibration images falls."""

    iterations: int = 300
    batch_size: int = 32
    lr_rounding: float = 1e-2
    lr_scales: float = 1e-3
    learn: tuple[str, ...] = RECON_DEFAULT_LEARN
    lr_float: float = 1e-3
    target: str = "original"
    drop_prob: float = 0.5
    round_weight: float = 0.01
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    images: int | None = None
    network_iterations: int = 0
    network_lr_scales: float = 3e-3
    network_lr_biases: float = 1e-2
    network_lr_weights: float = 5e-3

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Recipe:
    name: str
    kind: str = "ptq"
    description: str = ""
    targets: tuple[str, ...] = TARGETS
    io: str = "float"
    weight_dtype: DType = DType.INT8
    weight_bits: int = 8  # 4: int4 values simulated in fake quantization, stored in int8 containers
    weight_granularity: str = "per_channel"
    act_dtype: DType = DType.INT8
    method: Method = Method.PERCENTILE
    percentile: float = 99.99
    batch_size: int = 32
    gelu: str = "exact"
    attention: str = "exact"  # npu: care_q.transforms.substitute.npu_attention (ops every NPU maps)
    head_form: str = "exact"  # npu: care_q.transforms.substitute.npu_head (int8 SiLU + LayerNorm from NPU ops)
    # the NPU graph's normalisers: l2 (L2_NORMALIZATION), l2den (L2_NORMALIZATION of the numerator with the
    # weighted denominator appended), rsqrt (MUL, MEAN, RSQRT, MUL) or rsqrtden (num RSQRT(den) RSQRT(den))
    npu_normaliser: str = "l2"
    cross_layer_equalization: bool = False
    bias_correction: bool = False
    # the attention output as num * (1 / den) instead of num / den (care_q.transforms.deploy.reciprocal_normaliser)
    reciprocal_normaliser: bool = False
    rules: tuple[Rule, ...] = ()
    qat: QATSettings | None = None
    source: str = "<built-in>"
    head: str = "float"  # int8: the classifier's LayerNorm output, weights and logits int8 (static int8 FC)
    # an int8 head's logits range: top5 starts at the lowest 5th-largest calibration logit (finer steps
    # where top-1..5 are decided, the low logits clipped); full: min/max (every logit kept: logit SQNR)
    head_logits: str = "top5"
    # builtin: depthwise convs of more than 25 taps (CARE's 7x7) run in TFLite's own int8 kernel, not
    # XNNPACK's (a runtime-made bias keeps XNNPACK off them); see care_q.quant.layout_policy.tflite_builtin_dwconv
    tflite_large_dwconv: str = "xnnpack"
    # measured: int8 elementwise ops (DIV, GELU, ELU, ADD, MUL, SUB) run as float islands in the .tflite
    # (DEQUANTIZE, the float op, QUANTIZE: the same grids) where one-op timings say the island is faster
    # (care_q.pipeline.kernels; a phone's profile with care-q ptq --kernel-profile); int8: every op int8
    tflite_kernels: str = "int8"
    reconstruction: ReconSettings | None = None  # PTQ only: see ReconSettings

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "source": self.source, "targets": list(self.targets),
                "io": self.io, "weights": {"dtype": self.weight_dtype.value,
                                          "granularity": self.weight_granularity, "bits": self.weight_bits},
                "activations": {"dtype": self.act_dtype.value, "method": self.method.value,
                                "percentile": self.percentile},
                "substitutions": {"gelu": self.gelu} | ({"attention": self.attention} if self.attention != "exact" else {})
                | ({"head": self.head_form} if self.head_form != "exact" else {}),
                "transforms": {"cross_layer_equalization": self.cross_layer_equalization,
                               "bias_correction": self.bias_correction}
                | ({"reciprocal_normaliser": True} if self.reciprocal_normaliser else {}),
                "rules": [r.describe() for r in self.rules]} | self._extra_json()

    def _extra_json(self) -> dict:
        extra = {}
        if self.weight_bits != 8 or any(r.weight_bits for r in self.rules):
            extra["weight_bits"] = {"default": self.weight_bits,
                                    "rules": {r.describe(): r.weight_bits for r in self.rules if r.weight_bits}}
        if self.qat is not None:
            extra["qat"] = dict(self.qat.__dict__)
        if self.head != "float":
            extra["head"] = {"dtype": self.head, "logits": self.head_logits}
        if "npu" in (self.attention, self.head_form):
            extra["npu"] = {"normaliser": self.npu_normaliser}
        if self.tflite_large_dwconv != "xnnpack" or self.tflite_kernels != "int8":
            extra["tflite"] = {"large_dwconv": self.tflite_large_dwconv} | (
                {"kernels": self.tflite_kernels} if self.tflite_kernels != "int8" else {})
        if self.reconstruction is not None:
            extra["reconstruction"] = self.reconstruction.to_json()
        return extra


# ----------------------------------------------------------------------------- parsing

SCHEMA = {
    "name": str, "kind": ("ptq", "qat"), "description": str, "targets": [TARGETS], "io": ("float", "int8", "uint8"),
    "weights": {"dtype": ("int8", "int4"), "granularity": ("per_channel", "per_tensor"), "bits": (7, 8)},
    "activations": {"dtype": ("int8", "int16"), "method": tuple(m.value for m in Method),
                    "percentile": float},
    "calibration": {"batch_size": int},
    "transforms": {"deploy": bool, "cross_layer_equalization": bool, "bias_correction": bool,
                   "reciprocal_normaliser": bool},
    "substitutions": {"gelu": ("exact", "sigmoid"), "attention": ("exact", "npu"), "head": ("exact", "npu")},
    "npu": {"normaliser": ("l2", "l2den", "rsqrt", "rsqrtden")},
    "head": {"dtype": ("float", "int8"), "logits": ("top5", "full")},
    "tflite": {"large_dwconv": ("xnnpack", "builtin"), "kernels": ("int8", "measured")},
    "rules": "rules",
    "qat": {"epochs": float, "lr": float, "weight_decay": float, "batch_size": int,
            "distill_weight": float, "temperature": float, "learn_scales": bool, "freeze_bn": bool,
            "ce_weight": float, "schedule": ("cosine", "constant"), "warmup_steps": int, "checkpoint_every": int,
            "scale_lr": float},
    "reconstruction": {"iterations": int, "batch_size": int, "lr_rounding": float, "lr_scales": float,
                       "lr_float": float, "target": RECON_TARGETS,
                       "learn": [RECON_LEARNABLES], "drop_prob": float, "round_weight": float, "warmup": float,
                       "beta_start": float, "beta_end": float, "images": int, "network_iterations": int,
                       "network_lr_scales": float, "network_lr_biases": float, "network_lr_weights": float},
}
RULE_SCHEMA = {"roles": [tuple(r.value for r in Role)], "ops": [str], "tensors": str,
               "dtype": ("int8", "int16", "float"), "method": tuple(m.value for m in Method),
               "percentile": float, "symmetric": bool, "weight_dtype": ("int8", "int4")}


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader, node):
    mapping = loader.construct_mapping(node, deep=True)
    mapping["__line__"] = node.start_mark.line + 1
    mapping["__lines__"] = {k.value: k.start_mark.line + 1 for k, _ in node.value}
    return mapping


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _check(value, spec, where: str, src: str, line: int | None):
    at = f"{src}:{line}: " if line else f"{src}: "
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise CareQError(f"{at}'{where}' must be a mapping")
        lines = value.get("__lines__", {})
        for k, v in value.items():
            if k.startswith("__"):
                continue
            if k not in spec:
                raise CareQError(f"{src}:{lines.get(k, '?')}: unknown field '{where}.{k}'; allowed: "
                                 f"{', '.join(sorted(spec))}".replace("'.", "'"))
            _check(v, spec[k], f"{where}.{k}" if where else k, src, lines.get(k, line))
        return
    if spec == "rules":
        if not isinstance(value, list):
            raise CareQError(f"{at}'rules' must be a list of mappings")
        for i, r in enumerate(value):
            _check(r, RULE_SCHEMA, f"rules[{i}]", src, r.get("__line__") if isinstance(r, dict) else line)
            sel = [k for k in ("roles", "ops", "tensors") if k in r]
            if not sel:
                raise CareQError(f"{src}:{r.get('__line__', '?')}: rules[{i}] selects nothing: give roles, "
                                 f"ops or tensors")
            if "tensors" in r:
                try:
                    re.compile(r["tensors"])
                except re.error as e:
                    raise CareQError(f"{src}:{r['__line__']}: rules[{i}].tensors is not a valid regex: {e}") \
                        from None
        return
    if isinstance(spec, list):
        if not isinstance(value, list):
            value = [value] if isinstance(value, str) else value
        if not isinstance(value, list):
            raise CareQError(f"{at}'{where}' must be a list")
        for v in value:
            _check(v, spec[0], where, src, line)
        return
    if isinstance(spec, tuple):
        if value not in spec:
            raise CareQError(f"{at}'{where}' is {value!r}; allowed: {', '.join(map(str, spec))}")
        return
    if spec is float and isinstance(value, int) and not isinstance(value, bool):
        return
    if not isinstance(value, spec) or (spec is int and isinstance(value, bool)):
        raise CareQError(f"{at}'{where}' must be {spec.__name__}, got {type(value).__name__} {value!r}")


def _listify(v):
    return tuple(v) if isinstance(v, list) else (v,)


def parse_recipe(text: str, source: str = "<string>") -> Recipe:
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 (SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise CareQError(f"{source}{line}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise CareQError(f"{source}: a recipe is a YAML mapping")
    _check(data, SCHEMA, "", source, None)
    if "name" not in data:
        raise CareQError(f"{source}: missing required field 'name'")
    w, a = data.get("weights", {}), data.get("activations", {})
    rules = []
    for i, r in enumerate(data.get("rules", [])):
        rules.append(Rule(
            index=i, line=r.get("__line__"),
            roles=tuple(Role(x) for x in _listify(r["roles"])) if "roles" in r else (),
            ops=_listify(r["ops"]) if "ops" in r else (),
            tensors=r.get("tensors"),
            dtype=DType(r["dtype"]) if "dtype" in r else None,
            method=Method(r["method"]) if "method" in r else None,
            percentile=float(r["percentile"]) if "percentile" in r else None,
            symmetric=r.get("symmetric"),
            weight_bits=4 if r.get("weight_dtype") == "int4" else None))
    kind = data.get("kind", "ptq")
    qat = None
    if "qat" in data:
        if kind != "qat":
            raise CareQError(f"{source}:{data['__lines__']['qat']}: a 'qat' section needs kind: qat")
        qat = QATSettings(**{k: v for k, v in data["qat"].items() if not k.startswith("__")})
    elif kind == "qat":
        qat = QATSettings()
    recon = _reconstruction(data, kind, source)
    # 7 bits: weights in [-63, 63], onnxruntime's fast exact u8s8 path on x86 CPUs without VNNI
    weight_bits = 4 if w.get("dtype") == "int4" else w.get("bits", 8)
    int4 = [r for r in rules if r.weight_bits == 4]
    if kind != "qat" and recon is None and (weight_bits == 4 or int4):
        line = w["__lines__"]["dtype"] if weight_bits == 4 else int4[0].line
        raise CareQError(f"{source}:{line}: int4 weights are simulated in fake quantization and need training "
                         f"or reconstruction: they are allowed in QAT recipes only (kind: qat), or in a PTQ "
                         f"recipe with a 'reconstruction' section")
    tr = data.get("transforms", {})
    if tr.get("deploy") is False:
        raise CareQError(f"{source}:{tr['__lines__']['deploy']}: transforms.deploy: false is not supported: "
                         f"quantization always starts from the deploy form (BatchNorm folded, heads merged), "
                         f"which every exporter emits")
    for key in ("cross_layer_equalization", "bias_correction"):
        if kind == "qat" and tr.get(key):
            raise CareQError(f"{source}:{tr['__lines__'][key]}: transforms.{key} is a post-training transform; "
                             f"a QAT recipe (kind: qat) trains the weights and biases instead")
    large_dw = data.get("tflite", {}).get("large_dwconv", "xnnpack")
    if large_dw == "builtin" and data.get("substitutions", {}).get("attention") == "npu":
        raise CareQError(f"{source}:{data['tflite']['__lines__']['large_dwconv']}: tflite.large_dwconv: builtin "
                         f"gives those convs a runtime-made bias, which NPU delegates do not take; an NPU recipe "
                         f"(substitutions.attention: npu) needs xnnpack")
    if data.get("tflite", {}).get("kernels", "int8") == "measured":
        line = data["tflite"]["__lines__"]["kernels"]
        if data.get("substitutions", {}).get("attention") == "npu":
            raise CareQError(f"{source}:{line}: tflite.kernels: measured puts float islands in the graph; an NPU "
                             f"recipe (substitutions.attention: npu) must stay fully int8")
        if kind == "qat":
            raise CareQError(f"{source}:{line}: tflite.kernels: measured is chosen after calibration by care-q ptq; "
                             f"it is not available in QAT recipes (kind: qat)")
    if tr.get("reciprocal_normaliser") and data.get("substitutions", {}).get("attention") == "npu":
        raise CareQError(f"{source}:{tr['__lines__']['reciprocal_normaliser']}: transforms.reciprocal_normaliser "
                         f"rewrites the exact attention's division; the NPU attention (substitutions.attention: npu) "
                         f"has none (its normaliser is an L2 normalisation)")
    _check_npu(data, source)
    pct = float(a.get("percentile", 99.99))
    if not 50 < pct <= 100:
        raise CareQError(f"{source}: activations.percentile must be in (50, 100], got {pct}")
    return Recipe(
        name=data["name"], kind=kind, description=data.get("description", ""),
        targets=_listify(data.get("targets", list(TARGETS))), io=data.get("io", "float"),
        weight_dtype=DType.INT8, weight_bits=weight_bits, weight_granularity=w.get("granularity", "per_channel"),
        act_dtype=DType(a.get("dtype", "int8")), method=Method(a.get("method", "percentile")),
        percentile=pct, batch_size=data.get("calibration", {}).get("batch_size", 32),
        gelu=data.get("substitutions", {}).get("gelu", "exact"),
        attention=data.get("substitutions", {}).get("attention", "exact"),
        head_form=data.get("substitutions", {}).get("head", "exact"),
        npu_normaliser=data.get("npu", {}).get("normaliser", "l2"),
        cross_layer_equalization=tr.get("cross_layer_equalization", False),
        bias_correction=tr.get("bias_correction", False),
        reciprocal_normaliser=tr.get("reciprocal_normaliser", False),
        rules=tuple(rules), qat=qat, source=source, head=data.get("head", {}).get("dtype", "float"),
        head_logits=data.get("head", {}).get("logits", "top5"),
        tflite_large_dwconv=large_dw, tflite_kernels=data.get("tflite", {}).get("kernels", "int8"),
        reconstruction=recon)


def _check_npu(data: dict, source: str) -> None:
    """The NPU head is int8 (``head.dtype: int8``); ``npu:`` applies to the NPU substitutions only."""
    sub = data.get("substitutions", {})
    if sub.get("head") == "npu" and data.get("head", {}).get("dtype") != "int8":
        raise CareQError(f"{source}:{sub['__lines__']['head']}: substitutions.head: npu is the int8 NPU head; it "
                         f"needs head.dtype: int8")
    if "npu" in data and "npu" not in (sub.get("attention"), sub.get("head")):
        raise CareQError(f"{source}:{data['__lines__']['npu']}: the 'npu' section sets the NPU graph's normalisers; "
                         f"it needs substitutions.attention: npu or substitutions.head: npu")


def _reconstruction(data: dict, kind: str, source: str) -> ReconSettings | None:
    """The validated ``reconstruction:`` section (None without one)."""
    if "reconstruction" not in data:
        return None
    sec = data["reconstruction"]
    lines = sec.get("__lines__", {})

    def at(key: str) -> str:
        return f"{source}:{lines.get(key, data['__lines__']['reconstruction'])}"

    if kind != "ptq":
        raise CareQError(f"{at('')}: a 'reconstruction' section is post-training (kind: ptq); a QAT recipe "
                         f"trains the weights and scales instead")
    vals = {k: v for k, v in sec.items() if not k.startswith("__")}
    if "learn" in vals:
        vals["learn"] = _listify(vals["learn"])
    for key in ("iterations", "batch_size", "images"):
        if key in vals and vals[key] <= 0:
            raise CareQError(f"{at(key)}: reconstruction.{key} must be positive, got {vals[key]}")
    for key in ("lr_rounding", "lr_scales", "lr_float", "beta_start", "beta_end"):
        if key in vals and not vals[key] > 0:
            raise CareQError(f"{at(key)}: reconstruction.{key} must be positive, got {vals[key]}")
    for key, lo, hi in (("drop_prob", 0.0, 1.0), ("warmup", 0.0, 1.0)):
        if key in vals and not lo <= vals[key] < hi:
            raise CareQError(f"{at(key)}: reconstruction.{key} must be in [{lo:g}, {hi:g}), got {vals[key]}")
    if vals.get("network_iterations", 0) < 0:
        raise CareQError(f"{at('network_iterations')}: reconstruction.network_iterations must be >= 0 (0: no network "
                         f"stage), got {vals['network_iterations']}")
    for key in ("network_lr_scales", "network_lr_biases", "network_lr_weights"):
        if key in vals and vals[key] < 0:
            raise CareQError(f"{at(key)}: reconstruction.{key} must be >= 0 (0: not learnt), got {vals[key]}")
    if vals.get("network_iterations") and not any(vals.get(k, getattr(ReconSettings, k)) for k in
                                                  ("network_lr_scales", "network_lr_biases", "network_lr_weights")):
        raise CareQError(f"{at('network_iterations')}: reconstruction.network_iterations is set but every network_lr_* "
                         f"is 0: the network stage would learn nothing")
    if "round_weight" in vals and vals["round_weight"] < 0:
        raise CareQError(f"{at('round_weight')}: reconstruction.round_weight must be >= 0, got {vals['round_weight']}")
    if "substitution" in vals.get("learn", ()) and data.get("substitutions", {}).get("attention") != "npu":
        raise CareQError(f"{at('learn')}: reconstruction.learn 'substitution' learns the NPU attention's kernel and "
                         f"output scales; it needs substitutions.attention: npu")
    return ReconSettings(**vals)


def list_recipes() -> list[Traversable]:
    """The recipes shipped in the package (``care_q/recipes/*.yaml``), sorted by name."""
    return yaml_files(RECIPES_DIR)


def load_recipe(name_or_path: str | Path | Traversable) -> Recipe:
    """A recipe by name (``care_q/recipes/<name>.yaml``, package data) or by path."""
    p = name_or_path if isinstance(name_or_path, Traversable) else Path(name_or_path)
    if Path(p.name).suffix not in (".yaml", ".yml"):
        p = RECIPES_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        known = ", ".join(x.name.removesuffix(".yaml") for x in list_recipes())
        raise CareQError(f"unknown recipe '{name_or_path}' (no file {p}); known recipes: {known}")
    return parse_recipe(p.read_text(), str(p))
