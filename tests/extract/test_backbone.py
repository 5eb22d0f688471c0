"""extract-features: features equal a direct torchvision forward, resume after a real
kill, bad input handled, settings never mixed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from featrecon.cache import schema as S
from featrecon.cache.factory import open_cache
from featrecon.errors import FeatreconError
from featrecon.extract.backbone import FeatureExtractor, load_backbone, preprocessing_for, resolve_layers
from featrecon.extract.config import ExtractConfig
from featrecon.extract.run import extract
from tests.helpers import SIZE, direct_forward


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_features_equal_direct_torchvision_forward(tmp_path, photo_dir, suffix):
    out = tmp_path / f"cache{suffix}"
    result = extract(cfg(out, photo_dir, layers="all"))
    assert result.done == len(list(photo_dir.iterdir())) and not result.skipped
    model, _ = load_backbone("resnet50", "random:0")
    with open_cache(out) as store:
        images = store.read(S.IMAGES, 0, store.meta.n)
        ids = store.ids()
        # The cached images are torchvision's own resize + centre crop of the files.
        ref_tf = T.Compose([T.Resize(round(SIZE * 256 / 224)), T.CenterCrop(SIZE), T.PILToTensor()])
        for i, image_id in enumerate(ids):
            expected = ref_tf(Image.open(photo_dir / image_id).convert("RGB")).numpy()
            np.testing.assert_array_equal(images[i], expected, err_msg=image_id)
        ref = direct_forward(model, images, list(S_LAYERS))
        for layer in S_LAYERS:
            got = store.read(S.feature_path(layer), 0, store.meta.n)
            assert got.dtype == np.float16
            assert list(got.shape[1:]) == store.meta.layers[layer]
            scale = np.abs(ref[layer]).max()
            np.testing.assert_allclose(got.astype(np.float32), ref[layer], rtol=1e-2, atol=2e-3 * scale, err_msg=layer)


S_LAYERS = ("stem", "layer1", "layer2", "layer3", "layer4")


def test_shapes_follow_the_strides_and_forward_stops_at_deepest(tmp_path, photo_dir):
    out = tmp_path / "c.zarr"
    extract(cfg(out, photo_dir, layers="layer2,stem", size=96, limit=2))
    with open_cache(out) as store:
        assert list(store.meta.layers) == ["stem", "layer2"]  # shallow to deep, whatever the order asked
        assert store.meta.layers == {"stem": [64, 48, 48], "layer2": [512, 12, 12]}
        assert store.meta.nodes == {"stem": "relu", "layer2": "layer2"}
        assert store.read(S.IMAGES, 0, 2).shape == (2, 3, 96, 96)

    model, _ = load_backbone("resnet50", "random:0")
    fx = FeatureExtractor(model, resolve_layers("layer2", model), preprocessing_for("random:0"))
    assert not hasattr(fx.body, "layer3") and not hasattr(fx.body, "fc")


def normalised(images):
    """uint8 images as the network sees them, written out here (torchvision's ImageNet statistics)."""
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def test_graph_rewrites_never_change_a_captured_value():
    """For speed, BatchNorms are folded into convolutions and ReLUs stay in place, except where
    that would change a returned tensor: a captured convolution keeps its BatchNorm after it,
    and a ReLU that would overwrite a captured tensor works on a copy."""
    import copy

    model, _ = load_backbone("resnet50", "random:0")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nodes = ["layer1.0.conv1", "layer1.0.bn1", "layer1.0.add", "layer1.0.relu", "layer1.0.relu_2", "layer1.1.bn3", "layer2"]
    fx = FeatureExtractor(model, resolve_layers(",".join(nodes), model), preprocessing_for("random:0"), channels_last=False)
    inplace = [n for n in fx.body.graph.nodes
               if n.op == "call_module" and getattr(fx.body.get_submodule(n.target), "inplace", False)]
    assert len(inplace) > 10  # most ReLUs are still in place
    assert fx.folded == 24 - 1  # the 24 BatchNorms up to layer2, but the captured conv's
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model is untouched
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    got = fx(images)
    # Reference: forward hooks on an out-of-place copy of the model, tensors cloned.
    ref, want = copy.deepcopy(model), {}
    for m in ref.modules():
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False
    relu_calls = []

    def keep(name):  # a hook that returns None, so the module's own output goes on
        return lambda m, i, o: want.__setitem__(name, o.clone())

    ref.layer1[0].conv1.register_forward_hook(keep("layer1.0.conv1"))
    ref.layer1[0].bn1.register_forward_hook(keep("layer1.0.bn1"))
    ref.layer1[0].relu.register_forward_hook(lambda m, i, o: relu_calls.append((i[0].clone(), o.clone())))
    ref.layer1[1].bn3.register_forward_hook(keep("layer1.1.bn3"))  # eager then adds the identity in place
    ref.layer2.register_forward_hook(keep("layer2"))
    x = normalised(images)
    with torch.no_grad():
        ref(x)
    want["layer1.0.relu"], want["layer1.0.add"] = relu_calls[0][1], relu_calls[2][0]
    want["layer1.0.relu_2"] = relu_calls[2][1]
    assert (want["layer1.0.bn1"] < 0).any() and (want["layer1.0.add"] < 0).any()
    for name in nodes:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4, msg=name)


def test_any_node_name_and_unknown_layer_lists_choices(tmp_path, photo_dir):
    out = tmp_path / "c.zarr"
    extract(cfg(out, photo_dir, layers="layer1.0.bn1", limit=2))
    with open_cache(out) as store:
        got = store.read(S.feature_path("layer1.0.bn1"), 0, 2).astype(np.float32)
    model, _ = load_backbone("resnet50", "random:0")
    with open_cache(out) as store:
        x = store.read(S.IMAGES, 0, 2)
    t = normalised(torch.from_numpy(x))
    with torch.no_grad():
        y = model.layer1[0].bn1(model.layer1[0].conv1(model.maxpool(model.relu(model.bn1(model.conv1(t))))))
    # Before its ReLU: negative values must survive (the in-place ReLU trap).
    assert (got < 0).any()
    np.testing.assert_allclose(got, y.numpy(), rtol=1e-2, atol=2e-3 * float(y.abs().max()))
    with pytest.raises(FeatreconError, match="unknown layer 'layer9'.*stem, layer1"):
        extract(cfg(tmp_path / "d.zarr", photo_dir, layers="layer9"))


def test_download_failure_names_the_alternatives(monkeypatch):
    import urllib.error

    import torchvision.models._api as api

    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(FeatreconError, match="could not download.*--weights PATH.*--weights random"):
        load_backbone("resnet50", "IMAGENET1K_V2")
    model, name = load_backbone("resnet50", "auto")  # falls back, and says what it used
    assert name == "random:0"


def cfg(out: Path, images: Path, **kw) -> ExtractConfig:
    base = dict(weights="random:0", size=SIZE, workers=0, batch_size=4, shard_size=4, progress=False, views=0)
    base.update(kw)
    return ExtractConfig(out=out, images=images, **base)
