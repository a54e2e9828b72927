"""Image-quality metrics for the testbed: Fréchet distance between feature sets, and PSNR."""
from __future__ import annotations

import torch


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition."""
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, F] (FID's formula), in float64.

    tr(sqrt(Ca Cb)) is computed as tr(sqrt(sqrt(Ca) Cb sqrt(Ca))), a symmetric PSD product, so an
    eigen-decomposition suffices (no scipy).
    """
    a, b = feats_a.detach().double().cpu(), feats_b.detach().double().cpu()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    value = (mu_a - mu_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * torch.trace(cross)
    return max(float(value), 0.0)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over whole tensors (images in [0, data_range]); inf if equal."""
    mse = (a.detach().double() - b.detach().double()).square().mean()
    return float("inf") if mse == 0 else float(10 * torch.log10(data_range ** 2 / mse))
