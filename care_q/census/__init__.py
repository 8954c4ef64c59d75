"""Delegate-aware compatibility census: what runs where, and why, for a .tflite or .onnx artifact.

    from care_q.census import check
    report = check("out/care_s0_int8.tflite", targets=("xnnpack", "nnapi:FL6", "edgetpu", "ethos-u55-128"))
    report.summary_lines(); report.to_dict(); report.render(rich_console)

Static rules per target (`rules_xnnpack`, `rules_nnapi`, `rules_edgetpu`, each citing its
source), TFLite's partitioning (`partitions`), MACs from conv / fully-connected / batch-matmul
shapes (`macs`); the XNNPACK verdict is checked against ai-edge-litert (`groundtruth`). Ethos-U
targets (any Vela accelerator config) are not predicted but compiled by Arm's Vela (`vela`):
`TargetResult.source` is "compiled" for them and "rules" for the others. For .onnx,
onnxruntime's own optimized graph says which QDQ groups became integer kernels (`onnx_fusion`).
"""

from care_q.census.api import TARGETS, check, parse_targets
from care_q.census.report import CensusReport, TargetResult
from care_q.census.vela import accelerator_configs, is_vela_target

__all__ = ["TARGETS", "CensusReport", "TargetResult", "accelerator_configs", "check", "is_vela_target",
           "parse_targets"]
