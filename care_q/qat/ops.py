"""What QAT trains: the fake-quant deploy form, with int4 weights and learnable activation scales.

`QATOps(QuantOps)` is `QuantOps(plan, "quant")` (the PyTorch reference of the int8 artifacts,
straight-through rounding) plus two things the PTQ path does not have:

- **int4 weights** (recipe ``weights: {dtype: int4}`` or a rule's ``weight_dtype: int4``):
  the conv's weight is first fake-quantized per output channel to the 15 levels
  ``s4 * [-7, 7]`` with ``s4 = max|w| / 7``, then goes through the int8 weight path
  unchanged. The int8 exporters derive per-channel scales from the weights (``max|w| / 127``),
  so once `bake_int4_weights` writes the int4-grid values into the model they export as
  int8 containers holding ``round(q4 * 127 / 7)``: 15 distinct levels per channel, exactly what
  this module computed during training.
- **learnable activation scales** (recipe ``qat.learn_scales``, LSQ): one parameter per
  quantized tensor group (the plan's shared groups keep sharing), parametrised as
  ``log(scale)`` so an Adam step is a relative change; the zero points stay the calibrated
  ones. The LSQ gradient of the scale is scaled by ``1 / sqrt(features * qmax)`` with
  *features* the per-image element count (so the gradient does not depend on the batch size,
  which keeps multi-process runs equal to single-process ones). `QATNet.write_back` puts the
  learnt scales into ``plan.qparams`` for the exporters.

`QATNet` wraps the deploy-form student and the scales in one `nn.Module` (what DDP wraps,
what the optimizer and the checkpoints see).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn as nn

from care_q.errors import CareQError
from care_q.graph.roles import Role
from care_q.quant.fakequant import QuantOps
from care_q.quant.lowbit import DIVISOR_GUARD_LSB, int4_weight, refresh_divisor_guards, tie_dither
from care_q.quant.plan import QuantPlan
from care_q.quant.qtypes import DType, QParams

# ----------------------------------------------------------------------------- int4 weights


@torch.no_grad()
def bake_int4_weights(plan: QuantPlan, bits: dict[str, int]) -> list[str]:
    """Write the int4-grid weights into the model (in place) so the int8 exporters store them.

    Idempotent. Returns the names of the convs changed.
    """
    per_channel = plan.recipe.weight_granularity == "per_channel"
    done = []
    for n in plan.graph.nodes:
        if n.op == "conv" and bits.get(n.name, 8) == 4:
            n.module.weight.copy_(int4_weight(n.module.weight, per_channel))
            done.append(n.name)
    return done


# ----------------------------------------------------------------------------- ops


class QATOps(QuantOps):
    """`QuantOps(plan, "quant")` with int4 weights where `bits` says and optional learnable scales.

    ``log_scales`` is a 1-D tensor (one entry per group in ``index``: group root -> position);
    None: the plan's calibrated parameters, as the PTQ reference uses them.
    """

    def __init__(self, plan: QuantPlan, bits: dict[str, int] | None = None,
                 log_scales: torch.Tensor | None = None, index: dict[str, int] | None = None):
        super().__init__(plan, "quant")
        self.bits = bits or {}
        self.log_scales = log_scales
        self.index = index or {}

    def _learnt(self, name: str) -> tuple[int, QParams] | None:
        if self.log_scales is None:
            return None
        spec = self.plan.specs.get(name)
        if spec is None or spec.dtype == DType.FLOAT:
            return None
        i = self.index.get(spec.group)
        return None if i is None else (i, self.plan.qparams[spec.group])

    def _out(self, name, y, op=""):
        learnt = self._learnt(name)
        if learnt is None:
            return super()._out(name, y, op)
        i, qp = learnt
        scale = torch.exp(self.log_scales[i:i + 1])
        zp = torch.full((1,), float(qp.zero_point[0]), device=y.device)
        grad_factor = 1.0 / math.sqrt(max(y[0].numel(), 1) * qp.qmax)
        return torch._fake_quantize_learnable_per_tensor_affine(y, scale, zp, qp.qmin, qp.qmax, grad_factor)

    def add_const(self, name, x, value):
        learnt = self._learnt(name)
        if learnt is None:
            return super().add_const(name, x, value)
        if self.plan.specs[name].role == Role.ATTN_DEN:  # the divisor guard, with the current (learnt) scale
            value = max(float(value), DIVISOR_GUARD_LSB * float(torch.exp(self.log_scales[learnt[0]].detach())))
        return self._out(name, x + value)

    def conv(self, name, x, conv):
        if self.bits.get(name) != 4:
            return super().conv(name, x, conv)
        w4 = int4_weight(conv.weight, self.per_channel)
        view = SimpleNamespace(weight=w4, bias=conv.bias, stride=conv.stride, padding=conv.padding,
                               dilation=conv.dilation, groups=conv.groups)
        return super().conv(name, x, view)


# ----------------------------------------------------------------------------- module


class QATNet(nn.Module):
    """The trained module: the deploy-form student and (LSQ) the log activation scales.

    ``forward(x)`` is the fake-quant model. The plan's graph holds references to the student's
    conv modules, so the exporters read the trained weights.
    """

    def __init__(self, student: nn.Module, plan: QuantPlan, bits: dict[str, int], learn_scales: bool):
        super().__init__()
        self.student = student
        self.plan = plan
        self.bits = dict(bits)
        self.roots = [r for r in plan.groups
                      if plan.specs[r].dtype != DType.FLOAT and plan.specs[r].fixed is None and r in plan.qparams]
        self.index = {r: i for i, r in enumerate(self.roots)} if learn_scales else {}
        if learn_scales:
            init = [math.log(plan.qparams[r].scale[0]) for r in self.roots]
            self.log_scales = nn.Parameter(torch.tensor(init, dtype=torch.float32))
        else:
            self.log_scales = None

    def ops(self) -> QATOps:
        return QATOps(self.plan, self.bits, self.log_scales, self.index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x, self.ops())

    def qparams_state(self) -> dict:
        return qparams_to_state(self.plan)

    @torch.no_grad()
    def write_back(self) -> dict[str, float]:
        """Learnt scales -> ``plan.qparams`` (zero points unchanged); returns group -> new/old scale.

        Each learnt scale is moved by a fixed pseudo-random factor within ``1 +- TIE_DITHER``
        (from the group's name): LSQ tends to settle scales where frequent values sit exactly on
        a rounding tie of their tensor (its gradient flips sign there), e.g. an int8 ADD whose
        output scale satisfies ``4 s_a + s_b = 2.75 s_out``. At an exact tie the reference and the
        runtimes' fixed-point arithmetic round differently; the dither moves every such tie about
        1e-4 LSB away, far beyond float round-off, at no cost in accuracy.
        """
        if self.log_scales is None:
            return {}
        ratios = {}
        for r, i in self.index.items():
            old = self.plan.qparams[r]
            new = float(torch.exp(self.log_scales[i]).double()) * tie_dither(r)
            self.plan.qparams[r] = QParams((new,), old.zero_point, old.dtype, old.axis)
            ratios[r] = new / old.scale[0]
        refresh_divisor_guards(self.plan)
        return ratios


# ----------------------------------------------------------------------------- (de)serialising the plan


def _qp_to_dict(qp: QParams) -> dict:
    return {"scale": [float(s) for s in qp.scale], "zero_point": [int(z) for z in qp.zero_point],
            "dtype": qp.dtype.value, "axis": qp.axis}


def _qp_from_dict(d: dict) -> QParams:
    return QParams(tuple(d["scale"]), tuple(d["zero_point"]), DType(d["dtype"]), d.get("axis"))


def qparams_to_state(plan: QuantPlan) -> dict:
    """The plan's calibrated state as plain containers (loadable with ``weights_only=True``)."""
    out = plan.output_qparams
    return {"qparams": {k: _qp_to_dict(v) for k, v in plan.qparams.items()},
            "output_qparams": _qp_to_dict(out) if out is not None else None,
            "consts": {k: float(v) for k, v in plan.consts.items()}}


def qparams_from_state(plan: QuantPlan, state: dict) -> None:
    missing = sorted(set(plan.qparams) ^ set(state["qparams"])) if plan.qparams else []
    if missing:
        raise CareQError(f"saved quantization parameters do not fit this plan (e.g. group '{missing[0]}')")
    expected = {r for r, s in ((r, plan.specs[r]) for r in plan.groups) if s.dtype != DType.FLOAT}
    unknown = sorted(set(state["qparams"]) - expected)
    if unknown:
        raise CareQError(f"saved quantization parameters name group '{unknown[0]}', which this plan does not have")
    plan.qparams = {k: _qp_from_dict(v) for k, v in state["qparams"].items()}
    if state.get("output_qparams") is not None:
        plan.output_qparams = _qp_from_dict(state["output_qparams"])
    plan.consts.clear()
    plan.consts.update(state.get("consts", {}))
