"""CARE Transformers (CVPR 2025), the official architecture re-implemented.

Read top to bottom: token mixer, interaction module, block, stage, network, variant table,
checkpoint filter, registration. Module and parameter names follow the official release
(``zhouyuan888888/CARETrans``, ``models/CARETrans.py``) so that official checkpoints load
unchanged.

Each block splits its input channels into a *memory* part (``dim - 3 * mem_dim`` channels,
passed through) and three feature parts of ``mem_dim`` channels: an "attention" part
(large-kernel depthwise convs in stages 1-2, linear attention in stages 3-4) and two
depthwise-conv parts (3x3 and 7x7). A dual interaction module mixes the parts with two
inverted-bottleneck MLPs; a layer scale weighs the block's residual branch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CARE", "CareConfig", "CARE_CONFIGS", "checkpoint_filter_fn"]


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """CARE's linear attention on (B, heads, N, D) tensors, official formulation.

    ``q`` and ``k`` are the raw projections; the kernel is elu(x) + 1.
    out = (phi(q) @ (phi(k)^T v / N)) * 1 / (phi(q) . mean(phi(k)) + 1e-6)
    """
    n = q.shape[-2]
    q = F.elu(q) + 1.0
    k = F.elu(k) + 1.0
    z = 1.0 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
    kv = (k.transpose(-2, -1) @ v) / n
    return (q @ kv) * z


class TokenMixer(nn.Module):
    """Asymmetric token mixer: memory passes through, features are mixed."""

    def __init__(self, dim: int, mem_dim: int, head_dim: int, attention: bool):
        super().__init__()
        self.attention = attention
        self.mem_dim = mem_dim
        self.head_dim = head_dim
        self.num_heads = mem_dim // head_dim
        self.split = (dim - 3 * mem_dim, mem_dim, mem_dim, mem_dim)
        if attention:
            self.qk = nn.Conv2d(mem_dim, 2 * mem_dim, kernel_size=1)
        else:
            self.dwconvatt_1 = nn.Conv2d(mem_dim, mem_dim, (11, 1), padding=(5, 0), groups=mem_dim)
            self.dwconvatt_2 = nn.Conv2d(mem_dim, mem_dim, (1, 11), padding=(0, 5), groups=mem_dim)
        self.dwconv1 = nn.Conv2d(mem_dim, mem_dim, 3, padding=1, groups=mem_dim)
        self.dwconv2 = nn.Conv2d(mem_dim, mem_dim, 7, padding=3, groups=mem_dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, _, h, w = t.shape
        return t.reshape(b, self.num_heads, self.head_dim, h * w).transpose(-2, -1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mem, att, c1, c2 = torch.split(x, self.split, dim=1)
        if self.attention:
            b, c, h, w = att.shape
            q, k = torch.split(self.qk(att), self.mem_dim, dim=1)
            out = linear_attention(self._heads(q), self._heads(k), self._heads(att))
            att = out.transpose(-2, -1).reshape(b, c, h, w)
        else:
            att = self.dwconvatt_1(att) + self.dwconvatt_2(att)
        return mem, torch.cat([att, self.dwconv1(c1), self.dwconv2(c2)], dim=1)


class InterModule(nn.Module):
    """Dual interaction: an MLP over the features, then one over memory + features."""

    def __init__(self, dim: int, mem_dim: int, ratios: tuple[int, int], last: bool):
        super().__init__()
        self.last = last
        r1, r2 = ratios
        d1 = 3 * mem_dim
        self.inter1_norm = nn.BatchNorm2d(d1)
        self.inter1_fc1 = nn.Conv2d(d1, r1 * d1, 1)
        self.inter1_act = nn.GELU()
        self.inter1_conv = nn.Conv2d(r1 * d1, r1 * d1, 3, padding=1, groups=r1 * d1)
        self.inter1_fc2 = nn.Conv2d(r1 * d1, d1, 1)
        self.inter2_norm = nn.BatchNorm2d(dim)
        self.inter2_fc1 = nn.Conv2d(dim, r2 * dim, 1)
        self.inter2_act = nn.GELU()
        self.inter2_conv = nn.Conv2d(r2 * dim, r2 * dim, 3, padding=1, groups=r2 * dim)
        if not last:
            self.inter2_fc2 = nn.Conv2d(r2 * dim, dim, 1)

    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        mem, feats = x
        h = self.inter1_conv(self.inter1_act(self.inter1_fc1(self.inter1_norm(feats))))
        feats = self.inter1_fc2(h) + feats
        cat = torch.cat([mem, feats], dim=1)
        h = self.inter2_conv(self.inter2_act(self.inter2_fc1(self.inter2_norm(cat))))
        if self.last:
            return h
        return self.inter2_fc2(h) + cat


class CAREBlock(nn.Module):
    def __init__(self, dim: int, mem_dim: int, head_dim: int, ratios, attention: bool,
                 last: bool, ls_init_value: float = 1e-6):
        super().__init__()
        self.last = last
        self.token_mixer = TokenMixer(dim, mem_dim, head_dim, attention)
        self.inter_layer = InterModule(dim, mem_dim, ratios, last)
        if not last:
            self.gamma = nn.Parameter(ls_init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inter_layer(self.token_mixer(x))
        if self.last:
            return y
        return y * self.gamma.reshape(1, -1, 1, 1) + x


class CAREStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, mem_dim: int, head_dim: int,
                 ratios, attention: bool, downsample: bool, last_stage: bool):
        super().__init__()
        if downsample:
            self.downsample = nn.Sequential(nn.BatchNorm2d(in_dim), nn.Conv2d(in_dim, dim, 2, stride=2))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[
            CAREBlock(dim, mem_dim, head_dim, ratios, attention, last=last_stage and i == depth - 1)
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class Head(nn.Module):
    """Global average pool, GELU, LayerNorm, Linear."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.act(x.mean((2, 3)))))


