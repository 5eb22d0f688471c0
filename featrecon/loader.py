"""Batches from the feature cache at the speed of the codec.

Each epoch has a plan fixed by (seed, epoch) alone: the order of the shards that
hold requested samples, then, window by window (`window` shards), a permutation of
the window's samples; the sequence is cut into batches. Every requested sample
comes out exactly once per epoch, and a rerun sees the same batches.

The plan says, before anything is read, which batch slot every sample goes to. A
pool of `threads` threads then reads whole shards (one sequential read each,
`prefetch` shards ahead of the consumer) and decodes every sample straight into its
slot of the batch buffer: one decompression and no other copy on Zarr caches (see
`zarr_shards`), a read and one copy on HDF5. The codecs release the GIL, so the
rate grows with the threads. On CUDA the batch buffers are pinned, so their copy to
the device can run while the previous step computes (`train.device_batches`).

With `in_memory`, the requested samples are decoded once into RAM and each batch is
one gather from there.

Batches stay float16/uint8 on the host (half the bytes to move); the training step
converts them to float32 on the device.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import FeatreconError, remote
from . import schema as S
from .storage import CacheStore, open_cache
from .zarr_shards import CorruptChunk

log = logging.getLogger(__name__)


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


def fits_in_memory(meta: S.CacheMeta, layers: tuple[str, ...], n: int) -> bool:
    """in_memory="auto": n samples of these layers take under 30% of the memory available now."""
    return n * bytes_per_sample(meta, layers) < 0.3 * available_memory()


REMOTE_THREADS = 32  # shard reads in flight on an object store


def default_threads() -> int:
    return os.cpu_count() or 1


@dataclass(frozen=True)
class Block:
    """The requested samples of one shard."""

    k: int  # shard index
    start: int  # the shard's first sample
    rows: np.ndarray  # positions inside the shard, sorted


class CacheLoader:
    """Iterate `epoch(e)` for batches of the samples `indices` of a cache."""

    def __init__(self, path: Path, layers: tuple[str, ...], indices: np.ndarray, batch_size: int,
                 shuffle: bool = True, seed: int = 0, prefetch: int | None = None, window: int = 4,
                 in_memory: bool | str = "auto", pin_memory: bool = False, threads: int | None = None,
                 reuse_buffers: bool = False, skip_corrupt: bool = False, fmt: str | None = None,
                 rank: int = 0, world: int = 1):
        self.path, self.fmt = (path if remote.is_url(path) else Path(path)), fmt
        # Data parallel: every rank computes the same epoch plan; each global batch of
        # batch_size * world samples is cut into `world` parts, and this rank reads part
        # `rank` only. The plan is cut to whole global batches, so every rank runs the same
        # number of steps (a rank with one step more would wait for the others' gradients forever).
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} of a world of {world}")
        self.rank, self.world = rank, world
        self.layers = tuple(layers)
        self.indices = np.sort(np.asarray(indices, dtype=np.int64))
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        # An object store answers each read after a round trip: many reads in flight hide it.
        self.threads = max(1, threads or (REMOTE_THREADS if remote.is_url(path) else default_threads()))
        self.prefetch = max(1, prefetch or 2 * self.threads)  # shards read ahead of the consumer
        self.window, self.pin_memory = max(1, window), pin_memory
        # Recycle a batch's buffers once the next batch is asked for: fresh buffers of tens of MB
        # come from mmap and cost a page fault per 4 KiB on first touch (layer1 read at 0.68 of
        # the codec with them, 0.9 without). Only for callers done with a batch by then.
        # Pinned buffers come from PyTorch's caching host allocator, which already reuses them.
        self.reuse_buffers = reuse_buffers and not pin_memory
        self._free: dict[int, list[dict[str, torch.Tensor]]] = {}
        # Samples whose stored chunks failed their checks: an error naming them, or with
        # skip_corrupt left out of every batch (and counted here).
        self.skip_corrupt = skip_corrupt
        self.corrupt: set[int] = set()
        self._corrupt_lock = threading.Lock()
        self.names = [S.feature_path(l) for l in self.layers] + [S.IMAGES]
        self._store: CacheStore | None = None
        self._readers: dict | None = None
        self._pool: ThreadPoolExecutor | None = None
        meta = self.store.meta
        layout = meta.sample_arrays()
        self.shapes = {n: layout[n] for n in self.names}  # name -> (per-sample shape, dtype) of what is read
        if in_memory == "auto":
            in_memory = fits_in_memory(meta, self.layers, len(self.indices))
        self.in_memory = bool(in_memory)
        self._ram: dict[str, torch.Tensor] | None = None
        shard_of = self.indices // meta.shard_size
        self.blocks = [Block(int(k), meta.shard_bounds(int(k))[0], self.indices[shard_of == k] - meta.shard_bounds(int(k))[0])
                       for k in np.unique(shard_of)]

    @property
    def store(self) -> CacheStore:
        if self._store is None:
            self._store = open_cache(self.path, "r", self.fmt)
        return self._store

    def __len__(self) -> int:
        if self.world > 1:
            return len(self.indices) // (self.batch_size * self.world)
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._store is not None:
            self._store.close()
            self._store = None
            self._readers = None

    # ------------------------------------------------------------------ reading

    def _reader(self, name: str):
        if self._readers is None:
            self._readers = {n: self.store.row_reader(n) for n in self.names}
        return self._readers[name]

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="cache-read")
        return self._pool

    def _decode(self, block: Block, slots: dict[str, list[np.ndarray]]) -> None:
        """Decode the block's rows of every array into their slots (one buffer per row)."""
        try:
            for name in self.names:
                self._reader(name).read(block.k, block.rows, slots[name],
                                        on_error=self._skip if self.skip_corrupt else None)
        except CorruptChunk as e:
            raise self._corrupt(e) from None

    def _skip(self, e: CorruptChunk) -> None:
        with self._corrupt_lock:
            if e.sample not in self.corrupt:
                self.corrupt.add(e.sample)
                log.warning("%s", self._corrupt(e, skipped=True))

    def _corrupt(self, e: CorruptChunk, skipped: bool = False) -> FeatreconError:
        return FeatreconError(
            f"{self.path}: {self.store.where(e)}: {e.why}; "
            + ("left out (--skip-corrupt); " if skipped else "")
            + f"the cache is damaged: run `featrecon verify {self.path} --repair`, then the original "
            "extract-features command again" + ("" if skipped else " (or pass --skip-corrupt to leave such samples out)"))

    def _new_buffers(self, n: int) -> dict[str, torch.Tensor]:
        if self._free.get(n):
            return self._free[n].pop()
        return {name: torch.empty((n, *shape), dtype=_torch_dtype(dtype), pin_memory=self.pin_memory)
                for name, (shape, dtype) in self.shapes.items()}

    def _batches(self, filled: Iterator[tuple[dict[str, torch.Tensor], np.ndarray]]) -> Iterator[Batch]:
        """Batches from (buffers, indices); with `reuse_buffers`, each batch's buffers go back to
        the free list when the caller asks for the next one."""
        for buffers, indices in filled:
            bad = np.isin(indices, list(self.corrupt)) if self.corrupt else None
            if bad is not None and bad.any():
                keep = np.flatnonzero(~bad)
                buffers = {n: b.index_select(0, torch.from_numpy(keep)) for n, b in buffers.items()}
                indices = indices[keep]
                if len(indices) == 0:
                    continue
            yield Batch([buffers[n] for n in self.names[:-1]], buffers[S.IMAGES], indices)
            if self.reuse_buffers:
                self._free.setdefault(len(indices), []).append(buffers)

    # ------------------------------------------------------------------ the plan

    def plan(self, epoch: int) -> tuple[list[int], np.ndarray]:
        """(block order, sequence): the blocks in reading order and, for every sample of the
        epoch in batch order, (position in the block order, row of that block's rows)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.blocks)).tolist() if self.shuffle else list(range(len(self.blocks)))
        parts = []
        for w in range(0, len(order), self.window):
            pos = np.concatenate([np.stack([np.full(len(self.blocks[b].rows), w + i), np.arange(len(self.blocks[b].rows))], 1)
                                  for i, b in enumerate(order[w: w + self.window])])
            parts.append(pos[rng.permutation(len(pos))] if self.shuffle else pos)
        seq = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
        if self.world > 1:  # this rank's part of each whole global batch
            bs, g = self.batch_size, self.batch_size * self.world
            steps = len(seq) // g
            seq = seq[: steps * g].reshape(steps, self.world, bs, 2)[:, self.rank].reshape(-1, 2)
        return order, seq

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        """Batches of one epoch. The order depends only on (seed, epoch)."""
        return self._batches(self._memory_epoch(epoch) if self.in_memory else self._stream_epoch(epoch))

    def _stream_epoch(self, epoch: int) -> Iterator[tuple[dict[str, torch.Tensor], np.ndarray]]:
        order, seq = self.plan(epoch)
        bs, n = self.batch_size, len(seq)
        batch_of = np.arange(n) // bs
        # For each block (in reading order): the batch slots its rows go to, and the last
        # block each batch needs before it is complete.
        slots_of = [[] for _ in order]
        for s, (p, r) in enumerate(seq.tolist()):
            slots_of[p].append((r, s))
        last_block = np.zeros((n + bs - 1) // bs, dtype=np.int64)
        np.maximum.at(last_block, batch_of, seq[:, 0])
        buffers: dict[int, dict[str, torch.Tensor]] = {}
        futures: list[Future] = []
        pool = self._executor()

        def submit(p: int) -> None:
            block, pairs = self.blocks[order[p]], sorted(slots_of[p])  # (row, position in the sequence)
            if not pairs:
                futures.append(_DONE)
                return
            if len(pairs) < len(block.rows):  # another rank reads the others (or the plan was cut)
                block = Block(block.k, block.start, block.rows[[r for r, _ in pairs]])
            slots: dict[str, list[np.ndarray]] = {name: [] for name in self.names}
            for _, s in pairs:
                b = s // bs
                if b not in buffers:
                    buffers[b] = self._new_buffers(min(bs, n - b * bs))
                for name in self.names:
                    slots[name].append(buffers[b][name][s - b * bs].numpy())
            futures.append(pool.submit(self._decode, block, slots))

        try:
            for b in range(len(last_block)):
                while len(futures) < len(order) and len(futures) <= last_block[b] + self.prefetch:
                    submit(len(futures))
                part = seq[b * bs: (b + 1) * bs]
                for p in range(int(part[:, 0].min()), int(last_block[b]) + 1):
                    futures[p].result()  # a batch is whole once every block it draws from is decoded
                yield buffers.pop(b), self._sample_indices(order, part)
        finally:
            for f in futures:
                f.cancel()

    def _load_ram(self) -> dict[str, torch.Tensor]:
        """Every requested sample, decoded once, in index order."""
        if self._ram is None:
            ram = {name: torch.empty((len(self.indices), *shape), dtype=_torch_dtype(dtype))
                   for name, (shape, dtype) in self.shapes.items()}
            pool, futures, at = self._executor(), [], 0
            for block in self.blocks:
                slots = {name: [ram[name][at + j].numpy() for j in range(len(block.rows))] for name in self.names}
                futures.append(pool.submit(self._decode, block, slots))
                at += len(block.rows)
            for f in futures:
                f.result()
            self._ram = ram
        return self._ram

    def _memory_epoch(self, epoch: int) -> Iterator[tuple[dict[str, torch.Tensor], np.ndarray]]:
        ram = self._load_ram()
        order, seq = self.plan(epoch)
        # The plan's (block, row) pairs as positions in RAM, which holds the blocks in index order.
        offsets = np.cumsum([0] + [len(b.rows) for b in self.blocks])
        rows = offsets[np.asarray(order, dtype=np.int64)[seq[:, 0]]] + seq[:, 1]
        for s in range(0, len(rows), self.batch_size):
            take = torch.from_numpy(rows[s: s + self.batch_size])
            buffers = self._new_buffers(len(take))
            for name in self.names:
                torch.index_select(ram[name], 0, take, out=buffers[name])
            yield buffers, self.indices[take.numpy()]

    def _sample_indices(self, order: list[int], part: np.ndarray) -> np.ndarray:
        """Cache indices of (position in the block order, row) pairs."""
        return np.array([self.blocks[order[p]].start + self.blocks[order[p]].rows[r] for p, r in part.tolist()],
                        dtype=np.int64)


_DONE: Future = Future()
_DONE.set_result(None)


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype)).dtype
