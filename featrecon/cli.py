"""Console commands: parse, build the stage's config, call the library.

Heavy imports (torch, zarr) happen after parsing, so `--help` is instant.
A `FeatreconError` becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like featrecon's own."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _location(text: str):
    from .remote import location

    return location(text)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE", help="a setting of the object store "
                   "behind a URL (fsspec), e.g. endpoint_url=http://127.0.0.1:9000 or anon=true; repeatable. "
                   "Credentials also come from the usual environment variables (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _run(prog: str, fn, args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from . import FeatreconError, remote

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
    p.add_argument("--images", type=Path, help="folder of images, searched recursively "
                   "(default: the sample photos bundled with scikit-image)")
    p.add_argument("--layers", default="all", help="all, or a comma list of stem, layer1..layer4 or torchvision node names")
    p.add_argument("--out", type=_location, default=Path("cache.zarr"), help="cache to write: a .zarr folder, a .h5 "
                   "file, or a Zarr URL (s3://bucket/path/cache.zarr; see --storage-option)")
    p.add_argument("--format", dest="fmt", choices=["zarr", "hdf5"], help="default: from the --out suffix (.h5 -> hdf5)")
    p.add_argument("--weights", default="auto", help="IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT, a state-dict path, "
                   "random[:SEED], or auto (IMAGENET1K_V2; random:0 with a warning when it cannot be downloaded)")
    p.add_argument("--size", type=int, help="crop size in pixels (default: the weights' own, 224)")
    p.add_argument("--dtype", default="float16", help="stored feature dtype: float16 or float32")
    p.add_argument("--codec", default="zstd:1", help="zstd[:LEVEL] (up to 22: smaller; negative: faster), lz4 (blosc, bit-shuffle), blosc-zstd, none")
    p.add_argument("--batch-size", type=int, help="images per forward (default: 8 on a CPU, 128 on a GPU)")
    p.add_argument("--workers", type=int, help="image-decoding processes (default: 2 on a CPU, "
                   "all cores but two on a GPU)")
    p.add_argument("--autocast", default="none", choices=["none", "bf16", "fp16"], help="reduced-precision forward")
    p.add_argument("--no-channels-last", action="store_true", help="contiguous NCHW convolutions (slower)")
    p.add_argument("--compile", default="auto", choices=["auto", "yes", "no"],
                   help="on a CPU, run the forward through torch.compile: 15-30%% faster after a 10-25 s compile "
                   "(auto: for runs of 3000 images or more; a GPU replays CUDA graphs instead)")
    p.add_argument("--holdout-fraction", type=float, default=0.1)
    p.add_argument("--labels", type=Path, help="CSV of path,label, or ILSVRC2012_validation_ground_truth.txt")
    p.add_argument("--class-map", type=Path, help="devkit mapping for the ground truth "
                   "(default: imagenet_class_mapping.txt beside it)")
    p.add_argument("--limit", type=int, help="only the first N images")
    p.add_argument("--views", type=_views, default=None, metavar="K|auto", help="besides the centre crop, K "
                   "random-resized crops (half mirrored) of each image as extra training samples, seeded by the "
                   "image id and recorded in the cache; only centre crops are scored (default auto: none from "
                   "400 images up, below that enough to reach about 400 samples, at most 16 per image)")
    p.add_argument("--shard-size", type=int, default=32, help="samples per shard")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache instead of resuming it")
    p.add_argument("--stats", type=Path, help="also write this run's counts and timings to this JSON file (under "
                   "torchrun: a list of one record per rank, with its shards and images)")
    _common(p)
    return p


def _or_auto(convert, what: str):
    """An argparse type: "auto" gives None (the setting is resolved later), else convert(text)."""
    def parse(text: str):
        if text == "auto":
            return None
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give {what}, or auto") from None
    return parse


_auto_int = _or_auto(int, "a whole number")
_auto_float = _or_auto(float, "a number")
_views = _auto_int


def _extract(args: argparse.Namespace) -> None:
    # OpenMP threads that finish a parallel region spin before they sleep (libgomp: about
    # 300k iterations). The writer and the decoders share the cores with the backbone, and
    # that spinning takes their time: a short spin made extraction 6-8% faster on a 2-core
    # CPU (three runs each way). Read once, when torch loads; an explicit setting wins.
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    from .checkpoint import write_json
    from .extract import ExtractConfig, extract

    result = extract(ExtractConfig(
        out=args.out, images=args.images, layers=args.layers, weights=args.weights, size=args.size,
        dtype=args.dtype, codec=args.codec, fmt=args.fmt, batch_size=args.batch_size, workers=args.workers,
        device=args.device, autocast=args.autocast, channels_last=not args.no_channels_last,
        holdout_fraction=args.holdout_fraction, labels=args.labels, class_map=args.class_map, limit=args.limit,
        views=args.views, overwrite=args.overwrite, shard_size=args.shard_size, progress=not args.no_progress, compile=args.compile))
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
    p.add_argument("--cache", type=_location, default=Path("cache.zarr"), help="a cache folder, .h5 file or Zarr URL")
    p.add_argument("--layer", required=True, help="a cached layer, a comma list to fuse (layer2,layer3), or each: "
                   "one decoder per cached layer, one after another (rerun to resume)")
    p.add_argument("--out", type=Path, help="run folder (default: runs/<layer>; with --layer each, the folder "
                   "that gets one run per layer, default runs)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8, help="samples per step and rank (8 trained best in "
                   "the same time on a CPU; on a GPU a larger batch keeps it busy)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 5e-4 for espcn and edsr, 2e-3 for upconv)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup", type=float, default=0.05, help="share of all steps spent warming up the learning rate")
    p.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient's global norm to this before each "
                   "step (0: no clipping)")
    p.add_argument("--width", type=_auto_int, default=None, metavar="N|auto", help="channels of the widest (coarsest) "
                   "stage; halved per upsampling, down to width//8 (auto: 256 for inputs at stride 4 or finer, "
                   "stem and layer1, else 128)")
    p.add_argument("--depth", type=int, default=1, help="residual blocks per upsampling stage")
    p.add_argument("--res-scale", type=_auto_float, default=None, metavar="X|auto", help="edsr and espcn: scale of "
                   "each residual branch before its skip (auto: 1 for inputs at stride 4 or finer, stem and layer1; "
                   "0.1, EDSR's, deeper, where 1 was unstable)")
    p.add_argument("--arch", default="espcn", choices=["espcn", "edsr", "upconv"], help="decoder: "
                   "espcn (edsr's blocks down to stride 4, then one x4 sub-pixel head), edsr (no normalisation, "
                   "sub-pixel upsampling to full resolution, scaled residuals) or upconv (nearest upsampling, "
                   "GroupNorm, sigmoid); benchmarks/QUALITY.md compares them")
    p.add_argument("--loss", default="mse", choices=["mse", "l1", "mse+ssim"])
    p.add_argument("--no-input-norm", action="store_true", help="feed the features unscaled (default: each channel "
                   "standardised by the training features' mean and std, kept in the checkpoint)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast on CUDA, fp32 on a CPU (bf16 ran 8x slower on a 2-core CPU)")
    p.add_argument("--compile", default="auto", choices=["auto", "yes", "no"],
                   help="torch.compile the decoder (auto: on CUDA; eager, with a warning, if compiling fails)")
    p.add_argument("--in-memory", default="auto", choices=["auto", "yes", "no"],
                   help="load the training arrays into RAM once (auto: when they fit comfortably)")
    p.add_argument("--prefetch", type=int, help="shards read ahead of the step (default: twice --read-threads)")
    p.add_argument("--read-threads", type=int, help="threads decoding the cache (default: all cores)")
    p.add_argument("--eval-samples", type=int, default=64, help="at most this many validation images for the "
                   "per-epoch PSNR that chooses best.pt")
    p.add_argument("--crop", type=_auto_int, default=None, metavar="N|auto", help="train on random windows of this "
                   "many pixels and the matching feature cells (a multiple of the coarsest layer's stride; 0: whole "
                   "images; auto: about 112 px, 64 for inputs at stride 4 or finer, whole images when that is not smaller); "
                   "scoring uses whole images")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of the train split's images kept out of "
                   "training to choose best.pt (never the holdout)")
    p.add_argument("--early-stop", type=int, default=0, help="stop after N epochs without a better validation PSNR "
                   "(0: train all epochs)")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last.pt")
    p.add_argument("--allow-partial", action="store_true", help="train on the done samples of an unfinished cache")
    p.add_argument("--skip-corrupt", action="store_true", help="leave out samples whose stored chunks fail their "
                   "checksum (counted in the log) instead of stopping")
    _common(p)
    return p


def _train(args: argparse.Namespace) -> None:
    from .train import TrainConfig, fit, fit_each

    layers = tuple(s.strip() for s in args.layer.split(",") if s.strip())
    each = layers == ("each",)
    out = args.out or (Path("runs") if each else Path("runs") / "+".join(layers))
    (fit_each if each else fit)(TrainConfig(
        cache=args.cache, layers=layers, out=out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup=args.warmup, grad_clip=args.grad_clip, width=args.width, depth=args.depth, res_scale=args.res_scale,
        arch=args.arch,
        input_norm=not args.no_input_norm, loss=args.loss, seed=args.seed, device=args.device,
        precision=args.precision, compile=args.compile, in_memory=args.in_memory, prefetch=args.prefetch, read_threads=args.read_threads,
        eval_samples=args.eval_samples, crop=args.crop, val_fraction=args.val_fraction, early_stop=args.early_stop,
        resume=args.resume, allow_partial=args.allow_partial,
        skip_corrupt=args.skip_corrupt,
        progress=not args.no_progress))


def train_main(argv: list[str] | None = None) -> int:
    return _run("train-decoder", _train, train_parser().parse_args(argv))


# ----------------------------------------------------------------------------- score


def score_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="score", description=(
        "Score every decoder on a split of the cache: MSE, PSNR and SSIM on [0,1] RGB images, "
        "side-by-side PNGs and a grid across depths."))
    p.add_argument("--cache", type=_location, default=Path("cache.zarr"), help="a cache folder, .h5 file or Zarr URL")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="folder searched for run checkpoints")
    p.add_argument("--checkpoint", type=Path, action="append", help="score these checkpoints instead (repeatable)")
    p.add_argument("--which", default="best", choices=["best", "last"], help="checkpoint of each run folder")
    p.add_argument("--split", default="holdout", help="holdout, train or all")
    p.add_argument("--out", type=Path, default=Path("report"))
    p.add_argument("--images", type=_location, help="source folder or URL prefix of the originals (default: the one "
                   "recorded in the cache)")
    p.add_argument("--save", type=int, default=8, help="images saved as original_X.png / reconstruction_X.png per run")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--skip-corrupt", action="store_true", help="leave out samples whose stored chunks fail their "
                   "checksum (counted in the report) instead of stopping")
    _common(p)
    return p


def _score(args: argparse.Namespace) -> None:
    from .evaluate import ScoreConfig, score

    score(ScoreConfig(
        cache=args.cache, runs=args.runs, checkpoints=tuple(args.checkpoint or ()), which=args.which,
        split=args.split, out=args.out, images=args.images, save=args.save, batch_size=args.batch_size,
        device=args.device, progress=not args.no_progress, skip_corrupt=args.skip_corrupt))


def score_main(argv: list[str] | None = None) -> int:
    return _run("score", _score, score_parser().parse_args(argv))


# ----------------------------------------------------------------------------- verify


def verify_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="featrecon verify", description=(
        "Read every stored chunk of a cache, check its checksum, the features' finiteness and the "
        "metadata; exit 1 if anything is damaged."))
    p.add_argument("cache", type=_location)
    p.add_argument("--repair", action="store_true", help="mark the shards of damaged samples pending, so that "
                   "rerunning the original extract-features command re-extracts just those")
    p.add_argument("--threads", type=int, help="reading threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _verify(args: argparse.Namespace) -> int:
    from . import FeatreconError
    from .verify import verify

    if args.threads is not None and args.threads < 1:
        raise FeatreconError(f"--threads {args.threads}: must be at least 1")
    report = verify(args.cache, threads=args.threads, progress=not args.no_progress, repair=args.repair)
    print(report.summary())
    if not report.ok:
        print(report.advice(args.repair))
    return 0 if report.ok or (report.repaired_shards and not report.metadata_damaged) else 1


def verify_main(argv: list[str] | None = None) -> int:
    return _run("featrecon verify", _verify, verify_parser().parse_args(argv))


COMMANDS = {"extract-features": extract_main, "train-decoder": train_main, "score": score_main,
            "verify": verify_main}


def main(argv: list[str] | None = None) -> int:
    """`featrecon COMMAND ...` (also `python -m featrecon COMMAND ...`)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: featrecon {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])
