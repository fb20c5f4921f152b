"""Image quality metrics as CompressAI reports them: PSNR on 8-bit RGB (numpy), SSIM and MS-SSIM (pytorch-msssim)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# pytorch-msssim's MS-SSIM needs the smaller side above (win_size - 1) * 2**4 with its 11-pixel window.
MS_SSIM_MIN_SIDE = 161


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError("metrics compare 8-bit images (uint8 arrays)")
    return a, b


def mse(a: np.ndarray, b: np.ndarray) -> float:
    a, b = _pair(a, b)
    diff = a.astype(np.float64) - b.astype(np.float64)
    return float(np.mean(diff * diff))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """20 log10(255) - 10 log10(MSE) of two uint8 images; inf when identical."""
    error = mse(a, b)
    return math.inf if error == 0 else 20 * math.log10(255.0) - 10 * math.log10(error)


def _as_batch(image: np.ndarray):
    import torch  # only SSIM needs it: PSNR works where torch is not installed (remote clients)

    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].double()


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from pytorch_msssim import ssim as _ssim

    a, b = _pair(a, b)
    return float(_ssim(_as_batch(a), _as_batch(b), data_range=255, size_average=True))


def ms_ssim(a: np.ndarray, b: np.ndarray) -> float | None:
    """MS-SSIM of two HWC uint8 images, or None when the image is too small for five scales."""
    from pytorch_msssim import ms_ssim as _ms_ssim

    a, b = _pair(a, b)
    if min(a.shape[0], a.shape[1]) < MS_SSIM_MIN_SIDE:
        return None
    return float(_ms_ssim(_as_batch(a), _as_batch(b), data_range=255, size_average=True))


def ms_ssim_if_available(a: np.ndarray, b: np.ndarray) -> float | None:
    """`ms_ssim`, or None where torch or pytorch-msssim is not installed (client machines: PSNR only)."""
    try:
        return ms_ssim(a, b)
    except ImportError:
        return None


def mean_of(values: Sequence[float | None]) -> float | None:
    """Mean of per-image values (CompressAI's convention), ignoring missing ones."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None
