"""The HDF5 backend of the feature cache (h5py, hdf5plugin's compressors).

Two HDF5 behaviours shape it (tried on h5py 3.16 with HDF5 2.0):
- A file created with `libver="latest"` (superblock version 3) keeps a "file is open for
  writing" flag in its superblock while a writer has it open; a writer killed with
  SIGKILL leaves the flag set, and every later open, even read-only, fails until it is
  cleared (`h5clear -s`). Caches are therefore created with the 1.8 file format
  (superblock version 2, which has no such flag; dense attribute storage, so a long
  list of skipped files still fits). Caches written by earlier featrecon versions with
  the flag left set are cleared by `clear_open_flag` when no featrecon writer holds them.
- A write that fails for lack of space (ENOSPC, or EFBIG under a file-size limit) can
  leave the file's superblock claiming more bytes than the disk holds ("truncated file":
  it never opens again), and h5py can then crash the process at exit. So before every
  shard the space it can need is reserved (`posix_fallocate`, which fails cleanly when the
  disk is full): HDF5 then writes into reserved blocks, and a full disk stops the run
  between shards with a file that resumes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from pathlib import Path

import numpy as np

from ..errors import FeatreconError
from . import schema as S
from .base import CACHE, DAMAGED, FOREIGN, CacheStore, small_columns, stacked
from .lock import WriterLock, held_here
from .schema import CacheMeta, Codec, Views

log = logging.getLogger(__name__)
LIBVER = ("v108", "v108")  # superblock version 2: no "open for writing" flag to outlive a killed writer
RESERVE_MARGIN = 256 << 10  # bytes reserved beyond a shard's uncompressed size, for HDF5's own metadata
_OPEN_FLAG_ERROR = "already open for write"


def _h5_filter(codec: Codec) -> dict:
    import hdf5plugin

    if codec.name == "none":
        return {}
    if codec.name == "zstd":
        return dict(hdf5plugin.Zstd(clevel=codec.level))
    cname = "lz4" if codec.name == "lz4" else "zstd"
    return dict(hdf5plugin.Blosc(cname=cname, clevel=codec.level, shuffle=hdf5plugin.Blosc.BITSHUFFLE))


_MASK = 0xFFFFFFFF
# lookup3's mix and final as (x, y, z, r) steps over the state [a, b, c]:
# mix: x -= y; x ^= rot(y, r); y += z.  final: x ^= y; x -= rot(y, r).
_MIX = ((0, 2, 1, 4), (1, 0, 2, 6), (2, 1, 0, 8), (0, 2, 1, 16), (1, 0, 2, 19), (2, 1, 0, 4))
_FINAL = ((2, 1, 14), (0, 2, 11), (1, 0, 25), (2, 1, 16), (0, 2, 4), (1, 0, 14), (2, 1, 24))


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK


def lookup3(data: bytes) -> int:
    """Bob Jenkins' lookup3 `hashlittle` with initial value 0: the checksum HDF5 puts on its
    version 2 and 3 superblocks (H5_checksumlookup3). h5py offers neither this nor a way to
    clear the superblock's flags (HDF5 keeps that to its h5clear tool), hence our own."""
    n = len(data)
    v = [(0xDEADBEEF + n) & _MASK] * 3

    def add(block: bytes) -> None:
        for j in range(3):
            v[j] = (v[j] + int.from_bytes(block[4 * j: 4 * j + 4], "little")) & _MASK

    i = 0
    while n - i > 12:
        add(data[i:i + 12])
        for x, y, z, r in _MIX:
            v[x] = ((v[x] - v[y]) & _MASK) ^ _rot(v[y], r)
            v[y] = (v[y] + v[z]) & _MASK
        i += 12
    if n == i:
        return v[2]
    add(data[i:] + bytes(12 - (n - i)))  # the last 1-12 bytes, zero-padded (zeros add nothing)
    for x, y, r in _FINAL:
        v[x] = ((v[x] ^ v[y]) - _rot(v[y], r)) & _MASK
    return v[2]


