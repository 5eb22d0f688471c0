"""train-decoder: loader coverage, loss goes down, resume equals uninterrupted, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from featrecon import FeatreconError
from featrecon import schema as S
from featrecon import train as T
from featrecon.loader import CacheLoader
from featrecon.storage import open_cache

from conftest import build_cache


def tcfg(cache, out, **kw) -> T.TrainConfig:
    base = dict(layers=("layer1",), epochs=3, batch_size=4, width=32, lr=3e-3, progress=False, eval_samples=8)
    base.update(kw)
    return T.TrainConfig(cache=cache, out=out, **base)


@pytest.mark.parametrize("in_memory", [False, True])
def test_loader_yields_each_train_sample_once_and_no_holdout(small_cache, in_memory):
    with open_cache(small_cache) as store:
        split, n = store.read_all(S.SPLIT), store.meta.n
        train = np.flatnonzero(split == S.SPLIT_TRAIN)
        images = store.read(S.IMAGES, 0, n)
        feats = store.read(S.feature_path("layer2"), 0, n)
    assert 0 < len(train) < n
    loader = CacheLoader(small_cache, ("layer2",), train, batch_size=5, seed=1, prefetch=2, window=2, in_memory=in_memory)
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


def test_short_run_drives_the_loss_down_and_writes_outputs(small_cache, tmp_path):
    out = tmp_path / "run"
    T.fit(tcfg(small_cache, out, epochs=8))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 9))
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
    assert rows[-1]["psnr"] > rows[0]["psnr"]
    for name in ("last.pt", "best.pt", "config.json", "loss.png"):
        assert (out / name).is_file(), name
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert ckpt["layers"] == ["layer1"] and ckpt["epoch"] == 8
    from featrecon.checkpoint import decoder_from_checkpoint

    model = decoder_from_checkpoint(ckpt)  # the checkpoint alone rebuilds the decoder
    assert model([torch.zeros(1, 256, 16, 16)]).shape == (1, 3, 64, 64)


def test_resume_equals_uninterrupted_run(zarr_cache, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    T.fit(tcfg(zarr_cache, whole, epochs=4, layers=("layer2", "layer3")))
    cut = tmp_path / "cut"
    real = T.train_one_epoch

    def killed_at_epoch_3(model, loader, epoch, *a, **k):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(model, loader, epoch, *a, **k)

    monkeypatch.setattr(T, "train_one_epoch", killed_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        T.fit(tcfg(zarr_cache, cut, epochs=4, layers=("layer2", "layer3")))
    monkeypatch.undo()
    assert torch.load(cut / "last.pt", weights_only=False)["epoch"] == 2
    T.fit(tcfg(zarr_cache, cut, epochs=4, layers=("layer2", "layer3"), resume=True))
    a = torch.load(whole / "last.pt", weights_only=False)
    b = torch.load(cut / "last.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    la = [json.loads(l)["loss"] for l in (whole / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (cut / "metrics.jsonl").read_text().splitlines()]
    assert la == lb


def test_refusals(zarr_cache, photos24, tmp_path):
    with pytest.raises(FeatreconError, match="not in the cache; cached layers: stem, layer1"):
        T.fit(tcfg(zarr_cache, tmp_path / "a", layers=("layer1.0.conv1",)))
    T.fit(tcfg(zarr_cache, tmp_path / "b", epochs=1))
    with pytest.raises(FeatreconError, match="already holds a run.*--resume"):
        T.fit(tcfg(zarr_cache, tmp_path / "b", epochs=1))
    with pytest.raises(FeatreconError, match="settings differ.*lr"):
        T.fit(tcfg(zarr_cache, tmp_path / "b", epochs=1, lr=1e-4, resume=True))
    other = build_cache(tmp_path / "other.zarr", photos24, weights="random:1", layers="layer1", holdout_fraction=0.25)
    with pytest.raises(FeatreconError, match="fingerprint"):
        T.fit(tcfg(other, tmp_path / "b", epochs=1, resume=True))
    # An unfinished cache: mark one shard pending again.
    import zarr

    zarr.open_group(str(other), mode="r+")[S.STATUS][0:4] = S.STATUS_PENDING
    with pytest.raises(FeatreconError, match=r"unfinished, 20 of 24 samples done.*--allow-partial"):
        T.fit(tcfg(other, tmp_path / "c", epochs=1))
    T.fit(tcfg(other, tmp_path / "c", epochs=1, allow_partial=True))
    tiny = build_cache(tmp_path / "tiny.zarr", photos24, layers="layer1", limit=1, holdout_fraction=0.99)
    with pytest.raises(FeatreconError, match="train split has no done samples"):
        T.fit(tcfg(tiny, tmp_path / "d", epochs=1))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(zarr_cache, tmp_path, monkeypatch):
    real = T.compute_loss
    calls = {"n": 0}

    def poisoned(pred, target, cfg):
        calls["n"] += 1
        loss = real(pred, target, cfg)
        return loss * float("nan") if calls["n"] > 5 else loss  # epoch 1 has 5 steps

    monkeypatch.setattr(T, "compute_loss", poisoned)
    with pytest.raises(FeatreconError, match="loss became nan at epoch 2.*last good checkpoint"):
        T.fit(tcfg(zarr_cache, tmp_path / "r", epochs=3))
    ckpt = torch.load(tmp_path / "r" / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
