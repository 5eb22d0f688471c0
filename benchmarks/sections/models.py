"""Section 5: one backbone of each family, extraction against that model's stock forward.

For each model: torchvision's own forward (`model(x)`, channels-last, inference mode) over the
images already decoded in memory, then `extract-features --model M --layers all` (decode, the
traced forward to the deepest stage, float16 cast, compress, write) in its own process, then
the stock forward again; the extraction is set against the faster of the two.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from featrecon.extract.backbone import load_backbone, preprocessing_for
from featrecon.extract.images import load_image

from ..common import log
from .extraction import run_extract_features

FAMILY_MODELS = ("resnet18", "convnext_tiny", "efficientnet_b0", "vit_b_16", "swin_t")


def stock_rate(model: torch.nn.Module, images: torch.Tensor, pre, batch: int) -> float:
    """images/s of the model's own full forward on uint8 images already in memory (normalised as
    extraction normalises them), after one warm-up batch."""
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre.std).view(1, 3, 1, 1) * 255
    model = model.to(memory_format=torch.channels_last)

    def run(x):
        model(((x.float() - mean) / std).contiguous(memory_format=torch.channels_last))

    with torch.inference_mode():
        run(images[:batch])
        t0 = time.perf_counter()
        for s in range(0, len(images), batch):
            run(images[s: s + batch])
    return len(images) / (time.perf_counter() - t0)


def bench_models(args, files_root: Path, ids: list[str], work: Path, device) -> list[dict]:
    rows = []
    for name in ("resnet18", "vit_b_16") if args.quick else FAMILY_MODELS:
        model, weights = load_backbone(name, args.weights, args.size)
        pre = preprocessing_for(weights, args.size, name)
        images = torch.stack([torch.from_numpy(load_image(files_root / i, pre)) for i in ids])
        before = stock_rate(model, images, pre, args.batch_size)
        res = run_extract_features(args, files_root, len(ids), "all", work / f"model_{name}.zarr", device, model=name)
        after = stock_rate(model, images, pre, args.batch_size)
        stock = max(before, after)
        rows.append({"model": name, "stock_forward_img_s": stock, "extract_img_s": res["steady_images_per_s"],
                     "ratio": res["steady_images_per_s"] / stock, "images": len(ids)})
        log.info("%s: extraction %.1f img/s against its stock forward %.1f (%.2f)", name, res["steady_images_per_s"],
                 stock, rows[-1]["ratio"])
    return rows


def markdown(rows: list[dict]) -> list[str]:
    lines = ["## 5. One backbone of each family: extraction against its stock forward\n",
             "`extract-features --model M --layers all` (every stage of the model, as `featrecon models` lists "
             "them) in its own process, against torchvision's own full forward of the same model on the same images "
             "already decoded in memory, measured just before and just after (the faster is the yardstick). The "
             "forward engines' rewrites (folded BatchNorms, in-place activations) apply where the graph allows; "
             "`--compile` as in section 1.\n",
             "| model | extract-features img/s | stock forward img/s | extract / stock |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['extract_img_s']:.1f} | {r['stock_forward_img_s']:.1f} | **{r['ratio']:.2f}** |")
    return lines
