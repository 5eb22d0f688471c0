"""train-decoder's settings, one definition for the command and the Python API (no torch here),
and the rules that resolve its `auto` settings per input layer."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..cache.schema import CacheMeta
from ..errors import FeatreconError
from ..settings import LOCATION, PATH, comma_list, or_auto, setting

ARCHS = ("espcn", "edsr", "upconv")
LOSSES = ("mse", "l1", "mse+ssim", "mse+feat")
PRECISIONS = ("auto", "bf16", "fp32")
COMPILE_CHOICES = ("auto", "yes", "no")
IN_MEMORY = ("auto", "yes", "no")
SHUFFLE_CHOICES = ("auto", "global", "window")
# What a setting added after a run was written meant for that run, where its default is not it.
LEGACY = {"shuffle": "window", "grad_clip": 0.0}
# Settings whose None means auto, resolved by `resolve` (a resumed run keeps its recorded values).
AUTO_SETTINGS = ("crop", "width", "res_scale", "lr", "grad_clip")
# --grad-clip auto for inputs at stride 4 or finer (see auto_grad_clip).
FINE_CLIP = 0.5
# Peak learning rate per decoder. upconv normalises every stage (GroupNorm) and trains at 2e-3;
# edsr and espcn have no normalisation, and at 2e-3 Adam's first steps blew their outputs up or
# silenced every unit (benchmarks/QUALITY.md); 5e-4 trained steadily.
DEFAULT_LR = {"upconv": 2e-3, "edsr": 5e-4, "espcn": 5e-4}
# Settings that may change between a run and its --resume without changing the result.
RESUMABLE_CHANGES = {"resume", "progress", "device", "prefetch", "read_threads", "in_memory", "allow_partial", "cache",
                     "compile", "skip_corrupt"}
EACH = ("each",)  # --layer each: one decoder per cached layer


@dataclass(frozen=True)
class TrainConfig:
    layers: tuple[str, ...] = setting(flag="--layer", parse=comma_list, help="a cached layer, a comma list to fuse "
                                      "(layer2,layer3), or each: one decoder per cached layer, one after another "
                                      "(rerun to resume)")
    cache: Path | str = setting(Path("cache.zarr"), parse=LOCATION, help="a cache folder, .h5 file or Zarr URL")
    out: Path | None = setting(None, parse=PATH, help="run folder (default: runs/<layer>; with --layer each, the "
                               "folder that gets one run per layer, default runs)")
    epochs: int = setting(30, parse=int, help="passes over the train split")
    batch_size: int = setting(8, parse=int, help="samples per step and rank (8 trained best in the same time on a "
                              "CPU; on a GPU a larger batch keeps it busy)")
    lr: float | None = setting(None, parse=float, help="peak AdamW learning rate (default: the decoder's own, "
                               + ", ".join(f"{v:g} for {k}" for k, v in DEFAULT_LR.items()) + ")")
    weight_decay: float = setting(1e-4, parse=float, help="AdamW's decoupled weight decay")
    warmup: float = setting(0.05, parse=float, help="share of all steps spent warming the learning rate up "
                            "linearly, then cosine to zero")
    grad_clip: float | None = setting(None, parse=or_auto(float, "a number"), metavar="X|auto",
                                      help="clip the gradient's global norm to this before each step (0: no "
                                      f"clipping; auto: {FINE_CLIP:g} for inputs at stride 4 or finer, stem and "
                                      "layer1, whose unscaled residual branches blew up on some backbones' features "
                                      "without it; none deeper; benchmarks/QUALITY.md)")
    width: int | None = setting(None, parse=or_auto(int, "a whole number"), metavar="N|auto",
                                help="channels of the widest (coarsest) stage; halved per upsampling, down to "
                                "width//8 (auto: 256 for inputs at stride 4 or finer, stem and layer1, else 128)")
    depth: int = setting(1, parse=int, help="residual blocks per upsampling stage")
    res_scale: float | None = setting(None, parse=or_auto(float, "a number"), metavar="X|auto",
                                      help="edsr and espcn: scale of each residual branch before its skip (auto: 1 "
                                      "for inputs at stride 4 or finer, stem and layer1; 0.1, EDSR's, deeper)")
    arch: str = setting("espcn", choices=ARCHS, help="decoder: espcn (edsr's blocks down to stride 4, then one x4 "
                        "sub-pixel head), edsr (no normalisation, sub-pixel upsampling to full resolution, scaled "
                        "residuals) or upconv (nearest upsampling, GroupNorm, sigmoid); benchmarks/QUALITY.md "
                        "compares them")
    input_norm: bool = setting(True, negate="--no-input-norm", help="feed the features unscaled (default: each "
                               "channel standardised by the training features' mean and std, kept in the checkpoint)")
    loss: str = setting("mse", choices=LOSSES, help="training loss: mse, l1, mse+ssim (MSE + ssim_weight * "
                        "(1 - SSIM)) or mse+feat (MSE + feat_weight * the relative squared error of the frozen "
                        "backbone's features of the reconstruction against the cached ones, at the decoded layer: "
                        "DeePSiM's feature loss)")
    ssim_weight: float = setting(0.1, parse=float, help="weight of the SSIM term in mse+ssim")
    feat_weight: float = setting(0.1, parse=float, help="weight of the feature term in mse+feat (0.1: about the MSE "
                                 "of a layer3 decoder late in training; benchmarks/QUALITY.md)")
    seed: int = setting(0, parse=int, help="decoder initialisation and data order")
    device: str = setting("auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    precision: str = setting("auto", choices=PRECISIONS, help="bf16 autocast of the decoder's forward (training and "
                             "per-epoch validation; score measures in fp32) or fp32. auto: bf16 on CUDA and on a CPU "
                             "with bf16 instructions (AVX512-BF16, AMX), fp32 on other CPUs, where bf16 is emulated "
                             "and slow (benchmarks/DESIGN.md)")
    compile: str = setting("auto", choices=COMPILE_CHOICES, help="torch.compile the decoder (auto: on CUDA; "
                           "eager, with a warning, if compiling fails)")
    in_memory: str = setting("auto", choices=IN_MEMORY, help="load the training arrays into RAM once (auto: when "
                             "they fit comfortably)")
    shuffle: str = setting("auto", choices=SHUFFLE_CHOICES, help="the training order: global (every batch drawn "
                           "from the whole train split; each sample's chunk read through its shard's index), window "
                           "(batches from 4 shards at a time, each shard read whole: for object stores), or auto "
                           "(global on a local cache, window on an object store)")
    prefetch: int | None = setting(None, parse=int, help="shards (windowed) or batches (global) read ahead of the "
                                   "step (default: twice --read-threads; global: also at least 128 samples)")
    read_threads: int | None = setting(None, parse=int, help="threads decoding the cache (default: all cores)")
    eval_samples: int = setting(64, parse=int, help="at most this many validation images for the per-epoch PSNR "
                                "that chooses best.pt")
    crop: int | None = setting(None, parse=or_auto(int, "a whole number"), metavar="N|auto",
                               help="train on random windows of this many pixels and the matching feature cells (a "
                               "multiple of the coarsest layer's stride; 0: whole images; auto: about 112 px, 64 for "
                               "inputs at stride 4 or finer, whole images when that is not smaller); scoring uses "
                               "whole images")
    val_fraction: float = setting(0.05, parse=float, help="share of the train split's images kept out of training "
                                  "to choose best.pt (never the holdout)")
    early_stop: int = setting(0, parse=int, help="stop after N epochs without a better validation PSNR (0: train "
                              "all epochs)")
    resume: bool = setting(False, help="continue a killed run from its last.pt")
    allow_partial: bool = setting(False, help="train on the done samples of an unfinished cache")
    skip_corrupt: bool = setting(False, help="leave out samples whose stored chunks fail their checksum or are "
                                 "missing (counted in the log) instead of stopping")
    progress: bool = setting(True, negate="--no-progress", help="no progress bar")

    def __post_init__(self):
        if self.out is None:  # the run folder follows the layers
            object.__setattr__(self, "out", Path("runs") if self.layers == EACH else Path("runs") / "+".join(self.layers))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))

    def validate(self) -> None:
        """One clear error for the first bad setting, before anything is read or built."""
        checks = [("--epochs", self.epochs, self.epochs >= 1, "must be at least 1"),
                  ("--batch-size", self.batch_size, self.batch_size >= 1, "must be at least 1"),
                  ("--grad-clip", self.grad_clip,
                   self.grad_clip is None or (self.grad_clip >= 0 and math.isfinite(self.grad_clip)),
                   "must be auto, 0 (off) or a positive number"),
                  ("--lr", self.lr, self.lr is None or (self.lr > 0 and math.isfinite(self.lr)),
                   "must be a positive number"),
                  ("--weight-decay", self.weight_decay, self.weight_decay >= 0, "must be 0 or more"),
                  ("--warmup", self.warmup, 0 <= self.warmup < 1, "must be in [0, 1): a share of all steps"),
                  ("--width", self.width, self.width is None or self.width >= 8, "must be auto or at least 8"),
                  ("--res-scale", self.res_scale, self.res_scale is None or 0 < self.res_scale <= 1,
                   "must be auto or in (0, 1]"),
                  ("--depth", self.depth, self.depth >= 0, "must be 0 or more"),
                  ("--ssim-weight", self.ssim_weight, self.ssim_weight >= 0, "must be 0 or more"),
                  ("--feat-weight", self.feat_weight, self.feat_weight >= 0, "must be 0 or more"),
                  ("--eval-samples", self.eval_samples, self.eval_samples >= 1, "must be at least 1"),
                  ("--crop", self.crop, self.crop is None or self.crop >= 0,
                   "must be auto, 0 (whole images) or a size in pixels"),
                  ("--val-fraction", self.val_fraction, 0 <= self.val_fraction < 0.5, "must be in [0, 0.5)"),
                  ("--early-stop", self.early_stop, self.early_stop >= 0, "must be 0 (off) or more"),
                  ("--prefetch", self.prefetch, self.prefetch is None or self.prefetch >= 1, "must be at least 1"),
                  ("--read-threads", self.read_threads, self.read_threads is None or self.read_threads >= 1,
                   "must be at least 1")]
        for flag, value, ok, what in checks:
            if not ok:
                raise FeatreconError(f"{flag} {value}: {what}")
        for flag, value, choices in (("--loss", self.loss, LOSSES), ("--arch", self.arch, ARCHS),
                                     ("--precision", self.precision, PRECISIONS),
                                     ("--compile", self.compile, COMPILE_CHOICES),
                                     ("--in-memory", self.in_memory, IN_MEMORY),
                                     ("--shuffle", self.shuffle, SHUFFLE_CHOICES)):
            if value not in choices:
                raise FeatreconError(f"{flag} {value!r}: choose one of {', '.join(choices)}")
        if not self.layers:
            raise FeatreconError("--layer is empty; name a cached layer such as layer3, or several: layer2,layer3")


# --crop auto and --width auto, chosen per input on the protocol of benchmarks/QUALITY.md. Decoders
# of layers at stride 8 and coarser train on windows of about AUTO_CROP pixels: a quarter of a
# 224-px image per step, four times the steps in the same time (smaller windows gave too little
# context). Inputs at stride FINE_STRIDE or finer (stem, layer1) are decoded at their own
# resolution, where a wider body pays for itself on FINE_CROP windows.
AUTO_CROP = 112
FINE_CROP = 64
FINE_STRIDE = 4
AUTO_WIDTH = 128
FINE_WIDTH = 256


def layer_strides(meta: CacheMeta, layers: tuple[str, ...]) -> list[int]:
    """Image pixels per feature cell, per layer."""
    return [meta.stride(l) for l in layers]


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
    whose decoder is one resolution's blocks; 0.1, EDSR's, for deeper inputs, whose decoders stack
    blocks over upsampling stages and blew up unscaled (benchmarks/QUALITY.md)."""
    return 1.0 if max(strides) <= FINE_STRIDE else 0.1


