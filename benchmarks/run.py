"""Measure the cache against its limits, side by side in one run.

    python -m benchmarks.run --images ../shared/data/imagenet-sample --out benchmarks/results [--publish]

1. extraction (`extract-features`: decode + forward + write) vs the bare forward on
   pre-decoded tensors: torchvision's stock modules, and featrecon's own traced graph
2. storage: bytes per sample and write speed for each format and codec
3. the training loader vs a sequential read of the same arrays, and vs a naive random read
4. a layer3 decoder's training step fed by the cache vs fed by JPEG decoding + backbone

Every figure is a ratio of two measurements taken here, in this run; absolute
numbers and the machine are printed too. `--quick` is a smoke mode for the tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featrecon import schema as S
from featrecon.backbone import FeatureExtractor, load_resnet50, preprocessing_for, resolve_device, resolve_layers
from featrecon.data import discover_images, load_image
from featrecon.decoders import Decoder, DecoderConfig
from featrecon.extract import CompiledForward, ExtractConfig, to_storage, with_device_defaults
from featrecon.loader import CacheLoader, bytes_per_sample
from featrecon.schema import Codec
from featrecon.storage import create_cache, open_cache

log = logging.getLogger("benchmarks")
CODECS = ("none", "zstd:1", "zstd:3", "zstd:-3", "lz4", "blosc-zstd")


def machine(device: torch.device) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version()}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


TOP_LEVEL = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def stock_forward(model: nn.Module, layers: str) -> nn.Module:
    """torchvision's own ResNet-50 modules, unchanged, cut after the deepest requested block."""
    deepest = max(TOP_LEVEL.index(node.split(".")[0]) for node in resolve_layers(layers, model).values())
    return nn.Sequential(*[getattr(model, name) for name in TOP_LEVEL[: deepest + 1]]).eval()


def _forward_rate(fn, images: torch.Tensor, batch_size: int, device) -> float:
    """images/s of fn over pre-decoded uint8 batches, after one warm-up batch."""
    with torch.inference_mode():
        fn(images[:batch_size].to(device))
        _sync(device)
        t0 = time.perf_counter()
        for s in range(0, len(images), batch_size):
            fn(images[s: s + batch_size].to(device))
        _sync(device)
    return len(images) / (time.perf_counter() - t0)


class BareForwards:
    """The two references, on tensors already in memory (no decoding, no writing):
    `stock`, torchvision's modules as they come (the bar: extraction >= 0.9 of it), and
    `featrecon`, what extraction's main thread runs per batch: the traced graph (BatchNorm
    folded, ReLUs in place, several outputs) with the cast to float16, on a CPU compiled by
    torch.compile as a long run compiles it (the compile, once, is not timed). The gap
    between `featrecon` and extraction is what decoding and writing cost."""

    def __init__(self, layers: str, args, device):
        model, weights = load_resnet50(args.weights)
        pre = preprocessing_for(weights, args.size)
        fx = FeatureExtractor(model, resolve_layers(layers, model), pre, autocast=args.autocast).to(device)
        self.stock_model = stock_forward(model, layers).to(device, memory_format=torch.channels_last)
        self.fx, self.device, self.batch = fx, device, args.batch_size
        self.own = fx
        if device.type == "cpu":
            self.own = CompiledForward(fx, "float16", args.batch_size, args.size) if args.compile == "yes" \
                else (lambda images: to_storage(fx(images), "float16"))

    def _stock(self, images):  # the same input preparation and precision as featrecon's forward
        with self.fx.precision(self.device.type):
            return self.stock_model(self.fx.prepare(images))

    def __call__(self, images: torch.Tensor) -> dict:
        return {"stock": _forward_rate(self._stock, images, self.batch, self.device),
                "featrecon": _forward_rate(self.own, images, self.batch, self.device)}


