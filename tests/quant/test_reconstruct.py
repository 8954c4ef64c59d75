"""Reconstruction PTQ: every unit's error falls, artifacts equal the reference bit for bit with the
learnt integer weights, a resumed run equals an uninterrupted one, recipe and input errors."""

from __future__ import annotations

import copy
import dataclasses
import sys
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import care_q
from care_q import CareQError
from care_q.data import get_dataset, make_loader
from care_q.graph.ops import FloatOps
from care_q.models import load_sidecar
from care_q.pipeline import PrepareConfig, prepare
from care_q.pipeline.prepare import build, load_network
from care_q.quant.calibrate import calibrate
from care_q.quant.fakequant import QuantOps
from care_q.quant.qtypes import sqnr_db
from care_q.quant.recipe import RECON_DEFAULT_LEARN, RECON_LEARNABLES, load_recipe, parse_recipe
from care_q.quant.reconstruction import reconstruct, run, units_of
from care_q.quant.reconstruction.rounding import Rounding

SIZE = 32
ITERS = 24


def recon_recipe(base: str, iterations: int = ITERS, batch: int = 16, extra: str = "") -> str:
    """The shipped recipe ``base`` with a short reconstruction (the test's budget)."""
    src = open(load_recipe(base).source).read()
    head, _, _ = src.partition("\nreconstruction:")
    return head + (f"\nreconstruction: {{iterations: {iterations}, batch_size: {batch}, drop_prob: 0.5, "
                   f"lr_rounding: 0.05, lr_scales: 0.0003{extra}}}\n")


@pytest.fixture(scope="module")
def calibrated(data_root, one_torch_thread):
    """care_test (random weights, seed 0) at 32x32, calibrated with ptq_int8_recon's plan, and 64 images."""
    rec = parse_recipe(recon_recipe("ptq_int8_recon"), "test")
    net = load_network("care_test", None, 0)
    pre = load_sidecar(None).with_size(SIZE)
    ds = get_dataset("cifar10_test", pre, data_root=data_root, limit=64, seed=0)
    images = torch.cat([b[0] for b in make_loader(ds, batch_size=32)])
    built = build(net, rec, SIZE)
    calibrate(built.plan, built.dmodel, make_loader(ds, batch_size=32))  # reconstruct() is the tests' to call
    return net, built.plan, built.dmodel, images, rec


def fresh(calibrated):
    _, plan, dmodel, *_ = calibrated
    return copy.deepcopy((plan, dmodel))  # together: the plan's graph keeps pointing at this copy's modules


@pytest.fixture(scope="module")
def reconstructed(calibrated, tmp_path_factory):
    net, _, _, images, rec = calibrated
    plan, dmodel = fresh(calibrated)
    ckpt = tmp_path_factory.mktemp("recon") / "reconstruction.pt"
    summary = reconstruct(plan, dmodel, images, rec.reconstruction, checkpoint=ckpt, device="cpu", progress=False)
    return plan, dmodel, summary, ckpt


def test_units_chain_to_the_deploy_form(calibrated):
    _, _, dmodel, images, _ = calibrated
    x = images[:4]
    with torch.no_grad():
        y = x
        for u in units_of(dmodel):
            y = u.run(y, FloatOps())
        assert torch.equal(y, dmodel(x))
    names = [u.name for u in units_of(dmodel)]
    assert names == ["stem", "stages.0.blocks.0", "stages.1.downsample", "stages.1.blocks.0", "stages.2.downsample",
                     "stages.2.blocks.0", "stages.2.blocks.1", "stages.3.downsample", "stages.3.blocks.0", "head"]


def test_units_chain_to_the_npu_graph(calibrated):
    """The NPU graph (NPU attention and head, `npu_int8_ptq`) through its units is its forward."""
    net, _, _, images, _ = calibrated
    built = build(net, parse_recipe(recon_recipe("npu_int8_ptq"), "test"), SIZE)
    assert type(built.dmodel).__name__ == "NPUHeadCARE"
    with torch.no_grad():
        y = images[:4]
        for u in units_of(built.dmodel):
            y = u.run(y, FloatOps())
        assert torch.equal(y, built.dmodel(images[:4]))


