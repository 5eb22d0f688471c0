"""Section 2: bytes per sample on disk and write speed, for each format and codec."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from featrecon.cache import schema as S
from featrecon.cache.factory import create_cache, open_cache
from featrecon.cache.schema import Codec

from ..common import disk_bytes as _disk_bytes
from ..common import log

CODECS = ("none", "zstd:1", "zstd:3", "zstd:-3", "lz4", "blosc-zstd")


def bench_storage(cache: Path, n: int, work: Path) -> list[dict]:
    with open_cache(cache) as src:
        meta = src.meta
        n = min(n, meta.n)
        arrays = {name: src.read(name, 0, n) for name in [S.IMAGES, *(S.feature_path(l) for l in meta.layers)]}
        ids = src.ids()[:n]
    zero_frac = {l: float((arrays[S.feature_path(l)] == 0).mean()) for l in meta.layers}
    rows = []
    formats = [("zarr", ".zarr"), ("hdf5", ".h5")]
    try:
        import hdf5plugin  # noqa: F401
    except ImportError:
        log.warning("storage: hdf5plugin is not installed here, so the HDF5 rows are left out")
        formats = formats[:1]
    for fmt, suffix in formats:
        for codec in CODECS:
            m = S.CacheMeta(**{**meta.to_dict(), "preprocessing": meta.preprocessing, "n": n,
                               "codec": str(Codec.parse(codec))})
            row = {"format": fmt, "codec": str(Codec.parse(codec)), "samples": n, "layers": {}}
            raw = 0
            write_s = 0.0
            for layer in meta.layers:  # one store per layer, so bytes on disk are per layer
                lm = S.CacheMeta(**{**m.to_dict(), "preprocessing": m.preprocessing, "layers": {layer: meta.layers[layer]},
                                    "nodes": {layer: meta.nodes[layer]}})
                path = work / f"store_{fmt}_{codec}_{layer}{suffix}"
                store = create_cache(path, lm, ids, np.zeros(n, np.int32), np.zeros(n, np.uint8), fmt)
                feats = arrays[S.feature_path(layer)]
                t0 = time.perf_counter()
                for k in lm.shards():
                    lo, hi = lm.shard_bounds(k)
                    store._write_arrays(lo, hi, {S.feature_path(layer): feats[lo:hi]})
                if fmt == "hdf5":
                    store.file.flush()
                write_s += time.perf_counter() - t0
                store.close()
                size = _disk_bytes(path) - _empty_overhead(path, fmt)
                f32 = feats.size * 4
                raw += feats.nbytes
                row["layers"][layer] = {"bytes_per_sample": size / n, "ratio_to_float32": f32 / max(1, size),
                                        "zero_fraction": zero_frac[layer]}
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            row["write_MB_s"] = raw / write_s / 1e6
            row["bytes_per_sample"] = sum(v["bytes_per_sample"] for v in row["layers"].values())
            rows.append(row)
            log.info("storage %s %s: %.2f MB/sample, write %.0f MB/s", fmt, row["codec"], row["bytes_per_sample"] / 1e6,
                     row["write_MB_s"])
    return rows


def checksum_cost(cache: Path, shards: int = 8, rounds: int = 3) -> dict:
    """Encoding every array's shards with the writer's code, with and without the per-chunk
    crc32c (schema 2 against 1), on one thread per core as extraction runs it; alternating
    rounds, best of each."""
    import dataclasses
    import os
    from concurrent.futures import ThreadPoolExecutor

    from featrecon.cache.shards import ShardEncoder

    with open_cache(cache) as store:
        meta = store.meta
        ks = list(meta.shards())[:shards]
        names = [S.IMAGES, *(S.feature_path(l) for l in meta.layers)]
        data = {(name, k): store.read(name, *meta.shard_bounds(k)) for name in names for k in ks}
        arrays = {name: store._writable(name)[0] for name in names}
    encoders = {}
    for checksum in (True, False):
        for name, array in arrays.items():
            enc = ShardEncoder.for_array(array)
            encoders[checksum, name] = ShardEncoder(array, dataclasses.replace(enc.layout, checksum=checksum))
    best = {True: float("inf"), False: float("inf")}
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for _ in range(rounds):
            for checksum in (True, False):
                t0 = time.perf_counter()
                started = [(encoders[checksum, name], encoders[checksum, name].start(rows, pool))
                           for (name, _), rows in data.items()]
                for encoder, parts in started:
                    encoder.assemble(parts)
                best[checksum] = min(best[checksum], time.perf_counter() - t0)
    mb = sum(v.nbytes for v in data.values()) / 1e6
    return {"with_MB_s": mb / best[True], "without_MB_s": mb / best[False], "cost": best[True] / best[False] - 1}


def _empty_overhead(path: Path, fmt: str) -> int:
    """Bytes of everything but the feature chunks (metadata, small arrays, the empty images array)."""
    if fmt == "zarr":
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and "features" not in p.parts)
    return 0  # HDF5 keeps it all in one file; the small arrays are a few KB


def markdown(rows: list[dict], checksum: dict | None = None) -> list[str]:
    lines = ["## 2. Storage (bytes per sample on disk, ratio to raw float32)\n"]
    layers = list(rows[0]["layers"])
    lines += ["| format | codec | write MB/s | " + " | ".join(layers) + " | all layers MB |",
              "|---|---|---:|" + "---:|" * len(layers) + "---:|"]
    for row in rows:
        cells = [f"{row['layers'][l]['bytes_per_sample'] / 1e6:.3f} MB ({row['layers'][l]['ratio_to_float32']:.1f}x)"
                 for l in layers]
        lines.append(f"| {row['format']} | {row['codec']} | {row['write_MB_s']:.0f} | " + " | ".join(cells)
                     + f" | {row['bytes_per_sample'] / 1e6:.2f} |")
    zf = rows[0]["layers"]
    zeros = ", ".join(f"{l} {v['zero_fraction']:.0%}" for l, v in zf.items())
    lines.append("\nExact zeros in the stored features: " + zeros)
    if checksum:
        lines.append(f"\nThe per-chunk crc32c (schema 2): encoding all layers' shards at zstd:1 with the writer's code "
                     f"ran at {checksum['with_MB_s']:.0f} MB/s with it and {checksum['without_MB_s']:.0f} MB/s "
                     f"without, a cost of **{checksum['cost']:+.1%}** (best of alternating rounds).")
    return lines
