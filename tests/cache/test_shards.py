"""Storage: exact round trips in both formats and every codec; the schema page's snippets work."""

from __future__ import annotations

import numpy as np
import pytest

from featrecon.cache.factory import create_cache, open_cache
from featrecon.cache.schema import CacheMeta, Codec, Preprocessing


def meta_for(n: int, codec: str, shard: int = 3) -> CacheMeta:
    return CacheMeta(n=n, layers={"a": [4, 3, 3], "b": [2, 5, 5]}, nodes={"a": "a", "b": "b"}, weights="random:0",
                     weights_fingerprint="x", preprocessing=Preprocessing(9, 8, (0.5,) * 3, (0.2,) * 3), dtype="float16",
                     codec=codec, autocast="none", source_root="/", holdout_fraction=0.1, ids_sha256="y", shard_size=shard)


def sample(i: int, shape, dtype) -> np.ndarray:
    rng = np.random.default_rng(i)  # seeded by index: any sample can be regenerated
    x = rng.standard_normal(shape).astype(dtype) if dtype != np.uint8 else rng.integers(0, 256, shape, dtype=np.uint8)
    if dtype != np.uint8:
        x[x < 0] = 0  # ReLU-like sparsity
    return x


@pytest.mark.parametrize("codec", ["zstd:1", "zstd:3", "zstd:-3", "lz4", "blosc-zstd", "none"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_whole_shard_encoder_writes_zarrs_own_bytes(tmp_path, codec, dtype):
    """featrecon encodes whole shards itself (zarr's per-chunk pipeline costs as much CPU as
    the compression); the files must be byte for byte what zarr-python writes, last
    partial shard and skipped (all-zero) rows included."""

    n = 8  # shards of 3: the last one holds 2 rows
    meta = CacheMeta(**{**meta_for(n, str(Codec.parse(codec))).__dict__, "dtype": dtype})
    shapes = {"images": ((3, 8, 8), np.uint8), "features/a": ((4, 3, 3), np.dtype(dtype)),
              "features/b": ((2, 5, 5), np.dtype(dtype))}
    files = {}
    for fast in (True, False):
        path = tmp_path / f"{fast}.zarr"
        store = create_cache(path, meta, [str(i) for i in range(n)], np.zeros(n, np.int32), np.zeros(n, np.uint8))
        store.fast_writes = fast
        for k in meta.shards():
            lo, hi = meta.shard_bounds(k)
            rows = {name: [sample(i * 7 + j, s, dt) * (i != 4) for i in range(lo, hi)]
                    for j, (name, (s, dt)) in enumerate(shapes.items())}
            store.write_shard(k, rows if fast else {name: np.stack(r) for name, r in rows.items()},
                              np.ones(hi - lo, np.uint8), {}, {})
        assert all((store._writable(name)[1] is not None) == fast for name in shapes)
        store.close()
        files[fast] = {p.relative_to(path): p.read_bytes()
                       for name in shapes for p in (path / name / "c").rglob("*") if p.is_file()}
    assert len(files[True]) == len(shapes) * len(meta.shards())
    assert files[True] == files[False]
    with open_cache(tmp_path / "True.zarr") as st:
        np.testing.assert_array_equal(st.read("features/b", 6, 8)[1], sample(7 * 7 + 2, (2, 5, 5), np.dtype(dtype)))


def test_single_chunk_reads_match_and_a_truncated_shard_is_named(tmp_path):
    """The global shuffle reads single chunks through each shard's index, into each thread's reused
    buffer: the values equal a whole-shard read, and a shard file cut short after its index was read
    names the sample instead of decoding a short buffer."""
    from featrecon.cache.shards import ShardDecoder, shard_key
    from featrecon.errors import CorruptChunk

    n = 8
    meta = meta_for(n, "zstd:-3")
    path = tmp_path / "c.zarr"
    with create_cache(path, meta, [str(i) for i in range(n)], np.zeros(n, np.int32), np.zeros(n, np.uint8)) as store:
        for k in meta.shards():
            lo, hi = meta.shard_bounds(k)
            store.write_shard(k, {"images": np.stack([sample(i, (3, 8, 8), np.uint8) for i in range(lo, hi)]),
                                  "features/a": np.stack([sample(100 + i, (4, 3, 3), np.float16) for i in range(lo, hi)]),
                                  "features/b": np.stack([sample(200 + i, (2, 5, 5), np.float16) for i in range(lo, hi)])},
                              np.ones(hi - lo, np.uint8), {}, {})
    dec = ShardDecoder.open(path / "features/b", "features/b")
    outs = [np.empty((2, 5, 5), np.float16) for _ in range(2)]
    dec.read_chunks(1, [2, 0], outs)  # samples 5 and 3, in the order asked
    np.testing.assert_array_equal(outs[0], sample(205, (2, 5, 5), np.float16))
    np.testing.assert_array_equal(outs[1], sample(203, (2, 5, 5), np.float16))
    shard = path / "features/b" / shard_key(1, 4)
    shard.write_bytes(shard.read_bytes()[:10])  # cut after the decoder read (and kept) its index
    with pytest.raises(CorruptChunk, match="sample 5: its chunk lies past the end of the shard file"):
        dec.read_chunks(1, [2], outs[:1])