def test_every_unit_and_the_logits_improve(calibrated, reconstructed):
    net, plan0, dmodel0, images, _ = calibrated
    plan, dmodel, summary, _ = reconstructed
    assert [u["name"] for u in summary["units"]] == [u.name for u in units_of(dmodel)]
    for u in summary["units"]:
        assert u["after"]["mse"] < u["before"]["mse"], u
    # the int8 logits' step is not learnt (reconstruction keeps the calibrated range): the logit error is
    # measured within that range
    qp = plan.qp(plan.graph.output)
    assert qp == plan0.qp(plan.graph.output)
    # On the calibration images, what reconstruction minimises: 64 random-weight images say nothing about
    # other images (the proxy's 10k test images do; see the report).
    with torch.no_grad():
        fp = net(images).clamp(qp.lo, qp.hi)
        before = sqnr_db(fp, dmodel0(images, QuantOps(plan0, "quant")))
        after = sqnr_db(fp, dmodel(images, QuantOps(plan, "quant")))
    assert after > before + 0.1, (before, after)
    assert summary["resumed_units"] == 0 and summary["device"] == "cpu"


def test_rounding_is_learnt_on_the_exporters_grid():
    torch.manual_seed(0)
    w = torch.randn(6, 5, 3, 3)
    r = Rounding(w, 127, per_channel=True, learn=True)
    s = w.abs().reshape(6, -1).amax(1) / 127
    assert torch.equal(r.codes(soft=False), torch.round(w / s.reshape(-1, 1, 1, 1)))  # starts at nearest
    with torch.no_grad():
        r.v.copy_(-r.v.sign() * 3)  # every non-maximal weight flips its rounding direction
    codes = r.codes(soft=False)
    wb = r.final_weight()
    # the exporters' scales from the written-back weights are the grid's, their codes the learnt ones
    s_back = wb.abs().reshape(6, -1).amax(1) / 127
    assert torch.equal(s_back, s)
    assert torch.equal(torch.round(wb.double() / s_back.double().reshape(-1, 1, 1, 1)), codes.double())
    assert int((codes != torch.round(w / s.reshape(-1, 1, 1, 1))).sum()) > 200  # and they differ from nearest
    assert float(r.regulariser(2.0).detach()) == 0.0  # hard everywhere: nothing left to regularise


def test_resume_equals_uninterrupted(calibrated, tmp_path, monkeypatch):
    _, _, _, images, rec = calibrated
    settings = dataclasses.replace(rec.reconstruction, iterations=6)  # resuming does not depend on the steps
    plan_a, dmodel_a = fresh(calibrated)
    summary_a = reconstruct(plan_a, dmodel_a, images, settings, checkpoint=tmp_path / "a.pt", device="cpu",
                            progress=False)
    plan, dmodel = fresh(calibrated)
    ckpt = tmp_path / "reconstruction.pt"
    real = run._train_unit
    calls = []

    def killed(unit, *a, **k):
        if len(calls) == 4:
            raise KeyboardInterrupt  # a kill in the fifth unit
        calls.append(unit.name)
        return real(unit, *a, **k)

    monkeypatch.setattr(run, "_train_unit", killed)
    with pytest.raises(KeyboardInterrupt):
        reconstruct(plan, dmodel, images, settings, checkpoint=ckpt, device="cpu", progress=False)
    assert torch.load(ckpt, weights_only=True)["done"] == 4
    monkeypatch.setattr(run, "_train_unit", real)
    plan, dmodel = fresh(calibrated)  # a new process: calibrated again, nothing learnt in memory
    summary = reconstruct(plan, dmodel, images, settings, checkpoint=ckpt, device="cpu", progress=False)
    assert summary["resumed_units"] == 4
    assert plan.qparams == plan_a.qparams and plan.consts == plan_a.consts
    assert plan.qparams != fresh(calibrated)[0].qparams  # something was learnt
    for (k, a), (_, b) in zip(dmodel.state_dict().items(), dmodel_a.state_dict().items()):
        assert torch.equal(a, b), k
    assert [u["after"] for u in summary["units"]] == [u["after"] for u in summary_a["units"]]


