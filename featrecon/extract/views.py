"""Extra training views of each source image (`extract-features --views K`).

Besides the centre crop (view 0, torchvision's resize-then-centre-crop, the only
view ever scored), each image gets K random-resized crops, half of them mirrored,
each stored as a sample of its own. A view is fixed by its source id and view
index alone (seeded by their hash, not by the order of the run), so a resumed or
re-divided extraction draws the same crops, and the cache records every one:
`view` (index), `view_box` and `view_flip`.

Boxes are (left, top, right, bottom) as fractions of the image's largest centred
square, the region a square crop can come from without padding; the sampling needs
no image size, so the arrays are written when the cache is created. The centre
crop's box is the square's central crop/resize share (0.875 for 224 of 256).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from ..cache.schema import CENTRE, Views, centre_box

# Random-resized-crop ranges, as torchvision's training transform uses them, but with a
# larger smallest area (0.25 rather than 0.08 of the square): a decoder learns from whole
# objects at several scales, not from texture patches.
AREA = (0.25, 1.0)
ASPECT = (3 / 4, 4 / 3)
# Below this many source images, `--views auto` adds views up to about this many samples.
AUTO_TARGET = 400
AUTO_MAX = 16


def auto_views(n_images: int) -> int:
    """K for `--views auto`: none from AUTO_TARGET images up; below, enough views that the
    set reaches about AUTO_TARGET samples, at most AUTO_MAX per image."""
    if n_images >= AUTO_TARGET:
        return 0
    return min(AUTO_MAX, math.ceil(AUTO_TARGET / max(1, n_images)) - 1)


def _rng(image_id: str, view: int) -> np.random.Generator:
    digest = hashlib.sha256(f"view/{image_id}/{view}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def random_box(image_id: str, view: int) -> tuple[tuple[float, float, float, float], bool]:
    """View `view` (>= 1) of `image_id`: a box inside the unit square and a mirror flag."""
    rng = _rng(image_id, view)
    area = rng.uniform(*AREA)
    aspect = math.exp(rng.uniform(math.log(ASPECT[0]), math.log(ASPECT[1])))
    w, h = min(1.0, math.sqrt(area * aspect)), min(1.0, math.sqrt(area / aspect))
    left, top = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
    return (left, top, left + w, top + h), bool(rng.random() < 0.5)


def plan(ids: list[str], k: int, resize: int, crop: int) -> tuple[list[str], Views]:
    """The samples of `ids` with K extra views each: every source's views stay together
    (view 0 first), so one decode serves them all. Returns the per-sample ids and views."""
    per = k + 1
    view = np.tile(np.arange(per, dtype=np.uint16), len(ids))
    box = np.empty((len(ids) * per, 4), np.float32)
    flip = np.zeros(len(ids) * per, np.uint8)
    box[view == CENTRE] = centre_box(resize, crop)
    for s, image_id in enumerate(ids):
        for v in range(1, per):
            b, f = random_box(image_id, v)
            box[s * per + v], flip[s * per + v] = b, f
    return [i for i in ids for _ in range(per)], Views(view, box, flip)


def crop_view(im, box, flip: bool, size: int):
    """The (size, size) RGB PIL image of `box` of the PIL image `im`: an antialiased
    bilinear resample over the exact (fractional) box, then the mirror."""
    from PIL import Image, ImageOps

    w, h = im.size
    side = min(w, h)
    ox, oy = (w - side) / 2, (h - side) / 2
    left, top, right, bottom = (float(c) for c in box)
    px = (ox + left * side, oy + top * side, ox + right * side, oy + bottom * side)
    out = im.resize((size, size), Image.Resampling.BILINEAR, box=px)
    return ImageOps.mirror(out) if flip else out
