"""`synthetic_bn`: data-free inputs whose BatchNorm statistics approach the running statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from care_q import CareQError, create_model
from care_q.data import check_classes, get_dataset, make_loader
from care_q.data.synthetic import bn_stat_loss, synthesize_bn_inputs
from care_q.models import PreprocessConfig, load_sidecar
from care_q.models.builder import IMAGENET_MEAN, IMAGENET_STD
from care_q.transforms.deploy import deploy

MEAN = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Image-like inputs: low-frequency colour fields in [0, 1], normalised."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    x = (x + 0.05 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    return (x - MEAN) / STD


@pytest.fixture(scope="module")
def model():
    """care_test whose BN running statistics are those of image-like data (not the 0/1 init)."""
    torch.manual_seed(0)
    m = create_model("care_test", num_classes=10)
    for bn in m.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.momentum = None  # cumulative average
            bn.reset_running_stats()
    m.train()
    with torch.no_grad():
        m(_smooth_images(64, 32, seed=1))
    m.eval()
    return m


def test_bn_statistics_move_to_running_stats(model):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    x = synthesize_bn_inputs(model, 16, 32, steps=20, batch_size=16, seed=0, progress=False)
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    noise = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    start = bn_stat_loss(model, noise.clamp((0 - MEAN) / STD, (1 - MEAN) / STD))
    end = bn_stat_loss(model, x)
    real = bn_stat_loss(model, _smooth_images(16, 32, seed=2))
    assert end < start / 3, (start, end)
    assert end < 3 * real, (end, real)  # near what real data of that kind gives
    # pixels stay in what a [0, 1] image can give after Normalize
    assert (x * STD + MEAN).min() >= -1e-5 and (x * STD + MEAN).max() <= 1 + 1e-5
    # the model is untouched: weights, BN statistics, eval mode
    assert not model.training
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_deterministic_with_seed(model):
    a = synthesize_bn_inputs(model, 4, 32, steps=3, batch_size=4, seed=7, progress=False)
    b = synthesize_bn_inputs(model, 4, 32, steps=3, batch_size=4, seed=7, progress=False)
    c = synthesize_bn_inputs(model, 4, 32, steps=3, batch_size=4, seed=8, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_training_flag_restored(model):
    model.train()
    try:
        synthesize_bn_inputs(model, 2, 32, steps=1, batch_size=2, progress=False)
        assert model.training
    finally:
        model.eval()


def test_get_dataset_synthetic_bn(model):
    pp = PreprocessConfig().with_size(32)
    ds = get_dataset("synthetic_bn", pp, model=model, limit=6, seed=0, progress=False)
    assert len(ds) == 6
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y == -1
    xb, yb = next(iter(make_loader(ds, batch_size=6)))
    assert xb.shape == (6, 3, 32, 32) and yb.tolist() == [-1] * 6
    with pytest.raises(CareQError, match="no labels"):
        check_classes(ds, 10)
    with pytest.raises(CareQError, match="model=model"):
        get_dataset("synthetic_bn", pp)
    with pytest.raises(CareQError, match="not the deploy form"):
        get_dataset("synthetic_bn", pp, model=deploy(model), limit=2)
    with pytest.raises(CareQError, match="cannot train"):
        get_dataset("synthetic_bn", pp, model=model, train=True)


def test_proxy_statistics(proxy_ckpt):
    """On the trained proxy (real BN statistics), a few steps already cut L_bn by a large factor."""
    m = create_model("care_s0", weights=proxy_ckpt)
    pp = load_sidecar(proxy_ckpt)
    x = synthesize_bn_inputs(m, 8, 64, steps=12, batch_size=8, seed=0, mean=pp.mean, std=pp.std,
                             progress=False)
    noise = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    lo = (0 - torch.tensor(pp.mean).reshape(1, 3, 1, 1)) / torch.tensor(pp.std).reshape(1, 3, 1, 1)
    hi = (1 - torch.tensor(pp.mean).reshape(1, 3, 1, 1)) / torch.tensor(pp.std).reshape(1, 3, 1, 1)
    start, end = bn_stat_loss(m, torch.max(torch.min(noise, hi), lo)), bn_stat_loss(m, x)
    assert end < start / 4, (start, end)
