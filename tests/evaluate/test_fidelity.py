"""Top-1 and feature fidelity of reconstructions, against a direct torchvision forward."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from featrecon.cache import schema as S
from featrecon.cache.factory import open_cache
from featrecon.evaluate.fidelity import Judge
from featrecon.extract.backbone import load_backbone
from tests.helpers import PHOTOS, build_cache, sample_images_root

WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331")  # classes 0-5


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    src = tmp_path_factory.mktemp("labelled")
    for wnid, name in zip(WNIDS, PHOTOS):
        shutil.copy(sample_images_root() / name, src / f"{wnid}_{name}")
    return build_cache(tmp_path_factory.mktemp("fid") / "c.zarr", src, layers="layer2,layer3,layer4")


def direct_logits(images: torch.Tensor) -> np.ndarray:
    """torchvision's ResNet-50 (random:0) on [0, 1] images, normalised here: no featrecon code."""
    model, _ = load_backbone("resnet50", "random:0")
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model((images - mean) / std).numpy()


def test_top1_and_features_of_reconstructions_against_torchvision(labelled):
    with open_cache(labelled) as store:
        meta, idx = store.meta, np.arange(store.meta.n)
        images = torch.from_numpy(store.read_rows(S.IMAGES, idx)).float() / 255
        cached = {l: torch.from_numpy(store.read_rows(S.feature_path(l), idx)) for l in meta.layers}
        labels = store.read_all(S.LABELS)
    assert labels.tolist() == list(range(6))
    judge = Judge(meta)
    assert judge.available and judge.layers_for(["layer3"]) == ["layer3", "layer4"]
    g = torch.Generator().manual_seed(0)
    pred = (images * 0.6 + 0.4 * torch.rand(images.shape, generator=g)).clamp(0, 1)  # a poor reconstruction
    got = judge.judge(pred, images, idx, labels, {l: cached[l] for l in ("layer3", "layer4")})
    want_pred, want_orig = direct_logits(pred).argmax(1), direct_logits(images).argmax(1)
    np.testing.assert_array_equal(got["top1_correct"], (want_pred == labels).astype(float))
    np.testing.assert_array_equal(got["top1_agreement"], (want_pred == want_orig).astype(float))
    # The originals themselves: the cached features back, up to float16 storage.
    same = judge.judge(images, images, idx, labels, {l: cached[l] for l in meta.layers})
    for l in meta.layers:
        assert (same[f"rel_l2/{l}"] < 2e-3).all() and (same[f"cosine/{l}"] > 1 - 1e-5).all(), l
        if f"rel_l2/{l}" in got:
            assert (got[f"rel_l2/{l}"] > 10 * same[f"rel_l2/{l}"]).all()
    assert (same["top1_agreement"] == 1).all()
    unknown = judge.judge(images, images, idx, np.full(6, -1), {})
    assert np.isnan(unknown["top1_correct"]).all()


def test_a_backbone_that_cannot_be_rebuilt_is_left_out_with_the_reason(tmp_path, photo_dir):
    model, _ = load_backbone("resnet50", "random:4")
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    cache = build_cache(tmp_path / "c.zarr", photo_dir, layers="layer3", weights=str(weights))
    weights.unlink()
    with open_cache(cache) as store:
        judge = Judge(store.meta)
    assert not judge.available and "cannot be rebuilt" in judge.why and "w.pt" in judge.why
    other, _ = load_backbone("resnet50", "random:5")
    torch.save(other.state_dict(), weights)  # another network at the same path
    with open_cache(cache) as store:
        assert "fingerprint differs" in Judge(store.meta).why
