"""Each stage of extraction alone on a GPU machine: decoding, forward, copy to the host, compression.

    python -m benchmarks.gpu_probe --images DIR [--n 2048]

Each stage alone, at its own best, so the extraction rate can be read against the slowest.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks.sections.extraction import decode_limit, stock_forward
from featrecon.extract.backbone import FeatureExtractor, load_backbone, preprocessing_for, resolve_layers
from featrecon.extract.images import discover_images


def timed(fn, seconds=2.0):
    fn()
    torch.cuda.synchronize()
    t0, k = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        fn()
        k += 1
        if k % 4 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return k / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--out", type=Path, default=Path("probe.json"))
    a = p.parse_args()
    dev = torch.device("cuda")
    root = a.images.resolve()
    ids = discover_images(root, limit=a.n)
    model, w = load_backbone("resnet50", "random:0")
    pre = preprocessing_for(w, 224)
    res = {"gpu": torch.cuda.get_device_name(), "cores": os.cpu_count(), "torch": torch.__version__,
           "cudnn_tf32": torch.backends.cudnn.allow_tf32}
    print(res, flush=True)
    for workers in (6, 12, 15):
        r = decode_limit(root, ids, pre, 128, workers, dev)
        res[f"decode_w{workers}"] = r
        print(f"decode {workers} workers: {r:.0f} img/s", flush=True)
    x = torch.randint(0, 255, (256, 3, 224, 224), dtype=torch.uint8).pin_memory()
    for layers in ("all", "layer3"):
        for ac in ("none", "bf16"):
            fx = FeatureExtractor(model, resolve_layers(layers, model), pre, autocast=ac).to(dev)
            stock = stock_forward(model, layers).to(dev, memory_format=torch.channels_last)
            for bs in (64, 128, 256):
                xb = x[:bs]
                with torch.inference_mode():
                    def run_fx():
                        fx(xb.to(dev, non_blocking=True))

                    def run_stock():
                        with fx.precision("cuda"):
                            stock(fx.prepare(xb.to(dev, non_blocking=True)))
                    r1 = timed(run_fx) * bs
                    r2 = timed(run_stock) * bs
                res[f"fwd_{layers}_{ac}_b{bs}"] = {"featrecon": r1, "stock": r2}
                print(f"forward {layers} {ac} batch {bs}: featrecon {r1:.0f} stock {r2:.0f} img/s", flush=True)
    # device -> host: all-layer fp16 outputs of one batch of 128
    fx = FeatureExtractor(model, resolve_layers("all", model), pre).to(dev)
    with torch.inference_mode():
        feats = {k: v.half().contiguous() for k, v in fx(x[:128].to(dev)).items()}
    nbytes = sum(v.numel() * 2 for v in feats.values())
    pinned = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in feats.items()}
    r = timed(lambda: [v.cpu() for v in feats.values()]) * nbytes / 1e9
    r2 = timed(lambda: [pinned[k].copy_(v, non_blocking=True) for k, v in feats.items()]) * nbytes / 1e9
    res["d2h_pageable_GBs"], res["d2h_pinned_GBs"] = r, r2
    print(f"D2H all layers batch 128 ({nbytes / 1e6:.0f} MB): pageable {r:.1f} GB/s, pinned {r2:.1f} GB/s", flush=True)
    # compression of real activations, many threads
    import numcodecs
    rows = [pinned["layer1"][i].numpy() for i in range(128)]
    zs = numcodecs.Zstd(level=1)
    for threads in (1, 8, 16):
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(zs.encode, rows[:16]))
            t0 = time.perf_counter()
            for _ in range(3):
                out = list(pool.map(zs.encode, rows))
            dt = time.perf_counter() - t0
        gbs = 3 * sum(r.nbytes for r in rows) / dt / 1e9
        ratio = sum(r.nbytes for r in rows) / sum(len(o) for o in out)
        res[f"zstd1_{threads}threads_GBs"] = gbs
        print(f"zstd:1 {threads} threads: {gbs:.2f} GB/s (ratio {ratio:.2f})", flush=True)
    a.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
