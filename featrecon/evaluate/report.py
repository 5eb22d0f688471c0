"""score's report: report.md, metrics.json, the grid across depths and the depth plot."""

from __future__ import annotations

import logging

import numpy as np

from ..cache import schema as S
from ..cache.base import CacheStore
from ..figures import image_grid, plot_metrics_by_layer
from ..train.checkpoint import write_json
from .config import ScoreConfig

log = logging.getLogger(__name__)


# Below this many images a 95% interval is too wide to say anything (benchmarks/DESIGN.md);
# the report gives means and says so, and metrics.json keeps the per-image values.
MIN_INTERVAL_N = 10


def _fmt(s: dict, digits: int) -> str:
    if s["mean"] is None:
        return "-"
    if s["ci95"] is None or not np.isfinite(s["mean"]) or s["n"] < MIN_INTERVAL_N:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {(s['ci95'][1] - s['ci95'][0]) / 2:.{digits}f}"


def _cell(r: dict, key: str, digits: int) -> str:
    return _fmt(r[key], digits) if key in r else "-"


def _table(rows: list[dict]) -> str:
    """The main table: image metrics, LPIPS, top-1 and the feature fidelity at the decoded layer."""
    lines = ["| run | layer(s) | parameters | checkpoint epoch | n images | MSE | PSNR (dB) | SSIM | LPIPS | top-1 "
             "| top-1 agreement | feature cosine |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        decoded = r["layers"].split("+")[-1]
        lines.append(f"| {r['run']} | {r['layers']} | {r['parameters']:,} | {r['epochs']} | {r['n']} | "
                     f"{_fmt(r['mse'], 5)} | {_fmt(r['psnr'], 2)} | {_fmt(r['ssim'], 3)} | {_cell(r, 'lpips', 3)} | "
                     f"{_cell(r, 'top1_correct', 3)} | {_cell(r, 'top1_agreement', 3)} | "
                     f"{_cell(r, f'cosine/{decoded}', 3) if decoded != '-' else '-'} |")
    return "\n".join(lines)


def _fidelity_table(rows: list[dict], layers: list[str]) -> str:
    """Feature fidelity of each run at every cached layer it was judged at: relative L2 / cosine."""
    lines = ["| run | " + " | ".join(layers) + " |", "|---|" + "---:|" * len(layers)]
    for r in rows:
        cells = [f"{_cell(r, f'rel_l2/{l}', 3)} / {_cell(r, f'cosine/{l}', 3)}" if f"rel_l2/{l}" in r else "-"
                 for l in layers]
        lines.append(f"| {r['run']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _trained(rows: list[dict]) -> str:
    """How each run was trained, from its own checkpoint."""
    lines = []
    for r in rows:
        t = r.get("trained", {})
        views = t.get("views")
        views = "unknown views" if views is None else ("no extra views" if not views else f"{views} extra views per image")
        lines.append(f"- {r['run']}: {t.get('arch', '?')} decoder, width {t.get('width', '?')}, crop "
                     f"{t.get('crop', '?') or 'whole images'}, {t.get('loss', 'mse')} loss; trained on "
                     f"`{t.get('cache', '?')}` ({views})")
    return "\n".join(lines)


def _depth_key(store: CacheStore):
    order = list(store.meta.layers)
    return lambda r: (max(order.index(l) for l in r["layers"].split("+")), r["layers"], r["run"])


def write_report(cfg: ScoreConfig, store: CacheStore, rows: list[dict], baseline: dict, originals: dict,
                 idx: np.ndarray, recon: dict, corrupt: list[int], left_out: dict[str, str] | None = None) -> dict:
    rows = sorted(rows, key=_depth_key(store))
    table = _table([*rows, baseline])
    meta = store.meta
    header = (f"# featrecon report\n\nscored on cache `{store.path}` ({meta.weights}, {meta.preprocessing.crop} px), "
              f"split `{cfg.split}`: {len(idx)} images. Metrics on [0, 1] RGB, mean ± 95% CI half-width. LPIPS: "
              f"{cfg.lpips} (lower is closer). top-1: the cache's backbone on the reconstruction, against the label "
              "(where known) and against its own top-1 on the original. Feature cosine: its features of the "
              "reconstruction against the cached ones, at the decoded layer.\n")
    if len(idx) < MIN_INTERVAL_N:
        header += (f"\n**Only {len(idx)} images**: too few for a confidence interval, so the table gives means "
                   "alone; read them as an illustration, not a measurement (per-image values in metrics.json).\n")
    if meta.views:
        header += (f"\nThe scored cache holds {meta.views} extra random-resized views of each image; only centre "
                   "crops are scored.\n")
    notes = "".join(f"\n**{metric} left out**: {why}.\n" for metric, why in (left_out or {}).items())
    orig = (f"\nOriginals re-read from `{cfg.images or meta.source_root}`: {originals['equal']} of "
            f"{originals['checked']} equal to the cached target, {originals['missing']} missing, "
            f"{originals['changed']} changed, {originals['unreadable']} unreadable"
            + (f", {originals['refused']} refused (ids outside the images folder)" if originals["refused"] else "")
            + ".\n")
    if corrupt:
        orig += (f"\n**{len(corrupt)} damaged sample(s) left out** (--skip-corrupt; their stored chunks fail their "
                 f"checksum): {', '.join(map(str, corrupt[:20]))}. `featrecon verify {store.path} --repair` finds "
                 "and marks them for re-extraction.\n")
    if meta.weights.startswith("random"):
        orig += ("\n**Random backbone weights**: these numbers (top-1 and feature fidelity too) describe a randomly "
                 "initialised ResNet-50, not a trained one.\n")
    fidelity = [l for l in meta.layers if any(f"rel_l2/{l}" in r for r in [*rows, baseline])]
    md = (header + "\n" + table + "\n" + notes + orig + "\n## How each run was trained\n\n" + _trained(rows) + "\n"
          + (("\n## Feature fidelity (relative L2 / cosine) at each cached layer\n\n"
              + _fidelity_table([*rows, baseline], fidelity) + "\n") if fidelity else "")
          + "\n![grid](grid.png)\n\n![metrics by layer](metrics_by_layer.png)\n")
    (cfg.out / "report.md").write_text(md)
    print("\n" + table + "\n" + notes + orig)
    report = {"cache": str(store.path), "split": cfg.split, "n": int(len(idx)), "weights": meta.weights,
              "views": meta.views, "lpips": cfg.lpips, "left_out": left_out or {},
              "runs": rows, "baseline": baseline, "originals": originals, "corrupt_skipped": corrupt}
    write_json(report, cfg.out / "metrics.json")
    grid_idx = [i for i in idx[: min(cfg.save, 6)].tolist() if all(i in recon[r["run"]] for r in rows)]
    if grid_idx and rows:
        columns = [("original", {i: store.read(S.IMAGES, i, i + 1)[0] for i in grid_idx})]
        columns += [(f"{r['layers']}\n{r['psnr']['mean']:.1f} dB", recon[r["run"]]) for r in rows]
        image_grid(grid_idx, columns, cfg.out / "grid.png")
    plot_metrics_by_layer(rows, baseline, cfg.out / "metrics_by_layer.png")
    log.info("report written to %s (report.md, metrics.json, grid.png, metrics_by_layer.png)", cfg.out)
    return report
