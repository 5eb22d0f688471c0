"""Shared fixtures: small real images (scikit-image's photos) plus the awkward cases."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from featrecon.extract.images import sample_images_root
from tests.helpers import build_cache, make_image_folder


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="session")
def awkward_dir(tmp_path_factory) -> Path:
    """Good-but-odd images and bad files, with the expected outcome in the name."""
    root = tmp_path_factory.mktemp("awkward")
    src = sample_images_root()
    rgb = Image.open(src / "chelsea.png").convert("RGB")
    sub = root / "sub dir"
    sub.mkdir()
    rgb.convert("L").save(sub / "ok_gray.JPG")
    rgb.convert("CMYK").save(root / "ok_cmyk.jpeg")
    rgb.convert("P").save(root / "ok_palette.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "ok_alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 on display
    rgb.save(root / "ok_exif_rotated.jpg", exif=exif)
    rgb.save(root / "ok_it's_quoted.webp")
    full = root / "bad_truncated.jpg"
    rgb.save(full, quality=90)
    full.write_bytes(full.read_bytes()[: 2000])
    (root / "bad_empty.png").write_bytes(b"")
    (root / "bad_text.jpg").write_text("this is not an image\n")
    (root / "notes.txt").write_text("ignored: not an image extension\n")
    return root






@pytest.fixture(scope="session")
def photos24(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("photos24"), copies=4)


@pytest.fixture(scope="session", params=[".zarr", ".h5"])
def small_cache(request, tmp_path_factory, photos24) -> Path:
    """24 real photos at 64 px, all layers, shards of 4, in both formats."""
    return build_cache(tmp_path_factory.mktemp("cache") / f"c{request.param}", photos24, holdout_fraction=0.25)


@pytest.fixture(scope="session")
def zarr_cache(tmp_path_factory, photos24) -> Path:
    return build_cache(tmp_path_factory.mktemp("zcache") / "c.zarr", photos24, holdout_fraction=0.25)
