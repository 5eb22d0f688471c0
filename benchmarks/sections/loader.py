"""Section 3: the training loader against the codec's own limit, and the codec choice for training.

For layer1 and layer3, each with the images every batch carries, over the whole cache:
- the limit: the same shard files read and decompressed by numcodecs alone, on all
  cores, each chunk straight into a batch-shaped buffer (no zarr, no featrecon code);
- featrecon's loader (streaming, shuffled, batches of `batch`), on one thread and on all
  cores, and in memory (decoded once, then gathered);
- tensorstore's zarr3 driver (whole shards, twice the cores in flight), the engine the
  loader was first meant to use, where it is installed;
- zarr-python reading whole shards on four threads, each copied into a batch: the read
  path of the loader before this one.
Every rate is the best of `passes` passes over the data (page cache warm after the first).
"""

from __future__ import annotations

import importlib.util
import json
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

TRAINING_CODECS = ("zstd:1", "zstd:-3", "lz4", "none")
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


def _compressor(zarr_json: dict):
    """numcodecs' decoder for an array's inner chunks (None: stored raw), and whether a
    crc32c trails each chunk."""
    import numcodecs

    inner = zarr_json["codecs"][0]["configuration"]["codecs"][1:]
    checksum = bool(inner) and inner[-1]["name"] == "crc32c"
    inner = inner[:-1] if checksum else inner
    if not inner:
        return None, checksum
    spec = inner[0]
    if spec["name"] == "zstd":
        return numcodecs.Zstd(), checksum
    return numcodecs.Blosc(), checksum  # blosc frames describe themselves


def codec_limit(cache: Path, names: list[str], batch: int, threads: int) -> tuple[int, float]:
    """(samples, seconds) for reading and decompressing every shard of `names` with the
    codec alone, on `threads` threads, each chunk into its row of a batch-sized buffer."""
    jobs = []
    for name in names:
        meta = json.loads((cache / name / "zarr.json").read_text())
        per_shard = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
        comp, checksum = _compressor(meta)
        shape, dtype = meta["shape"][1:], np.dtype(meta["data_type"])
        tail = "/".join(["0"] * len(shape))  # shard k of an (N, ...) array is c/k/0/0/0
        for path in sorted((cache / name / "c").glob(f"*/{tail}"), key=lambda p: int(p.parts[-1 - len(shape)])):
            jobs.append((name, path, per_shard, comp, checksum, shape, dtype))
    local = threading.local()  # each thread decodes into batch buffers of its own

    def decode(job) -> int:
        name, path, per_shard, comp, checksum, shape, dtype = job
        buffers = local.__dict__.setdefault("buffers", {})
        if name not in buffers:
            buffers[name] = np.empty((batch, *shape), dtype)
        out = buffers[name]
        data = np.fromfile(path, dtype=np.uint8)
        index = data[-(16 * per_shard + 4):-4].view("<u8").reshape(-1, 2)
        n = 0
        for offset, nbytes in index.tolist():
            if offset == 2**64 - 1:
                continue
            chunk = data[offset: offset + nbytes - (4 if checksum else 0)]
            row = out[n % batch]
            if comp is None:
                row.reshape(-1).view(np.uint8)[...] = chunk
            else:
                comp.decode(chunk, out=row)
            n += 1
        return n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(decode, jobs))
    return total // len(names), time.perf_counter() - t0


def loader_rate(cache: Path, layer: str, batch: int, threads: int, in_memory: bool = False) -> tuple[int, float]:
    with open_cache(cache) as store:
        idx = np.arange(store.meta.n)
    loader = CacheLoader(cache, (layer,), idx, batch, shuffle=True, seed=0, in_memory=in_memory, threads=threads,
                         reuse_buffers=True)
    if in_memory:
        loader._load_ram()  # decoded once, before the epochs a run repeats
    t0 = time.perf_counter()
    n = sum(len(b.indices) for b in loader.epoch(0))
    dt = time.perf_counter() - t0
    loader.close()
    return n, dt


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


def bench_loader(cache: Path, batch: int, passes: int) -> dict:
    """Per layer: every reader's rate and the ratios the issue asks for."""
    cores = os.cpu_count() or 1
    out = {}
    with open_cache(cache) as store:
        meta = store.meta
    for layer in [l for l in LAYERS if l in meta.layers]:
        names = [S.feature_path(layer), S.IMAGES]
        readers = {"limit": lambda: codec_limit(cache, names, batch, cores),
                   "one": lambda: loader_rate(cache, layer, batch, 1),
                   "all": lambda: loader_rate(cache, layer, batch, cores),
                   "ram": lambda: loader_rate(cache, layer, batch, cores, in_memory=True),
                   "previous": lambda: zarr_python_rate(cache, names, batch)}
        if importlib.util.find_spec("tensorstore") is not None:
            readers["tensorstore"] = lambda: tensorstore_rate(cache, names, cores)
        best = _interleaved(readers, passes)
        limit, one, alls, ram, previous = (best[k] for k in ("limit", "one", "all", "ram", "previous"))
        ts_rate = best.get("tensorstore")
        mb = bytes_per_sample(meta, (layer,)) / 1e6
        out[layer] = {"codec_limit": limit, "loader_1_thread": one, "loader_all_cores": alls, "loader_in_memory": ram,
                      "tensorstore": ts_rate, "zarr_python_4_threads": previous, "cores": cores, "MB_per_sample": mb,
                      "ratio_to_limit": alls / limit, "scaling": alls / one, "ratio_to_previous": alls / previous,
                      "in_memory_to_streaming": ram / alls}
        log.info("loader %s: %.0f samples/s on %d cores (%.2f of the codec's %.0f), %.0f on one (x%.2f), in memory "
                 "%.0f, tensorstore %s, zarr-python %.0f", layer, alls, cores, alls / limit, limit, one, alls / one,
                 ram, f"{ts_rate:.0f}" if ts_rate else "-", previous)
    return out


