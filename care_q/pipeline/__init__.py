"""One preparation pipeline for PTQ, QAT and analysis, and one place that emits, verifies and
censuses artifacts. See `prepare` and `artifacts`."""

from care_q.pipeline.config import MIN_AGREEMENT, ExportConfig, PrepareConfig
from care_q.pipeline.prepare import Built, Prepared, build, calib_tensor, held_out_images, prepare

__all__ = ["MIN_AGREEMENT", "Built", "ExportConfig", "PrepareConfig", "Prepared", "build", "calib_tensor",
           "held_out_images", "prepare"]