def test_checkpoint_of_another_run_is_not_used(calibrated, reconstructed):
    _, _, _, images, rec = calibrated
    _, _, _, ckpt = reconstructed
    plan, dmodel = fresh(calibrated)
    other = dataclasses.replace(rec.reconstruction, iterations=2)
    with pytest.warns(UserWarning, match="from another run"):
        summary = reconstruct(plan, dmodel, images, other, checkpoint=ckpt,
                              device="cpu", progress=False)
    assert summary["resumed_units"] == 0 and len(summary["units"]) == 10


def test_nan_loss_names_the_unit(calibrated):
    _, _, _, images, rec = calibrated
    plan, dmodel = fresh(calibrated)
    with pytest.raises(CareQError, match=r"reconstruction of stem: the loss is nan at step 1"):
        reconstruct(plan, dmodel, torch.full_like(images, float("nan")), rec.reconstruction, device="cpu",
                    progress=False)


@pytest.mark.parametrize("section, match", [
    ("{iterations: 0}", "reconstruction.iterations must be positive, got 0"),
    ("{iterations: -5}", "reconstruction.iterations must be positive, got -5"),
    ("{learn: [rounding, weights]}", "'reconstruction.learn' is 'weights'; allowed: rounding, act_scales, biases, substitution"),
    ("{drop_prob: 1.0}", r"reconstruction.drop_prob must be in \[0, 1\)"),
    ("{batch_size: 0}", "reconstruction.batch_size must be positive"),
    ("{lr_rounding: 0}", "reconstruction.lr_rounding must be positive"),
    ("{steps: 3}", "unknown field 'reconstruction.steps'"),
])
def test_recipe_errors(section, match):
    with pytest.raises(CareQError, match=match):
        parse_recipe(f"name: r\nkind: ptq\nreconstruction: {section}\n", "r.yaml")


def test_recipe_errors_qat_and_int4():
    with pytest.raises(CareQError, match=r"r.yaml:3: a 'reconstruction' section is post-training"):
        parse_recipe("name: r\nkind: qat\nreconstruction: {iterations: 3}\n", "r.yaml")
    with pytest.raises(CareQError, match="int4 weights .* or in a PTQ recipe with a 'reconstruction' section"):
        parse_recipe("name: r\nkind: ptq\nrules:\n  - ops: [conv]\n    weight_dtype: int4\n", "r.yaml")
    rec = parse_recipe("name: r\nkind: ptq\nreconstruction: {learn: rounding}\n", "r.yaml")
    assert rec.reconstruction.learn == ("rounding",) and RECON_DEFAULT_LEARN == ("rounding", "act_scales")
    assert RECON_LEARNABLES == RECON_DEFAULT_LEARN + ("biases", "substitution")
    assert rec.to_json()["reconstruction"]["learn"] == ["rounding"]
    assert rec.reconstruction.target == "original"
    with pytest.raises(CareQError, match=r"r.yaml:3: reconstruction.learn 'substitution' learns the NPU attention's "
                                         r"kernel and output scales; it needs substitutions.attention: npu"):
        parse_recipe("name: r\nkind: ptq\nreconstruction: {learn: [rounding, substitution]}\n", "r.yaml")
    with pytest.raises(CareQError, match="'reconstruction.target' is 'fp32'; allowed: original, substituted"):
        parse_recipe("name: r\nkind: ptq\nreconstruction: {target: fp32}\n", "r.yaml")


def test_fewer_images_than_a_batch_fails_before_any_work(data_root, tmp_path, monkeypatch):
    path = tmp_path / "r.yaml"
    path.write_text(recon_recipe("ptq_int8_recon", batch=16))

    def no_work(*a, **k):
        raise AssertionError("work started")

    monkeypatch.setattr(sys.modules["care_q.pipeline.prepare"], "load_network", no_work)
    with pytest.raises(CareQError, match="batch_size is 16 but there are only 8 calibration images"):
        prepare(PrepareConfig("care_test", recipe=path, calib="cifar10_test", num_calib=8, data_root=data_root))


