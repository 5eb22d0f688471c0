"""Source images: discovery, labels and decoding.

Ids are paths relative to the source root with posix separators, sorted, so the
same folder always gives the same ids in the same order. Images are decoded to
uint8 (3, H, W) exactly as torchvision's classification transforms do (resize
the shorter side, antialiased bilinear, then centre crop); the float
normalisation happens on the device, in `backbone.FeatureExtractor`.
"""

from __future__ import annotations

import csv
import errno
import re
import warnings
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ..cache.schema import CENTRE, Preprocessing, Views
from ..errors import FeatreconError
from .views import crop_view

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
# Real photos that ship inside scikit-image: the default image set when no
# --images is given, so a new user sees the whole pipeline run in minutes.
SAMPLE_IMAGES = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png", "coins.png",
    "color.png", "grass.png", "gravel.png", "horse.png", "hubble_deep_field.jpg", "ihc.png", "logo.png",
    "microaneurysms.png", "moon.png", "motorcycle_left.png", "motorcycle_right.png", "page.png",
    "retina.jpg", "rocket.jpg", "text.png",
)
_WNID = re.compile(r"^(n\d{8})")
_ILSVRC_VAL = re.compile(r"ILSVRC2012_val_(\d{8})", re.IGNORECASE)


def sample_images_root() -> Path:
    """scikit-image's bundled data folder."""
    import skimage.data

    return Path(skimage.data.__file__).parent


