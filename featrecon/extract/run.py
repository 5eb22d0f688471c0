"""Stage 1: one backbone pass over an image set into a feature cache.

Three things run at once: DataLoader workers decode images, the main thread runs
the truncated backbone, and a `ShardWriter` thread compresses and writes whole
shards, so the forward never waits for the disk. A shard is marked done only
after its data is written; a rerun with the same arguments recomputes the shards
that are not done and leaves the rest alone.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import errno
import hashlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..cache import remote
from ..cache import schema as S
from ..cache.base import CACHE, CacheStore
from ..cache.factory import check_replaceable, create_cache, format_for, open_cache
from ..cache.lock import WriterLock
from ..cache.schema import CacheMeta, Codec, Views
from ..cache.split import assign_split
from ..cache.writer import ShardWriter
from ..device import resolve_device
from ..distributed import Group, join, leave
from ..errors import FeatreconError
from ..version import __version__
from .backbone import (
    FeatureExtractor,
    fingerprint,
    is_named_weights,
    load_backbone,
    named_weights,
    preprocessing_for,
    resolve_layers,
)
from .config import ExtractConfig, auto_workers, use_compile
from .forward import CompiledForward, GpuForward, to_storage
from .images import SAMPLE_IMAGES, discover_images, image_loader, labels_for, sample_images_root
from .models import build, check_size, family_of
from .views import auto_views
from .views import plan as plan_views

log = logging.getLogger(__name__)


@dataclass
class ExtractResult:
    path: Path
    n: int  # samples in the cache
    done: int  # written and valid
    skipped: dict[str, str]  # id -> reason
    overflow: dict[str, int]  # layer -> values that overflowed float16 (stored as inf)
    processed: int  # images run through the backbone in this call
    seconds: float  # wall time of the decode/forward/write loop in this call
    weights: str = ""
    stats: dict = field(default_factory=dict)
    ranks: list[dict] = field(default_factory=list)  # under torchrun, on rank 0: every rank's summary
    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else float("nan")

    @property
    def steady_images_per_s(self) -> float:
        """images/s after the first batch (worker start-up, one-off kernel set-up), the way a
        benchmark of the bare forward leaves out its warm-up batch. The final writes count."""
        n = self.processed - self.stats.get("first_batch_images", 0)
        t = self.seconds - self.stats.get("first_batch_seconds", 0.0)
        return n / t if n > 0 and t > 0 else self.images_per_s

    def summary(self) -> dict:
        return {"path": str(self.path), "n": self.n, "done": self.done, "skipped": len(self.skipped),
                "overflow": self.overflow, "processed": self.processed, "seconds": self.seconds,
                "images_per_s": self.images_per_s, "steady_images_per_s": self.steady_images_per_s,
                "weights": self.weights, **self.stats}


def _source(cfg: ExtractConfig) -> tuple[Path, list[str]]:
    root = sample_images_root() if cfg.images is None else cfg.images.expanduser().resolve()
    return root, discover_images(root, cfg.limit, only=SAMPLE_IMAGES if cfg.images is None else None)


def with_device_defaults(cfg: ExtractConfig, device: torch.device) -> ExtractConfig:
    return dataclasses.replace(
        cfg, batch_size=cfg.batch_size or (8 if device.type == "cpu" else 128),
        workers=auto_workers(device.type) if cfg.workers is None else cfg.workers)


def _check_config(cfg: ExtractConfig) -> None:
    """Every setting checked before weights, images or caches are touched."""
    cfg.validate()
    format_for(cfg.out, cfg.fmt)
    resolve_device(cfg.device)
    _check_out(cfg.out)
    _check_out_is_not_source(cfg.out, sample_images_root() if cfg.images is None else Path(cfg.images))
    family_of(cfg.model)
    if is_named_weights(cfg.weights):
        named_weights(cfg.model, cfg.weights)
    check_size(cfg.model, input_size(cfg))
    with torch.device("meta"):  # layer names checked on an empty model: no weights loaded or downloaded
        model = build(cfg.model, input_size(cfg))
    resolve_layers(cfg.layers, model, cfg.model)


def input_size(cfg: ExtractConfig) -> int:
    """The crop the network sees: --size, else the weights' own (224 for random weights and files)."""
    if cfg.size:
        return cfg.size
    named = cfg.weights if is_named_weights(cfg.weights) else ("DEFAULT" if cfg.weights == "auto" else "random")
    return preprocessing_for(named, None, cfg.model).crop


