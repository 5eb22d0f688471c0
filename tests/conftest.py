"""Shared fixtures: small real images (scikit-image's photos) plus the awkward cases."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featrecon.data import sample_images_root

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "camera.png")
SIZE = 64  # crop size used by the tests: every layer still has a spatial extent (layer4 2x2)


def make_image_folder(root: Path, copies: int = 1) -> Path:
    """Real photos in several modes and formats, `copies` times each under distinct names."""
    src = sample_images_root()
    root.mkdir(parents=True, exist_ok=True)
    for c in range(copies):
        for name in PHOTOS:
            shutil.copy(src / name, root / f"{c:02d}_{name}")
    return root


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


def direct_forward(model, images_uint8: np.ndarray, layers: list[str]) -> dict[str, np.ndarray]:
    """Reference features straight from torchvision's modules, fp32, no featrecon code."""
    import torch

    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (torch.from_numpy(images_uint8).float() / 255 - mean) / std
    out = {}
    with torch.no_grad():
        x = model.relu(model.bn1(model.conv1(x)))
        out["stem"] = x.clone()
        x = model.maxpool(x)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(model, name)(x)
            out[name] = x.clone()
    return {k: out[k].numpy() for k in layers}


def build_cache(out: Path, images: Path, **kw) -> Path:
    from featrecon.extract import ExtractConfig, extract

    base = dict(weights="random:0", size=SIZE, workers=0, batch_size=8, shard_size=4, progress=False, layers="all")
    base.update(kw)
    extract(ExtractConfig(out=out, images=images, **base))
    return out


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
