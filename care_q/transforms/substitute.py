"""Op substitutions that change the function slightly (need fine-tuning to be lossless).

`gelu_to_silu`: GELU(x) ~= x * sigmoid(1.702 x). With u = 1.702 x this is silu(u) / 1.702,
so the 1.702 folds into the preceding 1x1 conv and the 1/1.702 into the following depthwise
conv: the block then runs SiLU = LOGISTIC + MUL, both int8 kernels in XNNPACK and
onnxruntime, where GELU has none. Max abs error vs exact GELU is about 0.02.
"""

from __future__ import annotations

import copy

import torch

from care_q.transforms.deploy import DeployCARE

GELU_SIGMOID_SLOPE = 1.702


@torch.no_grad()
def gelu_to_silu(model: DeployCARE) -> DeployCARE:
    model = copy.deepcopy(model)
    a = GELU_SIGMOID_SLOPE
    for blk in model.blocks:
        if blk.act != "gelu":
            continue
        for fc1, dw in ((blk.inter1_fc1, blk.inter1_conv), (blk.inter2_fc1, blk.inter2_conv)):
            fc1.weight.mul_(a)
            fc1.bias.mul_(a)
            dw.weight.div_(a)
        blk.act = "silu"
    return model
