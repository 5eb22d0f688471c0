"""Stage 2: train a decoder from the cache alone (no backbone, no image decoding).

`fit` reads shapes, preprocessing and fingerprint from the cache, trains on the train split
only, and after every epoch writes `best.pt` (when the PSNR on validation images improves: a
fixed part of the train split, by source id, never trained on and never the holdout), then
`last.pt`, both atomically, then appends a line to `metrics.jsonl`. `--resume` continues
from `last.pt`; on a CPU the result is bit-for-bit the uninterrupted run, because all
randomness comes from (seed, epoch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from ..cache import schema as S
from ..cache.base import CacheStore
from ..cache.factory import open_cache
from ..cache.loader import CacheLoader
from ..device import resolve_device
from ..distributed import Group, join, leave
from ..errors import FeatreconError
from ..extract.backbone import FeatureExtractor, rebuild_backbone
from ..figures import plot_training
from ..version import __version__
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    atomic_save,
    atomic_write_text,
    best_checkpoint,
    load_checkpoint,
    write_json,
)
from .config import TrainConfig, layer_strides, left_to_auto, resolve
from .decoders import Decoder, DecoderConfig, count_parameters
from .guard import CAP_EPOCHS, BlowUp, Guard, Snapshot, roll_back
from .resume import recorded_best, restore_best, run_to_resume, settled
from .samples import channel_stats, evaluation_indices, train_indices, validation_split
from .step import Schedule, Step, StepSettings, device_batches, random_crop, step_settings
from .validate import evaluate

log = logging.getLogger(__name__)


def decoder_config(cfg: TrainConfig, meta: S.CacheMeta) -> DecoderConfig:
    """The decoder a resolved cfg trains on the cache's layers."""
    return DecoderConfig(layers=cfg.layers, in_shapes=tuple(tuple(meta.layers[l]) for l in cfg.layers),
                         out_size=meta.image_shape[1:], width=cfg.width, depth=cfg.depth,
                         base_width=max(4, cfg.width // 8), arch=cfg.arch, res_scale=cfg.res_scale,
                         input_norm=cfg.input_norm)


@dataclass
class Run:
    """What one training run is made of, built once by `prepare`."""

    cfg: TrainConfig  # resolved: auto settings filled in
    dcfg: DecoderConfig
    fingerprint: str  # of the features the decoder reads
    store: CacheStore
    group: Group
    settings: StepSettings
    model: torch.nn.Module  # the decoder
    net: torch.nn.Module  # the decoder, or its DistributedDataParallel wrapper
    opt: torch.optim.Optimizer
    loader: CacheLoader  # this rank's training batches
    eval_loader: CacheLoader  # the validation images (or a fixed train subset)
    eval_on: str  # "validation" or "train subset"
    n_train: int
    n_validation: int
    encoder: torch.nn.Module | None = None  # --loss mse+feat: the frozen backbone to the decoded layers

    def close(self) -> None:
        self.loader.close()
        self.eval_loader.close()


@dataclass
class Progress:
    """Where a run stands: the epochs done, their metrics, and the best epoch and its weights."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best: float = -math.inf  # the best validation PSNR so far
    best_epoch: int = 0
    best_model: dict | None = None  # that epoch's weights, on the CPU
    guard: Guard = field(default_factory=Guard)  # the divergence guard's state after the last epoch

    def record(self, row: dict, model: torch.nn.Module) -> bool:
        """Add an epoch's row; True if it is the best so far (its weights are kept)."""
        self.history.append(row)
        self.epoch = row["epoch"]
        if row["psnr"] <= self.best:
            return False
        self.best, self.best_epoch = row["psnr"], row["epoch"]
        self.best_model = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return True

    def epochs_since_best(self) -> int:
        return self.epoch - self.best_epoch


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
    store = open_cache(cfg.cache)
    try:
        run, resume_from = prepare(cfg, group, store)
        try:
            progress = restore(run, resume_from)
            step = Step(run.net, run.opt, Schedule(run.cfg.lr, run.cfg.epochs * len(run.loader), run.cfg.warmup),
                        run.cfg, group.device, run.settings, steps_done=progress.epoch * len(run.loader),
                        guard=progress.guard, group=group, encoder=run.encoder)
            epoch = progress.epoch
            while epoch < run.cfg.epochs:
                start = Snapshot.take(run.model, run.opt, step.guard)  # what a blow-up in this epoch returns to
                try:
                    stats = train_one_epoch(step, run.loader, epoch, run.cfg, group.device,
                                            layer_strides(store.meta, run.cfg.layers), group)
                    step.guard.check_epoch(stats["loss"])
                    scores = validate_epoch(run)
                    step.guard.check_validation(scores[0], progress.best)
                except BlowUp as e:
                    steps = range(epoch * len(run.loader), (epoch + 1) * len(run.loader))
                    step.guard = roll_back(start, run.model, run.opt, step.guard, epoch, e, step.epoch_peak(steps),
                                           run.cfg.out)
                    step.steps_done = steps.start
                    log.warning("epoch %d/%d: the loss blew up (%s); rolled back to the epoch's start, redoing it with "
                                "the learning rate capped at %.3g for %d epochs", epoch + 1, run.cfg.epochs, e,
                                step.guard.lr_cap, CAP_EPOCHS)
                    continue
                row = epoch_row(run, epoch, stats, scores, step.lr, step.guard)  # the cap this epoch ran under
                step.guard.epoch_done()
                if row["lr_cap"] is not None and step.guard.lr_cap is None:
                    log.info("epoch %d/%d: the learning rate cap is lifted; the schedule goes on", epoch + 1, run.cfg.epochs)
                progress.guard = step.guard
                save_epoch(run, progress, progress.record(row, run.model))
                log_epoch(run, row)
                epoch += 1
                if stop_early(run, progress):
                    break
        finally:
            run.close()
    finally:
        store.close()
    check_in_step(run.model, group)
    if group.main:
        plot_training(progress.history, run.cfg.out / "loss.png", title=f"decoder from {'+'.join(run.cfg.layers)}")
    group.barrier()  # no rank leaves before the checkpoint is written
    return progress.history[-1] if progress.history else {}


def prepare(cfg: TrainConfig, group: Group, store: CacheStore) -> tuple[Run, dict | None]:
    """The run's settings, samples, decoder and optimiser, and the checkpoint to resume from."""
    device = group.device
    fp = S.feature_fingerprint(store.meta, list(cfg.layers))  # also checks the layers are cached
    auto = left_to_auto(cfg)
    cfg = resolve(cfg, store.meta)
    resume_from = run_to_resume(cfg, fp, auto)  # every rank reads the same last.pt
    cfg = settled(cfg, auto, resume_from, device)
    idx, val_idx = validation_split(store, train_indices(store, cfg.allow_partial), cfg.val_fraction)
    dcfg = decoder_config(cfg, store.meta)
    group.barrier()  # ... before rank 0 writes anything
    if group.main:
        cfg.out.mkdir(parents=True, exist_ok=True)
    settings = step_settings(cfg, device)
    torch.manual_seed(cfg.seed)
    model = Decoder(dcfg)
    if cfg.input_norm and resume_from is None:  # on resume the statistics come with the state dict
        model.norm.set_stats(*channel_stats(cfg.cache, cfg.layers, idx, dcfg, cfg.seed, skip_corrupt=cfg.skip_corrupt))
    model = model.to(device, memory_format=torch.channels_last if settings.channels_last else torch.preserve_format)
    net = model
    if group.active:  # the same initial weights everywhere (DDP broadcasts rank 0's), gradients averaged
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            **({"fused": True} if settings.fused_adamw else {}))
    loader = CacheLoader(cfg.cache, cfg.layers, idx, cfg.batch_size, shuffle=True, seed=cfg.seed, prefetch=cfg.prefetch,
                         in_memory={"auto": "auto", "yes": True, "no": False}[cfg.in_memory],
                         pin_memory=device.type == "cuda", threads=cfg.read_threads, reuse_buffers=True,
                         skip_corrupt=cfg.skip_corrupt, rank=group.rank, world=group.world, mode=cfg.shuffle)
    if len(loader) == 0:
        loader.close()
        raise FeatreconError(f"--batch-size {cfg.batch_size}: {len(idx)} training samples do not fill one step of "
                             f"{cfg.batch_size} samples on each of {group.world} ranks; lower --batch-size")
    # best.pt is chosen on validation images, never trained on; with too few images to spare
    # one, on a fixed subset of the training images (and the metrics say so).
    pick_from, eval_on = (val_idx, "validation") if len(val_idx) else (idx[store.centre()[idx]], "train subset")
    eval_loader = CacheLoader(cfg.cache, cfg.layers, evaluation_indices(pick_from, cfg.eval_samples, cfg.seed),
                              cfg.batch_size, shuffle=False, in_memory=True, skip_corrupt=cfg.skip_corrupt)
    run = Run(cfg, dcfg, fp, store, group, settings, model, net, opt, loader, eval_loader, eval_on, len(idx), len(val_idx),
              feature_encoder(cfg, store.meta, settings, device))
    log.info("decoder %s: %s parameters; %d train samples (in memory: %s; %s), device %s (%s)%s",
             "+".join(cfg.layers), f"{count_parameters(model):,}", len(idx), loader.in_memory, loader.describe(), device,
             ", ".join(k for k, v in asdict(settings).items() if v) or "fp32, eager",
             f"; rank {group.rank} of {group.world}, {cfg.batch_size} samples per rank and step" if group.active else "")
    return run, resume_from


