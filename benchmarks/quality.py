"""Decoder recipes compared on one protocol: the same cache, the same wall-clock budget per
variant and layer, holdout PSNR/SSIM from `score`.

    python -m benchmarks.quality --cache CACHE --layers layer1,layer3 --minutes 10 --out benchmarks/quality

Each variant's step rate is timed first (a few steps on its own decoder), and its
epochs are set so that training fills the budget; the epochs actually run and their
seconds are in the table. Writes `QUALITY.md`-style markdown, metrics.json and the
score report (grid.png) of the best variant per layer.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from featrecon.decoders import Decoder, DecoderConfig
from featrecon.evaluate import ScoreConfig, score
from featrecon.storage import open_cache
from featrecon.train import TrainConfig, auto_crop, fit, layer_strides, train_indices, validation_split

log = logging.getLogger("benchmarks.quality")

VARIANTS = {  # every variant standardises its input channels (input_norm) unless it says otherwise
    "espcn, mse, crop 112 (the defaults)": dict(),
    "upconv, mse, crop 112": dict(arch="upconv", crop=112),
    "edsr, mse, crop 112": dict(arch="edsr", crop=112),
    "espcn, l1": dict(loss="l1"),
    "espcn, mse+ssim": dict(loss="mse+ssim"),
    "espcn, whole images": dict(crop=0),
    "espcn, depth 2": dict(depth=2),
    "espcn, width 256": dict(width=256),
    "first release: upconv, whole images, raw inputs": dict(arch="upconv", crop=0, input_norm=False),
}


def step_rate(cfg: TrainConfig, steps: int = 3) -> float:
    """Training samples/s of cfg's decoder on random inputs of the cache's shapes (after a warm-up step)."""
    with open_cache(cfg.cache) as store:
        meta = store.meta
    dcfg = DecoderConfig(cfg.layers, tuple(tuple(meta.layers[l]) for l in cfg.layers), meta.image_shape[1:],
                         width=cfg.width, depth=cfg.depth, base_width=max(4, cfg.width // 8), arch=cfg.arch)
    torch.manual_seed(0)
    model = Decoder(dcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr or 5e-4)
    size = meta.image_shape[1]
    crop = cfg.crop if cfg.crop and cfg.crop < size else size  # the step's window, as training takes it
    feats = [torch.randn(cfg.batch_size, meta.layers[l][0], *(2 * [crop * meta.layers[l][1] // size]))
             for l in cfg.layers]
    target = torch.rand(cfg.batch_size, meta.image_shape[0], crop, crop)
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(feats), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * cfg.batch_size / (time.perf_counter() - t0)


def run_variant(cache: Path, layer: str, name: str, settings: dict, minutes: float, out: Path) -> dict:
    cfg = TrainConfig(cache=cache, layers=(layer,), out=out, progress=False, **settings)
    with open_cache(cache) as store:
        n_train = len(train_indices(store, False))
        if cfg.crop is None:  # as fit resolves it
            cfg = replace(cfg, crop=auto_crop(layer_strides(store.meta, (layer,)), store.meta.image_shape[1]))
    rate = step_rate(cfg)
    # Per epoch: the train split, plus the evaluation of the validation images: whole images, forward
    # only (~1/3 of a step), (size / crop)^2 windows' worth each.
    with open_cache(cache) as store:
        size = store.meta.image_shape[1]
        n_val = len(validation_split(store, train_indices(store, False), cfg.val_fraction)[1])
    windows = (size / cfg.crop) ** 2 if cfg.crop else 1.0
    per_epoch = (n_train - n_val + min(cfg.eval_samples, n_val) * windows / 3) / rate
    epochs = max(1, math.floor(minutes * 60 / per_epoch))
    cfg = replace(cfg, epochs=epochs)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    fit(cfg)
    seconds = time.perf_counter() - t0
    log.info("%s / %s: %d epochs in %.0f s (budget %.0f s)", layer, name, epochs, seconds, minutes * 60)
    return {"layer": layer, "variant": name, "settings": settings, "epochs": epochs, "train_seconds": seconds,
            "step_rate": rate}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--layers", default="layer1,layer3")
    p.add_argument("--variants", help=f"comma list of indices into: {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--minutes", type=float, default=10.0, help="training budget per variant and layer")
    p.add_argument("--out", type=Path, default=Path("benchmarks/quality"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    names = list(VARIANTS)
    if args.variants:
        names = [names[int(i)] for i in args.variants.split(",")]
    runs = args.out / "runs"
    rows = []
    for layer in [l.strip() for l in args.layers.split(",")]:
        for name in names:
            folder = runs / layer / f"v{list(VARIANTS).index(name)}"
            row = run_variant(args.cache, layer, name, VARIANTS[name], args.minutes, folder)
            rep = score(ScoreConfig(cache=args.cache, runs=folder, out=args.out / "scratch", progress=False, save=0))
            r = rep["runs"][0]
            row |= {"psnr": r["psnr"]["mean"], "ssim": r["ssim"]["mean"], "n": r["n"],
                    "floor_psnr": rep["baseline"]["psnr"]["mean"], "floor_ssim": rep["baseline"]["ssim"]["mean"]}
            rows.append(row)
            (args.out / "metrics.json").write_text(json.dumps(rows, indent=2) + "\n")
    best = {}
    for row in rows:
        if row["psnr"] > best.get(row["layer"], {"psnr": -np.inf})["psnr"]:
            best[row["layer"]] = row
    for layer, row in best.items():  # the winners side by side, with their pictures
        link = args.out / "best" / layer
        shutil.rmtree(link, ignore_errors=True)
        shutil.copytree(runs / layer / f"v{list(VARIANTS).index(row['variant'])}", link)
    score(ScoreConfig(cache=args.cache, runs=args.out / "best", out=args.out / "report", progress=False, save=6))
    shutil.rmtree(args.out / "scratch", ignore_errors=True)
    md = ["| layer | variant | epochs | train s | step samples/s | holdout PSNR (dB) | SSIM | mean image PSNR / SSIM |",
          "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['layer']} | {r['variant']} | {r['epochs']} | {r['train_seconds']:.0f} | {r['step_rate']:.1f} | "
                  f"{r['psnr']:.2f} | {r['ssim']:.3f} | {r['floor_psnr']:.2f} / {r['floor_ssim']:.3f} |")
    (args.out / "table.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
