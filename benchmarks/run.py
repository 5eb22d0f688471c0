"""Measure the cache against its limits, side by side in one run.

    python -m benchmarks.run --images ../shared/data/imagenet-sample --out benchmarks/results [--publish]

1. extraction (`extract-features`: decode + forward + write) vs the bare forward
   (`benchmarks.sections.extraction`)
2. storage: bytes per sample and write speed for each format and codec (`benchmarks.sections.storage`)
3. the training loader vs the codec's own limit, and the codec choice for training
   (`benchmarks.sections.loader`)
4. the decoder's training step fed by the cache vs its compute limit and vs JPEG decoding +
   backbone (`benchmarks.sections.training`)

Every figure is a ratio of two measurements taken here, in this run; absolute
numbers and the machine are printed too. `--sections` runs some sections only (the
others keep their last results in latest.json, each with its own command and date);
sections 2-4 need a cache, which section 1 writes or `--cache` names. `--quick` is a
smoke mode for the tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from featrecon.device import resolve_device
from featrecon.extract.config import ExtractConfig
from featrecon.extract.images import discover_images
from featrecon.extract.run import extract, with_device_defaults

from .common import drop_page_cache, machine
from .sections import extraction, loader, models, storage, training

SECTIONS = ("extraction", "storage", "loader", "training", "models")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--cache", type=Path, help="an all-layers cache of --images for sections 2-4 "
                   "(default: the one section 1 writes, else one extracted here)")
    p.add_argument("--device", default="auto")
    p.add_argument("--n", type=int, help="images (default: 480 on CPU, 5000 on GPU, 16 with --quick)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, help="default: extract-features' own (8 on a CPU, 128 on a GPU)")
    p.add_argument("--train-batch", type=int, default=8, help="train-decoder's default batch")
    p.add_argument("--train-steps", type=int)
    p.add_argument("--workers", type=int, help="default: extract-features' own")
    p.add_argument("--autocast", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--weights", default="random:0")
    p.add_argument("--codec", help="extract-features --codec for section 1, or a comma list to compare codecs "
                   "side by side (each round extracts with each in turn; default: its own)")
    p.add_argument("--extract-layers", default="all,layer3", help="section 1's layer sets (comma list)")
    p.add_argument("--compile", choices=["yes", "no"], help="extract-features --compile (default yes, what a "
                   "run of 3000 images or more does on a CPU; no with --quick)")
    p.add_argument("--rounds", type=int, help="extraction runs per layer set, each between two bare forwards, "
                   "and alternating training rounds (default 3, 1 with --quick)")
    p.add_argument("--passes", type=int, help="passes per loader measurement (default 3, 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke mode: a few small images, proves it runs")
    p.add_argument("--publish", action="store_true", help="also write benchmarks/RESULTS.md")
    p.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        p.error(f"--sections: unknown {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.passes = args.passes or (1 if args.quick else 3)
    args.compile = args.compile or ("no" if args.quick else "yes")
    if args.rounds < 1 or args.passes < 1:
        p.error("--rounds and --passes must be at least 1")
    return args


def _cache_for(args, root: Path, ids: list[str], work: Path, device) -> Path:
    if args.cache:
        return args.cache
    out = work / "bench_cache.zarr"
    extract(ExtractConfig(out=out, images=root, limit=len(ids), weights=args.weights, size=args.size,
                          batch_size=args.batch_size, workers=args.workers, device=str(device), progress=False, views=0))
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = resolve_device(args.device)
    d = with_device_defaults(ExtractConfig(out=Path("."), batch_size=args.batch_size, workers=args.workers), device)
    args.batch_size, args.workers = d.batch_size, d.workers
    if args.quick:
        args.size, n, steps, args.train_batch = 64, args.n or 16, args.train_steps or 2, 4
    else:
        n = args.n or (5000 if device.type == "cuda" else 480)
        steps = args.train_steps or (200 if device.type == "cuda" else 8)
    root = args.images.resolve()
    ids = discover_images(root, limit=n)
    stamp = {"command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
             "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(device), "device": str(device),
             "images": len(ids), "size": args.size, "batch_size": args.batch_size, "workers": args.workers,
             "autocast": args.autocast, "rounds": args.rounds, "compile": args.compile, "weights": args.weights,
             "cache": _describe(args.cache) if args.cache else None}
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "latest.json"
    result = json.loads(saved.read_text()) if saved.exists() and set(args.sections) != set(SECTIONS) else {}
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="featrecon-bench-", dir=args.work))
    try:
        cache = args.cache
        if "extraction" in args.sections:
            result["extraction"], cache = extraction.bench_extraction(args, root, ids, work, device)
            result["extraction_run"] = stamp
        if set(args.sections) - {"extraction"}:
            cache = cache or _cache_for(args, root, ids, work, device)
        if "storage" in args.sections:
            result["storage"] = storage.bench_storage(cache, 8 if args.quick else 64, work)
            result["checksum"] = storage.checksum_cost(cache, 2 if args.quick else 8, args.rounds)
            result["storage_run"] = stamp
        if "loader" in args.sections:
            drop_page_cache()  # nothing of another section's reads stays warm by accident
            result["loader"] = loader.bench_loader(cache, args.train_batch, args.passes, work)
            result["codecs"] = loader.bench_codecs(cache, work, 16 if args.quick else 256, args.train_batch, args.passes)
            result["loader_run"] = stamp
        if "training" in args.sections:
            result["training"] = training.bench_training(cache, root, ids, args, device, steps, args.rounds)
            result["training_run"] = stamp
        if "models" in args.sections:
            result["models"] = models.bench_models(args, root, ids[: 16 if args.quick else 96], work, device)
            result["models_run"] = stamp
    finally:
        shutil.rmtree(work, ignore_errors=True)
    saved.write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (args.out / "latest.md").write_text(md)
    plot(result, args.out / "latest.png")
    if args.publish:
        (Path(__file__).parent / "RESULTS.md").write_text(md + "\n![ratios](results/latest.png)\n")
    print(md)
    return result


def _provenance(run: dict, section: str) -> str:
    m = run["machine"]
    data = (f"{run['images']} images at {run['size']} px, weights {run['weights']}"
            if section == "extraction" or not run.get("cache") else run["cache"])
    return (f"Command: `{run['command']}`  \nDate: {run['date']}  \nMachine: {m['cpu']}, {m['cores']} cores, GPU: "
            f"{m['gpu'] or 'none'}, torch {m['torch']} ({m['torch_threads']} threads); device `{run['device']}`; "
            f"{data}.\n")


def _describe(cache: Path) -> str:
    """The cache sections 2-4 read, as the report names it."""
    from featrecon.cache.factory import open_cache

    with open_cache(cache) as store:
        m = store.meta
    return (f"the cache `{cache}` ({m.n} samples at {m.preprocessing.crop} px, weights {m.weights}, "
            f"codec {m.codec}, schema {m.schema_version})")


def markdown(r: dict) -> str:
    lines = ["# featrecon benchmarks\n"]
    parts = [("extraction", lambda: extraction.markdown({**r["extraction_run"], "extraction": r["extraction"]})),
             ("storage", lambda: storage.markdown(r["storage"], r.get("checksum"))),
             ("loader", lambda: loader.markdown(r["loader"], r.get("codecs", []))),
             ("training", lambda: training.markdown(r["training"])),
             ("models", lambda: models.markdown(r["models"]))]
    for name, render in parts:
        if name in r:
            lines += [*render(), "", _provenance(r[f"{name}_run"], name), ""]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    """Every ratio of the run as a bar, its target as a red mark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"extract {k} / stock forward", v["ratio"], 0.9) for k, v in r.get("extraction", {}).items()]
    for layer, v in r.get("loader", {}).items():
        bars += [(f"loader {layer} / codec limit", v["ratio_to_limit"], 0.8),
                 (f"loader {layer}: all cores / 1 thread, per core", v["scaling"] / v["cores"], 0.85)]
    if "training" in r:
        bars.append(("training: cache / compute limit", r["training"]["ratio_to_limit"], 0.95))
    for row in r.get("models", []):
        bars.append((f"extract {row['model']} / its stock forward", row["ratio"], 0.9))
    if not bars:
        return
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(bars) + 1.2))
    y = np.arange(len(bars))
    ax.barh(y, [b[1] for b in bars], color=["tab:green" if b[1] >= b[2] else "tab:orange" for b in bars])
    ext = list(r.get("extraction", {}).values())  # the extraction bars come first: whiskers span their rounds
    if ext:
        ax.errorbar([v["ratio"] for v in ext], y[:len(ext)], fmt="none", ecolor="k", capsize=3,
                    label="lowest-highest round", xerr=[[v["ratio"] - v.get("ratio_low", v["ratio"]) for v in ext],
                                                        [v.get("ratio_high", v["ratio"]) - v["ratio"] for v in ext]])
    ax.scatter([b[2] for b in bars], y, marker="|", s=300, color="tab:red", label="target")
    ax.set_yticks(y, [b[0] for b in bars], fontsize=8)
    ax.set(xlabel="ratio measured in one run",
           xlim=(0, max(1.1, max(b[1] for b in bars) * 1.05)))
    ax.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1, 1), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
