"""Stage 3: score decoders on a split of the cache, with pictures.

`train.validate.evaluate` (also training's per-epoch validation) reconstructs samples and
measures MSE, PSNR and SSIM on [0, 1] RGB at the cache's resolution. `score` finds
checkpoints, checks each against the cache's feature fingerprint (the fingerprint decides,
not the path), joins the original image files, adds the
mean-training-image baseline and writes metrics.json, report.md, PNGs and plots.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..cache import remote
from ..cache import schema as S
from ..cache.base import CacheStore
from ..cache.factory import open_cache
from ..cache.loader import CacheLoader
from ..device import resolve_device
from ..errors import FeatreconError
from ..extract.images import ImageError, load_image
from ..figures import save_png
from ..metrics import summarize
from ..train.checkpoint import decoder_from_checkpoint, load_checkpoint, run_checkpoint
from ..train.validate import evaluate, measure
from .config import SPLITS, ScoreConfig
from .fidelity import Judge
from .perceptual import Perceptual
from .report import write_report

log = logging.getLogger(__name__)
def split_indices(store: CacheStore, split: str) -> np.ndarray:
    if split not in SPLITS:
        raise FeatreconError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    status, sp = store.status(), store.read_all(S.SPLIT)
    ok = (status == S.STATUS_DONE) & store.centre()  # extra views are for training only
    if split != "all":
        ok &= sp == S.SPLIT_NAMES[split]
    pending = int((status == S.STATUS_PENDING).sum())
    if pending:
        log.warning("%s is unfinished (%d of %d samples pending): scoring the %d done samples of the %s split",
                    store.path, pending, store.meta.n, int(ok.sum()), split)
    idx = np.flatnonzero(ok)
    if len(idx) == 0:
        raise FeatreconError(f"--split {split}: no done samples in {store.path}; nothing to score")
    return idx


def find_checkpoints(cfg: ScoreConfig) -> list[tuple[str, Path, dict]]:
    """(run name, checkpoint path, contents) of every checkpoint to score: the explicit ones, or
    each run folder's `which` under cfg.runs (never a stale best.pt: see `run_checkpoint`)."""
    if cfg.checkpoints:
        for p in cfg.checkpoints:
            if not p.is_file():
                raise FeatreconError(f"--checkpoint {p}: file not found")
        return [(p.resolve().parent.name if p.stem in ("best", "last") else p.stem, p, load_checkpoint(p))
                for p in cfg.checkpoints]
    if not cfg.runs.is_dir():
        raise FeatreconError(f"--runs {cfg.runs}: folder not found; train a decoder first "
                             "(train-decoder --cache CACHE --layer layer3)")
    found = []
    for last in sorted(cfg.runs.rglob("last.pt")):
        name = last.parent.relative_to(cfg.runs).as_posix()
        found.append((name if name != "." else last.parent.resolve().name, *run_checkpoint(last.parent, cfg.which)))
    if not found:
        raise FeatreconError(f"--runs {cfg.runs}: no checkpoints found (no */last.pt); "
                             "train one with train-decoder --cache CACHE --layer layer3")
    return found


def safe_name(name: str) -> str:
    """A run name as one folder name under the report: letters, digits and ._+- kept, anything else
    (path separators, '..') replaced, so nothing is written outside --out."""
    cleaned = re.sub(r"[^A-Za-z0-9._+-]", "_", name).strip(".") or "run"
    return cleaned


def source_path(root, image_id: str):
    """The original of `image_id` under the --images root (a folder or URL prefix), or None for an id
    that is absolute or climbs out of it (a damaged or hostile cache): never read."""
    parts = image_id.replace("\\", "/").split("/")
    if not image_id or image_id.startswith("/") or ":" in parts[0] or any(p in ("", ".", "..") for p in parts):
        return None
    return remote.join(root, image_id) if remote.is_url(root) else Path(root) / image_id