def clear_open_flag(path: Path) -> bool:
    """Clear the "open for writing" flags of a version-3 superblock at the start of the file (what
    `h5clear -s` does), keeping its checksum valid. Only for a file no process writes. Returns
    whether there was a flag to clear."""
    with open(path, "r+b") as f:
        head = bytearray(f.read(12))
        if len(head) < 12 or head[:8] != b"\x89HDF\r\n\x1a\n" or head[8] != 3 or head[11] == 0:
            return False
        size = 12 + 4 * head[9] + 4  # signature to flags, four addresses, the checksum
        f.seek(0)
        block = bytearray(f.read(size))
        if lookup3(bytes(block[:-4])) != int.from_bytes(block[-4:], "little"):
            return False  # not a superblock we understand: leave it alone
        block[11] = 0
        block[-4:] = lookup3(bytes(block[:-4])).to_bytes(4, "little")
        f.seek(0)
        f.write(block)
    return True


def _open(path: Path, mode: str):
    """h5py.File, clearing a flag that a killed writer of an earlier version left (when no
    featrecon writer holds the file)."""
    import h5py

    try:
        return h5py.File(path, mode, locking=False)
    except OSError as e:
        if _OPEN_FLAG_ERROR not in str(e):
            raise
    if held_here(path):
        cleared = clear_open_flag(path)
    else:
        with WriterLock(path):  # refused, naming the holder, if a run is writing it now
            cleared = clear_open_flag(path)
    if cleared:
        log.warning("%s: cleared the 'open for writing' mark that a killed run left in its superblock", path)
    return h5py.File(path, mode, locking=False)


def h5_state(path: Path) -> tuple[str, str]:
    """`factory.inspect_target` for an HDF5 file."""
    try:
        f = _open(path, "r")
    except FeatreconError:
        raise
    except OSError as e:
        return DAMAGED, f"{path} cannot be opened as HDF5 ({str(e).splitlines()[0]})"
    with f:
        raw = f.attrs.get(S.META_ATTR)
    try:
        meta = json.loads(raw) if raw is not None else None
    except (TypeError, ValueError) as e:
        return DAMAGED, f"{path}: its '{S.META_ATTR}' attribute is not valid JSON ({e})"
    if isinstance(meta, dict) and meta.get("format") == S.FORMAT_NAME:
        return CACHE, ""
    return FOREIGN, "an HDF5 file that featrecon did not write"


