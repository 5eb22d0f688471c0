"""Pictures of results: training curves, image grids, PSNR across depth (PNG files)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(chw_uint8: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(chw_uint8.transpose(1, 2, 0))).save(path)


def plot_training(history: list[dict], path: Path, title: str = "") -> None:
    """Loss and the PSNR that chooses best.pt (validation images, else a train subset) per epoch."""
    if not history:
        return
    plt = _plt()
    ep = [r["epoch"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(ep, [r["loss"] for r in history], marker="o")
    a.set(xlabel="epoch", ylabel="train loss", yscale="log", title=title)
    b.plot(ep, [r["psnr"] for r in history], marker="o", color="tab:green")
    on = history[-1].get("psnr_on", "train subset") if history else "validation"
    b.set(xlabel="epoch", ylabel=f"PSNR on {on} (dB)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def image_grid(indices: list[int], columns: list[tuple[str, dict[int, np.ndarray]]], path: Path) -> None:
    """Rows are images, columns are (title, {index: (3, H, W) uint8})."""
    plt = _plt()
    rows, cols = len(indices), len(columns)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 1.9 * rows + 0.5), squeeze=False)
    for r, i in enumerate(indices):
        for c, (title, images) in enumerate(columns):
            ax = axes[r][c]
            ax.axis("off")
            if i in images:
                ax.imshow(images[i].transpose(1, 2, 0))
            if r == 0:
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# The depth figure's panels: (metric key, axis label); a panel is drawn where some run has the metric.
PANELS = (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("lpips", "LPIPS (lower: closer)"),
          ("top1_agreement", "top-1 agreement with the original"), ("top1_correct", "top-1 accuracy"),
          ("cosine@decoded", "feature cosine, decoded layer"))


def _summary(row: dict, key: str):
    if key == "cosine@decoded":
        key = f"cosine/{row['layers'].split('+')[-1]}"
    s = row.get(key)
    return s if s and s.get("mean") is not None else None


def plot_metrics_by_layer(rows: list[dict], baselines: list[dict] | dict, path: Path,
                          depth: dict[str, float] | None = None) -> None:
    """One panel per metric: each run's mean (95% CI bars), shallow to deep, with the mean-image floor.
    With runs of several backbones (their rows' "model"), one line per backbone over the relative depth
    `depth` ({run: 0..1}) of each run's layer."""
    baselines = [baselines] if isinstance(baselines, dict) else baselines
    panels = [(k, label) for k, label in PANELS if any(_summary(r, k) for r in rows)]
    models = list(dict.fromkeys(r.get("model", "") for r in rows))
    several = len(models) > 1
    plt = _plt()
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(max(4, 1.2 * len(rows) / len(models) + 2) * 0.8
                                                               * max(1, len(panels)), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for model in models:
            mine = [r for r in rows if r.get("model", "") == model]
            x = [depth[r["run"]] for r in mine] if several and depth else np.arange(len(mine))
            found = [_summary(r, key) for r in mine]
            means = [np.nan if s is None else s["mean"] for s in found]
            err = [0 if s is None or s["ci95"] is None or not math.isfinite(s["ci95"][1]) else
                   (s["ci95"][1] - s["ci95"][0]) / 2 for s in found]
            ax.errorbar(x, means, yerr=err, marker="o", capsize=4, label=model if several else "decoder")
            if not several:
                ax.set_xticks(x, [r["layers"] for r in mine], rotation=20)
            for b in baselines:
                floor = _summary(b, key) if key != "cosine@decoded" and b.get("model", "") == model else None
                if floor is not None:
                    ax.axhline(floor["mean"], color="gray", ls="--", lw=0.8,
                               label=f"mean train image{f' ({model})' if several else ''}")
        if several:
            ax.set_xlabel("relative depth of the decoded layer (0: first, 1: last)")
        ax.set(ylabel=label)
        ax.legend(fontsize=6)
    fig.suptitle("reconstruction quality by depth", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
