"""Image decoders from cached activations. Modules and config only, no I/O.

A decoder maps one or several cached layers to a (3, H, W) image in [0, 1]: input
projection, then one x2 upsampling stage per factor of two of the layer's stride,
then a 3x3 convolution to RGB. Channels follow the resolution: `base_width` at full
resolution, doubling per halving, capped at `width`, so the expensive
full-resolution stages stay narrow. Three architectures (`arch`); benchmarks/QUALITY.md
ranks them:

- `espcn` (the default): edsr's blocks down to stride 4, then one x4 sub-pixel
  convolution to the image (ESPCN, Shi et al. 2016), LeakyReLU, a zero-initialised head.
- `edsr`: what single-image super-resolution found to work (EDSR, Lim
  et al. 2017): no normalisation layers, residual blocks whose output is scaled by
  `res_scale` before the skip, learned sub-pixel upsampling (a convolution to 4x the
  channels, then PixelShuffle), a long skip over the input-resolution body, and a
  linear RGB head clamped to [0, 1] rather than a sigmoid.
- `upconv`: the first release's decoder, after Dosovitskiy & Brox ("Inverting visual
  representations with convolutional networks", 2016): nearest x2 upsampling and a
  convolution per stage, GroupNorm and GELU, a sigmoid head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ARCHS


@dataclass(frozen=True)
class DecoderConfig:
    layers: tuple[str, ...]  # cached layers read, shallow to deep
    in_shapes: tuple[tuple[int, int, int], ...]  # (C, H, W) of each layer
    out_size: tuple[int, int]  # (H, W) of the reconstructed image
    width: int = 256  # widest stage (channels at coarse resolutions)
    depth: int = 1  # residual blocks per upsampling stage (and in the input-resolution body)
    base_width: int = 32  # channels at full resolution
    arch: str = "upconv"  # "edsr" or "upconv"; checkpoints written before `arch` existed are upconv
    # edsr, espcn: residual branch scaling (EDSR used 0.1 for its 32-block model). Training sets
    # it per input (train.resolve: 1 for stem and layer1, 0.1 deeper); checkpoints record theirs.
    res_scale: float = 1.0
    input_norm: bool = False  # standardise each input channel by the training set's mean and std (set by `fit`)

    @property
    def in_channels(self) -> int:
        return sum(s[0] for s in self.in_shapes)

    @property
    def in_size(self) -> tuple[int, int]:
        """Fused layers are resized to the largest spatial size among them."""
        return max((s[1], s[2]) for s in self.in_shapes)

    @property
    def n_stages(self) -> int:
        return max(0, round(math.log2(self.out_size[0] / self.in_size[0])))

    def channels_at(self, stride: int) -> int:
        return int(min(self.width, self.base_width * max(1, stride)))

    @classmethod
    def from_dict(cls, d: dict) -> DecoderConfig:
        d = dict(d)
        d["layers"] = tuple(d["layers"])
        d["in_shapes"] = tuple(tuple(s) for s in d["in_shapes"])
        d["out_size"] = tuple(d["out_size"])
        return cls(**d)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, ch // 4) if ch >= 8 else 1, ch)


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), _norm(ch), nn.GELU(),
                                  nn.Conv2d(ch, ch, 3, padding=1), _norm(ch))

    def forward(self, x):
        return F.gelu(x + self.body(x))


class UpStage(nn.Module):
    """x2 nearest upsampling, 3x3 conv to the new width, then `depth` residual blocks."""

    def __init__(self, cin: int, cout: int, depth: int):
        super().__init__()
        self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1),
                                _norm(cout), nn.GELU())
        self.blocks = nn.Sequential(*[ResBlock(cout) for _ in range(depth)])

    def forward(self, x):
        return self.blocks(self.up(x))


def Decoder(cfg: DecoderConfig) -> nn.Module:
    """The decoder `cfg.arch` names."""
    if cfg.arch not in ARCHS:
        raise ValueError(f"decoder arch {cfg.arch!r}: choose one of {', '.join(ARCHS)}")
    return {"espcn": ESPCNDecoder, "edsr": EDSRDecoder, "upconv": UpconvDecoder}[cfg.arch](cfg)


def fuse(cfg: DecoderConfig, feats: list[torch.Tensor]) -> torch.Tensor:
    size = max(tuple(f.shape[-2:]) for f in feats)  # the configured in_size, or a crop of it in training
    parts = [f if tuple(f.shape[-2:]) == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
             for f in feats]
    return torch.cat(parts, dim=1)  # (B, sum C, H, W)


class ChannelScale(nn.Module):
    """(x - mean) / std per input channel, with the statistics of the training features as
    buffers (saved in the checkpoint). A random-weight ResNet-50 has no working batch
    normalisation: its activations grow with depth (std 0.35 at layer1, 11 at layer3, 21 at
    layer4 on ImageNet photos), and a decoder without normalisation layers of its own does
    not learn from the deep ones unscaled."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("std", torch.ones(1, channels, 1, 1))

    @torch.no_grad()
    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean.reshape(self.mean.shape))
        self.std.copy_(std.clamp_min(1e-6 + 0.01 * float(std.mean())).reshape(self.std.shape))  # dead channels

    def forward(self, x):
        return (x - self.mean) / self.std


