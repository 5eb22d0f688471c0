"""`featrecon verify CACHE [--repair]`: read every stored chunk, check it, say what is damaged.

Every chunk of every array is read on a thread pool (the shard decoders check each
chunk's crc32c, HDF5 its Fletcher-32), the features are checked for values that are
not finite beyond the float16 overflows the cache recorded, and the metadata for
shapes, types and status values. `--repair` marks the shards holding damaged samples
as pending, so that rerunning the original `extract-features` command recomputes just
those shards; the result equals an undamaged cache byte for byte, since a shard is
always written whole from the same inputs.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import CorruptChunk
from . import remote
from . import schema as S
from .base import CacheStore, rebuild_command
from .factory import open_cache
from .lock import WriterLock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Damage:
    array: str  # schema name of the array
    sample: int  # global sample index; -1 where the damage is not tied to a sample
    why: str


@dataclass
class VerifyReport:
    cache: Path
    checksummed: bool  # schema 2: every chunk has a checksum to check
    chunks: int = 0  # per-sample chunks read
    damaged: list[Damage] = field(default_factory=list)
    repaired_shards: list[int] = field(default_factory=list)
    ids: list[str] | None = None  # to name damaged samples; None if the ids themselves are unreadable
    rebuild: str = ""  # the extract-features command that writes the whole cache again

    @property
    def metadata_damaged(self) -> bool:
        """Damage that is no sample's data (a missing or unreadable array): --repair cannot mark it."""
        return any(d.sample < 0 for d in self.damaged)

    def advice(self, repaired: bool) -> str:
        """What to do next, one line per remedy that applies."""
        lines = []
        if self.repaired_shards:
            shards = ", ".join(map(str, self.repaired_shards[:20])) + (", ..." if len(self.repaired_shards) > 20 else "")
            lines.append(f"marked {len(self.repaired_shards)} shard(s) pending ({shards}); rerun the extract-features "
                         f"command that made {self.cache} to re-extract them")
        elif self.samples():
            lines.append(f"to repair: featrecon verify {self.cache} --repair, then rerun the extract-features command "
                         "that made it")
        if self.metadata_damaged:
            lines.append(f"{'also: ' if lines else ''}damage outside the samples' data cannot be marked for repair; "
                         f"write the cache again: {self.rebuild}")
        return "\n".join(lines)

    @property
    def ok(self) -> bool:
        return not self.damaged

    def samples(self) -> list[int]:
        return sorted({d.sample for d in self.damaged if d.sample >= 0})

    def summary(self) -> str:
        head = f"{self.cache}: {self.chunks:,} chunks read"
        if not self.checksummed:
            head += ("; this cache predates checksums (schema version 1): damaged chunks that still decompress "
                     "cannot be told from good ones, so only decoding errors and non-finite features are found")
        if self.ok:
            return head + "; no damage found"
        lines = [head + f"; DAMAGED: {len(self.damaged)} problem(s) in {len(self.samples())} sample(s)"]
        for d in self.damaged[:20]:
            ids = self.ids
            who = f"sample {d.sample}" + (f" ({ids[d.sample]})" if ids and 0 <= d.sample < len(ids) else "")
            lines.append(f"  {d.array}: {who if d.sample >= 0 else 'array'}: {d.why}")
        if len(self.damaged) > 20:
            lines.append(f"  ... and {len(self.damaged) - 20} more")
        return "\n".join(lines)


def _check_metadata(store: CacheStore) -> list[Damage]:
    meta, found = store.meta, []
    expected = {**{name: ((meta.n, *shape), dtype) for name, (shape, dtype) in meta.sample_arrays().items()},
                S.LABELS: ((meta.n,), "int32"), S.SPLIT: ((meta.n,), "uint8"), S.STATUS: ((meta.n,), "uint8")}
    for name, (shape, dtype) in expected.items():
        try:
            got = store.array_info(name)
        except KeyError:
            found.append(Damage(name, -1, "missing"))
            continue
        if got != (shape, np.dtype(dtype)):
            found.append(Damage(name, -1, f"shape/dtype {got[0]} {got[1]}, expected {shape} {dtype}"))
    return found