def auto_grad_clip(strides: list[int]) -> float:
    """--grad-clip auto: FINE_CLIP when every input is at stride 4 or finer (unscaled residual
    branches: a layer1 decoder on another seeded backbone's features blew up at epoch 21 without
    it, benchmarks/QUALITY.md), else 0 (the 0.1-scaled deeper decoders trained steadily unclipped)."""
    return FINE_CLIP if max(strides) <= FINE_STRIDE else 0.0


def auto_width(strides: list[int]) -> int:
    """--width auto: FINE_WIDTH (a 128-channel stride-4 body) when every input is at stride 4 or
    finer, else AUTO_WIDTH."""
    return FINE_WIDTH if max(strides) <= FINE_STRIDE else AUTO_WIDTH


def check_crop(crop: int, strides: list[int], image: int) -> None:
    if crop and (crop % max(strides) or crop > image):
        raise FeatreconError(f"--crop {crop}: must be a multiple of {max(strides)} (the coarsest layer's stride) "
                             f"and at most {image}, or 0 for whole images")


def resolve(cfg: TrainConfig, meta: CacheMeta) -> TrainConfig:
    """cfg with its layers in the cache's order (shallow to deep) and its auto settings (crop, width,
    res_scale, lr, grad_clip) set for them; a run records them resolved, in config.json and the checkpoint."""
    layers = tuple(sorted(cfg.layers, key=list(meta.layers).index))
    strides = layer_strides(meta, layers)
    auto = {"crop": auto_crop(strides, meta.image_shape[1]), "width": auto_width(strides),
            "res_scale": auto_res_scale(strides), "lr": DEFAULT_LR[cfg.arch], "grad_clip": auto_grad_clip(strides)}
    resolved = replace(cfg, layers=layers, **{k: v for k, v in auto.items() if getattr(cfg, k) is None})
    check_crop(resolved.crop, strides, meta.image_shape[1])
    return resolved


def left_to_auto(cfg: TrainConfig) -> frozenset[str]:
    """The settings `cfg` leaves to auto (before `resolve`): a resumed run keeps what it recorded for them."""
    return frozenset([k for k in AUTO_SETTINGS if getattr(cfg, k) is None]
                     + [k for k in ("shuffle", "precision") if getattr(cfg, k) == "auto"])
