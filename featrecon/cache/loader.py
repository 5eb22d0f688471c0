"""Batches from the feature cache at the speed of the codec.

Each epoch's plan (`plan`) says, before anything is read, which batch slot every sample
goes to. A pool of `threads` threads then decodes every sample straight into its slot of
the batch buffer, `prefetch` batches (windowed: shards) ahead of the consumer: with the
global shuffle each sample's chunk is read through its shard's index from the shard file
mapped into memory, in the windowed shuffle each shard is read whole. One decompression and
no other copy on Zarr caches (see `shard_reader`), a read and one copy on HDF5. The codecs
release the GIL, so the rate grows with the threads.
On CUDA the batch buffers are pinned, so their copy to the device can run while the
previous step computes (`train.step.device_batches`).

With `in_memory`, the requested samples are decoded once into RAM and each batch is one
gather from there. Batches stay float16/uint8 on the host (half the bytes to move); the
training step converts them to float32 on the device.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CorruptChunk, FeatreconError
from . import remote
from . import schema as S
from .base import CacheStore
from .factory import open_cache
from .plan import SHUFFLES, Block, blocks, epoch_plan, steps_per_epoch

log = logging.getLogger(__name__)
REMOTE_THREADS = 32  # shard reads in flight on an object store
# The global shuffle reads at least this many samples ahead of the consumer: with small batches,
# twice the threads' worth of batches left the readers idle between batches (benchmarks/DESIGN.md).
AHEAD_SAMPLES = 128
# A batch of the global shuffle is split into tasks of at least this many samples: each task costs
# the GIL a future and a wake-up, so small batches go to one thread each (benchmarks/DESIGN.md).
TASK_SAMPLES = 16


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


def default_threads() -> int:
    return os.cpu_count() or 1


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype)).dtype


class Buffers(dict):
    """One batch's buffers, {array name: (n, ...) tensor}, with numpy views of them (`arrays`) made once
    per buffer: the reading threads fill numpy rows (torch's indexing is slower), and a recycled
    buffer's `Tensor.numpy()` per batch was a tenth of the GIL time the streaming loader's threads
    waited for (py-spy, benchmarks/DESIGN.md)."""

    @functools.cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        return {name: t.numpy() for name, t in self.items()}


class BufferPool:
    """Batch buffers (`Buffers`), recycled when `reuse`. Fresh buffers of tens
    of MB come from mmap and cost a page fault per 4 KiB on first touch (benchmarks/DESIGN.md);
    pinned ones come from PyTorch's caching host allocator, which already reuses them."""

    def __init__(self, shapes: dict[str, tuple], pin_memory: bool, reuse: bool):
        self.shapes, self.pin_memory, self.reuse = shapes, pin_memory, reuse and not pin_memory
        self._free: dict[int, list[Buffers]] = {}

    def take(self, n: int) -> Buffers:
        if self._free.get(n):
            return self._free[n].pop()
        return Buffers({name: torch.empty((n, *shape), dtype=torch_dtype(dtype), pin_memory=self.pin_memory)
                        for name, (shape, dtype) in self.shapes.items()})

    def give_back(self, buffers: Buffers) -> None:
        if self.reuse:
            n = next(iter(buffers.values())).shape[0]
            self._free.setdefault(n, []).append(buffers)


class CorruptSamples:
    """What a reader does with a sample whose stored chunk fails its checks or is missing: an error
    naming it (the default), or with `skip` a warning, and the sample left out of every batch."""

    def __init__(self, path, store_of, skip: bool):
        self.path, self._store_of, self.skip = path, store_of, skip
        self.found: set[int] = set()
        self._lock = threading.Lock()

    def on_error(self):
        """The `on_error` callback for a row reader: None (raise) unless skipping."""
        return self._note if self.skip else None

    def _note(self, e: CorruptChunk) -> None:
        with self._lock:
            if e.sample not in self.found:
                self.found.add(e.sample)
                log.warning("%s", self.error(e, skipped=True))

    def error(self, e: CorruptChunk, skipped: bool = False) -> FeatreconError:
        return FeatreconError(
            f"{self.path}: {self._store_of().where(e)}: {e.why}; "
            + ("left out (--skip-corrupt); " if skipped else "")
            + f"the cache is damaged: run `featrecon verify {self.path} --repair`, then the original "
            "extract-features command again" + ("" if skipped else " (or pass --skip-corrupt to leave such samples out)"))

    def drop(self, buffers: Buffers, indices: np.ndarray):
        """The batch without the samples found damaged so far (None if none is left): the buffers
        themselves, or a copy of their other rows."""
        bad = np.isin(indices, list(self.found)) if self.found else None
        if bad is None or not bad.any():
            return buffers, indices
        keep = np.flatnonzero(~bad)
        if len(keep) == 0:
            return None
        return {n: b.index_select(0, torch.from_numpy(keep)) for n, b in buffers.items()}, indices[keep]


class CacheLoader:
    """Iterate `epoch(e)` for batches of the samples `indices` of a cache."""

    def __init__(self, path: Path, layers: tuple[str, ...], indices: np.ndarray, batch_size: int,
                 shuffle: bool = True, seed: int = 0, prefetch: int | None = None, window: int = 4,
                 in_memory: bool | str = "auto", pin_memory: bool = False, threads: int | None = None,
                 reuse_buffers: bool = False, skip_corrupt: bool = False, fmt: str | None = None,
                 rank: int = 0, world: int = 1, mode: str = "window"):
        """`reuse_buffers`: a batch's buffers are recycled once the next batch is asked for (for
        callers done with a batch by then). `rank`, `world`: data parallel; every rank computes the
        same plan and reads its part of each global batch (see `plan.epoch_plan`). `mode`: the
        shuffle, "global" or "window" (see `plan`), or "auto": global for a local cache, windowed on
        an object store, where each read is a round trip and whole shard objects are read instead."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} of a world of {world}")
        self.path, self.fmt = (path if remote.is_url(path) else Path(path)), fmt
        if mode not in (*SHUFFLES, "auto"):
            raise ValueError(f"shuffle mode {mode!r}: choose auto or one of {', '.join(SHUFFLES)}")
        self.mode = ("window" if remote.is_url(path) else "global") if mode == "auto" else mode
        self.rank, self.world = rank, world
        self.layers = tuple(layers)
        self.indices = np.sort(np.asarray(indices, dtype=np.int64))
        self.batch_size, self.shuffle, self.seed, self.window = batch_size, shuffle, seed, max(1, window)
        # An object store answers each read after a round trip: many reads in flight hide it.
        self.threads = max(1, threads or (REMOTE_THREADS if remote.is_url(path) else default_threads()))
        # Read ahead of the consumer: batches (the global shuffle), else shards.
        by_batch = self.mode == "global" and shuffle
        self.prefetch = max(1, prefetch or (max(2 * self.threads, -(-AHEAD_SAMPLES // batch_size)) if by_batch
                                            else 2 * self.threads))
        self.names = [S.feature_path(l) for l in self.layers] + [S.IMAGES]
        self._store: CacheStore | None = None
        self._readers: dict | None = None
        self._pool: ThreadPoolExecutor | None = None
        meta = self.store.meta
        layout = meta.sample_arrays()
        self.shapes = {n: layout[n] for n in self.names}  # name -> (per-sample shape, dtype) of what is read
        self.buffers = BufferPool(self.shapes, pin_memory, reuse_buffers)
        self.damage = CorruptSamples(self.path, lambda: self.store, skip_corrupt)
        self.in_memory = bool(fits_in_memory(meta, self.layers, len(self.indices)) if in_memory == "auto" else in_memory)
        self._ram: dict[str, torch.Tensor] | None = None
        self.blocks = blocks(self.indices, meta.shard_size)
        # Block b's rows are self.indices[offsets[b]: offsets[b + 1]] (the blocks hold the sorted indices).
        self.offsets = np.cumsum([0] + [len(b.rows) for b in self.blocks])

    @property
    def corrupt(self) -> set[int]:
        """The samples left out as damaged so far (with skip_corrupt)."""
        return self.damage.found

    @property
    def store(self) -> CacheStore:
        if self._store is None:
            self._store = open_cache(self.path, "r", self.fmt)
        return self._store

    def __len__(self) -> int:
        return steps_per_epoch(len(self.indices), self.batch_size, self.world)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        for reader in (self._readers or {}).values():
            reader.close()
        self._readers = None
        if self._store is not None:
            self._store.close()
            self._store = None

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
                self._reader(name).read(block.k, block.rows, slots[name], on_error=self.damage.on_error())
        except CorruptChunk as e:
            raise self.damage.error(e) from None

    def _batches(self, filled: Iterator[tuple[Buffers, np.ndarray]]) -> Iterator[Batch]:
        """Batches from (buffers, indices), without the samples found damaged; each batch's buffers
        go back to the pool when the caller asks for the next one."""
        for buffers, indices in filled:
            kept = self.damage.drop(buffers, indices)
            if kept is not None:
                yield Batch([kept[0][n] for n in self.names[:-1]], kept[0][S.IMAGES], kept[1])
            # The pool takes back the buffers it gave: a batch that lost samples was copied out of them,
            # and a copy given back in their place (at its smaller size) was never asked for again.
            self.buffers.give_back(buffers)

    def plan(self, epoch: int) -> tuple[list[int], np.ndarray]:
        """This rank's plan of `epoch` (see `plan.epoch_plan`)."""
        return epoch_plan([len(b.rows) for b in self.blocks], self.batch_size, self.seed, epoch, self.shuffle,
                          self.window, self.rank, self.world, self.mode)

    def describe(self) -> str:
        """The shuffle in words, for the log."""
        if not self.shuffle:
            return "no shuffle"
        if self.mode == "global":
            return ("global shuffle: every batch drawn from the whole set" + ("" if self.in_memory else
                    ", each sample's chunk read through its shard's index"))
        return f"windowed shuffle: batches drawn from {self.window} shards at a time, each shard read whole"

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        """Batches of one epoch. The order depends only on (seed, epoch)."""
        if self.in_memory:
            return self._batches(self._memory_epoch(epoch))
        return self._batches(self._stream_batches(epoch) if self.mode == "global" and self.shuffle
                             else self._stream_epoch(epoch))

    def _stream_batches(self, epoch: int) -> Iterator[tuple[Buffers, np.ndarray]]:
        """The global shuffle, streamed: batch by batch, `prefetch` batches ahead, each sample's chunks
        read on the pool (a task per TASK_SAMPLES samples or more, at most one per thread). What each
        batch reads is worked out once per epoch, in whole arrays: per batch Python work is GIL time the
        reading threads wait for."""
        order, seq = self.plan(epoch)
        samples = self.indices[self._positions(order, seq)]
        for name in self.names:  # a shard file cut in place since the last epoch is not read in place again
            self._reader(name).check_mapped()
        shard_size = self.store.meta.shard_size
        shards, rows = (samples // shard_size).tolist(), (samples % shard_size).tolist()
        bs = self.batch_size
        starts = range(0, len(seq), bs)
        pool = self._executor()

        def submit(start: int):
            n = min(bs, len(seq) - start)
            buffers = self.buffers.take(n)
            per_task = max(-(-n // self.threads), TASK_SAMPLES)
            futures = []
            for i in range(0, n, per_task):
                lo, hi = start + i, start + min(i + per_task, n)
                futures.append(pool.submit(self._decode_samples, shards[lo:hi], rows[lo:hi], i, buffers.arrays))
            return buffers, futures, start

        ahead = collections.deque(submit(s) for s in starts[: self.prefetch])
        following = iter(starts[self.prefetch:])
        try:
            while ahead:
                buffers, futures, start = ahead.popleft()
                for f in futures:
                    f.result()
                nxt = next(following, None)
                if nxt is not None:
                    ahead.append(submit(nxt))
                yield buffers, samples[start: start + bs]
        finally:
            for _, futures, _ in ahead:
                for f in futures:
                    f.cancel()

    def _decode_samples(self, shards: list[int], rows: list[int], first: int, arrays: dict[str, np.ndarray]) -> None:
        """Decode sample i's row `rows[i]` of shard `shards[i]` of every array into batch slot first + i."""
        try:
            on_error = self.damage.on_error()
            for name in self.names:
                out = arrays[name]
                self._reader(name).read_samples(shards, rows, out[first: first + len(shards)], on_error=on_error)
        except CorruptChunk as e:
            raise self.damage.error(e) from None

    def _stream_epoch(self, epoch: int) -> Iterator[tuple[Buffers, np.ndarray]]:
        order, seq = self.plan(epoch)
        samples = self.indices[self._positions(order, seq)]
        bs, n = self.batch_size, len(seq)
        batch_of = np.arange(n) // bs
        # For each block (in reading order): the batch slots its rows go to, and the last
        # block each batch needs before it is complete.
        slots_of = [[] for _ in order]
        for s, (p, r) in enumerate(seq.tolist()):
            slots_of[p].append((r, s))
        last_block = np.zeros((n + bs - 1) // bs, dtype=np.int64)
        np.maximum.at(last_block, batch_of, seq[:, 0])
        buffers: dict[int, Buffers] = {}
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
                    buffers[b] = self.buffers.take(min(bs, n - b * bs))
                for name in self.names:
                    slots[name].append(buffers[b].arrays[name][s - b * bs])
            futures.append(pool.submit(self._decode, block, slots))

        try:
            for b in range(len(last_block)):
                while len(futures) < len(order) and len(futures) <= last_block[b] + self.prefetch:
                    submit(len(futures))
                part = seq[b * bs: (b + 1) * bs]
                for p in range(int(part[:, 0].min()), int(last_block[b]) + 1):
                    futures[p].result()  # a batch is whole once every block it draws from is decoded
                yield buffers.pop(b), samples[b * bs: (b + 1) * bs]
        finally:
            for f in futures:
                f.cancel()

    def _load_ram(self) -> dict[str, torch.Tensor]:
        """Every requested sample, decoded once, in index order."""
        if self._ram is None:
            ram = {name: torch.empty((len(self.indices), *shape), dtype=torch_dtype(dtype))
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

    def _memory_epoch(self, epoch: int) -> Iterator[tuple[Buffers, np.ndarray]]:
        ram = self._load_ram()
        order, seq = self.plan(epoch)
        # The plan's (block, row) pairs as positions in RAM, which holds the blocks in index order.
        rows = self._positions(order, seq)
        for s in range(0, len(rows), self.batch_size):
            take = torch.from_numpy(rows[s: s + self.batch_size])
            buffers = self.buffers.take(len(take))
            for name in self.names:
                torch.index_select(ram[name], 0, take, out=buffers[name])
            yield buffers, self.indices[take.numpy()]

    def _positions(self, order: list[int], seq: np.ndarray) -> np.ndarray:
        """Where each (position in the block order, row) pair of a plan's sequence lies in the sorted
        `indices` (which is also where RAM mode holds it)."""
        return self.offsets[np.asarray(order, dtype=np.int64)[seq[:, 0]]] + seq[:, 1]


_DONE: Future = Future()
_DONE.set_result(None)
