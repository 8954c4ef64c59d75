"""Calibration methods against analytic distributions, qparams, recipes, the plan."""

from __future__ import annotations

import math
import re

import pytest
import torch

from care_q import CareQError, create_model
from care_q.graph.roles import Role
from care_q.graph.trace import trace
from care_q.quant.emulation.integer import integer_product
from care_q.quant.observers import HistogramObserver
from care_q.quant.plan import build_plan
from care_q.quant.qtypes import DType, Method, qparams_from_range, sqnr_db
from care_q.quant.recipe import list_recipes, load_recipe, parse_recipe
from care_q.transforms import deploy
from care_q.transforms.substitute import apply_substitutions


def _obs(sample, n=10, size=200_000, seed=0):
    torch.manual_seed(seed)
    o = HistogramObserver("t")
    for _ in range(n):
        o.update(sample(size))
    return o


def test_minmax_exact():
    o = HistogramObserver("t")
    o.update(torch.tensor([-0.5, 0.25, 3.0]))
    o.update(torch.tensor([-2.0, 1.0]))
    assert o.range(Method.MINMAX, DType.INT8, False) == (-2.0, 3.0)
    assert o.range(Method.MINMAX, DType.INT8, True) == (-3.0, 3.0)


def test_percentile_gaussian():
    o = _obs(torch.randn)
    lo, hi = o.range(Method.PERCENTILE, DType.INT8, True, percentile=99.0)
    assert hi == pytest.approx(2.5758, rel=0.01)  # |N(0,1)| 99th percentile
    lo, hi = o.range(Method.PERCENTILE, DType.INT8, False, percentile=97.5)
    assert lo == pytest.approx(-1.96, rel=0.02) and hi == pytest.approx(1.96, rel=0.02)


def test_mse_matches_aciq_laplace_and_gaussian():
    # Optimal symmetric 8-bit clipping (Banner et al., ACIQ): Laplace(b) 9.89 b, Gaussian 3.92 sigma
    lap = _obs(lambda n: torch.distributions.Laplace(0.0, 1.0).sample((n,)))
    assert lap.range(Method.MSE, DType.INT8, True)[1] == pytest.approx(9.89, rel=0.04)
    gau = _obs(torch.randn)
    assert gau.range(Method.MSE, DType.INT8, True)[1] == pytest.approx(3.92, rel=0.04)


def test_mse_and_entropy_keep_uniform_range():
    o = _obs(lambda n: torch.rand(n) * 3 - 1, n=5, size=100_000)
    for m in (Method.MSE, Method.ENTROPY):
        lo, hi = o.range(m, DType.INT8, False)
        assert lo == pytest.approx(-1.0, abs=0.02) and hi == pytest.approx(2.0, abs=0.02), m


def test_entropy_does_not_clip_normalised_pixels():
    # 8-bit pixels after mean/std normalisation: 256 spikes over [-1.8, 2.2]. The KL candidate must be
    # built without the clipped mass, or clipping looks free: this range was once [-0.25, 0.53].
    o = _obs(lambda n: (torch.randint(0, 256, (n,)) / 255.0 - 0.45) / 0.25, n=3, size=100_000)
    lo, hi = o.range(Method.ENTROPY, DType.INT8, False)
    assert lo == pytest.approx(-1.8, abs=0.1) and hi == pytest.approx(2.2, abs=0.1)


def test_entropy_clips_gaussian_tail():
    o = _obs(torch.randn)
    a = o.range(Method.ENTROPY, DType.INT8, True)[1]
    assert 3.0 < a < 0.95 * o.range(Method.MINMAX, DType.INT8, True)[1]


def test_histogram_growth_keeps_counts():
    o = HistogramObserver("t", bins=64)
    o.update(torch.full((10,), 0.4))
    o.update(torch.full((5,), 7.0))
    assert o.R == 8.0 and o.hist.sum() == 15 and o.count == 15


def test_nan_names_tensor():
    o = HistogramObserver("stages.2.blocks.0.attn.den")
    with pytest.raises(CareQError, match="stages.2.blocks.0.attn.den.*NaN"):
        o.update(torch.tensor([1.0, float("nan")]))
    with pytest.raises(CareQError, match="1 NaN/inf"):
        o.update(torch.tensor([1.0, float("-inf"), 2.0]))


