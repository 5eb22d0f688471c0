"""The HDF5 backend of the feature cache (h5py, hdf5plugin's compressors)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import FeatreconError
from . import schema as S
from .schema import CacheMeta, Codec
from .storage import CacheStore, _columns, _stacked
from .views import Views


def _h5_filter(codec: Codec) -> dict:
    import hdf5plugin

    if codec.name == "none":
        return {}
    if codec.name == "zstd":
        return dict(hdf5plugin.Zstd(clevel=codec.level))
    cname = "lz4" if codec.name == "lz4" else "zstd"
    return dict(hdf5plugin.Blosc(cname=cname, clevel=codec.level, shuffle=hdf5plugin.Blosc.BITSHUFFLE))


class H5CacheStore(CacheStore):
    """HDF5 backend. HDF5 is not crash-safe the way per-chunk files are: we flush
    after every shard, so a kill between shards leaves a good file, but a kill
    inside a write can damage it; `open_cache` then says so plainly."""

    def __init__(self, path: Path, mode: str):
        import h5py
        import hdf5plugin  # noqa: F401  (registers the zstd/blosc filters)

        self.path = path
        if not path.exists():
            raise FeatreconError(f"{path}: no HDF5 cache here; run extract-features first")
        try:
            self.file = h5py.File(path, mode, locking=False)
        except OSError as e:
            raise FeatreconError(
                f"{path}: HDF5 file cannot be opened ({str(e).splitlines()[0]}); if a run was killed while "
                "writing it, rerun with --overwrite (Zarr caches survive kills)") from None
        raw = self.file.attrs.get(S.META_ATTR)
        if raw is None:
            self.file.close()
            raise FeatreconError(f"{path}: not a featrecon cache (no '{S.META_ATTR}' attribute)")
        self.meta = CacheMeta.from_dict(json.loads(raw))

    @classmethod
    def create(cls, path: Path, meta: CacheMeta, ids: list[str], labels: np.ndarray, split: np.ndarray,
               views: Views) -> "H5CacheStore":
        import h5py

        # Fletcher-32 after the compressor: HDF5 checks it on every chunk it reads.
        filt = {**_h5_filter(Codec.parse(meta.codec)), "fletcher32": True}
        with h5py.File(path, "w", libver="latest") as f:
            for name, (shape, dtype) in meta.sample_arrays().items():
                f.create_dataset(name, shape=(meta.n, *shape), dtype=dtype, chunks=(1, *shape), fillvalue=0, **filt)
            f.create_dataset(S.IDS, data=S.encode_ids(ids), fletcher32=True)
            for name, values in _columns(labels, split, views).items():
                f.create_dataset(name, data=values, fletcher32=True)
            f.create_dataset(S.STATUS, shape=(meta.n,), dtype="uint8", fillvalue=S.STATUS_PENDING, fletcher32=True,
                             chunks=(max(1, min(meta.n, meta.shard_size)),))
            f.attrs[S.SKIPPED_ATTR] = "{}"
            f.attrs[S.OVERFLOW_ATTR] = "{}"
            f.attrs[S.META_ATTR] = json.dumps(meta.to_dict())
        return cls(path, "r+")

    def read(self, name, start, stop):
        return self.file[name][start:stop]

    def read_all(self, name):
        ds = self.file[name]
        return ds.asstr()[:] if ds.dtype.kind == "O" else ds[:]  # schema 1 stored ids as strings

    def array_info(self, name):
        ds = self.file[name]
        return tuple(ds.shape), ds.dtype

    def attr(self, key, default=None):
        raw = self.file.attrs.get(key)
        return default if raw is None else json.loads(raw)

    def _write_arrays(self, start, stop, arrays):
        for name, value in arrays.items():
            self.file[name][start:stop] = _stacked(value)

    def _set_attrs(self, updates):
        for key, value in updates.items():
            self.file.attrs[key] = json.dumps(value)

    def _write_status(self, start, stop, status):
        self.file[S.STATUS][start:stop] = status
        self.file.flush()

    def close(self):
        if self.file.id.valid:
            self.file.close()
