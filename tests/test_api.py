"""The Python API: caches and decoders as numpy, in the order asked for, refusing mismatches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import featrecon
from featrecon.cache import schema as S
from featrecon.cache.factory import open_cache
from featrecon.errors import FeatreconError
from tests.helpers import build_cache, make_image_folder


def test_cache_reads_samples_in_the_order_asked(small_cache):
    with open_cache(small_cache) as store:
        feats, images = store.read_all(S.feature_path("layer2")), store.read_all(S.IMAGES)
        ids, labels, split = store.ids(), store.read_all(S.LABELS), store.read_all(S.SPLIT)
    with featrecon.open_cache(small_cache) as cache:
        order = [7, 1, 7, 22, 0]
        np.testing.assert_array_equal(cache.features("layer2", order), feats[order])
        np.testing.assert_array_equal(cache.features("layer2", 5), feats[5])
        np.testing.assert_array_equal(cache.images(slice(3, 9, 2)), images[3:9:2])
        assert cache.ids == ids and (cache.labels == labels).all() and cache.layers == list(cache.meta.layers)
        assert cache.indices("holdout").tolist() == np.flatnonzero(split == 1).tolist()
        assert set(cache.split) <= {"train", "holdout"}
        with pytest.raises(FeatreconError, match="layer 'layer9' is not in"):
            cache.features("layer9", 0)
        with pytest.raises(FeatreconError, match="sample indices must be in 0..23"):
            cache.images([24])


def test_load_decoder_refuses_other_features_and_reconstructs_in_unit_range(zarr_cache, tmp_path):
    run = tmp_path / "runs" / "layer3"
    featrecon.train_decoder(cache=zarr_cache, layer="layer3", out=run, epochs=1, width=16, progress=False, eval_samples=4)
    cache = featrecon.open_cache(zarr_cache)
    decoder = featrecon.load_decoder(run, cache=cache)
    assert not decoder.training and decoder.checkpoint["layers"] == ["layer3"]
    idx = cache.indices("holdout")
    out = featrecon.reconstruct(decoder, cache, idx, batch_size=2)
    assert out.shape == (len(idx), 3, 64, 64) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    with torch.no_grad():
        direct = decoder([torch.from_numpy(cache.features("layer3", idx)).float()]).numpy()
    np.testing.assert_allclose(out, direct, atol=1e-5)  # batch 2 vs all at once: convolution rounding
    other = build_cache(tmp_path / "other.zarr", make_image_folder(tmp_path / "p"), weights="random:1", layers="layer3")
    with pytest.raises(FeatreconError, match="trained on other features"):
        featrecon.load_decoder(run, cache=other)
    with pytest.raises(FeatreconError, match="no checkpoint here"):
        featrecon.load_decoder(tmp_path / "nothing")