def _onnx_weights(path) -> dict[str, np.ndarray]:
    m = onnx.load(str(path))
    return {i.name[:-len(".weight/q")]: numpy_helper.to_array(i) for i in m.graph.initializer
            if i.name.endswith(".weight/q")}


def test_int4_grid_clips_where_that_rounds_better():
    """int4: the per-channel scale of least squared error among clipped ranges; the written-back
    weights carry it as their max|w| / 7 (what the exporters recompute), with the same codes."""
    from care_q.quant.lowbit import int4_mse_scales, int4_scales
    torch.manual_seed(1)
    w = torch.randn(8, 64, 3, 3)
    s, s_max = int4_mse_scales(w), int4_scales(w)

    def err(scale):
        sc = scale.reshape(-1, 1, 1, 1)
        return (torch.clamp(torch.round(w / sc), -7, 7) * sc - w).square().reshape(8, -1).sum(1)

    # 576 Gaussian weights per channel: every channel clips its tails and rounds better
    assert bool((err(s) <= err(s_max)).all()) and float(err(s).sum()) < 0.95 * float(err(s_max).sum())
    assert bool((s < 0.97 * s_max).all())
    r = Rounding(w, 7, per_channel=True, learn=False)
    wb = r.final_weight(learnt=False)
    assert torch.allclose(int4_scales(wb), s, rtol=1e-6, atol=0)
    assert torch.equal(torch.round(wb / int4_scales(wb).reshape(-1, 1, 1, 1)), r.nearest)


