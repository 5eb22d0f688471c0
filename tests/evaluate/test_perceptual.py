"""LPIPS through the reference package: our values equal the package's own on the same trunk,
and when the trunk's weights cannot be had the metric is left out, never faked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from featrecon.evaluate.perceptual import Perceptual


@pytest.fixture(scope="module")
def trunk_file(tmp_path_factory):
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("alex") / "alexnet.pt"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return path


def reference(net_file, pred, target):
    """The lpips package on its own: its AlexNet slices taken from a torchvision AlexNet holding the
    same weights (handed to it where it builds its trunk), inputs in [0, 1] as normalize=True expects."""
    import lpips
    import lpips.pretrained_networks as pn

    alex = torchvision.models.alexnet(weights=None)
    alex.load_state_dict(torch.load(net_file, weights_only=True))
    real = pn.tv.alexnet
    pn.tv.alexnet = lambda **_: alex
    try:
        model = lpips.LPIPS(net="alex", verbose=False).eval()
    finally:
        pn.tv.alexnet = real
    with torch.no_grad():
        return model(pred, target, normalize=True).flatten().double().numpy()


def test_our_lpips_is_the_reference_packages_on_the_same_weights(trunk_file):
    g = torch.Generator().manual_seed(0)
    target = torch.rand(5, 3, 64, 64, generator=g)
    pred = (target + 0.2 * torch.randn(5, 3, 64, 64, generator=g)).clamp(0, 1)
    ours = Perceptual("alex", trunk_file)(pred, target)["lpips"]
    np.testing.assert_allclose(ours, reference(trunk_file, pred, target), rtol=1e-6, atol=1e-7)
    assert (ours > 0).all() and np.allclose(Perceptual("alex", trunk_file)(target, target)["lpips"], 0, atol=1e-7)
    assert ours[0] != ours[1]  # per image


def test_weights_that_cannot_be_had_leave_lpips_out_with_the_reason(monkeypatch, tmp_path):
    from torchvision.models import AlexNet_Weights

    def offline(self, *a, **k):
        raise OSError("no route to host")

    monkeypatch.setattr(type(AlexNet_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    p = Perceptual("alex")
    assert not p.available and "--lpips-weights PATH" in p.why and "offline" in p.why
    assert p(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)) == {}
    bad = tmp_path / "vgg.pt"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    assert "not a torchvision alex state dict" in Perceptual("alex", bad).why
    assert not Perceptual("none").available