def run_extract_features(args, files_root: Path, n: int, layers: str, out: Path, device) -> dict:
    """`extract-features` as users run it, in its own process; returns its --stats."""
    stats = out.with_suffix(".stats.json")
    cmd = [sys.executable, "-m", "featrecon", "extract-features", "--images", str(files_root), "--limit", str(n),
           "--layers", layers, "--out", str(out), "--weights", args.weights, "--size", str(args.size),
           "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--device", str(device),
           "--autocast", args.autocast, "--compile", args.compile, "--overwrite", "--no-progress", "--stats", str(stats)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"extract-features failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(stats.read_text())


def decode_limit(files_root: Path, ids: list[str], pre, batch_size: int, workers: int, device) -> float:
    """images/s of the decoding stage alone: the same DataLoader extraction uses, no forward."""
    from featrecon.extract import image_loader

    dl = image_loader(files_root, ids, list(range(len(ids))), pre, batch_size, workers, device)
    start = time.perf_counter()
    it = iter(dl)
    first = len(next(it)[1])  # worker start-up: left out, as in the extraction's rate
    t0, n = time.perf_counter(), 0
    for _, images, _ in it:
        n += len(images)
    return n / (time.perf_counter() - t0) if n else first / (time.perf_counter() - start)


def compress_limit(cache: Path, shards: int = 8) -> float:
    """images/s of the compression stage alone: the cache's own shards re-encoded by the
    writer's code on a pool of one thread per core, as extraction runs it."""
    from concurrent.futures import ThreadPoolExecutor

    from featrecon.storage import ShardEncoder

    with open_cache(cache) as store:
        meta = store.meta
        ks = list(meta.shards())[:shards]
        names = [S.IMAGES, *(S.feature_path(l) for l in meta.layers)]
        data = {(name, k): store.read(name, *meta.shard_bounds(k)) for name in names for k in ks}
        encoders = {name: ShardEncoder.for_array(store.group[name]) for name in names}
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        t0 = time.perf_counter()
        started = [(encoders[name], encoders[name].start(rows, pool)) for (name, _), rows in data.items()]
        for encoder, parts in started:
            encoder.assemble(parts)
        dt = time.perf_counter() - t0
    return sum(meta.shard_bounds(k)[1] - meta.shard_bounds(k)[0] for k in ks) / dt


def bench_extraction(args, files_root: Path, ids: list[str], work: Path, device) -> tuple[dict, Path]:
    """Extraction against the bare forwards, in `args.rounds` rounds: bare, extract, bare,
    extract, ..., bare. Each extraction is compared with the faster of the bare runs just
    before and just after it (so noise cannot flatter a round), and the median round is
    reported, with the lowest and highest round ratio beside it: on a shared machine the
    same forward varies by 10-15% from minute to minute. Extraction rates leave out the first
    batch, as the forwards leave out theirs. Also each stage alone (decoding, compression),
    which bounds extraction from above."""
    pre = preprocessing_for(load_resnet50(args.weights)[1], args.size)
    images = torch.stack([torch.from_numpy(load_image(files_root / i, pre)) for i in ids])
    decode = decode_limit(files_root, ids, pre, args.batch_size, args.workers, device)
    log.info("decoding alone (%d workers): %.1f img/s", args.workers, decode)
    out = {}
    for layers in ("all", "layer3"):
        bare_forwards = BareForwards(layers, args, device)
        bare = [bare_forwards(images)]
        rounds = []
        for r in range(args.rounds):
            res = run_extract_features(args, files_root, len(ids), layers, work / f"extract_{layers}.zarr", device)
            bare.append(bare_forwards(images))
            stock = max(bare[r]["stock"], bare[r + 1]["stock"])
            own = max(bare[r]["featrecon"], bare[r + 1]["featrecon"])
            steady = res["steady_images_per_s"]
            rounds.append({"extract_img_s": steady, "stock_forward_img_s": stock, "featrecon_forward_img_s": own,
                           "ratio": steady / stock, "ratio_to_featrecon_forward": steady / own,
                           "extract_img_s_with_first_batch": res["images_per_s"], "forward_s": res["forward_seconds"],
                           "write_s": res["write_seconds"], "total_s": res["seconds"],
                           "compile_s": res.get("compile_seconds", 0.0)})
            log.info("extraction %s, round %d: %.1f img/s vs stock forward %.1f (%.2f), featrecon forward %.1f (%.2f)",
                     layers, r + 1, steady, stock, steady / stock, own, steady / own)
        compress = compress_limit(work / f"extract_{layers}.zarr")
        median = sorted(rounds, key=lambda x: x["ratio"])[len(rounds) // 2]
        limit = min(median["stock_forward_img_s"], decode, compress)
        out[layers] = {**median, "decode_img_s": decode, "compress_img_s": compress, "slowest_stage_img_s": limit,
                       "ratio_to_slowest_stage": median["extract_img_s"] / limit, "target": 0.9, "images": len(ids),
                       "ratio_low": min(x["ratio"] for x in rounds), "ratio_high": max(x["ratio"] for x in rounds),
                       "rounds": rounds, "bare_runs": bare}
        log.info("extraction %s: median round %.2f of the stock forward (rounds %s); decoding alone %.1f, "
                 "compression alone %.1f img/s", layers, median["ratio"],
                 ", ".join(f"{x['ratio']:.2f}" for x in rounds), decode, compress)
    return out, work / "extract_all.zarr"


def _disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


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
            m = S.CacheMeta(**{**meta.to_dict(), "preprocessing": meta.preprocessing, "n": n, "codec": str(Codec.parse(codec))})
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


def _empty_overhead(path: Path, fmt: str) -> int:
    """Bytes of everything but the feature chunks (metadata, small arrays, the empty images array)."""
    if fmt == "zarr":
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and "features" not in p.parts)
    return 0  # HDF5 keeps it all in one file; the small arrays are a few KB


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def bench_loader(cache: Path, batch_size: int, naive_n: int, cold: bool) -> dict:
    out = {}
    with open_cache(cache) as store:
        meta = store.meta
        n = meta.n
        idx = np.arange(n)
        for layer in [l for l in ("layer1", "layer3") if l in meta.layers]:
            names = [S.feature_path(layer), S.IMAGES]
            per_sample = bytes_per_sample(meta, (layer,))
            res = {}
            for state in (["cold", "warm"] if cold else ["warm"]):
                if state == "cold":
                    drop_page_cache()
                t0 = time.perf_counter()  # the ceiling: every shard in order, whole
                for k in meta.shards():
                    lo, hi = meta.shard_bounds(k)
                    for name in names:
                        store.read(name, lo, hi)
                seq = n / (time.perf_counter() - t0)
                if state == "cold":
                    drop_page_cache()
                loader = CacheLoader(cache, (layer,), idx, batch_size, shuffle=True, seed=0, in_memory=False)
                t0 = time.perf_counter()
                count = sum(len(b.indices) for b in loader.epoch(0))
                ours = count / (time.perf_counter() - t0)
                loader.close()
                if state == "cold":
                    drop_page_cache()
                rng = np.random.default_rng(0)  # what a plain Dataset.__getitem__ does: one sample, random order
                pick = rng.permutation(n)[:naive_n]
                feat_arr = store.group[names[0]] if hasattr(store, "group") else store.file[names[0]]
                img_arr = store.group[S.IMAGES] if hasattr(store, "group") else store.file[S.IMAGES]
                t0 = time.perf_counter()
                for i in pick:
                    feat_arr[int(i)], img_arr[int(i)]
                naive = len(pick) / (time.perf_counter() - t0)
                res[state] = {"sequential_samples_s": seq, "loader_samples_s": ours, "naive_random_samples_s": naive,
                              "loader_MB_s": ours * per_sample / 1e6, "sequential_MB_s": seq * per_sample / 1e6,
                              "ratio_loader_to_sequential": ours / seq, "ratio_loader_to_naive": ours / naive,
                              "target": 0.8}
                log.info("loader %s (%s): %.0f samples/s vs sequential %.0f (%.2f), naive random %.0f", layer, state,
                         ours, seq, ours / seq, naive)
            out[layer] = res
    return out


def bench_training(cache: Path, files_root: Path, ids: list[str], args, device, steps: int) -> dict:
    """Same decoder, same steps: fed by the cache vs fed by JPEG decode + backbone to layer3."""
    with open_cache(cache) as store:
        meta = store.meta
    shape = tuple(meta.layers["layer3"])
    dcfg = DecoderConfig(("layer3",), (shape,), meta.image_shape[1:], width=128, base_width=16)
    bs = args.train_batch

    def step(model, opt, feats, target):
        loss = torch.nn.functional.mse_loss(model([feats]), target)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def run(batches) -> dict:
        torch.manual_seed(0)
        model = Decoder(dcfg).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        wait = compute = 0.0
        done = 0
        it = iter(batches)
        t_start = time.perf_counter()
        while done < steps:
            t0 = time.perf_counter()
            try:
                feats, target = next(it)
            except StopIteration:
                it = iter(batches)
                continue
            t1 = time.perf_counter()
            step(model, opt, feats, target)
            _sync(device)
            wait += t1 - t0
            compute += time.perf_counter() - t1
            done += 1
        total = time.perf_counter() - t_start
        return {"samples_s": steps * bs / total, "data_wait_fraction": wait / total, "steps": steps}

    loader = CacheLoader(cache, ("layer3",), np.arange(meta.n), bs, shuffle=True, in_memory=False)

    def from_cache():
        for e in range(1000):
            for b in loader.epoch(e):
                yield b.features[0].to(device).float(), b.images.to(device).float() / 255

    cached = run(from_cache())
    loader.close()

    model, weights = load_resnet50(args.weights)
    pre = preprocessing_for(weights, args.size)
    fx = FeatureExtractor(model, resolve_layers("layer3", model), pre, autocast=args.autocast).to(device)
    from featrecon.data import ImageDataset, collate_images

    ds = ImageDataset(files_root, ids, list(range(len(ids))), pre)
    dl = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, num_workers=args.workers,
                                     collate_fn=collate_images, drop_last=True)

    def from_images():
        for e in range(1000):
            for _, imgs, _ in dl:
                imgs = imgs.to(device)
                yield fx(imgs)["layer3"].float(), imgs.float() / 255

    jpeg = run(from_images())
    res = {"from_cache": cached, "from_images": jpeg, "speedup": cached["samples_s"] / jpeg["samples_s"],
           "target_data_wait": 0.1}
    log.info("training: from cache %.1f samples/s (wait %.0f%%), from images %.1f samples/s -> %.1fx",
             cached["samples_s"], 100 * cached["data_wait_fraction"], jpeg["samples_s"], res["speedup"])
    return res


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = ["# featrecon benchmarks\n", f"Command: `{r['command']}`  ", f"Date: {r['date']}  ",
             f"Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}, torch {m['torch']} "
             f"({m['torch_threads']} threads); device `{r['device']}`, {r['images']} images at {r['size']} px, "
             f"batch {r['batch_size']}, {r.get('workers', 2)} decode workers, autocast {r['autocast']}, weights {r['weights']}.\n",
             "## 1. Extraction vs the bare backbone (target ≥ 0.9)\n",
             "`extract-features` (decode, forward, float16 cast, compress, write) in its own process, against "
             "forwards over the same images already decoded in memory: torchvision's stock modules, and the "
             "work extraction's main thread does per batch: featrecon's graph (BatchNorm folded into the "
             "convolutions, in-place ReLUs, one output per layer) with the float16 cast"
             + (", compiled by torch.compile as extraction compiles it (`--compile yes`, the default from 3000 "
                f"images; compiling took {_compile_s(r)} and is left out of every rate, like any warm-up). "
                if r.get("compile") == "yes" and r["device"] == "cpu" else ". ") +
             f"Measured in {r.get('rounds', 1)} rounds (bare, extract, bare, ...): each extraction against the faster "
             "of the bare runs on either side of it; the table shows the median round, and the lowest and "
             "highest round beside it. Every rate leaves out its first batch. Decoding alone is the same "
             "DataLoader with no forward; compression alone re-encodes the cache's own shards with the writer's "
             "code on one thread per core. Extraction cannot beat the slowest of the three.\n",
             "| layers | extract-features img/s | stock forward img/s | featrecon forward img/s "
             "| decoding alone | compression alone | extract / stock | rounds (low-high) | extract / featrecon forward "
             "| extract / slowest stage |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, v in r["extraction"].items():
        lines.append(f"| {k} | {v['extract_img_s']:.1f} | {v['stock_forward_img_s']:.1f} | "
                     f"{v['featrecon_forward_img_s']:.1f} | {v['decode_img_s']:.1f} | {v['compress_img_s']:.1f} | "
                     f"**{v['ratio']:.2f}** | {v.get('ratio_low', v['ratio']):.2f}-{v.get('ratio_high', v['ratio']):.2f} | "
                     f"{v['ratio_to_featrecon_forward']:.2f} | {v['ratio_to_slowest_stage']:.2f} |")
    lines += ["", "## 2. Storage (bytes per sample on disk, ratio to raw float32)\n"]
    layers = list(r["storage"][0]["layers"])
    lines += ["| format | codec | write MB/s | " + " | ".join(layers) + " | all layers MB |",
              "|---|---|---:|" + "---:|" * len(layers) + "---:|"]
    for row in r["storage"]:
        cells = [f"{row['layers'][l]['bytes_per_sample'] / 1e6:.3f} MB ({row['layers'][l]['ratio_to_float32']:.1f}x)"
                 for l in layers]
        lines.append(f"| {row['format']} | {row['codec']} | {row['write_MB_s']:.0f} | " + " | ".join(cells)
                     + f" | {row['bytes_per_sample'] / 1e6:.2f} |")
    zf = r["storage"][0]["layers"]
    lines.append("\nExact zeros in the stored features: " + ", ".join(f"{l} {v['zero_fraction']:.0%}" for l, v in zf.items()))
    lines += ["", "## 3. Training loader vs reads of the same arrays (target ≥ 0.8 of sequential)\n",
              "| layer | page cache | loader samples/s | sequential samples/s | naive random samples/s | loader / sequential | loader / naive |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for layer, states in r["loader"].items():
        for state, v in states.items():
            lines.append(f"| {layer} | {state} | {v['loader_samples_s']:.0f} ({v['loader_MB_s']:.0f} MB/s) | "
                         f"{v['sequential_samples_s']:.0f} | {v['naive_random_samples_s']:.0f} | "
                         f"**{v['ratio_loader_to_sequential']:.2f}** | {v['ratio_loader_to_naive']:.1f} |")
    if not r["cold_cache"]:
        lines.append("\nCold-cache rows are missing: this machine does not let us drop the page cache.")
    t = r["training"]
    lines += ["", "## 4. layer3 decoder training: from the cache vs from JPEGs (target: data wait < 10%)\n",
              "| fed by | samples/s | time waiting for data |", "|---|---:|---:|",
              f"| cache | {t['from_cache']['samples_s']:.1f} | {t['from_cache']['data_wait_fraction']:.1%} |",
              f"| JPEG decode + backbone | {t['from_images']['samples_s']:.1f} | {t['from_images']['data_wait_fraction']:.1%} |",
              f"\nSpeedup from the cache: **{t['speedup']:.2f}x**.\n"]
    return "\n".join(lines) + "\n"


def _compile_s(r: dict) -> str:
    times = [x.get("compile_s", 0.0) for v in r["extraction"].values() for x in v.get("rounds", [])]
    return f"{min(times):.0f}-{max(times):.0f} s per run" if times else "a few seconds"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"extract {k} / stock forward", v["ratio"], 0.9) for k, v in r["extraction"].items()]
    bars += [(f"loader {l} ({s}) / seq", v["ratio_loader_to_sequential"], 0.8)
             for l, st in r["loader"].items() for s, v in st.items()]
    bars.append(("1 - data wait (cache)", 1 - r["training"]["from_cache"]["data_wait_fraction"], 0.9))
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(bars) + 1.2))
    y = np.arange(len(bars))
    ax.barh(y, [b[1] for b in bars], color=["tab:green" if b[1] >= b[2] else "tab:orange" for b in bars])
    ext = list(r["extraction"].values())  # the extraction bars come first: whiskers span their rounds
    ax.errorbar([v["ratio"] for v in ext], y[:len(ext)], fmt="none", ecolor="k", capsize=3, label="lowest-highest round",
                xerr=[[v["ratio"] - v.get("ratio_low", v["ratio"]) for v in ext],
                      [v.get("ratio_high", v["ratio"]) - v["ratio"] for v in ext]])
    ax.scatter([b[2] for b in bars], y, marker="|", s=300, color="tab:red", label="target")
    ax.set_yticks(y, [b[0] for b in bars], fontsize=8)
    ax.set(xlabel="ratio measured in one run", xlim=(0, max(1.1, max(b[1] for b in bars) * 1.05)))
    ax.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1, 1), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--device", default="auto")
    p.add_argument("--n", type=int, help="images (default: 480 on CPU, 5000 on GPU, 16 with --quick)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, help="default: extract-features' own (8 on a CPU, 128 on a GPU)")
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--train-steps", type=int)
    p.add_argument("--workers", type=int, help="default: extract-features' own")
    p.add_argument("--autocast", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--weights", default="random:0")
    p.add_argument("--compile", choices=["yes", "no"], help="extract-features --compile (default yes, what a "
                   "run of 3000 images or more does on a CPU; no with --quick)")
    p.add_argument("--rounds", type=int, help="extraction runs per layer set, each between two bare forwards "
                   "(default 3, 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke mode: a few small images, proves it runs")
    p.add_argument("--publish", action="store_true", help="also write benchmarks/RESULTS.md")
    p.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = resolve_device(args.device)
    d = with_device_defaults(ExtractConfig(out=Path("."), batch_size=args.batch_size, workers=args.workers), device)
    args.batch_size, args.workers = d.batch_size, d.workers
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.compile = args.compile or ("no" if args.quick else "yes")
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: must be at least 1")
    if args.quick:
        args.size, n, steps, args.train_batch = 64, args.n or 16, args.train_steps or 2, 4
    else:
        n = args.n or (5000 if device.type == "cuda" else 480)
        steps = args.train_steps or (200 if device.type == "cuda" else 12)
    root = args.images.resolve()
    ids = discover_images(root, limit=n)
    work = Path(tempfile.mkdtemp(prefix="featrecon-bench-", dir=args.work))
    try:
        extraction, cache = bench_extraction(args, root, ids, work, device)
        storage = bench_storage(cache, 8 if args.quick else 64, work)
        cold = not args.quick and drop_page_cache()
        loader = bench_loader(cache, args.train_batch, 8 if args.quick else 64, cold)
        training = bench_training(cache, root, ids, args, device, steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"command": "python -m benchmarks.run " + " ".join(argv if argv is not None else os.sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(device), "device": str(device),
              "images": len(ids), "size": args.size, "batch_size": args.batch_size, "workers": args.workers, "autocast": args.autocast,
              "rounds": args.rounds, "compile": args.compile,
              "weights": args.weights, "cold_cache": cold, "extraction": extraction, "storage": storage,
              "loader": loader, "training": training}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (args.out / "latest.md").write_text(md)
    plot(result, args.out / "latest.png")
    if args.publish:
        (Path(__file__).parent / "RESULTS.md").write_text(md + "\n![ratios](results/latest.png)\n")
    print(md)
    return result


if __name__ == "__main__":
    main()
