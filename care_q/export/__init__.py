"""Exporters: the deploy form to ONNX and TFLite artifacts, verified in their runtimes."""

from care_q.export.fp32 import export_fp32, export_onnx, export_tflite, verify_artifact

__all__ = ["export_fp32", "export_onnx", "export_tflite", "verify_artifact"]