def feature_encoder(cfg: TrainConfig, meta: S.CacheMeta, settings: StepSettings, device) -> torch.nn.Module | None:
    """--loss mse+feat: the cache's backbone, rebuilt and frozen, to the decoded layers."""
    if cfg.loss != "mse+feat":
        return None
    try:
        backbone = rebuild_backbone(meta)
    except FeatreconError as e:
        raise FeatreconError(f"--loss mse+feat needs the cache's backbone: {e}") from None
    encoder = FeatureExtractor(backbone, {l: meta.nodes[l] for l in cfg.layers}, meta.preprocessing,
                               settings.channels_last, meta.autocast, meta.backbone).to(device).eval()
    return encoder.requires_grad_(False)


def restore(run: Run, resume_from: dict | None) -> Progress:
    """The progress to start from: nothing, or the resumed checkpoint's weights, optimiser and
    best; writes the run's config.json and metrics.jsonl as of that point."""
    progress = Progress()
    if resume_from is not None:
        run.model.load_state_dict(resume_from["model"])
        run.opt.load_state_dict(resume_from["optimizer"])
        progress = Progress(resume_from["epoch"], resume_from["history"], resume_from["best_psnr"],
                            resume_from.get("best_epoch", 0), resume_from.get("best_model"),
                            Guard.from_state(resume_from.get("guard")))
        if progress.best_model is None:  # a run written before last.pt recorded its best: take a current best.pt
            progress.best_epoch, progress.best_model = recorded_best(run.cfg.out, resume_from)
        elif run.group.main:
            restore_best(run.cfg.out, resume_from)
        log.info("resuming %s after epoch %d of %d", run.cfg.out, progress.epoch, run.cfg.epochs)
    if run.group.main:
        write_json({**run.cfg.to_dict(), "decoder": asdict(run.dcfg), "fingerprint": run.fingerprint,
                    "n_train": run.n_train, "n_validation": run.n_validation, "best_chosen_on": run.eval_on,
                    "world_size": run.group.world}, run.cfg.out / "config.json")
        atomic_write_text("".join(json.dumps(r) + "\n" for r in progress.history), run.cfg.out / "metrics.jsonl")
    return progress


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
        loss = step(feats, target)
        total += loss.item() * len(target)
        n += len(target)
        bar.update(len(target))
        bar.set_postfix(loss=f"{total / n:.4f}")
    bar.close()
    seconds = time.perf_counter() - t0
    if group is not None and group.active:  # the epoch's loss and rate over every rank's samples
        total, n = group.sum(total, n)
    return {"loss": total / n, "samples_per_s": n / seconds, "seconds": seconds, "data_wait": wait / seconds}


