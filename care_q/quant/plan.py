"""The per-tensor quantization plan: which settings every tensor gets, and why.

`build_plan(graph, recipe)` marks tensors (role, dtype, method, symmetry) from the recipe's
defaults and rules, then applies what the kernels need:

- data-movement ops (split, concat, head split/merge) share one set of parameters between
  inputs and outputs: TFLite/XNNPACK int8 CONCATENATION, SLICE, RESHAPE and TRANSPOSE
  require it, so the members form one group calibrated on the union of their statistics;
- right-hand sides of int8 BATCH_MATMUL (v, kv, mean(k)) are symmetric (XNNPACK needs zero
  point 0 there);
- the sigmoid inside SiLU has TFLite's fixed output parameters (1/256, -128);
- the classifier head after the global pool stays float, except with the recipe's ``head.dtype:
  int8``: then the LayerNorm output and the logits (minmax) are int8 and the FC static int8.

Each tensor's `why` lists the decisions in order, so the report can say why it got its
settings. A rule that matches no tensor is an error.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from care_q.errors import CareQError
from care_q.graph.roles import Role
from care_q.graph.trace import Graph
from care_q.quant.qtypes import DType, Method, QParams, qparams_from_range
from care_q.quant.recipe import LAST_BLOCK, Recipe

SHARED_OPS = ("split", "cat", "to_heads", "from_heads", "to_tokens", "from_tokens", "retoken")
# ops whose int8 output parameters TFLite fixes: LOGISTIC (1/256, -128), L2_NORMALIZATION (1/128, 0)
FIXED_INT8_OUTPUT = {"sigmoid": QParams((1 / 256,), (-128,), DType.INT8),
                     "l2_norm": QParams((1 / 128,), (0,), DType.INT8)}
FLOAT_ROLES = (Role.HEAD,)
ADD_MIN_SCALE_RATIO = 2.0 ** -10 * 1.001  # XNNPACK's lower input/output scale ratio for int8 ADD, with margin
# with recipe head.dtype int8: LN output and logits int8, and every op of the NPU head
# (care_q.transforms.substitute.npu_head: SiLU, LayerNorm as MEAN/SUB/MUL/RSQRT or L2_NORMALIZATION)
INT8_HEAD_OPS = ("layer_norm", "linear", "silu", "mean_axis", "sub", "mul", "rsqrt", "l2_norm")


@dataclass
class TensorSpec:
    name: str
    role: Role
    op: str
    dtype: DType
    method: Method
    percentile: float
    symmetric: bool = False
    group: str = ""
    fixed: QParams | None = None
    why: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"role": self.role.value, "op": self.op, "dtype": self.dtype.value,
                "method": self.method.value, "symmetric": self.symmetric, "group": self.group,
                "why": self.why}


def role_of(node) -> Role:
    """A tensor's role: the one its producing op gave it in the deploy form (`care_q.graph.ops.Ops.tag`);
    ``input`` for the graph input (no producer), ``conv`` where the op gave none."""
    if node is None:
        return Role.INPUT
    return node.role or Role.CONV


class _UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


@dataclass
class QuantPlan:
    """Every tensor's settings (`specs`), its parameter groups, and what calibration adds."""

    graph: Graph
    recipe: Recipe
    specs: dict[str, TensorSpec]
    groups: dict[str, list[str]]
    qparams: dict[str, QParams] = field(default_factory=dict)          # group root -> parameters
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)  # group root -> observed range
    consts: dict[str, float] = field(default_factory=dict)             # add_const node -> emitted value
    # set by care_q.quant.calibrate.calibrate: the observers of every tensor it saw (name -> observer)
    observers: dict = field(default_factory=dict, repr=False)
    # int8 output parameters of the logits for io=int8 (calibrate; QAT's state)
    output_qparams: QParams | None = None
    # int8 logits: the range's lower end is raised to this (calibrate: the lowest 5th-largest logit)
    logit_floor: float | None = None
    # tensors whose conv / linear weights stay float (care_q.eval.sensitivity.float_except)
    float_weights: frozenset[str] = frozenset()
    # nodes the .tflite computes in float between DEQUANTIZE and QUANTIZE, on their int8 grids
    # (recipe tflite.kernels: measured; care_q.pipeline.kernels); the ONNX QDQ file is unaffected
    float_kernels: frozenset[str] = frozenset()
    _inputs: dict[str, list[str]] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def graph_inputs(self) -> dict[str, list[str]]:
        """Node name -> its input tensor names."""
        if self._inputs is None:
            self._inputs = {n.name: n.inputs for n in self.graph.nodes}
        return self._inputs

    def quantized(self, name: str) -> bool:
        return self.specs[name].dtype != DType.FLOAT

    def qp(self, name: str) -> QParams | None:
        spec = self.specs[name]
        if spec.dtype == DType.FLOAT:
            return None
        return self.qparams.get(spec.group)

    def finalize(self, observers: dict) -> None:
        """Compute every group's parameters from the calibration observers."""
        for root, members in self.groups.items():
            spec = self.specs[root]
            if spec.dtype == DType.FLOAT:
                continue
            if spec.fixed is not None:
                self.qparams[root] = spec.fixed
                continue
            obs = None
            for m in members:
                if m in observers:
                    obs = observers[m] if obs is None else obs.merge(observers[m])
            if obs is None:
                raise CareQError(f"tensor group '{root}' saw no calibration data")
            lo, hi = obs.range(spec.method, spec.dtype, spec.symmetric, spec.percentile)
            floor = self.logit_floor
            if floor is not None and root == self.specs[self.graph.output].group and not spec.symmetric:
                lo = max(lo, min(floor, hi))  # int8 logits: only the top classes need resolution
            self.ranges[root] = (float(obs.min), float(obs.max))
            self.qparams[root] = qparams_from_range(lo, hi, spec.dtype, spec.symmetric)
        self._floor_add_input_scales()
        self.consts = {}
        for n in self.graph.nodes:
            if self.divisor_guard(n) and self.quantized(n.outputs[0]):
                # divisor guard: one LSB (x >= 0, so x + guard never rounds to the zero point;
                # a whole LSB also avoids the rounding ties that 1.5 LSB would create)
                self.consts[n.name] = max(float(n.attrs["value"]), self.qp(n.outputs[0]).scale[0])
        self._reciprocal_ranges()

    def divisor_guard(self, node) -> bool:
        """Whether ``node`` adds the guard to the attention normaliser (``den + eps``)."""
        return node.op == "add_const" and self.specs[node.outputs[0]].role == Role.ATTN_DEN

    def _reciprocal_ranges(self) -> None:
        """1 / x of an int8 divisor (the normaliser, at least one LSB by its guard) never exceeds
        1 / one LSB: its calibrated range is capped there. Calibration sees float divisors below one
        LSB, where the int8 divisor never is (care_s0 proxy: a 5x wider range, logit SQNR vs FP32
        -0.3 dB against the capped one)."""
        for n in self.graph.nodes:
            if n.op != "reciprocal" or not (self.quantized(n.inputs[0]) and self.quantized(n.outputs[0])):
                continue
            qx, spec = self.qp(n.inputs[0]), self.specs[n.outputs[0]]
            cal = self.qparams.get(spec.group)
            cap = 1.0 / qx.scale[0]
            if spec.fixed is not None or cal is None or cal.hi <= cap:
                continue
            self.qparams[spec.group] = qparams_from_range(0.0, cap, spec.dtype, spec.symmetric)
            spec.why.append(f"range capped at 1 / one LSB of the divisor ({cap:.4g}; calibrated {cal.hi:.4g})")

    def _floor_add_input_scales(self) -> None:
        """XNNPACK takes an int8 ADD only when each input's scale is at least 2^-10 of the output's
        (else TFLite's own kernel runs it, splitting the graph). A residual branch that is tiny
        next to its skip path (layer scales near 0, as in a freshly initialised model) falls below
        that; its grid is coarsened to out_scale / 1024: its values are then still resolved to
        1/1024 of an output step, below what the ADD's output can show."""
        for _ in range(3):  # a coarsened group can feed another ADD
            changed = False
            for n in self.graph.nodes:
                if n.op != "add" or len(n.inputs) != 2 or not all(self.quantized(t) for t in (*n.inputs, n.outputs[0])):
                    continue
                floor = self.qp(n.outputs[0]).scale[0] * ADD_MIN_SCALE_RATIO
                for t in n.inputs:
                    qp = self.qp(t)
                    if qp.scale[0] < floor:
                        self.qparams[self.specs[t].group] = QParams((floor,), qp.zero_point, qp.dtype, qp.axis)
                        self.specs[t].why.append(f"scale raised to 2^-10 of {n.name}'s output scale (XNNPACK's "
                                                 f"int8 ADD scale-ratio limit)")
                        changed = True
            if not changed:
                return

    def to_json(self) -> dict:
        out = {}
        for name, spec in self.specs.items():
            d = spec.to_json()
            qp = self.qp(name)
            if qp is not None:
                d["qparams"] = qp.to_json()
                if spec.group in self.ranges:
                    d["observed"] = list(self.ranges[spec.group])
            out[name] = d
        return out