def test_large_updates_are_sampled_without_bias():
    # above max_samples values a strided sample is histogrammed (weighted back to the full count);
    # min/max stay exact and the ranges match the analytic ones
    o = _obs(torch.randn, n=3, size=2_000_000)
    assert o.count == 6_000_000 and o.hist.sum() == pytest.approx(6_000_000, rel=1e-6)
    assert o.range(Method.PERCENTILE, DType.INT8, True, percentile=99.0)[1] == pytest.approx(2.5758, rel=0.01)
    assert o.range(Method.MSE, DType.INT8, True)[1] == pytest.approx(3.92, rel=0.04)
    x = torch.zeros(1_000_000)
    x[123_457] = 9.0  # not on the sampled stride: min/max still see it
    o = HistogramObserver("t")
    o.update(x)
    assert o.range(Method.MINMAX, DType.INT8, False) == (0.0, 9.0)


@pytest.mark.parametrize("bins", [4096, 100])
def test_histogram_counts_are_torch_histc(bins):
    # the observer's bincount histogram puts every value in histc's bin, edges and the top included
    from care_q.quant.observers import _histogram

    g = torch.Generator().manual_seed(3)
    for R in (0.125, 1.0, 64.0):
        x = (torch.rand(60_000, generator=g) * 2 - 1) * R
        x[:20_000] = torch.round(x[:20_000] * bins / (2 * R)) * (2 * R) / bins  # on bin edges
        x[0], x[1] = R, -R
        assert (_histogram(x, bins, R) == torch.histc(x, bins, -R, R).double().numpy()).all()


def test_channels_last_tensor_observed_like_nchw():
    # a channels_last activation is read in memory order without a copy: the same statistics
    x = torch.randn(2, 8, 5, 7, generator=torch.Generator().manual_seed(0)) ** 3
    a, b = HistogramObserver("a"), HistogramObserver("b")
    a.update(x)
    b.update(x.contiguous(memory_format=torch.channels_last))
    assert (a.hist == b.hist).all() and (a.min, a.max, a.count) == (b.min, b.max, b.count)


def test_qparams():
    qp = qparams_from_range(-1.0, 3.0, DType.INT8, False)
    assert qp.scale[0] == pytest.approx(4 / 255) and qp.zero_point[0] == -128 + round(1 / (4 / 255))
    s = qparams_from_range(-1.0, 3.0, DType.INT8, True)
    assert s.zero_point[0] == 0 and s.scale[0] == pytest.approx(3 / 127)
    assert qparams_from_range(0.5, 2.0, DType.INT8, False).lo == 0.0  # range widened to 0
    assert sqnr_db([1.0, 1.0], [1.0, 1.0]) == math.inf
    assert sqnr_db([1.0, 0.0], [1.1, 0.0]) == pytest.approx(20.0)


# ---------------------------------------------------------------------- recipes

def test_shipped_recipes_parse():
    names = {load_recipe(p).name for p in list_recipes()}
    assert {"ptq_int8", "ptq_a16w8_attention", "ptq_int8_full"} <= names
    assert load_recipe("ptq_int8_full").io == "int8"
    # tflite.large_dwconv: in the recipe's content (and a QAT run's key) only where not the default
    assert load_recipe("ptq_int8").to_json()["tflite"] == {"large_dwconv": "builtin"}
    assert "tflite" not in load_recipe("ptq_int8_full").to_json()
    assert load_recipe("ptq_int8_cpu").to_json()["tflite"] == {"large_dwconv": "builtin", "kernels": "measured"}
    # likewise transforms.reciprocal_normaliser (a QAT run's key stays what it was without it)
    assert "reciprocal_normaliser" not in load_recipe("qat_int8").to_json()["transforms"]


