"""The NPU graph family (issue 20): recipe npu_int8_ptq (and its ``npu.normaliser`` variants: rsqrtden is
npu_int8_ptq_ethosu's), care_test at 32x32, calibrated on 16 images.

- ``npu.normaliser: rsqrt`` and ``rsqrtden`` (the exact num / den as (num RSQRT(den)) RSQRT(den)): compiled
  live by Vela for ethos-u55-128 and ethos-u85-256 with no CPU op (one NPU segment from the int8 input to
  the int8 logits); the rule census puts every MAC on the Edge TPU and NNAPI FL7, and says RSQRT is why
  NNAPI FL6 cannot take it;
- ``npu.normaliser: l2`` and ``l2den`` (the L2 of the numerator with the weighted denominator appended):
  every MAC on NNAPI FL6 and the Edge TPU; on Ethos-U exactly the L2_NORMALIZATION ops stay on the CPU
  (Vela: "Unsupported opType");
- both files are bit-exact with their references in ai-edge-litert; the new kernels (TFLite's
  int8 RSQRT, XNNPACK's int8 SUB) are emulated bit for bit on every code;
- in FP32 l2 and rsqrt are the same function, l2den is out / sqrt(||out||^2 + c^2) of the attention output
  out = num / den, rsqrtden is out itself, and the NPU head is the exact head with GELU as x * sigmoid(1.702 x)."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ai_edge_litert import schema_py_generated as fb
from one_op import run_one_op

from care_q import create_model
from care_q.census import check
from care_q.census.tflite_reader import read_tflite
from care_q.errors import CareQError
from care_q.export.tflite_builder import options
from care_q.graph.ops import FloatOps
from care_q.pipeline import PrepareConfig, artifacts, prepare
from care_q.quant import fakequant
from care_q.quant.emulation.tflite import tflite_rsqrt_codes
from care_q.quant.emulation.xnnpack import xnnpack_add_codes
from care_q.quant.fakequant import QuantOps
from care_q.quant.recipe import load_recipe
from care_q.runtime import load_runner
from care_q.transforms import deploy
from care_q.transforms.substitute import gelu_to_silu, npu_attention, npu_head, substitution_params

OP = fb.BuiltinOperator
VELA = ("ethos-u55-128", "ethos-u85-256")
RULES = ("edgetpu", "nnapi:6", "nnapi:7")


# ((s_in, z_in, s_out, z_out), whether rounding the float 1/sqrt misses a code)
RSQRT_SCALES = [((0.5219969945211076, -121, 0.015428238635520607, -26), True), ((0.01, -128, 0.05, -128), False),
                ((0.003, -128, 0.2, -100), False), ((0.1, -128, 0.01, -128), False), ((2e-4, -110, 0.4, -60), True)]


@pytest.mark.parametrize("scales,float_misses", RSQRT_SCALES)
def test_tflite_int8_rsqrt_emulation(scales, float_misses):
    """Every input code at or above the zero point (the kernel fails below it)."""
    s_in, z_in, s_out, z_out = scales
    codes = np.arange(z_in, 128, dtype=np.int8).reshape(1, -1)
    got = run_one_op(OP.RSQRT, [(codes.shape, s_in, z_in)], (codes.shape, s_out, z_out), [codes])[0]
    emu = tflite_rsqrt_codes(torch.from_numpy(codes[0].astype(np.int64) - z_in), s_in, s_out, z_out).numpy() + z_out
    assert np.array_equal(emu, got) and got[0] == 127   # x = 0: the kernel's largest code
    x = (codes[0].astype(np.float64)[1:] - z_in) * s_in
    rounded = np.clip(np.rint(1.0 / np.sqrt(x) / s_out) + z_out, -128, 127)
    assert (rounded != got[1:]).any() == float_misses  # fixed point, not float rounding


@pytest.mark.parametrize("scales,float_misses", [((0.02, -3, 0.015, 10, 0.03, 5), True),
                                                 ((0.1, 0, 0.01, -128, 0.05, -20), False)])
def test_xnnpack_int8_sub_emulation(scales, float_misses):
    """All 65,536 code pairs: XNNPACK's SUBTRACT is its ADD of the negated second input."""
    sa, za, sb, zb, so, zo = scales
    a = np.repeat(np.arange(-128, 128), 256).astype(np.int8).reshape(1, -1)
    b = np.tile(np.arange(-128, 128), 256).astype(np.int8).reshape(1, -1)
    got = run_one_op(OP.SUB, [(a.shape, sa, za), (b.shape, sb, zb)], (a.shape, so, zo), [a, b],
               fb.BuiltinOptions.SubOptions, options(fb.SubOptionsT))[0]
    ia, ib = (torch.from_numpy(v[0].astype(np.float64) - z) for v, z in ((a, za), (b, zb)))
    emu = xnnpack_add_codes(ia, -ib, sa, sb, so, -128 - zo, 127 - zo).numpy() + zo
    assert np.array_equal(emu, got)
    rounded = np.clip(np.rint(((ia - ib * sb / sa) * sa).numpy() / so) + zo, -128, 127)
    assert (rounded != got).any() == float_misses  # XNNPACK's fixed point rounds half up, not to even


