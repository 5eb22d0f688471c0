"""The Zarr v3 backend of the feature cache: zarr-python for the layout and metadata, our
shard codec (`zarr_shards`) for whole-shard writes and parallel chunk reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import FeatreconError, remote
from . import schema as S
from .schema import CacheMeta, Codec
from .storage import CacheStore, SliceReader, _columns, _stacked
from .views import Views
from .zarr_shards import ShardDecoder, ShardEncoder


def _zarr_compressors(codec: Codec) -> tuple:
    """The bytes-to-bytes codecs of every per-sample chunk: the compressor, then a crc32c of
    what it wrote, so a damaged chunk is caught before it is decompressed."""
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    if codec.name == "none":
        return (Crc32cCodec(),)
    if codec.name == "zstd":
        return (ZstdCodec(level=codec.level), Crc32cCodec())
    cname = "lz4" if codec.name == "lz4" else "zstd"
    return (BloscCodec(cname=cname, clevel=codec.level, shuffle="bitshuffle"), Crc32cCodec())


@dataclass
class _Compressing:
    encoder: ShardEncoder
    parts: list


def _open_group(path, mode: str):
    """The Zarr group at a local path, or at a URL through zarr's FsspecStore."""
    import zarr

    if remote.is_url(path):
        return zarr.open_group(path, mode=mode, storage_options=remote.options())
    return zarr.open_group(str(path), mode=mode)


