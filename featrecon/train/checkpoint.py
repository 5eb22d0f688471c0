"""Decoder checkpoints: written atomically, and enough on their own to rebuild the decoder."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import FeatreconError
from .decoders import Decoder, DecoderConfig

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "featrecon-decoder"
CHECKPOINT_VERSION = 1


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then rename: a kill leaves the old file or the new."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(obj, path: Path) -> None:
    atomic_write_text(json.dumps(obj, indent=2, default=str) + "\n", path)


def load_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors and containers only
    except Exception as e:
        why = str(e).splitlines()[0] if str(e) else ""
        raise FeatreconError(f"{path}: unreadable checkpoint ({type(e).__name__}: {why})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise FeatreconError(f"{path}: not a featrecon decoder checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise FeatreconError(f"{path}: checkpoint version {ckpt.get('version')}, this featrecon reads {CHECKPOINT_VERSION}")
    return ckpt


def decoder_from_checkpoint(ckpt: dict) -> Decoder:
    model = Decoder(DecoderConfig.from_dict(ckpt["decoder_config"]))
    model.load_state_dict(ckpt["model"])
    # NHWC weights: oneDNN's and cuDNN's faster convolutions (benchmarks/DESIGN.md), as in training
    return model.to(memory_format=torch.channels_last).eval()


# What best.pt leaves out of the training checkpoint it is made from: it is for use, not for resuming.
_TRAINING_ONLY = ("optimizer", "scheduler", "best_model")


def best_checkpoint(ckpt: dict) -> dict:
    """best.pt's contents from a training checkpoint (last.pt) that records its run's best
    epoch and weights: written when an epoch improves, and rebuilt from last.pt when a kill
    between the two writes left best.pt behind."""
    e = ckpt["best_epoch"]
    return {**{k: v for k, v in ckpt.items() if k not in _TRAINING_ONLY}, "model": ckpt["best_model"], "epoch": e,
            "history": ckpt["history"][:e]}


def best_is_current(best: dict, last: dict) -> bool:
    """Is best.pt the best epoch that last.pt records? Runs written before last.pt recorded it
    are checked against the PSNR history: best.pt holds the first epoch of the highest PSNR."""
    if last.get("best_epoch"):
        return best.get("epoch") == last["best_epoch"]
    psnr = [r["psnr"] for r in last.get("history", [])]
    return not psnr or best.get("epoch") == 1 + int(np.argmax(psnr))


def run_checkpoint(folder: Path, which: str = "best") -> tuple[Path, dict]:
    """(path, contents) of a run folder's checkpoint `which`, never a stale best: where a run was
    killed between writing best.pt and last.pt, the best weights recorded in last.pt (with a
    warning), or for runs that did not record them a one-line refusal."""
    last_path, best_path = folder / "last.pt", folder / "best.pt"
    if which == "last" or not last_path.exists():
        path = best_path if which == "best" and best_path.exists() else last_path
        return path, load_checkpoint(path)
    last = load_checkpoint(last_path)
    best = load_checkpoint(best_path) if best_path.exists() else None
    if best is not None and best_is_current(best, last):
        return best_path, best
    if last.get("best_model") is not None:
        log.warning("%s: %s; using the best weights recorded in last.pt (epoch %d); train-decoder --resume "
                    "rewrites best.pt", folder, "best.pt is missing" if best is None else
                    f"best.pt holds epoch {best.get('epoch')}, not the best epoch {last['best_epoch']}",
                    last["best_epoch"])
        return last_path, best_checkpoint(last)
    if best is None:
        return last_path, last
    raise FeatreconError(f"{best_path} holds epoch {best.get('epoch')}, but {last_path} records a better epoch "
                         "(the run was stopped between its two writes); score its last.pt (--which last) or "
                         "retrain it")
