"""extract-features' settings: one definition for the command and the Python API (no torch here)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..cache.schema import CODEC_CHOICES, DEFAULT_SHARD_SIZE, FEATURE_DTYPES, FORMATS, Codec
from ..errors import FeatreconError
from ..settings import LOCATION, PATH, or_auto, setting

WEIGHTS_HELP = ("the model's torchvision weights (for resnet50 IMAGENET1K_V1, IMAGENET1K_V2 or DEFAULT; downloaded "
                "once), a path to a state-dict file, random or random:SEED (seeded init), or auto (the model's "
                "DEFAULT weights, or random:0 with a warning when they cannot be downloaded)")
AUTOCASTS = ("none", "bf16", "fp16")
COMPILE_CHOICES = ("auto", "yes", "no")
# Below this many images, --compile auto runs eagerly: compiling takes 10-25 s, which a few
# milliseconds saved per image repay only over thousands of images (benchmarks/DESIGN.md).
COMPILE_AUTO_MIN = 3000
MAX_VIEWS = 256
MIN_SIZE = 32  # ResNet-50's coarsest stride


@dataclass(frozen=True)
class ExtractConfig:
    out: Path | str = setting(Path("cache.zarr"), parse=LOCATION, help="cache to write: a .zarr folder, a .h5 file, "
                              "or a Zarr URL (s3://bucket/path/cache.zarr; see --storage-option)")
    images: Path | None = setting(None, parse=PATH, help="folder of images, searched recursively (default: the "
                                  "sample photos bundled with scikit-image)")
    model: str = setting("resnet50", help="the backbone: a torchvision classifier (the ResNets, wide_resnet50_2, "
                         "ConvNeXt, EfficientNet, ViT, Swin; featrecon models lists them with their layers)")
    layers: str = setting("all", help="all (the model's own stages: for ResNets stem, layer1..layer4), a comma list "
                          "of those names or of torchvision node names, or list (print them and stop)")
    weights: str = setting("auto", help=WEIGHTS_HELP)
    size: int | None = setting(None, parse=int, help="crop size in pixels (default: the weights' own, 224)")
    dtype: str = setting("float16", choices=FEATURE_DTYPES, help="stored feature dtype")
    codec: str = setting("zstd:-3", help="compression: " + ", ".join(CODEC_CHOICES) + " (zstd's negative levels "
                         "are faster and larger, up to 22 smaller; the default was chosen by the codec table in "
                         "benchmarks/RESULTS.md; lz4 and blosc-zstd with bit-shuffle)")
    fmt: str | None = setting(None, flag="--format", choices=FORMATS, help="default: from the --out suffix "
                              "(.h5 -> hdf5)")
    batch_size: int | None = setting(None, parse=int, help="images per forward (default: 8 on a CPU, 128 on a GPU)")
    workers: int | None = setting(None, parse=int, help="image-decoding processes, 0 to decode in the main process "
                                  "(default: 2 on a CPU, all cores but two on a GPU)")
    device: str = setting("auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    autocast: str = setting("none", choices=AUTOCASTS, help="reduced-precision forward")
    channels_last: bool = setting(True, negate="--no-channels-last", help="contiguous NCHW convolutions (slower)")
    holdout_fraction: float = setting(0.1, parse=float, help="share of the images (by a hash of their id) held "
                                      "out for scoring")
    labels: Path | None = setting(None, parse=PATH, help="CSV of path,label, or ILSVRC2012_validation_ground_truth.txt")
    class_map: Path | None = setting(None, parse=PATH, help="devkit mapping for the ground truth (default: "
                                     "imagenet_class_mapping.txt beside it)")
    limit: int | None = setting(None, parse=int, help="only the first N images (sorted ids)")
    views: int | None = setting(None, parse=or_auto(int, "a whole number"), metavar="K|auto",
                                help="besides the centre crop, K random-resized crops (half mirrored) of each image "
                                "as extra training samples, seeded by the image id and recorded in the cache; only "
                                "centre crops are scored (default auto: none from 400 images up, below that enough "
                                "to reach about 400 samples, at most 16 per image)")
    shard_size: int = setting(DEFAULT_SHARD_SIZE, parse=int, help="samples per shard")
    overwrite: bool = setting(False, help="replace an existing featrecon cache instead of resuming it (never "
                              "anything else)")
    compile: str = setting("auto", choices=COMPILE_CHOICES, help="on a CPU, run the forward through torch.compile "
                           f"after a 10-25 s compile (auto: for runs of {COMPILE_AUTO_MIN} images or more; a GPU "
                           "replays CUDA graphs instead)")
    progress: bool = setting(True, negate="--no-progress", help="no progress bar")

    def validate(self) -> None:
        """One clear error for the first bad setting that needs no torch, files or network to see."""
        choices = (("--dtype", self.dtype, FEATURE_DTYPES), ("--autocast", self.autocast, AUTOCASTS),
                   ("--compile", self.compile, COMPILE_CHOICES), ("--format", self.fmt, (None, *FORMATS)))
        for flag, value, allowed in choices:
            if value not in allowed:
                raise FeatreconError(f"{flag} {value!r}: choose one of {', '.join(a for a in allowed if a)}")
        Codec.parse(self.codec)
        if (self.batch_size is not None and self.batch_size < 1) or self.shard_size < 1:
            raise FeatreconError("--batch-size and --shard-size must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise FeatreconError(f"--workers {self.workers}: must be 0 (decode in the main process) or more")
        if self.views is not None and not 0 <= self.views <= MAX_VIEWS:
            raise FeatreconError(f"--views {self.views}: must be auto or 0 to {MAX_VIEWS} extra views per image")
        if self.limit is not None and self.limit < 1:
            raise FeatreconError(f"--limit {self.limit}: must be at least 1")
        if self.size is not None and self.size < MIN_SIZE:
            raise FeatreconError(f"--size {self.size}: must be at least {MIN_SIZE} (layer4 has stride 32)")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise FeatreconError(f"--holdout-fraction {self.holdout_fraction}: must be in [0, 1)")
        for flag, path in (("--labels", self.labels), ("--class-map", self.class_map)):
            if path is not None and not Path(path).is_file():
                raise FeatreconError(f"{flag} {path}: file not found")
        if self.images is not None and not Path(self.images).expanduser().is_dir():
            raise FeatreconError(f"--images {self.images}: folder does not exist" if not Path(self.images).exists()
                                 else f"--images {self.images}: not a folder; point it at a folder of images")
        check_weights(self.weights)


def check_weights(weights: str) -> None:
    """A clear error for a --weights value that names nothing, before anything is loaded (a NAME in
    capitals is checked against the model's own weights when torchvision is loaded)."""
    if weights == "auto" or (weights.isupper() and weights.replace("_", "").isalnum()):
        return
    if weights == "random" or weights.startswith("random:"):
        if not (weights.partition(":")[2] or "0").isdigit():
            raise FeatreconError(f"--weights {weights!r}: the seed after 'random:' must be a non-negative integer")
        return
    if not Path(weights).is_file():
        raise FeatreconError(f"--weights {weights!r}: not a known name nor an existing file; use {WEIGHTS_HELP}")


def use_compile(choice: str, n_images: int) -> bool:
    """Compile the CPU forward? `--compile auto` does from COMPILE_AUTO_MIN images on."""
    return choice == "yes" or (choice == "auto" and n_images >= COMPILE_AUTO_MIN)


def auto_workers(device_type: str) -> int:
    """Decode processes when --workers is not given. On a CPU the backbone needs the cores: two.
    A GPU leaves the CPU to decoding and compression: all cores but two, at most 32."""
    cores = os.cpu_count() or 1
    return min(2, cores) if device_type == "cpu" else max(2, min(32, cores - 2))
