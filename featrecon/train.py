"""Stage 2: train a decoder from the cache alone (no backbone, no image decoding).

`fit` reads shapes, preprocessing and fingerprint from the cache, trains on the
train split only, and after every epoch writes `last.pt` (and `best.pt` when the
PSNR on a fixed train subset improves) atomically, then appends a line to
`metrics.jsonl`. `--resume` continues from `last.pt`; on a CPU the result is
bit-for-bit the uninterrupted run, because all randomness comes from (seed,
epoch).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import FeatreconError, __version__
from . import schema as S
from .backbone import resolve_device
from .checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, atomic_save, load_checkpoint, write_json
from .decoders import Decoder, DecoderConfig, count_parameters
from .evaluate import evaluate
from .loader import Batch, CacheLoader
from .metrics import ssim
from .storage import CacheStore, open_cache

log = logging.getLogger(__name__)
LOSSES = ("mse", "l1", "mse+ssim")
# Settings that may change between a run and its --resume without changing the result.
RESUMABLE_CHANGES = {"resume", "progress", "device", "prefetch", "in_memory", "allow_partial", "cache"}


@dataclass(frozen=True)
class TrainConfig:
    cache: Path  # feature cache written by extract-features
    layers: tuple[str, ...]  # cached layer(s) to decode from; several are fused
    out: Path  # run folder
    epochs: int = 30  # passes over the train split
    batch_size: int = 16  # samples per step
    lr: float = 2e-3  # peak AdamW learning rate
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    warmup: float = 0.05  # share of all steps with a linear warm-up, then cosine to zero
    width: int = 128  # widest decoder stage; full resolution gets width // 8
    depth: int = 1  # residual blocks per stage
    loss: str = "mse"  # mse, l1, or mse+ssim: MSE + ssim_weight * (1 - SSIM)
    ssim_weight: float = 0.1  # weight of the SSIM term in mse+ssim
    seed: int = 0  # decoder init and data order
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    amp: bool = False  # bf16 autocast on CUDA
    in_memory: str = "auto"  # auto/yes/no: hold the train arrays in RAM
    prefetch: int = 4  # shards read ahead by background threads
    eval_samples: int = 64  # fixed train subset for the per-epoch PSNR
    resume: bool = False  # continue from out/last.pt
    allow_partial: bool = False  # train on the done samples of an unfinished cache
    progress: bool = True  # tqdm bar

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))


class Diverged(Exception):
    pass


def train_indices(store: CacheStore, allow_partial: bool) -> np.ndarray:
    """Done samples of the train split; refuses an unfinished cache unless allowed."""
    status, split = store.status(), store.read_all(S.SPLIT)
    pending = int((status == S.STATUS_PENDING).sum())
    done = int((status == S.STATUS_DONE).sum())
    if pending and not allow_partial:
        raise FeatreconError(
            f"--cache {store.path}: unfinished, {done} of {store.meta.n} samples done; rerun the same "
            "extract-features command to finish it, or pass --allow-partial to train on the done ones")
    idx = np.flatnonzero((status == S.STATUS_DONE) & (split == S.SPLIT_TRAIN))
    if len(idx) == 0:
        raise FeatreconError(f"--cache {store.path}: the train split has no done samples; nothing to train on")
    return idx


def lr_lambda(total_steps: int, warmup: float):
    warm = max(1, int(round(total_steps * warmup)))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def compute_loss(pred: torch.Tensor, target: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    if cfg.loss == "l1":
        return F.l1_loss(pred, target)
    loss = F.mse_loss(pred, target)
    if cfg.loss == "mse+ssim":
        loss = loss + cfg.ssim_weight * (1 - ssim(pred, target).mean())
    return loss


def to_device(batch: Batch, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """fp16 features -> fp32 and uint8 images -> [0, 1] floats, on the device."""
    feats = [f.to(device, non_blocking=True).float() for f in batch.features]
    target = batch.images.to(device, non_blocking=True).float() / 255
    return feats, target


def train_one_epoch(model, loader: CacheLoader, epoch: int, opt, sched, cfg: TrainConfig, device) -> dict:
    model.train()
    total, n, wait = 0.0, 0, 0.0
    t0 = time.perf_counter()
    bar = tqdm(total=len(loader.indices), unit="sample", desc=f"epoch {epoch + 1}/{cfg.epochs}",
               disable=not cfg.progress, leave=False)
    batches = loader.epoch(epoch)
    while True:
        tw = time.perf_counter()
        batch = next(batches, None)
        wait += time.perf_counter() - tw
        if batch is None:
            break
        feats, target = to_device(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
            pred = model(feats)
        loss = compute_loss(pred.float(), target, cfg)
        if not torch.isfinite(loss):
            raise Diverged(f"loss became {loss.item()} at epoch {epoch + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item() * len(target)
        n += len(target)
        bar.update(len(target))
        bar.set_postfix(loss=f"{total / n:.4f}")
    bar.close()
    seconds = time.perf_counter() - t0
    return {"loss": total / n, "samples_per_s": n / seconds, "seconds": seconds, "data_wait": wait / seconds}


def _check_run_folder(cfg: TrainConfig, fp: str) -> dict | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to mix runs."""
    last = cfg.out / "last.pt"
    existing = [p.name for p in (cfg.out / "last.pt", cfg.out / "best.pt") if p.exists()]
    if not cfg.resume:
        if existing:
            raise FeatreconError(f"--out {cfg.out} already holds a run ({', '.join(existing)}); pass --resume to "
                                 "continue it, or choose another --out")
        return None
    if not last.exists():
        log.info("--resume: no %s yet, starting fresh", last)
        return None
    ckpt = load_checkpoint(last)
    if ckpt["fingerprint"] != fp:
        raise FeatreconError(f"--resume: {last} was trained on features with fingerprint {ckpt['fingerprint']}, "
                             f"this cache gives {fp} (other weights, preprocessing or layer shapes)")
    old, new = ckpt["train_config"], cfg.to_dict()
    diffs = [k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k]]
    if diffs:
        raise FeatreconError(f"--resume: settings differ from the run in {cfg.out} ({', '.join(diffs)}); "
                             "use the same settings, or another --out")
    return ckpt