@pytest.mark.parametrize("recipe", ["ptq_int8_recon", "ptq_w4a8_recon"])
def test_artifacts_are_the_reference_with_the_learnt_codes(recipe, data_root, tmp_path, monkeypatch, one_torch_thread):
    path = tmp_path / f"{recipe}.yaml"  # ptq_int8_recon as shipped: the biases learnt too, in both exporters
    path.write_text(recon_recipe(recipe, iterations=12,
                                 extra=", learn: [rounding, act_scales, biases]" if recipe == "ptq_int8_recon" else ""))
    learnt: dict[str, torch.Tensor] = {}
    real = run._write_back

    def spy(plan, modules, rounders, use_learnt, groups, log_scales):  # the last call is the unit's final one
        learnt.update({k: (r.codes(soft=False) if use_learnt else r.nearest).detach().clone()
                       for k, r in rounders.items()})
        learnt.update({f"{k}/nearest": r.nearest.clone() for k, r in rounders.items()})
        return real(plan, modules, rounders, use_learnt, groups, log_scales)

    monkeypatch.setattr(run, "_write_back", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        report = care_q.ptq("care_test", calib="cifar10_test", data_root=data_root, num_calib=32, img_size=SIZE,
                            recipe=path, out=tmp_path, num_verify=16, progress=False)
    for t in ("tflite", "onnx"):
        v = report["artifacts"][t]["verification"]
        assert v["max_abs_diff"] == 0.0 and v["top1_agreement"] == 1.0, (t, v)
    assert (tmp_path / "reconstruction.pt").is_file()
    onnx_w = _onnx_weights(tmp_path / "care_test_int8_qdq.onnx")
    convs = [k for k in learnt if not k.endswith("/nearest")]
    assert "head.fc" in convs and set(convs) <= set(onnx_w)
    # the rest are the layer scales (an exact per-channel multiply: each code is +-127)
    assert all(k.endswith(".ls_res") for k in set(onnx_w) - set(convs)), sorted(set(onnx_w) - set(convs))
    changed = 0
    for k in convs:
        codes = learnt[k].double().numpy()
        if np.abs(codes).max() <= 7:  # int4: 15 levels stored on the int8 grid as round(q4 * 127 / 7)
            codes = np.round(codes * 127 / 7)
        assert np.array_equal(onnx_w[k].astype(np.float64), codes), k
        changed += int((learnt[k] != learnt[f"{k}/nearest"]).sum())
    assert changed > 0  # the rounding was learnt, not nearest
    int4 = [k for k in convs if learnt[k].abs().max() <= 7]
    assert bool(int4) == (recipe == "ptq_w4a8_recon")
    md = (tmp_path / "report.md").read_text()
    assert "## Reconstruction" in md and "stages.0.blocks.0" in md
    assert [u["name"] for u in report["reconstruction"]["units"]][-1] == "head"
    assert (report["reconstruction"]["float_params"]["biases"] > 20) == (recipe == "ptq_int8_recon")


# ----------------------------------------------------------------------------- the NPU graph: original targets
@pytest.fixture(scope="module")
def calibrated_npu(data_root, one_torch_thread):
    """care_test's NPU graph (npu_int8_ptq's substitutions) at 32x32, calibrated, with 64 images; the
    reconstruction also learns the substitutions' parameters and the biases (as the shipped recipe)."""
    rec = parse_recipe(recon_recipe("npu_int8_ptq", extra=", learn: [rounding, act_scales, biases, substitution]"),
                       "test")
    net = load_network("care_test", None, 0)
    pre = load_sidecar(None).with_size(SIZE)
    ds = get_dataset("cifar10_test", pre, data_root=data_root, limit=64, seed=0)
    images = torch.cat([b[0] for b in make_loader(ds, batch_size=32)])
    built = build(net, rec, SIZE, images[:32])
    calibrate(built.plan, built.dmodel, make_loader(ds, batch_size=32))
    return built, images, rec


def test_npu_targets_are_the_original_models_unit_outputs(calibrated_npu):
    """The targets chain through the original deploy form; the last block's is 1.702 times its output
    (the NPU head folds GELU's slope into that block's last conv), which the NPU graph's block matches."""
    built, images, _ = calibrated_npu
    assert built.original is not None and type(built.original).__name__ == "DeployCARE"
    ref, gains = run._targets(built.dmodel, built.original, torch.device("cpu"))
    assert gains == {"stages.3.blocks.0": pytest.approx(1.702)}
    x = images[:16]
    with torch.no_grad():
        y = x
        for u, r in zip(units_of(built.dmodel), ref):
            got, want = u.run(y, FloatOps()), r.run(y, FloatOps())  # the same input to both
            if u.name == "stem" or u.name.endswith("downsample"):
                assert torch.equal(got, want), u.name  # no substitution there
            if u.name in gains:
                assert sqnr_db(gains[u.name] * want, got) > sqnr_db(want, got) + 3, u.name
            y = want
        assert torch.equal(y, built.original(x))


def _subst(dmodel) -> dict[str, torch.Tensor]:
    from care_q.transforms.substitute import substitution_params
    return {k: v.detach().clone() for k, v in substitution_params(dmodel).items()}


def _biases(dmodel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in dmodel.named_parameters() if k.endswith(".bias")}


def test_npu_reconstruction_learns_the_substitution_and_resumes(calibrated_npu, tmp_path, monkeypatch):
    built, images, rec = calibrated_npu
    settings = dataclasses.replace(rec.reconstruction, iterations=8)
    start, biases = _subst(built.dmodel), _biases(built.dmodel)
    # a, b, the output scale and (l2den) each head's denominator weight c of care_test's 3 two-head attention blocks
    assert len(start) == 3 * (3 + 2)
    plan_a, dmodel_a = copy.deepcopy((built.plan, built.dmodel))
    summary_a = reconstruct(plan_a, dmodel_a, images, settings, reference=built.original,
                            checkpoint=tmp_path / "a.pt", device="cpu", progress=False)
    n_biases = sum(n.op in ("conv", "linear") and n.module.bias is not None and ".phi_aff" not in n.name
                   for n in built.plan.graph.nodes)
    assert summary_a["target"] == "original"
    assert summary_a["float_params"] == {"substitution": 15, "biases": n_biases} and n_biases > 20
    learnt, learnt_b = _subst(dmodel_a), _biases(dmodel_a)
    assert any(not torch.equal(start[k], learnt[k]) for k in start if "den_weight" not in k)
    assert any(not torch.equal(start[k], learnt[k]) for k in start if "den_weight" in k)
    assert sum(not torch.equal(biases[k], learnt_b[k]) for k in biases) > n_biases // 3
    for u in summary_a["units"]:
        assert u["after"]["mse"] <= u["before"]["mse"], u
    # killed in the eighth unit (after two of the attention blocks), resumed in a new process: the same weights,
    # step sizes and substitution parameters
    ckpt = tmp_path / "reconstruction.pt"
    real, calls = run._train_unit, []

    def killed(unit, *a, **k):
        if len(calls) == 7:
            raise KeyboardInterrupt
        calls.append(unit.name)
        return real(unit, *a, **k)

    plan, dmodel = copy.deepcopy((built.plan, built.dmodel))
    monkeypatch.setattr(run, "_train_unit", killed)
    with pytest.raises(KeyboardInterrupt):
        reconstruct(plan, dmodel, images, settings, reference=built.original, checkpoint=ckpt, device="cpu",
                    progress=False)
    monkeypatch.setattr(run, "_train_unit", real)
    done = torch.load(ckpt, weights_only=True)
    assert done["done"] == 7 and sum(k.endswith(("phi_aff.weight", "out_scale")) for k in done["float_params"]) == 4
    plan, dmodel = copy.deepcopy((built.plan, built.dmodel))
    summary = reconstruct(plan, dmodel, images, settings, reference=built.original, checkpoint=ckpt, device="cpu",
                          progress=False)
    assert summary["resumed_units"] == 7 and plan.qparams == plan_a.qparams
    for (k, a), (_, b) in zip(dmodel.state_dict().items(), dmodel_a.state_dict().items()):
        assert torch.equal(a, b), k


# ----------------------------------------------------------------------------- the network stage
NETWORK = ", learn: [rounding, act_scales, biases], network_iterations: {n}"


@pytest.fixture(scope="module")
def proxy_calibrated(proxy_ckpt, data_root, one_torch_thread):
    """The CIFAR-10 proxy (care_s0, 64x64) calibrated with ptq_int8_recon's plan on 128 training images,
    and 256 held-out test images."""
    rec = parse_recipe(recon_recipe("ptq_int8_recon", iterations=2, batch=16, extra=NETWORK.format(n=40)), "test")
    net = load_network("care_s0", proxy_ckpt, 0)
    pre = load_sidecar(proxy_ckpt)
    ds = get_dataset("cifar10_train", pre, data_root=data_root, limit=128, seed=0)
    images = torch.cat([b[0] for b in make_loader(ds, batch_size=32)])
    test = torch.cat([b[0] for b in make_loader(get_dataset("cifar10_test", pre, data_root=data_root, limit=256,
                                                                        seed=0), batch_size=64)])
    built = build(net, rec, 64)
    calibrate(built.plan, built.dmodel, make_loader(ds, batch_size=32))
    return net, built.plan, built.dmodel, images, test, rec


def test_network_stage_lowers_the_held_out_logit_error(proxy_calibrated):
    """The whole model's logits against FP32 after the units: lower error on the calibration images it
    learns from and on held-out test images it never saw (the proxy's trained weights: the same units
    with and without the stage, so the difference is the stage's)."""
    net, plan0, dmodel0, images, test, rec = proxy_calibrated
    results = {}
    for n in (0, rec.reconstruction.network_iterations):
        plan, dmodel = copy.deepcopy((plan0, dmodel0))
        settings = dataclasses.replace(rec.reconstruction, network_iterations=n)
        summary = reconstruct(plan, dmodel, images, settings, device="cpu", progress=False)
        with torch.no_grad():
            results[n] = (summary, sqnr_db(net(test), dmodel(test, QuantOps(plan, "quant"))))
    (units_only, sqnr_units), (with_net, sqnr_net) = results[0], results[40]
    assert units_only["network"] is None
    assert [u["after"] for u in with_net["units"]] == [u["after"] for u in units_only["units"]]  # the same units
    net_rec = with_net["network"]
    assert net_rec["kept"] == "step sizes+biases+weights" and net_rec["iterations"] == 40
    assert net_rec["after"]["mse"] < 0.8 * net_rec["before"]["mse"], net_rec
    assert net_rec["learnt"]["weights"] == net_rec["learnt"]["biases"] > 100
    assert sqnr_net > sqnr_units + 0.5, (sqnr_units, sqnr_net)


def test_network_stage_resumes(calibrated, tmp_path, monkeypatch):
    """Killed in the network stage, resumed in a new process: the units are not redone and the result
    equals an uninterrupted run's."""
    _, _, _, images, rec = calibrated
    settings = dataclasses.replace(rec.reconstruction, iterations=3, network_iterations=4, learn=RECON_LEARNABLES[:3])
    plan_a, dmodel_a = fresh(calibrated)
    summary_a = reconstruct(plan_a, dmodel_a, images, settings, device="cpu", progress=False)
    real, real_train, ckpt = run._network_stage, run._train_unit, tmp_path / "reconstruction.pt"

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "_network_stage", killed)
    plan, dmodel = fresh(calibrated)
    with pytest.raises(KeyboardInterrupt):
        reconstruct(plan, dmodel, images, settings, checkpoint=ckpt, device="cpu", progress=False)
    assert torch.load(ckpt, weights_only=True)["done"] == 10  # every unit, not the network stage
    monkeypatch.setattr(run, "_network_stage", real)
    trained = []
    monkeypatch.setattr(run, "_train_unit", lambda unit, *a, **k: trained.append(unit.name) or
                        real_train(unit, *a, **k))
    plan, dmodel = fresh(calibrated)
    summary = reconstruct(plan, dmodel, images, settings, checkpoint=ckpt, device="cpu", progress=False)
    assert trained == ["network"] and summary["resumed_units"] == 10
    assert plan.qparams == plan_a.qparams
    for (k, a), (_, b) in zip(dmodel.state_dict().items(), dmodel_a.state_dict().items()):
        assert torch.equal(a, b), k
    assert summary["network"]["after"] == summary_a["network"]["after"]
    # and once it is done, a third run resumes past it
    plan, dmodel = fresh(calibrated)
    trained.clear()
    summary = reconstruct(plan, dmodel, images, settings, checkpoint=ckpt, device="cpu", progress=False)
    assert trained == [] and summary["network"]["after"] == summary_a["network"]["after"]