def check_originals(store: CacheStore, idx: np.ndarray, root: Path | str, progress: bool) -> dict:
    """Re-read each source file (under a local folder or a URL prefix), re-apply the recorded
    preprocessing, compare with the cached target."""
    ids = store.ids()
    counts = {"checked": 0, "equal": 0, "missing": 0, "changed": 0, "unreadable": 0, "refused": 0}
    problems = {}
    for i in tqdm(idx.tolist(), desc="originals", unit="img", disable=not progress, leave=False):
        counts["checked"] += 1
        source = source_path(root, ids[i])
        if source is None:
            counts["refused"] += 1
            problems[ids[i]] = "refused: the id is absolute or leaves the images folder"
            continue
        if remote.is_url(root):
            raw = remote.read_bytes(source)
            path = io.BytesIO(raw) if raw is not None else None
        else:
            path = source if source.is_file() else None
        if path is None:
            counts["missing"] += 1
            problems[ids[i]] = "missing"
            continue
        try:
            img = load_image(path, store.meta.preprocessing)
        except ImageError as e:
            counts["unreadable"] += 1
            problems[ids[i]] = f"unreadable: {e}"
            continue
        if np.array_equal(img, store.read(S.IMAGES, i, i + 1)[0]):
            counts["equal"] += 1
        else:
            counts["changed"] += 1
            problems[ids[i]] = "changed since extraction"
    counts["problems"] = dict(list(problems.items())[:50])
    return counts


def mean_train_image(store: CacheStore, skip_corrupt: bool = False) -> tuple[np.ndarray, set[int]]:
    """Pixel-wise mean of the done train images, (3, H, W) float in [0, 1], and the samples
    left out as corrupt."""
    status, split = store.status(), store.read_all(S.SPLIT)
    done = (status == S.STATUS_DONE) & store.centre()
    idx = np.flatnonzero(done & (split == S.SPLIT_TRAIN))
    if len(idx) == 0:
        idx = np.flatnonzero(done)
    loader = CacheLoader(store.path, (), idx, 64, shuffle=False, in_memory=False, reuse_buffers=True,
                         skip_corrupt=skip_corrupt)
    total, n = np.zeros(store.meta.image_shape, np.float64), 0
    for b in loader.epoch(0):
        total += b.images.double().sum(0).numpy()
        n += len(b.indices)
    loader.close()
    return (total / max(1, n) / 255).astype(np.float32), loader.corrupt


def score_baseline(store: CacheStore, idx: np.ndarray, cfg: ScoreConfig, measures: Measures) -> tuple[dict, set[int]]:
    """The mean training image as a predictor of every scored image: the floor to beat, by every metric."""
    mean, corrupt = mean_train_image(store, cfg.skip_corrupt)
    mean = torch.from_numpy(mean)
    loader = CacheLoader(store.path, measures.judged_layers(), idx, cfg.batch_size, shuffle=False, in_memory=False,
                         reuse_buffers=True, skip_corrupt=cfg.skip_corrupt)
    parts: dict[str, list] = {}
    for b in loader.epoch(0):
        target = b.images.float() / 255
        pred = mean.expand_as(target)
        found = measure(pred, target)
        for m in measures.all(loader):
            found.update(m(pred, target, b))
        for k, v in found.items():
            parts.setdefault(k, []).append(v)
    loader.close()
    return {k: np.concatenate(v) for k, v in parts.items()}, corrupt | loader.corrupt


