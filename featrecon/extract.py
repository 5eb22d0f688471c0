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
import torchvision
from tqdm import tqdm

from . import FeatreconError, __version__, remote
from . import schema as S
from .backbone import (FeatureExtractor, check_weights, fingerprint, load_resnet50, preprocessing_for, resolve_device,
                       resolve_layers)
from .distributed import Group, join, leave
from .data import (SAMPLE_IMAGES, ImageDataset, assign_split, collate_images, discover_images, labels_for,
                   sample_images_root)
from .schema import CacheMeta, Codec
from .lock import WriterLock
from .storage import CACHE, CacheStore, check_replaceable, create_cache, format_for, open_cache
# The writer thread and the forward engines have modules of their own; their names stay
# importable from here, where the stage's callers look for them.
from .forward import CompiledForward, GpuForward, to_host_async, to_storage  # noqa: F401
from .shard_writer import ShardWriter
from .views import Views, auto_views
from .views import plan as plan_views

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractConfig:
    out: Path  # cache path: a .zarr folder, or a .h5 file
    images: Path | None = None  # source folder; None = scikit-image's bundled sample photos
    layers: str = "all"  # all, or comma list of stem/layer1..4/torchvision node names
    weights: str = "auto"  # see backbone.WEIGHTS_HELP
    size: int | None = None  # crop size; None = the weights' own (224)
    dtype: str = "float16"  # stored feature dtype
    codec: str = "zstd:1"  # compression, see schema.CODEC_CHOICES
    fmt: str | None = None  # "zarr" or "hdf5"; None = from the suffix of `out`
    batch_size: int | None = None  # images per forward; None: 8 on a CPU (fastest there), 128 on a GPU
    workers: int | None = None  # decode processes (0 = in the main process); None: see `auto_workers`
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    autocast: str = "none"  # none, bf16 or fp16 compute
    channels_last: bool = True  # NHWC convolutions: about 1.5x faster on CPU and GPU
    holdout_fraction: float = 0.1  # share of ids (by hash) held out for scoring
    labels: Path | None = None  # CSV path,label or the ILSVRC2012 devkit ground truth
    class_map: Path | None = None  # devkit id -> wnid mapping for the ground truth file
    limit: int | None = None  # only the first N images (sorted ids)
    views: int | None = 0  # extra random-resized views per image (see `views`); None: auto, by the image count (the CLI default)
    overwrite: bool = False  # replace an existing cache instead of resuming it
    shard_size: int = S.DEFAULT_SHARD_SIZE  # samples per shard / per write
    progress: bool = True  # tqdm bar
    compile: str = "auto"  # CPU forward through torch.compile: yes, no, or auto (runs of COMPILE_AUTO_MIN images or more)


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
        n, t = self.processed - self.stats.get("first_batch_images", 0), self.seconds - self.stats.get("first_batch_seconds", 0.0)
        return n / t if n > 0 and t > 0 else self.images_per_s

    def summary(self) -> dict:
        return {"path": str(self.path), "n": self.n, "done": self.done, "skipped": len(self.skipped),
                "overflow": self.overflow, "processed": self.processed, "seconds": self.seconds,
                "images_per_s": self.images_per_s, "steady_images_per_s": self.steady_images_per_s,
                "weights": self.weights, **self.stats}


def _source(cfg: ExtractConfig) -> tuple[Path, list[str]]:
    root = sample_images_root() if cfg.images is None else cfg.images.expanduser().resolve()
    return root, discover_images(root, cfg.limit, only=SAMPLE_IMAGES if cfg.images is None else None)


def auto_workers(device: torch.device) -> int:
    """Decode processes when --workers is not given. On a CPU the backbone needs the cores:
    two. A GPU leaves the CPU to decoding and compression: all cores but two, at most 32
    (on an H100 machine 15 decode processes gave 2,700 ImageNet photos/s, the forward 7,700)."""
    cores = os.cpu_count() or 1
    return min(2, cores) if device.type == "cpu" else max(2, min(32, cores - 2))


def with_device_defaults(cfg: ExtractConfig, device: torch.device) -> ExtractConfig:
    return dataclasses.replace(
        cfg, batch_size=cfg.batch_size or (8 if device.type == "cpu" else 128),
        workers=auto_workers(device) if cfg.workers is None else cfg.workers)


# Below this many images, --compile auto runs eagerly: compiling (10-25 s) saved 4-5 ms per
# image of extraction on a 2-core CPU, so it pays for itself after some 2,000-5,000 images.
COMPILE_AUTO_MIN = 3000
MAX_VIEWS = 256


def use_compile(choice: str, n_images: int) -> bool:
    if choice not in ("auto", "yes", "no"):
        raise FeatreconError(f"--compile {choice!r}: choose auto, yes or no")
    return choice == "yes" or (choice == "auto" and n_images >= COMPILE_AUTO_MIN)


