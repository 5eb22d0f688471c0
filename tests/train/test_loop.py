"""train-decoder's loop: the loss goes down, resume equals uninterrupted, refusals, best.pt, early stop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from featrecon.cache import schema as S
from featrecon.cache.factory import open_cache
from featrecon.cache.loader import CacheLoader
from featrecon.errors import FeatreconError
from featrecon.train import loop, samples
from featrecon.train.checkpoint import decoder_from_checkpoint
from featrecon.train.config import TrainConfig
from featrecon.train.loop import _fit, fit, fit_each, train_one_epoch
from featrecon.train.samples import train_indices, validation_split
from featrecon.train.step import auto_precision, random_crop
from featrecon.train.validate import evaluate
from tests.helpers import build_cache


def tcfg(cache, out, **kw) -> TrainConfig:
    base = dict(layers=("layer1",), epochs=3, batch_size=4, width=32, lr=3e-3, progress=False, eval_samples=8)
    base.update(kw)
    return TrainConfig(cache=cache, out=out, **base)


def test_short_run_drives_the_loss_down_and_writes_outputs(small_cache, tmp_path):
    out = tmp_path / "run"
    fit(tcfg(small_cache, out, epochs=8))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 9))
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
    assert rows[-1]["psnr"] > rows[0]["psnr"]
    for name in ("last.pt", "best.pt", "config.json", "loss.png"):
        assert (out / name).is_file(), name
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert ckpt["layers"] == ["layer1"] and ckpt["epoch"] == 8
    from featrecon.train.checkpoint import decoder_from_checkpoint

    model = decoder_from_checkpoint(ckpt)  # the checkpoint alone rebuilds the decoder
    assert model([torch.zeros(1, 256, 16, 16)]).shape == (1, 3, 64, 64)


def test_resume_equals_uninterrupted_run(zarr_cache, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    fit(tcfg(zarr_cache, whole, epochs=4, layers=("layer2", "layer3")))
    cut = tmp_path / "cut"
    real = train_one_epoch

    def killed_at_epoch_3(model, loader, epoch, *a, **k):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(model, loader, epoch, *a, **k)

    monkeypatch.setattr(loop, "train_one_epoch", killed_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        fit(tcfg(zarr_cache, cut, epochs=4, layers=("layer2", "layer3")))
    monkeypatch.undo()
    assert torch.load(cut / "last.pt", weights_only=False)["epoch"] == 2
    fit(tcfg(zarr_cache, cut, epochs=4, layers=("layer2", "layer3"), resume=True))
    a = torch.load(whole / "last.pt", weights_only=False)
    b = torch.load(cut / "last.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    la = [json.loads(l)["loss"] for l in (whole / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (cut / "metrics.jsonl").read_text().splitlines()]
    assert la == lb


def test_auto_settings_are_recorded_resolved_and_a_run_resumes_with_what_it_recorded(zarr_cache, tmp_path,
                                                                                      monkeypatch):
    """--shuffle auto records global on a local cache, --grad-clip auto 0.5 for layer1 and --precision
    auto what this CPU runs fastest. A run trained under older defaults (window, no clipping, fp32)
    resumed with today's defaults keeps its own settings, so it still equals its uninterrupted run; a
    setting given explicitly must match."""
    fresh = tmp_path / "fresh"
    fit(tcfg(zarr_cache, fresh, epochs=1, eval_samples=4))
    recorded = json.loads((fresh / "config.json").read_text())
    assert (recorded["shuffle"], recorded["grad_clip"]) == ("global", 0.5)
    assert recorded["precision"] == auto_precision(torch.device("cpu"))  # resolved, never "auto"
    old_defaults = dict(shuffle="window", grad_clip=0.0, precision="fp32")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    fit(tcfg(zarr_cache, whole, epochs=3, **old_defaults))
    real = train_one_epoch

    def killed_at_epoch_2(model, loader, epoch, *a, **k):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(model, loader, epoch, *a, **k)

    monkeypatch.setattr(loop, "train_one_epoch", killed_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        fit(tcfg(zarr_cache, cut, epochs=3, **old_defaults))
    monkeypatch.undo()
    fit(tcfg(zarr_cache, cut, epochs=3, resume=True))  # today's defaults: auto
    recorded = json.loads((cut / "config.json").read_text())
    assert (recorded["shuffle"], recorded["grad_clip"], recorded["precision"]) == ("window", 0.0, "fp32")
    a, b = (torch.load(p / "last.pt", weights_only=False)["model"] for p in (whole, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FeatreconError, match="settings differ.*shuffle"):
        fit(tcfg(zarr_cache, cut, epochs=3, resume=True, shuffle="global"))
    with pytest.raises(FeatreconError, match="settings differ.*grad_clip"):
        fit(tcfg(zarr_cache, cut, epochs=3, resume=True, grad_clip=0.5))


def test_refusals(zarr_cache, photos24, tmp_path):
    with pytest.raises(FeatreconError, match="not in the cache; cached layers: stem, layer1"):
        fit(tcfg(zarr_cache, tmp_path / "a", layers=("layer1.0.conv1",)))
    fit(tcfg(zarr_cache, tmp_path / "b", epochs=1))
    with pytest.raises(FeatreconError, match="already holds a run.*--resume"):
        fit(tcfg(zarr_cache, tmp_path / "b", epochs=1))
    with pytest.raises(FeatreconError, match="settings differ.*lr"):
        fit(tcfg(zarr_cache, tmp_path / "b", epochs=1, lr=1e-4, resume=True))
    with pytest.raises(FeatreconError, match=r"settings differ.*\(grad_clip\)"):
        fit(tcfg(zarr_cache, tmp_path / "b", epochs=1, grad_clip=1.0, resume=True))
    # A run written before --grad-clip existed has no such key: it trained without clipping, and resumes.
    ckpt = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    del ckpt["train_config"]["grad_clip"]
    torch.save(ckpt, tmp_path / "b" / "last.pt")
    assert fit(tcfg(zarr_cache, tmp_path / "b", epochs=1, resume=True))["epoch"] == 1
    other = build_cache(tmp_path / "other.zarr", photos24, weights="random:1", layers="layer1", holdout_fraction=0.25)
    with pytest.raises(FeatreconError, match="fingerprint"):
        fit(tcfg(other, tmp_path / "b", epochs=1, resume=True))
    # An unfinished cache: mark one shard pending again.
    import zarr

    zarr.open_group(str(other), mode="r+")[S.STATUS][0:4] = S.STATUS_PENDING
    with pytest.raises(FeatreconError, match=r"unfinished, 20 of 24 samples done.*--allow-partial"):
        fit(tcfg(other, tmp_path / "c", epochs=1))
    fit(tcfg(other, tmp_path / "c", epochs=1, allow_partial=True))
    tiny = build_cache(tmp_path / "tiny.zarr", photos24, layers="layer1", limit=1, holdout_fraction=0.99)
    with pytest.raises(FeatreconError, match="train split has no done samples"):
        fit(tcfg(tiny, tmp_path / "d", epochs=1))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(zarr_cache, tmp_path, monkeypatch):
    from featrecon.train import step as step_module

    real = step_module.compute_loss
    calls = {"n": 0}

    def poisoned(pred, target, cfg, *rest):
        calls["n"] += 1
        loss = real(pred, target, cfg, *rest)
        return loss * float("nan") if calls["n"] > 5 else loss  # epoch 1 has 5 steps

    monkeypatch.setattr(step_module, "compute_loss", poisoned)
    with pytest.raises(FeatreconError, match="loss blew up at epoch 2 .*loss nan.*after 3 rollbacks.*last good checkpoint"):
        fit(tcfg(zarr_cache, tmp_path / "r", epochs=3))
    ckpt = torch.load(tmp_path / "r" / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_layer_each_trains_every_cached_layer_and_a_rerun_resumes_the_rest(tmp_path, photo_dir, monkeypatch):
    cache = build_cache(tmp_path / "c.zarr", photo_dir, layers="layer3,layer4", holdout_fraction=0.3)
    runs = tmp_path / "runs"
    real = _fit
    calls = []

    def fails_on_layer4(cfg, group):
        calls.append(cfg.layers)
        if cfg.layers == ("layer4",) and len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second layer
        return real(cfg, group)

    monkeypatch.setattr(loop, "_fit", fails_on_layer4)
    cfg = tcfg(cache, runs, layers=("each",), epochs=2)
    with pytest.raises(KeyboardInterrupt):
        fit_each(cfg)
    assert (runs / "layer3" / "last.pt").is_file() and not (runs / "layer4").exists()
    fit_each(cfg)  # the rerun: layer3 is done and skipped, layer4 trains
    assert calls == [("layer3",), ("layer4",), ("layer4",)]
    for layer in ("layer3", "layer4"):
        assert torch.load(runs / layer / "last.pt", weights_only=True)["epoch"] == 2


def test_best_is_chosen_on_validation_images_never_trained_on_and_early_stop(small_cache, tmp_path, monkeypatch):
    with open_cache(small_cache) as store:
        idx = train_indices(store, False)
        train, val = validation_split(store, idx, 0.2)
        holdout = np.flatnonzero(store.read_all(S.SPLIT) == S.SPLIT_HOLDOUT)
    assert len(val) >= 1 and not set(train) & set(val) and sorted([*train, *val]) == idx.tolist()
    assert not set(val) & set(holdout.tolist())
    loaders = []

    class Recording(CacheLoader):
        def __init__(self, path, layers, indices, *a, **k):
            loaders.append(np.asarray(indices).tolist())
            super().__init__(path, layers, indices, *a, **k)

    psnr = iter([5.0, 6.0, 4.0, 3.0, 2.0, 1.0])
    real_evaluate = evaluate

    def scripted(model, loader, device, **k):
        out = real_evaluate(model, loader, device, **k)
        return {**out, "psnr": np.full(len(out["psnr"]), next(psnr))}

    monkeypatch.setattr(samples, "CacheLoader", Recording)  # the input statistics' reader
    monkeypatch.setattr(loop, "CacheLoader", Recording)  # training's and validation's
    monkeypatch.setattr(loop, "evaluate", scripted)
    out = tmp_path / "run"
    fit(tcfg(small_cache, out, epochs=6, val_fraction=0.2, early_stop=2))
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
        (f,), t = random_crop([cells], pixels, 32, [16], np.random.default_rng(seed))
        assert f.shape[-2:] == (2, 2) and t.shape[-2:] == (32, 32)
        y, x = divmod(int(t[0, 0, 0, 0]), 64)
        assert y % 16 == 0 and x % 16 == 0 and int(f[0, 0, 0, 0]) == (y // 16) * 4 + x // 16  # the same window
    out = tmp_path / "run"
    fit(tcfg(zarr_cache, out, layers=("layer3",), epochs=2, crop=32))
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["psnr"] > 0  # scored on whole images
    with pytest.raises(FeatreconError, match="--crop 24: must be a multiple of 16"):
        fit(tcfg(zarr_cache, tmp_path / "bad", layers=("layer3",), crop=24))


def test_input_channels_are_standardised_by_the_training_features_statistics(zarr_cache, tmp_path):
    from featrecon.train.checkpoint import decoder_from_checkpoint, load_checkpoint

    fit(TrainConfig(cache=zarr_cache, layers=("layer3",), out=tmp_path / "r", epochs=1, width=16, arch="espcn",
                        progress=False))
    model = decoder_from_checkpoint(load_checkpoint(tmp_path / "r" / "last.pt"))
    with open_cache(zarr_cache) as store:  # fewer than 256 trained samples: the statistics are over all of them
        idx, _ = validation_split(store, train_indices(store, False), 0.05)
        x = np.stack([store.read("features/layer3", i, i + 1)[0] for i in idx]).astype(np.float64)
    mean, std = x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3))
    np.testing.assert_allclose(model.norm.mean.flatten().numpy(), mean, rtol=1e-4, atol=1e-5)
    floor = 1e-6 + 0.01 * std.mean()  # channels that never fire are not divided by zero
    np.testing.assert_allclose(model.norm.std.flatten().numpy(), np.maximum(std, floor), rtol=1e-4, atol=1e-5)
    feats = torch.from_numpy(x[:2]).float()
    assert model.norm(feats).mean().abs() < 0.5  # the decoder sees standardised inputs
    fit(TrainConfig(cache=zarr_cache, layers=("layer3",), out=tmp_path / "raw", epochs=1, width=16, arch="espcn",
                        progress=False, input_norm=False))
    raw = decoder_from_checkpoint(load_checkpoint(tmp_path / "raw" / "last.pt"))
    assert isinstance(raw.norm, torch.nn.Identity)


def test_the_feature_loss_trains_and_is_recorded(zarr_cache, tmp_path):
    out = tmp_path / "feat"
    fit(tcfg(zarr_cache, out, layers=("layer3",), epochs=2, loss="mse+feat"))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert ckpt["train_config"]["loss"] == "mse+feat" and ckpt["train_config"]["feat_weight"] == 0.1


def test_validation_under_autocast_measures_within_a_hundredth_of_a_db_of_fp32(zarr_cache, tmp_path):
    """The per-epoch validation runs the decoder's forward under the training's bf16 autocast; its
    PSNR and SSIM must stay those of the fp32 forward (score reports fp32)."""
    out = tmp_path / "run"
    fit(tcfg(zarr_cache, out, epochs=2, precision="fp32"))
    model = decoder_from_checkpoint(torch.load(out / "last.pt", weights_only=False))
    with open_cache(zarr_cache) as store:
        idx = train_indices(store, False)
    loader = CacheLoader(zarr_cache, ("layer1",), idx, 4, shuffle=False, in_memory=True)
    fp32, bf16 = (evaluate(model, loader, torch.device("cpu"), exact=False, autocast=a) for a in (False, True))
    assert np.array_equal(fp32["index"], bf16["index"])
    assert not np.array_equal(fp32["mse"], bf16["mse"])  # the forward did run in bf16
    assert abs(fp32["psnr"].mean() - bf16["psnr"].mean()) < 0.01
    assert np.abs(fp32["psnr"] - bf16["psnr"]).max() < 0.05 and np.abs(fp32["ssim"] - bf16["ssim"]).max() < 2e-3
