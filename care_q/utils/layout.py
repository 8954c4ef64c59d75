"""Memory layout for the PyTorch passes of `care-q ptq` (calibration, bias correction, the
fake-quant references).

Measured on care_s1 at 224, batch 32, 2 cores: 1.4-1.5 s per forward with the convolution
weights in channels_last against 2.3-2.5 s in NCHW (oneDNN's NHWC kernels; the activations then
stay NHWC from the stem on). The exporters read the weights in NCHW, so the layout is changed
only for the duration of a block and restored after it (in place: the same Parameter objects).
Numerically the float passes differ by round-off only (summation order); the exact integer
emulations of the runtimes give identical outputs in either layout.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def channels_last(model: torch.nn.Module):
    """Run the block with `model`'s 4-D parameters and buffers in channels_last."""
    model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        model.to(memory_format=torch.contiguous_format)