@pytest.mark.parametrize("text,match", [
    ("name: x\nactivations: {dtype: int8, methd: mse}\n", r"<t>:2: unknown field 'activations.methd'"),
    ("name: x\nio: int4\n", r"<t>:2: 'io' is 'int4'"),
    ("name: x\nrules:\n  - method: mse\n", r"<t>:3: rules\[0\] selects nothing"),
    ("name: x\nrules:\n  - roles: [attn_foo]\n", r"'rules\[0\].roles' is 'attn_foo'"),
    ("name: x\nactivations: {percentile: 30}\n", "percentile must be in"),
    ("name: x\nqat: {epochs: 1}\n", "a 'qat' section needs kind: qat"),
    ("name: [unclosed\n", "not valid YAML"),
    ("kind: ptq\n", "missing required field 'name'"),
    ("name: x\ntflite: {large_dwconv: ruy}\n", r"<t>:2: 'tflite.large_dwconv' is 'ruy'"),
    ("name: x\nkind: qat\nsubstitutions: {attention: npu}\ntflite:\n  large_dwconv: builtin\n",
     r"<t>:5: tflite.large_dwconv: builtin .* NPU delegates do not take"),
    ("name: x\nkind: qat\nsubstitutions: {attention: npu}\ntransforms: {reciprocal_normaliser: true}\n",
     r"<t>:4: transforms.reciprocal_normaliser .* the NPU attention .* has none"),
    ("name: x\ntransforms: {reciprocal_normaliser: yes please}\n", r"<t>:2: 'transforms.reciprocal_normaliser'"),
    ("name: x\ntflite: {kernels: fast}\n", r"<t>:2: 'tflite.kernels' is 'fast'"),
    ("name: x\nkind: qat\ntflite:\n  kernels: measured\n", r"<t>:4: tflite.kernels: measured .* not available in QAT"),
    ("name: x\nsubstitutions: {attention: npu}\nhead: {dtype: int8}\ntflite:\n  kernels: measured\n",
     r"<t>:5: tflite.kernels: measured .* must stay fully int8"),
])
def test_recipe_errors(text, match):
    with pytest.raises(CareQError, match=match):
        parse_recipe(text, "<t>")


def test_unknown_recipe():
    with pytest.raises(CareQError, match="unknown recipe 'nope'.*ptq_int8"):
        load_recipe("nope")


# ---------------------------------------------------------------------- plan

@pytest.fixture(scope="module")
def graph():
    torch.manual_seed(0)
    return trace(deploy(create_model("care_test", num_classes=10)), torch.zeros(1, 3, 32, 32))


def test_plan_roles_and_constraints(graph):
    plan = build_plan(graph, load_recipe("ptq_int8"))
    s = plan.specs
    name = "stages.2.blocks.0.attn"
    assert s[f"{name}.phi_q"].role == Role.ATTN_PHI and s[f"{name}.phi_q"].method == Method.MSE
    assert s[f"{name}.kv"].symmetric and s[f"{name}.k_mean"].symmetric  # BATCH_MATMUL RHS
    assert s[f"{name}.v"].symmetric  # v is a slice of the block input: its whole group is symmetric
    # concat inputs share the output's parameters
    feats = "stages.2.blocks.0.feats"
    assert s["stages.2.blocks.0.dwconv1"].group == s[feats].group == s[f"{name}.merge"].group
    # int8 head (ptq_int8's head.dtype): pool int8, GELU float, LayerNorm output and logits int8
    assert s["head.pool"].dtype == DType.INT8 and s["head.act"].dtype == DType.FLOAT
    assert s["head.norm"].dtype == DType.INT8 and s["head.fc"].dtype == DType.INT8
    assert s["head.fc"].method == Method.MINMAX  # the top logit must never clip
    float_head = build_plan(graph, parse_recipe("name: x\nhead: {dtype: float}\n", "<r>")).specs
    assert float_head["head.norm"].dtype == DType.FLOAT and float_head["head.fc"].dtype == DType.FLOAT
    assert any("rule" in w for w in s[f"{name}.den"].why)