def validate_epoch(run: Run) -> tuple[float, float]:
    """(PSNR, SSIM) of the validation images: rank 0 measures, every rank takes its numbers, so all
    stop at the same epoch."""
    scores = None
    if run.group.main:
        # float32 SSIM, the forward under the training's autocast: a monitor (score measures in fp32)
        ev = evaluate(run.model, run.eval_loader, run.group.device, exact=False, autocast=run.settings.autocast)
        scores = (float(np.mean(ev["psnr"])), float(np.mean(ev["ssim"]))) if len(ev["psnr"]) else None
    scores = run.group.broadcast(scores)
    if scores is None:  # every evaluation sample left out as corrupt
        raise FeatreconError(f"--cache {run.cfg.cache}: none of the {len(run.eval_loader.indices)} {run.eval_on} "
                             f"samples could be read; run featrecon verify {run.cfg.cache} --repair")
    return scores


def epoch_row(run: Run, epoch: int, stats: dict, scores: tuple[float, float], lr: float, guard: Guard) -> dict:
    """metrics.jsonl's line for an epoch, with the rollbacks the guard made in it (see `guard`)."""
    return {"epoch": epoch + 1, "loss": stats["loss"], "psnr": scores[0], "psnr_on": run.eval_on, "ssim": scores[1],
            "lr": lr, "lr_cap": guard.lr_cap, "rollbacks": [r for r in guard.rollbacks if r["epoch"] == epoch + 1],
            "samples_per_s": stats["samples_per_s"], "data_wait": stats["data_wait"],
            "seconds": stats["seconds"], "corrupt_skipped": len(run.loader.corrupt | run.eval_loader.corrupt)}


