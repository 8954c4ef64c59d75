"""One-op models of a .tflite (as written and as float islands), profiles, the bound, the kernel choice."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter
from one_op import SA, SB, SO, ZO, div_chain

from care_q.errors import CareQError
from care_q.export.tflite_profile import (
    PROFILE_FORMAT,
    choose_float_kernels,
    load_profile,
    measure,
    op_forms,
    save_profile,
    summarize,
)


def _run(model: bytes, *inputs) -> np.ndarray:
    it = Interpreter(model_content=model, num_threads=1)
    it.allocate_tensors()
    for d, v in zip(it.get_input_details(), inputs):
        it.set_tensor(d["index"], v)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


def test_float_island_computes_the_op_in_float_on_the_same_grids():
    forms = op_forms(div_chain(1))
    assert [f.op for f in forms] == ["DIV"]
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, (1, 4, 8, 3)).astype(np.int8)
    d = rng.integers(1, 128, (1, 4, 8, 3)).astype(np.int8)
    got = _run(forms[0].island, a, d).astype(np.int64)
    # analytic: float32 division of the dequantized values, round half to even onto the output grid
    q = np.float32(a * np.float32(SA)) / np.float32(d * np.float32(SB))
    want = np.clip(np.round(q.astype(np.float64) / SO) + ZO, -128, 127)
    assert np.abs(got - want).max() <= 1  # XNNPACK's QUANTIZE multiplies by 1/scale: ties may differ
    assert (got == want).mean() > 0.99
    # the op as written is TFLite's int8 DIV: the same values up to its fixed-point reciprocal
    written = _run(forms[0].int8, a, d).astype(np.int64)
    assert np.abs(written - want).max() <= 1


def test_signatures_group_identical_ops_and_split_different_ones():
    forms = op_forms(div_chain(3))
    # the first two DIVs read and write (a-grid, b-grid) tensors of one shape; the last writes another grid
    assert forms[0].signature == forms[1].signature
    assert forms[2].signature == forms[0].signature  # quantization parameters do not change the cost
    other = op_forms(div_chain(1, shape=(1, 8, 8, 3)))
    assert other[0].signature != forms[0].signature
    assert [f.output for f in op_forms(div_chain(3), only={"y1"})] == ["y1"]


def _profile(int8_ms: float, float_ms: float | None, data: bytes) -> dict:
    sig = op_forms(data)[0].signature
    return {"format": PROFILE_FORMAT, "device": "test", "ops": {sig: {"int8_ms": int8_ms, "float_ms": float_ms}}}


def test_summary_bound_is_the_sum_of_the_faster_forms():
    data = div_chain(3)
    s = summarize(data, _profile(2.0, 0.5, data))
    assert s["ms"] == pytest.approx(6.0) and s["bound_ms"] == pytest.approx(1.5)
    assert [r["form"] for r in s["rows"]] == ["float"] * 3
    assert s["groups"] == [{"op": "DIV", "dtype": "int8", "count": 3, "ms": 6.0, "best_ms": 1.5, "float_faster": 3}]
    with pytest.raises(CareQError, match="no timing for 1 of the model's ops"):
        summarize(div_chain(1, shape=(1, 8, 8, 3)), _profile(2.0, 0.5, data))


@pytest.mark.parametrize(("float_ms", "chosen"), [(1.79, ["y0", "y1"]), (1.81, [])])
def test_choice_needs_the_island_within_the_margin(float_ms, chosen):
    data = div_chain(3)
    c = choose_float_kernels(data, _profile(2.0, float_ms, data), {"y0", "y1"}, margin=0.9)
    assert c["float"] == chosen
    assert c["saved_ms"] == pytest.approx(len(chosen) * (2.0 - float_ms))


def test_a_profile_in_blocks_needs_every_block_for_an_island():
    data = div_chain(3)
    prof = _profile(2.0, 1.7, data)
    (t,) = prof["ops"].values()
    t["blocks"] = [[2.0, 1.7], [2.0, 1.9], [2.1, 1.6]]  # the second block finds the island 5% faster only
    c = choose_float_kernels(data, prof, {"y0", "y1"}, margin=0.9)
    assert c["float"] == [] and c["close"] == ["y0", "y1"] and c["close_ms"] == pytest.approx(2 * 0.3)
    t["blocks"][1] = [2.0, 1.8]                          # 90%: every block agrees
    c = choose_float_kernels(data, prof, {"y0", "y1"}, margin=0.9)
    assert c["float"] == ["y0", "y1"] and c["close"] == []
    t["blocks"] = [[2.0, 1.95]] * 3                      # no block: int8, and not close
    assert choose_float_kernels(data, prof, {"y0"}, margin=0.9)["close"] == []


def test_measured_profile_times_each_signature_once():
    data = div_chain(3)
    prof = measure(data, threads=1, runs=3, warmup=1)
    assert len(prof["ops"]) == 1 and prof["overhead_ms"] > 0
    (t,) = prof["ops"].values()
    assert t["int8_ms"] >= 0 and t["float_ms"] >= 0
    prof = measure(data, threads=1, runs=3, warmup=1, blocks=3)   # each block in a process of its own
    (t,) = prof["ops"].values()
    assert prof["blocks"] == 3 and len(t["blocks"]) == 3
    assert t["int8_ms"] == float(np.median([b[0] for b in t["blocks"]]))
    assert t["float_ms"] == float(np.median([b[1] for b in t["blocks"]]))


def test_profile_files_round_trip_and_bad_ones_are_named(tmp_path):
    data = div_chain(1)
    p = tmp_path / "p.json"
    save_profile(_profile(1.0, 0.5, data), p)
    assert load_profile(p)["ops"] == _profile(1.0, 0.5, data)["ops"]
    with pytest.raises(CareQError, match="does not exist"):
        load_profile(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CareQError, match="is not JSON"):
        load_profile(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"ops": {}}))
    with pytest.raises(CareQError, match="not a care-q kernel profile"):
        load_profile(tmp_path / "other.json")
    with pytest.raises(CareQError, match="not a TFLite flatbuffer"):
        op_forms(b"not a model")
