"""Decoder shapes for every layer and for a fused pair."""

import pytest
import torch

from featrecon.train.decoders import Decoder, DecoderConfig, count_parameters

SHAPES_224 = {"stem": (64, 112, 112), "layer1": (256, 56, 56), "layer2": (512, 28, 28),
              "layer3": (1024, 14, 14), "layer4": (2048, 7, 7)}


@pytest.mark.parametrize("arch", ["espcn", "edsr", "upconv"])
@pytest.mark.parametrize("layer", list(SHAPES_224))
def test_every_layer_decodes_to_an_image_in_unit_range(layer, arch):
    cfg = DecoderConfig((layer,), (SHAPES_224[layer],), (224, 224), width=32, base_width=4, arch=arch)
    model = Decoder(cfg).eval()  # in use: clamped to [0, 1] (in training the linear heads are not)
    stride = 224 // SHAPES_224[layer][1]
    assert cfg.n_stages == stride.bit_length() - 1  # one x2 stage per factor of two of the stride
    with torch.no_grad():
        y = model([torch.randn(2, *SHAPES_224[layer])])
    assert y.shape == (2, 3, 224, 224)
    assert float(y.min()) >= 0 and float(y.max()) <= 1


@pytest.mark.parametrize("arch", ["espcn", "edsr", "upconv"])
def test_fused_pair_and_odd_sizes(arch):
    cfg = DecoderConfig(("layer2", "layer3"), ((512, 12, 12), (1024, 6, 6)), (96, 96), width=32, base_width=4, arch=arch)
    model = Decoder(cfg)
    assert cfg.in_channels == 1536 and cfg.in_size == (12, 12)
    y = model([torch.randn(1, 512, 12, 12), torch.randn(1, 1024, 6, 6)])
    assert y.shape == (1, 3, 96, 96)
    # 200 px input: layer4 is 7x7, not a power-of-two multiple; the output is still exact.
    cfg = DecoderConfig(("layer4",), ((2048, 7, 7),), (200, 200), width=32, base_width=4, arch=arch)
    assert Decoder(cfg)([torch.randn(1, 2048, 7, 7)]).shape == (1, 3, 200, 200)
    assert count_parameters(model) > 0


def test_checkpoints_from_before_arch_rebuild_the_upconv_decoder():
    old = {"layers": ["layer3"], "in_shapes": [[1024, 14, 14]], "out_size": [224, 224], "width": 32, "depth": 1,
           "base_width": 4}  # a decoder_config as the first release saved it
    cfg = DecoderConfig.from_dict(old)
    assert cfg.arch == "upconv" and type(Decoder(cfg)).__name__ == "UpconvDecoder"
