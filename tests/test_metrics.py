"""Metrics against scikit-image and known values."""

import math

import numpy as np
import pytest
import torch
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from featrecon.metrics import check_unit_range, mse, psnr, ssim, summarize


def pairs(seed=0, shape=(3, 3, 48, 40)):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(*shape, generator=g)
    b = (a + 0.08 * torch.randn(*shape, generator=g)).clamp(0, 1)
    return a, b


def skimage_ssim(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return np.array([structural_similarity(x.permute(1, 2, 0).numpy(), y.permute(1, 2, 0).numpy(), gaussian_weights=True,
                                           sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=2)
                     for x, y in zip(a, b)])


def test_ssim_matches_scikit_image():
    for seed in range(3):
        a, b = pairs(seed)
        assert np.abs(ssim(a, b).numpy() - skimage_ssim(a, b)).max() < 1e-4
    # In float64 (what score reports) the same numbers as scikit-image's to rounding.
    a, b = (x.double() for x in pairs(4))
    assert np.abs(ssim(a, b).numpy() - skimage_ssim(a, b)).max() < 1e-12


def test_mse_psnr_match_scikit_image_and_known_noise():
    a, b = pairs(1)
    for i in range(len(a)):
        x, y = a[i].numpy().astype(np.float64), b[i].numpy().astype(np.float64)
        assert mse(a[i:i + 1], b[i:i + 1]).item() == pytest.approx(mean_squared_error(x, y), rel=1e-5)
        assert psnr(a[i:i + 1], b[i:i + 1]).item() == pytest.approx(peak_signal_noise_ratio(x, y, data_range=1), rel=1e-5)
    # A constant error of 0.1 everywhere: MSE 0.01, PSNR exactly 20 dB.
    x = torch.full((1, 3, 16, 16), 0.5)
    assert psnr(x, x + 0.1).item() == pytest.approx(20.0, abs=1e-4)


def test_identical_images_give_infinite_psnr_and_unit_ssim():
    a, _ = pairs(2)
    assert torch.isinf(psnr(a, a)).all() and (psnr(a, a) > 0).all()
    assert torch.allclose(ssim(a, a), torch.ones(len(a)), atol=1e-6)
    s = summarize(psnr(a, a).numpy())
    assert s["mean"] == math.inf and s["n"] == 3


def test_normalised_tensors_are_refused():
    """The prototype's 1.25 dB / 0.15 came from scoring ImageNet-normalised tensors."""
    a, b = pairs(3)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with pytest.raises(ValueError, match="normalis"):
        check_unit_range((a - mean) / std, (b - mean) / std)
    from featrecon.train.validate import measure

    with pytest.raises(ValueError):
        measure((a - mean) / std, b)
    # On [0, 1] pixels the same pair scores as it should: well above the prototype's numbers.
    good = measure(a, b)
    assert good["psnr"].min() > 15 and good["ssim"].min() > 0.5


def test_summary_interval():
    v = np.array([1.0, 2.0, 3.0, 4.0])
    s = summarize(v)
    assert s["mean"] == 2.5 and s["std"] == pytest.approx(np.std(v, ddof=1))
    assert s["ci95"][0] < 2.5 < s["ci95"][1]