# one tensor per op kind and role of the deploy form: (recipe, tensor) -> role
A, H = "stages.2.blocks.0.attn", "stages.2.blocks.0.attn.h0"
EXPECTED_ROLES = {
    "ptq_int8": {  # exact linear attention, GELU, int8 head
        "input": Role.INPUT, "stem": Role.CONV, "stages.1.downsample": Role.CONV,
        "stages.0.blocks.0.split:0": Role.CONV, "stages.0.blocks.0.dwatt": Role.CONV,
        "stages.0.blocks.0.feats": Role.CONV, "stages.0.blocks.0.inter1_act": Role.GELU,
        "stages.0.blocks.0.inter1_res": Role.RESIDUAL, "stages.0.blocks.0.cat": Role.RESIDUAL,
        "stages.0.blocks.0.ls_res": Role.LAYER_SCALE, "stages.0.blocks.0.skip": Role.RESIDUAL,
        "stages.0.blocks.0.out": Role.RESIDUAL,
        f"{A}.qk": Role.ATTN_QK, f"{A}.qk_split:1": Role.CONV, f"{A}.v": Role.CONV, f"{A}.q": Role.CONV,
        f"{A}.elu_k": Role.ATTN_ELU, f"{A}.phi_q": Role.ATTN_PHI, f"{A}.kTv": Role.ATTN_KV, f"{A}.kv": Role.ATTN_KV,
        f"{A}.k_mean": Role.ATTN_KMEAN, f"{A}.den": Role.ATTN_DEN, f"{A}.den_eps": Role.ATTN_DEN,
        f"{A}.num": Role.ATTN_NUM, f"{A}.out": Role.ATTN_OUT, f"{A}.merge": Role.ATTN_OUT,
        "head.pool": Role.POOL, "head.act": Role.HEAD, "head.norm": Role.HEAD, "head.fc": Role.HEAD,
    },
    "ptq_int8_reciprocal": {f"{A}.den_inv": Role.ATTN_DEN_INV, f"{A}.out": Role.ATTN_OUT,
                            f"{A}.den_eps": Role.ATTN_DEN},
    "npu_int8": {  # SiLU for GELU, the NPU attention
        "stages.0.blocks.0.inter2_act": Role.GELU, f"{A}.qk": Role.ATTN_QK, f"{A}.phi_aff": Role.ATTN_ELU,
        f"{A}.phi_sig": Role.ATTN_ELU, f"{A}.phi_exp": Role.ATTN_ELU, f"{A}.phi_relu": Role.ATTN_ELU,
        f"{A}.phi": Role.ATTN_PHI, f"{A}.phi_split:0": Role.CONV, f"{H}.q": Role.CONV,
        f"{H}.kv_prod": Role.ATTN_KV, f"{H}.kv": Role.ATTN_KV, f"{H}.num_prod": Role.ATTN_NUM,
        f"{H}.num": Role.ATTN_NUM, f"{H}.l2": Role.ATTN_OUT, f"{H}.out": Role.ATTN_OUT, f"{A}.heads": Role.ATTN_OUT,
        f"{A}.out": Role.ATTN_OUT,
    },
}


@pytest.mark.parametrize("recipe", sorted(EXPECTED_ROLES))
def test_plan_roles_come_from_the_producing_op(recipe):
    torch.manual_seed(0)
    rec = load_recipe(recipe)
    model, _ = apply_substitutions(deploy(create_model("care_test", num_classes=10)), rec,
                                   torch.randn(2, 3, 32, 32))
    graph = trace(model, torch.zeros(1, 3, 32, 32))
    roles = {n: s.role for n, s in build_plan(graph, rec).specs.items()}
    assert {t: roles[t] for t in EXPECTED_ROLES[recipe]} == EXPECTED_ROLES[recipe]
    tagged = {n.name for n in graph.nodes if n.role is not None}
    assert "stem" not in tagged and f"{A}.qk" in tagged  # conv is the default, not a tag
    if recipe == "ptq_int8":  # the divisor guard is found by role: one per attention block
        assert [n.name for n in graph.nodes if build_plan(graph, rec).divisor_guard(n)] == [
            f"stages.{s}.blocks.{b}.attn.den_eps" for s, b in ((2, 0), (2, 1), (3, 0))]


class _Tiny(torch.nn.Module):
    """Tensor names that the CARE deploy form gives roles to, without its tags."""

    def forward(self, x, ops):
        x = ops.input("input", x)
        den = ops.add_const("blk.attn.den", x, 1.0)
        out = ops.tag(Role.RESIDUAL, ops.mul_const("blk.attn.kv", den, 2.0))
        return ops.output("logits", ops.add("head.fc", out, den))