def _check_out(out: Path | str) -> None:
    """--out must be creatable: its nearest existing ancestor a writable folder (a URL is
    checked when the store is opened)."""
    if remote.is_url(out):
        return
    parent = Path(out).expanduser().absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise FeatreconError(f"--out {out}: cannot be created under {parent} (not a writable folder); choose another --out")


def build_meta(cfg: ExtractConfig, extractor: FeatureExtractor, weights: str, weights_fp: str, pre,
               root: Path, ids: list[str], label_source: str, views: int = 0) -> CacheMeta:
    """`ids`: the source images; the cache holds views + 1 samples of each."""
    shapes = extractor.layer_shapes(pre.crop)
    return CacheMeta(
        n=len(ids) * (views + 1), views=views, layers=shapes, nodes=dict(extractor.layers), weights=weights,
        backbone=cfg.model, strides={l: pre.crop // s[1] for l, s in shapes.items()}, layouts=extractor.layout_notes(),
        weights_fingerprint=weights_fp, preprocessing=pre, dtype=cfg.dtype, codec=str(Codec.parse(cfg.codec)),
        autocast=cfg.autocast, source_root=str(root), holdout_fraction=cfg.holdout_fraction,
        ids_sha256=hashlib.sha256("\n".join(ids).encode()).hexdigest(), shard_size=cfg.shard_size,
        label_source=label_source, tool_version=__version__, extra={S.EVERY_SMALL_CHUNK: True},
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def open_or_create(cfg: ExtractConfig, meta: CacheMeta, ids: list[str], labels: np.ndarray, split: np.ndarray,
                   views: Views | None = None) -> CacheStore:
    """Resume a compatible cache at cfg.out, or create one. Never mixes settings silently, and
    never replaces anything but an empty folder or a featrecon cache (`--overwrite`). The caller
    holds the writer lock."""
    out = cfg.out
    if not remote.is_url(out):
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FeatreconError(f"--out {out}: cannot create its folder ({e.strerror})") from None
        if not os.access(out.parent, os.W_OK):
            raise FeatreconError(f"--out {out}: folder {out.parent} is not writable; choose another --out")
    state = check_replaceable(out, cfg.overwrite)
    if state == CACHE and not cfg.overwrite:
        store = open_cache(out, "r+", cfg.fmt)
        diffs = store.meta.resumable_by(meta)
        if diffs:
            store.close()
            raise FeatreconError(
                f"--out {out} holds a cache made with other settings ({', '.join(diffs)} differ); "
                "pass --overwrite to replace it, or choose another --out")
        if not remote.is_url(out) and out.is_dir():
            for partial in out.rglob("*.partial"):  # temp files of a killed writer (we hold the lock: no live one)
                partial.unlink()
        return store
    return create_cache(out, meta, ids, labels, split, cfg.fmt, views)


def _check_out_is_not_source(out, images: Path) -> None:
    """--out must not be, nor hold, the source images: replacing it would delete them."""
    if remote.is_url(out):
        return
    out, images = Path(out).expanduser().resolve(), images.expanduser().resolve()
    if out == images or out in images.parents:
        raise FeatreconError(f"--out {out}: it {'is' if out == images else 'holds'} the --images folder {images}; "
                             "write the cache elsewhere")


def _disk_error(e: OSError, out: Path) -> FeatreconError:
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return FeatreconError(f"--out {out}: disk full while writing; free space and rerun the same command "
                              "(finished shards are kept and the run resumes)")
    return FeatreconError(f"--out {out}: write failed ({e.strerror or e}); rerun the same command to resume")


def extract(cfg: ExtractConfig) -> ExtractResult:
    """Run the backbone over the images of `cfg` and fill (or resume) the cache at `cfg.out`."""
    _check_config(cfg)
    root, ids = _source(cfg)
    labels, label_source = labels_for(ids, cfg.labels, cfg.class_map)
    k = auto_views(len(ids)) if cfg.views is None else cfg.views
    if cfg.views is None and k:
        log.info("%d images: %d extra random-resized views of each for training (--views auto; --views 0 turns "
                 "them off); only centre crops are scored", len(ids), k)
    group = join(resolve_device(cfg.device))  # under torchrun: this process's rank and GPU
    try:
        return _extract(cfg, group, root, ids, labels, label_source, k)
    finally:
        leave(group)


def _extract(cfg: ExtractConfig, group: Group, root: Path, ids: list[str], labels: np.ndarray,
             label_source: str, k: int) -> ExtractResult:
    """One process's part of `extract`: all of it, or under torchrun every world-th pending shard."""
    device = group.device
    if group.active and format_for(cfg.out, cfg.fmt) != "zarr":
        raise FeatreconError(f"--out {cfg.out}: several processes write only Zarr caches (HDF5's parallel "
                             "writing needs MPI); give --out a .zarr path, or run one process")
    cfg = with_device_defaults(cfg, device)
    model, weights = load_backbone(cfg.model, cfg.weights, input_size(cfg))
    weights_fp = fingerprint(model)
    pre = preprocessing_for(weights, cfg.size, cfg.model)  # the recorded name: the weights' own recipe, else 256/224
    extractor = FeatureExtractor(model, resolve_layers(cfg.layers, model, cfg.model), pre, cfg.channels_last,
                                 cfg.autocast, cfg.model).to(device)
    meta = build_meta(cfg, extractor, weights, weights_fp, pre, root, ids, label_source, k)
    sample_ids, views = plan_views(ids, k, pre.resize, pre.crop)  # a source's views share its split and label
    split = assign_split(sample_ids, cfg.holdout_fraction)
    # Rank 0 alone creates (or checks and resumes) the store and lists the shards still to do;
    # the others open it after that, and take every world-th shard of the same list.
    # Rank 0 holds the cache's writer lock for the whole job: torchrun's ranks are one writer.
    problem, shards, lock = None, None, WriterLock(cfg.out)
    if group.main:
        try:
            lock.acquire()
            store = open_or_create(cfg, meta, sample_ids, np.repeat(labels, k + 1), split, views)
            shards = pending_shards(store)
        except FeatreconError as e:
            problem = str(e)
        except BaseException:
            lock.release()
            raise
        if problem is not None:
            lock.release()
    problem, shards = group.broadcast((problem, shards))
    if problem is not None:
        raise FeatreconError(problem if group.main else f"rank 0 stopped: {problem}")
    if not group.main:
        store = open_cache(cfg.out, "r+", cfg.fmt)
    try:
        if group.main and len(shards) < len(meta.shards()):
            log.info("resuming %s: %d of %d shards already written", cfg.out, len(meta.shards()) - len(shards),
                     len(meta.shards()))
        result = _run(cfg, store, extractor, device, root, sample_ids, views, shards[group.rank::group.world], group)
        if group.active:
            log.info("rank %d: %d images in %.1f s", group.rank, result.processed, result.seconds)
        ranks = group.gather(result.summary())  # every rank's shards are written ...
        if group.main:  # ... before one process gathers their records
            store.merge_records()
            result = _finish(result, store)
            result.ranks = ranks
        group.barrier()
        return result
    finally:
        store.close()
        lock.release()


def pending_shards(store: CacheStore) -> list[int]:
    status = store.status()
    return [k for k in store.meta.shards() if (status[slice(*store.meta.shard_bounds(k))] == S.STATUS_PENDING).any()]


def _run(cfg: ExtractConfig, store: CacheStore, extractor: FeatureExtractor, device: torch.device,
         root: Path, ids: list[str], views: Views | None, shards: list[int], group: Group) -> ExtractResult:
    """Write `shards` (this process's share of the pending ones)."""
    meta = store.meta
    indices = [i for k in shards for i in range(*meta.shard_bounds(k))]
    if group.active:
        log.info("rank %d of %d: %d shards (%d samples)", group.rank, group.world, len(shards), len(indices))
    loader = image_loader(root, ids, indices, meta.preprocessing, cfg.batch_size, cfg.workers, device, views)
    batches = iter(loader)  # fork the workers before the writer thread exists
    # Compression threads: one zstd thread cannot keep up with a GPU backbone asking for every
    # layer (benchmarks/DESIGN.md). They work on whole shards handed over by the
    # one writer, so no two threads ever write parts of the same shard.
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="compress")
    store.pool = pool
    gpu = None
    if device.type == "cuda":  # graphs pay for their capture (a few forwards) only on longer runs
        gpu = GpuForward(extractor, meta.dtype, cfg.batch_size, meta.image_shape[1], device,
                         graphs=2 if len(indices) >= 8 * cfg.batch_size else 0)
    compiled = None
    if device.type == "cpu" and use_compile(cfg.compile, len(indices)):
        log.info("compiling the forward with torch.compile (10-25 s; --compile no skips it)")
        compiled = CompiledForward(extractor, meta.dtype, cfg.batch_size, meta.image_shape[1])
        log.info("compiled in %.1f s", compiled.compile_seconds)
    # On a CPU the backbone is the limit and more writer threads only take its cores
    # (benchmarks/DESIGN.md).
    writer = ShardWriter(store, shards, disk_threads=1 if device.type == "cpu" else 4)
    writer.start()
    t0, forward_s, wait_s = time.perf_counter(), 0.0, 0.0
    warm = {}  # the first batch: worker start-up and one-off kernel set-up, as in any benchmark's warm-up
    bar = tqdm(total=len(indices), unit="img", desc=f"extract {remote.name(cfg.out)}", disable=not cfg.progress,
               smoothing=0.1)
    try:
        tw = time.perf_counter()
        for idx, images, reasons in batches:
            tf = time.perf_counter()
            wait_s += tf - tw
            if gpu is not None:
                arrays, overflow, ready = gpu(images)
            elif compiled is not None:
                (arrays, overflow), ready = compiled(images), None
            else:
                (arrays, overflow), ready = to_storage(extractor(images.to(device)), meta.dtype), None
            arrays[S.IMAGES] = images.numpy()
            forward_s += time.perf_counter() - tf
            writer.put((idx.numpy(), arrays, reasons, overflow, [ids[i] for i in idx.tolist()], ready))
            bar.update(len(idx))
            if not warm:
                warm = {"images": len(idx), "seconds": time.perf_counter() - t0}
            tw = time.perf_counter()
        tail = time.perf_counter()
        writer.finish()
        tail = time.perf_counter() - tail
    except OSError as e:
        raise _disk_error(e, cfg.out) from None
    finally:
        bar.close()
        del batches
        store.pool = None
        pool.shutdown()
    seconds = time.perf_counter() - t0
    return ExtractResult(
        path=cfg.out, n=meta.n, done=0, skipped={}, overflow={}, processed=len(indices), seconds=seconds,
        weights=meta.weights,
        stats={"rank": group.rank, "world_size": group.world, "shards": list(shards),
               "forward_seconds": forward_s, "loader_wait_seconds": wait_s, "write_seconds": writer.write_seconds,
               "final_write_seconds": tail, "shards_written": writer.written,
               "compile_seconds": compiled.compile_seconds if compiled is not None else 0.0,
               "first_batch_images": warm.get("images", 0), "first_batch_seconds": warm.get("seconds", 0.0)})


def _finish(result: ExtractResult, store: CacheStore) -> ExtractResult:
    """The whole cache's counts (after the records are merged), reported."""
    status = store.status()
    result = dataclasses.replace(result, done=int((status == S.STATUS_DONE).sum()), skipped=store.skipped(),
                                 overflow=store.overflow_totals())
    _report(result)
    return result


def _report(r: ExtractResult) -> None:
    log.info("%s: %d of %d samples done, %d skipped; %d images in %.1f s (%.1f images/s)",
             r.path, r.done, r.n, len(r.skipped), r.processed, r.seconds, r.images_per_s)
    for image_id, reason in list(r.skipped.items())[:10]:
        log.warning("skipped %s: %s", image_id, reason)
    if len(r.skipped) > 10:
        log.warning("... and %d more skipped files (listed in the cache's '%s' attribute)", len(r.skipped) - 10,
                    S.SKIPPED_ATTR)
    for layer, n in r.overflow.items():
        log.warning("%s: %d values exceeded float16's range (stored as inf); consider --dtype float32", layer, n)
