"""Reading featrecon's shards (`shards.ShardLayout`) straight into the caller's buffers.

Why our own code for a format that libraries read (the measurements: benchmarks/DESIGN.md):
tensorstore and zarr-python (with the zarrs pipeline) both landed near 0.7 of the codec
alone, because each decodes into a buffer of its own and copies again. `ShardDecoder`
decompresses every chunk directly into the caller's batch slot on a thread pool (the codecs
release the GIL), single chunks in place from the mapped shard file, so the loader runs at
the codec's own speed. Anything outside this one layout goes through zarr-python.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CorruptChunk
from .shards import MAX_U64, ShardLayout, chunk_crc32c, shard_key

# The crc32c of any bytes followed by their own crc32c (little-endian): a chunk is checked with one
# call over all its stored bytes, no slicing off of the stored value.
CRC32C_RESIDUE = 0x48674BC7


def _decompressor(compressor) -> Callable | None:
    """`decompress(chunk, out)` for a layout's compressor (None: chunks stored raw)."""
    import numcodecs

    if compressor is None:
        return None
    if isinstance(compressor, numcodecs.Zstd):
        return _ZstdInto().decompress
    return lambda chunk, out: compressor.decode(chunk, out=out)


class _ZstdInto:
    """zstd frames decompressed straight into the caller's buffer by python-zstandard, one decompressor
    per thread. numcodecs' Zstd.decode does the same work but first runs Python-level buffer checks
    with the GIL held, ten times the stream reader's overhead per chunk: on 2 cores that capped the
    loader's threads (benchmarks/DESIGN.md has the measurement). Frames written by numcodecs (and
    zarr-python) decode the same; the writer keeps numcodecs, so the bytes stay zarr-python's."""

    def __init__(self):
        import zstandard

        self._new, self._local = zstandard.ZstdDecompressor, threading.local()

    def decompress(self, chunk: np.ndarray, out: np.ndarray) -> None:
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = self._new()
        target = memoryview(out).cast("B")
        # No `with`: a reader over a buffer holds nothing to release, and the context manager cost
        # a fifth of this call's Python (benchmarks/DESIGN.md).
        reader = d.stream_reader(chunk)
        got = reader.readinto(target)
        while 0 < got < len(target):  # a reader may hand back a frame in parts
            more = reader.readinto(target[got:])
            if not more:
                break
            got += more
        extra = reader.read(1)
        if got != len(target) or extra:
            raise ValueError(f"the frame holds {'more' if extra else got} bytes, the sample {len(target)}")


def _keep_open() -> int:
    """How many shard files one decoder keeps open: a sixteenth of the process's file limit, so the
    arrays of a loader (and anything else) stay well inside it."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 64
    return 4096 if soft == resource.RLIM_INFINITY else max(16, min(4096, soft // 16))


class _MapBudget:
    """How many shard files this process keeps mapped, all decoders together: a quarter of the kernel's
    per-process limit on mappings (vm.max_map_count), so the loader's maps leave room for everything else."""

    def __init__(self):
        try:
            with open("/proc/sys/vm/max_map_count") as f:
                self.left = int(f.read()) // 4
        except (OSError, ValueError):
            self.left = 4096
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.left <= 0:
                return False
            self.left -= 1
            return True

    def give_back(self, n: int) -> None:
        with self._lock:
            self.left += n


_MAPS = _MapBudget()


@dataclass(frozen=True)
class _Mapped:
    """A shard file mapped read-only, and what its file was when mapped (device, inode, size)."""

    data: np.ndarray  # uint8 view of the whole file
    stamp: tuple[int, int, int]


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_dev, st.st_ino, st.st_size