def test_roles_do_not_come_from_names():
    graph = trace(_Tiny(), torch.zeros(1, 4, 2, 2))
    roles = {n: s.role for n, s in build_plan(graph, parse_recipe("name: x\n", "<r>")).specs.items()}
    assert roles == {"input": Role.INPUT, "blk.attn.den": Role.CONV, "blk.attn.kv": Role.RESIDUAL,
                     "head.fc": Role.CONV}


def test_trace_refuses_two_roles_for_one_tensor():
    class Twice(torch.nn.Module):
        def forward(self, x, ops):
            y = ops.tag(Role.GELU, ops.gelu("g", ops.input("input", x)))
            return ops.output("logits", ops.tag(Role.HEAD, y))

    with pytest.raises(RuntimeError, match="'g' tagged gelu and head"):
        trace(Twice(), torch.zeros(1, 2))


def test_plan_declares_what_calibration_attaches(graph):
    from care_q.quant.calibrate import calibrate

    plan = build_plan(graph, load_recipe("ptq_int8"))
    assert (plan.observers, plan.output_qparams, plan.logit_floor, plan.float_weights) == ({}, None, None, frozenset())
    torch.manual_seed(0)
    model = deploy(create_model("care_test", num_classes=10))
    calibrate(plan, model, [torch.randn(8, 3, 32, 32)], progress=False)
    assert set(plan.observers) >= {"input", "stem", "stages.2.blocks.0.attn.den"}
    assert plan.output_qparams == plan.qp(graph.output)  # int8 head: the logits' own parameters
    assert plan.logit_floor is not None and plan.logit_floor < float(plan.observers[graph.output].max)


def test_last_block_placeholder_selects_the_models_last_block(graph):
    """``{last_block}`` in a rule's regex is the model's last CARE block: ptq_w4a8_recon's int4 rule
    skips exactly that block's MLP convs."""
    from care_q.quant.lowbit import weight_bits_of
    from care_q.quant.plan import last_block

    assert last_block(graph) == "stages.3.blocks.0"  # care_test: one block per stage
    plan = build_plan(graph, load_recipe("ptq_w4a8_recon"))
    bits = weight_bits_of(plan)
    mlp = {n for n in bits if re.fullmatch(r"stages\.\d\.blocks\.\d\.inter[12]_fc[12]", n)}
    assert {n for n, b in bits.items() if b == 4} == {n for n in mlp if not n.startswith("stages.3.blocks.0.")}
    assert {n for n in mlp if n.startswith("stages.3.blocks.0.")} == {"stages.3.blocks.0.inter1_fc1",
                                                                     "stages.3.blocks.0.inter1_fc2",
                                                                     "stages.3.blocks.0.inter2_fc1"}
    rule = parse_recipe("name: r\nrules:\n  - tensors: '{last_block}\\..*'\n    method: minmax\n", "r.yaml").rules[0]
    with pytest.raises(CareQError, match="names {last_block}, but this model has no CARE blocks"):
        rule.for_model(None)


@pytest.mark.parametrize("logits", ["top5", "full"])
def test_int8_logits_range(graph, logits):
    """head.logits: top5 starts the int8 logits at the lowest 5th-largest calibration logit; full
    spans every calibration logit (the observed min/max)."""
    import dataclasses

    from care_q.quant.calibrate import calibrate

    plan = build_plan(graph, dataclasses.replace(load_recipe("ptq_int8"), head_logits=logits))
    torch.manual_seed(0)
    model = deploy(create_model("care_test", num_classes=10))
    x = torch.randn(8, 3, 32, 32)
    calibrate(plan, model, [x], progress=False)
    with torch.no_grad():
        y = model(x)
    qp = plan.qp(graph.output)
    step = qp.scale[0]
    lo = float(y.topk(5, dim=1).values[:, -1].min()) if logits == "top5" else float(y.min())
    assert abs(qp.lo - lo) <= step and abs(qp.hi - float(y.max())) <= step
    assert (plan.logit_floor is None) == (logits == "full")