class ZarrCacheStore(CacheStore):
    parallel_shards = True  # every shard and its status chunk are files of their own

    def __init__(self, path: Path, mode: str):
        import zarr

        self.path = path
        try:
            self.group = _open_group(path, mode)
        except (FileNotFoundError, zarr.errors.BaseZarrError):
            raise FeatreconError(f"{path}: no Zarr cache here; run extract-features first") from None
        meta = self.group.attrs.get(S.META_ATTR)
        if meta is None:
            raise FeatreconError(f"{path}: not a featrecon cache (no '{S.META_ATTR}' attribute)")
        self.meta = CacheMeta.from_dict(meta)
        self._arrays = {}
        self._readable = {}
        self.fast_writes = True  # False: every write through zarr's own codec pipeline

    @classmethod
    def create(cls, path: Path, meta: CacheMeta, ids: list[str], labels: np.ndarray, split: np.ndarray,
               views: Views) -> "ZarrCacheStore":

        from zarr.codecs import Crc32cCodec, ZstdCodec

        g = _open_group(path, "w")
        comp = _zarr_compressors(Codec.parse(meta.codec))
        n, s = meta.n, meta.shard_size
        for name, (shape, dtype) in meta.sample_arrays().items():
            g.create_array(name, shape=(n, *shape), dtype=dtype, chunks=(1, *shape), shards=(s, *shape),
                           compressors=comp, fill_value=0, dimension_names=S.dimension_names(name))
        small = max(1, min(n, 1 << 16))
        checked = (ZstdCodec(level=3), Crc32cCodec())  # the small arrays: core types, compressed, checksummed
        id_bytes = S.encode_ids(ids)
        g.create_array(S.IDS, shape=id_bytes.shape, dtype="uint8", chunks=(small, id_bytes.shape[1]),
                       compressors=checked, fill_value=0, dimension_names=S.dimension_names(S.IDS))[:] = id_bytes
        for name, values in _columns(labels, split, views).items():
            g.create_array(name, shape=values.shape, dtype=values.dtype, chunks=(small, *values.shape[1:]),
                           compressors=checked, fill_value=0, dimension_names=S.dimension_names(name))[:] = values
        # One status chunk per shard, so marking a shard done rewrites one small object.
        g.create_array(S.STATUS, shape=(n,), dtype="uint8", chunks=(s,), fill_value=S.STATUS_PENDING,
                       compressors=checked, dimension_names=S.dimension_names(S.STATUS))
        # The metadata goes last: a cache without it is visibly unfinished and is recreated.
        g.attrs.update({S.SKIPPED_ATTR: {}, S.OVERFLOW_ATTR: {}, S.META_ATTR: meta.to_dict()})
        return cls(path, "r+")

    def _array(self, name):
        """The array `name`, opened once: opening reads and parses its zarr.json."""
        if name not in self._readable:
            self._readable[name] = self.group[name]
        return self._readable[name]

    def read(self, name, start, stop):
        return self._array(name)[start:stop]

    def read_all(self, name):
        return self._array(name)[:]

    def array_info(self, name):
        a = self._array(name)
        return tuple(a.shape), np.dtype(a.dtype)

    def row_reader(self, name):
        # Local shard files of featrecon's layout: decoded straight into the caller's buffers
        # (see zarr_shards: the codec's own speed); anything else through zarr-python.
        if remote.is_url(self.path):  # each shard fetched whole, as one object, through fsspec
            fs, root = remote.filesystem(self.path)

            def fetch(key: str):
                try:
                    return fs.cat_file(f"{root}/{name}/{key}")
                except FileNotFoundError:
                    return None

            return ShardDecoder.with_fetch(fetch, name) or SliceReader(self, name)
        return ShardDecoder.open(self.path / name, name) or SliceReader(self, name)

    def attr(self, key, default=None):
        return self.group.attrs.get(key, default)

    def _start_arrays(self, k, arrays):
        started = {}
        for name, value in arrays.items():
            encoder = self._writable(name)[1]
            started[name] = _Compressing(encoder, encoder.start(value, self.pool)) if encoder is not None else value
        return started

    def _write_arrays(self, start, stop, arrays):
        k = start // self.meta.shard_size
        for name, value in arrays.items():
            array, encoder = self._writable(name)
            if isinstance(value, _Compressing):
                value.encoder.put(k, value.encoder.assemble(value.parts))
            elif encoder is not None:
                encoder.write(k, value, self.pool)
            else:
                array[start:stop] = _stacked(value)

    def _writable(self, name):
        """The array opened for writing, and its whole-shard encoder (None: zarr writes it).

        `write_empty_chunks` skips zarr's per-chunk "is it all fill value?" comparison,
        which on float16 cost more CPU than the zstd compression itself; a skipped
        sample's zeros compress to a few bytes anyway."""
        if name not in self._arrays:
            array = self.group[name].with_config({"write_empty_chunks": True})
            self._arrays[name] = (array, ShardEncoder.for_array(array) if self.fast_writes else None)
        return self._arrays[name]

    def _set_attrs(self, updates):
        self.group.attrs.update(updates)

    def _write_status(self, start, stop, status):
        self._writable(S.STATUS)[0][start:stop] = status

    # Several processes may write one Zarr cache (torchrun): no object may be read, changed
    # and written back by two of them. So a shard's bookkeeping (skipped files, float16
    # overflow) goes into a record of its own, the group records/<k>, written before its
    # status; `merge_records`, run by one process at the end of every extraction, gathers
    # them into the root attributes. A run killed before its merge loses nothing: the next
    # run's merge reads every record.
    def finish_shard(self, shard, status, skipped, overflow):
        self._write_arrays(shard.start, shard.stop, shard.arrays)
        if skipped or overflow:
            attrs = {S.SKIPPED_ATTR: skipped, S.OVERFLOW_ATTR: overflow}
            self.group.create_group(f"{S.RECORDS}/{shard.k}", attributes=attrs, overwrite=True)
        self._write_status(shard.start, shard.stop, status)

    def merge_records(self) -> None:
        skipped, overflow = self._bookkeeping()
        self._set_attrs({S.SKIPPED_ATTR: skipped, S.OVERFLOW_ATTR: overflow})

    def _bookkeeping(self):
        """From the per-shard records, which are always current (the root attributes are their
        summary as of the last finished run); from the root attributes in a schema-2 cache."""
        if self.meta.schema_version < 3:
            return super()._bookkeeping()
        skipped, overflow = {}, {}
        if S.RECORDS in self.group:
            records = self.group[S.RECORDS]
            for name in sorted(records.group_keys(), key=int):
                attrs = records[name].attrs
                skipped.update(attrs.get(S.SKIPPED_ATTR, {}))
                if attrs.get(S.OVERFLOW_ATTR):
                    overflow[name] = attrs[S.OVERFLOW_ATTR]
        return skipped, overflow
