"""Stage 2: train a decoder from the cache alone (no backbone, no image decoding).

`fit` reads shapes, preprocessing and fingerprint from the cache, trains on the
train split only, and after every epoch writes `last.pt` (and `best.pt` when the
PSNR on validation images improves: a fixed part of the train split, by source id, never
trained on and never the holdout) atomically, then appends a line to
`metrics.jsonl`. `--resume` continues from `last.pt`; on a CPU the result is
bit-for-bit the uninterrupted run, because all randomness comes from (seed,
epoch).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import FeatreconError, __version__
from . import schema as S
from .backbone import resolve_device
from .checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, atomic_save, best_checkpoint, best_is_current,
                         load_checkpoint, write_json)
from .decoders import ARCHS, Decoder, DecoderConfig, count_parameters
from .distributed import Group, join, leave
from .evaluate import evaluate
from .loader import CacheLoader
# The step lives in `step`; its names are re-exported here, where callers of the stage look for them.
from .step import (COMPILE_CHOICES, PRECISIONS, Diverged, Step, StepSettings, auto_crop, auto_width,  # noqa: F401
                   auto_res_scale, check_crop, compute_loss, device_batches, layer_strides, random_crop, step_settings,
                   to_device)
from .storage import CacheStore, open_cache

log = logging.getLogger(__name__)
LOSSES = ("mse", "l1", "mse+ssim")
# Peak learning rate per decoder. upconv normalises every stage (GroupNorm) and trains at
# 2e-3; edsr and espcn have no normalisation, and at 2e-3 Adam's first steps blew their
# outputs up or silenced every unit (stuck at the mean image); 5e-4 trained steadily.
# Fewer validation images than this choose best.pt by chance: on the README demo's one
# validation photo, epoch 1 of 30 "won" at 18.5 dB against 18.1, while the holdout gained 3.7 dB
# after it.
MIN_VALIDATION = 2
DEFAULT_LR = {"upconv": 2e-3, "edsr": 5e-4, "espcn": 5e-4}
# Settings that may change between a run and its --resume without changing the result.
RESUMABLE_CHANGES = {"resume", "progress", "device", "prefetch", "read_threads", "in_memory", "allow_partial", "cache",
                     "compile", "skip_corrupt"}


@dataclass(frozen=True)
class TrainConfig:
    cache: Path  # feature cache written by extract-features
    layers: tuple[str, ...]  # cached layer(s) to decode from; several are fused
    out: Path  # run folder
    epochs: int = 30  # passes over the train split
    batch_size: int = 8  # samples per step and rank
    lr: float | None = None  # peak AdamW learning rate; None: the arch's own (DEFAULT_LR)
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    warmup: float = 0.05  # share of all steps with a linear warm-up, then cosine to zero
    grad_clip: float = 0.0  # clip the gradient's global norm to this before each step; 0: no clipping
    width: int | None = None  # widest decoder stage, full resolution gets width // 8; None: auto (auto_width)
    depth: int = 1  # residual blocks per stage
    res_scale: float | None = None  # edsr, espcn: residual branch scale before its skip; None: auto (auto_res_scale)
    arch: str = "espcn"  # decoder: espcn, edsr or upconv (see decoders; benchmarks/QUALITY.md ranks them)
    input_norm: bool = True  # standardise each input channel by the training features' mean and std
    loss: str = "mse"  # mse, l1, or mse+ssim: MSE + ssim_weight * (1 - SSIM)
    ssim_weight: float = 0.1  # weight of the SSIM term in mse+ssim
    seed: int = 0  # decoder init and data order
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on a CPU), bf16 or fp32
    compile: str = "auto"  # torch.compile the decoder: auto (on CUDA), yes, no
    in_memory: str = "auto"  # auto/yes/no: hold the train arrays in RAM
    prefetch: int | None = None  # shards read ahead of the step (default: twice the read threads)
    read_threads: int | None = None  # threads decoding the cache (default: all cores)
    eval_samples: int = 64  # at most this many validation samples for the per-epoch PSNR
    crop: int | None = None  # train on random crops of this many pixels (and the matching cells); 0: whole images; None: auto
    val_fraction: float = 0.05  # share of the train split's images kept out of training to choose best.pt
    early_stop: int = 0  # stop after this many epochs without a better validation PSNR (0: never)
    resume: bool = False  # continue from out/last.pt
    allow_partial: bool = False  # train on the done samples of an unfinished cache
    skip_corrupt: bool = False  # leave out samples whose chunks fail their checksum, instead of stopping
    progress: bool = True  # tqdm bar

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))

    def validate(self) -> None:
        """One clear error for the first bad setting, before anything is read or built."""
        checks = [("--epochs", self.epochs, self.epochs >= 1, "must be at least 1"),
                  ("--batch-size", self.batch_size, self.batch_size >= 1, "must be at least 1"),
                  ("--grad-clip", self.grad_clip, self.grad_clip >= 0 and math.isfinite(self.grad_clip),
                   "must be 0 (off) or a positive number"),
                  ("--lr", self.lr, self.lr is None or (self.lr > 0 and math.isfinite(self.lr)),
                   "must be a positive number"),
                  ("--weight-decay", self.weight_decay, self.weight_decay >= 0, "must be 0 or more"),
                  ("--warmup", self.warmup, 0 <= self.warmup < 1, "must be in [0, 1): a share of all steps"),
                  ("--width", self.width, self.width is None or self.width >= 8, "must be auto or at least 8"),
                  ("--res-scale", self.res_scale, self.res_scale is None or 0 < self.res_scale <= 1,
                   "must be auto or in (0, 1]"),
                  ("--depth", self.depth, self.depth >= 0, "must be 0 or more"),
                  ("--ssim-weight", self.ssim_weight, self.ssim_weight >= 0, "must be 0 or more"),
                  ("--eval-samples", self.eval_samples, self.eval_samples >= 1, "must be at least 1"),
                  ("--crop", self.crop, self.crop is None or self.crop >= 0,
                   "must be auto, 0 (whole images) or a size in pixels"),
                  ("--val-fraction", self.val_fraction, 0 <= self.val_fraction < 0.5, "must be in [0, 0.5)"),
                  ("--early-stop", self.early_stop, self.early_stop >= 0, "must be 0 (off) or more"),
                  ("--prefetch", self.prefetch, self.prefetch is None or self.prefetch >= 1, "must be at least 1"),
                  ("--read-threads", self.read_threads, self.read_threads is None or self.read_threads >= 1,
                   "must be at least 1")]
        for flag, value, ok, what in checks:
            if not ok:
                raise FeatreconError(f"{flag} {value}: {what}")
        for flag, value, choices in (("--loss", self.loss, LOSSES), ("--arch", self.arch, ARCHS),
                                     ("--precision", self.precision, PRECISIONS),
                                     ("--compile", self.compile, COMPILE_CHOICES),
                                     ("--in-memory", self.in_memory, ("auto", "yes", "no"))):
            if value not in choices:
                raise FeatreconError(f"{flag} {value!r}: choose one of {', '.join(choices)}")
        if not self.layers:
            raise FeatreconError("--layer is empty; name a cached layer such as layer3, or several: layer2,layer3")


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


def validation_split(store: CacheStore, idx: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(trained on, validation): the train split's source images divided by a fixed rule on
    their id (sha1 of "validation/" + id, as the holdout rule but independent of it), so
    the validation images are never trained on and best.pt never sees the holdout. No view
    of a validation image is trained on; validation scores their centre crops only. None
    when the fraction would give fewer than MIN_VALIDATION images: then every image is
    trained on, and best.pt is chosen on a fixed subset of them."""
    from .data import holdout_score

    ids = store.ids()
    sources = sorted({ids[i] for i in idx})
    if fraction <= 0 or len(sources) * fraction < MIN_VALIDATION:
        return idx, idx[:0]
    score = {s: holdout_score("validation/" + s) for s in sources}
    held = {s for s in sources if score[s] < fraction} or {min(sources, key=score.get)}
    in_val = np.array([ids[i] in held for i in idx], bool)
    return idx[~in_val], idx[in_val & store.centre()[idx]]


