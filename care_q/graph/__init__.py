"""The deploy form's op vocabulary and its interpretations (float, recording, fake-quant)."""

from care_q.graph.ops import FloatOps, Ops

__all__ = ["FloatOps", "Ops"]