# ----------------------------------------------------------------------------- FP32 semantics
@torch.no_grad()
def test_normaliser_forms_are_one_fp32_function():
    """rsqrt (x / rms) with the scale / sqrt(D) and l2 (x / ||x||) with sqrt(C) in the classifier:
    the same logits; the NPU head is the LayerNorm head with GELU as x sigmoid(1.702 x)."""
    torch.manual_seed(0)
    base = gelu_to_silu(deploy(create_model("care_test", num_classes=10)))
    base.blocks[-1].inter2_conv.weight.mul_(1e4)  # features of O(1), not the random init's 1e-5 (L2's eps)
    x, cal = torch.randn(4, 3, 32, 32), torch.randn(8, 3, 32, 32)
    forms = {f: npu_head(npu_attention(base, cal, f), f) for f in ("l2", "rsqrt")}
    y_l2, y_rs = forms["l2"](x), forms["rsqrt"](x)
    assert torch.allclose(y_l2, y_rs, rtol=1e-4, atol=1e-4 * float(y_l2.abs().max()))
    # the head by hand: pool, GELU ~ x sigmoid(1.702 x), LayerNorm (its eps dropped), the classifier
    att = npu_attention(base, cal, "l2")
    feats = att.forward_features(x, FloatOps()).mean((2, 3))
    h = feats * torch.sigmoid(1.702 * feats)
    want = F.linear(F.layer_norm(h, h.shape[-1:], eps=0.0), att.fc.weight, att.fc.bias)
    assert torch.allclose(y_rs, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def _npu_attention_by_hand(att, x: torch.Tensor) -> torch.Tensor:
    """The attention output num / den of the NPU kernel per head, (B, heads, N, D), from the kernel's
    features, k^T v and the sum of k over the tokens."""
    b, heads, n = x.shape[0], att.num_heads, x.shape[2] * x.shape[3]
    d = att.mem_dim // heads
    qk = att.qk(x)
    phi = F.relu(qk) + torch.sigmoid(att.phi_aff(qk)) * att.phi_exp_scale
    q, k = (phi[:, j * att.mem_dim:(j + 1) * att.mem_dim].reshape(b, heads, d, n).transpose(2, 3) for j in (0, 1))
    v = x.reshape(b, heads, d, n).transpose(2, 3)
    return (q @ (k.transpose(2, 3) @ v)) / (q @ k.sum(2, keepdim=True).transpose(2, 3))


@torch.no_grad()
def test_l2den_is_the_attention_output_with_its_norm_compressed():
    """l2den: L2_NORMALIZATION of [num, c den] keeps num's channels: out / sqrt(||out||^2 + c^2) per head
    and token, with out = num / den the attention output of the NPU kernel, times the output scale."""
    torch.manual_seed(0)
    model = npu_attention(deploy(create_model("care_test", num_classes=10)), torch.randn(8, 3, 32, 32), "l2den")
    att = next(b.attn for b in model.blocks if b.attention)
    heads = att.num_heads
    assert sorted(k for k in substitution_params(att) if "den_weight" in k) == [f"den_weight.{i}" for i in range(heads)]
    c = torch.tensor([0.3, 2.0])[:heads]
    for i in range(heads):
        att.den_weight[i].fill_(c[i])
    x = torch.randn(2, att.mem_dim, 4, 4)
    got = att(x, FloatOps(), "attn")
    out = _npu_attention_by_hand(att, x)
    want = out / torch.sqrt(out.pow(2).sum(-1, keepdim=True) + c.reshape(1, heads, 1, 1) ** 2)
    want = want.transpose(2, 3).reshape(2, att.mem_dim, 4, 4) * att.out_scale.reshape(1, -1, 1, 1)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


@torch.no_grad()
def test_rsqrtden_is_the_exact_attention_output():
    """rsqrtden: (num RSQRT(den)) RSQRT(den) is num / den, the attention output of the NPU kernel, exactly;
    its output scale starts at 1 and it has no denominator weight to learn."""
    torch.manual_seed(0)
    model = npu_attention(deploy(create_model("care_test", num_classes=10)), torch.randn(8, 3, 32, 32), "rsqrtden")
    att = next(b.attn for b in model.blocks if b.attention)
    assert torch.equal(att.out_scale, torch.ones(att.mem_dim))
    assert sorted(substitution_params(att)) == ["out_scale", "phi_aff.bias", "phi_aff.weight"]
    x = torch.randn(2, att.mem_dim, 4, 4)
    got = att(x, FloatOps(), "attn")
    want = _npu_attention_by_hand(att, x).transpose(2, 3).reshape(2, att.mem_dim, 4, 4)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_npu_options_bad_input(tmp_path):
    base = deploy(create_model("care_test", num_classes=10))
    with pytest.raises(CareQError, match="NPU normaliser 'l1'"):
        npu_head(base, "l1")
    src = Path(load_recipe("npu_int8_ptq").source).read_text()
    no_int8_head = tmp_path / "a.yaml"
    no_int8_head.write_text(src.replace("head: {dtype: int8, logits: full}\n", ""))
    with pytest.raises(CareQError, match=r"a.yaml:\d+: substitutions.head: npu is the int8 NPU head"):
        load_recipe(no_int8_head)
    stray = tmp_path / "b.yaml"
    stray.write_text(src.replace("substitutions: {gelu: sigmoid, attention: npu, head: npu}", "substitutions: {gelu: sigmoid}")
                     .replace("biases, substitution]", "biases]"))  # (learn: substitution would fail first)
    with pytest.raises(CareQError, match=r"b.yaml:\d+: the 'npu' section .* needs substitutions.attention: npu"):
        load_recipe(stray)
    bad = tmp_path / "c.yaml"
    bad.write_text(re.sub(r"npu: \{normaliser: \w+\}", "npu: {normaliser: l1}", src))
    with pytest.raises(CareQError, match="normaliser"):
        load_recipe(bad)


# ----------------------------------------------------------------------------- the graph at 32x32
def _recipe(form: str, tmp: Path) -> str | Path:
    """npu_int8_ptq without its reconstruction, with normaliser ``form`` (l2 as shipped, or rsqrt)."""
    src = Path(load_recipe("npu_int8_ptq").source).read_text().partition("\nreconstruction:")[0]
    path = tmp / f"npu_int8_ptq_{form}.yaml"  # the graph as calibrated (reconstruction: tests/quant/test_reconstruct.py)
    path.write_text(re.sub(r"npu: \{normaliser: \w+\}", f"npu: {{normaliser: {form}}}", src) + "\n")
    return path


RSQRT_FORMS = ("rsqrt", "rsqrtden")  # the forms without L2_NORMALIZATION (Ethos-U's)


@pytest.fixture(scope="module", params=["rsqrt", "rsqrtden", "l2", "l2den"])
def graph(request, tmp_path_factory, data_root, one_torch_thread):
    """(form, prep, path, census) of npu_int8_ptq's graph with normaliser ``form`` (untrained care_test)."""
    form, tmp = request.param, tmp_path_factory.mktemp(f"npu_{request.param}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        prep = prepare(PrepareConfig("care_test", recipe=_recipe(form, tmp), calib="cifar10_test", num_calib=16,
                                     img_size=32, data_root=data_root, progress=False))
    path = artifacts.emit("tflite", prep.plan, prep.recipe.io, tmp / "care_test_npu.tflite")
    return form, prep, path, check(path, targets=",".join(VELA + RULES), runtime=False)


