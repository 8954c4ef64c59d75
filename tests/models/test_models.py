"""Model zoo: official-key compatibility, exactness against the official outputs, sizes."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from care_q import create_model
from care_q.models.care import CARE_CONFIGS


@pytest.fixture(scope="module")
def ref(fixture_npz):
    return dict(np.load(fixture_npz))


@pytest.fixture(scope="module")
def s0(fixture_ckpt):
    return create_model("care_s0", weights=fixture_ckpt)


@pytest.mark.parametrize("size", [224, 64])
def test_matches_official_outputs(s0, ref, size):
    x = torch.from_numpy(ref[f"input_{size}"])
    with torch.no_grad():
        feats = s0.forward_features(x)
        outs = {"features": feats, "head": s0.head(feats), "dist_head": s0.dist_head(feats),
                "logits": s0(x)}
    for key, got in outs.items():
        want = ref[f"{key}_{size}"]
        scale = float(np.abs(want).max())
        err = float(np.abs(got.numpy() - want).max())
        assert err <= 1e-5 * max(scale, 1.0), f"{key}@{size}: max abs diff {err} (scale {scale})"


def test_official_key_names(fixture_ckpt):
    raw = torch.load(fixture_ckpt, map_location="cpu", weights_only=True)["model"]
    own = create_model("care_s0").state_dict()
    assert set(raw) == set(own)
    for key in ["stem.0.weight", "stages.1.downsample.0.running_var", "stages.1.downsample.1.weight",
                "stages.2.blocks.0.token_mixer.qk.weight", "stages.0.blocks.0.token_mixer.dwconvatt_1.weight",
                "stages.3.blocks.3.inter_layer.inter2_conv.weight", "stages.0.blocks.0.gamma",
                "head.norm.weight", "dist_head.fc.bias"]:
        assert key in own, key
    assert "stages.3.blocks.3.inter_layer.inter2_fc2.weight" not in own  # last block: no fc2
    assert "stages.3.blocks.3.gamma" not in own


@pytest.mark.parametrize("name,params", [("care_s0", 7.34e6), ("care_s1", 9.60e6), ("care_s2", 19.48e6)])
def test_parameter_counts(name, params):
    n = sum(p.numel() for p in create_model(name).parameters())
    assert abs(n - params) / params < 0.005, (name, n)


def test_eval_mode_and_num_classes(proxy_ckpt):
    m = create_model("care_s0", weights=proxy_ckpt)
    assert not m.training
    assert m.num_classes == 10
    assert m.pretrained_cfg["input_size"] == (3, 64, 64)
    assert m.pretrained_cfg["interpolation"] == "bilinear"


def test_timm_registration():
    import care_q.models  # noqa: F401  (registers)

    assert "care_s1" in timm.list_models("care_*")
    m = timm.create_model("care_s0", num_classes=10)
    assert m.num_classes == 10 and m(torch.zeros(1, 3, 64, 64)).shape == (1, 10)


def test_configs_cover_official_sizes():
    assert CARE_CONFIGS["care_s2"].mem_dims == (8, 16, 48, 96)
    assert CARE_CONFIGS["care_s1"].depths == (3, 6, 10, 6)
