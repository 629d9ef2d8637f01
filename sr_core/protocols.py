"""What the samplers need from a host (diffusers here, ComfyUI in nodes/).

Latent conventions: a *raw* latent is what the VAE's quant_conv produces (ComfyUI's
LATENT convention); a *scaled* latent is raw × ``scale_factor`` (0.18215 for SD 2.x), the
space the UNet and the noise schedule work in. Pixels are (N, 3, H, W) in [-1, 1].
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Denoiser(Protocol):
    """An epsilon-prediction SD UNet behind a host.

    ``alphas_cumprod``: float32 tensor (1000,) of the host's schedule.
    ``predict_eps(x_t, t, context, control=None)``: ε̂ for the scaled latent ``x_t``
    (N, 4, h, w) at integer timestep ``t`` in [0, 999] with text embedding ``context``
    (N or 1, 77, D). ``control`` is a host-neutral list of residuals (CCSR), or None.
    Returns a tensor of x_t's shape (any float dtype).
    """

    alphas_cumprod: Tensor

    def predict_eps(self, x_t: Tensor, t: int, context: Tensor, control: object | None = None) -> Tensor: ...


@runtime_checkable
class Autoencoder(Protocol):
    """An SD VAE behind a host.

    ``scale_factor``: raw → scaled latent factor (0.18215).
    ``encode_moments(pixels)``: posterior (mean, logvar) as raw latents (N, 4, H/8, W/8),
    for pixels (N, 3, H, W) in [-1, 1] with H, W multiples of 8.
    ``decode(raw)``: raw latent → pixels in about [-1, 1] (not clamped).
    """

    scale_factor: float

    def encode_moments(self, pixels: Tensor) -> tuple[Tensor, Tensor]: ...

    def decode(self, raw: Tensor) -> Tensor: ...
