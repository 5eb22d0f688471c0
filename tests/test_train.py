"""train-decoder: loader coverage, loss goes down, resume equals uninterrupted, refusals."""

from __future__ import annotations

import json
from pathlib import Path

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


@pytest.mark.parametrize("in_memory,threads", [(False, 1), (False, 3), (True, 2)])
def test_loader_yields_each_train_sample_once_and_no_holdout(small_cache, in_memory, threads):
    with open_cache(small_cache) as store:
        split, n = store.read_all(S.SPLIT), store.meta.n
        train = np.flatnonzero(split == S.SPLIT_TRAIN)
        images = store.read(S.IMAGES, 0, n)
        feats = store.read(S.feature_path("layer2"), 0, n)
    assert 0 < len(train) < n
    loader = CacheLoader(small_cache, ("layer2",), train, batch_size=5, seed=1, prefetch=2, window=2, in_memory=in_memory,
                         threads=threads)
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


def test_streamed_and_in_memory_batches_are_the_same_and_recycled_buffers_hold_the_right_rows(small_cache):
    """The epoch's plan alone decides the batches: streaming and RAM give the same ones; with
    reuse_buffers a batch's buffers are refilled only after the next batch is asked for."""
    with open_cache(small_cache) as store:
        feats = store.read(S.feature_path("layer1"), 0, store.meta.n)
    idx = np.arange(2, 23)
    runs = {}
    for mode in (False, True):
        loader = CacheLoader(small_cache, ("layer1",), idx, batch_size=4, seed=3, window=2, in_memory=mode,
                             reuse_buffers=True, threads=2)
        seen = []
        for b in loader.epoch(2):
            assert all(np.array_equal(b.features[0][j].numpy(), feats[i]) for j, i in enumerate(b.indices.tolist()))
            seen.append(b.indices.tolist())
        loader.close()
        runs[mode] = seen
    assert runs[False] == runs[True]
    assert sorted(sum(runs[False], [])) == idx.tolist()


