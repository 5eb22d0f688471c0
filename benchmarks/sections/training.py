"""Section 4: the decoder's training step fed by the cache, against its compute limit and
against re-running the backbone on JPEGs.

The step is train-decoder's own (`featrecon.train.Step`, with the device's default
precision, layout and compile settings), the decoder train-decoder builds by default for
layer3, the same batch size. Three feeds:
- one batch of random tensors already on the device: the step's compute limit;
- the cache, streamed by `CacheLoader` (pinned and copied ahead on CUDA);
- JPEG decode (DataLoader workers) + the backbone to layer3, as training without a cache runs.
On a shared CPU the same loop varies by 10-15% from minute to minute, so the limit and
the cache-fed loop run in rounds, in A-B then B-A order, and the median round's ratio
is reported beside every round's.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from featrecon.cache.factory import open_cache
from featrecon.cache.loader import CacheLoader
from featrecon.extract.backbone import FeatureExtractor, load_backbone, preprocessing_for, resolve_layers
from featrecon.extract.images import ImageDataset, collate_images
from featrecon.train.config import TrainConfig, layer_strides, resolve
from featrecon.train.decoders import Decoder
from featrecon.train.loop import decoder_config
from featrecon.train.step import Schedule, Step, device_batches, random_crop, step_settings

from ..common import log, sync


def _train_setup(cache: Path, device, batch: int, steps: int):
    with open_cache(cache) as store:
        meta = store.meta
    cfg = resolve(TrainConfig(cache=cache, layers=("layer3",), out=Path("."), batch_size=batch, progress=False), meta)
    dcfg = decoder_config(cfg, meta)
    settings = step_settings(cfg, device)

    def new_step() -> Step:
        torch.manual_seed(0)
        model = Decoder(dcfg).to(device)
        if settings.channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, **({"fused": True} if settings.fused_adamw else {}))
        return Step(model, opt, Schedule(cfg.lr, 10 * steps, cfg.warmup), cfg, device, settings)

    return meta, settings, new_step, cfg


def _timed(step: Step, feed, steps: int, device, warmup: int = 1) -> dict:
    """samples/s and the share of time spent waiting for `feed` over `steps` steps after warm-up."""
    wait, n = 0.0, 0
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t_start, wait, n = time.perf_counter(), 0.0, 0
        t0 = time.perf_counter()
        feats, target = next(feed)
        wait += time.perf_counter() - t0
        step(feats, target).item()  # .item(): the step is done, as train_one_epoch's loss bookkeeping waits too
        n += len(target)
    sync(device)
    total = time.perf_counter() - t_start
    return {"samples_s": n / total, "data_wait_fraction": wait / total}


def _forever(make_epoch):
    e = 0
    while True:
        yield from make_epoch(e)
        e += 1


def bench_training(cache: Path, files_root: Path, ids: list[str], args, device, steps: int, rounds: int) -> dict:
    batch = args.train_batch
    meta, settings, new_step, cfg = _train_setup(cache, device, batch, steps)
    arch, strides = cfg.arch, layer_strides(meta, cfg.layers)
    loader = CacheLoader(cache, ("layer3",), np.arange(meta.n), batch, shuffle=True, in_memory=False,
                         pin_memory=device.type == "cuda", reuse_buffers=True, mode="auto")
    window = None
    if cfg.crop:  # train-decoder's windows (--crop auto), one per step as train_one_epoch cuts them
        def window(i, feats, images):
            return random_crop(feats, images, cfg.crop, strides, np.random.default_rng([0, i]))
    cache_feed = ((f, t) for _, f, t in device_batches(_forever(loader.epoch), device, settings.channels_last, window))
    fmt = torch.channels_last if settings.channels_last else torch.contiguous_format
    side = cfg.crop or meta.image_shape[1]
    cells = side // strides[0]
    fixed = ([torch.randn(batch, meta.layers["layer3"][0], cells, cells, device=device).contiguous(memory_format=fmt)],
             torch.rand(batch, 3, side, side, device=device))
    limit_feed = iter(lambda: fixed, None)
    per_round = []
    for r in range(rounds):  # alternating, limit first in even rounds and last in odd ones, so drift cancels
        if r % 2 == 0:
            limit = _timed(new_step(), limit_feed, steps, device)
            cached = _timed(new_step(), cache_feed, steps, device)
        else:
            cached = _timed(new_step(), cache_feed, steps, device)
            limit = _timed(new_step(), limit_feed, steps, device)
        per_round.append({"limit": limit, "cache": cached, "ratio": cached["samples_s"] / limit["samples_s"]})
        log.info("training round %d: cache %.1f samples/s (wait %.1f%%), random tensors on the device %.1f: %.2f",
                 r + 1, cached["samples_s"], 100 * cached["data_wait_fraction"], limit["samples_s"],
                 per_round[-1]["ratio"])
    loader.close()
    ranked = sorted(per_round, key=lambda x: x["ratio"])
    median = ranked[len(ranked) // 2]  # the round shown; with an even count, the ratio is the middle two's mean
    median_ratio = statistics.median(x["ratio"] for x in per_round)

    model, weights = load_backbone("resnet50", args.weights)
    pre = preprocessing_for(weights, args.size)
    fx = FeatureExtractor(model, resolve_layers("layer3", model), pre, autocast=args.autocast).to(device)
    dl = torch.utils.data.DataLoader(ImageDataset(files_root, ids, list(range(len(ids))), pre), batch_size=batch,
                                     shuffle=True, num_workers=args.workers, collate_fn=collate_images, drop_last=True,
                                     pin_memory=device.type == "cuda")

    def jpeg_epoch(_):
        for i, (_, imgs, _) in enumerate(dl):
            imgs = imgs.to(device, non_blocking=True)
            with torch.no_grad():
                feats = [fx(imgs)["layer3"].float().contiguous(memory_format=fmt)]
            target = imgs.float() / 255
            yield window(i, feats, target) if window else (feats, target)

    jpeg = _timed(new_step(), _forever(jpeg_epoch), steps, device)
    res = {"limit": median["limit"], "from_cache": median["cache"], "from_images": jpeg, "rounds": per_round,
           "ratio_to_limit": median_ratio, "speedup": median["cache"]["samples_s"] / jpeg["samples_s"],
           "settings": {k: bool(v) for k, v in vars(settings).items()}, "batch": batch, "steps": steps, "arch": arch,
           "crop": cfg.crop, "width": cfg.width, "shuffle": loader.describe()}
    log.info("training: cache %.2f of the compute limit (median of %d rounds), %.1fx JPEG + backbone (%.1f samples/s)",
             median_ratio, rounds, res["speedup"], jpeg["samples_s"])
    return res


def markdown(t: dict) -> list[str]:
    words = {"autocast": "bf16 autocast", "fused_adamw": "fused AdamW"}
    s = ", ".join(words.get(k, k) for k, v in t["settings"].items() if v) or "fp32, eager"
    return ["## 4. layer3 decoder training: fed by the cache, by random tensors on the device, by JPEGs\n",
            f"train-decoder's own step ({s}), its default decoder (`{t.get('arch', 'upconv')}`, width "
            f"{t.get('width', '?')}) for layer3 on its default windows ({t.get('crop') or 'whole images'} px), batch "
            f"{t['batch']}, the loader's {t.get('shuffle', 'windowed shuffle')}, {t['steps']} steps after one "
            f"warm-up step per run; the limit and the cache-fed loop alternate over {len(t['rounds'])} rounds (A-B, "
            "then B-A) and the median round is shown. Targets: cache ≥ 0.95 of the limit on a CPU; on a GPU ≥ 3x JPEG + "
            "backbone with data wait < 5%. On a shared 2-core machine a round's ratio moves by ±10-15% whatever "
            "feeds the step (the same four in-memory batches against random tensors, no loader involved, gave "
            "0.81 to 1.11 in one sitting); the time spent waiting for data is the direct measure of what the "
            "loader costs the step.\n",
            "| fed by | samples/s | time waiting for data |", "|---|---:|---:|",
            f"| random tensors on the device (compute limit) | {t['limit']['samples_s']:.1f} | "
            f"{t['limit']['data_wait_fraction']:.1%} |",
            f"| cache | {t['from_cache']['samples_s']:.1f} | {t['from_cache']['data_wait_fraction']:.1%} |",
            f"| JPEG decode + backbone | {t['from_images']['samples_s']:.1f} | "
            f"{t['from_images']['data_wait_fraction']:.1%} |",
            "", f"Cache / compute limit: **{t['ratio_to_limit']:.2f}** (rounds: "
            + ", ".join(f"{x['ratio']:.2f}" for x in t["rounds"])
            + f"). Cache / JPEG + backbone: **{t['speedup']:.2f}x**.\n"]
