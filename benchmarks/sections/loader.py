"""Section 3: the training loader against the codec's own limit, and the codec choice for training.

For layer1 and layer3, each with the images every batch carries, over the whole cache:
- the limit: the same shard files, every chunk decompressed by the codec library alone
  (python-zstandard for zstd, numcodecs for blosc) on all cores straight into a batch-shaped
  buffer, no checksum checked (no zarr, no featrecon code); each shard read whole into a
  reused buffer, or chunk by chunk through its index, whichever is faster;
- featrecon's loader (streaming, batches of `batch`) with the global shuffle (every batch
  from the whole set; single chunks) on one thread and on all cores, with the windowed
  shuffle, and in memory (decoded once, then gathered);
- what a user would write instead: one .npy file per sample and array, read by a torch
  DataLoader with two worker processes and shuffle=True;
- how well each shuffles: distinct shards per batch against a uniform draw's expectation;
- tensorstore's zarr3 driver (whole shards, twice the cores in flight), the engine the
  loader was first meant to use, where it is installed;
- zarr-python reading whole shards on four threads, each copied into a batch: the read
  path of the loader before this one.
Every rate is the best of `passes` passes over the data (page cache warm after the first), each pass
the second epoch of a reader opened for it (a run's every epoch after its first).
"""

from __future__ import annotations

import importlib.util
import json
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from featrecon.cache import schema as S
from featrecon.cache.factory import create_cache, open_cache
from featrecon.cache.loader import CacheLoader, bytes_per_sample
from featrecon.cache.schema import Codec

from ..common import disk_bytes, log

TRAINING_CODECS = ("zstd:3", "zstd:1", "zstd:-1", "zstd:-3", "zstd:-7", "lz4", "none")
LAYERS = ("layer1", "layer3")


def _best(fn, passes: int) -> float:
    """The highest rate of `passes` calls of fn() -> (samples, seconds)."""
    return _interleaved({"x": fn}, passes)["x"]


def _interleaved(readers: dict, passes: int) -> dict[str, float]:
    """Each reader's highest rate over `passes` rounds, every round running each reader once in
    turn, so a slow minute on a shared machine costs every reader alike."""
    best = {k: 0.0 for k in readers}
    for _ in range(passes):
        for k, fn in readers.items():
            n, dt = fn()
            best[k] = max(best[k], n / dt)
    return best


class _ZstdDecode:
    """python-zstandard's stream reader into the row, one decompressor per thread: the fastest zstd
    decode into a given buffer we know (numcodecs' Zstd.decode spends more of the GIL per chunk)."""

    def __init__(self):
        import zstandard

        self.local, self.new = threading.local(), zstandard.ZstdDecompressor

    def decode(self, chunk, out):
        d = self.local.__dict__.get("d") or self.local.__dict__.setdefault("d", self.new())
        with d.stream_reader(chunk) as r:
            r.readinto(memoryview(out).cast("B"))


def _compressor(zarr_json: dict):
    """A decoder for an array's inner chunks (None: stored raw), and whether a crc32c trails
    each chunk."""
    import numcodecs

    inner = zarr_json["codecs"][0]["configuration"]["codecs"][1:]
    checksum = bool(inner) and inner[-1]["name"] == "crc32c"
    inner = inner[:-1] if checksum else inner
    if not inner:
        return None, checksum
    spec = inner[0]
    if spec["name"] == "zstd":
        return _ZstdDecode(), checksum
    return numcodecs.Blosc(), checksum  # blosc frames describe themselves


