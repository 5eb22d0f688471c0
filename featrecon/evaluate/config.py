"""score's settings: one definition for the command and the Python API (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..cache.remote import is_url
from ..errors import FeatreconError
from ..settings import LOCATION, PATH, setting

SPLITS = ("holdout", "train", "all")
WHICH = ("best", "last")
LPIPS_NETS = ("alex", "vgg", "none")


@dataclass(frozen=True)
class ScoreConfig:
    cache: tuple[Path | str, ...] = setting(flag="--cache", parse=LOCATION, repeat=True,
                                            factory=lambda: (Path("cache.zarr"),),
                                            help="the cache to score on (need not be the one trained on): a folder, .h5 "
                                            "file or Zarr URL; several (one per backbone, say) put their runs side by "
                                            "side in one report, each run scored on the cache whose features it decodes")
    runs: Path = setting(Path("runs"), parse=PATH, help="folder searched for run checkpoints (*/last.pt)")
    checkpoints: tuple[Path, ...] = setting(flag="--checkpoint", parse=PATH, repeat=True, factory=tuple,
                                            help="score these checkpoint files instead of searching --runs")
    which: str = setting("best", choices=WHICH, help="checkpoint of each run folder")
    split: str = setting("holdout", choices=SPLITS, help="the split to score")
    out: Path = setting(Path("report"), parse=PATH, help="report folder: nothing is written outside it")
    images: Path | str | None = setting(None, parse=LOCATION, help="source folder or URL prefix of the originals "
                                        "(default: the one recorded in the cache)")
    save: int = setting(8, parse=int, help="images saved as original_X.png / reconstruction_X.png per run")
    batch_size: int = setting(16, parse=int, help="images per reconstruction batch")
    device: str = setting("auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    lpips: str = setting("alex", choices=LPIPS_NETS, help="LPIPS trunk: alex (what papers report), vgg, or none")
    lpips_weights: Path | None = setting(None, parse=PATH, help="a torchvision state dict of the LPIPS trunk (default: "
                                         "its ImageNet weights from torchvision's cache, downloaded once)")
    backbone_metrics: bool = setting(True, negate="--no-backbone-metrics", help="leave out the top-1 of the "
                                     "reconstructions and their feature fidelity (both run the cache's backbone)")
    skip_corrupt: bool = setting(False, help="leave out samples whose stored chunks fail their checksum or are "
                                 "missing (counted in the report) instead of stopping")
    progress: bool = setting(True, negate="--no-progress", help="no progress bar")

    def __post_init__(self):
        if isinstance(self.cache, (str, Path)):  # one cache, as the Python API is usually given it
            object.__setattr__(self, "cache", (self.cache,))
        object.__setattr__(self, "cache", tuple(self.cache))

    def validate(self) -> None:
        """One clear error for the first bad setting, before any checkpoint or cache is read."""
        if not self.cache:
            raise FeatreconError("--cache: give at least one cache to score on")
        for flag, value, choices in (("--split", self.split, SPLITS), ("--which", self.which, WHICH),
                                     ("--lpips", self.lpips, LPIPS_NETS)):
            if value not in choices:
                raise FeatreconError(f"{flag} {value!r}: choose one of {', '.join(choices)}")
        if self.save < 0:
            raise FeatreconError(f"--save {self.save}: must be 0 or more")
        if self.batch_size < 1:
            raise FeatreconError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.lpips_weights is not None and not Path(self.lpips_weights).is_file():
            raise FeatreconError(f"--lpips-weights {self.lpips_weights}: file not found")
        if self.images is not None and not is_url(self.images) and not Path(self.images).is_dir():
            raise FeatreconError(f"--images {self.images}: folder not found; point it at the originals' folder")
