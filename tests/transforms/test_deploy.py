"""Deploy form: equal to the original in FP32 for all sizes and resolutions."""

from __future__ import annotations

import pytest
import torch

from care_q import create_model
from care_q.transforms import deploy
from care_q.transforms.deploy import DeployCARE


def _randomise(model):
    g = torch.Generator().manual_seed(0)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.5)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.weight.data.copy_(1 + 0.3 * torch.randn(mod.num_features, generator=g))
            mod.bias.data.copy_(0.3 * torch.randn(mod.num_features, generator=g))
        if isinstance(mod, torch.nn.LayerNorm):
            mod.weight.data.copy_(1 + 0.3 * torch.randn(mod.weight.shape, generator=g))
            mod.bias.data.copy_(0.3 * torch.randn(mod.bias.shape, generator=g))
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            p.data.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


def _check(model, size):
    d = deploy(model)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        a, b = model(x), d(x)
    scale = float(a.abs().max())
    assert float((a - b).abs().max()) <= 1e-4 * scale
    assert torch.equal(a.argmax(1), b.argmax(1))


@pytest.mark.parametrize("name", ["care_s0", "care_s1", "care_s2"])
@pytest.mark.parametrize("size", [64, 224, 256])
def test_deploy_equals_original(name, size):
    torch.manual_seed(0)
    _check(_randomise(create_model(name)), size)


def test_deploy_on_fixture(fixture_ckpt):
    _check(create_model("care_s0", weights=fixture_ckpt), 64)


def test_deploy_structure():
    d = deploy(_randomise(create_model("care_s0")))
    assert isinstance(d, DeployCARE)
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)) for m in d.modules())
    assert d.fc.weight.shape == (1000, 1024)  # one merged head
    assert deploy(d) is d


def test_channels_last_block_is_the_same_model_and_restores_nchw():
    # ptq's PyTorch passes run with the weights in channels_last (faster); the exporters read NCHW
    from care_q.utils.layout import channels_last

    d = deploy(_randomise(create_model("care_test", num_classes=10)).eval())
    params = list(d.parameters())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = d(x)
        with channels_last(d):
            assert d.stem.weight.is_contiguous(memory_format=torch.channels_last)
            got = d(x)
    assert all(p.is_contiguous() for p in d.parameters()) and list(d.parameters()) == params
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
