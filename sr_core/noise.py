"""The noise protocol: every random draw of one image comes from one seeded CPU generator.

All draws are fp32 ``torch.randn(latent_shape, generator=g)`` over the WHOLE latent (never
per tile), in a fixed order per method, then cast to the compute device and dtype. So a
seed means the same picture on the CLI and in the nodes, tiled or not, on any device.
Order: the posterior sample of the LQ latent (``latent_mode="sample"``) first, then the
method's own draws (OSEDiff has none).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class NoiseSource:
    """Seeded draws for one image. ``draws`` records the shapes drawn, in order."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)
        self.draws: list[tuple[int, ...]] = []

    def randn(self, shape: tuple[int, ...] | torch.Size, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> Tensor:
        """Draw N(0, I) of ``shape`` in fp32 on the CPU, then move to ``device``/``dtype``."""
        shape = tuple(int(s) for s in shape)
        self.draws.append(shape)
        return torch.randn(shape, generator=self.generator, dtype=torch.float32).to(device=device, dtype=dtype)


def latent_from_moments(mean: Tensor, logvar: Tensor, mode: str,
                        noise: Sequence[NoiseSource] | None = None) -> Tensor:
    """Raw latent from posterior moments: the mean, or mean + exp(½·clamp(logvar, −30, 20))·n.

    ``mode`` is "mean" (deterministic, our default) or "sample", which needs one
    NoiseSource per image of the batch; each draws one fp32 tensor of its image's latent
    shape (1, C, h, w). Returns float32.
    """
    if mode == "mean":
        return mean.float()
    if mode != "sample":
        raise ValueError(f"latent mode must be 'mean' or 'sample', got {mode!r}")
    if noise is None or len(noise) != mean.shape[0]:
        raise ValueError("latent mode 'sample' needs one seeded noise source per image")
    std = torch.exp(0.5 * logvar.float().clamp(-30.0, 20.0))
    n = torch.cat([src.randn((1,) + tuple(mean.shape[1:]), device=mean.device) for src in noise])
    return mean.float() + std * n
