"""Delegate-aware compatibility census: what runs where, and why, for a .tflite or .onnx artifact.

    from care_q.census import check
    report = check("out/care_s0_int8.tflite", targets=("xnnpack", "nnapi:FL6", "edgetpu"))
    report.summary_lines(); report.to_dict(); report.render(rich_console)

Static rules per target (`rules_xnnpack`, `rules_nnapi`, `rules_edgetpu`, each citing its
source), TFLite's partitioning (`partitions`), MACs from conv / fully-connected / batch-matmul
shapes (`macs`); the XNNPACK verdict is checked against ai-edge-litert (`groundtruth`). For
.onnx, onnxruntime's own optimized graph says which QDQ groups became integer kernels
(`onnx_fusion`).
"""

from care_q.census.api import TARGETS, check, parse_targets
from care_q.census.report import CensusReport, TargetResult

__all__ = ["TARGETS", "CensusReport", "TargetResult", "check", "parse_targets"]
