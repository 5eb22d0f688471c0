"""LPIPS (Zhang et al. 2018), the perceptual distance the inversion papers report, from the
reference implementation (the `lpips` package) rather than a copy of it.

The package ships the calibrated linear layers; the trunk (AlexNet, the variant papers
report, or VGG-16) is torchvision's, with its ImageNet weights from torchvision's cache as
usual (downloaded once), or from a local state-dict file (`score --lpips-weights PATH`).
When the weights cannot be had, `Perceptual.why` says so, the report says so in its LPIPS
column, and everything else is still scored: never a silently random trunk.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import FeatreconError

log = logging.getLogger(__name__)
NETS = ("alex", "vgg", "none")


def _trunk_weights(net: str, path: Path | None) -> dict:
    """torchvision's state dict of the trunk: a local file, or the ImageNet weights from the cache."""
    from ..extract.backbone import download_state_dict, load_state_dict_file

    if path is not None:
        return load_state_dict_file(Path(path), flag="--lpips-weights")
    from torchvision.models import AlexNet_Weights, VGG16_Weights

    return download_state_dict(AlexNet_Weights.IMAGENET1K_V1 if net == "alex" else VGG16_Weights.IMAGENET1K_V1,
                               f"LPIPS ({net})", f"pass --lpips-weights PATH (a torchvision {net} state dict)")


def lpips_model(net: str, trunk: dict) -> torch.nn.Module:
    """The `lpips` package's LPIPS (v0.1, calibrated linear layers) with torchvision's trunk weights
    `trunk` (its `features.N.*` keys) loaded into the package's slices of the same modules."""
    import lpips

    with warnings.catch_warnings():  # the package still asks torchvision for `pretrained=`
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net=net, version="0.1", pnet_rand=True, verbose=False)
    where = {name: f"{slice_name}.{name}" for slice_name, part in model.net.named_children()
             for name, _ in part.named_children()}  # torchvision's features index -> the package's slice
    mapped = {}
    for key, value in trunk.items():
        if key.startswith("features."):
            index, rest = key.removeprefix("features.").split(".", 1)
            if index in where:
                mapped[f"{where[index]}.{rest}"] = value
    missing = set(model.net.state_dict()) - set(mapped)
    if missing:
        raise FeatreconError(f"--lpips-weights: not a torchvision {net} state dict (missing {sorted(missing)[:3]})")
    model.net.load_state_dict(mapped)
    return model.eval()


class Perceptual:
    """Per-image LPIPS of [0, 1] images, or the reason it is left out (`why`)."""

    name = "lpips"

    def __init__(self, net: str = "alex", weights: Path | None = None, device: torch.device | None = None):
        self.net, self.model, self.why = net, None, ""
        if net == "none":
            self.why = "not asked for (--lpips none)"
            return
        try:
            self.model = lpips_model(net, _trunk_weights(net, weights)).to(device or "cpu")
        except FeatreconError as e:
            self.why = str(e)
            log.warning("LPIPS left out: %s", e)

    @property
    def available(self) -> bool:
        return self.model is not None

    @torch.no_grad()
    def __call__(self, pred: torch.Tensor, target: torch.Tensor, batch=None) -> dict[str, np.ndarray]:
        """{"lpips": (B,)} for [0, 1] images (B, 3, H, W); nothing when it is left out."""
        if self.model is None:
            return {}
        d = self.model(pred.float().contiguous(), target.float().contiguous(), normalize=True)  # [0, 1] -> [-1, 1]
        return {"lpips": d.flatten().double().cpu().numpy()}