def test_npu_graph_is_int8_in_to_int8_out(graph):
    form, prep, path, report = graph
    g = read_tflite(path)
    names = [o.name for o in report.ops]
    assert prep.recipe.kind == "ptq" and prep.recipe.npu_normaliser == form
    assert {"QUANTIZE", "DEQUANTIZE", "GELU", "DIV", "ELU", "BATCH_MATMUL"}.isdisjoint(names)
    assert all(o.dtype == "INT8" for o in report.ops)
    assert g.tensor(g.inputs[0]).dtype == "INT8" and g.tensor(g.outputs[0]).dtype == "INT8"
    norm = "RSQRT" if form in RSQRT_FORMS else "L2_NORMALIZATION"
    assert names.count(norm) == 7 and (form not in RSQRT_FORMS or "L2_NORMALIZATION" not in names)  # 6 heads + LN
    l2 = [i for i, n in enumerate(names) if n == "L2_NORMALIZATION"][:-1]  # the heads' (the last: the LayerNorm)
    around = {(names[i - 1], names[i + 1]) for i in l2}
    assert around == ({("CONCATENATION", "SLICE")} if form == "l2den" else around - {("CONCATENATION", "SLICE")})
    assert names[-3:] == ["RESHAPE", "CONV_2D", "RESHAPE"]  # the classifier: per-channel 1x1 conv