def bench_codecs(cache: Path, work: Path, n: int, batch: int, passes: int) -> list[dict]:
    """Per codec: a cache of layer1 + layer3 (+ images) rewritten with it; loader rate on all
    cores and bytes on disk per sample, per layer."""
    cores = os.cpu_count() or 1
    with open_cache(cache) as src:
        meta = src.meta
        layers = [l for l in LAYERS if l in meta.layers]
        n = min(n, meta.n)
        arrays = {name: src.read(name, 0, n) for name in [S.IMAGES, *(S.feature_path(l) for l in layers)]}
        ids = src.ids()[:n]
    rows = []
    for codec in TRAINING_CODECS:
        m = S.CacheMeta(**{**meta.to_dict(), "preprocessing": meta.preprocessing, "n": n, "codec": str(Codec.parse(codec)),
                           "layers": {l: meta.layers[l] for l in layers}, "nodes": {l: meta.nodes[l] for l in layers}})
        path = work / f"codec_{codec}.zarr"
        with create_cache(path, m, ids, np.zeros(n, np.int32), np.zeros(n, np.uint8)) as store:
            for k in m.shards():
                lo, hi = m.shard_bounds(k)
                store.write_shard(k, {name: a[lo:hi] for name, a in arrays.items()}, np.ones(hi - lo, np.uint8), {}, {})
        row = {"codec": str(Codec.parse(codec)), "layers": {}}
        for layer in layers:
            size = disk_bytes(path / S.FEATURES / layer)
            rate = _best(lambda: loader_rate(path, layer, batch, cores), passes)
            row["layers"][layer] = {"bytes_per_sample": size / n, "loader_samples_s": rate}
        row["images_bytes_per_sample"] = disk_bytes(path / S.IMAGES) / n
        rows.append(row)
        log.info("codec %s: %s", row["codec"], ", ".join(f"{l} {v['loader_samples_s']:.0f} samples/s, "
                                                          f"{v['bytes_per_sample'] / 1e6:.3f} MB"
                                                          for l, v in row["layers"].items()))
    return rows


def markdown(loader: dict, codecs: list[dict]) -> list[str]:
    lines = ["## 3. Training loader against the codec's own limit\n",
             "Samples/s over the whole cache (each sample: the layer's float16 features and the uint8 image), "
             "shuffled, batches of the training size, page cache warm, best of several passes. *Codec limit*: the "
             "same shard files decompressed by numcodecs alone on every core, each chunk straight into a "
             "batch buffer. *Previous loader*: zarr-python whole-shard reads on four threads plus a copy. Targets: "
             "loader ≥ 0.8 of the limit, 2 threads ≥ 1.7x one, ≥ 3x the previous loader (layer3), "
             "in memory not slower than streaming.\n",
             "| layer | codec limit | loader, all cores | loader, 1 thread | in memory | tensorstore zarr3 "
             "| previous loader | loader / limit | all cores / 1 thread | loader / previous | in memory / streaming |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for layer, v in loader.items():
        ts_cell = f"{v['tensorstore']:.0f}" if v["tensorstore"] else "-"
        lines.append(f"| {layer} | {v['codec_limit']:.0f} | {v['loader_all_cores']:.0f} "
                     f"({v['loader_all_cores'] * v['MB_per_sample']:.0f} MB/s) | {v['loader_1_thread']:.0f} | "
                     f"{v['loader_in_memory']:.0f} | {ts_cell} | {v['zarr_python_4_threads']:.0f} | "
                     f"**{v['ratio_to_limit']:.2f}** | **{v['scaling']:.2f}** | **{v['ratio_to_previous']:.1f}** | "
                     f"**{v['in_memory_to_streaming']:.2f}** |")
    if codecs:
        layers = list(codecs[0]["layers"])
        lines += ["", "### Which codec for training\n",
                  "The same samples rewritten with each codec: the loader's rate on all cores and the bytes on "
                  "disk per sample.\n",
                  "| codec | " + " | ".join(f"{l} samples/s | {l} MB/sample" for l in layers) + " |",
                  "|---|" + "---:|---:|" * len(layers)]
        for row in codecs:
            lines.append(f"| {row['codec']} | " + " | ".join(
                f"{row['layers'][l]['loader_samples_s']:.0f} | {row['layers'][l]['bytes_per_sample'] / 1e6:.3f}"
                for l in layers) + " |")
    return lines
