"""Damaged caches are caught, named and repaired; every array opens in other Zarr readers."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from featrecon.cache import schema as S
from featrecon.cache.factory import open_cache
from featrecon.cli import verify_main
from featrecon.errors import FeatreconError
from featrecon.train.config import TrainConfig
from featrecon.train.loop import fit
from featrecon.train.samples import train_indices, validation_split
from tests.helpers import build_cache


def damage(cache: Path, layer: str, sample: int) -> None:
    """Flip 100 bytes inside one stored sample of features/<layer>, as a bad disk would."""
    if cache.suffix == ".h5":
        import h5py

        with h5py.File(cache, "r") as f:
            info = f[S.feature_path(layer)].id.get_chunk_info_by_coord((sample, 0, 0, 0))
        path, at, size = cache, info.byte_offset, info.size
    else:
        with open_cache(cache) as store:
            per_shard = store.meta.shard_size
        k, r = divmod(sample, per_shard)
        path = cache / S.feature_path(layer) / "c" / str(k) / "0" / "0" / "0"
        index = np.fromfile(path, np.uint8)[-(16 * per_shard + 4):-4].view("<u8").reshape(-1, 2)
        at, size = int(index[r, 0]), int(index[r, 1])
    raw = bytearray(path.read_bytes())
    for i in np.random.default_rng(sample).integers(at + 8, at + size - 8, 100):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.fixture
def damaged(small_cache, tmp_path) -> Path:
    copy = tmp_path / small_cache.name
    (shutil.copytree if small_cache.is_dir() else shutil.copy)(small_cache, copy)
    with open_cache(copy) as store:  # a sample that training reads (not one kept for validation)
        first_train = int(validation_split(store, train_indices(store, False), 0.05)[0][0])
    damage(copy, "layer3", first_train)
    return copy


def tcfg(cache, out, **kw) -> TrainConfig:
    return TrainConfig(cache=cache, out=out, layers=("layer3",), epochs=1, batch_size=4, width=32, progress=False,
                         eval_samples=4, **kw)


def test_training_stops_on_a_damaged_sample_and_names_it(damaged, tmp_path):
    with open_cache(damaged) as store:
        i = int(validation_split(store, train_indices(store, False), 0.05)[0][0])
        sample_id = store.ids()[i]
    with pytest.raises(FeatreconError) as e:
        fit(tcfg(damaged, tmp_path / "run"))
    msg = str(e.value)
    assert str(damaged) in msg and "features/layer3" in msg and f"sample {i} ({sample_id})" in msg
    assert f"featrecon verify {damaged} --repair" in msg and "nan" not in msg.lower()


def test_skip_corrupt_trains_without_the_damaged_sample(damaged, tmp_path):
    fit(tcfg(damaged, tmp_path / "run", skip_corrupt=True))
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["corrupt_skipped"] == 1 and np.isfinite(row["loss"]) and np.isfinite(row["psnr"])


def test_verify_finds_the_damage_and_repair_then_rerun_restores_every_byte(small_cache, photos24, tmp_path, capsys):
    copy = tmp_path / small_cache.name
    (shutil.copytree if small_cache.is_dir() else shutil.copy)(small_cache, copy)
    assert verify_main([str(copy), "--no-progress"]) == 0
    assert "no damage found" in capsys.readouterr().out
    damage(copy, "layer3", 5)
    assert verify_main([str(copy), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"features/layer3: sample 5 \(.+\): .*(checksum|Fletcher)", out, re.I | re.S), out
    assert verify_main([str(copy), "--no-progress", "--repair"]) == 0
    assert "marked 1 shard(s) pending (1)" in capsys.readouterr().out  # sample 5 is in shard 1 (shards of 4)
    with open_cache(copy) as store:
        assert (store.status()[4:8] == S.STATUS_PENDING).all() and (store.status()[:4] == S.STATUS_DONE).all()
    build_cache(copy, photos24, holdout_fraction=0.25)  # the same extract-features call that made it
    assert verify_main([str(copy), "--no-progress"]) == 0
    with open_cache(small_cache) as a, open_cache(copy) as b:
        for name in [S.IMAGES, S.STATUS, *(S.feature_path(l) for l in a.meta.layers)]:
            np.testing.assert_array_equal(a.read_all(name), b.read_all(name))
    if small_cache.is_dir():  # Zarr: every file byte for byte
        files = sorted(p.relative_to(small_cache) for p in small_cache.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(copy) for p in copy.rglob("*") if p.is_file())
        assert all((small_cache / f).read_bytes() == (copy / f).read_bytes() for f in files)


def write_v1_cache(src: Path, dst: Path) -> None:
    """A schema-1 cache as the first releases wrote it: string ids, no checksums, no dimension names."""
    import zarr
    from zarr.codecs import ZstdCodec

    with open_cache(src) as store:
        meta, ids = store.meta.to_dict(), store.ids()
        arrays = {n: store.read_all(n) for n in [S.IMAGES, *(S.feature_path(l) for l in store.meta.layers)]}
        small = {n: store.read_all(n) for n in (S.LABELS, S.SPLIT, S.STATUS)}
        shard = store.meta.shard_size
    g = zarr.open_group(str(dst), mode="w")
    for name, a in arrays.items():
        g.create_array(name, shape=a.shape, dtype=a.dtype, chunks=(1, *a.shape[1:]), shards=(shard, *a.shape[1:]),
                       compressors=ZstdCodec(level=1), fill_value=0)[:] = a
    g.create_array(S.IDS, shape=(len(ids),), dtype=str, chunks=(len(ids),))  # zarr-python's own string type
    g[S.IDS][:] = np.array(ids, dtype=object)
    for name, a in small.items():
        g.create_array(name, shape=a.shape, dtype=a.dtype, chunks=a.shape)[:] = a
    g.attrs.update({S.SKIPPED_ATTR: {}, S.OVERFLOW_ATTR: {}, S.META_ATTR: {**meta, "schema_version": 1}})


def test_version_1_caches_still_read_and_verify_says_it_cannot_check_them(zarr_cache, tmp_path, capsys):
    old = tmp_path / "v1.zarr"
    write_v1_cache(zarr_cache, old)
    with open_cache(old) as a, open_cache(zarr_cache) as b:
        assert a.meta.schema_version == 1 and not a.meta.checksummed
        assert a.ids() == b.ids()
    fit(tcfg(old, tmp_path / "run"))  # the fast reader handles the unchecksummed layout too
    assert verify_main([str(old), "--no-progress"]) == 0
    assert "predates checksums (schema version 1)" in capsys.readouterr().out


def test_the_api_names_a_damaged_sample_by_index_and_id(damaged):
    import featrecon

    with open_cache(damaged) as store:
        i = int(validation_split(store, train_indices(store, False), 0.05)[0][0])
        sample_id = store.ids()[i]
    with featrecon.open_cache(damaged) as cache, pytest.raises(FeatreconError) as e:
        cache.features("layer3", [i])
    msg = str(e.value)
    assert f"features/layer3, sample {i} ({sample_id})" in msg and f"featrecon verify {damaged} --repair" in msg


@pytest.mark.parametrize("in_memory", [False, True])
def test_a_loader_skipping_a_damaged_sample_gives_every_other_sample_its_own_rows(damaged, small_cache, in_memory):
    """--skip-corrupt in the loader: the damaged sample is in no batch of any epoch, and every other
    sample's rows are its own, in recycled buffers too, and the batch that lost it gives its buffers
    back to the pool (not a copy of its smaller size, which the pool kept one more of every epoch)."""
    from featrecon.cache.loader import CacheLoader

    with open_cache(small_cache) as store:
        idx = train_indices(store, False)
        bad = int(validation_split(store, idx, 0.05)[0][0])
        want = store.read(S.feature_path("layer3"), 0, store.meta.n)
    loader = CacheLoader(damaged, ("layer3",), idx, batch_size=3, seed=1, window=2, in_memory=in_memory,
                         reuse_buffers=True, threads=2, skip_corrupt=True, mode="global")
    pooled = []
    try:
        for epoch in range(3):
            seen = []
            for b in loader.epoch(epoch):
                rows = b.features[0].numpy()
                assert all(np.array_equal(rows[j], want[i]) for j, i in enumerate(b.indices.tolist()))
                seen += b.indices.tolist()
            assert sorted(seen) == sorted(set(idx.tolist()) - {bad})
            pooled.append(sum(len(v) for v in loader.buffers._free.values()))
        assert pooled[1] == pooled[2]  # the pool holds as many buffers each epoch: none leaks
    finally:
        loader.close()