def codec_limit(cache: Path, names: list[str], batch: int, threads: int, read: str = "whole") -> tuple[int, float]:
    """(samples, seconds) for reading and decompressing every shard of `names` with the codec alone,
    on `threads` threads, each chunk into its row of a batch-sized buffer. `read`: how the codec gets
    each shard's bytes:
    - "whole": each shard read whole into a reused buffer;
    - "chunks": its chunks read one by one through its index into a reused buffer of one chunk (which
      stays in the CPU's cache while the codec reads it: on layer1's 38 MB shards that was faster than
      the whole read, and the loader reading single chunks beat a whole-shard-only limit);
    - "mapped": each shard file mapped into memory and its chunks decompressed in place, no copy (the
      loader reads this way since it beat the "chunks" limit); the files are mapped and their pages
      touched before the clock starts, as in the loader's second epoch."""
    jobs = []
    for name in names:
        meta = json.loads((cache / name / "zarr.json").read_text())
        per_shard = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
        comp, checksum = _compressor(meta)
        shape, dtype = meta["shape"][1:], np.dtype(meta["data_type"])
        tail = "/".join(["0"] * len(shape))  # shard k of an (N, ...) array is c/k/0/0/0
        for path in sorted((cache / name / "c").glob(f"*/{tail}"), key=lambda p: int(p.parts[-1 - len(shape)])):
            mapped = None
            if read == "mapped":
                with open(path, "rb") as f:
                    mapped = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)
                int(mapped[::4096].sum())  # every page touched: mapped in this process, as a loader's later epochs
            jobs.append((name, path, mapped, per_shard, comp, checksum, shape, dtype))
    local = threading.local()  # each thread decodes into batch buffers of its own

    def into(size: int) -> np.ndarray:
        """This thread's reused read buffer, at least `size` bytes: a fresh array per read (np.fromfile)
        costs a page fault per 4 KiB, which made a whole-shard limit slower than the loader on layer1."""
        if local.__dict__.get("raw") is None or len(local.raw) < size:
            local.raw = np.empty(max(size, 1 << 20), np.uint8)
        return local.raw[:size]

    def decode(job) -> int:
        name, path, mapped, per_shard, comp, checksum, shape, dtype = job
        buffers = local.__dict__.setdefault("buffers", {})
        if name not in buffers:
            buffers[name] = np.empty((batch, *shape), dtype)
        out = buffers[name]
        fd = os.open(path, os.O_RDONLY) if mapped is None else -1
        try:
            n_index = 16 * per_shard + 4
            if mapped is not None:
                data = mapped
                index = data[-n_index:-4].view("<u8").reshape(-1, 2)
            elif read == "chunks":
                index = np.frombuffer(os.pread(fd, n_index, os.fstat(fd).st_size - n_index)[:-4], "<u8").reshape(-1, 2)
            else:
                data = into(os.fstat(fd).st_size)
                data = data[: os.preadv(fd, [data], 0)]
                index = data[-n_index:-4].view("<u8").reshape(-1, 2)
            n = 0
            for offset, nbytes in index.tolist():
                if offset == 2**64 - 1:
                    continue
                if read == "chunks":
                    chunk = into(nbytes)
                    chunk = chunk[: os.preadv(fd, [chunk], offset)]
                else:
                    chunk = data[offset: offset + nbytes]
                chunk = chunk[: nbytes - (4 if checksum else 0)]
                row = out[n % batch]
                if comp is None:
                    row.reshape(-1).view(np.uint8)[...] = chunk
                else:
                    comp.decode(chunk, out=row)
                n += 1
        finally:
            if fd >= 0:
                os.close(fd)
        return n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(decode, jobs))
    return total // len(names), time.perf_counter() - t0


def loader_rate(cache: Path, layer: str, batch: int, threads: int, in_memory: bool = False,
                mode: str = "global", order: list | None = None) -> tuple[int, float]:
    """(samples, seconds) of the loader's second epoch, as a training run reads every epoch after its
    first: the loader opened once (its arrays, shard indexes, threads and buffers) and the first epoch
    untimed. With `order`, the timed batches' sample indices are kept there."""
    with open_cache(cache) as store:
        idx = np.arange(store.meta.n)
    loader = CacheLoader(cache, (layer,), idx, batch, shuffle=True, seed=0, in_memory=in_memory, threads=threads,
                         reuse_buffers=True, mode=mode)
    try:
        for _ in loader.epoch(0):  # RAM mode: this decodes everything once, as a run does before its epochs
            pass
        t0 = time.perf_counter()
        n = 0
        for b in loader.epoch(1):
            n += len(b.indices)
            if order is not None:
                order.append(b.indices.copy())
        return n, time.perf_counter() - t0
    finally:
        loader.close()


def write_npy_samples(cache: Path, layer: str, folder: Path) -> int:
    """Every sample's features and image as one .npy file each, as a user would lay them out."""
    with open_cache(cache) as store:
        n = store.meta.n
        feats, images = store.read_all(S.feature_path(layer)), store.read_all(S.IMAGES)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        np.save(folder / f"{i:06d}_feat.npy", feats[i])
        np.save(folder / f"{i:06d}_image.npy", images[i])
    return n


class NpySamples:
    """torch Dataset over the .npy files of `write_npy_samples`."""

    def __init__(self, folder: Path, n: int):
        self.folder, self.n = folder, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        import torch

        return (i, torch.from_numpy(np.load(self.folder / f"{i:06d}_feat.npy")),
                torch.from_numpy(np.load(self.folder / f"{i:06d}_image.npy")))