def test_reciprocal_range_is_capped_at_one_over_the_divisors_lsb():
    """1 / den: the calibrated range, capped at 1 / one LSB of den (the largest value the guarded
    int8 divisor allows; float normalisers below one LSB, which calibration sees, would stretch it)."""
    import dataclasses

    from care_q.quant.calibrate import calibrate
    from care_q.transforms.deploy import reciprocal_normaliser

    torch.manual_seed(0)
    model = reciprocal_normaliser(deploy(create_model("care_test", num_classes=10)))
    plan = build_plan(trace(model, torch.zeros(1, 3, 32, 32)),
                      dataclasses.replace(load_recipe("ptq_int8"), reciprocal_normaliser=True))
    calibrate(plan, model, [torch.randn(8, 3, 32, 32)], progress=False)
    nodes = [n for n in plan.graph.nodes if n.op == "reciprocal"]
    assert len(nodes) >= 2
    for n in nodes:  # this model's normalisers stay far above one LSB: the calibrated range is kept
        d, r = plan.qp(n.inputs[0]), plan.qp(n.outputs[0])
        assert plan.consts[n.inputs[0]] >= d.scale[0]  # the guard: den + eps >= one LSB
        assert r.hi == pytest.approx(plan.ranges[n.outputs[0]][1], rel=1e-6) and r.hi < 1 / d.scale[0]
    first = nodes[0].outputs[0]  # as if calibration had seen a float normaliser of 1e-3 LSB
    d = plan.qp(nodes[0].inputs[0])
    plan.qparams[first] = qparams_from_range(0.0, 1000 / d.scale[0], DType.INT8, False)
    kept = {n.outputs[0]: plan.qp(n.outputs[0]) for n in nodes[1:]}
    plan._reciprocal_ranges()
    assert plan.qp(first) == qparams_from_range(0.0, 1 / d.scale[0], DType.INT8, False)
    assert any("capped" in w for w in plan.specs[first].why)
    assert all(plan.qp(t) == q for t, q in kept.items())


def test_rule_matching_nothing_is_an_error(graph):
    r = parse_recipe("name: x\nrules:\n  - tensors: 'nothing\\..*'\n    method: mse\n", "<r>")
    with pytest.raises(CareQError, match="rule 0 .*matches no tensor"):
        build_plan(graph, r)


def test_int16_rule(graph):
    plan = build_plan(graph, load_recipe("ptq_a16w8_attention"))
    assert plan.specs["stages.2.blocks.0.attn.num"].dtype == DType.INT16
    assert plan.specs["stages.2.blocks.0.attn.num"].symmetric


def test_int8_logits_range_starts_at_the_top5_floor():
    """int8 head: the logits' scale covers [lowest 5th-largest logit, highest logit], not the minimum."""
    from care_q.quant.calibrate import calibrate

    torch.manual_seed(0)
    model = deploy(create_model("care_test", num_classes=10))
    with torch.no_grad():  # make the logits spread out, so the floor is well below the top
        model.fc.weight.mul_(200.0)
    plan = build_plan(trace(model, torch.zeros(1, 3, 32, 32)), load_recipe("ptq_int8"))
    x = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    calibrate(plan, model, [x[:12], x[12:]], progress=False)
    with torch.no_grad():
        y = model(x)
    floor, hi = float(y.topk(5, dim=1).values[:, -1].min()), float(y.max())
    assert float(y.min()) < floor < 0 < hi
    qp = plan.qp("head.fc")
    assert qp.scale[0] == pytest.approx((hi - floor) / 255, rel=1e-6)
    assert plan.output_qparams == qp
    # the float-head recipe keeps the plain minmax output range
    plan2 = build_plan(trace(model, torch.zeros(1, 3, 32, 32)), parse_recipe("name: x\n", "<r>"))
    calibrate(plan2, model, [x[:12], x[12:]], progress=False)
    assert plan2.output_qparams.scale[0] == pytest.approx((hi - float(y.min())) / 255, rel=1e-6)


# ---------------------------------------------------------------------- exact integer products