def _check_config(cfg: ExtractConfig) -> None:
    if cfg.dtype not in S.FEATURE_DTYPES:
        raise FeatreconError(f"--dtype {cfg.dtype!r}: choose one of {', '.join(S.FEATURE_DTYPES)}")
    Codec.parse(cfg.codec)
    format_for(cfg.out, cfg.fmt)
    if (cfg.batch_size is not None and cfg.batch_size < 1) or cfg.shard_size < 1:
        raise FeatreconError("--batch-size and --shard-size must be at least 1")
    if cfg.workers is not None and cfg.workers < 0:
        raise FeatreconError(f"--workers {cfg.workers}: must be 0 (decode in the main process) or more")
    if cfg.views is not None and not 0 <= cfg.views <= MAX_VIEWS:
        raise FeatreconError(f"--views {cfg.views}: must be auto or 0 to {MAX_VIEWS} extra views per image")
    if cfg.limit is not None and cfg.limit < 1:
        raise FeatreconError(f"--limit {cfg.limit}: must be at least 1")
    if cfg.size is not None and cfg.size < 32:
        raise FeatreconError(f"--size {cfg.size}: must be at least 32 (layer4 has stride 32)")
    if not 0.0 <= cfg.holdout_fraction < 1.0:
        raise FeatreconError(f"--holdout-fraction {cfg.holdout_fraction}: must be in [0, 1)")
    if cfg.autocast not in ("none", "bf16", "fp16"):
        raise FeatreconError(f"--autocast {cfg.autocast!r}: choose none, bf16 or fp16")
    for flag, path in (("--labels", cfg.labels), ("--class-map", cfg.class_map)):
        if path is not None and not Path(path).is_file():
            raise FeatreconError(f"{flag} {path}: file not found")
    if cfg.images is not None and not Path(cfg.images).expanduser().is_dir():
        raise FeatreconError(f"--images {cfg.images}: folder does not exist" if not Path(cfg.images).exists()
                             else f"--images {cfg.images}: not a folder; point it at a folder of images")
    use_compile(cfg.compile, 0)
    check_weights(cfg.weights)
    resolve_device(cfg.device)
    _check_out(cfg.out)
    _check_out_is_not_source(cfg.out, sample_images_root() if cfg.images is None else Path(cfg.images))
    with torch.device("meta"):  # layer names checked on an empty model: no weights loaded or downloaded
        resolve_layers(cfg.layers, torchvision.models.resnet50())


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
    return CacheMeta(
        n=len(ids) * (views + 1), views=views, layers=extractor.layer_shapes(pre.crop), nodes=dict(extractor.layers), weights=weights,
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
        old, new = store.meta.identity(), meta.identity()
        diffs = [k for k in new if old.get(k) != new[k]]
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


def image_loader(root: Path, ids: list[str], indices: list[int], pre, batch_size: int, workers: int,
                 device: torch.device, views: Views | None = None) -> torch.utils.data.DataLoader:
    """Batches (indices, uint8 images, skip reasons) of `ids[indices]` (per-sample ids, with
    their `views`), in order, decoded by `workers` processes (pinned for a GPU)."""
    return torch.utils.data.DataLoader(
        ImageDataset(root, ids, indices, pre, views), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=collate_images, pin_memory=device.type == "cuda", worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is PIL work; leave the cores to the forward


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
    model, weights = load_resnet50(cfg.weights)
    weights_fp = fingerprint(model)
    pre = preprocessing_for(weights, cfg.size)  # the recorded name: the weights' own recipe, else 256/224
    extractor = FeatureExtractor(model, resolve_layers(cfg.layers, model), pre, cfg.channels_last, cfg.autocast).to(device)
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
    # Compression threads: one zstd thread manages about 0.5 GB/s, and a GPU backbone asking
    # for every layer produces several GB/s. They work on whole shards handed over by the
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
    # (layer3, 240 images: 27.8/26.8 img/s with one, 26.4/26.3 with four).
    writer = ShardWriter(store, shards, disk_threads=1 if device.type == "cpu" else 4)
    writer.start()
    t0, forward_s, wait_s = time.perf_counter(), 0.0, 0.0
    warm = {}  # the first batch: worker start-up and one-off kernel set-up, as in any benchmark's warm-up
    bar = tqdm(total=len(indices), unit="img", desc=f"extract {remote.name(cfg.out)}", disable=not cfg.progress, smoothing=0.1)
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
        log.warning("... and %d more skipped files (listed in the cache's '%s' attribute)", len(r.skipped) - 10, S.SKIPPED_ATTR)
    for layer, n in r.overflow.items():
        log.warning("%s: %d values exceeded float16's range (stored as inf); consider --dtype float32", layer, n)
