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


def plot_psnr_by_layer(rows: list[dict], baseline: dict, path: Path) -> None:
    """Mean PSNR (95% CI bars) per run, shallow to deep, with the mean-image floor."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows) + 2), 3.4))
    x = np.arange(len(rows))
    means = [r["psnr"]["mean"] for r in rows]
    err = [0 if r["psnr"]["ci95"] is None or not math.isfinite(r["psnr"]["ci95"][1]) else
           (r["psnr"]["ci95"][1] - r["psnr"]["ci95"][0]) / 2 for r in rows]
    ax.errorbar(x, means, yerr=err, marker="o", capsize=4, label="decoder")
    if baseline["psnr"]["mean"] is not None:
        ax.axhline(baseline["psnr"]["mean"], color="gray", ls="--", label="mean train image")
    ax.set_xticks(x, [r["layers"] for r in rows], rotation=20)
    ax.set(ylabel="PSNR (dB)", title="reconstruction quality by depth")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