def test_an_abandoned_epoch_leaves_the_loader_usable(zarr_cache):
    loader = CacheLoader(zarr_cache, ("layer3",), np.arange(24), batch_size=3, seed=0, window=1, prefetch=1, in_memory=False)
    first = next(iter(loader.epoch(0))).indices.tolist()
    assert [b.indices.tolist() for b in loader.epoch(0)][0] == first
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
    with pytest.raises(FeatreconError, match=r"settings differ.*\(grad_clip\)"):
        T.fit(tcfg(zarr_cache, tmp_path / "b", epochs=1, grad_clip=1.0, resume=True))
    # A run written before --grad-clip existed has no such key: it trained without clipping, and resumes.
    ckpt = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    del ckpt["train_config"]["grad_clip"]
    torch.save(ckpt, tmp_path / "b" / "last.pt")
    assert T.fit(tcfg(zarr_cache, tmp_path / "b", epochs=1, resume=True))["epoch"] == 1
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
    from featrecon import step as step_module

    real = step_module.compute_loss
    calls = {"n": 0}

    def poisoned(pred, target, cfg):
        calls["n"] += 1
        loss = real(pred, target, cfg)
        return loss * float("nan") if calls["n"] > 5 else loss  # epoch 1 has 5 steps

    monkeypatch.setattr(step_module, "compute_loss", poisoned)
    with pytest.raises(FeatreconError, match="loss became nan at epoch 2.*last good checkpoint"):
        T.fit(tcfg(zarr_cache, tmp_path / "r", epochs=3))
    ckpt = torch.load(tmp_path / "r" / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_a_failed_compile_trains_eagerly_with_one_warning(zarr_cache, tmp_path, monkeypatch, caplog):
    eager = tmp_path / "eager"
    T.fit(tcfg(zarr_cache, eager, epochs=2, compile="no"))

    def broken_compile(model, *a, **k):
        def fails(*args, **kw):
            raise RuntimeError("inductor: no C++ compiler\nmore detail")
        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    fallback = tmp_path / "fallback"
    T.fit(tcfg(zarr_cache, fallback, epochs=2, compile="yes"))
    warnings = [r.getMessage() for r in caplog.records if "torch.compile of the decoder failed" in r.getMessage()]
    assert warnings == ["torch.compile of the decoder failed (RuntimeError: inductor: no C++ compiler); training eagerly"]
    a, b = (torch.load(p / "last.pt", weights_only=False)["model"] for p in (eager, fallback))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the failed attempt changed nothing


@pytest.mark.parametrize("setting,value,message", [
    ("precision", "fp8", "--precision 'fp8': choose one of auto, bf16, fp32"),
    ("compile", "maybe", "--compile 'maybe': choose one of auto, yes, no"),
])
def test_step_settings_refuse_unknown_choices(zarr_cache, tmp_path, setting, value, message):
    with pytest.raises(FeatreconError, match=message.replace("(", r"\(").replace(")", r"\)")):
        T.fit(tcfg(zarr_cache, tmp_path / "r", **{setting: value}))


def test_cpu_defaults_are_the_measured_ones():
    s = T.step_settings(T.TrainConfig(cache=None, layers=("layer1",), out=None), torch.device("cpu"))
    assert s == T.StepSettings(autocast=False, channels_last=True, compile=False, fused_adamw=False)
    s = T.step_settings(T.TrainConfig(cache=None, layers=("layer1",), out=None), torch.device("cuda"))
    assert s == T.StepSettings(autocast=True, channels_last=True, compile=True, fused_adamw=True)


def test_layer_each_trains_every_cached_layer_and_a_rerun_resumes_the_rest(tmp_path, photo_dir, monkeypatch):
    cache = build_cache(tmp_path / "c.zarr", photo_dir, layers="layer3,layer4", holdout_fraction=0.3)
    runs = tmp_path / "runs"
    real = T._fit
    calls = []

    def fails_on_layer4(cfg, group):
        calls.append(cfg.layers)
        if cfg.layers == ("layer4",) and len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second layer
        return real(cfg, group)

    monkeypatch.setattr(T, "_fit", fails_on_layer4)
    cfg = tcfg(cache, runs, layers=("each",), epochs=2)
    with pytest.raises(KeyboardInterrupt):
        T.fit_each(cfg)
    assert (runs / "layer3" / "last.pt").is_file() and not (runs / "layer4").exists()
    T.fit_each(cfg)  # the rerun: layer3 is done and skipped, layer4 trains
    assert calls == [("layer3",), ("layer4",), ("layer4",)]
    for layer in ("layer3", "layer4"):
        assert torch.load(runs / layer / "last.pt", weights_only=True)["epoch"] == 2


def test_best_is_chosen_on_validation_images_never_trained_on_and_early_stop(small_cache, tmp_path, monkeypatch):
    with open_cache(small_cache) as store:
        idx = T.train_indices(store, False)
        train, val = T.validation_split(store, idx, 0.2)
        holdout = np.flatnonzero(store.read_all(S.SPLIT) == S.SPLIT_HOLDOUT)
    assert len(val) >= 1 and not set(train) & set(val) and sorted([*train, *val]) == idx.tolist()
    assert not set(val) & set(holdout.tolist())
    loaders = []

    class Recording(CacheLoader):
        def __init__(self, path, layers, indices, *a, **k):
            loaders.append(np.asarray(indices).tolist())
            super().__init__(path, layers, indices, *a, **k)

    psnr = iter([5.0, 6.0, 4.0, 3.0, 2.0, 1.0])
    real_evaluate = T.evaluate

    def scripted(model, loader, device, **k):
        out = real_evaluate(model, loader, device, **k)
        return {**out, "psnr": np.full(len(out["psnr"]), next(psnr))}

    monkeypatch.setattr(T, "CacheLoader", Recording)
    monkeypatch.setattr(T, "evaluate", scripted)
    out = tmp_path / "run"
    T.fit(tcfg(small_cache, out, epochs=6, val_fraction=0.2, early_stop=2))
    stats, trained, validated = loaders[:3]  # input statistics, training, validation
    assert set(stats) <= set(train.tolist()) and sorted(trained) == sorted(train.tolist())
    assert set(validated) <= set(val.tolist())
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]  # best at 2, then two epochs without better: stop
    assert {r["psnr_on"] for r in rows} == {"validation"}
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == 2
    assert json.loads((out / "config.json").read_text())["best_chosen_on"] == "validation"


def test_crop_training_takes_matching_windows_and_scores_whole_images(zarr_cache, tmp_path):
    cells = torch.arange(16.0).view(1, 1, 4, 4).expand(2, 1, 4, 4)  # a layer of stride 16 at 64 px
    pixels = torch.arange(64 * 64.0).view(1, 1, 64, 64).expand(2, 3, 64, 64)
    for seed in range(5):
        (f,), t = T.random_crop([cells], pixels, 32, [16], np.random.default_rng(seed))
        assert f.shape[-2:] == (2, 2) and t.shape[-2:] == (32, 32)
        y, x = divmod(int(t[0, 0, 0, 0]), 64)
        assert y % 16 == 0 and x % 16 == 0 and int(f[0, 0, 0, 0]) == (y // 16) * 4 + x // 16  # the same window
    out = tmp_path / "run"
    T.fit(tcfg(zarr_cache, out, layers=("layer3",), epochs=2, crop=32))
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["psnr"] > 0  # scored on whole images
    with pytest.raises(FeatreconError, match="--crop 24: must be a multiple of 16"):
        T.fit(tcfg(zarr_cache, tmp_path / "bad", layers=("layer3",), crop=24))


def test_input_channels_are_standardised_by_the_training_features_statistics(zarr_cache, tmp_path):
    from featrecon.checkpoint import decoder_from_checkpoint, load_checkpoint

    T.fit(T.TrainConfig(cache=zarr_cache, layers=("layer3",), out=tmp_path / "r", epochs=1, width=16, arch="espcn",
                        progress=False))
    model = decoder_from_checkpoint(load_checkpoint(tmp_path / "r" / "last.pt"))
    with open_cache(zarr_cache) as store:  # fewer than 256 trained samples: the statistics are over all of them
        idx, _ = T.validation_split(store, T.train_indices(store, False), 0.05)
        x = np.stack([store.read("features/layer3", i, i + 1)[0] for i in idx]).astype(np.float64)
    mean, std = x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3))
    np.testing.assert_allclose(model.norm.mean.flatten().numpy(), mean, rtol=1e-4, atol=1e-5)
    floor = 1e-6 + 0.01 * std.mean()  # channels that never fire are not divided by zero
    np.testing.assert_allclose(model.norm.std.flatten().numpy(), np.maximum(std, floor), rtol=1e-4, atol=1e-5)
    feats = torch.from_numpy(x[:2]).float()
    assert model.norm(feats).mean().abs() < 0.5  # the decoder sees standardised inputs
    T.fit(T.TrainConfig(cache=zarr_cache, layers=("layer3",), out=tmp_path / "raw", epochs=1, width=16, arch="espcn",
                        progress=False, input_norm=False))
    raw = decoder_from_checkpoint(load_checkpoint(tmp_path / "raw" / "last.pt"))
    assert isinstance(raw.norm, torch.nn.Identity)


