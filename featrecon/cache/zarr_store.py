"""The Zarr v3 backend of the feature cache: zarr-python for the layout and metadata, our
shard codec (`shards`, `shard_reader`) for whole-shard writes and parallel chunk reads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FeatreconError
from . import remote
from . import schema as S
from .base import CacheStore, SliceReader, rebuild_command, small_columns, stacked
from .schema import CacheMeta, Codec, Views
from .shard_reader import ShardDecoder
from .shards import ShardEncoder, shard_key


def creating_root() -> bytes:
    """The root zarr.json of a cache whose creation is under way: a group marked with
    CREATING_ATTR, which `storage.inspect_target` recognises as featrecon's own."""
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {S.CREATING_ATTR: True}}).encode()


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
        root = remote.join(path, "zarr.json") if remote.is_url(path) else path / "zarr.json"
        try:
            self.group = _open_group(path, mode)
            meta = self.group.attrs.get(S.META_ATTR)
        except (FileNotFoundError, zarr.errors.BaseZarrError):
            raise FeatreconError(f"{path}: no Zarr cache here; run extract-features first") from None
        except (ValueError, TypeError, KeyError) as e:  # zarr.json that is not JSON, or not Zarr metadata
            raise FeatreconError(f"{root}: the cache's root metadata is damaged ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}); it cannot be repaired: delete "
                                 f"{path} and rerun the extract-features command that made it") from None
        if meta is None:
            if S.CREATING_ATTR in self.group.attrs:
                raise FeatreconError(f"{path}: its creation never finished; rerun the extract-features command "
                                     "that was creating it")
            raise FeatreconError(f"{path}: not a featrecon cache (no '{S.META_ATTR}' attribute in {root})")
        try:
            self.meta = CacheMeta.from_dict(meta)
        except FeatreconError as e:
            raise FeatreconError(f"{root}: {e}") from None
        self._arrays = {}
        self._readable = {}
        self.fast_writes = True  # False: every write through zarr's own codec pipeline

    @classmethod
    def create(cls, path: Path, meta: CacheMeta, ids: list[str], labels: np.ndarray, split: np.ndarray,
               views: Views) -> ZarrCacheStore:

        from zarr.codecs import Crc32cCodec, ZstdCodec

        # The root is marked as a creation under way before anything else, and gets the metadata
        # last: a cache without it is visibly unfinished, and the next run recreates it.
        g = _open_group(path, "w")
        g.attrs.put({S.CREATING_ATTR: True})
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
        for name, values in small_columns(labels, split, views).items():  # every chunk stored, zeros too (see _read_small)
            g.create_array(name, shape=values.shape, dtype=values.dtype, chunks=(small, *values.shape[1:]),
                           compressors=checked, fill_value=0, dimension_names=S.dimension_names(name),
                           config={"write_empty_chunks": True})[:] = values
        # One status chunk per shard, so marking a shard done rewrites one small object.
        g.create_array(S.STATUS, shape=(n,), dtype="uint8", chunks=(s,), fill_value=S.STATUS_PENDING,
                       compressors=checked, dimension_names=S.dimension_names(S.STATUS))
        g.attrs.put({S.SKIPPED_ATTR: {}, S.OVERFLOW_ATTR: {}, S.META_ATTR: meta.to_dict()})
        return cls(path, "r+")

    def _array(self, name):
        """The array `name`, opened once: opening reads and parses its zarr.json."""
        if name not in self._readable:
            self._readable[name] = self.group[name]
        return self._readable[name]

    def read_with_library(self, name, start, stop):
        return self._array(name)[start:stop]

    def _read_small(self, name):
        """Written whole at creation, so every chunk must be there: zarr would read a missing one as
        zeros (a missing status chunk is a shard not done yet). Caches written before EVERY_SMALL_CHUNK
        left out chunks of zeros, which only ids and view boxes never are."""
        array = self._array(name)
        if name in S.PRESENT_SMALL_ARRAYS or (name != S.STATUS and self.meta.extra.get(S.EVERY_SMALL_CHUNK)):
            for coords in np.ndindex(*array.cdata_shape):
                key = array.metadata.encode_chunk_key(coords)
                if not self._exists(f"{name}/{key}"):
                    raise FeatreconError(f"{self.path}: {name}: its stored object {name}/{key} is missing; "
                                         f"rebuild the cache: {rebuild_command(self.meta, self.path)}")
        return array[:]

    def _exists(self, key: str) -> bool:
        if remote.is_url(self.path):
            return remote.exists(remote.join(self.path, key))
        return (self.path / key).is_file()

    def missing_rows(self, name, k, rows):
        """zarr-python's own path (layouts other than featrecon's): the shard object must exist."""
        done = self.done()[self.meta.shard_bounds(k)[0]:][: self.meta.shard_size]
        if not done[list(rows)].any() or self._exists(f"{name}/{shard_key(k, len(self.array_info(name)[0]))}"):
            return []
        return [r for r in rows if done[r]]

    def array_info(self, name):
        a = self._array(name)
        return tuple(a.shape), np.dtype(a.dtype)

    def row_reader(self, name):
        # Local shard files of featrecon's layout: decoded straight into the caller's buffers
        # (see zarr_shards: the codec's own speed); anything else through zarr-python.
        # Every reader knows which samples are done: their objects must be there.
        done, strict = self.done(), self.meta.checksummed  # schema 2 writes every chunk of a shard
        if remote.is_url(self.path):  # each shard fetched whole, as one object, through fsspec
            fs, root = remote.filesystem(self.path)

            def fetch(key: str):
                try:
                    return fs.cat_file(f"{root}/{name}/{key}")
                except FileNotFoundError:
                    return None

            decoder = ShardDecoder.with_fetch(fetch, name, done, strict)
        else:
            decoder = ShardDecoder.open(self.path / name, name, done, strict)
        return decoder or SliceReader(self, name)

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
                array[start:stop] = stacked(value)

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
