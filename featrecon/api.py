"""featrecon from Python: open a cache, load a decoder, reconstruct, and run the three stages.

    import featrecon

    cache = featrecon.open_cache("cache.zarr")
    x = cache.features("layer3", cache.indices("holdout"))    # (n, 1024, 14, 14) float16
    decoder = featrecon.load_decoder("runs/layer3", cache=cache)
    images = featrecon.reconstruct(decoder, cache, cache.indices("holdout")[:4])  # (4, 3, 224, 224) in [0, 1]

`extract_features`, `train_decoder` and `score` are the three commands, with the same
settings and defaults: one config dataclass each (`ExtractConfig`, `TrainConfig`,
`ScoreConfig`) defines both. They are named after the commands because `featrecon.extract`,
`featrecon.train` and `featrecon.evaluate` are the stage packages.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .cache import schema as S
from .cache.base import CacheStore
from .cache.factory import open_cache as _open_store
from .errors import CorruptChunk, FeatreconError
from .evaluate.config import ScoreConfig
from .extract.config import ExtractConfig
from .settings import from_python, location
from .train.checkpoint import decoder_from_checkpoint, load_checkpoint, run_checkpoint
from .train.config import TrainConfig

Index = int | slice | Sequence[int] | np.ndarray


class Cache:
    """A feature cache, read-only. Arrays come back as numpy, samples in the order asked for."""

    def __init__(self, path: str | os.PathLike):
        self.path = location(path)
        self._store: CacheStore = _open_store(self.path)
        self.meta: S.CacheMeta = self._store.meta

    @property
    def layers(self) -> list[str]:
        return list(self.meta.layers)

    @property
    def ids(self) -> list[str]:
        return self._store.ids()

    @property
    def labels(self) -> np.ndarray:
        """(N,) int32 torchvision class index, -1 where unknown."""
        return self._store.read_all(S.LABELS)

    @property
    def split(self) -> np.ndarray:
        """(N,) of "train" / "holdout"."""
        names = np.array(["train", "holdout"])
        return names[self._store.read_all(S.SPLIT)]

    @property
    def status(self) -> np.ndarray:
        """(N,) uint8: 0 pending, 1 done, 2 skipped (unreadable source file)."""
        return self._store.status()

    def indices(self, split: str = "all", views: bool = False) -> np.ndarray:
        """The done samples of a split (train, holdout or all): their centre crops, the images that
        are scored, or with `views` their extra training views too (see extract-features --views)."""
        if split not in ("train", "holdout", "all"):
            raise FeatreconError(f"split {split!r}: choose train, holdout or all")
        ok = self.status == S.STATUS_DONE
        if split != "all":
            ok &= self._store.read_all(S.SPLIT) == S.SPLIT_NAMES[split]
        if not views:
            ok &= self._store.centre()
        return np.flatnonzero(ok)

    def features(self, layer: str, idx: Index) -> np.ndarray:
        """(n, C, H, W) activations of `layer` (stored dtype) for an index, slice or list."""
        if layer not in self.meta.layers:
            raise FeatreconError(f"layer {layer!r} is not in {self.path}; cached layers: {', '.join(self.layers)}")
        return self._rows(S.feature_path(layer), idx)

    def images(self, idx: Index) -> np.ndarray:
        """(n, 3, H, W) uint8 preprocessed input images (the decoders' targets)."""
        return self._rows(S.IMAGES, idx)

    def _rows(self, name: str, idx: Index) -> np.ndarray:
        single = isinstance(idx, (int, np.integer))
        if isinstance(idx, slice):
            idx = np.arange(self.meta.n)[idx]
        try:
            out = self._store.read_rows(name, [idx] if single else idx)
        except CorruptChunk as e:
            raise FeatreconError(f"{self.path}: {self._store.where(e)}: {e.why}; run "
                                 f"`featrecon verify {self.path} --repair`") from None
        return out[0] if single else out

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Cache({str(self.path)!r}: {self.meta.n} samples, layers {', '.join(self.layers)}, "
                f"weights {self.meta.weights})")


def open_cache(path: str | os.PathLike) -> Cache:
    """Open a cache written by `extract-features` (Zarr folder or HDF5 file) for reading."""
    return Cache(path)


def load_decoder(run: str | os.PathLike, device: str | torch.device = "cpu", cache: Cache | str | os.PathLike | None = None,
                 which: str = "best") -> nn.Module:
    """A trained decoder in eval mode, from a run folder (its best.pt, or last.pt with
    which="last") or a checkpoint file. With `cache`, refuses a decoder trained on other
    features (weights, preprocessing or layer shapes). The checkpoint's contents are on
    `decoder.checkpoint` (config, layers, epoch, history), its config on `decoder.cfg`."""
    path = Path(run)
    if path.is_dir() and ((path / f"{which}.pt").exists() or (path / "last.pt").exists()):
        path, ckpt = run_checkpoint(path, which)  # never a best.pt that a kill left behind
    elif path.is_file():
        ckpt = load_checkpoint(path)
    else:
        raise FeatreconError(f"{run}: no checkpoint here (expected a run folder with {which}.pt or a .pt file)")
    if cache is not None:
        meta = cache.meta if isinstance(cache, Cache) else _open_store(cache).meta
        missing = [l for l in ckpt["layers"] if l not in meta.layers]
        if missing or S.feature_fingerprint(meta, ckpt["layers"]) != ckpt["fingerprint"]:
            raise FeatreconError(f"{path} was trained on other features than this cache gives "
                                 f"({'missing layers ' + ', '.join(missing) if missing else 'fingerprints differ'}); "
                                 "use it with a cache from the same weights, preprocessing and layers")
    model = decoder_from_checkpoint(ckpt).to(device)
    model.checkpoint = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "scheduler", "best_model")}
    return model


@torch.no_grad()
def reconstruct(decoder: nn.Module, cache: Cache, idx: Index, batch_size: int = 16) -> np.ndarray:
    """(n, 3, H, W) float32 reconstructions in [0, 1] of samples `idx` of `cache`."""
    device = next(decoder.parameters()).device
    idx = np.arange(cache.meta.n)[idx] if isinstance(idx, slice) else np.atleast_1d(np.asarray(idx))
    out = []
    decoder.eval()
    for s in range(0, len(idx), batch_size):
        part = idx[s: s + batch_size]
        feats = [torch.from_numpy(cache.features(l, part)).to(device).float() for l in decoder.cfg.layers]
        out.append(decoder(feats).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, *cache.meta.image_shape), np.float32)


def extract_features(**settings):
    """Stage 1, as `extract-features`, with the same settings and defaults (`ExtractConfig`):
    returns an ExtractResult."""
    from .extract.run import extract

    return extract(from_python(ExtractConfig, settings))


def train_decoder(layer: str | Sequence[str], **settings) -> dict:
    """Stage 2, as `train-decoder --layer LAYER`, with the same settings and defaults (`TrainConfig`):
    trains into `out` (default runs/<layer>) and returns the last epoch's metrics."""
    from .train.loop import fit

    layers = tuple(l.strip() for l in layer.split(",")) if isinstance(layer, str) else tuple(layer)
    return fit(from_python(TrainConfig, {"layers": layers, **settings}))


def score(**settings) -> dict:
    """Stage 3, as `score`, with the same settings and defaults (`ScoreConfig`): scores every run and
    writes the report; returns its metrics."""
    from .evaluate.scoring import score as run

    return run(from_python(ScoreConfig, settings))
