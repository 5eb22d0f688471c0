"""Any torchvision classifier as the backbone: for one model of each family, on tiny images with
random weights, the cached features equal torchvision's own feature extractor on the untouched
model, and a decoder trains and scores from the cache alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

from featrecon.cache import schema as S
from featrecon.cache.factory import open_cache
from featrecon.errors import FeatreconError
from featrecon.evaluate.config import ScoreConfig
from featrecon.evaluate.scoring import score
from featrecon.extract.backbone import load_backbone, standard_layers
from featrecon.extract.config import ExtractConfig
from featrecon.extract.run import extract
from featrecon.train.config import TrainConfig
from featrecon.train.loop import fit
from tests.helpers import SIZE

FAMILIES = ["resnet18", "convnext_tiny", "efficientnet_b0", "vit_b_16", "swin_t"]


def reference(name: str, images: np.ndarray, nodes: dict[str, str]) -> dict[str, np.ndarray]:
    """torchvision alone: the model built with the same seed, its own feature extractor, the
    normalisation written out here, and the layouts turned into (C, H, W) grids here."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        kwargs = {"image_size": SIZE} if name.startswith("vit") else {}
        model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    fx = create_feature_extractor(model, return_nodes={node: layer for layer, node in nodes.items()})
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = fx((torch.from_numpy(images).float() / 255 - mean) / std)
    grids = {}
    for layer, v in out.items():
        if name.startswith("swin"):
            v = v.permute(0, 3, 1, 2)
        elif name.startswith("vit"):
            side = int((v.shape[1] - 1) ** 0.5)
            v = v[:, 1:].reshape(len(v), side, side, -1).permute(0, 3, 1, 2)
        grids[layer] = v.numpy()
    return grids


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_caches_torchvisions_features_and_trains_a_decoder(name, photo_dir, tmp_path):
    out = tmp_path / "c.zarr"
    # float32: a random EfficientNet's deep stages hold values near 1e-7, below float16's normal range
    extract(ExtractConfig(out=out, images=photo_dir, model=name, weights="random:0", size=SIZE, workers=0,
                          batch_size=3, shard_size=4, views=0, progress=False, dtype="float32"))
    with open_cache(out) as store:
        meta = store.meta
        images = store.read_all(S.IMAGES)
        cached = {l: store.read_all(S.feature_path(l)).astype(np.float32) for l in meta.layers}
    model, _ = load_backbone(name, "random:0", SIZE)
    assert meta.backbone == name and meta.nodes == standard_layers(name, model) and meta.schema_version == 4
    assert all(meta.strides[l] == SIZE // meta.layers[l][1] for l in meta.layers)
    if name.startswith(("vit", "swin")):
        assert meta.layouts and all(l in meta.layers for l in meta.layouts)
    want = reference(name, images, meta.nodes)
    for layer in meta.layers:
        scale = float(np.abs(want[layer]).max())
        np.testing.assert_allclose(cached[layer], want[layer], atol=1e-4 * scale, rtol=0, err_msg=f"{name} {layer}")
    deepest = list(meta.layers)[-1]
    run = tmp_path / "runs" / deepest
    fit(TrainConfig(cache=out, layers=(deepest,), out=run, epochs=1, batch_size=2, width=16, progress=False,
                    eval_samples=2))
    rep = score(ScoreConfig(cache=out, runs=tmp_path / "runs", out=tmp_path / "rep", split="all", progress=False,
                            lpips="none"))
    row = rep["runs"][0]
    assert np.isfinite(row["psnr"]["mean"]) and f"cosine/{deepest}" in row and "top1_agreement" in row


def test_unknown_models_weights_and_sizes_are_one_line(photo_dir, tmp_path):
    cfg = dict(out=tmp_path / "c.zarr", images=photo_dir, weights="random:0", size=SIZE, progress=False)
    with pytest.raises(FeatreconError, match="--model 'resnet9000': not a supported torchvision classifier"):
        extract(ExtractConfig(model="resnet9000", **cfg))
    with pytest.raises(FeatreconError, match="'IMAGENET1K_V9'.*convnext_tiny has IMAGENET1K_V1"):
        extract(ExtractConfig(model="convnext_tiny", **{**cfg, "weights": "IMAGENET1K_V9"}))
    with pytest.raises(FeatreconError, match="--size 72: vit_b_16 takes whole 16-pixel patches"):
        extract(ExtractConfig(model="vit_b_16", **{**cfg, "size": 72}))
    with pytest.raises(FeatreconError, match="unknown layer 'layer3'.*stem, stage1"):
        extract(ExtractConfig(model="convnext_tiny", layers="layer3", **cfg))