def test_network_stage_artifacts_are_bit_exact(proxy_ckpt, data_root, tmp_path, one_torch_thread):
    """Weights learnt in float by the network stage: the exporters round them as fake quantization
    did, both artifacts equal the reference bit for bit, and the report has the stage's row."""
    path = tmp_path / "r.yaml"
    path.write_text(recon_recipe("ptq_int8_recon", iterations=1, batch=16, extra=NETWORK.format(n=15)))
    report = care_q.ptq("care_s0", weights=proxy_ckpt, calib="cifar10_train", data_root=data_root, num_calib=32,
                        recipe=path, out=tmp_path, num_verify=16, progress=False, latency_runs=0)
    net_rec = report["reconstruction"]["network"]
    assert net_rec["kept"] == "step sizes+biases+weights", net_rec
    for t in ("tflite", "onnx"):
        v = report["artifacts"][t]["verification"]
        assert v["max_abs_diff"] == 0.0 and v["top1_agreement"] == 1.0, (t, v)
    assert "| network (15 steps, the logits) |" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("section, match", [
    ("{network_iterations: -1}", r"reconstruction.network_iterations must be >= 0 \(0: no network stage\), got -1"),
    ("{network_lr_weights: -0.1}", r"reconstruction.network_lr_weights must be >= 0 \(0: not learnt\)"),
    ("{network_iterations: 5, network_lr_scales: 0, network_lr_biases: 0, network_lr_weights: 0}",
     "network_iterations is set but every network_lr_. is 0"),
])
def test_network_stage_recipe_errors(section, match):
    with pytest.raises(CareQError, match=match):
        parse_recipe(f"name: r\nkind: ptq\nreconstruction: {section}\n", "r.yaml")