def _reserve(path: Path, file, nbytes: int) -> None:
    """Make sure the disk holds `nbytes` past HDF5's end of allocation (`get_filesize`) before they
    are written, or raise the OSError of a full disk while the file is still whole (see the
    module's note). HDF5 then writes into blocks already allocated."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, file.id.get_filesize() + nbytes)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return  # a filesystem without preallocation: nothing reserved, HDF5 writes as usual
        raise OSError(errno.ENOSPC if e.errno == errno.EFBIG else e.errno, os.strerror(e.errno), str(path)) from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def _as_os_error(path: Path):
    """h5py reports a failed write (a full disk among them) as RuntimeError: an OSError here, which
    the stages turn into their one-line message."""
    try:
        yield
    except RuntimeError as e:
        raise OSError(errno.EIO, f"HDF5 write failed ({str(e).splitlines()[0]})", str(path)) from None


class H5CacheStore(CacheStore):
    """HDF5 backend: one file, written shard by shard and flushed after each, so a kill between
    shards leaves a good file and a rerun resumes it."""

    def __init__(self, path: Path, mode: str):
        import hdf5plugin  # noqa: F401  (registers the zstd/blosc filters)

        self.path = path
        if not path.exists():
            raise FeatreconError(f"{path}: no HDF5 cache here; run extract-features first")
        try:
            self.file = _open(path, mode)
        except OSError as e:
            raise FeatreconError(
                f"{path}: HDF5 file cannot be opened ({str(e).splitlines()[0]}); it is damaged: delete it and "
                "rerun the extract-features command that made it") from None
        raw = self.file.attrs.get(S.META_ATTR)
        if raw is None:
            self.file.close()
            raise FeatreconError(f"{path}: not a featrecon cache (no '{S.META_ATTR}' attribute)")
        try:
            self.meta = CacheMeta.from_dict(json.loads(raw))
        except (TypeError, ValueError) as e:
            self.file.close()
            why = str(e) if isinstance(e, FeatreconError) else f"not valid JSON: {e}"
            raise FeatreconError(f"{path}: its '{S.META_ATTR}' attribute: {why}") from None

    @classmethod
    def create(cls, path: Path, meta: CacheMeta, ids: list[str], labels: np.ndarray, split: np.ndarray,
               views: Views) -> H5CacheStore:
        import h5py

        # Fletcher-32 after the compressor: HDF5 checks it on every chunk it reads.
        filt = {**_h5_filter(Codec.parse(meta.codec)), "fletcher32": True}
        id_bytes = S.encode_ids(ids)
        with h5py.File(path, "w", libver=LIBVER) as f:
            # Room for everything written here (uncompressed, plus HDF5's own metadata) first: a full
            # disk then stops the creation before HDF5 has anything it could fail to write.
            _reserve(path, f, id_bytes.nbytes + meta.n * 25 + RESERVE_MARGIN)
            for name, (shape, dtype) in meta.sample_arrays().items():
                f.create_dataset(name, shape=(meta.n, *shape), dtype=dtype, chunks=(1, *shape), fillvalue=0, **filt)
            f.create_dataset(S.IDS, data=id_bytes, fletcher32=True)
            for name, values in small_columns(labels, split, views).items():
                f.create_dataset(name, data=values, fletcher32=True)
            f.create_dataset(S.STATUS, shape=(meta.n,), dtype="uint8", fillvalue=S.STATUS_PENDING, fletcher32=True,
                             chunks=(max(1, min(meta.n, meta.shard_size)),))
            f.attrs[S.SKIPPED_ATTR] = "{}"
            f.attrs[S.OVERFLOW_ATTR] = "{}"
            f.attrs[S.META_ATTR] = json.dumps(meta.to_dict())
        return cls(path, "r+")

    def read_with_library(self, name, start, stop):
        return self.file[name][start:stop]

    def _read_small(self, name):
        ds = self.file[name]
        return ds.asstr()[:] if ds.dtype.kind == "O" else ds[:]  # schema 1 stored ids as strings

    def missing_rows(self, name, k, rows):
        """Rows of done samples whose chunk HDF5 never allocated (it would read them as zeros)."""
        start = self.meta.shard_bounds(k)[0]
        done, ds = self.done(), self.file[name]
        zeros = (0,) * (ds.ndim - 1)
        return [r for r in rows
                if done[start + r] and ds.id.get_chunk_info_by_coord((start + r, *zeros)).byte_offset is None]

    def array_info(self, name):
        ds = self.file[name]
        return tuple(ds.shape), ds.dtype

    def attr(self, key, default=None):
        raw = self.file.attrs.get(key)
        return default if raw is None else json.loads(raw)

    def _write_arrays(self, start, stop, arrays):
        arrays = {name: stacked(value) for name, value in arrays.items()}
        _reserve(self.path, self.file, sum(a.nbytes for a in arrays.values()) + RESERVE_MARGIN)
        with _as_os_error(self.path):
            for name, value in arrays.items():
                self.file[name][start:stop] = value

    def _set_attrs(self, updates):
        for key, value in updates.items():
            self.file.attrs[key] = json.dumps(value)

    def _write_status(self, start, stop, status):
        with _as_os_error(self.path):
            self.file[S.STATUS][start:stop] = status
            self.file.flush()

    def close(self):
        if self.file.id.valid:
            self.file.close()