def test_npu_graph_is_bit_exact_in_litert(graph, monkeypatch):
    form, prep, path, _ = graph
    calls = {}
    for name in ("tflite_rsqrt_codes", "tflite_l2norm_codes", "xnnpack_add_codes", "xnnpack_mean_codes",
                 "xnnpack_mul_codes"):
        fn = getattr(fakequant, name)
        monkeypatch.setattr(fakequant, name, lambda *a, _n=name, _f=fn: calls.__setitem__(_n, calls.get(_n, 0) + 1) or _f(*a))
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = prep.dmodel(x, QuantOps(prep.plan, "quant", exact="xnnpack")).numpy()
    got = load_runner(path, threads=1)(x.numpy())
    assert np.array_equal(got, ref)
    assert calls.get("tflite_rsqrt_codes", 0) == (7 if form in RSQRT_FORMS else 0)
    assert calls.get("tflite_l2norm_codes", 0) == (0 if form in RSQRT_FORMS else 7)
    # l2den: c mean(k), its product with q; rsqrtden: q mean(k), num r, (num r) r
    assert calls["xnnpack_mul_codes"] >= {"l2den": 6 * 3, "rsqrtden": 6 * 3}.get(form, 0)
    assert calls["xnnpack_add_codes"] >= 1 + 3 + 6  # the head's SUB, the kernels' ADDs, the residuals
    assert len(set(ref.argmax(1))) > 1              # not a constant output


def test_npu_graph_on_ethos_u_by_vela(graph):
    form, _, _, report = graph
    names = [o.name for o in report.ops]
    for cfg in VELA:
        t = report.targets[cfg]
        assert t.source == "compiled"
        cpu = set(range(len(names))) - t.on_accelerator
        if form in RSQRT_FORMS:  # input to logits on the NPU: one segment
            assert cpu == set() and t.partitions == 1 and t.mac_share == 1.0
        else:               # exactly the L2 normalisations, each cutting the graph
            assert cpu == {i for i, n in enumerate(names) if n == "L2_NORMALIZATION"}
            assert all(t.verdicts[i].rule == "Unsupported opType" for i in cpu) and t.partitions == 8


