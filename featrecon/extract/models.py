"""The backbones featrecon inverts: torchvision's classification models, by family.

Each family says what `--layers all` means for its models (their own stages), how a
captured layer is laid out (NCHW maps, Swin's NHWC maps, or a vision transformer's
tokens), and how to build a model for an image size. Every layer is stored as an
(C, H, W) grid: NHWC maps are transposed, and a ViT's tokens drop the class token and
stand as (C, H/p, W/p) with p the patch size; the cache records each layer's layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import FeatreconError

NCHW, NHWC, TOKENS = "nchw", "nhwc", "tokens"  # how a captured node's tensor is laid out
LAYOUT_NOTES = {NHWC: "stored transposed from (H, W, C) to (C, H, W)",
                TOKENS: "class token dropped, patch tokens stored as (C, H/p, W/p)"}
DEFAULT_MODEL = "resnet50"


@dataclass(frozen=True)
class Family:
    name: str
    models: tuple[str, ...]  # torchvision's builder names

    def standard_layers(self, model: nn.Module) -> dict[str, str]:
        """{layer name: torchvision node} of the family's stages, shallow to deep."""
        if self.name == "resnet":
            return {"stem": "relu", **{f"layer{i}": f"layer{i}" for i in range(1, 5)}}
        if self.name in ("convnext", "swin"):  # features: stem, then stage / downsampling alternating
            return {"stem": "features.0", **{f"stage{i}": f"features.{2 * i - 1}" for i in range(1, 5)}}
        if self.name == "efficientnet":  # features: stem, the stages, a last 1x1 convolution
            return {"stem": "features.0", **{f"stage{i}": f"features.{i}" for i in range(1, len(model.features) - 1)}}
        blocks = len(model.encoder.layers)  # vit: four encoder blocks, evenly spaced, the last one included
        picks = sorted({round(blocks * q / 4) for q in (1, 2, 3, 4)})
        return {f"block{k}": f"encoder.layers.encoder_layer_{k - 1}" for k in picks}

    def layout(self, node: str) -> str:
        if self.name == "swin" and node.startswith("features."):
            return NHWC
        if self.name == "vit" and node.startswith("encoder.layers."):
            return TOKENS
        return NCHW


FAMILIES = (
    Family("resnet", ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
                      "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d")),
    Family("convnext", ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large")),
    Family("efficientnet", tuple(f"efficientnet_b{i}" for i in range(8)) + ("efficientnet_v2_s", "efficientnet_v2_m",
                                                                            "efficientnet_v2_l")),
    Family("vit", ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")),
    Family("swin", ("swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b")),
)
MODELS = tuple(m for f in FAMILIES for m in f.models)


def family_of(model_name: str) -> Family:
    for f in FAMILIES:
        if model_name in f.models:
            return f
    raise FeatreconError(f"--model {model_name!r}: not a supported torchvision classifier; choose one of "
                         f"{', '.join(MODELS)} (featrecon models lists them with their layers)")


def build(model_name: str, image_size: int) -> nn.Module:
    """A randomly initialised model (the caller seeds and loads weights): vision transformers are
    built for `image_size`, which their position embeddings fix."""
    import torchvision

    kwargs = {"image_size": image_size} if family_of(model_name).name == "vit" else {}
    return torchvision.models.get_model(model_name, weights=None, **kwargs)


def check_size(model_name: str, size: int) -> None:
    """A vision transformer's input must be whole patches (vit_b_16: 16 pixels)."""
    patch = int(model_name.rsplit("_", 1)[1]) if family_of(model_name).name == "vit" else None
    if patch and size % patch:
        raise FeatreconError(f"--size {size}: {model_name} takes whole {patch}-pixel patches; use a multiple of {patch}")


def classifier_node(model: nn.Module) -> str:
    """The node of the model's class scores: the last node of its graph."""
    from torchvision.models.feature_extraction import get_graph_node_names

    return get_graph_node_names(model)[1][-1]