class ShardDecoder:
    """Reads whole shards of one array (a file, or one object of an object store) and decodes
    the samples asked for straight into the caller's buffers (one decompression, no other
    copy). `fetch(key)` gives the bytes of the object `key` under the array (None: absent).

    Absence is damage: zarr (and tensorstore) read a missing object as the fill value, but a
    sample that `done` marks written must have its shard object, and, where `every_chunk`
    (shards written whole by featrecon, schema 2 on), its chunk inside it. Samples not done
    read as zeros."""

    def __init__(self, fetch: Callable[[str], np.ndarray | bytes | None], name: str, layout: ShardLayout,
                 done: np.ndarray | None = None, every_chunk: bool = False, folder: Path | None = None):
        self.fetch, self.name, self.layout = fetch, name, layout
        self.done, self.every_chunk = done, every_chunk
        self.folder = folder  # a local array's folder: single chunks can be read through each shard's index
        self._indices: dict[int, list | None] = {}  # shard -> its index, read once (None: no shard object)
        self._paths: dict[int, str] = {}  # shard -> its file (a local array)
        self._local = threading.local()  # each reading thread's chunk buffer
        self._fds: dict[int, int] = {}  # shard -> its file, kept open for single-chunk reads
        self.keep_open = _keep_open()
        self._maps: dict[int, _Mapped | None] = {}  # shard -> its file mapped for single-chunk reads (None: not mappable)
        self.map_files = True  # False: single chunks are read with pread only
        self._decompress: Callable | None = _decompressor(layout.compressor)

    def _expected(self, sample: int) -> bool:
        return self.done is not None and sample < len(self.done) and bool(self.done[sample])

    @classmethod
    def open(cls, folder: Path, name: str, done: np.ndarray | None = None,
             every_chunk: bool = False) -> ShardDecoder | None:
        """The decoder of the local array at folder/zarr.json, or None if its layout is not featrecon's."""
        folder = Path(folder)

        def fetch(key: str):
            try:
                return np.fromfile(folder / key, dtype=np.uint8)
            except FileNotFoundError:
                return None

        decoder = cls.with_fetch(fetch, name, done, every_chunk)
        if decoder is not None:
            decoder.folder = folder
        return decoder

    @classmethod
    def with_fetch(cls, fetch: Callable[[str], np.ndarray | bytes | None], name: str,
                   done: np.ndarray | None = None, every_chunk: bool = False) -> ShardDecoder | None:
        """The decoder of the array whose objects `fetch` reads (zarr.json included), or None."""
        try:
            raw = fetch("zarr.json")
            meta = json.loads(bytes(raw)) if raw is not None else None
        except (OSError, ValueError):
            return None
        layout = ShardLayout.of(meta) if meta is not None else None
        return cls(fetch, name, layout, done, every_chunk) if layout is not None else None

    def shard_index(self, data: np.ndarray, k: int) -> np.ndarray:
        """(per_shard, 2) offsets and sizes from a shard's bytes, its crc32c checked."""
        n_index = 16 * self.layout.per_shard
        tail = data[-(n_index + 4):]
        if len(data) < n_index + 4 or chunk_crc32c(tail[:n_index]) != int.from_bytes(tail[n_index:].tobytes(), "little"):
            first = k * self.layout.per_shard
            raise CorruptChunk(self.name, first, f"the index of shard {k} is damaged")
        return tail[:n_index].view("<u8").reshape(-1, 2)

    def read(self, k: int, rows: Sequence[int], outs: Sequence[np.ndarray],
             on_error: Callable[[CorruptChunk], None] | None = None) -> None:
        """Decode rows `rows` of shard k into `outs` (C-contiguous, one sample each). A damaged
        sample raises CorruptChunk (its global index), or with `on_error` is handed to it,
        zero-filled, and the rest are read."""
        key = shard_key(k, len(self.layout.shape))
        data = self.fetch(key)
        base = k * self.layout.per_shard
        if data is None:  # never written (pending samples read as the fill value), or deleted
            for r, out in zip(rows, outs):
                out[...] = 0
                if self._expected(base + r):
                    CorruptChunk(self.name, base + r, f"missing: its shard object {self.name}/{key} is gone "
                                 "though the sample is marked done").handle(on_error)
            return
        if not isinstance(data, np.ndarray):
            data = np.frombuffer(data, dtype=np.uint8)
        try:
            index = self.shard_index(data, k)
        except CorruptChunk as e:
            return self._all_damaged(base, rows, outs, e.why, on_error)
        self._decode_rows(data, index.tolist(), base, rows, outs, on_error)

    def _decode_rows(self, data: np.ndarray, index: list[list[int]], base: int, rows: Sequence[int],
                     outs: Sequence[np.ndarray], on_error: Callable[[CorruptChunk], None] | None) -> None:
        """Rows `rows` of a shard's bytes `data` (read whole, or mapped), through its index (a list of
        [offset, nbytes] pairs), into `outs`; a damaged row zero-filled and raised or handed to
        `on_error`. The loop is the loader's per-chunk Python, run with the GIL held while the other
        threads wait for it: kept to one call per chunk (benchmarks/DESIGN.md)."""
        end = len(data)
        for r, out in zip(rows, outs):
            offset, nbytes = index[r]
            try:
                if offset == MAX_U64:
                    chunk = None
                elif offset + nbytes > end:
                    raise CorruptChunk(self.name, base + r, "its chunk lies past the end of the shard file")
                else:
                    chunk = data[offset: offset + nbytes]
                self._decode_bytes(chunk, out, base + r)
            except CorruptChunk as e:
                out[...] = 0
                e.handle(on_error)

    def _all_damaged(self, base: int, rows: Sequence[int], outs: Sequence[np.ndarray], why: str,
                     on_error: Callable[[CorruptChunk], None] | None) -> None:
        """Every row of a shard whose index is damaged: zero-filled, each reported (or raised)."""
        for r, out in zip(rows, outs):
            out[...] = 0
            CorruptChunk(self.name, base + r, why).handle(on_error)

    def read_chunks(self, k: int, rows: Sequence[int], outs: Sequence[np.ndarray],
                    on_error: Callable[[CorruptChunk], None] | None = None) -> None:
        """As `read`, but reading only the chunks of `rows` from a local shard file, through the shard's
        index (read once per shard): for batches that take a few samples from each of many shards. Falls
        back to `read` where the array is not a local folder.

        Each shard file is mapped into memory once (`_mapped`) and the codec reads its chunks in place:
        a `pread` per chunk copied every chunk out of the page cache first, and that copy cost the
        global shuffle a sixth of its rate on layer3 (benchmarks/DESIGN.md). Where a file cannot be
        mapped, or has changed since it was mapped, each chunk is read with one `pread`."""
        if self.folder is None:
            return self.read(k, rows, outs, on_error)
        base = k * self.layout.per_shard
        path = self._paths.get(k)
        if path is None:  # a str, built once: pathlib's joins cost the loader's threads the GIL per read
            path = self._paths[k] = os.path.join(self.folder, shard_key(k, len(self.layout.shape)))
        try:
            index = self._index(k, path)
        except CorruptChunk as e:
            return self._all_damaged(base, rows, outs, e.why, on_error)
        if index is None:
            return self.read(k, rows, outs, on_error)  # no shard object: zeros, or damage where samples are done
        data = self._mapped(k, path)
        if data is not None:
            return self._decode_rows(data, index, base, rows, outs, on_error)
        fd, kept = self._open(k, path)
        try:
            for r, out in zip(rows, outs):
                offset, nbytes = index[r]
                try:
                    chunk = self._pread(fd, nbytes, offset) if offset != MAX_U64 else None
                    if chunk is not None and len(chunk) < nbytes:
                        raise CorruptChunk(self.name, base + r, "its chunk lies past the end of the shard file")
                    self._decode_bytes(chunk, out, base + r)
                except CorruptChunk as e:
                    out[...] = 0
                    e.handle(on_error)
        finally:
            if not kept:
                os.close(fd)

    def read_samples(self, shards: Sequence[int], rows: Sequence[int], outs: Sequence[np.ndarray],
                     on_error: Callable[[CorruptChunk], None] | None = None) -> None:
        """Sample i's row `rows[i]` of shard `shards[i]` into `outs[i]`: a batch of the global shuffle,
        whose samples nearly all come from different shards. A sample of a shard already mapped and
        indexed costs two dict lookups and its decode; any other goes through `read_chunks`. This loop
        is Python the reading threads run with the GIL held, per sample: grouping the batch by shard
        first cost more than it saved (benchmarks/DESIGN.md)."""
        maps, indices, per_shard = self._maps, self._indices, self.layout.per_shard
        for k, r, out in zip(shards, rows, outs):
            mapped, index = maps.get(k), indices.get(k)
            if mapped is None or index is None:
                self.read_chunks(k, (r,), (out,), on_error)
            else:
                self._decode_rows(mapped.data, index, k * per_shard, (r,), (out,), on_error)

    def _mapped(self, k: int, path: str) -> np.ndarray | None:
        """Shard k's file mapped into memory (a uint8 array), or None: mapping is off, the process's
        mapping budget is spent, the file cannot be mapped, or `check_mapped` found it changed.

        A mapped file cut short in place kills the reader (SIGBUS) when it touches a page past the new
        end, where `pread` returns fewer bytes. featrecon never does that: its writers replace a shard
        file whole, which leaves a mapping of the old file intact and consistent with the index read
        from it, as an open descriptor would. Against anything else that does, `check_mapped` looks at
        every mapped file between epochs; a `stat` before every read would catch a cut within an epoch
        too, but cost the global shuffle about a tenth of its rate (benchmarks/DESIGN.md)."""
        if not self.map_files:
            return None
        mapped = self._maps.get(k, False)
        if mapped is not False:
            return mapped.data if mapped is not None else None
        try:
            st = os.stat(path)
        except OSError:
            return None
        if st.st_size == 0 or not _MAPS.take():
            return None
        try:
            # torch maps the file private (nothing here writes to it) and keeps no file descriptor;
            # Python's mmap keeps one per map before 3.13, which a 1,024-file limit would cap
            view = torch.from_file(path, shared=False, size=st.st_size, dtype=torch.uint8).numpy()
            if _stamp(os.stat(path)) != _stamp(st):
                raise OSError("replaced while being mapped")
        except (OSError, RuntimeError, ValueError):
            _MAPS.give_back(1)
            self._maps[k] = None
            return None
        kept = self._maps.setdefault(k, _Mapped(view, _stamp(st)))  # of two threads mapping one shard, one map stays
        if kept is None or kept.data is not view:
            _MAPS.give_back(1)
        return kept.data if kept is not None else None

    def check_mapped(self) -> None:
        """Stop reading through the mapping of any shard file whose size changed in place since it was
        mapped (read with `pread` from then on, against the index first read, which names any chunk past
        the new end). The loader calls this before each epoch; a read still running keeps its own
        reference to the mapping it reads."""
        for k, mapped in list(self._maps.items()):
            if mapped is None:
                continue
            try:
                st = os.stat(self._paths[k])
            except OSError:
                continue  # gone: the mapping still holds the file that was there
            if _stamp(st)[:2] == mapped.stamp[:2] and st.st_size != mapped.stamp[2]:
                self._unmap(k)
                self._maps[k] = None

    def _unmap(self, k: int) -> None:
        """Forget shard k's mapping (unmapped once no thread still reads from it) and return its budget."""
        if self._maps.pop(k, None) is not None:
            _MAPS.give_back(1)

    def _open(self, k: int, path: str) -> tuple[int, bool]:
        """A file descriptor of shard k's file, and whether it stays open: the first `keep_open` shards
        read keep theirs until `close` (an open and a close per chunk cost the reading threads two more
        waits for the GIL; benchmarks/DESIGN.md); never one closed while another thread reads it."""
        fd = self._fds.get(k)
        if fd is not None:
            return fd, True
        fd = os.open(path, os.O_RDONLY)
        if len(self._fds) >= self.keep_open:
            return fd, False
        kept = self._fds.setdefault(k, fd)  # atomic: of two threads opening the same shard, one fd is kept
        if kept != fd:
            os.close(fd)
        return kept, True

    def close(self) -> None:
        """Close the shard files kept open and drop the mappings (the decoder still reads after this, opening
        and mapping them again)."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
        maps, self._maps = self._maps, {}
        _MAPS.give_back(sum(m is not None for m in maps.values()))

    def __del__(self):
        if getattr(self, "_fds", None) or getattr(self, "_maps", None):
            self.close()

    def _pread(self, fd: int, nbytes: int, offset: int) -> np.ndarray:
        """nbytes at offset (fewer at the file's end), read into this thread's own buffer, reused from
        chunk to chunk: a fresh buffer of hundreds of KB per chunk cost the loader allocations and
        page faults."""
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < nbytes:
            buf = self._local.buf = np.empty(max(nbytes, 1 << 20), np.uint8)
        return buf[: os.preadv(fd, [buf[:nbytes]], offset)]

    def _index(self, k: int, path: str) -> list[list[int]] | None:
        """Shard k's index as [offset, nbytes] pairs (its crc32c checked), read once from the end of
        its file; None if no file."""
        if k not in self._indices:
            n_index = 16 * self.layout.per_shard + 4
            try:
                with open(path, "rb") as f:
                    size = f.seek(0, os.SEEK_END)
                    f.seek(max(0, size - n_index))
                    tail = np.frombuffer(f.read(), np.uint8)
            except FileNotFoundError:
                self._indices[k] = None
                return None
            self._indices[k] = self.shard_index(tail, k).tolist()
        return self._indices[k]

    def _decode_bytes(self, chunk: np.ndarray | None, out: np.ndarray, sample: int) -> None:
        """Decompress one stored chunk into `out` and check it; None: the shard holds no chunk for it.
        The checksum is checked after the decompression, on bytes the codec has just brought into the
        CPU's cache: checked first, on a chunk read in place from a mapped file, it paid for fetching
        them from memory (benchmarks/DESIGN.md). A chunk that fails either way leaves `out` to the
        caller, who zero-fills it; a frame the codec rejects is reported as a checksum mismatch where
        its checksum fails too (damage, not a codec fault)."""
        if chunk is None:
            out[...] = 0
            if self.every_chunk and self._expected(sample):
                raise CorruptChunk(self.name, sample, "missing: its chunk is absent from its shard object though "
                                   "the sample is marked done")
            return
        body = chunk[:-4] if self.layout.checksum else chunk
        try:
            if self._decompress is None:
                out.reshape(-1).view(np.uint8)[...] = body
            else:
                self._decompress(body, out)
        except Exception as e:  # a damaged frame the codec itself rejects
            if self.layout.checksum and not self._sound(chunk):
                raise CorruptChunk(self.name, sample, "checksum mismatch (crc32c)") from None
            raise CorruptChunk(self.name, sample, f"cannot be decoded ({type(e).__name__}: {e})") from None
        if self.layout.checksum and not self._sound(chunk):
            raise CorruptChunk(self.name, sample, "checksum mismatch (crc32c)")

    @staticmethod
    def _sound(chunk: np.ndarray) -> bool:
        """Whether a stored chunk (its bytes, then their crc32c) passes its checksum."""
        return len(chunk) >= 4 and chunk_crc32c(chunk) == CRC32C_RESIDUE
