"""Image quality metrics shared by the trainer, the benchmarks and the studio (numpy + scikit-image)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def _array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {array.dtype}")
    return array


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images (inf when identical)."""
    x, y = _array(a).astype(np.float64), _array(b).astype(np.float64)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    mse = np.mean((x - y) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(a, b) -> float:
    """Structural similarity (Gaussian-weighted, as in Wang et al. 2004) of two uint8 RGB images."""
    from skimage.metrics import structural_similarity

    x, y = _array(a), _array(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    return float(structural_similarity(x, y, channel_axis=-1 if x.ndim == 3 else None, data_range=255,
                                       gaussian_weights=True, sigma=1.5, use_sample_covariance=False))
