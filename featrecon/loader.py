"""Batches from the feature cache, fast enough to keep a decoder fed.

Reading one sample at a time from a compressed, sharded store costs a shard
lookup per sample; reading whole shards costs one sequential read each. So the
loader works in shards: it shuffles the order of shards each epoch, reads them
on background threads (`prefetch` ahead, in a fixed order so runs are
repeatable), pools a window of shards into a shuffle buffer and cuts batches
from a permutation of that buffer. Every requested sample comes out exactly
once per epoch. With `in_memory`, the requested samples are read once and each
epoch is a permutation of RAM.

Batches stay float16/uint8 on the host (half the bytes to move); the training
step converts them to float32 on the device.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import schema as S
from .storage import CacheStore, open_cache


@dataclass
class Batch:
    features: list[torch.Tensor]  # per layer (B, C, H, W), stored dtype
    images: torch.Tensor  # (B, 3, H, W) uint8
    indices: np.ndarray  # (B,) sample indices in the cache


def available_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def bytes_per_sample(meta: S.CacheMeta, layers: tuple[str, ...]) -> int:
    item = np.dtype(meta.dtype).itemsize
    feats = sum(int(np.prod(meta.layers[l])) * item for l in layers)
    return feats + int(np.prod(meta.image_shape))


class CacheLoader:
    """Iterate `epoch(e)` for batches of the samples `indices` of a cache."""

    def __init__(self, path: Path, layers: tuple[str, ...], indices: np.ndarray, batch_size: int,
                 shuffle: bool = True, seed: int = 0, prefetch: int = 4, window: int = 4,
                 in_memory: bool | str = "auto", pin_memory: bool = False, fmt: str | None = None):
        self.path, self.fmt = Path(path), fmt
        self.layers = tuple(layers)
        self.indices = np.sort(np.asarray(indices, dtype=np.int64))
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.prefetch, self.window, self.pin_memory = max(1, prefetch), max(1, window), pin_memory
        self._store: CacheStore | None = None
        self.names = [S.feature_path(l) for l in self.layers] + [S.IMAGES]
        meta = self.store.meta
        if in_memory == "auto":
            in_memory = len(self.indices) * bytes_per_sample(meta, self.layers) < 0.3 * available_memory()
        self.in_memory = bool(in_memory)
        self._ram: dict[str, np.ndarray] | None = None
        # Shards that hold requested samples: (shard index, first sample, stop, rows of it requested)
        shard_of = self.indices // meta.shard_size
        self.blocks = []
        for k in np.unique(shard_of):
            start, stop = meta.shard_bounds(int(k))
            self.blocks.append((int(k), start, stop, self.indices[shard_of == k] - start))

    @property
    def store(self) -> CacheStore:
        # Opened lazily, per process: h5py handles cannot be pickled into workers.
        if self._store is None:
            self._store = open_cache(self.path, "r", self.fmt)
        return self._store

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def _read_block(self, block) -> dict[str, np.ndarray]:
        _, start, stop, rows = block
        out = {}
        for name in self.names:
            data = self.store.read(name, start, stop)  # one whole shard: a sequential read
            out[name] = data if len(rows) == stop - start else data[rows]
        out["index"] = rows + start
        return out

    def _blocks_in_order(self, order: list) -> Iterator[dict[str, np.ndarray]]:
        with ThreadPoolExecutor(self.prefetch, thread_name_prefix="cache-read") as pool:
            futures = [pool.submit(self._read_block, b) for b in order[: self.prefetch]]
            for i in range(len(order)):
                block = futures[i].result()
                if i + self.prefetch < len(order):
                    futures.append(pool.submit(self._read_block, order[i + self.prefetch]))
                futures[i] = None  # let the block's memory go once consumed
                yield block

    def _load_ram(self) -> dict[str, np.ndarray]:
        if self._ram is None:
            parts = list(self._blocks_in_order(self.blocks))
            self._ram = {k: np.concatenate([p[k] for p in parts]) for k in [*self.names, "index"]}
        return self._ram

    def _batch(self, pool: dict[str, np.ndarray], rows: np.ndarray) -> Batch:
        def t(a: np.ndarray) -> torch.Tensor:
            x = torch.from_numpy(np.ascontiguousarray(a))
            return x.pin_memory() if self.pin_memory else x

        return Batch([t(pool[n][rows]) for n in self.names[:-1]], t(pool[S.IMAGES][rows]), pool["index"][rows])

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        """Batches of one epoch. The order depends only on (seed, epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        if self.in_memory:
            pool = self._load_ram()
            order = rng.permutation(len(pool["index"])) if self.shuffle else np.arange(len(pool["index"]))
            for s in range(0, len(order), self.batch_size):
                yield self._batch(pool, order[s: s + self.batch_size])
            return
        blocks = [self.blocks[i] for i in rng.permutation(len(self.blocks))] if self.shuffle else self.blocks
        carry: dict[str, np.ndarray] | None = None
        stream = self._blocks_in_order(blocks)
        while True:
            window = [b for _, b in zip(range(self.window), stream)]
            if not window:
                break
            if carry is not None:
                window.insert(0, carry)
            pool = {k: np.concatenate([w[k] for w in window]) for k in window[0]}
            n = len(pool["index"])
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            full = n - n % self.batch_size
            for s in range(0, full, self.batch_size):
                yield self._batch(pool, order[s: s + self.batch_size])
            carry = {k: v[order[full:]] for k, v in pool.items()} if full < n else None
        if carry is not None:
            yield self._batch(carry, np.arange(len(carry["index"])))
