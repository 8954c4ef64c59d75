"""The recipe's graph transforms: cross-layer equalization (exact in FP32) and bias correction."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import care_q
from care_q import CareQError, create_model
from care_q.graph.trace import trace
from care_q.paths import RECIPES_DIR
from care_q.quant.bias_correction import bias_correction
from care_q.quant.calibrate import calibrate
from care_q.quant.fakequant import QuantOps
from care_q.quant.plan import build_plan
from care_q.quant.recipe import load_recipe, parse_recipe
from care_q.transforms import deploy
from care_q.transforms.equalize import cross_layer_equalization, equalization_pairs, equalize_pair


def _model(seed=0):
    torch.manual_seed(seed)
    m = deploy(create_model("care_test", num_classes=10))
    with torch.no_grad():  # uneven per-channel scales, as trained depthwise filters have
        for _, dw, _ in equalization_pairs(m):
            dw.weight.mul_(torch.logspace(-1.5, 1.5, dw.out_channels)[torch.randperm(dw.out_channels)]
                           .reshape(-1, 1, 1, 1))
    return m


def test_equalization_is_exact_and_balances_ranges():
    m = _model()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y0 = m(x)
    r = [(dw.weight.abs().amax(dim=(1, 2, 3)), pw.weight.abs().amax(dim=(0, 2, 3)))
         for _, dw, pw in equalization_pairs(m)]
    summary = cross_layer_equalization(m)
    # every block's inter1 chain, and the inter2 chain of every block but a stage's last
    assert summary["pairs"] == len(r) == sum(1 + (not b.last) for b in m.blocks)
    assert summary["range_spread_after"] < summary["range_spread_before"] / 5
    with torch.no_grad():
        y1 = m(x)
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-4 * float(y0.abs().max()))
    for (r1, r2), (_, dw, pw) in zip(r, equalization_pairs(m)):
        both = torch.sqrt(r1 * r2)  # DFQ: both ranges become the geometric mean
        torch.testing.assert_close(dw.weight.abs().amax(dim=(1, 2, 3)), both, rtol=1e-5, atol=0)
        torch.testing.assert_close(pw.weight.abs().amax(dim=(0, 2, 3)), both, rtol=1e-5, atol=0)


def test_equalization_rejects_what_is_not_a_depthwise_pointwise_pair():
    with pytest.raises(ValueError, match="expected a depthwise conv"):
        equalize_pair(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1))
    with pytest.raises(ValueError, match="expected a pointwise conv reading 4 channels"):
        equalize_pair(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 3))


def _calibrated(seed=0):
    m = _model(seed)
    plan = build_plan(trace(m, torch.zeros(1, 3, 32, 32)), load_recipe("ptq_int8"))
    # a mean away from 0 (as images have): the weights' rounding error then shifts the output mean
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(2)) + 1.0
    calibrate(plan, m, [x[:16], x[16:]], progress=False)
    return m, plan, x


class _Means(QuantOps):
    """Per-channel means of one conv's output (before its output quantization)."""

    def __init__(self, plan, mode, layer):
        super().__init__(plan, mode)
        self.layer, self.mean = layer, None

    def conv(self, name, x, conv):
        y = nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                                 conv.groups) if self.mode == "float" else None
        out = super().conv(name, x, conv)
        if name == self.layer:
            self.mean = (y if y is not None else self._pre).mean(dim=(0, 2, 3))
        return out

    def _out(self, name, y, op=""):
        if name == self.layer:
            self._pre = y
        return super()._out(name, y, op)


def test_bias_correction_matches_the_fp32_means():
    m, plan, x = _calibrated()
    biases = {n: p.clone() for n, p in m.named_parameters() if n.endswith("bias")}
    weights = {n: p.clone() for n, p in m.named_parameters() if not n.endswith("bias")}
    with torch.no_grad():
        f, q = _Means(plan, "float", "stem"), _Means(plan, "quant", "stem")
        m(x, f), m(x, q)
    before = (f.mean - q.mean).abs().max()
    summary = bias_correction(plan, m, [x], progress=False)
    # the first layer has no corrected layer upstream: its fake-quant output mean now equals the
    # FP32 mean on these images, up to the int32 bias rounding (s_in * s_w / 2)
    with torch.no_grad():
        q2 = _Means(plan, "quant", "stem")
        m(x, q2)
    s_b = plan.qp("input").scale[0] * float(m.stem.weight.detach().abs().amax(dim=(1, 2, 3)).max()) / 127
    assert before > 20 * s_b
    assert float((f.mean - q2.mean).abs().max()) <= s_b / 2 * 1.01
    # over the whole network: every conv and the int8 FC corrected, the mean error much smaller
    n_layers = sum(isinstance(mod, (nn.Conv2d, nn.Linear)) for mod in m.modules())
    assert summary["layers"] == n_layers and summary["images"] == 32
    assert summary["error_after"] < summary["error_before"] / 3
    # only biases change
    assert all(torch.equal(p, weights[n]) for n, p in m.named_parameters() if not n.endswith("bias"))
    assert sum(not torch.equal(p, biases[n]) for n, p in m.named_parameters() if n.endswith("bias")) == n_layers


@pytest.mark.parametrize("text,match", [
    ("name: x\ntransforms:\n  deploy: false\n", r"<t>:3: transforms.deploy: false is not supported"),
    ("name: x\nkind: qat\ntransforms:\n  bias_correction: true\n",
     r"<t>:4: transforms.bias_correction is a post-training transform"),
    ("name: x\nkind: qat\ntransforms: {cross_layer_equalization: true}\n",
     r"<t>:3: transforms.cross_layer_equalization is a post-training transform"),
])
def test_transform_recipe_errors(text, match):
    with pytest.raises(CareQError, match=match):
        parse_recipe(text, "<t>")


def test_ptq_with_both_transforms(tmp_path, data_root):
    """End to end: the corrected biases and equalized weights reach both artifacts (verified in
    their runtimes) and the report says what the transforms did."""
    torch.set_num_threads(1)
    recipe = tmp_path / "t.yaml"
    recipe.write_text((RECIPES_DIR / "ptq_int8.yaml").read_text()
                      + "transforms: {cross_layer_equalization: true, bias_correction: true}\n")
    with pytest.warns(UserWarning, match="weights are random"):
        r = care_q.ptq("care_test", calib="cifar10_test", data_root=data_root, num_calib=16, img_size=32,
                       recipe=recipe, out=tmp_path / "out", num_verify=16, latency_runs=0, progress=False)
    for t in ("tflite", "onnx"):
        assert r["artifacts"][t]["verification"]["top1_agreement"] == 1.0, t
    assert r["cross_layer_equalization"]["pairs"] > 0
    assert r["bias_correction"]["images"] == 16
    assert r["bias_correction"]["error_after"] < r["bias_correction"]["error_before"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "cross-layer equalization:" in md and "bias correction:" in md
