"""Small test images and an image-distance measure shared by the test modules."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def smooth_photo(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A photo-like (1, 3, h, w) image in [0, 1]: a smooth random field (4×4 colours upsampled
    bilinearly) plus 5 % fine noise, seeded."""
    g = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(h, w), mode="bilinear", align_corners=False)
    return (smooth + 0.05 * torch.rand(1, 3, h, w, generator=g)).clamp(0, 1)


def psnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    """PSNR in dB with the reference's value range as the peak (float64; inf when equal)."""
    mse = float(((ref.double() - got.double()) ** 2).mean())
    peak = float(ref.max() - ref.min())
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)
