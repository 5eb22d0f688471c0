"""featrecon's shard layout of Zarr v3 arrays, and whole shards encoded without zarr's pipeline.

Every per-sample array of a cache has the same layout: a regular grid of shards of
`shard_size` samples, inner chunks of one sample, `bytes` (little-endian), then one
compressor, then (schema 2) a `crc32c` checksum of the compressed chunk; the index at
the end. The Zarr v3 sharding spec fixes the bytes: the encoded chunks one after
another, then (offset, nbytes) uint64 pairs and the index's own crc32c. Tests check
that our bytes equal zarr-python's for every codec featrecon offers, and that
tensorstore reads them. `ShardLayout` reads the layout from an array's zarr.json;
`ShardEncoder` writes shards, `shard_reader.ShardDecoder` reads them.

Why our own code for a format that libraries handle (the measurements: benchmarks/DESIGN.md):
zarr-python sends every inner chunk through an asyncio pipeline with several copies; for a
whole shard that cost about as much CPU as the compression itself, CPU the backbone needs on
a small machine. (Reading: see `shard_reader`.)
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import numpy as np
from fastcrc import crc32 as _crc32

MAX_U64 = 2**64 - 1
LITTLE_BYTES = {"name": "bytes", "configuration": {"endian": "little"}}
CRC32C = {"name": "crc32c"}
BLOSC_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


# crc32c (CRC-32/iSCSI) of bytes or a uint8 numpy array, for the writer and the reader. fastcrc reads
# the buffer in place, releases the GIL on large ones (so the loader's threads check their chunks at
# once) and uses the CPU's carry-less multiply: half the time per chunk of the `crc32c` package, and a
# third of google_crc32c's (zarr's), which holds the GIL (benchmarks/DESIGN.md).
chunk_crc32c = _crc32.iscsi


def numcodecs_for(spec: dict):
    """The numcodecs compressor of a zarr v3 codec description, or None if not one we know."""
    import numcodecs

    name, conf = spec.get("name"), spec.get("configuration", {})
    if name == "zstd":
        return numcodecs.Zstd(level=conf["level"], checksum=conf.get("checksum", False))
    if name == "blosc" and conf.get("shuffle") in BLOSC_SHUFFLE:
        return numcodecs.Blosc(cname=conf["cname"], clevel=conf["clevel"], shuffle=BLOSC_SHUFFLE[conf["shuffle"]],
                               blocksize=conf.get("blocksize", 0), typesize=conf.get("typesize"))
    return None


@dataclass(frozen=True)
class ShardLayout:
    """What the encoder and decoder need to know of one array, read from its zarr.json."""

    shape: tuple[int, ...]  # (N, *sample_shape)
    dtype: np.dtype
    per_shard: int  # samples per shard
    compressor: object | None  # numcodecs codec, None for uncompressed chunks
    checksum: bool  # a crc32c after the compressor, per chunk

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    @classmethod
    def of(cls, meta: dict) -> ShardLayout | None:
        """The layout of an array's metadata (zarr.json as a dict), or None if not featrecon's."""
        codecs = meta.get("codecs", [])
        if sys.byteorder != "little" or len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
            return None
        shape, dtype = tuple(meta["shape"]), np.dtype(meta["data_type"])
        conf = codecs[0]["configuration"]
        if (list(conf["chunk_shape"]) != [1, *shape[1:]] or conf.get("index_location", "end") != "end"
                or conf.get("index_codecs") != [LITTLE_BYTES, CRC32C]
                or meta.get("chunk_key_encoding", {}).get("name") != "default"
                or meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/") != "/"
                or meta.get("fill_value") not in (0, 0.0)):
            return None
        inner = list(conf.get("codecs", []))
        if not inner or inner[0].get("name") != "bytes" or (inner[0] != LITTLE_BYTES and dtype.itemsize > 1):
            return None
        checksum = inner[-1] == CRC32C
        middle = inner[1:-1] if checksum else inner[1:]
        if len(middle) > 1:
            return None
        compressor = numcodecs_for(middle[0]) if middle else None
        if middle and compressor is None:
            return None
        per_shard = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
        return cls(shape, dtype, per_shard, compressor, checksum)

    @classmethod
    def of_array(cls, array) -> ShardLayout | None:
        return cls.of(json.loads(json.dumps(array.metadata.to_dict())))  # plain lists and dicts, as in zarr.json


def shard_key(k: int, ndim: int) -> str:
    """The store key of shard k under an array (default chunk key encoding, '/' separator)."""
    return "/".join(["c", str(k)] + ["0"] * (ndim - 1))


class ShardEncoder:
    """Writes one whole shard in the bytes zarr-python would write."""

    def __init__(self, array, layout: ShardLayout):
        self.array, self.layout = array, layout
        compressor = layout.compressor
        self.compress = None if compressor is None and not layout.checksum else self._encode_chunk

    @classmethod
    def for_array(cls, array) -> ShardEncoder | None:
        layout = ShardLayout.of_array(array)
        return cls(array, layout) if layout is not None else None

    def _encode_chunk(self, row: np.ndarray):
        """The chunk's stored bytes: the compressed row, and its crc32c as a separate 4-byte part
        (concatenating them here would copy every chunk twice while holding the GIL, which cost
        writes measurably: benchmarks/DESIGN.md; `assemble` copies both parts into the shard
        with numpy, as it copies any chunk)."""
        compressor = self.layout.compressor
        data = compressor.encode(row) if compressor is not None else row.reshape(-1).view(np.uint8)
        if self.layout.checksum:
            return data, chunk_crc32c(data).to_bytes(4, "little")
        return data

    def start(self, rows, pool: Executor | None = None) -> list:
        """Encode the shard's rows (an array (n, *sample_shape) or a list of n samples; n is
        the shard size, less only at the array's end): on `pool` if given, returning at once.
        The compressors release the GIL, so a pool compresses on several cores; rows go in
        groups of about 1 MB, so small rows do not drown in task overhead."""
        rows = [np.ascontiguousarray(v, dtype=self.layout.dtype) for v in rows]
        if self.compress is None:
            return [memoryview(v).cast("B") for v in rows]
        if pool is None:
            return [self.compress(v) for v in rows]
        step = max(1, (1 << 20) // max(1, rows[0].nbytes)) if rows else 1
        return [pool.submit(_compress_all, self.compress, rows[i: i + step]) for i in range(0, len(rows), step)]

    def assemble(self, parts: list) -> np.ndarray:
        """The shard's bytes (uint8) from its encoded rows, waiting for any still compressing.
        numpy copies the rows in without holding the GIL (bytes.join would hold it for
        the whole shard, tens of MB, while the forward's thread waits to launch work)."""
        chunks = []
        for p in parts:
            chunks.extend(p.result()) if isinstance(p, Future) else chunks.append(p)
        # Each chunk: its bytes, or (bytes, checksum) kept apart by _encode_chunk.
        pieces = [[np.frombuffer(b, dtype=np.uint8) for b in (c if isinstance(c, tuple) else (c,))] for c in chunks]
        index = np.full((self.layout.per_shard, 2), MAX_U64, dtype="<u8")
        sizes = np.array([sum(len(b) for b in c) for c in pieces], dtype=np.uint64)
        index[: len(pieces), 1] = sizes
        index[: len(pieces), 0] = np.cumsum(sizes) - sizes
        index_bytes = index.tobytes()
        tail = index_bytes + chunk_crc32c(index_bytes).to_bytes(4, "little")
        out = np.empty(int(sizes.sum()) + len(tail), dtype=np.uint8)
        at = 0
        for c in pieces:
            for b in c:
                out[at: at + len(b)] = b
                at += len(b)
        out[at:] = np.frombuffer(tail, dtype=np.uint8)
        return out

    def encode(self, rows, pool: Executor | None = None) -> np.ndarray:
        return self.assemble(self.start(rows, pool))

    def put(self, k: int, shard: np.ndarray) -> None:
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        key = self.array.metadata.encode_chunk_key((k,) + (0,) * (self.array.ndim - 1))
        sync((self.array.store_path / key).set(default_buffer_prototype().buffer.from_bytes(shard)))  # atomic

    def write(self, k: int, values, pool: Executor | None = None) -> None:
        self.put(k, self.encode(values, pool))


def _compress_all(compress, rows) -> list:
    return [compress(v) for v in rows]