@pytest.mark.parametrize("x_max,k", [(127, 64), (255, 3000), (255, 9000), (255, 300_000)])
def test_integer_product_is_exact(x_max, k):
    """float32 where |sum| < 2^24 is provable, hi/lo split or float64 otherwise: always the exact sum."""
    import numpy as np


    g = torch.Generator().manual_seed(k)
    x = torch.randint(-x_max, x_max + 1, (3, k), generator=g).double()
    w = torch.randint(-127, 128, (k, 5), generator=g).double()
    w[:, 0] = 127  # the worst case column
    got = integer_product(lambda a, b: a @ b, x, w, w.abs().sum(0).max())
    ref = (x.numpy().astype(np.int64) @ w.numpy().astype(np.int64)).astype(np.float64)
    assert got.dtype == torch.float64 and np.array_equal(got.numpy(), ref)


def test_integer_product_split_bounds_the_low_part():
    # small codes (31 = 16 + 15) over a long sum: the split's low part (15 per term) alone
    # exceeds 2^24 in float32 (20,000 x 127 x 15 = 38.1M): it must fall back to float64

    x = torch.full((1, 20_000), 31.0, dtype=torch.float64)
    w = torch.full((20_000, 1), 127.0, dtype=torch.float64)
    got = integer_product(lambda a, b: a @ b, x, w, 20_000 * 127)
    assert got.item() == 31 * 127 * 20_000


def test_fake_quant_fast_path_is_bit_identical():
    import numpy as np

    from care_q.quant.fakequant import fake_quant
    from care_q.quant.qtypes import QParams

    torch.manual_seed(0)
    for sc, zp in [(0.0371, -5), (1 / 256, -128), (3.3e-4, 17)]:
        x = torch.randn(100_000) * sc * 60
        x[:200] = (torch.arange(200) - 100 + 0.5) * float(np.float32(sc))  # rounding ties
        qp = QParams((sc,), (zp,), DType.INT8)
        assert torch.equal(fake_quant(x, qp), torch.fake_quantize_per_tensor_affine(x, sc, zp, -128, 127))


def test_exact_conv_float32_path_is_the_float64_path(monkeypatch):
    """The float32 fast path of the exact reference's convs gives the float64 path's outputs bit for
    bit (whole model, both references), and steps aside where its bounds fail."""
    from care_q.graph.trace import trace
    from care_q.models import create_model
    from care_q.quant.calibrate import calibrate
    from care_q.quant.fakequant import QuantOps
    from care_q.quant.plan import build_plan
    from care_q.quant.recipe import load_recipe
    from care_q.transforms import deploy

    with torch.random.fork_rng():  # leave the global RNG as it was for the tests after this one
        torch.manual_seed(0)
        model = deploy(create_model("care_test", num_classes=10))
        calib = torch.randn(16, 3, 32, 32)
    plan = build_plan(trace(model, torch.zeros(1, 3, 32, 32)), load_recipe("ptq_int8"))
    calibrate(plan, model, [calib], progress=False)
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    calls = {"fast": 0, "none": 0}
    fast = QuantOps._exact_conv_f32

    def counted(self, *a):
        y = fast(self, *a)
        calls["fast" if y is not None else "none"] += 1
        return y

    monkeypatch.setattr(QuantOps, "_exact_conv_f32", counted)
    with torch.no_grad():
        got = {e: model(x, QuantOps(plan, "quant", exact=e)) for e in (True, "xnnpack")}
    assert calls["fast"] > 20
    monkeypatch.setattr(QuantOps, "_exact_conv_f32", lambda self, *a: None)
    with torch.no_grad():
        for e, y in got.items():
            assert torch.equal(y, model(x, QuantOps(plan, "quant", exact=e)))
    # bounds: a bias code of 2^24 cannot take the float32 path
    ops = QuantOps(plan, "quant", exact=True)
    n = next(n for n in plan.graph.nodes if n.op == "conv")
    w_int, s_w, b_int = ops._int_weights(n.module.weight, n.module.bias, plan.graph_inputs[n.name][0])
    x0 = torch.zeros(1, n.module.in_channels, 8, 8)
    args = (n.module.stride, n.module.padding, n.module.dilation, n.module.groups)
    s_in = torch.tensor(1.0)
    assert fast(ops, n.name, x0, plan.graph_inputs[n.name][0], w_int, s_w, b_int, args, s_in, 1.0) is not None
    b_big = b_int.clone()
    b_big[0] = 2.0 ** 24
    assert fast(ops, n.name, x0, plan.graph_inputs[n.name][0], w_int, s_w, b_big, args, s_in, 1.0) is None
