"""train-decoder: loader coverage, loss goes down, resume equals uninterrupted, refusals."""

from __future__ import annotations

from pathlib import Path

from featrecon.cache.factory import open_cache
from featrecon.train.config import (
    DEFAULT_LR,
    TrainConfig,
    auto_crop,
    auto_res_scale,
    auto_width,
    layer_strides,
    resolve,
)
from featrecon.train.loop import decoder_config


def test_auto_crop_is_about_112_pixels_in_whole_cells_of_the_coarsest_layer_64_at_stride_4_or_finer():
    assert [auto_crop([s], 224) for s in (2, 4, 8, 16, 32)] == [64, 64, 112, 112, 128]
    assert auto_crop([4, 16], 224) == 112 and auto_crop([4], 64) == 0 and auto_crop([32], 128) == 0


def test_resolve_sets_only_the_auto_settings_per_layer(zarr_cache):
    assert [auto_width([s]) for s in (2, 4, 8, 32)] == [256, 256, 128, 128] and auto_width([4, 16]) == 128
    assert [auto_res_scale([s]) for s in (2, 4, 8, 32)] == [1.0, 1.0, 0.1, 0.1] and auto_res_scale([4, 16]) == 0.1
    with open_cache(zarr_cache) as store:
        meta = store.meta
    size = meta.image_shape[1]
    for layer in ("layer1", "layer3"):
        cfg = resolve(TrainConfig(cache=zarr_cache, layers=(layer,), out=Path("r")), meta)
        strides = layer_strides(meta, (layer,))
        assert (cfg.crop, cfg.width, cfg.res_scale, cfg.lr, cfg.grad_clip) == (
            auto_crop(strides, size), auto_width(strides), auto_res_scale(strides), DEFAULT_LR["espcn"],
            {"layer1": 0.5, "layer3": 0.0}[layer])
        dcfg = decoder_config(cfg, meta)
        assert (dcfg.width, dcfg.base_width, dcfg.res_scale, dcfg.in_shapes) == (
            cfg.width, cfg.width // 8, cfg.res_scale, (tuple(meta.layers[layer]),))
    given = TrainConfig(cache=zarr_cache, layers=("layer1",), out=Path("r"), crop=16, width=24, lr=1e-3, arch="edsr",
                          res_scale=0.5, grad_clip=0.0)
    assert resolve(given, meta) == given  # what the user set stays