class Measures:
    """The metrics beyond MSE, PSNR and SSIM: LPIPS, and the backbone's top-1 and feature fidelity,
    each built once (or left out, with the reason) and run on every batch."""

    def __init__(self, cfg: ScoreConfig, store: CacheStore, device: torch.device):
        self.perceptual = Perceptual(cfg.lpips, cfg.lpips_weights, device)
        self.judge = Judge(store.meta, device) if cfg.backbone_metrics else None
        self.labels = store.read_all(S.LABELS)
        self.meta = store.meta

    def judged_layers(self, decoded: list[str] | None = None) -> tuple[str, ...]:
        """The cached layers the judge compares (all of them for the floor)."""
        if self.judge is None or not self.judge.available:
            return ()
        return tuple(self.judge.layers_for(decoded or list(self.meta.layers)))

    def loader_layers(self, decoded: list[str]) -> tuple[str, ...]:
        """The run's own layers first (the decoder's input), then the deeper ones the judge needs."""
        return (*decoded, *[l for l in self.judged_layers(decoded) if l not in decoded])

    def all(self, loader: CacheLoader, decoded: list[str] | None = None):
        """The measures of one loader's batches (the judge needs to know which features it holds)."""
        found = [self.perceptual] if self.perceptual.available else []
        if self.judge is not None and self.judge.available:
            layers = list(loader.layers)
            judged = set(self.judged_layers(decoded))

            def backbone(pred, target, batch):
                cached = {l: f for l, f in zip(layers, batch.features) if l in judged}
                return self.judge.judge(pred, target, batch.indices, self.labels[batch.indices], cached)
            found.append(backbone)
        return found

    def left_out(self) -> dict[str, str]:
        """{metric: why} for the metrics that could not be computed."""
        out = {}
        if not self.perceptual.available:
            out["LPIPS"] = self.perceptual.why
        if self.judge is None:
            out["top-1 and feature fidelity"] = "not asked for (--no-backbone-metrics)"
        elif not self.judge.available:
            out["top-1 and feature fidelity"] = self.judge.why
        return out


@dataclass
class CacheResult:
    """What one cache's share of a report holds: its runs' rows, the floor, the originals' check."""

    store: CacheStore
    idx: np.ndarray  # the samples scored (damaged ones left out)
    rows: list[dict]
    baseline: dict
    originals: dict
    recon: dict  # run -> {index: (3, H, W) uint8}
    corrupt: list[int]
    left_out: dict[str, str]


def score(cfg: ScoreConfig) -> dict:
    """Score every checkpoint on cfg.split of its cache (of cfg.cache, the one whose features it
    decodes) and write one report."""
    cfg.validate()
    device = resolve_device(cfg.device)
    found = find_checkpoints(cfg)
    names = [safe_name(name) for name, _, _ in found]
    if len(set(names)) < len(names):
        raise FeatreconError(f"two runs would share a report folder ({', '.join(names)}); score them separately")
    stores = []
    try:
        for c in cfg.cache:
            stores.append(open_cache(c))
        per_store = assign(found, stores)
        cfg.out.mkdir(parents=True, exist_ok=True)
        parts = [score_cache(cfg, store, runs, device) for store, runs in zip(stores, per_store) if runs or len(stores) == 1]
        report = write_report(cfg, parts)
    finally:
        for store in stores:
            store.close()
    return report


def assign(found: list[tuple[str, Path, dict]], stores: list[CacheStore]) -> list[list[tuple[str, Path, dict]]]:
    """Each run goes to the first cache whose features it decodes; a run no cache fits is refused."""
    per_store = [[] for _ in stores]
    for name, path, ckpt in found:
        for i, store in enumerate(stores):
            try:
                _compatible(ckpt, path, store)
            except FeatreconError as e:
                why = e
                continue
            per_store[i].append((name, path, ckpt))
            break
        else:
            if len(stores) == 1:
                raise why
            raise FeatreconError(f"{path}: none of the {len(stores)} caches gives the features it decodes (layers "
                                 f"{', '.join(ckpt['layers'])}, fingerprint {ckpt['fingerprint']}); add its cache "
                                 "with --cache")
    return per_store


