"""The SD noise schedule and the step math shared by the methods.

All timesteps are integers in [0, 999] of the 1000-step SD training schedule.
Latents here are *scaled* latents (raw VAE latent × 0.18215), the space the UNet sees.
"""
from __future__ import annotations

import torch
from torch import Tensor

BETA_START = 0.00085
BETA_END = 0.012
NUM_TRAIN_TIMESTEPS = 1000


def sd_alphas_cumprod(
    beta_start: float = BETA_START,
    beta_end: float = BETA_END,
    num_steps: int = NUM_TRAIN_TIMESTEPS,
) -> Tensor:
    """ᾱ_t of SD's "scaled linear" schedule, float32, shape (num_steps,).

    β = linspace(√β_start, √β_end, num_steps)², ᾱ_t = Π_{s≤t} (1 − β_s), computed in
    float32 the way the official diffusers-based code does (ᾱ₉₉₉ = 0.0046600951).
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def predict_x0(x_t: Tensor, eps: Tensor, alpha_bar: float | Tensor) -> Tensor:
    """x̂0(x_t, t, ε) = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t, computed in float32.

    ``x_t`` and ``eps`` are scaled latents of any dtype; the result is float32.
    No clamping (the methods do not clamp latents).
    """
    a = torch.as_tensor(alpha_bar, dtype=torch.float32)
    return (x_t.float() - torch.sqrt(1.0 - a) * eps.float()) / torch.sqrt(a)


def q_sample(x0: Tensor, noise: Tensor, alpha_bar: float | Tensor) -> Tensor:
    """q(x0, t, n) = √ᾱ_t·x0 + √(1−ᾱ_t)·n, float32."""
    a = torch.as_tensor(alpha_bar, dtype=torch.float32)
    return torch.sqrt(a) * x0.float() + torch.sqrt(1.0 - a) * noise.float()
