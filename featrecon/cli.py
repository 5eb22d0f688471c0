"""Console commands: parse, build the stage's config, call the library.

Every option comes from the stage's config (`extract.config`, `train.config`,
`evaluate.config`), with its default, choices and help, so the commands and the Python API
cannot drift apart. Heavy imports (torch, zarr) happen after parsing: `--help` is instant.
A `FeatreconError` becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .errors import FeatreconError
from .evaluate.config import ScoreConfig
from .extract.config import ExtractConfig
from .settings import add_arguments, from_arguments
from .train.config import EACH, TrainConfig


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like featrecon's own."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _logging_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _storage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE", help="a setting of the object store "
                   "behind a URL (fsspec), e.g. endpoint_url=http://127.0.0.1:9000 or anon=true; repeatable. "
                   "Credentials also come from the usual environment variables (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...)")


def _run(prog: str, fn, args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from .cache import remote

    try:
        remote.set_options(remote.parse_options(getattr(args, "storage_option", None)))
        status = fn(args)
    except FeatreconError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; what was written is kept, and the same command resumes", file=sys.stderr)
        return 130
    return status or 0


# ----------------------------------------------------------------------------- extract-features


def extract_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="extract-features", description=(
        "Run a torchvision ResNet-50 once over a folder of images and cache every requested layer's "
        "activations, the preprocessed images, ids, labels and a train/holdout split."))
    add_arguments(p, ExtractConfig)
    p.add_argument("--stats", type=Path, help="also write this run's counts and timings to this JSON file (under "
                   "torchrun: a list of one record per rank, with its shards and images)")
    _storage_options(p)
    _logging_options(p)
    return p


def _extract(args: argparse.Namespace) -> None:
    # OpenMP threads that finish a parallel region spin before they sleep (libgomp: about 300k
    # iterations); the writer and the decoders share the cores with the backbone, and a short
    # spin gives them that time (benchmarks/DESIGN.md). Read once, when torch loads;
    # an explicit setting wins.
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    from .extract.run import extract
    from .train.checkpoint import write_json

    cfg = from_arguments(ExtractConfig, args)
    if cfg.layers == "list":
        print(model_layers(cfg.model, every_node=True))
        return
    result = extract(cfg)
    if args.stats and len(result.ranks) > 1:  # under torchrun: one record per rank, written by rank 0
        write_json(result.ranks, args.stats)
    elif args.stats and result.stats.get("rank", 0) == 0:
        write_json(result.summary(), args.stats)


def extract_main(argv: list[str] | None = None) -> int:
    return _run("extract-features", _extract, extract_parser().parse_args(argv))


# ----------------------------------------------------------------------------- train-decoder


def train_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="train-decoder", description=(
        "Train a decoder that reconstructs the image from one or several cached layers. "
        "Reads only the cache: the backbone never runs and no image file is decoded."))
    add_arguments(p, TrainConfig)
    _storage_options(p)
    _logging_options(p)
    return p


def _train(args: argparse.Namespace) -> None:
    from .train.loop import fit, fit_each

    cfg = from_arguments(TrainConfig, args)
    (fit_each if cfg.layers == EACH else fit)(cfg)


def train_main(argv: list[str] | None = None) -> int:
    return _run("train-decoder", _train, train_parser().parse_args(argv))


# ----------------------------------------------------------------------------- score


def score_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="score", description=(
        "Score every decoder on a split of the cache: MSE, PSNR and SSIM on [0,1] RGB images, "
        "side-by-side PNGs and a grid across depths."))
    add_arguments(p, ScoreConfig)
    _storage_options(p)
    _logging_options(p)
    return p


def _score(args: argparse.Namespace) -> None:
    from .evaluate.scoring import score

    score(from_arguments(ScoreConfig, args))


def score_main(argv: list[str] | None = None) -> int:
    return _run("score", _score, score_parser().parse_args(argv))


# ----------------------------------------------------------------------------- models


def model_layers(name: str, every_node: bool = False) -> str:
    """A model's standard layers (what --layers all extracts), and with `every_node` its graph's nodes."""
    import torch

    from .extract.backbone import graph_nodes, standard_layers
    from .extract.models import build

    with torch.device("meta"):
        model = build(name, 224)
    layers = ", ".join(f"{k} ({v})" if k != v else k for k, v in standard_layers(name, model).items())
    text = f"{name}: {layers}"
    if every_node:
        nodes = graph_nodes(model)
        text += f"\n{len(nodes)} torchvision nodes, any of which --layers takes:\n" + "\n".join(f"  {n}" for n in nodes)
    return text


def _models(args: argparse.Namespace) -> None:
    from .extract.models import FAMILIES

    for family in FAMILIES:
        print(f"{family.name}:")
        for name in family.models:
            print("  " + model_layers(name))


def models_main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="featrecon models", description="The torchvision classifiers extract-features --model takes, "
                "and the layers --layers all extracts from each (names, then their torchvision nodes)")
    _logging_options(p)
    return _run("featrecon models", _models, p.parse_args(argv))


# ----------------------------------------------------------------------------- verify


def verify_parser() -> argparse.ArgumentParser:
    from .settings import location

    p = _Parser(prog="featrecon verify", description=(
        "Read every stored chunk of a cache, check its checksum, its presence, the features' finiteness "
        "and the metadata; exit 1 if anything is damaged."))
    p.add_argument("cache", type=location)
    p.add_argument("--repair", action="store_true", help="mark the shards of damaged samples pending, so that "
                   "rerunning the original extract-features command re-extracts just those")
    p.add_argument("--threads", type=int, help="reading threads (default: all cores)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    _storage_options(p)
    _logging_options(p)
    return p


def _verify(args: argparse.Namespace) -> int:
    from .cache.verify import verify

    if args.threads is not None and args.threads < 1:
        raise FeatreconError(f"--threads {args.threads}: must be at least 1")
    report = verify(args.cache, threads=args.threads, progress=args.progress, repair=args.repair)
    print(report.summary())
    if not report.ok:
        print(report.advice(args.repair))
    return 0 if report.ok or (report.repaired_shards and not report.metadata_damaged) else 1


def verify_main(argv: list[str] | None = None) -> int:
    return _run("featrecon verify", _verify, verify_parser().parse_args(argv))


COMMANDS = {"extract-features": extract_main, "train-decoder": train_main, "score": score_main,
            "verify": verify_main, "models": models_main}


def main(argv: list[str] | None = None) -> int:
    """`featrecon COMMAND ...` (also `python -m featrecon COMMAND ...`)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: featrecon {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])