def _input(cfg: DecoderConfig) -> nn.Module:
    return ChannelScale(cfg.in_channels) if cfg.input_norm else nn.Identity()


def output_size(cfg: DecoderConfig, in_size: tuple[int, int]) -> tuple[int, int]:
    """The image size for features of spatial size `in_size`: cfg.out_size for whole images,
    the same scale for a crop."""
    return (round(in_size[0] * cfg.out_size[0] / cfg.in_size[0]), round(in_size[1] * cfg.out_size[1] / cfg.in_size[1]))


def _to_out_size(cfg: DecoderConfig, x: torch.Tensor, in_size: tuple[int, int]) -> torch.Tensor:
    size = output_size(cfg, in_size)
    if tuple(x.shape[-2:]) != size:  # sizes that are not a power-of-two multiple
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x


def _in_range(x: torch.Tensor, training: bool) -> torch.Tensor:
    """A linear head's image: clamped to [0, 1] for use, left as is in training. A clamp in
    training passes no gradient where the output lies outside [0, 1]; a decoder that starts
    (or drifts) there can stay stuck at the mean image (an espcn run on layer3 did)."""
    return x if training else x.clamp(0, 1)


class ScaledResBlock(nn.Module):
    """conv-activation-conv, scaled, added to the input; no normalisation (EDSR)."""

    def __init__(self, ch: int, scale: float, act=nn.ReLU):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), act(), nn.Conv2d(ch, ch, 3, padding=1))
        self.scale = scale

    def forward(self, x):
        return x + self.scale * self.body(x)


class ShuffleUp(nn.Module):
    """x2 sub-pixel upsampling: a 3x3 convolution to 4 * cout channels, PixelShuffle, ReLU,
    then `depth` scaled residual blocks at the new resolution."""

    def __init__(self, cin: int, cout: int, depth: int, scale: float, act=nn.ReLU):
        super().__init__()
        self.up = nn.Sequential(nn.Conv2d(cin, 4 * cout, 3, padding=1), nn.PixelShuffle(2), act())
        self.blocks = nn.Sequential(*[ScaledResBlock(cout, scale, act) for _ in range(depth)])

    def forward(self, x):
        return self.blocks(self.up(x))


def _long_skip_body(ch: int, cfg: DecoderConfig, act=nn.ReLU) -> nn.Sequential:
    """The input-resolution body under edsr's and espcn's long skip: 2 * depth scaled
    residual blocks, then a 3x3 convolution."""
    return nn.Sequential(*[ScaledResBlock(ch, cfg.res_scale, act) for _ in range(2 * cfg.depth)],
                         nn.Conv2d(ch, ch, 3, padding=1))


