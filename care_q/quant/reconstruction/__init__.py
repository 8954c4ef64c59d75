"""Reconstruction PTQ: AdaRound rounding and LSQ step sizes learnt unit by unit (BRECQ, QDrop)
on the calibration images, written back into the plan and the deploy form's weights (see `run`)."""

from care_q.quant.reconstruction.run import reconstruct, resolve_device
from care_q.quant.reconstruction.units import Unit, units_of

__all__ = ["Unit", "reconstruct", "resolve_device", "units_of"]