def evaluation_indices(pick_from: np.ndarray, cfg: TrainConfig) -> np.ndarray:
    """The samples of the per-epoch validation: at most cfg.eval_samples of `pick_from`, a fixed choice by seed."""
    return np.sort(np.random.default_rng(cfg.seed).choice(pick_from, min(cfg.eval_samples, len(pick_from)), replace=False))


def channel_stats(cache: Path, layers: tuple[str, ...], idx: np.ndarray, dcfg: DecoderConfig, seed: int,
                  samples: int = 256, skip_corrupt: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the fused decoder input over up to `samples` training
    samples (a fixed choice by seed), in float64."""
    from .decoders import _fuse

    pick = np.sort(np.random.default_rng(seed).choice(idx, min(samples, len(idx)), replace=False))
    loader = CacheLoader(cache, layers, pick, 32, shuffle=False, in_memory=False, reuse_buffers=True,
                         skip_corrupt=skip_corrupt)
    total = total_sq = None
    count = 0
    for b in loader.epoch(0):
        x = _fuse(dcfg, [f.double() for f in b.features]).transpose(0, 1).flatten(1)  # (C, B*H*W)
        total = x.sum(1) if total is None else total + x.sum(1)
        total_sq = (x * x).sum(1) if total_sq is None else total_sq + (x * x).sum(1)
        count += x.shape[1]
    loader.close()
    mean = total / count
    return mean.float(), (total_sq / count - mean * mean).clamp_min(0).sqrt().float()


def lr_lambda(total_steps: int, warmup: float):
    warm = max(1, int(round(total_steps * warmup)))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def train_one_epoch(step: Step, loader: CacheLoader, epoch: int, cfg: TrainConfig, device,
                    strides: list[int] | None = None, group: Group | None = None) -> dict:
    step.model.train()
    total, n, wait = 0.0, 0, 0.0
    t0 = time.perf_counter()
    bar = tqdm(total=len(loader) * loader.batch_size if loader.world > 1 else len(loader.indices), unit="sample",
               desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress or loader.rank > 0, leave=False)
    window = None
    if cfg.crop and cfg.crop < loader.shapes[S.IMAGES][0][-1]:  # the window depends only on (seed, epoch, step)
        def window(i, feats, images):
            return random_crop(feats, images, cfg.crop, strides, np.random.default_rng([cfg.seed, epoch, i]))
    batches = device_batches(loader.epoch(epoch), device, step.settings.channels_last, window)
    while True:
        tw = time.perf_counter()
        item = next(batches, None)
        wait += time.perf_counter() - tw
        if item is None:
            break
        _, feats, target = item
        try:
            loss = step(feats, target)
        except Diverged as e:
            raise Diverged(f"{e} at epoch {epoch + 1}") from None
        total += loss.item() * len(target)
        n += len(target)
        bar.update(len(target))
        bar.set_postfix(loss=f"{total / n:.4f}")
    bar.close()
    seconds = time.perf_counter() - t0
    if group is not None and group.active:  # the epoch's loss and rate over every rank's samples
        total, n = group.sum(total, n)
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
    # A setting added after the run was written (grad_clip) is read as its default, which the run trained with.
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    diffs = [k for k in new if k not in RESUMABLE_CHANGES and old.get(k, defaults.get(k)) != new[k]]
    if diffs:
        raise FeatreconError(f"--resume: settings differ from the run in {cfg.out} ({', '.join(diffs)}); "
                             "use the same settings, or another --out")
    return ckpt


def _checkpoint(model, opt, sched, cfg, dcfg, fp, store, epoch, best, history, best_epoch, best_model) -> dict:
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
        "best_epoch": best_epoch, "best_model": best_model,  # best.pt can always be rebuilt from last.pt
    }


def resolve(cfg: TrainConfig, meta: S.CacheMeta) -> TrainConfig:
    """cfg with its auto settings (crop, width, res_scale, lr) set for the cache's layers; a run records them
    resolved, in config.json and the checkpoint."""
    strides = layer_strides(meta, cfg.layers)
    auto = {"crop": auto_crop(strides, meta.image_shape[1]), "width": auto_width(strides),
            "res_scale": auto_res_scale(strides), "lr": DEFAULT_LR[cfg.arch]}
    return replace(cfg, **{k: v for k, v in auto.items() if getattr(cfg, k) is None})


def decoder_config(cfg: TrainConfig, meta: S.CacheMeta) -> DecoderConfig:
    """The decoder a resolved cfg trains on the cache's layers."""
    return DecoderConfig(layers=cfg.layers, in_shapes=tuple(tuple(meta.layers[l]) for l in cfg.layers),
                         out_size=meta.image_shape[1:], width=cfg.width, depth=cfg.depth,
                         base_width=max(4, cfg.width // 8), arch=cfg.arch, res_scale=cfg.res_scale,
                         input_norm=cfg.input_norm)


def fit(cfg: TrainConfig) -> dict:
    """Train (or resume) a decoder; returns the last epoch's metrics."""
    cfg.validate()
    device = resolve_device(cfg.device)  # also a check: an unknown or absent device is refused here
    group = join(device)  # under torchrun: data parallel over the job's ranks (DDP)
    try:
        return _fit(cfg, group)
    finally:
        leave(group)


def _fit(cfg: TrainConfig, group: Group) -> dict:
    device = group.device
    store = open_cache(cfg.cache)
    fp = S.feature_fingerprint(store.meta, list(cfg.layers))  # also checks the layers are cached
    layers = tuple(sorted(cfg.layers, key=list(store.meta.layers).index))
    cfg = resolve(replace(cfg, layers=layers), store.meta)
    strides = layer_strides(store.meta, layers)
    check_crop(cfg.crop, strides, store.meta.image_shape[1])
    idx, val_idx = validation_split(store, train_indices(store, cfg.allow_partial), cfg.val_fraction)
    dcfg = decoder_config(cfg, store.meta)
    resume_from = _check_run_folder(cfg, fp)  # every rank reads the same last.pt
    group.barrier()  # ... before rank 0 writes anything
    if group.main:
        cfg.out.mkdir(parents=True, exist_ok=True)

    settings = step_settings(cfg, device)
    torch.manual_seed(cfg.seed)
    model = Decoder(dcfg)
    if cfg.input_norm and resume_from is None:  # on resume the statistics come with the state dict
        model.norm.set_stats(*channel_stats(cfg.cache, layers, idx, dcfg, cfg.seed, skip_corrupt=cfg.skip_corrupt))
    model = model.to(device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if group.active:  # the same initial weights everywhere (DDP broadcasts rank 0's), gradients averaged
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            **({"fused": True} if settings.fused_adamw else {}))
    loader = CacheLoader(cfg.cache, layers, idx, cfg.batch_size, shuffle=True, seed=cfg.seed, prefetch=cfg.prefetch,
                         in_memory={"auto": "auto", "yes": True, "no": False}[cfg.in_memory],
                         pin_memory=device.type == "cuda", threads=cfg.read_threads, reuse_buffers=True,
                         skip_corrupt=cfg.skip_corrupt, rank=group.rank, world=group.world)
    if len(loader) == 0:
        raise FeatreconError(f"--batch-size {cfg.batch_size}: {len(idx)} training samples do not fill one step of "
                             f"{cfg.batch_size} samples on each of {group.world} ranks; lower --batch-size")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.epochs * len(loader), cfg.warmup))
    # best.pt is chosen on validation images, never trained on; with too few images to spare
    # one, on a fixed subset of the training images (and the metrics say so).
    pick_from, eval_on = (val_idx, "validation") if len(val_idx) else (idx[store.centre()[idx]], "train subset")
    eval_idx = evaluation_indices(pick_from, cfg)
    eval_loader = CacheLoader(cfg.cache, layers, eval_idx, cfg.batch_size, shuffle=False, in_memory=True,
                              skip_corrupt=cfg.skip_corrupt)
    start, best, history, best_epoch, best_model = 0, -math.inf, [], 0, None
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        opt.load_state_dict(resume_from["optimizer"])
        sched.load_state_dict(resume_from["scheduler"])
        start, best, history = resume_from["epoch"], resume_from["best_psnr"], resume_from["history"]
        best_epoch, best_model = resume_from.get("best_epoch", 0), resume_from.get("best_model")
        if best_model is None:  # a run written before last.pt recorded its best: take it from a current best.pt
            best_epoch, best_model = _recorded_best(cfg.out, resume_from)
        elif group.main:
            _restore_best(cfg.out, resume_from)
        _continue_schedule(sched, opt, start * len(loader))  # the same point of the schedule, whatever the world size
        log.info("resuming %s after epoch %d of %d", cfg.out, start, cfg.epochs)
    if group.main:
        write_json({**cfg.to_dict(), "decoder": asdict(dcfg), "fingerprint": fp, "n_train": len(idx),
                    "n_validation": len(val_idx), "best_chosen_on": eval_on, "world_size": group.world},
                   cfg.out / "config.json")
        _rewrite_metrics(cfg.out / "metrics.jsonl", history)
    log.info("decoder %s: %s parameters; %d train samples (in memory: %s), device %s (%s)%s",
             "+".join(layers), f"{count_parameters(model):,}", len(idx), loader.in_memory, device,
             ", ".join(k for k, v in asdict(settings).items() if v) or "fp32, eager",
             f"; rank {group.rank} of {group.world}, {cfg.batch_size} samples per rank and step" if group.active else "")
    try:
        step = Step(net, opt, sched, cfg, device, settings)
        for epoch in range(start, cfg.epochs):
            stats = train_one_epoch(step, loader, epoch, cfg, device, strides, group)
            scores = None
            if group.main:  # rank 0 validates; every rank takes its numbers, so all stop at the same epoch
                ev = evaluate(model, eval_loader, device, exact=False)  # float32 SSIM: a monitor
                scores = (float(np.mean(ev["psnr"])), float(np.mean(ev["ssim"]))) if len(ev["psnr"]) else None
            scores = group.broadcast(scores)
            if scores is None:  # every evaluation sample left out as corrupt
                raise FeatreconError(f"--cache {cfg.cache}: none of the {len(eval_idx)} {eval_on} samples could be "
                                     f"read; run featrecon verify {cfg.cache} --repair")
            row = {"epoch": epoch + 1, "loss": stats["loss"], "psnr": scores[0], "psnr_on": eval_on,
                   "ssim": scores[1], "lr": sched.get_last_lr()[0],
                   "samples_per_s": stats["samples_per_s"], "data_wait": stats["data_wait"], "seconds": stats["seconds"],
                   "corrupt_skipped": len(loader.corrupt | eval_loader.corrupt)}
            history.append(row)
            if row["psnr"] > best:
                best, best_epoch = row["psnr"], epoch + 1
                best_model = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            if group.main:  # the ranks hold the same weights; one writes them
                ckpt = _checkpoint(model, opt, sched, cfg, dcfg, fp, store, epoch + 1, best, history, best_epoch,
                                   best_model)
                # best.pt first: a kill between the writes leaves last.pt an epoch behind, and the resumed
                # run redoes that epoch; either way last.pt records the best, and best.pt is rebuilt from it.
                if best_epoch == epoch + 1:
                    atomic_save(best_checkpoint(ckpt), cfg.out / "best.pt")
                atomic_save(ckpt, cfg.out / "last.pt")
                with open(cfg.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
            log.info("epoch %d/%d  loss %.5f  %s PSNR %.2f dB  SSIM %.3f  %.1f samples/s  lr %.2e",
                     epoch + 1, cfg.epochs, row["loss"], eval_on, row["psnr"], row["ssim"], row["samples_per_s"], row["lr"])
            since_best = len(history) - 1 - int(np.argmax([r["psnr"] for r in history]))
            if cfg.early_stop and since_best >= cfg.early_stop:
                log.info("early stop: %d epochs without a better %s PSNR (best %.2f dB, epoch %d)", since_best,
                         eval_on, best, epoch + 1 - since_best)
                break
    except Diverged as e:
        raise FeatreconError(f"{e}; stopped, last good checkpoint kept in {cfg.out} (try a lower --lr)") from None
    finally:
        loader.close()
        eval_loader.close()
        store.close()
    check_in_step(model, group)
    if group.main:
        from .figures import plot_training

        plot_training(history, cfg.out / "loss.png", title=f"decoder from {'+'.join(layers)}")
    group.barrier()  # no rank leaves before the checkpoint is written
    return history[-1] if history else {}


def _recorded_best(out: Path, last: dict) -> tuple[int, dict | None]:
    """(epoch, weights) of a current best.pt of a run whose last.pt does not record them, else (0, None)."""
    path = out / "best.pt"
    if path.exists():
        best = load_checkpoint(path)
        if best_is_current(best, last):
            return best["epoch"], best["model"]
    return 0, None


def _restore_best(out: Path, last: dict) -> None:
    """On resume: best.pt as last.pt records it (a kill between the two writes can leave it behind)."""
    if last.get("best_model") is None:
        return
    path = out / "best.pt"
    if path.exists() and best_is_current(load_checkpoint(path), last):
        return
    log.warning("%s did not hold the best epoch that last.pt records (%d): rewritten from last.pt", path,
                last["best_epoch"])
    atomic_save(best_checkpoint(last), path)


def check_in_step(model: torch.nn.Module, group: Group) -> None:
    """Data-parallel ranks must end with the same weights; a difference would mean a rank
    trained on something else, and its checkpoint would not be the run's. Compared by a
    digest of every parameter's bytes."""
    if not group.active:
        return
    import hashlib

    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    digests = group.all_gather(h.hexdigest())
    if len(set(digests)) != 1:
        raise FeatreconError(f"the {group.world} ranks ended with different weights ({', '.join(d[:8] for d in digests)})")
    log.info("weights identical on all %d ranks (sha256 %s)", group.world, digests[0][:16])


def _continue_schedule(sched, opt, steps_done: int) -> None:
    """Put the schedule at `steps_done` steps: a resume with another world size has another
    number of steps per epoch, and the schedule follows the epochs."""
    sched.last_epoch = steps_done
    for group, base, factor in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * factor(steps_done)
    sched._last_lr = [g["lr"] for g in opt.param_groups]


def fit_each(cfg: TrainConfig) -> dict[str, dict]:
    """`--layer each`: one decoder per cached layer, into cfg.out/<layer>, one after another.
    Resumable as a whole: a finished layer is left alone, an interrupted one resumes."""
    cfg.validate()
    with open_cache(cfg.cache) as store:
        layers = list(store.meta.layers)
    results = {}
    group = join(resolve_device(cfg.device))  # one process group for all the layers
    try:
        for i, layer in enumerate(layers):
            one = TrainConfig(**{**asdict(cfg), "layers": (layer,), "out": cfg.out / layer, "resume": True})
            last = one.out / "last.pt"
            if last.exists() and load_checkpoint(last)["epoch"] >= cfg.epochs:
                log.info("layer %d of %d, %s: already trained (%s); skipped", i + 1, len(layers), layer, last)
                continue
            log.info("layer %d of %d: %s", i + 1, len(layers), layer)
            results[layer] = _fit(one, group)
    finally:
        leave(group)
    return results


def _rewrite_metrics(path: Path, history: list[dict]) -> None:
    """metrics.jsonl holds exactly the epochs of the checkpoint resumed from."""
    from .checkpoint import atomic_write_text

    atomic_write_text("".join(json.dumps(r) + "\n" for r in history), path)