def last_block(graph: Graph) -> str | None:
    """The name of the graph's last CARE block (``stages.S.blocks.B`` of the largest S, then B)."""
    found = {(int(m[1]), int(m[2])) for n in graph.nodes if (m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", n.name))}
    return "stages.{}.blocks.{}".format(*max(found)) if found else None


def build_plan(graph: Graph, recipe: Recipe) -> QuantPlan:
    if any(r.tensors and LAST_BLOCK in r.tensors for r in recipe.rules):
        last = last_block(graph)
        recipe = dataclasses.replace(recipe, rules=tuple(r.for_model(last) for r in recipe.rules))
    producer = {graph.input: None, **{o: n for n in graph.nodes for o in n.outputs}}
    specs: dict[str, TensorSpec] = {}
    hits = {r.index: 0 for r in recipe.rules}
    for name in graph.tensors():
        node = producer[name]
        op = node.op if node else "input"
        base = node.name if node else name
        role = role_of(node)
        spec = TensorSpec(name, role, op, recipe.act_dtype, recipe.method, recipe.percentile,
                          why=[f"default: {recipe.act_dtype.value} {recipe.method.value}"])
        for rule in recipe.rules:
            if rule.matches(base, role, op):
                hits[rule.index] += 1
                for attr in ("dtype", "method", "percentile", "symmetric"):
                    v = getattr(rule, attr)
                    if v is not None:
                        setattr(spec, attr, v)
                spec.why.append(rule.describe())
        if role in FLOAT_ROLES and recipe.head == "int8" and op in INT8_HEAD_OPS:
            spec.dtype = DType.INT8
            if op == "linear":  # the logits: clipping the largest would change the top-1 class
                spec.method = Method.MINMAX
            what = {"linear": "logits (minmax)", "layer_norm": "input of the classifier"}.get(op, f"NPU head {op}")
            spec.why.append(f"head: int8 {what} (recipe head.dtype: int8: a static int8 FULLY_CONNECTED)")
        elif role in FLOAT_ROLES:
            spec.dtype = DType.FLOAT
            spec.why.append("head after the global pool: float on every target")
        fixed = FIXED_INT8_OUTPUT.get(op)
        if fixed is not None and spec.dtype != DType.FLOAT:
            spec.dtype, spec.fixed = DType.INT8, fixed
            spec.why.append(f"{op}: TFLite's fixed int8 output parameters (scale {fixed.scale[0]:g}, "
                            f"zero point {fixed.zero_point[0]})")
        specs[name] = spec
    unused = [r for r in recipe.rules if hits[r.index] == 0]
    if unused:
        raise CareQError(f"{recipe.source}: {unused[0].describe()} matches no tensor of this model")

    # kernel constraints
    uf = _UnionFind()
    for n in graph.nodes:
        if n.op in SHARED_OPS:
            for t in n.inputs + n.outputs:
                if specs[t].dtype == specs[n.outputs[0]].dtype:
                    uf.union(n.outputs[0], t)
        if n.op == "matmul":
            rhs = n.inputs[1]
            specs[rhs].symmetric = True
            specs[rhs].why.append(f"right-hand side of {n.name}: symmetric (int8 BATCH_MATMUL needs zero point 0)")
    for name, spec in specs.items():
        spec.group = uf.find(name)
    groups: dict[str, list[str]] = {}
    for name, spec in specs.items():
        groups.setdefault(spec.group, []).append(name)
    for root, members in groups.items():
        if len(members) > 1:
            sym = any(specs[m].symmetric for m in members)
            fixed = next((specs[m].fixed for m in members if specs[m].fixed is not None), None)
            for m in members:
                if fixed is not None and specs[m].fixed is None:
                    specs[m].fixed = fixed
                    specs[m].why.append(f"shares the fixed output parameters of its group '{root}'")
                if sym and not specs[m].symmetric:
                    specs[m].why.append(f"shares parameters with group '{root}', which is symmetric")
                specs[m].symmetric = sym
                specs[m].dtype = specs[root].dtype
                specs[m].method = specs[root].method
                specs[m].percentile = specs[root].percentile
                if m != root:
                    specs[m].why.append(f"shares parameters with '{root}' (concat/split/reshape)")
    for spec in specs.values():
        if spec.dtype == DType.INT16 and not spec.symmetric:
            spec.symmetric = True
            spec.why.append("int16 activations are symmetric (TFLite 16x8, ONNX int16 QDQ)")
    return QuantPlan(graph, recipe, specs, groups)
