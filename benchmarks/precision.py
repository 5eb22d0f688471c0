"""The decoder's compute precision on this machine: fp32 against bf16 autocast, side by side.

    python -m benchmarks.precision --cache CACHE --layers stem,layer1,layer2,layer3,layer4

For each layer, train-decoder's default decoder on the real training loop (loader, windows,
step: `benchmarks.quality.epoch_cost`) and one validation pass over the validation images, in
fp32 and in bf16 autocast, alternating (fp32 first in odd rounds, bf16 first in even ones, so
the machine's drift cancels). Prints per round the training samples/s and the validation
seconds of both, and their ratios; `--precision auto` chooses bf16 where this is worth it
(`featrecon.train.step.auto_precision`).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

from featrecon.cache.factory import open_cache
from featrecon.device import native_bf16, resolve_device
from featrecon.train.config import TrainConfig, resolve

from .quality import epoch_cost


def compare(cache: Path, layer: str, rounds: int) -> dict:
    cfg = TrainConfig(cache=cache, layers=tuple(layer.split("+")), out=Path("unused"), progress=False)
    with open_cache(cache) as store:
        cfg = resolve(cfg, store.meta)
    runs: dict[str, list] = {"fp32": [], "bf16": []}
    for r in range(rounds):
        for precision in (("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")):
            rate, val_s, _ = epoch_cost(replace(cfg, precision=precision))
            runs[precision].append({"samples_s": rate, "validation_s": val_s})
    per_round = [{"train": b["samples_s"] / f["samples_s"], "validation": f["validation_s"] / max(b["validation_s"], 1e-9)}
                 for f, b in zip(runs["fp32"], runs["bf16"])]
    return {"layer": layer, "runs": runs, "speedup_per_round": per_round,
            "train_speedup": statistics.median(x["train"] for x in per_round),
            "validation_speedup": statistics.median(x["validation"] for x in per_round)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--layers", default="layer1,layer3")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the measurements here")
    args = p.parse_args(argv)
    device = resolve_device("auto")
    print(f"device {device}; bf16 in hardware: {native_bf16(device)}")
    print("| layer | training samples/s fp32 / bf16 (rounds) | bf16 / fp32 | validation pass s fp32 / bf16 | fp32 / bf16 |")
    print("|---|---|---:|---|---:|")
    results = []
    for layer in args.layers.split(","):
        res = compare(args.cache, layer, args.rounds)
        results.append(res)
        f, b = res["runs"]["fp32"], res["runs"]["bf16"]
        rates = ", ".join(f"{x['samples_s']:.0f} / {y['samples_s']:.0f}" for x, y in zip(f, b))
        vals = ", ".join(f"{x['validation_s']:.2f} / {y['validation_s']:.2f}" for x, y in zip(f, b))
        print(f"| {layer} | {rates} | **{res['train_speedup']:.2f}x** | {vals} | **{res['validation_speedup']:.2f}x** |",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