@dataclass(frozen=True)
class CareConfig:
    depths: tuple[int, int, int, int]
    feat_dims: tuple[int, int, int, int]
    mem_dims: tuple[int, int, int, int]
    ratios: tuple[tuple[int, int], ...]
    cls_dim: int
    head_dims: tuple[int, int, int, int] = (1, 1, 16, 32)
    attention_from_stage: int = 2

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(f + m for f, m in zip(self.feat_dims, self.mem_dims))


# Widths and depths of the official release; variant functions only pick from here.
CARE_CONFIGS: dict[str, CareConfig] = {
    "care_s0": CareConfig((2, 4, 8, 4), (24, 48, 96, 192), (8, 16, 32, 64),
                          ((2, 2), (2, 4), (4, 4), (4, 4)), 1024),
    "care_s1": CareConfig((3, 6, 10, 6), (24, 48, 96, 192), (8, 16, 32, 64),
                          ((2, 4), (2, 4), (4, 4), (4, 4)), 1024),
    "care_s2": CareConfig((3, 6, 10, 6), (24, 48, 144, 288), (8, 16, 48, 96),
                          ((4, 4), (4, 4), (4, 4), (4, 4)), 1536),
    # A tiny variant with the same structure, for fast tests only (not an official size).
    "care_test": CareConfig((1, 1, 2, 1), (12, 24, 48, 48), (4, 8, 16, 16),
                            ((2, 2), (2, 2), (2, 2), (2, 2)), 128, head_dims=(1, 1, 8, 8)),
}


class CARE(nn.Module):
    """CARE network: stem, four stages, two classifier heads averaged at eval."""

    def __init__(self, cfg: CareConfig, num_classes: int = 1000, in_chans: int = 3):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        dims = cfg.dims
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4), nn.BatchNorm2d(dims[0]))
        stages, prev = [], dims[0]
        for i in range(4):
            stages.append(CAREStage(prev, dims[i], cfg.depths[i], cfg.mem_dims[i], cfg.head_dims[i],
                                    cfg.ratios[i], attention=i >= cfg.attention_from_stage,
                                    downsample=i > 0, last_stage=i == 3))
            prev = dims[i]
        self.stages = nn.Sequential(*stages)
        self.num_features = cfg.ratios[3][1] * dims[3]
        if self.num_features != cfg.cls_dim:
            raise ValueError(f"config cls_dim={cfg.cls_dim} does not match the last block's "
                             f"output width {self.num_features}")
        self.head = Head(self.num_features, num_classes)
        self.dist_head = Head(self.num_features, num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward(self, x: torch.Tensor):
        x = self.forward_features(x)
        out, dist = self.head(x), self.dist_head(x)
        if self.training:
            return out, dist
        return (out + dist) / 2


def checkpoint_filter_fn(state_dict: dict) -> dict:
    """Official checkpoint -> care-q state dict (pure dict-to-dict).

    Accepts ``{'model': sd}``, ``{'state_dict': sd}`` or a bare state dict, with or without a
    ``module.`` (DDP) prefix. Key names are identical to the official release.
    """
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    elif "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    out = {}
    for k, v in state_dict.items():
        if k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    return out
