"""Reconstruct a loader's samples and measure them: the per-epoch validation of training and
the scoring of `score` both run this one loop."""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from ..cache.loader import CacheLoader
from ..device import bf16_autocast
from ..metrics import check_unit_range, mse, psnr_from_mse, ssim

METRICS = ("mse", "psnr", "ssim")


def measure(pred: torch.Tensor, target: torch.Tensor, exact: bool = True) -> dict[str, np.ndarray]:
    """Per-image metrics of [0, 1] images (B, 3, H, W). SSIM in float64 when `exact` (what
    `score` reports, scikit-image's to 1e-12), else in float32 (within 1e-4 of it, tested),
    which the per-epoch validation uses: float64 convolutions have no fast CPU kernel."""
    check_unit_range(pred, target)
    m = mse(pred, target)
    dtype = torch.float64 if exact else torch.float32
    return {"mse": m.double().cpu().numpy(), "psnr": psnr_from_mse(m).cpu().numpy(),
            "ssim": ssim(pred.to(dtype), target.to(dtype)).cpu().numpy()}


@torch.no_grad()
def evaluate(model, loader: CacheLoader, device: torch.device, keep: set[int] | None = None,
             progress: bool = False, desc: str = "score", exact: bool = True, measures=(),
             inputs: int | None = None, autocast: bool = False) -> dict:
    """Reconstruct every sample of `loader` and measure it (`exact`: see `measure`). Returns
    per-image arrays ('index', 'mse', 'psnr', 'ssim', and what each of `measures` adds: a callable
    (pred, target, batch) -> {name: (B,) array}) and, for indices in `keep`, the uint8
    reconstructions under 'kept' ({index: (3, H, W)}). The decoder reads the first `inputs` of the
    loader's feature arrays (default: all); the rest are there for the measures. `autocast`: the
    decoder's forward in bf16 autocast, as training runs it (its PSNR within 0.01 dB of fp32's,
    benchmarks/DESIGN.md); the metrics are computed in float32 or float64 either way."""
    model.eval()
    parts: dict[str, list] = {k: [] for k in ("index", *METRICS)}
    kept = {}
    for batch in tqdm(loader.epoch(0), total=len(loader), desc=desc, unit="batch", disable=not progress, leave=False):
        feats = [f.to(device).float() for f in batch.features[:inputs]]
        target = batch.images.to(device).float() / 255
        with bf16_autocast(device, autocast):
            pred = model(feats).float()
        found = measure(pred, target, exact)
        for m in measures:
            found.update(m(pred, target, batch))
        for k, v in found.items():
            parts.setdefault(k, []).append(v)
        parts["index"].append(batch.indices)
        for j, i in enumerate(batch.indices.tolist()):
            if keep and i in keep:
                kept[i] = (pred[j] * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    model.train()
    out = {k: np.concatenate(v) if v else np.array([]) for k, v in parts.items()}
    out["kept"] = kept
    return out
