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


def _table(rows: list[dict], models: bool = False) -> str:
    """The main table: image metrics, LPIPS, top-1 and the feature fidelity at the decoded layer (with
    `models`, a column for the backbone of each row)."""
    lines = [("| model " if models else "") + "| run | layer(s) | parameters | checkpoint epoch | n images | MSE "
             "| PSNR (dB) | SSIM | LPIPS | top-1 | top-1 agreement | feature cosine |",
             ("|---" if models else "") + "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        decoded = r["layers"].split("+")[-1]
        lines.append((f"| {r.get('model', '?')} " if models else "") + f"| {r['run']} | {r['layers']} | "
                     f"{r['parameters']:,} | {r['epochs']} | {r['n']} | "
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


def _header(cfg: ScoreConfig, parts: list) -> str:
    caches = "; ".join(f"`{p.store.path}` ({p.store.meta.backbone}, {p.store.meta.weights}, "
                       f"{p.store.meta.preprocessing.crop} px, {len(p.idx)} images)" for p in parts)
    text = (f"# featrecon report\n\nscored on {caches}, split `{cfg.split}`. Metrics on [0, 1] RGB, mean ± 95% CI "
            f"half-width. LPIPS: {cfg.lpips} (lower is closer). top-1: the cache's backbone on the reconstruction, "
            "against the label (where known) and against its own top-1 on the original. Feature cosine: its "
            "features of the reconstruction against the cached ones, at the decoded layer.\n")
    n = min(len(p.idx) for p in parts)
    if n < MIN_INTERVAL_N:
        text += (f"\n**Only {n} images**: too few for a confidence interval, so the table gives means "
                 "alone; read them as an illustration, not a measurement (per-image values in metrics.json).\n")
    for p in parts:
        if p.store.meta.views:
            text += (f"\nThe scored cache `{p.store.path}` holds {p.store.meta.views} extra random-resized views of "
                     "each image; only centre crops are scored.\n")
    return text


def _notes(cfg: ScoreConfig, p) -> str:
    meta, originals = p.store.meta, p.originals
    where = f" (`{p.store.path}`)" if len(cfg.cache) > 1 else ""
    text = "".join(f"\n**{metric} left out**{where}: {why}.\n" for metric, why in p.left_out.items())
    text += (f"\nOriginals{where} re-read from `{cfg.images or meta.source_root}`: {originals['equal']} of "
             f"{originals['checked']} equal to the cached target, {originals['missing']} missing, "
             f"{originals['changed']} changed, {originals['unreadable']} unreadable"
             + (f", {originals['refused']} refused (ids outside the images folder)" if originals["refused"] else "")
             + ".\n")
    if p.corrupt:
        text += (f"\n**{len(p.corrupt)} damaged sample(s) left out** (--skip-corrupt; their stored chunks fail their "
                 f"checksum): {', '.join(map(str, p.corrupt[:20]))}. `featrecon verify {p.store.path} --repair` finds "
                 "and marks them for re-extraction.\n")
    if meta.weights.startswith("random"):
        text += (f"\n**Random backbone weights**{where}: these numbers (top-1 and feature fidelity too) describe a "
                 f"randomly initialised {meta.backbone}, not a trained one.\n")
    return text


def write_report(cfg: ScoreConfig, parts: list) -> dict:
    """report.md, metrics.json, grid.png and metrics_by_layer.png of every cache's runs (see
    `scoring.CacheResult`), side by side: one table, one grid, one depth line per backbone."""
    several = len(parts) > 1
    for p in parts:
        p.rows = sorted(p.rows, key=_depth_key(p.store))
    rows = [r for p in parts for r in p.rows]
    baselines = [p.baseline for p in parts]
    table = _table([r for p in parts for r in [*p.rows, p.baseline]], models=several)
    notes = "".join(_notes(cfg, p) for p in parts)
    fidelity = []
    for p in parts:
        fidelity += [l for l in p.store.meta.layers if l not in fidelity and
                     any(f"rel_l2/{l}" in r for r in [*p.rows, p.baseline])]
    md = (_header(cfg, parts) + "\n" + table + "\n" + notes + "\n## How each run was trained\n\n" + _trained(rows) + "\n"
          + (("\n## Feature fidelity (relative L2 / cosine) at each cached layer\n\n"
              + _fidelity_table([r for p in parts for r in [*p.rows, p.baseline]], fidelity) + "\n") if fidelity else "")
          + "\n![grid](grid.png)\n\n![metrics by layer](metrics_by_layer.png)\n")
    (cfg.out / "report.md").write_text(md)
    print("\n" + table + "\n" + notes)
    first = parts[0]
    report = {"cache": str(first.store.path), "split": cfg.split, "n": int(len(first.idx)),
              "weights": first.store.meta.weights, "views": first.store.meta.views, "lpips": cfg.lpips,
              "left_out": first.left_out, "runs": rows, "baseline": first.baseline, "originals": first.originals,
              "corrupt_skipped": first.corrupt}
    if several:
        report["caches"] = [{"cache": str(p.store.path), "model": p.store.meta.backbone, "weights": p.store.meta.weights,
                             "n": int(len(p.idx)), "baseline": p.baseline, "originals": p.originals,
                             "left_out": p.left_out, "corrupt_skipped": p.corrupt} for p in parts]
    write_json(report, cfg.out / "metrics.json")
    _grid(cfg, parts)
    plot_metrics_by_layer(rows, baselines, cfg.out / "metrics_by_layer.png",
                          depth={r["run"]: _relative_depth(p.store, r) for p in parts for r in p.rows})
    log.info("report written to %s (report.md, metrics.json, grid.png, metrics_by_layer.png)", cfg.out)
    return report


def _relative_depth(store: CacheStore, row: dict) -> float:
    """Where a run's deepest layer sits among its cache's layers, from 0 (the first) to 1 (the last)."""
    order = list(store.meta.layers)
    return max(order.index(l) for l in row["layers"].split("+")) / max(1, len(order) - 1)


def _grid(cfg: ScoreConfig, parts: list) -> None:
    """Rows: the first saved images that every cache holds (matched by id); columns: the original, then
    every run's reconstruction, backbone by backbone, shallow to deep."""
    ids = [p.store.ids() for p in parts]
    first = parts[0]
    chosen = [int(i) for i in first.idx[: min(cfg.save, 6)]]
    rows = []
    for i in chosen:
        where = [i] + [w.index(ids[0][i]) if ids[0][i] in w else None for w in ids[1:]]
        if None not in where and all(all(j in p.recon[r["run"]] for r in p.rows) for p, j in zip(parts, where)):
            rows.append(where)
    if not rows or not any(p.rows for p in parts):
        return
    several = len(parts) > 1
    columns = [("original", {k: first.store.read(S.IMAGES, w[0], w[0] + 1)[0] for k, w in enumerate(rows)})]
    for n, p in enumerate(parts):
        for r in p.rows:
            label = (f"{p.store.meta.backbone}\n" if several else "") + f"{r['layers']}\n{r['psnr']['mean']:.1f} dB"
            columns.append((label, {k: p.recon[r["run"]][w[n]] for k, w in enumerate(rows)}))
    image_grid(list(range(len(rows))), columns, cfg.out / "grid.png")
