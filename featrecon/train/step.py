"""The decoder's training step at device speed, and how batches reach it.

`device_batches` moves the loader's float16/uint8 batches to the device (on CUDA: pinned,
copied on a side stream one batch ahead) and converts them there; `Step` runs one
optimisation step with the device's precision, layout and compile settings
(`step_settings`) at the learning rate of its `Schedule`; `random_crop` cuts training
windows for `--crop`. `loop.fit` puts them together.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..cache.loader import Batch
from ..device import bf16_autocast, native_bf16
from ..metrics import ssim
from .config import TrainConfig
from .guard import BlowUp, Guard

log = logging.getLogger(__name__)


class Schedule:
    """The learning rate at each step: a linear warm-up over `warmup` of the `total` steps, then a
    cosine to zero. A pure function of the step, so a resumed run (with any number of ranks, and so
    of steps per epoch) continues at the same point: the one after its epochs."""

    def __init__(self, peak: float, total: int, warmup: float):
        self.peak, self.total, self.warm = peak, total, max(1, int(round(total * warmup)))

    def factor(self, step: int) -> float:
        if step < self.warm:
            return (step + 1) / self.warm
        progress = (step - self.warm) / max(1, self.total - self.warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def lr(self, step: int) -> float:
        return self.peak * self.factor(step)


def compute_loss(pred: torch.Tensor, target: torch.Tensor, cfg: TrainConfig, feats: list[torch.Tensor] | None = None,
                 encoder=None) -> torch.Tensor:
    """The training loss of [0, 1] reconstructions `pred` of `target`; for mse+feat, `encoder` (the frozen
    backbone to the decoded layers) re-encodes `pred`, compared with `feats`, the cached features the
    decoder read (see `feature_loss`)."""
    if cfg.loss == "l1":
        return F.l1_loss(pred, target)
    loss = F.mse_loss(pred, target)
    if cfg.loss == "mse+ssim":
        loss = loss + cfg.ssim_weight * (1 - ssim(pred, target).mean())
    if cfg.loss == "mse+feat":
        loss = loss + cfg.feat_weight * feature_loss(encoder, pred, feats)
    return loss


def feature_loss(encoder, pred: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the decoded layers of ||f(pred) - f||^2 / ||f||^2, f the cached features (B, C, h, w)
    the decoder read; on a training window, only the cells at least one cell inside its border
    (those near the border see image beyond the window in the cache's features)."""
    got = encoder.features(pred * 255)  # the backbone's input from [0, 1] pixels, with gradients
    terms = []
    for want, f in zip(feats, got.values()):
        f = f.float()
        if f.shape[-2:] != want.shape[-2:]:
            raise ValueError(f"feature loss: the reconstruction gives {tuple(f.shape[-2:])} cells, the cache "
                             f"{tuple(want.shape[-2:])}")
        if min(want.shape[-2:]) > 2:
            f, want = f[..., 1:-1, 1:-1], want[..., 1:-1, 1:-1]
        terms.append((f - want).pow(2).sum() / want.pow(2).sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


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


def auto_precision(device: torch.device) -> str:
    """--precision auto: bf16 where the device computes it in hardware (CUDA; a CPU with
    AVX512-BF16 or AMX, where the decoders trained 1.6x faster than fp32), else fp32 (emulated
    bf16 ran 8x slower). benchmarks/DESIGN.md has both measurements."""
    return "bf16" if native_bf16(device) else "fp32"


def step_settings(cfg: TrainConfig, device: torch.device) -> StepSettings:
    """Defaults per device, as measured (benchmarks/DESIGN.md): on a CPU eager and channels-last
    (oneDNN's NHWC convolutions were faster; torch.compile gave nothing on 2 cores), bf16 autocast
    where the CPU has bf16 instructions (`auto_precision`). On CUDA bf16, channels-last (tensor-core
    convolutions), fused AdamW and a compiled step are the standard fast path."""
    cuda = device.type == "cuda"
    precision = auto_precision(device) if cfg.precision == "auto" else cfg.precision
    autocast = precision == "bf16"
    return StepSettings(autocast=autocast, channels_last=True, fused_adamw=cuda,
                        compile=cfg.compile == "yes" or (cfg.compile == "auto" and cuda))


class Step:
    """One optimisation step of the decoder: forward (under autocast when asked), loss,
    backward, AdamW, schedule. With `compile`, the decoder runs through torch.compile; if
    compiling fails on the first step, a one-line warning and the eager decoder."""

    def __init__(self, model, opt, schedule: Schedule, cfg: TrainConfig, device: torch.device,
                 settings: StepSettings, steps_done: int = 0, guard: Guard | None = None, group=None, encoder=None):
        self.model, self.opt, self.schedule, self.cfg = model, opt, schedule, cfg
        self.device, self.settings = device, settings
        self.steps_done = steps_done  # optimisation steps taken so far: the schedule's position
        self.guard = guard or Guard()  # checks every step's loss before its update (see `guard`)
        self.group = group  # data parallel: the ranks decide on one loss, their mean
        self.encoder = encoder  # mse+feat: the frozen backbone to the decoded layers
        self.forward = torch.compile(model) if settings.compile else model
        self._compiled_ok = not settings.compile

    def __call__(self, feats: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if self._compiled_ok:
            return self._run(feats, target)
        try:
            loss = self._run(feats, target)
        except BlowUp:
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
        with bf16_autocast(self.device, self.settings.autocast):
            pred = self.forward(feats)
        loss = compute_loss(pred.float(), target, self.cfg, feats, self.encoder)
        value = loss.item()
        if self.group is not None and self.group.active:
            value = self.group.sum(value)[0] / self.group.world
        self.guard.check_step(value, self.steps_done)  # a blow-up raises before it reaches the weights
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        for group in self.opt.param_groups:
            group["lr"] = self.lr
        self.opt.step()
        self.steps_done += 1
        return loss

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""
        return self.guard.bound(self.schedule.lr(self.steps_done))

    def epoch_peak(self, steps: range) -> float:
        """The largest learning rate the run uses over `steps`."""
        return max(self.guard.bound(self.schedule.lr(s)) for s in steps)


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