def discover_images(root: Path, limit: int | None = None, only: tuple[str, ...] | None = None) -> list[str]:
    """Image files under `root` (recursive, any case of the extension), as sorted relative ids."""
    if not root.exists():
        raise FeatreconError(f"--images {root}: folder does not exist")
    if not root.is_dir():
        raise FeatreconError(f"--images {root}: not a folder; point it at a folder of images")
    # A link that leads nowhere (broken, or a loop) is kept: it is recorded as skipped with its
    # reason, rather than silently left out.
    ids = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and (p.is_file() or (p.is_symlink() and not p.exists()))
        and (only is None or p.name in only)
    )
    if limit is not None:
        ids = ids[:limit]
    if not ids:
        raise FeatreconError(
            f"--images {root}: no images found (looked recursively for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return ids


# ----------------------------------------------------------------------------- labels


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet wnids, sorted: position = torchvision class index."""
    text = resources.files("featrecon.extract").joinpath("imagenet_wnids.txt").read_text()
    return text.split()


def _read_devkit_labels(gt_path: Path, mapping_path: Path) -> list[int]:
    """ILSVRC2012 validation ground truth (devkit ids, line i = image i) -> torchvision indices."""
    if not mapping_path.is_file():
        raise FeatreconError(
            f"--class-map {mapping_path}: not found; the devkit ground truth needs the '<wnid> <devkit_id> <name>' "
            "mapping (imagenet_class_mapping.txt) to become torchvision class indices")
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    devkit_to_index = {}
    for line in mapping_path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in index:
            devkit_to_index[int(parts[1])] = index[parts[0]]
    out = []
    for n, line in enumerate(gt_path.read_text().splitlines(), 1):
        try:
            out.append(devkit_to_index[int(line.strip())])
        except (ValueError, KeyError):
            raise FeatreconError(f"--labels {gt_path}: line {n} ({line.strip()!r}) is not a devkit id in "
                                 f"{mapping_path}") from None
    return out


def _read_csv_labels(path: Path) -> dict[str, int]:
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    out = {}
    with path.open(newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or (n == 1 and row[0].strip().lower() == "path"):
                continue
            if len(row) < 2:
                raise FeatreconError(f"--labels {path}: line {n} needs 'path,label'")
            key, label = row[0].strip(), row[1].strip()
            if label in index:
                out[key] = index[label]
            else:
                try:
                    out[key] = int(label)
                except ValueError:
                    raise FeatreconError(f"--labels {path}: line {n}: label {label!r} is neither an integer "
                                         "nor a wnid") from None
    return out


def _is_devkit_ground_truth(path: Path) -> bool:
    head = path.read_text().split(maxsplit=5)[:5]
    return path.suffix.lower() != ".csv" and bool(head) and all(h.isdigit() for h in head)


def labels_for(ids: list[str], labels_path: Path | None = None, class_map: Path | None = None) -> tuple[np.ndarray, str]:
    """(N,) int32 torchvision class indices (-1 unknown) and a name for where they came from.

    With `labels_path`: a CSV of path,label (label an index or a wnid, path the id or
    the file name), or the ILSVRC2012 validation ground truth (devkit ids) joined via
    `class_map` (default: imagenet_class_mapping.txt beside it). Without: a wnid
    folder (ImageFolder layout) or a wnid at the start of the file name."""
    labels = np.full(len(ids), -1, dtype=np.int32)
    if labels_path is not None:
        if not labels_path.is_file():
            raise FeatreconError(f"--labels {labels_path}: file not found")
        if _is_devkit_ground_truth(labels_path):
            gt = _read_devkit_labels(labels_path, class_map or labels_path.parent / "imagenet_class_mapping.txt")
            for i, image_id in enumerate(ids):
                m = _ILSVRC_VAL.search(Path(image_id).name)
                if m and 1 <= int(m.group(1)) <= len(gt):
                    labels[i] = gt[int(m.group(1)) - 1]
            return labels, "ilsvrc2012-devkit"
        table = _read_csv_labels(labels_path)
        for i, image_id in enumerate(ids):
            labels[i] = table.get(image_id, table.get(Path(image_id).name, -1))
        return labels, "csv"
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    sources = set()
    for i, image_id in enumerate(ids):
        parts = Path(image_id).parts
        if len(parts) > 1 and parts[-2] in index:
            labels[i] = index[parts[-2]]
            sources.add("wnid-folder")
        elif (m := _WNID.match(parts[-1])) and m.group(1) in index:
            labels[i] = index[m.group(1)]
            sources.add("wnid-filename")
    return labels, "+".join(sorted(sources)) or "none"


# ----------------------------------------------------------------------------- decoding


class ImageError(Exception):
    """A source file that cannot be turned into an image (the message is the reason recorded)."""


def open_image(path: Path):
    """Decode, apply EXIF orientation, make 8-bit RGB: a PIL image."""
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette transparency, EXIF oddities
            with Image.open(path) as im:
                im.load()
                return to_rgb8(ImageOps.exif_transpose(im))
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("file not found (or a broken link)") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageError("a symbolic link loop") from None
        raise ImageError(f"{type(e).__name__}: {e}") from None
    except Exception as e:  # UnidentifiedImageError, truncated data, decompression bomb, ...
        raise ImageError(f"{type(e).__name__}: {e}") from None


# PIL's high-bit-depth single-channel modes. `convert("RGB")` clips them at 255 (a 16-bit
# ramp turns white) instead of scaling, so they are scaled to 8 bits here.
_16_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb8(im):
    """An 8-bit RGB PIL image of `im`: grayscale, CMYK, palette and alpha by PIL's conversion;
    16-bit (I;16*, and I holding 0..65535) scaled by 255/65535 and rounded; float (F) in [0, 1]
    scaled by 255. Integer or float images outside those ranges have no known white level and
    are refused (ImageError)."""
    from PIL import Image

    if im.mode not in (*_16_BIT, "I", "F"):
        return im.convert("RGB")
    a = np.asarray(im)
    if im.mode == "F":
        if not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
            raise ImageError(f"32-bit float image with values in [{a.min():.3g}, {a.max():.3g}]: no known white "
                             "level; save it as 8 or 16 bits per channel")
        grey = np.rint(a.astype(np.float64) * 255)
    else:
        a = a.astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ImageError(f"32-bit integer image with values in [{a.min()}, {a.max()}]: no known white level; "
                             "save it as 8 or 16 bits per channel")
        grey = (a * 255 + 32767) // 65535  # round(v * 255 / 65535), exactly, in integers
    return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")


def centre_crop(im, pre: Preprocessing) -> np.ndarray:
    """torchvision's evaluation transform of a PIL image: resize the shorter side, centre crop."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    im = TF.resize(im, pre.resize, interpolation=InterpolationMode(pre.interpolation), antialias=True)
    im = TF.center_crop(im, [pre.crop, pre.crop])
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()


def load_image(path: Path, pre: Preprocessing) -> np.ndarray:
    """Decode, apply EXIF orientation, make RGB, resize + centre crop: (3, crop, crop) uint8."""
    return centre_crop(open_image(path), pre)


class ImageDataset(torch.utils.data.Dataset):
    """Index -> (index, (3, H, W) uint8 tensor, reason). A bad file gives zeros and its reason.

    `ids` are per sample; with `views` (see `views.plan`) a sample is view v of its id:
    the centre crop for view 0, else its random-resized box. A source's views are
    neighbours, and the last decoded image is kept, so each file is decoded once per batch."""

    def __init__(self, root: Path, ids: list[str], indices: list[int], pre: Preprocessing, views=None):
        self.root, self.ids, self.indices, self.pre, self.views = root, ids, indices, pre, views
        self._last: tuple[str, object] | None = None  # (id, decoded image or ImageError)

    def __len__(self) -> int:
        return len(self.indices)

    def _open(self, image_id: str):
        if self._last is None or self._last[0] != image_id:
            try:
                self._last = (image_id, open_image(self.root / image_id))
            except ImageError as e:
                self._last = (image_id, e)
        if isinstance(self._last[1], ImageError):
            raise self._last[1]
        return self._last[1]

    def _sample(self, i: int) -> np.ndarray:
        im = self._open(self.ids[i])
        if self.views is None or self.views.view[i] == CENTRE:
            return centre_crop(im, self.pre)
        out = crop_view(im, self.views.box[i], bool(self.views.flip[i]), self.pre.crop)
        return np.asarray(out, dtype=np.uint8).transpose(2, 0, 1).copy()

    def __getitem__(self, k: int):
        i = self.indices[k]
        try:
            return i, torch.from_numpy(self._sample(i)), ""
        except ImageError as e:
            return i, torch.zeros(3, self.pre.crop, self.pre.crop, dtype=torch.uint8), str(e) or "unreadable"


def collate_images(batch):
    """-> (B,) int64 indices, (B, 3, H, W) uint8, list of B reasons ('' = good)."""
    idx, imgs, reasons = zip(*batch)
    return torch.tensor(idx, dtype=torch.int64), torch.stack(imgs), list(reasons)


def image_loader(root: Path, ids: list[str], indices: list[int], pre, batch_size: int, workers: int,
                 device: torch.device, views: Views | None = None) -> torch.utils.data.DataLoader:
    """Batches (indices, uint8 images, skip reasons) of `ids[indices]` (per-sample ids, with
    their `views`), in order, decoded by `workers` processes (pinned for a GPU)."""
    return torch.utils.data.DataLoader(
        ImageDataset(root, ids, indices, pre, views), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=collate_images, pin_memory=device.type == "cuda", worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is PIL work; leave the cores to the forward