def training_checkpoint(run: Run, progress: Progress) -> dict:
    """last.pt: enough to resume the run, and to rebuild both its decoder and its best.pt."""
    meta = run.store.meta
    return {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "tool_version": __version__,
        "decoder_config": asdict(run.dcfg), "train_config": run.cfg.to_dict(), "layers": list(run.cfg.layers),
        "fingerprint": run.fingerprint,
        "cache_meta": {"weights": meta.weights, "weights_fingerprint": meta.weights_fingerprint,
                       "preprocessing": asdict(meta.preprocessing),
                       "layers": {l: meta.layers[l] for l in run.cfg.layers}, "cache": str(run.cfg.cache),
                       "views": meta.views},
        "epoch": progress.epoch, "best_psnr": progress.best, "history": progress.history,
        "n_parameters": count_parameters(run.model), "model": run.model.state_dict(),
        "optimizer": run.opt.state_dict(), "scheduler": {"steps": progress.epoch * len(run.loader)},
        "best_epoch": progress.best_epoch, "best_model": progress.best_model,  # best.pt can always be rebuilt
        "guard": progress.guard.state(),
    }


def save_epoch(run: Run, progress: Progress, improved: bool) -> None:
    """The epoch's checkpoints and metrics line (rank 0: the ranks hold the same weights). best.pt
    first: a kill between the writes leaves last.pt an epoch behind, and the resumed run redoes
    that epoch; either way last.pt records the best, and best.pt is rebuilt from it."""
    if not run.group.main:
        return
    ckpt = training_checkpoint(run, progress)
    if improved:
        atomic_save(best_checkpoint(ckpt), run.cfg.out / "best.pt")
    atomic_save(ckpt, run.cfg.out / "last.pt")
    with open(run.cfg.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(progress.history[-1]) + "\n")


def log_epoch(run: Run, row: dict) -> None:
    log.info("epoch %d/%d  loss %.5f  %s PSNR %.2f dB  SSIM %.3f  %.1f samples/s  lr %.2e", row["epoch"],
             run.cfg.epochs, row["loss"], run.eval_on, row["psnr"], row["ssim"], row["samples_per_s"], row["lr"])


def stop_early(run: Run, progress: Progress) -> bool:
    """--early-stop N: N epochs without a better validation PSNR."""
    since = progress.epochs_since_best()
    if run.cfg.early_stop and since >= run.cfg.early_stop:
        log.info("early stop: %d epochs without a better %s PSNR (best %.2f dB, epoch %d)", since, run.eval_on,
                 progress.best, progress.best_epoch)
        return True
    return False


def check_in_step(model: torch.nn.Module, group: Group) -> None:
    """Data-parallel ranks must end with the same weights; a difference would mean a rank
    trained on something else, and its checkpoint would not be the run's. Compared by a
    digest of every parameter's bytes."""
    if not group.active:
        return
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    digests = group.all_gather(h.hexdigest())
    if len(set(digests)) != 1:
        raise FeatreconError(f"the {group.world} ranks ended with different weights ({', '.join(d[:8] for d in digests)})")
    log.info("weights identical on all %d ranks (sha256 %s)", group.world, digests[0][:16])


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
