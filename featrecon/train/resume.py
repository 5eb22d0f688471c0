"""Which run a train-decoder call continues, and with what settings: the run folder's
checkpoint to resume from (refusing to mix runs), the settings left to auto as that run
recorded them, and best.pt as its last.pt records it. `loop.prepare` calls these."""

from __future__ import annotations

import logging
from dataclasses import MISSING, fields, replace
from pathlib import Path

import torch

from ..cache.remote import is_url
from ..errors import FeatreconError
from .checkpoint import atomic_save, best_checkpoint, best_is_current, load_checkpoint
from .config import LEGACY, RESUMABLE_CHANGES, TrainConfig
from .step import auto_precision

log = logging.getLogger(__name__)


def run_to_resume(cfg: TrainConfig, fp: str, auto: frozenset[str] = frozenset()) -> dict | None:
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
    # A setting added after the run was written (grad_clip) is read as what the run trained with: its
    # default, or where the default has changed since, the old behaviour (LEGACY).
    defaults = {**{f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}, **LEGACY}
    diffs = [k for k in new if k not in RESUMABLE_CHANGES and k not in auto and old.get(k, defaults.get(k)) != new[k]]
    if diffs:
        raise FeatreconError(f"--resume: settings differ from the run in {cfg.out} ({', '.join(diffs)}); "
                             "use the same settings, or another --out")
    return ckpt


def settled(cfg: TrainConfig, auto: frozenset[str], resume_from: dict | None, device: torch.device) -> TrainConfig:
    """cfg with the settings left to auto as a resumed run recorded them (a default changed since does
    not change a run; a run from before a setting existed reads it as LEGACY says), and for a new run
    --shuffle auto resolved (global on a local cache, window on an object store: one request per
    chunk is slow there) and --precision auto (`auto_precision`). A run recorded with precision
    "auto" predates its resolution and trained with that day's rule: bf16 on CUDA, fp32 on a CPU."""
    if resume_from is not None:
        old = resume_from["train_config"]
        kept = {k: old.get(k, LEGACY.get(k)) for k in auto}
        cfg = replace(cfg, **{k: v for k, v in kept.items() if v is not None and v != "auto"})
    if cfg.shuffle == "auto":
        cfg = replace(cfg, shuffle="window" if is_url(cfg.cache) else "global")
    if cfg.precision == "auto":
        old_rule = "bf16" if device.type == "cuda" else "fp32"
        cfg = replace(cfg, precision=old_rule if resume_from is not None else auto_precision(device))
    return cfg


def recorded_best(out: Path, last: dict) -> tuple[int, dict | None]:
    """(epoch, weights) of a current best.pt of a run whose last.pt does not record them, else (0, None)."""
    path = out / "best.pt"
    if path.exists():
        best = load_checkpoint(path)
        if best_is_current(best, last):
            return best["epoch"], best["model"]
    return 0, None


def restore_best(out: Path, last: dict) -> None:
    """On resume: best.pt as last.pt records it (a kill between the two writes can leave it behind)."""
    if last.get("best_model") is None:
        return
    path = out / "best.pt"
    if path.exists() and best_is_current(load_checkpoint(path), last):
        return
    log.warning("%s did not hold the best epoch that last.pt records (%d): rewritten from last.pt", path,
                last["best_epoch"])
    atomic_save(best_checkpoint(last), path)
