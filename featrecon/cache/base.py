"""The feature cache's one interface, `CacheStore`, which both backends implement
(`zarr_store`, `h5_store`); it imports neither (the factory, `factory`, does).

Arrays are addressed by schema name (`images`, `features/layer3`). Writes go a whole
shard at a time from one writer: zarr-python loses data when two writers touch parts
of one shard, and a whole-shard write is what makes a killed run resumable (a shard is
either fully written and marked done, or recomputed). Absence is damage: a sample marked
done whose stored object is missing is reported like a failed checksum, on every read path.
"""

from __future__ import annotations

import shlex
import threading
from abc import ABC, abstractmethod
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CorruptChunk, FeatreconError
from . import schema as S
from .schema import CENTRE, CacheMeta, Views

# What `factory.inspect_target` finds at a cache's place.
ABSENT, EMPTY, CACHE, UNFINISHED, DAMAGED, FOREIGN = "absent", "empty", "cache", "unfinished", "damaged", "foreign"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # the first bytes of every HDF5 file


@dataclass
class StartedShard:
    """A shard handed to `CacheStore.start_shard`: its rows, or their compression under way."""

    k: int
    start: int
    stop: int
    arrays: dict


class CacheStore(ABC):
    """A feature cache on disk. Arrays are addressed by schema name (`images`, `features/layer3`)."""

    path: Path
    meta: CacheMeta
    pool: Executor | None = None  # threads a backend may use to compress a shard's chunks in parallel
    parallel_shards = False  # may several threads finish different shards at once?
    _attrs_lock = threading.Lock()  # the bookkeeping attributes are one object, shared by all shards

    @abstractmethod
    def read_with_library(self, name: str, start: int, stop: int) -> np.ndarray:
        """Samples [start, stop) of an (N, ...) array through the backend's own library (zarr-python,
        h5py), as stored: an object that is missing reads as zeros. The stages read through
        `read`, `read_rows` and `row_reader`, which check that every done sample is there."""

    @abstractmethod
    def _read_small(self, name: str) -> np.ndarray:
        """A whole small array (ids, labels, split, status, views), every stored object checked present."""

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Samples [start, stop) of an array, decompressed (see `read_rows`)."""
        if name in self.meta.sample_arrays():
            return self.read_rows(name, np.arange(start, stop))
        return self._read_small(name)[start:stop]

    def read_all(self, name: str) -> np.ndarray:
        """A whole array: a small one (ids, labels, split, status) or every sample of a per-sample one."""
        if name in self.meta.sample_arrays():
            return self.read_rows(name, np.arange(self.meta.n))
        return self._read_small(name)

    def done(self) -> np.ndarray:
        """(N,) bool: the samples marked done, whose stored objects must exist."""
        return self.status() == S.STATUS_DONE

    def missing_rows(self, name: str, k: int, rows) -> list[int]:
        """Rows (positions in shard k) of done samples whose stored chunk or shard object is absent.
        A backend that can tell overrides this."""
        return []

    @abstractmethod
    def attr(self, key: str, default=None):
        """A root attribute, JSON-decoded."""

    @abstractmethod
    def _write_arrays(self, start: int, stop: int, arrays: dict[str, np.ndarray]) -> None: ...

    @abstractmethod
    def _set_attrs(self, updates: dict) -> None: ...

    @abstractmethod
    def _write_status(self, start: int, stop: int, status: np.ndarray) -> None: ...

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def write_shard(self, k: int, arrays: dict[str, np.ndarray | list[np.ndarray]], status: np.ndarray,
                    skipped: dict[str, str], overflow: dict[str, int]) -> None:
        """Write shard k whole: each array as (n, ...) or as a list of its n rows."""
        self.finish_shard(self.start_shard(k, arrays), status, skipped, overflow)

    def start_shard(self, k: int, arrays: dict[str, np.ndarray | list[np.ndarray]]) -> StartedShard:
        """Check shard k's rows and, where the backend can, start compressing them on `pool`;
        returns at once. `finish_shard` writes it. Starting several shards before finishing
        the first keeps every compression thread busy while one shard goes to disk."""
        start, stop = self.meta.shard_bounds(k)
        for name, rows in arrays.items():
            if len(rows) != stop - start:
                raise ValueError(f"shard {k} of {name}: {len(rows)} rows, expected {stop - start}")
        return StartedShard(k, start, stop, self._start_arrays(k, arrays))

    def finish_shard(self, shard: StartedShard, status: np.ndarray, skipped: dict[str, str],
                     overflow: dict[str, int]) -> None:
        """Write a started shard. Order matters for crash safety: data, then the bookkeeping
        attributes (keyed, so rewriting a shard is idempotent), then the status that marks
        the shard done."""
        self._write_arrays(shard.start, shard.stop, shard.arrays)
        with self._attrs_lock:
            updates = {}
            if skipped:
                updates[S.SKIPPED_ATTR] = {**self.attr(S.SKIPPED_ATTR, {}), **skipped}
            old_over = self.attr(S.OVERFLOW_ATTR, {})
            if overflow or str(shard.k) in old_over:
                over = {**old_over, str(shard.k): overflow}
                updates[S.OVERFLOW_ATTR] = {key: v for key, v in over.items() if v}
            if updates:
                self._set_attrs(updates)
        self._write_status(shard.start, shard.stop, status)

    def merge_records(self) -> None:
        """Gather per-shard records into the root attributes (a backend whose shards update
        the attributes directly, HDF5, has none)."""

    def _start_arrays(self, k: int, arrays: dict) -> dict:
        return arrays  # a backend that compresses on its own (HDF5) has nothing to start

    def row_reader(self, name: str) -> RowReader:
        """Reads chosen samples of one shard of array `name` into the caller's buffers."""
        return SliceReader(self, name)

    def read_rows(self, name: str, indices) -> np.ndarray:
        """Samples `indices` (any order, repeats allowed) of a per-sample array, in that order:
        whole shards read once each, every sample decoded straight into the result."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.meta.n):
            raise FeatreconError(f"{self.path}: sample indices must be in 0..{self.meta.n - 1}")
        shape, dtype = self.array_info(name)
        out = np.empty((len(indices), *shape[1:]), dtype)
        reader = self.row_reader(name)
        shard_of = indices // self.meta.shard_size
        for k in np.unique(shard_of):
            at = np.flatnonzero(shard_of == k)
            reader.read(int(k), (indices[at] - int(k) * self.meta.shard_size).tolist(), [out[j] for j in at])
        return out

    @abstractmethod
    def array_info(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        """(shape, dtype) of array `name`; KeyError if there is none."""

    def mark_pending(self, start: int, stop: int) -> None:
        """Set samples [start, stop) pending: the next extract-features run recomputes them."""
        self._write_status(start, stop, np.full(stop - start, S.STATUS_PENDING, np.uint8))

    # Convenience views used by every stage.
    def status(self) -> np.ndarray:
        return self._read_small(S.STATUS)

    def ids(self) -> list[str]:
        return S.decode_ids(self._read_small(S.IDS))

    def where(self, e: CorruptChunk) -> str:
        """A damaged chunk's place for an error message: its array, sample index and id."""
        try:
            sample_id = self.ids()[e.sample]
        except Exception:  # the ids themselves may be what is damaged
            sample_id = "?"
        return f"{e.array}, sample {e.sample} ({sample_id})"

    def centre(self) -> np.ndarray:
        """(N,) bool: the samples that are centre crops, the only ones scored or validated on
        (all of them in a cache without views)."""
        if not self.meta.views:
            return np.ones(self.meta.n, bool)
        return self._read_small(S.VIEW) == CENTRE

    def skipped(self) -> dict[str, str]:
        """{id: reason} of the files that could not be read."""
        return self._bookkeeping()[0]

    def _bookkeeping(self) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
        """(skipped files, {shard: {layer: float16 overflow count}})."""
        return self.attr(S.SKIPPED_ATTR, {}), self.attr(S.OVERFLOW_ATTR, {})

    def overflow_totals(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for per_layer in self._bookkeeping()[1].values():
            for layer, n in per_layer.items():
                totals[layer] = totals.get(layer, 0) + int(n)
        return totals


class RowReader:
    """Interface: `read(k, rows, outs, on_error=None)` decodes rows `rows` (positions inside
    shard k) of one array into `outs`, one C-contiguous buffer per row. A damaged sample
    raises `CorruptChunk`, or with `on_error` is handed to it (zero-filled) and the others
    are read. Safe to call from several threads at once. `read_chunks` does the same for a few
    rows of a shard, reading only theirs (a reader without a cheaper way reads as `read`)."""

    def read(self, k: int, rows, outs, on_error=None) -> None:
        raise NotImplementedError

    def read_chunks(self, k: int, rows, outs, on_error=None) -> None:
        self.read(k, rows, outs, on_error)

    def read_samples(self, shards, rows, outs, on_error=None) -> None:
        """Sample i's row `rows[i]` of shard `shards[i]` into `outs[i]`, the samples of a shuffled batch
        from any shards: grouped by shard for `read_chunks`."""
        by_shard: dict[int, tuple[list, list]] = {}
        for k, r, out in zip(shards, rows, outs):
            group = by_shard.setdefault(k, ([], []))
            group[0].append(r)
            group[1].append(out)
        for k, (group_rows, group_outs) in by_shard.items():
            self.read_chunks(k, group_rows, group_outs, on_error)

    def check_mapped(self) -> None:
        """Before an epoch: stop reading in place from any file that changed since it was mapped
        (nothing by default; see `shard_reader.ShardDecoder`)."""

    def close(self) -> None:
        """Release what the reader keeps open between reads (nothing by default)."""


class SliceReader(RowReader):
    """Any backend: read shard k's samples with `store.read`, then copy the rows asked for.
    When the shard fails its checks (HDF5's Fletcher-32, zarr's crc32c), the rows are read
    one by one to name the damaged ones."""

    def __init__(self, store: CacheStore, name: str):
        self.store, self.name = store, name

    def read(self, k, rows, outs, on_error=None):
        self._read(k, rows, outs, on_error, whole=True)

    def read_chunks(self, k, rows, outs, on_error=None):
        self._read(k, rows, outs, on_error, whole=False)

    def _read(self, k, rows, outs, on_error, whole: bool):
        """The rows through the backend's library: the whole shard at once (`whole`), or row by row."""
        start, stop = self.store.meta.shard_bounds(k)
        gone = set(self.store.missing_rows(self.name, k, rows))
        for r, out in zip(rows, outs):
            if r in gone:
                out[...] = 0
                CorruptChunk(self.name, start + r, "missing: its stored chunk is gone though the sample "
                             "is marked done").handle(on_error)
        pairs = [(r, o) for r, o in zip(rows, outs) if r not in gone]
        if whole and pairs:
            try:
                data = self.store.read_with_library(self.name, start, stop)
            except (OSError, ValueError):
                pass  # read row by row below, to name the damaged ones
            else:
                for r, out in pairs:
                    out[...] = data[r]
                return
        for r, out in pairs:
            try:
                out[...] = self.store.read_with_library(self.name, start + r, start + r + 1)[0]
            except (OSError, ValueError) as e:
                out[...] = 0
                why = (str(e).strip().splitlines() or [type(e).__name__])[0]
                CorruptChunk(self.name, start + r, f"fails its checksum or cannot be read ({why})").handle(on_error)


def stacked(rows) -> np.ndarray:
    return rows if isinstance(rows, np.ndarray) else np.stack(rows)


def small_columns(labels: np.ndarray, split: np.ndarray, views: Views) -> dict[str, np.ndarray]:
    """The small per-sample arrays written once, at creation, in their stored dtypes."""
    return {S.LABELS: labels.astype(np.int32), S.SPLIT: split.astype(np.uint8), S.VIEW: views.view.astype(np.uint16),
            S.VIEW_BOX: views.box.astype(np.float32), S.VIEW_FLIP: views.flip.astype(np.uint8)}


def rebuild_command(meta: CacheMeta, path) -> str:
    """The extract-features command that writes this cache again from its source images, for
    damage that `verify --repair` cannot mark (metadata, ids, labels)."""
    parts = ["extract-features", "--images", shlex.quote(meta.source_root), "--layers", ",".join(meta.layers),
             "--weights", shlex.quote(meta.weights), "--size", str(meta.preprocessing.crop), "--dtype", meta.dtype,
             "--codec", meta.codec, "--shard-size", str(meta.shard_size), "--holdout-fraction",
             str(meta.holdout_fraction), "--views", str(meta.views), "--out", shlex.quote(str(path)), "--overwrite"]
    if meta.autocast != "none":
        parts += ["--autocast", meta.autocast]
    labels = "" if meta.label_source in ("none", "wnid-folder", "wnid-filename", "wnid-filename+wnid-folder") else \
        f" (with the --labels file it was made with: {meta.label_source})"
    return " ".join(parts) + labels
