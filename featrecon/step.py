"""The decoder's training step at device speed, and how batches reach it.

`device_batches` moves the loader's float16/uint8 batches to the device (on CUDA: pinned,
copied on a side stream one batch ahead) and converts them there; `Step` runs one
optimisation step with the device's precision, layout and compile settings
(`step_settings`); `random_crop` cuts training windows for `--crop`. `train.fit` puts
them together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from . import FeatreconError
from . import schema as S
from .loader import Batch
from .metrics import ssim

if TYPE_CHECKING:
    from .train import TrainConfig

log = logging.getLogger(__name__)
PRECISIONS = ("auto", "bf16", "fp32")
COMPILE_CHOICES = ("auto", "yes", "no")


class Diverged(Exception):
    pass


def compute_loss(pred: torch.Tensor, target: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    if cfg.loss == "l1":
        return F.l1_loss(pred, target)
    loss = F.mse_loss(pred, target)
    if cfg.loss == "mse+ssim":
        loss = loss + cfg.ssim_weight * (1 - ssim(pred, target).mean())
    return loss


def to_device(batch: Batch, device: torch.device, channels_last: bool = False, window=None,
              i: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """fp16 features -> fp32 and uint8 images -> [0, 1] floats, on the device (the narrow
    types cross the bus; the conversion runs where the step runs). `window(i, features,
    images)`, if given, cuts the i-th batch's training window first, so that only the window
    is converted (a 64-px window of layer1 is 1/12 of its cells)."""
    feats = [f.to(device, non_blocking=True) for f in batch.features]
    images = batch.images.to(device, non_blocking=True)
    return _convert(feats, images, channels_last, window, i)


def _convert(feats, images, channels_last: bool, window, i: int):
    if window is not None:
        feats, images = window(i, feats, images)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [f.to(torch.float32, memory_format=fmt) for f in feats], images.float() / 255


def device_batches(batches, device: torch.device, channels_last: bool = False, window=None):
    """(batch, features, target) on the device, cut by `window` (see `to_device`). On CUDA the
    next batch's copy from pinned memory is issued on a side stream before the current batch is
    handed out, so it runs while the step computes; the step's stream waits for it only when it
    needs it."""
    if device.type != "cuda":
        for i, b in enumerate(batches):
            yield (b, *to_device(b, device, channels_last, window, i))
        return
    copy = torch.cuda.Stream(device)

    def issue(b: Batch):
        copy.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(copy):
            feats = [f.to(device, non_blocking=True) for f in b.features]
            images = b.images.to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(copy)
        return b, feats, images, done

    def finish(i, b, feats, images, done):
        main = torch.cuda.current_stream(device)
        main.wait_event(done)
        for t in (*feats, images):
            t.record_stream(main)  # the copy stream's allocations are used on the main stream
        return (b, *_convert(feats, images, channels_last, window, i))

    ahead, i = None, 0
    for b in batches:
        issued = issue(b)
        if ahead is not None:
            yield finish(i, *ahead)
            i += 1
        ahead = issued
    if ahead is not None:
        yield finish(i, *ahead)


@dataclass(frozen=True)
class StepSettings:
    """How the step runs on this device, resolved from the config."""

    autocast: bool  # bf16 autocast around the decoder's forward
    channels_last: bool  # NHWC activations and weights
    compile: bool  # torch.compile the decoder
    fused_adamw: bool


def step_settings(cfg: "TrainConfig", device: torch.device) -> StepSettings:
    """Defaults per device. Measured on a 2-core CPU: bf16 autocast ran 8x slower than fp32 and
    torch.compile gave nothing (the first decoders, batch 16, 224 px); channels-last weights and
    activations (oneDNN's NHWC convolutions) trained the espcn decoders 0-30% faster (stem 106
    against 106 samples/s, layer1 153 against 122, layer2 141/133, layer3 179/144, layer4 155/146)
    and validated them 20-57% faster. On CUDA bf16, channels-last (tensor-core convolutions),
    fused AdamW and a compiled step are the standard fast path."""
    cuda = device.type == "cuda"
    autocast = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    return StepSettings(autocast=autocast, channels_last=True, fused_adamw=cuda,
                        compile=cfg.compile == "yes" or (cfg.compile == "auto" and cuda))


class Step:
    """One optimisation step of the decoder: forward (under autocast when asked), loss,
    backward, AdamW, schedule. With `compile`, the decoder runs through torch.compile; if
    compiling fails on the first step, a one-line warning and the eager decoder."""

    def __init__(self, model, opt, sched, cfg: "TrainConfig", device: torch.device, settings: StepSettings):
        self.model, self.opt, self.sched, self.cfg, self.device, self.settings = model, opt, sched, cfg, device, settings
        self.forward = torch.compile(model) if settings.compile else model
        self._compiled_ok = not settings.compile

    def __call__(self, feats: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if self._compiled_ok:
            return self._run(feats, target)
        try:
            loss = self._run(feats, target)
        except Diverged:
            raise
        except Exception as e:  # inductor raises many types; any of them means: run eagerly
            log.warning("torch.compile of the decoder failed (%s: %s); training eagerly", type(e).__name__,
                        (str(e).strip().splitlines() or [""])[0][:200])
            self.forward = self.model
            loss = self._run(feats, target)
        self._compiled_ok = True
        return loss

    def _run(self, feats, target):
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.settings.autocast):
            pred = self.forward(feats)
        loss = compute_loss(pred.float(), target, self.cfg)
        if not torch.isfinite(loss):
            raise Diverged(f"loss became {loss.item()}")
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        return loss


def layer_strides(meta: S.CacheMeta, layers: tuple[str, ...]) -> list[int]:
    """Image pixels per feature cell, per layer."""
    return [meta.image_shape[1] // meta.layers[l][1] for l in layers]


# --crop auto and --width auto, chosen per input on the protocol of benchmarks/QUALITY.md. Decoders
# of layers at stride 8 and coarser train on windows of about AUTO_CROP pixels: a quarter of a
# 224-px image per step, four times the steps in the same time (on layer3, 64-px windows lost
# 0.9 dB: too little context). Inputs at stride FINE_STRIDE or finer (stem, layer1) are decoded
# at their own resolution, where the default width's stride-4 body (64 channels) held layer1 at
# 24 dB; twice the width costs four times per pixel, which 64-px windows pay for (+0.5 dB on
# layer1 in the same time).
AUTO_CROP = 112
FINE_CROP = 64
FINE_STRIDE = 4
AUTO_WIDTH = 128
FINE_WIDTH = 256


def auto_crop(strides: list[int], image: int) -> int:
    """--crop auto: the smallest multiple of the coarsest stride from AUTO_CROP up (128 for
    layer4's 32; FINE_CROP for inputs at stride 4 or finer), or 0 (whole images) when that is
    not smaller than the image."""
    s = max(strides)
    want = FINE_CROP if s <= FINE_STRIDE else AUTO_CROP
    crop = -(-want // s) * s
    return crop if crop < image else 0


def auto_res_scale(strides: list[int]) -> float:
    """--res-scale auto: 1 (unscaled residual branches) when every input is at stride 4 or finer,
    whose decoder is one resolution's blocks (layer1: +0.6 dB at the same epoch); 0.1, EDSR's, for
    deeper inputs, whose decoders stack blocks over upsampling stages: unscaled, layer4's run blew
    up (validation 4.7 dB) and a layer3 run on 16 views lost its first epoch."""
    return 1.0 if max(strides) <= FINE_STRIDE else 0.1


def auto_width(strides: list[int]) -> int:
    """--width auto: FINE_WIDTH (a 128-channel stride-4 body) when every input is at stride 4 or
    finer, else AUTO_WIDTH."""
    return FINE_WIDTH if max(strides) <= FINE_STRIDE else AUTO_WIDTH


def check_crop(crop: int, strides: list[int], image: int) -> None:
    if crop and (crop % max(strides) or crop > image):
        raise FeatreconError(f"--crop {crop}: must be a multiple of {max(strides)} (the coarsest layer's stride) "
                             f"and at most {image}, or 0 for whole images")


def random_crop(feats: list[torch.Tensor], target: torch.Tensor, crop: int, strides: list[int],
                rng: np.random.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The same random window of every sample of the batch: `crop` pixels of the target and
    crop / stride cells of each layer, aligned to the coarsest layer's cells. The decoder is
    convolutional: it learns on windows and reconstructs whole images."""
    big = max(strides)
    h, w = target.shape[-2:]
    y = int(rng.integers(0, (h - crop) // big + 1)) * big
    x = int(rng.integers(0, (w - crop) // big + 1)) * big
    feats = [f[..., y // s:(y + crop) // s, x // s:(x + crop) // s] for f, s in zip(feats, strides)]
    return feats, target[..., y:y + crop, x:x + crop]
