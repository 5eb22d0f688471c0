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


@pytest.mark.slow
def test_two_backbones_side_by_side_in_one_report(photos24, tmp_path):
    from featrecon.cli import score_main

    runs = tmp_path / "runs"
    for name in ("resnet18", "convnext_tiny"):
        cache = tmp_path / f"{name}.zarr"
        extract(ExtractConfig(out=cache, images=photos24, model=name, weights="random:0", size=SIZE, workers=0,
                              batch_size=8, shard_size=8, views=0, progress=False, holdout_fraction=0.25))
        with open_cache(cache) as store:
            layers = list(store.meta.layers)
        for layer in (layers[1], layers[-1]):
            fit(TrainConfig(cache=cache, layers=(layer,), out=runs / f"{name}-{layer}", epochs=1, batch_size=4,
                            width=16, progress=False, eval_samples=2))
    assert score_main(["--cache", str(tmp_path / "resnet18.zarr"), "--cache", str(tmp_path / "convnext_tiny.zarr"),
                       "--runs", str(runs), "--out", str(tmp_path / "rep"), "--lpips", "none", "--no-progress"]) == 0
    import json

    rep = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert [c["model"] for c in rep["caches"]] == ["resnet18", "convnext_tiny"]
    assert [(r["model"], r["layers"]) for r in rep["runs"]] == [("resnet18", "layer1"), ("resnet18", "layer4"),
                                                                ("convnext_tiny", "stage1"), ("convnext_tiny", "stage4")]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| model | run |" in md and md.count("mean train image") >= 2
    for name in ("grid.png", "metrics_by_layer.png"):
        assert (tmp_path / "rep" / name).is_file()


def test_a_schema_3_cache_of_a_resnet50_still_reads_and_resumes(tmp_path, photo_dir):
    import json as js

    from tests.helpers import build_cache

    cache = build_cache(tmp_path / "c.zarr", photo_dir, layers="layer1")
    whole = {n: open_cache(cache).read_all(n) for n in (S.IMAGES, S.feature_path("layer1"))}
    root = cache / "zarr.json"
    doc = js.loads(root.read_text())
    meta = doc["attributes"][S.META_ATTR]
    for key in ("strides", "layouts", "backbone"):
        meta.pop(key)  # as featrecon 0.2 wrote it
    meta["schema_version"] = 3
    root.write_text(js.dumps(doc))
    with open_cache(cache, "r+") as store:
        assert store.meta.backbone == "resnet50" and store.meta.stride("layer1") == 4
        store.mark_pending(0, 4)
    build_cache(cache, photo_dir, layers="layer1")  # resumed, not refused for the schema version
    with open_cache(cache) as store:
        assert store.meta.schema_version == 3 and (store.status() == S.STATUS_DONE).all()
        for name, values in whole.items():
            np.testing.assert_array_equal(store.read_all(name), values)
