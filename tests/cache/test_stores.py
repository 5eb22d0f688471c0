"""Storage: exact round trips in both formats and every codec; the schema page's snippets work."""

from __future__ import annotations

import numpy as np
import pytest

from featrecon.cache import schema as S
from featrecon.cache.factory import create_cache, open_cache
from featrecon.cache.schema import CacheMeta, Codec, Preprocessing
from featrecon.errors import FeatreconError


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


@pytest.mark.parametrize("codec", ["zstd:1", "zstd:9", "zstd:-3", "lz4", "blosc-zstd", "none"])
@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_round_trip_exact(tmp_path, codec, suffix):
    n = 8
    meta = meta_for(n, str(Codec.parse(codec)))
    ids = [f"dir/img '{i}'.jpg" for i in range(n)]
    store = create_cache(tmp_path / f"c{suffix}", meta, ids, np.arange(n, dtype=np.int32) - 1, np.zeros(n, np.uint8))
    shapes = {"images": ((3, 8, 8), np.uint8), "features/a": ((4, 3, 3), np.float16), "features/b": ((2, 5, 5), np.float16)}
    for k in meta.shards():
        lo, hi = meta.shard_bounds(k)
        arrays = {name: np.stack([sample(i * 7 + j, s, dt) for i in range(lo, hi)])
                  for j, (name, (s, dt)) in enumerate(shapes.items())}
        status = np.full(hi - lo, S.STATUS_DONE, np.uint8)
        store.write_shard(k, arrays, status, {ids[lo]: "reason"} if k == 1 else {}, {"a": 2} if k == 2 else {})
    store.close()
    with open_cache(tmp_path / f"c{suffix}") as st:
        assert st.meta == meta and st.ids() == ids
        for j, (name, (s, dt)) in enumerate(shapes.items()):
            got = st.read(name, 0, n)
            assert got.dtype == dt
            for i in range(n):
                np.testing.assert_array_equal(got[i], sample(i * 7 + j, s, dt))
        assert st.skipped() == {ids[3]: "reason"} and st.overflow_totals() == {"a": 2}
        assert (st.status() == S.STATUS_DONE).all()
        np.testing.assert_array_equal(st.read_all(S.LABELS), np.arange(n) - 1)


def test_rewriting_a_shard_does_not_double_count(tmp_path):
    meta = meta_for(3, "zstd:1")
    store = create_cache(tmp_path / "c.zarr", meta, ["a", "b", "c"], np.zeros(3, np.int32), np.zeros(3, np.uint8))
    arrays = {"images": np.zeros((3, 3, 8, 8), np.uint8), "features/a": np.zeros((3, 4, 3, 3), np.float16),
              "features/b": np.zeros((3, 2, 5, 5), np.float16)}
    for _ in range(2):  # a shard recomputed after a kill between its attrs and its status
        store.write_shard(0, arrays, np.ones(3, np.uint8), {}, {"a": 5})
    assert store.overflow_totals() == {"a": 5}


def test_bad_paths_and_versions(tmp_path):
    with pytest.raises(FeatreconError, match="no cache here"):
        open_cache(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    import zarr

    zarr.open_group(str(tmp_path / "plain"), mode="w")
    with pytest.raises(FeatreconError, match="not a featrecon cache"):
        open_cache(tmp_path / "plain")
    d = meta_for(3, "none").to_dict()
    d["schema_version"] = 99
    with pytest.raises(FeatreconError, match="schema version 99"):
        CacheMeta.from_dict(d)
    with pytest.raises(FeatreconError, match="unknown codec"):
        Codec.parse("gzip")
