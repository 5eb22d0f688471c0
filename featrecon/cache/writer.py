"""The extraction's writer thread: samples collected into shard buffers, each shard
compressed on the store's pool and written whole, off the forward's thread."""

from __future__ import annotations

import collections
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import schema as S
from .base import CacheStore


class ShardWriter(threading.Thread):
    """Collects samples into shard buffers and writes each shard whole, off the main thread.

    A complete shard starts compressing on the store's pool at once and is handed to a
    few disk threads, which write it when its chunks are ready: one shard's disk write no
    longer holds up the next, and every compression thread stays busy. Each shard is
    still written whole, by one thread; different shards are different files."""

    def __init__(self, store: CacheStore, shards: list[int], max_batches: int = 8, in_flight: int = 8,
                 disk_threads: int = 4):
        super().__init__(daemon=True, name="shard-writer")
        self.store, self.meta = store, store.meta
        self.queue: queue.Queue = queue.Queue(maxsize=max_batches)
        self.error: BaseException | None = None
        self.written = 0
        self.write_seconds = 0.0
        self._lock = threading.Lock()
        self._buffers: dict[int, dict] = {}
        self._writing: collections.deque = collections.deque()  # futures of shard writes, oldest first
        self.in_flight = in_flight
        self._disk = ThreadPoolExecutor(disk_threads if store.parallel_shards else 1, thread_name_prefix="shard-write")
        self._expected = {k: self.meta.shard_bounds(k) for k in shards}
        self._layout = self.meta.sample_arrays()  # name -> (per-sample shape, dtype)

    def put(self, item) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        self.put(None)
        self.join()
        if self.error is not None:
            raise self.error
        if self._buffers:
            raise RuntimeError(f"shards {sorted(self._buffers)} never completed")

    def run(self) -> None:
        try:
            while (item := self.queue.get()) is not None:
                self._add(*item)
            while self._writing:
                self._writing.popleft().result()
        except BaseException as e:  # handed to the main thread by put()/finish()
            self.error = e
            while True:  # drain, so the producer is never stuck on a full queue
                try:
                    if self.queue.get(timeout=1) is None:
                        break
                except queue.Empty:
                    break
        finally:
            self._disk.shutdown(wait=True, cancel_futures=True)

    def _buffer(self, k: int) -> dict:
        """Shard k's rows so far: views into the batches that produced them, no copies."""
        if k not in self._buffers:
            start, stop = self._expected[k]
            n = stop - start
            self._buffers[k] = {"rows": {name: [None] * n for name in self._layout},
                                "status": np.zeros(n, np.uint8), "skipped": {}, "overflow": {}, "left": n}
        return self._buffers[k]

    def _zeros(self, name: str) -> np.ndarray:
        return np.zeros(*self._layout[name])  # a skipped file's row

    def _add(self, indices: np.ndarray, arrays: dict[str, np.ndarray], reasons: list[str],
             overflow: dict[str, np.ndarray], ids: list[str], ready=None) -> None:
        if ready is not None:
            ready.synchronize()  # the batch's copy from the GPU has landed in `arrays`
        for j, i in enumerate(indices.tolist()):
            k = i // self.meta.shard_size
            buf, r = self._buffer(k), i - self._expected[k][0]
            if reasons[j]:
                buf["status"][r] = S.STATUS_SKIPPED
                buf["skipped"][ids[j]] = reasons[j]
                for name in buf["rows"]:
                    buf["rows"][name][r] = self._zeros(name)
            else:
                for name, a in arrays.items():
                    buf["rows"][name][r] = a[j]
                buf["status"][r] = S.STATUS_DONE
                for layer, counts in overflow.items():
                    if counts[j]:
                        buf["overflow"][layer] = buf["overflow"].get(layer, 0) + int(counts[j])
            buf["left"] -= 1
            if buf["left"] == 0:
                del self._buffers[k]
                self._writing.append(self._disk.submit(self._write, self.store.start_shard(k, buf["rows"]), buf))
                while self._writing and (len(self._writing) > self.in_flight or self._writing[0].done()):
                    self._writing.popleft().result()  # a failed write raises here

    def _write(self, shard, buf) -> None:
        t0 = time.perf_counter()
        self.store.finish_shard(shard, buf["status"], buf["skipped"], buf["overflow"])
        with self._lock:
            self.written += 1
            self.write_seconds += time.perf_counter() - t0