class EDSRDecoder(nn.Module):
    """features: list of (B, C_i, H_i, W_i) tensors in config order -> (B, 3, H, W) in [0, 1]."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.norm = _input(cfg)
        stride = round(cfg.out_size[0] / cfg.in_size[0])
        ch = cfg.channels_at(stride)
        self.proj = nn.Conv2d(cfg.in_channels, ch, 1)
        self.body = _long_skip_body(ch, cfg)
        stages = []
        for _ in range(cfg.n_stages):
            stride = max(1, stride // 2)
            stages.append(ShuffleUp(ch, cfg.channels_at(stride), cfg.depth, cfg.res_scale))
            ch = cfg.channels_at(stride)
        self.stages = nn.Sequential(*stages)
        self.head = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        fused = self.norm(fuse(self.cfg, feats))
        x = self.proj(fused)
        x = self.stages(x + self.body(x))  # long skip over the body
        return _in_range(self.head(_to_out_size(self.cfg, x, tuple(fused.shape[-2:]))) + 0.5, self.training)


def _leaky() -> nn.Module:
    """LeakyReLU(0.2), as DeePSiM used: a unit never goes silent for good. With ReLU, espcn on
    a random network's layer3 could lose all its units in the first steps and stay at the
    mean image (one run in two at lr 2e-3)."""
    return nn.LeakyReLU(0.2)


class ESPCNDecoder(nn.Module):
    """EDSR's blocks, but no stage finer than stride 4: x2 sub-pixel stages down to stride 4,
    `2 * depth` scaled residual blocks there, then one convolution to 3 * 16 channels and a
    x4 PixelShuffle (ESPCN, Shi et al. 2016) straight to the image. The stride-2 and
    full-resolution stages, three quarters of the other decoders' step on a CPU, are gone.

    features: list of (B, C_i, H_i, W_i) tensors in config order -> (B, 3, H, W) in [0, 1]."""

    HEAD = 4  # the head's upscaling factor

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.norm = _input(cfg)
        stride = round(cfg.out_size[0] / cfg.in_size[0])
        ch = cfg.channels_at(stride)
        act = _leaky
        self.proj = nn.Conv2d(cfg.in_channels, ch, 1)
        self.body = _long_skip_body(ch, cfg, act)
        stages = []
        while stride > self.HEAD:
            stride //= 2
            stages.append(ShuffleUp(ch, cfg.channels_at(stride), 0, cfg.res_scale, act))
            ch = cfg.channels_at(stride)
        self.stages = nn.Sequential(*stages)
        self.fine = nn.Sequential(*[ScaledResBlock(ch, cfg.res_scale, act) for _ in range(2 * cfg.depth)])
        self.scale = max(1, stride)
        self.head = nn.Sequential(nn.Conv2d(ch, 3 * self.scale ** 2, 3, padding=1), nn.PixelShuffle(self.scale))
        nn.init.zeros_(self.head[0].weight)  # the first image is uniform grey (0.5): no early blow-up,
        nn.init.zeros_(self.head[0].bias)  # and the head's gradient reaches every unit from the first step

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        fused = self.norm(fuse(self.cfg, feats))
        x = self.proj(fused)
        x = self.stages(x + self.body(x))  # long skip over the body
        x = self.head(x + self.fine(x)) + 0.5
        return _in_range(_to_out_size(self.cfg, x, tuple(fused.shape[-2:])), self.training)


class UpconvDecoder(nn.Module):
    """features: list of (B, C_i, H_i, W_i) tensors in config order -> (B, 3, H, W) in [0, 1]."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.norm = _input(cfg)
        stride = round(cfg.out_size[0] / cfg.in_size[0])
        ch = cfg.channels_at(stride)
        self.proj = nn.Sequential(nn.Conv2d(cfg.in_channels, ch, 1), _norm(ch), nn.GELU(),
                                  *[ResBlock(ch) for _ in range(cfg.depth)])
        stages = []
        for _ in range(cfg.n_stages):
            stride = max(1, stride // 2)
            stages.append(UpStage(ch, cfg.channels_at(stride), cfg.depth))
            ch = cfg.channels_at(stride)
        self.stages = nn.Sequential(*stages)
        self.head = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        fused = self.norm(fuse(self.cfg, feats))
        x = self.stages(self.proj(fused))
        return torch.sigmoid(self.head(_to_out_size(self.cfg, x, tuple(fused.shape[-2:]))))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
