"""Decoder recipes compared on one protocol: the same cache, the same wall-clock budget per
variant and layer, holdout PSNR/SSIM from `score`.

    python -m benchmarks.quality --cache CACHE --layers layer1,layer3 --minutes 10 --out benchmarks/quality

Each variant's epoch is costed first (a few steps on its own decoder and one validation
pass), and its epochs are set so that training fills the budget; the epochs actually run and their
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

from featrecon.cache.factory import open_cache
from featrecon.cache.loader import CacheLoader, fits_in_memory
from featrecon.device import resolve_device
from featrecon.errors import FeatreconError
from featrecon.evaluate.config import ScoreConfig
from featrecon.evaluate.scoring import score
from featrecon.train.config import TrainConfig, layer_strides, resolve
from featrecon.train.decoders import Decoder
from featrecon.train.loop import decoder_config, feature_encoder, fit, train_one_epoch
from featrecon.train.samples import evaluation_indices, train_indices, validation_split
from featrecon.train.step import Schedule, Step, step_settings
from featrecon.train.validate import evaluate

log = logging.getLogger("benchmarks.quality")

VARIANTS = {  # changes from the defaults; every variant standardises its inputs unless it says otherwise
    "the defaults": dict(),
    "res_scale 0.1 (EDSR's)": dict(res_scale=0.1),
    "width 128, crop 112 (layer1: a 64-channel body)": dict(width=128, crop=112),
    "batch 16": dict(batch_size=16),
    "batch 16, lr 1e-3": dict(batch_size=16, lr=1e-3),
    "lr 1e-3": dict(lr=1e-3),
    "depth 2": dict(depth=2),
    "l1 loss": dict(loss="l1"),
    "mse+ssim loss": dict(loss="mse+ssim"),
    "whole images": dict(crop=0),
    "upconv, crop 112": dict(arch="upconv", crop=112, width=128),
    "edsr, crop 112, res_scale 0.1": dict(arch="edsr", crop=112, width=128, res_scale=0.1),
    "first release: upconv, whole images, raw inputs, batch 16": dict(arch="upconv", crop=0, width=128, input_norm=False,
                                                                      batch_size=16),
    "first espcn defaults: res_scale 0.1, width 128, crop 112, batch 16": dict(res_scale=0.1, width=128, crop=112,
                                                                               batch_size=16),
    "crop 64, width 256": dict(crop=64, width=256),
    "lr 1e-3, grad clip 0.5": dict(lr=1e-3, grad_clip=0.5),
    "grad clip 0.5": dict(grad_clip=0.5),
    "mse+feat loss (feature weight 0.1)": dict(loss="mse+feat"),
    "no grad clip (stem and layer1's default until 2026-12-02)": dict(grad_clip=0.0),
    "bf16 autocast": dict(precision="bf16"),
}


def epoch_cost(cfg: TrainConfig, batches: int = 48) -> tuple[float, float, int]:
    """(training samples/s, seconds of one validation pass, samples trained on per epoch) of cfg's decoder
    as fit runs them: the
    loader, windows and step on `batches` of the cache's training samples (one pass to warm up, one
    timed), then `evaluate` on the validation images. (A step on random tensors alone ran ~15% faster
    than the real epochs, and a validation pass costed as a third of a step per window left out its
    SSIM: the budgets overran by as much.)"""
    with open_cache(cfg.cache) as store:
        meta = store.meta
        trained, val = validation_split(store, train_indices(store, False), cfg.val_fraction)
    idx = trained[: batches * cfg.batch_size]
    val = evaluation_indices(val, cfg.eval_samples, cfg.seed)
    cfg = replace(resolve(cfg, meta), progress=False)
    device = resolve_device(cfg.device)
    torch.manual_seed(0)
    model = Decoder(decoder_config(cfg, meta)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    settings = step_settings(cfg, device)
    step = Step(model, opt, Schedule(cfg.lr, total=1, warmup=0), cfg, device, settings,
                encoder=feature_encoder(cfg, meta, settings, device))  # mse+feat's backbone, as fit builds it
    # Read as fit will read the whole train split: from RAM when it fits, else streamed (a K = 16 views
    # cache costed in RAM and streamed in training overran its budget by 18%).
    in_memory = {"yes": True, "no": False}.get(cfg.in_memory, fits_in_memory(meta, cfg.layers, len(trained)))
    loader = CacheLoader(cfg.cache, cfg.layers, idx, cfg.batch_size, shuffle=True, seed=0, in_memory=in_memory,
                         reuse_buffers=True)
    val_loader = CacheLoader(cfg.cache, cfg.layers, val, cfg.batch_size, shuffle=False, in_memory=True)
    try:
        strides = layer_strides(meta, cfg.layers)
        train_one_epoch(step, loader, 0, cfg, device, strides)
        rate = train_one_epoch(step, loader, 1, cfg, device, strides)["samples_per_s"]
        if not len(val):
            return rate, 0.0, len(trained)
        # the first pass also loads the images into RAM
        evaluate(model, val_loader, device, exact=False, autocast=settings.autocast)
        t0 = time.perf_counter()
        evaluate(model, val_loader, device, exact=False, autocast=settings.autocast)
        return rate, time.perf_counter() - t0, len(trained)
    finally:
        loader.close()
        val_loader.close()


def run_variant(cache: Path, layer: str, name: str, settings: dict, minutes: float, out: Path,
                epochs: int | None = None) -> dict:
    """Train one variant for `minutes` (epochs estimated from its epoch cost), or for `epochs`."""
    cfg = TrainConfig(cache=cache, layers=tuple(layer.split("+")), out=out, progress=False, **settings)
    with open_cache(cache) as store:
        cfg = resolve(cfg, store.meta)  # as fit resolves it
    rate, val_seconds, n_trained = epoch_cost(cfg)
    per_epoch = n_trained / rate + val_seconds
    epochs = epochs or max(1, math.floor(minutes * 60 / per_epoch))
    cfg = replace(cfg, epochs=epochs)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    stopped = ""
    try:
        fit(cfg)
    except FeatreconError as e:  # the guard gave up: the row says so, with the last good checkpoint scored
        stopped = str(e)
        log.warning("%s / %s: %s", layer, name, stopped)
    seconds = time.perf_counter() - t0
    guard = torch.load(out / "last.pt", weights_only=False).get("guard", {})
    log.info("%s / %s: %d epochs in %.0f s (budget %.0f s), %d rollbacks", layer, name, epochs, seconds, minutes * 60,
             len(guard.get("rollbacks", [])))
    return {"layer": layer, "variant": name, "settings": settings, "epochs": epochs, "train_seconds": seconds,
            "step_rate": rate, "validation_seconds": val_seconds, "rollbacks": guard.get("rollbacks", []),
            "stopped": stopped}


def _fidelity(row: dict) -> str:
    if row.get("rel_l2") is None:
        return "-"
    return f"{row['rel_l2']:.3f} / {row['cosine']:.4f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--layers", default="layer1,layer3", help="comma list; layer2+layer3 fuses")
    p.add_argument("--variants", help=f"comma list of indices into: {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--minutes", type=float, default=10.0, help="training budget per variant and layer")
    p.add_argument("--epochs", type=int, help="train every variant this many epochs instead of a time budget "
                   "(for variants of the same step cost: the budget's estimate varies by ~30%% on a noisy CPU)")
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
            row = run_variant(args.cache, layer, name, VARIANTS[name], args.minutes, folder, args.epochs)
            rep = score(ScoreConfig(cache=args.cache, runs=folder, out=args.out / "scratch", progress=False, save=0))
            r = rep["runs"][0]
            layer_fid = row["layer"].split("+")[-1]  # the deepest decoded layer: the feature-fidelity column
            row |= {"psnr": r["psnr"]["mean"], "ssim": r["ssim"]["mean"], "n": r["n"],
                    "rel_l2": r.get(f"rel_l2/{layer_fid}", {}).get("mean"),
                    "cosine": r.get(f"cosine/{layer_fid}", {}).get("mean"),
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
    md = ["| layer | variant | epochs | train s | step samples/s | holdout PSNR (dB) | SSIM | mean image PSNR / SSIM "
          "| feature rel. L2 / cosine at the layer | blow-ups (rolled back at epoch) |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        jumps = ", ".join(str(b["epoch"]) for b in r["rollbacks"]) + (" (stopped)" if r["stopped"] else "")
        md.append(f"| {r['layer']} | {r['variant']} | {r['epochs']} | {r['train_seconds']:.0f} | {r['step_rate']:.1f} | "
                  f"{r['psnr']:.2f} | {r['ssim']:.3f} | {r['floor_psnr']:.2f} / {r['floor_ssim']:.3f} | "
                  f"{_fidelity(r)} | {jumps or 'none'} |")
    (args.out / "table.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