@pytest.mark.parametrize("in_memory", [False, True])
def test_ranks_split_each_global_batch_and_run_the_same_number_of_steps(zarr_cache, in_memory):
    with open_cache(zarr_cache) as store:
        idx = T.train_indices(store, False)
    whole = CacheLoader(zarr_cache, ("layer2",), idx, 6, seed=3, in_memory=in_memory)
    ranks = [CacheLoader(zarr_cache, ("layer2",), idx, 3, seed=3, in_memory=in_memory, rank=r, world=2)
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


def test_auto_crop_is_about_112_pixels_in_whole_cells_of_the_coarsest_layer_64_at_stride_4_or_finer():
    assert [T.auto_crop([s], 224) for s in (2, 4, 8, 16, 32)] == [64, 64, 112, 112, 128]
    assert T.auto_crop([4, 16], 224) == 112 and T.auto_crop([4], 64) == 0 and T.auto_crop([32], 128) == 0


def test_resolve_sets_only_the_auto_settings_per_layer(zarr_cache):
    assert [T.auto_width([s]) for s in (2, 4, 8, 32)] == [256, 256, 128, 128] and T.auto_width([4, 16]) == 128
    assert [T.auto_res_scale([s]) for s in (2, 4, 8, 32)] == [1.0, 1.0, 0.1, 0.1] and T.auto_res_scale([4, 16]) == 0.1
    with open_cache(zarr_cache) as store:
        meta = store.meta
    size = meta.image_shape[1]
    for layer in ("layer1", "layer3"):
        cfg = T.resolve(T.TrainConfig(cache=zarr_cache, layers=(layer,), out=Path("r")), meta)
        strides = T.layer_strides(meta, (layer,))
        assert (cfg.crop, cfg.width, cfg.res_scale, cfg.lr) == (
            T.auto_crop(strides, size), T.auto_width(strides), T.auto_res_scale(strides), T.DEFAULT_LR["espcn"])
        dcfg = T.decoder_config(cfg, meta)
        assert (dcfg.width, dcfg.base_width, dcfg.res_scale, dcfg.in_shapes) == (
            cfg.width, cfg.width // 8, cfg.res_scale, (tuple(meta.layers[layer]),))
    given = T.TrainConfig(cache=zarr_cache, layers=("layer1",), out=Path("r"), crop=16, width=24, lr=1e-3, arch="edsr",
                          res_scale=0.5)
    assert T.resolve(given, meta) == given  # what the user set stays


def test_too_few_validation_images_are_not_kept_out(zarr_cache):
    with open_cache(zarr_cache) as store:
        idx = T.train_indices(store, False)
        sources = len(set(store.ids()[i] for i in idx))
        assert sources * 0.05 < T.MIN_VALIDATION  # about one image: best.pt would be chosen by chance
        train, val = T.validation_split(store, idx, 0.05)
        assert len(val) == 0 and np.array_equal(train, idx)
        assert len(T.validation_split(store, idx, 0.3)[1]) >= 1


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_grad_clip_bounds_the_gradient_each_step_takes(clip):
    from featrecon.step import Step, StepSettings

    class OneLayer(torch.nn.Module):  # a decoder's interface: a list of feature maps in, an image out
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 3, 3, padding=1)

        def forward(self, feats):
            return self.conv(feats[0])

    torch.manual_seed(0)
    model = OneLayer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    cfg = T.TrainConfig(cache=Path("unused"), layers=("layer1",), out=Path("unused"), grad_clip=clip)
    step = Step(model, opt, sched, cfg, torch.device("cpu"),
                StepSettings(autocast=False, channels_last=False, compile=False, fused_adamw=False))
    step([torch.randn(2, 4, 8, 8) * 10], torch.rand(2, 3, 8, 8))
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert (norm <= clip * (1 + 1e-5)) if clip else (norm > 1e-2)