def npy_rate(folder: Path, n: int, batch: int, order: list | None = None) -> tuple[int, float]:
    """(samples, seconds) of the second shuffled epoch through a torch DataLoader with 2 persistent workers
    (started, and the first epoch run, untimed: the same footing as `loader_rate`)."""
    import torch

    loader = torch.utils.data.DataLoader(NpySamples(folder, n), batch_size=batch, shuffle=True, num_workers=2,
                                         generator=torch.Generator().manual_seed(0), persistent_workers=True)
    for _ in loader:
        pass
    t0 = time.perf_counter()
    count = 0
    for idx, _feats, _images in loader:
        count += len(idx)
        if order is not None:
            order.append(idx.numpy())
    dt = time.perf_counter() - t0
    del loader  # its workers exit
    return count, dt


def uniform_distinct(n: int, per_shard: int, batch: int) -> float:
    """Expected distinct shards in a batch drawn uniformly without replacement from n samples in
    shards of `per_shard` (the last one may be short: counted as full, a small overestimate)."""
    from math import comb

    shards = -(-n // per_shard)
    batch = min(batch, n)
    return shards * (1 - comb(max(0, n - per_shard), batch) / comb(n, batch))


def distinct_per_batch(orders: list[np.ndarray], per_shard: int, batch: int) -> float:
    full = [o for o in orders if len(o) == batch] or orders  # a set smaller than a batch: its one batch
    return float(np.mean([len(np.unique(o // per_shard)) for o in full]))


def tensorstore_rate(cache: Path, names: list[str], threads: int) -> tuple[int, float]:
    import tensorstore as ts

    ctx = ts.Context({"data_copy_concurrency": {"limit": threads}, "file_io_concurrency": {"limit": 4 * threads},
                      "cache_pool": {"total_bytes_limit": 0}})
    arrays = [ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(cache / n)}}, context=ctx,
                      read=True).result() for n in names]
    n, per_shard = arrays[0].shape[0], arrays[0].chunk_layout.write_chunk.shape[0]
    starts = list(range(0, n, per_shard))
    ahead = 2 * threads
    t0 = time.perf_counter()
    def read(s: int) -> list:
        return [a[s: min(n, s + per_shard)].read() for a in arrays]

    pending = [read(s) for s in starts[:ahead]]
    for i in range(len(starts)):
        for f in pending[i]:
            f.result()
        pending[i] = None
        if i + ahead < len(starts):
            pending.append(read(starts[i + ahead]))
    return n, time.perf_counter() - t0


def zarr_python_rate(cache: Path, names: list[str], batch: int) -> tuple[int, float]:
    """The previous loader's read path: zarr-python whole-shard reads on four threads, then a copy."""
    with open_cache(cache) as store:
        meta = store.meta
        out = {name: None for name in names}

        def read(k):
            lo, hi = meta.shard_bounds(k)
            for name in names:
                data = store.read(name, lo, hi)
                if out[name] is None:
                    out[name] = np.empty((batch, *data.shape[1:]), data.dtype)
                out[name][: hi - lo] = data[: batch]
            return hi - lo

        t0 = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            n = sum(pool.map(read, meta.shards()))
        return n, time.perf_counter() - t0


def bench_loader(cache: Path, batch: int, passes: int, work: Path | None = None) -> dict:
    """Per layer: every reader's rate, the shuffles' quality and the ratios the issue asks for."""
    cores = os.cpu_count() or 1
    out = {}
    with open_cache(cache) as store:
        meta = store.meta
    for layer in [l for l in LAYERS if l in meta.layers]:
        names = [S.feature_path(layer), S.IMAGES]
        npy = (work or cache.parent) / f"npy_{layer}"
        n = write_npy_samples(cache, layer, npy)
        orders = {"global": [], "window": [], "npy": []}
        readers = {"limit": lambda: codec_limit(cache, names, batch, cores),
                   "limit_chunks": lambda: codec_limit(cache, names, batch, cores, read="chunks"),
                   "limit_mapped": lambda: codec_limit(cache, names, batch, cores, read="mapped"),
                   "one": lambda: loader_rate(cache, layer, batch, 1),
                   "all": lambda: loader_rate(cache, layer, batch, cores, order=orders["global"]),
                   "window": lambda: loader_rate(cache, layer, batch, cores, mode="window", order=orders["window"]),
                   "ram": lambda: loader_rate(cache, layer, batch, cores, in_memory=True),
                   "npy": lambda: npy_rate(npy, n, batch, order=orders["npy"]),
                   "previous": lambda: zarr_python_rate(cache, names, batch)}
        if importlib.util.find_spec("tensorstore") is not None:
            readers["tensorstore"] = lambda: tensorstore_rate(cache, names, cores)
        best = _interleaved(readers, passes)
        limit = max(best["limit"], best["limit_chunks"], best["limit_mapped"])  # the fastest way to read is the limit
        one, alls, ram, previous = (best[k] for k in ("one", "all", "ram", "previous"))
        ts_rate = best.get("tensorstore")
        mb = bytes_per_sample(meta, (layer,)) / 1e6
        uniform = uniform_distinct(n, meta.shard_size, batch)
        shuffle = {k: distinct_per_batch(v, meta.shard_size, batch) / uniform for k, v in orders.items()}
        out[layer] = {"codec_limit": limit, "codec_limit_whole_shards": best["limit"],
                      "codec_limit_single_chunks": best["limit_chunks"], "codec_limit_mapped": best["limit_mapped"],
                      "loader_1_thread": one,
                      "loader_all_cores": alls, "loader_in_memory": ram,
                      "loader_windowed": best["window"], "npy_dataloader": best["npy"],
                      "tensorstore": ts_rate, "zarr_python_4_threads": previous, "cores": cores, "MB_per_sample": mb,
                      "npy_MB_per_sample": disk_bytes(npy) / n / 1e6, "cache_MB_per_sample": (
                          disk_bytes(cache / S.FEATURES / layer) + disk_bytes(cache / S.IMAGES)) / meta.n / 1e6,
                      "ratio_to_limit": alls / limit, "scaling": alls / one, "ratio_to_previous": alls / previous,
                      "ratio_to_npy": alls / best["npy"], "in_memory_to_streaming": ram / alls,
                      "uniform_distinct_shards": uniform, "shuffle_to_uniform": shuffle}
        log.info("loader %s: %.0f samples/s on %d cores, global shuffle (%.2f of the codec's %.0f; %.2fx the .npy "
                 "DataLoader's %.0f), windowed %.0f, one thread %.0f, in memory %.0f; distinct shards per batch / "
                 "uniform: global %.2f, window %.2f, npy %.2f", layer, alls, cores, alls / limit, limit,
                 alls / best["npy"], best["npy"], best["window"], one, ram, shuffle["global"], shuffle["window"],
                 shuffle["npy"])
    return out


def bench_codecs(cache: Path, work: Path, n: int, batch: int, passes: int) -> list[dict]:
    """Per codec (the per-chunk crc32c on): a cache of layer1 + layer3 (+ images) written with it the way
    extraction writes it (whole shards, compressed on every core), its write rate, the loader's rate on
    all cores and the bytes on disk per sample, per layer."""
    from concurrent.futures import ThreadPoolExecutor as Pool

    cores = os.cpu_count() or 1
    with open_cache(cache) as src:
        meta = src.meta
        layers = [l for l in LAYERS if l in meta.layers]
        n = min(n, meta.n)
        arrays = {name: src.read(name, 0, n) for name in [S.IMAGES, *(S.feature_path(l) for l in layers)]}
        ids = src.ids()[:n]
    raw = sum(a.nbytes for a in arrays.values())
    rows = []
    for codec in TRAINING_CODECS:
        m = S.CacheMeta(**{**meta.to_dict(), "preprocessing": meta.preprocessing, "n": n, "codec": str(Codec.parse(codec)),
                           "layers": {l: meta.layers[l] for l in layers}, "nodes": {l: meta.nodes[l] for l in layers}})
        path = work / f"codec_{codec}.zarr"
        seconds = []
        for _ in range(passes):
            with create_cache(path, m, ids, np.zeros(n, np.int32), np.zeros(n, np.uint8)) as store, Pool(cores) as pool:
                store.pool = pool
                t0 = time.perf_counter()
                for k in m.shards():
                    lo, hi = m.shard_bounds(k)
                    store.write_shard(k, {name: a[lo:hi] for name, a in arrays.items()}, np.ones(hi - lo, np.uint8),
                                      {}, {})
                seconds.append(time.perf_counter() - t0)
        row = {"codec": str(Codec.parse(codec)), "layers": {}, "write_MB_s": raw / min(seconds) / 1e6}
        for layer in layers:
            size = disk_bytes(path / S.FEATURES / layer)
            rate = _best(lambda: loader_rate(path, layer, batch, cores), passes)
            row["layers"][layer] = {"bytes_per_sample": size / n, "loader_samples_s": rate}
        row["images_bytes_per_sample"] = disk_bytes(path / S.IMAGES) / n
        rows.append(row)
        log.info("codec %s: writes %.0f MB/s of raw data; %s", row["codec"], row["write_MB_s"], ", ".join(
            f"{l} {v['loader_samples_s']:.0f} samples/s, {v['bytes_per_sample'] / 1e6:.3f} MB"
            for l, v in row["layers"].items()))
    return rows


def markdown(loader: dict, codecs: list[dict]) -> list[str]:
    lines = ["## 3. Training loader against the codec's own limit and a folder of .npy files\n",
             "Samples/s over the whole cache (each sample: the layer's float16 features and the uint8 image), "
             "batches of the training size, page cache warm, best of several interleaved passes, each pass a "
             "reader's second epoch (opened and its first epoch run untimed, as training reads every later epoch; "
             "the .npy DataLoader's workers persistent). *Codec limit*: the "
             "same shard files, every chunk decompressed by the codec library alone (python-zstandard) on every "
             "core straight into a batch buffer, no checksum checked; each shard read whole into a reused buffer, "
             "chunk by chunk through its index into a reused buffer, or mapped into memory and decompressed in "
             "place (its pages mapped before the clock starts), whichever was fastest (*whole / chunks / mapped*). "
             "*Loader*: featrecon's, with the global shuffle (every batch from the whole set, each chunk read "
             "through its shard's index); *windowed*: batches from 4 shards at a time, each shard read whole. "
             "*.npy DataLoader*: the same samples as one .npy file per array, a torch DataLoader with 2 workers and "
             "shuffle=True. *Previous loader*: zarr-python whole-shard reads on four threads plus a copy. *Shuffle*: "
             "distinct shards per batch over a uniform draw's expectation. Targets: loader ≥ 0.8 of the limit and "
             "≥ 1.5x the .npy DataLoader, shuffle ≥ 0.8 of uniform.\n",
             "| layer | codec limit (whole / chunks / mapped) | loader (global) | windowed | 1 thread | in memory | "
             ".npy DataLoader | tensorstore zarr3 | previous | loader / limit | loader / .npy | "
             "shuffle: global / windowed / .npy | MB per sample: cache / .npy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for layer, v in loader.items():
        ts_cell = f"{v['tensorstore']:.0f}" if v["tensorstore"] else "-"
        sh = v["shuffle_to_uniform"]
        lines.append(f"| {layer} | {v['codec_limit']:.0f} ({v['codec_limit_whole_shards']:.0f} / "
                     f"{v['codec_limit_single_chunks']:.0f} / {v.get('codec_limit_mapped', 0):.0f}) | "
                     f"{v['loader_all_cores']:.0f} "
                     f"({v['loader_all_cores'] * v['MB_per_sample']:.0f} MB/s) | {v['loader_windowed']:.0f} | "
                     f"{v['loader_1_thread']:.0f} | {v['loader_in_memory']:.0f} | {v['npy_dataloader']:.0f} | "
                     f"{ts_cell} | {v['zarr_python_4_threads']:.0f} | **{v['ratio_to_limit']:.2f}** | "
                     f"**{v['ratio_to_npy']:.2f}** | **{sh['global']:.2f}** / {sh['window']:.2f} / {sh['npy']:.2f} | "
                     f"{v['cache_MB_per_sample']:.3f} / {v['npy_MB_per_sample']:.3f} |")
    if codecs:
        layers = list(codecs[0]["layers"])
        lines += ["", "### Which codec\n",
                  "The same samples written with each codec (whole shards, the per-chunk crc32c on, compressed on "
                  "every core as extraction writes them): the write rate in MB/s of raw data, the loader's rate on "
                  "all cores and the bytes on disk per sample.\n",
                  "| codec | write MB/s | " + " | ".join(f"{l} samples/s | {l} MB/sample" for l in layers)
                  + " | images MB/sample |",
                  "|---|---:|" + "---:|---:|" * len(layers) + "---:|"]
        for row in codecs:
            lines.append(f"| {row['codec']} | {row['write_MB_s']:.0f} | " + " | ".join(
                f"{row['layers'][l]['loader_samples_s']:.0f} | {row['layers'][l]['bytes_per_sample'] / 1e6:.3f}"
                for l in layers) + f" | {row['images_bytes_per_sample'] / 1e6:.3f} |")
    return lines