def test_npu_graph_rule_census(graph):
    form, _, _, report = graph
    names = [o.name for o in report.ops]
    tpu, fl6, fl7 = (report.targets[k] for k in ("edgetpu", "nnapi:FL6", "nnapi:FL7"))
    assert tpu.mac_share == 1.0 and len(tpu.on_accelerator) == len(names)
    assert fl7.mac_share == 1.0 and fl7.partitions == 1
    if form not in RSQRT_FORMS:
        assert fl6.mac_share == 1.0 and fl6.partitions == 1
    else:  # NNAPI has int8 RSQRT from FL7 only
        rsqrt = [i for i, n in enumerate(names) if n == "RSQRT"]
        assert all(not fl6.verdicts[i].mapped and "FL" in fl6.verdicts[i].rule for i in rsqrt)
        assert fl6.mac_share < 1.0


def test_npu_graph_macs_match_float_head_graph(graph):
    """The head's LayerNorm ops carry no MACs the census could lose: every MAC-carrying op is a conv,
    depthwise conv or the classifier conv, and all of them are on the Edge TPU."""
    _, _, _, report = graph
    tpu = report.targets["edgetpu"]
    heavy = {o.name for o in report.ops if o.macs}
    assert heavy <= {"CONV_2D", "DEPTHWISE_CONV_2D", "MUL", "MEAN", "FULLY_CONNECTED"}
    assert tpu.macs_on_accelerator == tpu.macs_total == sum(o.macs for o in report.ops) > 0
    assert math.isclose(tpu.mac_share, 1.0)


# ----------------------------------------------------------------------------- QAT npu_int8: the same graph
@pytest.fixture(scope="module")
def toy_fp32(tmp_path_factory, one_torch_thread):
    """(image folder, checkpoint): care_test trained 4 epochs in FP32 on 3 classes of coloured noise."""
    from PIL import Image

    from care_q.train import train

    root = tmp_path_factory.mktemp("npu_qat")
    rng = np.random.default_rng(0)
    for c, rgb in {"r": (210, 50, 40), "g": (40, 200, 60), "b": (40, 60, 200)}.items():
        (root / "toy" / c).mkdir(parents=True)
        for i in range(16):
            arr = np.clip(np.array(rgb)[None, None] + rng.integers(-90, 90, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / "toy" / c / f"{i:02d}.png")
    res = train("care_test", str(root / "toy"), img_size=32, epochs=4, out=root / "fp32", batch_size=8, lr=3e-3,
                warmup_steps=0, seed=0, progress=False, log=lambda *a: None)
    return root, res.checkpoint


@pytest.mark.parametrize("form", ["l2", "rsqrt", "rsqrtden"])
def test_qat_npu_int8_trains_the_npu_graph_and_exports_it_bit_exact(toy_fp32, form):
    from care_q.qat import qat

    root, ckpt = toy_fp32
    rec = root / f"npu_int8_{form}.yaml"
    rec.write_text(Path(load_recipe("npu_int8").source).read_text()
                   .replace("npu: {normaliser: l2}", f"npu: {{normaliser: {form}}}"))
    rep = qat("care_test", ckpt, str(root / "toy"), recipe=rec, out=root / f"q_{form}", calib_images=16, seed=0,
              progress=False, log=lambda *a: None, threads=1, batch_size=8, epochs=0.4, lr=1e-4, num_verify=32)
    assert rep["finished"] and rep["train"]["steps"] == 2 and rep["io"] == "int8"
    v = rep["artifacts"]["tflite"]["verification"]
    assert v["max_abs_diff"] == 0.0 and v["top1_agreement"] == 1.0
    names = [o.name for o in read_tflite(rep["artifacts"]["tflite"]["path"]).ops]
    norm = "RSQRT" if form in RSQRT_FORMS else "L2_NORMALIZATION"
    assert names.count(norm) == 7 and "DEQUANTIZE" not in names and "GELU" not in names