def _read_small(store: CacheStore, found: list[Damage]) -> None:
    """Read ids, labels, split and status whole (their checksums are checked on the way)."""
    for name in (S.IDS, S.LABELS, S.SPLIT, S.STATUS):
        try:
            values = store.read_all(name)
        except (OSError, ValueError) as e:
            found.append(Damage(name, -1, f"cannot be read ({(str(e).strip().splitlines() or [''])[0]})"))
            continue
        if name == S.STATUS:
            bad = np.flatnonzero(~np.isin(values, (S.STATUS_PENDING, S.STATUS_DONE, S.STATUS_SKIPPED)))
            found += [Damage(name, int(i), f"status value {values[i]} is none of 0, 1, 2") for i in bad[:100]]


def verify(path: str | os.PathLike, threads: int | None = None, progress: bool = True,
           repair: bool = False) -> VerifyReport:
    """Check every chunk of the cache at `path`; with `repair`, mark damaged shards pending (holding
    the cache's writer lock: never while extract-features writes it)."""
    lock = WriterLock(path, what="written")
    if repair:
        lock.acquire()
    try:
        return _verify(path, threads, progress, repair)
    finally:
        lock.release()


def _verify(path, threads: int | None, progress: bool, repair: bool) -> VerifyReport:
    store = open_cache(path, "r+" if repair else "r")
    try:
        meta = store.meta
        report = VerifyReport(path if remote.is_url(path) else Path(path), meta.checksummed,
                              rebuild=rebuild_command(meta, path))
        report.damaged += _check_metadata(store)
        _read_small(store, report.damaged)
        layout = meta.sample_arrays()
        readers = {name: store.row_reader(name) for name in layout}  # each opened once, not once per shard
        overflow = store.attr(S.OVERFLOW_ATTR, {})
        lock = threading.Lock()

        def check(name: str, k: int) -> int:
            start, stop = meta.shard_bounds(k)
            shape, dtype = layout[name]
            out = np.empty((stop - start, *shape), dtype)
            errors: list[CorruptChunk] = []
            readers[name].read(k, range(stop - start), list(out), on_error=errors.append)
            found = [Damage(name, e.sample, e.why) for e in errors]
            if name != S.IMAGES and np.issubdtype(out.dtype, np.floating):
                found += _nonfinite(name, out, start, overflow.get(str(k), {}).get(name.split("/", 1)[1], 0))
            with lock:
                report.damaged.extend(found)
            return stop - start

        tasks = [(name, k) for name in layout for k in meta.shards()]
        with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool, \
                tqdm(total=len(tasks), unit="shard", desc=f"verify {remote.name(path)}", disable=not progress) as bar:
            for n in pool.map(lambda t: check(*t), tasks):
                report.chunks += n
                bar.update(1)
        report.damaged.sort(key=lambda d: (d.sample, d.array))
        if repair and report.samples():
            report.repaired_shards = sorted({s // meta.shard_size for s in report.samples()})
            for k in report.repaired_shards:
                lo, hi = meta.shard_bounds(k)
                store.mark_pending(lo, hi)
        if not any(d.array == S.IDS for d in report.damaged):
            report.ids = store.ids()
        return report
    finally:
        store.close()


def _nonfinite(name: str, values: np.ndarray, start: int, recorded_inf: int) -> list[Damage]:
    """NaNs anywhere, and infinities beyond the float16 overflows recorded for this shard."""
    finite = np.isfinite(values.reshape(len(values), -1))
    bad = np.flatnonzero(~finite.all(1))
    if len(bad) == 0:
        return []
    nan = np.isnan(values.reshape(len(values), -1)).any(1)
    infs = int(np.isinf(values).sum())
    found = [Damage(name, start + int(i), "holds NaN") for i in bad if nan[i]]
    if infs != recorded_inf:
        found += [Damage(name, start + int(i), f"holds infinities ({infs} in its shard, {recorded_inf} recorded "
                                               "as float16 overflow)") for i in bad if not nan[i]]
    return found
