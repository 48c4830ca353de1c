"""fl_sim.metrics against scikit-image on real CIFAR-10 images, plus matching and labels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from attack_cases import cifar_images
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from fl_sim import metrics
from fl_sim.errors import MissingResourceError


@pytest.fixture(scope="module")
def noisy_pair() -> tuple[torch.Tensor, torch.Tensor]:
    truth = cifar_images(6)
    g = torch.Generator().manual_seed(0)
    sigma = torch.tensor([0.01, 0.03, 0.05, 0.1, 0.2, 0.4]).view(-1, 1, 1, 1)
    noisy = (truth + sigma * torch.randn(truth.shape, generator=g)).clamp(0, 1)
    return noisy, truth


def _hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).double().numpy()


def test_psnr_matches_skimage(noisy_pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    noisy, truth = noisy_pair
    ours = metrics.psnr(noisy, truth)
    ref = [peak_signal_noise_ratio(_hwc(t), _hwc(n), data_range=1.0)
           for n, t in zip(noisy, truth, strict=True)]
    assert ours.shape == (6,)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-4)
    assert float(ours[0]) > float(ours[-1])  # less noise, higher PSNR


def test_ssim_matches_skimage(noisy_pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    noisy, truth = noisy_pair
    ours = metrics.ssim(noisy, truth)
    ref = [structural_similarity(_hwc(t), _hwc(n), gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=1.0, channel_axis=2)
           for n, t in zip(noisy, truth, strict=True)]
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-3)
    assert metrics.ssim(truth, truth).sub(1).abs().max() < 1e-9


def test_ssim_grayscale_and_single_image() -> None:
    truth = cifar_images(1)[0].mean(0, keepdim=True)  # [1, 32, 32]
    noisy = (truth + 0.1 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(1)))
    ref = structural_similarity(truth[0].double().numpy(), noisy[0].double().numpy(),
                                gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                data_range=1.0)
    assert float(metrics.ssim(noisy, truth)[0]) == pytest.approx(ref, abs=1e-3)
    with pytest.raises(ValueError, match="smaller than"):
        metrics.ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


def test_matching_recovers_shuffled_permutation() -> None:
    truth = cifar_images(8)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    recon = (truth[perm] + 0.05 * torch.randn(truth.shape, generator=g)).clamp(0, 1)
    found = metrics.match_batch(recon, truth)
    # recon[found[i]] must be the noisy copy of truth[i]: perm[found[i]] == i
    assert perm[found].tolist() == list(range(8))
    assert torch.equal(metrics.match_batch(recon, truth, metric="psnr"), found)


def test_score_reconstruction_matches_before_scoring() -> None:
    truth = cifar_images(4)
    recon = truth.flip(0).clone()
    noise = torch.randn(recon[0].shape, generator=torch.Generator().manual_seed(5))
    recon[0] = (recon[0] + 0.1 * noise).clamp(0, 1)  # a noisy reconstruction of truth[3]
    out = metrics.score_reconstruction(recon, truth, torch.tensor([1, 2, 3, 4]),
                                       torch.tensor([4, 3, 2, 2]))
    assert out["recon_index"] == [3, 2, 1, 0]
    assert out["truth_index"] == [0, 1, 2, 3]
    assert math.isinf(out["psnr_per_image"][0]) and out["psnr_per_image"][3] < 25
    assert out["ssim_per_image"][:3] == pytest.approx([1.0, 1.0, 1.0])
    assert out["label_accuracy"] == pytest.approx(0.75)  # 4, 3, 2 found; one 2 missed


def test_score_reconstruction_label_only() -> None:
    out = metrics.score_reconstruction(torch.empty(0, 3, 32, 32), cifar_images(2),
                                       torch.tensor([3, 8]), torch.tensor([8, 3]))
    assert math.isnan(out["psnr"]) and out["label_accuracy"] == 1.0


def test_label_accuracy_is_order_free() -> None:
    assert metrics.label_accuracy(torch.tensor([0, 1, 2]), torch.tensor([2, 1, 0])) == 1.0
    assert metrics.label_accuracy(torch.tensor([1, 1]), torch.tensor([1, 2])) == 0.5
    assert metrics.label_accuracy(torch.tensor([], dtype=torch.long), torch.tensor([1])) == 0.0


def test_lpips_never_downloads(tmp_path) -> None:
    missing = tmp_path / "lpips_alex.pth"
    assert not metrics.lpips_available(missing)
    assert not metrics.lpips_available(None)
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(MissingResourceError, match="lpips|LPIPS"):
        metrics.lpips(x, x, weights_path=missing)
