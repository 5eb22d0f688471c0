"""The training reader: every train sample once per epoch, the right rows in every slot, RAM = streaming, ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featrecon.cache import schema as S
from featrecon.cache.factory import open_cache
from featrecon.cache.loader import CacheLoader
from featrecon.train.samples import train_indices


@pytest.mark.parametrize("mode", ["window", "global"])
@pytest.mark.parametrize("in_memory,threads", [(False, 1), (False, 3), (True, 2)])
def test_loader_yields_each_train_sample_once_and_no_holdout(small_cache, in_memory, threads, mode):
    with open_cache(small_cache) as store:
        split, n = store.read_all(S.SPLIT), store.meta.n
        train = np.flatnonzero(split == S.SPLIT_TRAIN)
        images = store.read(S.IMAGES, 0, n)
        feats = store.read(S.feature_path("layer2"), 0, n)
    assert 0 < len(train) < n
    loader = CacheLoader(small_cache, ("layer2",), train, batch_size=5, seed=1, prefetch=2, window=2, in_memory=in_memory,
                         threads=threads, mode=mode)
    orders = []
    for epoch in range(2):
        seen = []
        for b in loader.epoch(epoch):
            assert b.features[0].dtype == torch.float16 and b.images.dtype == torch.uint8
            for j, i in enumerate(b.indices.tolist()):  # each row is the sample its index says
                assert np.array_equal(b.images[j].numpy(), images[i])
                assert np.array_equal(b.features[0][j].numpy(), feats[i])
            seen.extend(b.indices.tolist())
        assert sorted(seen) == train.tolist()  # every train sample exactly once, no holdout sample
        orders.append(seen)
    assert orders[0] != orders[1]  # reshuffled per epoch
    assert [b.indices.tolist() for b in loader.epoch(1)] == [b.indices.tolist() for b in loader.epoch(1)]
    loader.close()


@pytest.mark.parametrize("shuffle", ["window", "global"])
def test_streamed_and_in_memory_batches_are_the_same_and_recycled_buffers_hold_the_right_rows(small_cache, shuffle):
    """The epoch's plan alone decides the batches: streaming and RAM give the same ones; with
    reuse_buffers a batch's buffers are refilled only after the next batch is asked for. Closing
    the loader closes the shard files its readers kept open."""
    import os

    with open_cache(small_cache) as store:
        feats = store.read(S.feature_path("layer1"), 0, store.meta.n)
    idx = np.arange(2, 23)
    runs = {}
    files = (lambda: len(os.listdir("/proc/self/fd"))) if os.path.isdir("/proc/self/fd") else (lambda: 0)
    before = files()
    for mode in (False, True):
        loader = CacheLoader(small_cache, ("layer1",), idx, batch_size=4, seed=3, window=2, in_memory=mode,
                             reuse_buffers=True, threads=2, mode=shuffle)
        seen = []
        for b in loader.epoch(2):
            assert all(np.array_equal(b.features[0][j].numpy(), feats[i]) for j, i in enumerate(b.indices.tolist()))
            seen.append(b.indices.tolist())
        readers = dict(loader._readers or {})  # held here: close itself, not the garbage collector, closes their files
        loader.close()
        assert files() == before and readers is not None
        runs[mode] = seen
    assert runs[False] == runs[True]
    assert sorted(sum(runs[False], [])) == idx.tolist()


def test_an_abandoned_epoch_leaves_the_loader_usable(zarr_cache):
    loader = CacheLoader(zarr_cache, ("layer3",), np.arange(24), batch_size=3, seed=0, window=1, prefetch=1, in_memory=False)
    first = next(iter(loader.epoch(0))).indices.tolist()
    assert [b.indices.tolist() for b in loader.epoch(0)][0] == first
    loader.close()


@pytest.mark.parametrize("mode", ["window", "global"])
@pytest.mark.parametrize("in_memory", [False, True])
def test_ranks_split_each_global_batch_and_run_the_same_number_of_steps(zarr_cache, in_memory, mode):
    with open_cache(zarr_cache) as store:
        idx = train_indices(store, False)
    whole = CacheLoader(zarr_cache, ("layer2",), idx, 6, seed=3, in_memory=in_memory, mode=mode)
    ranks = [CacheLoader(zarr_cache, ("layer2",), idx, 3, seed=3, in_memory=in_memory, rank=r, world=2, mode=mode)
             for r in range(2)]
    for epoch in (0, 1):
        ref = list(whole.epoch(epoch))[: len(idx) // 6]  # whole global batches only
        per_rank = [list(l.epoch(epoch)) for l in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0]) == len(ref)
        for step, b in enumerate(ref):  # rank r holds part r of the single process's batch, features and all
            for r in range(2):
                part = per_rank[r][step]
                assert np.array_equal(part.indices, b.indices[3 * r: 3 * r + 3])
                assert torch.equal(part.features[0], b.features[0][3 * r: 3 * r + 3])
                assert torch.equal(part.images, b.images[3 * r: 3 * r + 3])
    for l in (whole, *ranks):
        l.close()
    with pytest.raises(ValueError):
        CacheLoader(zarr_cache, ("layer2",), idx, 3, rank=2, world=2)


def test_auto_shuffles_globally_on_a_local_cache_and_reads_single_chunks(zarr_cache, monkeypatch):
    from featrecon.cache.shard_reader import ShardDecoder

    loader = CacheLoader(zarr_cache, ("layer3",), np.arange(24), batch_size=4, seed=0, in_memory=False, mode="auto")
    assert loader.mode == "global" and "global shuffle" in loader.describe()
    with open_cache(zarr_cache) as store:
        feats = store.read_rows(S.feature_path("layer3"), np.arange(24))
    whole_reads = []
    real = ShardDecoder.read
    monkeypatch.setattr(ShardDecoder, "read", lambda self, *a, **k: (whole_reads.append(1), real(self, *a, **k))[1])
    for b in loader.epoch(0):
        assert all(np.array_equal(b.features[0][j].numpy(), feats[i]) for j, i in enumerate(b.indices.tolist()))
    assert not whole_reads  # every sample through its shard's index, no whole-shard read
    loader.close()
    with pytest.raises(ValueError, match="shuffle mode 'sideways'"):
        CacheLoader(zarr_cache, ("layer3",), np.arange(4), 2, mode="sideways")


def test_a_shard_file_cut_in_place_between_epochs_is_named_not_read_past_its_end(zarr_cache, tmp_path):
    """The global shuffle reads chunks in place from mapped shard files. A file cut short in place
    (something other than featrecon, which replaces files whole) would kill the process with SIGBUS at
    the next touch past its new end; the check before each epoch finds it, and the next epoch names
    the cache, a damaged sample and the repair command instead. A shard replaced whole keeps reading."""
    import os
    import shutil

    from featrecon.cache.shards import shard_key
    from featrecon.errors import FeatreconError

    cache = tmp_path / "c.zarr"
    shutil.copytree(zarr_cache, cache)
    loader = CacheLoader(cache, ("layer3",), np.arange(24), batch_size=4, seed=0, in_memory=False, mode="global")
    reader = loader._reader(S.feature_path("layer3"))
    assert sum(len(b.indices) for b in loader.epoch(0)) == 24
    assert reader._maps and all(m is not None for m in reader._maps.values())  # read in place
    replaced = cache / S.feature_path("layer3") / shard_key(0, 4)
    copy = tmp_path / "whole"
    shutil.copy(replaced, copy)
    os.replace(copy, replaced)  # as featrecon's writers replace a file
    assert sum(len(b.indices) for b in loader.epoch(1)) == 24
    cut = cache / S.feature_path("layer3") / shard_key(1, 4)
    with open(cut, "r+b") as f:
        f.truncate(100)
    with pytest.raises(FeatreconError, match=r"c\.zarr: .*sample.*its chunk lies past the end of the shard file.*"
                       r"featrecon verify"):
        for _ in loader.epoch(2):
            pass
    loader.close()
