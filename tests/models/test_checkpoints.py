"""Checkpoint loading: formats accepted and every bad input named clearly."""

from __future__ import annotations

import pickle

import pytest
import torch

from care_q import CareQError, create_model


def test_bare_and_prefixed_state_dicts(tmp_path, fixture_ckpt):
    sd = torch.load(fixture_ckpt, map_location="cpu", weights_only=True)["model"]
    torch.save(sd, tmp_path / "bare.pth")
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ddp.pth")
    x = torch.randn(1, 3, 64, 64)
    ref = create_model("care_s0", weights=fixture_ckpt)(x)
    for f in ("bare.pth", "ddp.pth"):
        out = create_model("care_s0", weights=tmp_path / f)(x)
        assert torch.equal(out, ref)


def test_missing_file(tmp_path):
    with pytest.raises(CareQError, match="not found"):
        create_model("care_s0", weights=tmp_path / "nope.pth")


def test_truncated(tmp_path, fixture_ckpt):
    data = fixture_ckpt.read_bytes()
    (tmp_path / "t.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(CareQError, match="truncated or corrupt"):
        create_model("care_s0", weights=tmp_path / "t.pth")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_malicious_pickle_refused(tmp_path, capsys):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(CareQError, match="weights_only"):
        create_model("care_s0", weights=tmp_path / "evil.pth")
    assert "pwned" not in capsys.readouterr().out


def test_other_size_named(fixture_ckpt):
    with pytest.raises(CareQError, match=r"does not fit model 'care_s1'.*care_s0"):
        create_model("care_s1", weights=fixture_ckpt)


def test_missing_and_unexpected_keys(tmp_path, fixture_ckpt):
    sd = torch.load(fixture_ckpt, map_location="cpu", weights_only=True)["model"]
    sd.pop("stem.0.weight")
    sd["extra.weight"] = torch.zeros(1)
    torch.save({"model": sd}, tmp_path / "k.pth")
    with pytest.raises(CareQError, match=r"1 missing key.*stem.0.weight.*1 unexpected key.*extra.weight"):
        create_model("care_s0", weights=tmp_path / "k.pth")


def test_num_classes_mismatch(proxy_ckpt):
    with pytest.raises(CareQError, match="num_classes=1000.*10-class head"):
        create_model("care_s0", weights=proxy_ckpt, num_classes=1000)


def test_unknown_model():
    with pytest.raises(CareQError, match="unknown model 'care_s9'.*care_s0"):
        create_model("care_s9")


def test_bad_sidecar(tmp_path, proxy_ckpt):
    import shutil

    shutil.copy(proxy_ckpt, tmp_path / "m.pth")
    (tmp_path / "m.json").write_text('{"input_size": [3, 64, 64], "colour": 1}')
    with pytest.raises(CareQError, match="unknown key.*colour"):
        create_model("care_s0", weights=tmp_path / "m.pth")
