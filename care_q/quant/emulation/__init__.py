"""Bit-exact emulations of the integer kernels the int8 artifacts run in, one module per runtime.

Pure functions on integer-valued tensors (codes minus zero points, unless a docstring says
otherwise); each docstring names the runtime kernel it reproduces. `QuantOps(plan, "quant",
exact=...)` (`care_q.quant.fakequant`) calls them to be the runtimes' reference bit for bit:

- `integer`: exact integer accumulation of convolutions and matmuls (every runtime);
- `fixedpoint`: gemmlowp's fixed-point arithmetic, which TFLite's own int8 kernels are built on;
- `xnnpack`: XNNPACK's int8 ADD, MUL, MEAN and LOGISTIC (TFLite's CPU engine);
- `tflite`: TFLite's own int8 kernels (DIV, L2_NORMALIZATION, RELU, large depthwise conv);
- `onnxruntime`: onnxruntime's x86 QLinearAdd and QLinearMul (MLAS).

The tests that pin each one to its runtime are listed in docs/emulations.md.
"""
