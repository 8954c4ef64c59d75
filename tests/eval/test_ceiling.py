"""The fidelity ceiling (issue 19's anchors): int8 weights alone equal a float model whose weights were
rounded by hand, int8 activations alone equal the plan on float weights, and the splits are scored
against the original FP32 model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from care_q.eval.ceiling import SPLITS, WeightsAloneOps, fidelity_ceiling
from care_q.pipeline import PrepareConfig, calib_tensor, prepare
from care_q.pipeline.prepare import draw_images
from care_q.quant.qtypes import sqnr_db

SIZE = 32


@pytest.fixture(scope="module")
def prepared(data_root, one_torch_thread):
    prep = prepare(PrepareConfig("care_test", recipe="ptq_int8", calib="cifar10_test", num_calib=48,
                                 data_root=data_root, img_size=SIZE, progress=False))
    x = draw_images("cifar10_test", prep.preprocess, 64, 7, data_root=data_root)
    return prep, x


def _rounded_by_hand(prep) -> torch.nn.Module:
    """The deploy form with every conv / linear weight rounded to its symmetric per-channel int8 grid and
    each bias to int32 at (input step x weight step), computed here from the plan's input steps."""
    m = copy.deepcopy(prep.dmodel)
    name_of = {id(mod): name for name, mod in prep.dmodel.named_modules()}
    mods = dict(m.named_modules())
    for node in prep.plan.graph.nodes:
        if node.op not in ("conv", "linear"):
            continue
        mod = mods[name_of[id(node.module)]]
        in_qp = prep.plan.qp(prep.plan.graph_inputs[node.name][0])
        if node.op == "linear" and (in_qp is None or not prep.plan.quantized(node.name)):
            continue  # a float classifier keeps its float weights
        with torch.no_grad():
            w = mod.weight.double()
            s = w.abs().reshape(w.shape[0], -1).amax(1).clamp(min=1e-12) / 127
            shape = (-1,) + (1,) * (w.dim() - 1)
            mod.weight.copy_((torch.round(w / s.reshape(shape)).clamp(-127, 127) * s.reshape(shape)).float())
            if mod.bias is not None and in_qp is not None:
                sb = s.float() * float(in_qp.scale[0])
                mod.bias.copy_(torch.round(mod.bias / sb) * sb)
    return m


def test_weights_alone_is_the_float_model_on_rounded_weights(prepared):
    prep, x = prepared
    with torch.no_grad():
        alone = prep.dmodel(x, WeightsAloneOps(prep.plan, "quant"))
        by_hand = _rounded_by_hand(prep)(x)
        fp32 = prep.net(x)
    # the per-channel layer-scale constants are rounded to 8 bits too (a 1x1 depthwise in the files): not
    # done by hand, so the two are close, not equal; both are far from FP32
    assert sqnr_db(by_hand, alone) > 45, sqnr_db(by_hand, alone)
    assert sqnr_db(fp32, alone) < sqnr_db(by_hand, alone) - 10


def test_splits_against_fp32(prepared):
    prep, x = prepared
    c = fidelity_ceiling(prep, x, calib_tensor(prep))
    assert c["images"] == {"held_out": 64, "calibration": 48}
    assert set(c["held_out"]) == set(SPLITS) and set(c["calibration"]) == {"int8"}
    ho = c["held_out"]
    # care_test's random weights: its int8 activations (the logits' top-5 range above all) cost everything,
    # its per-channel int8 weights ~35 dB
    assert ho["weights_alone"]["logit_sqnr_db"] > ho["int8"]["logit_sqnr_db"] + 20, ho
    assert abs(ho["activations_alone"]["logit_sqnr_db"] - ho["int8"]["logit_sqnr_db"]) < 1, ho
    for f in (*ho.values(), c["calibration"]["int8"]):
        assert 0.0 <= f["top1_agreement"] <= 1.0 and np.isfinite(f["logit_sqnr_db"])
    # the calibration split scores the plan on the very images it was calibrated on
    same = fidelity_ceiling(prep, calib_tensor(prep), calib_tensor(prep))
    held = same["held_out"]["int8"]
    assert {k: v for k, v in held.items() if k != "noise_agreement"} == same["calibration"]["int8"]
    # white noise of a split's own SQNR: high where the split's SQNR is (weights alone), low where it is not
    assert ho["weights_alone"]["noise_agreement"] > 0.9 > ho["int8"]["noise_agreement"], ho


@pytest.mark.parametrize("db", [0.0, 6.0])
def test_noise_agreement_follows_the_normal_law(db):
    """Two classes, logits (m, 0): Gaussian noise of SQNR db flips the top-1 when the noise difference
    (variance 2 sigma^2 = m^2 10^(-db/10)) exceeds m, with probability 1 - Phi(10^(db/20))."""
    from math import erf, sqrt

    from care_q.eval.ceiling import noise_agreement

    ref = torch.tensor([[2.0, 0.0]]).repeat(20000, 1)
    expected = 0.5 * (1 + erf(10 ** (db / 20) / sqrt(2)))  # 0.8413 at 0 dB, 0.9770 at 6 dB
    got = noise_agreement(ref, db, draws=10)["top1_agreement"]
    assert got["mean"] == pytest.approx(expected, abs=0.004)
    assert got["low"] <= got["mean"] <= got["high"]
    # the drop against labels: every FP32 answer right -> each flip costs a point per 100 images
    right = noise_agreement(ref, db, torch.zeros(20000, dtype=torch.long), draws=10)
    assert right["top1_drop"]["mean"] == pytest.approx(100 * (1 - right["top1_agreement"]["mean"]), abs=1e-9)
    # every FP32 answer wrong (two classes) -> each flip gains one
    wrong = noise_agreement(ref, db, torch.ones(20000, dtype=torch.long), draws=10)
    assert wrong["top1_drop"]["mean"] == pytest.approx(-100 * (1 - wrong["top1_agreement"]["mean"]), abs=1e-9)
    with pytest.raises(ValueError, match="logits"):
        noise_agreement(torch.zeros(5), db)
