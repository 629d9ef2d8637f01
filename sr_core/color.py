"""Color fixes that pull a super-resolved image back to the colors of its reference.

Images are float tensors (N, C, H, W) with pixels in [0, 1]; ``reference`` is the
upscaled low-quality input of the same size. Results are clamped to [0, 1].
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputImageError

ColorFix = Literal["adain", "wavelet", "none"]
COLOR_FIXES: tuple[str, ...] = ("adain", "wavelet", "none")

_ADAIN_EPS = 1e-5
WAVELET_LEVELS = 5


def _check_pair(image: Tensor, reference: Tensor) -> None:
    if image.shape != reference.shape:
        raise InputImageError(
            f"color fix: image {tuple(image.shape)} and reference {tuple(reference.shape)} must have the same shape"
        )


def adain(image: Tensor, reference: Tensor) -> Tensor:
    """AdaIN: give each channel of ``image`` the mean and std of ``reference``.

    Per image and channel: (x − μ_x)/σ_x · σ_r + μ_r with σ = sqrt(unbiased var + 1e-5),
    the official OSEDiff default. Computed in float32.
    """
    _check_pair(image, reference)
    x, r = image.float(), reference.float()
    mx = x.mean(dim=(2, 3), keepdim=True)
    sx = (x.var(dim=(2, 3), keepdim=True, unbiased=True) + _ADAIN_EPS).sqrt()
    mr = r.mean(dim=(2, 3), keepdim=True)
    sr = (r.var(dim=(2, 3), keepdim=True, unbiased=True) + _ADAIN_EPS).sqrt()
    return ((x - mx) / sx * sr + mr).clamp(0.0, 1.0)


def _blur(x: Tensor, radius: int) -> Tensor:
    """3×3 [1,2,1]ᵀ[1,2,1]/16 blur with dilation ``radius`` and replicate padding."""
    c = x.shape[1]
    k1 = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    kernel = (torch.outer(k1, k1) / 16.0).expand(c, 1, 3, 3)
    padded = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(padded, kernel, groups=c, dilation=radius)


def wavelet_split(x: Tensor, levels: int = WAVELET_LEVELS) -> tuple[Tensor, Tensor]:
    """À trous decomposition: returns (high, low) with high + low == x.

    Level i blurs with dilation 2^i; high is the sum of the detail bands, low the
    residual after ``levels`` blurs.
    """
    high = torch.zeros_like(x)
    low = x
    for i in range(levels):
        blurred = _blur(low, 2**i)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet(image: Tensor, reference: Tensor) -> Tensor:
    """Wavelet fix: high bands of ``image`` + low band of ``reference`` (5 levels)."""
    _check_pair(image, reference)
    x, r = image.float(), reference.float()
    high, _ = wavelet_split(x)
    _, low = wavelet_split(r)
    return (high + low).clamp(0.0, 1.0)


def apply_color_fix(image: Tensor, reference: Tensor, method: str) -> Tensor:
    """Dispatch on ``method`` in ("adain", "wavelet", "none"); "none" only clamps."""
    if method == "adain":
        return adain(image, reference)
    if method == "wavelet":
        return wavelet(image, reference)
    if method == "none":
        return image.float().clamp(0.0, 1.0)
    raise ValueError(f"color fix must be one of {COLOR_FIXES}, got {method!r}")