def _checkpoint(model, opt, sched, cfg, dcfg, fp, store, epoch, best, history) -> dict:
    return {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "tool_version": __version__,
        "decoder_config": asdict(dcfg), "train_config": cfg.to_dict(), "layers": list(cfg.layers),
        "fingerprint": fp, "cache_meta": {"weights": store.meta.weights,
                                          "weights_fingerprint": store.meta.weights_fingerprint,
                                          "preprocessing": asdict(store.meta.preprocessing),
                                          "layers": {l: store.meta.layers[l] for l in cfg.layers},
                                          "cache": str(cfg.cache)},
        "epoch": epoch, "best_psnr": best, "history": history, "n_parameters": count_parameters(model),
        "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
    }


def fit(cfg: TrainConfig) -> dict:
    """Train (or resume) a decoder; returns the last epoch's metrics."""
    if cfg.loss not in LOSSES:
        raise FeatreconError(f"--loss {cfg.loss!r}: choose one of {', '.join(LOSSES)}")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise FeatreconError("--epochs and --batch-size must be at least 1")
    device = resolve_device(cfg.device)
    store = open_cache(cfg.cache)
    fp = S.feature_fingerprint(store.meta, list(cfg.layers))  # also checks the layers are cached
    layers = tuple(sorted(cfg.layers, key=list(store.meta.layers).index))
    cfg = TrainConfig(**{**asdict(cfg), "layers": layers})
    idx = train_indices(store, cfg.allow_partial)
    dcfg = DecoderConfig(layers=layers, in_shapes=tuple(tuple(store.meta.layers[l]) for l in layers),
                         out_size=store.meta.image_shape[1:], width=cfg.width, depth=cfg.depth,
                         base_width=max(4, cfg.width // 8))
    cfg.out.mkdir(parents=True, exist_ok=True)
    resume_from = _check_run_folder(cfg, fp)

    torch.manual_seed(cfg.seed)
    model = Decoder(dcfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = CacheLoader(cfg.cache, layers, idx, cfg.batch_size, shuffle=True, seed=cfg.seed, prefetch=cfg.prefetch,
                         in_memory={"auto": "auto", "yes": True, "no": False}[cfg.in_memory],
                         pin_memory=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.epochs * len(loader), cfg.warmup))
    eval_idx = np.sort(np.random.default_rng(cfg.seed).choice(idx, min(cfg.eval_samples, len(idx)), replace=False))
    eval_loader = CacheLoader(cfg.cache, layers, eval_idx, cfg.batch_size, shuffle=False, in_memory=True)
    start, best, history = 0, -math.inf, []
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        opt.load_state_dict(resume_from["optimizer"])
        sched.load_state_dict(resume_from["scheduler"])
        start, best, history = resume_from["epoch"], resume_from["best_psnr"], resume_from["history"]
        log.info("resuming %s after epoch %d of %d", cfg.out, start, cfg.epochs)
    write_json({**cfg.to_dict(), "decoder": asdict(dcfg), "fingerprint": fp, "n_train": len(idx)}, cfg.out / "config.json")
    _rewrite_metrics(cfg.out / "metrics.jsonl", history)
    log.info("decoder %s: %s parameters; %d train samples (in memory: %s), device %s",
             "+".join(layers), f"{count_parameters(model):,}", len(idx), loader.in_memory, device)
    try:
        for epoch in range(start, cfg.epochs):
            stats = train_one_epoch(model, loader, epoch, opt, sched, cfg, device)
            ev = evaluate(model, eval_loader, device)
            row = {"epoch": epoch + 1, "loss": stats["loss"], "psnr": float(np.mean(ev["psnr"])),
                   "ssim": float(np.mean(ev["ssim"])), "lr": sched.get_last_lr()[0],
                   "samples_per_s": stats["samples_per_s"], "data_wait": stats["data_wait"], "seconds": stats["seconds"]}
            history.append(row)
            improved = row["psnr"] > best
            best = max(best, row["psnr"])
            ckpt = _checkpoint(model, opt, sched, cfg, dcfg, fp, store, epoch + 1, best, history)
            atomic_save(ckpt, cfg.out / "last.pt")
            if improved:
                atomic_save(ckpt, cfg.out / "best.pt")
            with open(cfg.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            log.info("epoch %d/%d  loss %.5f  train-subset PSNR %.2f dB  SSIM %.3f  %.1f samples/s  lr %.2e",
                     epoch + 1, cfg.epochs, row["loss"], row["psnr"], row["ssim"], row["samples_per_s"], row["lr"])
    except Diverged as e:
        raise FeatreconError(f"{e}; stopped, last good checkpoint kept in {cfg.out} (try a lower --lr)") from None
    finally:
        loader.close()
        eval_loader.close()
        store.close()
    from .figures import plot_training

    plot_training(history, cfg.out / "loss.png", title=f"decoder from {'+'.join(layers)}")
    return history[-1] if history else {}


def _rewrite_metrics(path: Path, history: list[dict]) -> None:
    """metrics.jsonl holds exactly the epochs of the checkpoint resumed from."""
    from .checkpoint import atomic_write_text

    atomic_write_text("".join(json.dumps(r) + "\n" for r in history), path)
