"""Quantization-aware training (QAT): fine-tuning with fake quantization in the loop.

- `care_q.qat.qat(...)`: the pipeline behind `care-q qat` (see `care_q.qat.pipeline`);
  `load_qat(OUT/last.pt)` rebuilds a run's fake-quant model;
- `QATOps` / `QATNet`: the trained fake-quant model, int4 weights and learnable (LSQ) scales
  (see `care_q.qat.ops`);
- `Dist`: torchrun / DDP plumbing (see `care_q.qat.distributed`).
"""

from care_q.qat.distributed import Dist
from care_q.qat.ops import QATNet, QATOps, bake_int4_weights
from care_q.qat.pipeline import QATRun, build_student, distill_loss, load_qat, qat
from care_q.quant.lowbit import weight_bits_of

__all__ = ["Dist", "QATNet", "QATOps", "QATRun", "bake_int4_weights", "build_student", "distill_loss", "load_qat", "qat",
           "weight_bits_of"]

import sys  # noqa: E402
import types  # noqa: E402


class _CallableModule(types.ModuleType):
    """Lets `care_q.qat(...)` call `care_q.qat.qat(...)` (the package attribute is this module)."""

    def __call__(self, *args, **kwargs):
        return qat(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
