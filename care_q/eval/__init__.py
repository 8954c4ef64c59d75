"""Evaluation suite: accuracy of artifacts against FP32, layer sensitivity, baselines, reports.

    from care_q.eval import evaluate, sensitivity, run_baselines, write_report

- `evaluate` (evaluate.py): top-1/top-5 of the FP32 model and every artifact on the same images,
  agreement with FP32, drop in points, the biggest disagreements;
- `sensitivity` (sensitivity.py): per-tensor SQNR and the effect of quantizing one layer group
  at a time (or all but one), ranked;
- `run_baselines` (baselines.py): onnxruntime quantize_static, NNCF and ai-edge-quantizer on the
  same checkpoint and calibration images;
- `write_report` (report.py): report.md / report.json / self-contained report.html with plots.

Latency lives in `care_q.bench` (`care_q.bench.host.bench`), the `make bench` suite in
`care_q.bench.suite`.
"""

from care_q.eval.baselines import BASELINES, run_baselines
from care_q.eval.evaluate import evaluate
from care_q.eval.report import write_report
from care_q.eval.sensitivity import sensitivity

__all__ = ["BASELINES", "evaluate", "run_baselines", "sensitivity", "write_report"]
