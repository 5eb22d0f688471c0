"""Which cached samples a training run reads: the train split's done samples, the validation
images kept out of them to choose best.pt, and the per-channel statistics of their features."""

from __future__ import annotations

import numpy as np
import torch

from ..cache import schema as S
from ..cache.base import CacheStore
from ..cache.loader import CacheLoader
from ..cache.split import holdout_score
from ..errors import FeatreconError
from .decoders import DecoderConfig, fuse

# Fewer validation images than this choose best.pt by chance: on the README demo's one validation
# photo, the first epoch "won" while the holdout went on improving for many epochs.
MIN_VALIDATION = 2


def train_indices(store: CacheStore, allow_partial: bool) -> np.ndarray:
    """Done samples of the train split; refuses an unfinished cache unless allowed."""
    status, split = store.status(), store.read_all(S.SPLIT)
    pending = int((status == S.STATUS_PENDING).sum())
    done = int((status == S.STATUS_DONE).sum())
    if pending and not allow_partial:
        raise FeatreconError(
            f"--cache {store.path}: unfinished, {done} of {store.meta.n} samples done; rerun the same "
            "extract-features command to finish it, or pass --allow-partial to train on the done ones")
    idx = np.flatnonzero((status == S.STATUS_DONE) & (split == S.SPLIT_TRAIN))
    if len(idx) == 0:
        raise FeatreconError(f"--cache {store.path}: the train split has no done samples; nothing to train on")
    return idx


def validation_split(store: CacheStore, idx: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(trained on, validation): the train split's source images divided by a fixed rule on
    their id (sha1 of "validation/" + id, as the holdout rule but independent of it), so
    the validation images are never trained on and best.pt never sees the holdout. No view
    of a validation image is trained on; validation scores their centre crops only. None
    when the fraction would give fewer than MIN_VALIDATION images: then every image is
    trained on, and best.pt is chosen on a fixed subset of them."""
    ids = store.ids()
    sources = sorted({ids[i] for i in idx})
    if fraction <= 0 or len(sources) * fraction < MIN_VALIDATION:
        return idx, idx[:0]
    score = {s: holdout_score("validation/" + s) for s in sources}
    held = {s for s in sources if score[s] < fraction} or {min(sources, key=score.get)}
    in_val = np.array([ids[i] in held for i in idx], bool)
    return idx[~in_val], idx[in_val & store.centre()[idx]]


def evaluation_indices(pick_from: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The samples of the per-epoch validation: at most n of `pick_from`, a fixed choice by seed."""
    return np.sort(np.random.default_rng(seed).choice(pick_from, min(n, len(pick_from)), replace=False))


def channel_stats(cache, layers: tuple[str, ...], idx: np.ndarray, dcfg: DecoderConfig, seed: int,
                  samples: int = 256, skip_corrupt: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the fused decoder input over up to `samples` training
    samples (a fixed choice by seed), in float64."""
    pick = np.sort(np.random.default_rng(seed).choice(idx, min(samples, len(idx)), replace=False))
    loader = CacheLoader(cache, layers, pick, 32, shuffle=False, in_memory=False, reuse_buffers=True,
                         skip_corrupt=skip_corrupt)
    total = total_sq = None
    count = 0
    for b in loader.epoch(0):
        x = fuse(dcfg, [f.double() for f in b.features]).transpose(0, 1).flatten(1)  # (C, B*H*W)
        total = x.sum(1) if total is None else total + x.sum(1)
        total_sq = (x * x).sum(1) if total_sq is None else total_sq + (x * x).sum(1)
        count += x.shape[1]
    loader.close()
    mean = total / count
    return mean.float(), (total_sq / count - mean * mean).clamp_min(0).sqrt().float()