def score_cache(cfg: ScoreConfig, store: CacheStore, runs: list[tuple[str, Path, dict]], device) -> CacheResult:
    """The runs that decode this cache's features, and the cache's own floor and originals."""
    idx = split_indices(store, cfg.split)
    keep = set(idx[: max(0, cfg.save)].tolist())
    measures = Measures(cfg, store, device)
    rows, recon, corrupt = [], {}, set()
    for name, path, ckpt in runs:
        model = decoder_from_checkpoint(ckpt).to(device)
        decoded = list(ckpt["layers"])
        loader = CacheLoader(store.path, measures.loader_layers(decoded), idx, cfg.batch_size, shuffle=False,
                             in_memory=False, reuse_buffers=True, skip_corrupt=cfg.skip_corrupt)
        res = evaluate(model, loader, device, keep=keep, progress=cfg.progress, desc=f"score {name}",
                       measures=measures.all(loader, decoded), inputs=len(decoded))
        loader.close()
        corrupt |= loader.corrupt
        recon[name] = res["kept"]
        rows.append({**_row(name, path, ckpt, res), "model": store.meta.backbone, "cache": str(store.path)})
        _save_pairs(store, cfg.out / safe_name(name), res["kept"])
    base, base_corrupt = score_baseline(store, idx, cfg, measures)
    corrupt |= base_corrupt
    scored = idx[~np.isin(idx, list(corrupt))]
    baseline = {"run": "mean train image", "layers": "-", "parameters": 0, "epochs": 0, "model": store.meta.backbone,
                "cache": str(store.path), "n": len(base["mse"]), **summaries(base)}
    root = cfg.images if remote.is_url(cfg.images) else (Path(cfg.images).resolve() if cfg.images else None)
    originals = check_originals(store, scored, root or Path(store.meta.source_root), cfg.progress)
    return CacheResult(store, scored, rows, baseline, originals, recon, sorted(corrupt), measures.left_out())


def summaries(values: dict[str, np.ndarray]) -> dict:
    """Each per-image metric's mean, std and 95% interval, over the images where it is defined
    (top-1 accuracy only where the label is known)."""
    return {k: summarize(v[np.isfinite(v)] if k == "top1_correct" else v) for k, v in values.items()
            if k not in ("index", "kept")}


def _compatible(ckpt: dict, path: Path, store: CacheStore) -> dict:
    layers = ckpt["layers"]
    missing = [l for l in layers if l not in store.meta.layers]
    if missing:
        raise FeatreconError(f"{path}: decodes {', '.join(missing)}, which {store.path} does not cache "
                             f"(cached: {', '.join(store.meta.layers)})")
    fp = S.feature_fingerprint(store.meta, layers)
    if fp != ckpt["fingerprint"]:
        raise FeatreconError(f"{path}: trained on features with fingerprint {ckpt['fingerprint']}, but {store.path} "
                             f"gives {fp} (other weights, preprocessing or layer shapes); score it on a matching cache")
    return ckpt


def _row(name: str, path: Path, ckpt: dict, res: dict) -> dict:
    metrics = {k: v for k, v in res.items() if k not in ("index", "kept")}
    return {"run": name, "checkpoint": str(path), "layers": "+".join(ckpt["layers"]),
            "parameters": ckpt.get("n_parameters", 0), "epochs": ckpt["epoch"], "n": int(len(res["index"])),
            "trained": trained_on(ckpt), **summaries(res),
            "per_image": {"index": res["index"].tolist(), **{k: v.tolist() for k, v in metrics.items()}}}


def trained_on(ckpt: dict) -> dict:
    """How a run was trained, from its own checkpoint (not from the cache being scored): the decoder,
    its window and width, and the cache and views it read."""
    cfg, meta = ckpt.get("train_config", {}), ckpt.get("cache_meta", {})
    return {"arch": ckpt.get("decoder_config", {}).get("arch", "upconv"), "crop": cfg.get("crop"),
            "width": cfg.get("width"), "loss": cfg.get("loss", "mse"), "cache": meta.get("cache", cfg.get("cache")),
            "views": meta.get("views")}


def _save_pairs(store: CacheStore, folder: Path, kept: dict[int, np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in kept.items():
        save_png(store.read(S.IMAGES, i, i + 1)[0], folder / f"original_{i}.png")
        save_png(img, folder / f"reconstruction_{i}.png")


