"""Section 1: extraction (`extract-features` as users run it) against the bare forward,
decoding alone and compression alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from featrecon.cache import schema as S
from featrecon.cache.factory import open_cache
from featrecon.extract.backbone import FeatureExtractor, load_backbone, preprocessing_for, resolve_layers
from featrecon.extract.forward import CompiledForward, to_storage
from featrecon.extract.images import load_image

from ..common import log
from ..common import sync as _sync

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
        model, weights = load_backbone("resnet50", args.weights)
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


def run_extract_features(args, files_root: Path, n: int, layers: str, out: Path, device,
                         model: str = "resnet50", codec: str | None = None) -> dict:
    """`extract-features` as users run it, in its own process (`codec`: its --codec, default its
    own); returns its --stats."""
    stats = out.with_suffix(".stats.json")
    cmd = [sys.executable, "-m", "featrecon", "extract-features", "--images", str(files_root), "--limit", str(n),
           "--model", model, "--views", "0", *(["--codec", codec] if codec else []),
           "--layers", layers, "--out", str(out), "--weights", args.weights, "--size", str(args.size),
           "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--device", str(device),
           "--autocast", args.autocast, "--compile", args.compile, "--overwrite", "--no-progress", "--stats", str(stats)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"extract-features failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(stats.read_text())


def decode_limit(files_root: Path, ids: list[str], pre, batch_size: int, workers: int, device) -> float:
    """images/s of the decoding stage alone: the same DataLoader extraction uses, no forward."""
    from featrecon.extract.images import image_loader

    dl = image_loader(files_root, ids, list(range(len(ids))), pre, batch_size, workers, device)
    start = time.perf_counter()
    it = iter(dl)
    first = len(next(it)[1])  # worker start-up: left out, as in the extraction's rate
    t0, n = time.perf_counter(), 0
    for _, images, _ in it:
        n += len(images)
    return n / (time.perf_counter() - t0) if n else first / (time.perf_counter() - start)


def compress_limit(cache: Path, shards: int = 8, passes: int = 3) -> float:
    """images/s of the compression stage alone: the cache's own shards re-encoded by the
    writer's code on a pool of one thread per core, as extraction runs it; the best of
    `passes` passes (a single pass also timed the pool's start and the first allocations of
    every output, and read about half the steady rate)."""
    from concurrent.futures import ThreadPoolExecutor

    from featrecon.cache.shards import ShardEncoder

    with open_cache(cache) as store:
        meta = store.meta
        ks = list(meta.shards())[:shards]
        names = [S.IMAGES, *(S.feature_path(l) for l in meta.layers)]
        data = {(name, k): store.read(name, *meta.shard_bounds(k)) for name in names for k in ks}
        encoders = {name: ShardEncoder.for_array(store.group[name]) for name in names}
    best = float("inf")
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for _ in range(passes):
            t0 = time.perf_counter()
            started = [(encoders[name], encoders[name].start(rows, pool)) for (name, _), rows in data.items()]
            for encoder, parts in started:
                encoder.assemble(parts)
            best = min(best, time.perf_counter() - t0)
    return sum(meta.shard_bounds(k)[1] - meta.shard_bounds(k)[0] for k in ks) / best


def codecs_of(args) -> list[str | None]:
    """--codec as a list (None: extract-features' default)."""
    return [c.strip() for c in args.codec.split(",")] if getattr(args, "codec", None) else [None]


def bench_extraction(args, files_root: Path, ids: list[str], work: Path, device) -> tuple[dict, Path]:
    """Extraction against the bare forwards, in `args.rounds` rounds: bare, extract, bare,
    extract, ..., bare, with every codec of --codec extracted in turn within each round (so
    the codecs are compared side by side, against the same forwards). Each extraction is
    compared with the faster of the bare runs just before and just after it (so noise cannot
    flatter a round), and the median round is reported, with the lowest and highest round
    ratio beside it: on a shared machine the same forward varies by 10-15% from minute to
    minute. Extraction rates leave out the first batch, as the forwards leave out theirs. Also
    each stage alone (decoding, compression), which bounds extraction from above."""
    pre = preprocessing_for(load_backbone("resnet50", args.weights)[1], args.size)
    images = torch.stack([torch.from_numpy(load_image(files_root / i, pre)) for i in ids])
    decode = decode_limit(files_root, ids, pre, args.batch_size, args.workers, device)
    log.info("decoding alone (%d workers): %.1f img/s", args.workers, decode)
    codecs = codecs_of(args)
    out = {}
    for layers in args.extract_layers.split(","):
        bare_forwards = BareForwards(layers, args, device)
        bare = [bare_forwards(images)]
        rounds: dict = {c: [] for c in codecs}
        for r in range(args.rounds):
            for codec in codecs:
                cache = work / f"extract_{layers}{'' if codec == codecs[0] else '_' + codec}.zarr"
                res = run_extract_features(args, files_root, len(ids), layers, cache, device, codec=codec)
                bare.append(bare_forwards(images))
                stock = max(bare[-2]["stock"], bare[-1]["stock"])
                own = max(bare[-2]["featrecon"], bare[-1]["featrecon"])
                steady = res["steady_images_per_s"]
                rounds[codec].append({"extract_img_s": steady, "stock_forward_img_s": stock,
                                      "featrecon_forward_img_s": own, "ratio": steady / stock,
                                      "ratio_to_featrecon_forward": steady / own,
                                      "extract_img_s_with_first_batch": res["images_per_s"],
                                      "forward_s": res["forward_seconds"], "write_s": res["write_seconds"],
                                      "total_s": res["seconds"], "compile_s": res.get("compile_seconds", 0.0),
                                      "cache": str(cache)})
                log.info("extraction %s (%s), round %d: %.1f img/s vs stock forward %.1f (%.2f), featrecon forward "
                         "%.1f (%.2f)", layers, codec or "default codec", r + 1, steady, stock, steady / stock, own,
                         steady / own)
        for codec in codecs:
            runs = rounds[codec]
            compress = compress_limit(Path(runs[0]["cache"]))
            median = sorted(runs, key=lambda x: x["ratio"])[len(runs) // 2]
            limit = min(median["stock_forward_img_s"], decode, compress)
            key = layers if len(codecs) == 1 else f"{layers} ({codec or 'default'})"
            out[key] = {**median, "layers": layers, "codec": codec or "default", "decode_img_s": decode,
                        "compress_img_s": compress, "slowest_stage_img_s": limit,
                        "ratio_to_slowest_stage": median["extract_img_s"] / limit, "target": 0.9, "images": len(ids),
                        "ratio_low": min(x["ratio"] for x in runs), "ratio_high": max(x["ratio"] for x in runs),
                        "rounds": runs, "bare_runs": bare}
            log.info("extraction %s: median round %.2f of the stock forward (rounds %s); decoding alone %.1f, "
                     "compression alone %.1f img/s", key, median["ratio"], ", ".join(f"{x['ratio']:.2f}" for x in runs),
                     decode, compress)
    return out, (work / "extract_all.zarr" if "all" in args.extract_layers.split(",") else None)


def markdown(r: dict) -> list[str]:
    lines = ["## 1. Extraction vs the bare backbone (target ≥ 0.9)\n",
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
             "code on one thread per core (the best of three passes). Extraction cannot beat the slowest of the three. "
             "Where several codecs are "
             "listed, each round extracted with each of them in turn, between the same bare forwards.\n",
             "| layers | extract-features img/s | stock forward img/s | featrecon forward img/s "
             "| decoding alone | compression alone | extract / stock | rounds (low-high) | extract / featrecon forward "
             "| extract / slowest stage |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, v in r["extraction"].items():
        lines.append(f"| {k} | {v['extract_img_s']:.1f} | {v['stock_forward_img_s']:.1f} | "
                     f"{v['featrecon_forward_img_s']:.1f} | {v['decode_img_s']:.1f} | {v['compress_img_s']:.1f} | "
                     f"**{v['ratio']:.2f}** | {v.get('ratio_low', v['ratio']):.2f}-{v.get('ratio_high', v['ratio']):.2f} | "
                     f"{v['ratio_to_featrecon_forward']:.2f} | {v['ratio_to_slowest_stage']:.2f} |")
    return lines


def _compile_s(r: dict) -> str:
    times = [x.get("compile_s", 0.0) for v in r["extraction"].values() for x in v.get("rounds", [])]
    if not times:
        return "a few seconds"
    low, high = f"{min(times):.0f}", f"{max(times):.0f}"
    return f"{low} s per run" if low == high else f"{low}-{high} s per run"
