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


# --------------------------------------------------------------------------- CCSR
# DDPM "leading" spacing and the ancestral step (CCSR-v2, diffusers DDPMScheduler math),
# and the IDDPM respaced chain (CCSR-v1, guided-diffusion / ldm SpacedSampler math).


def leading_timesteps(num_steps: int, num_train: int = NUM_TRAIN_TIMESTEPS, offset: int = 1) -> list[int]:
    """DDPM "leading" spacing with ``steps_offset``: (arange(N)·(num_train // N))[::-1] + offset.

    N = 6 → [831, 665, 499, 333, 167, 1]; N = 1 → [1]. Descending integers in [1, 999] for
    SD's 1000-step schedule (diffusers ``DDPMScheduler.set_timesteps`` with SD 2.1's config).
    """
    if not 1 <= num_steps <= num_train:
        raise ValueError(f"number of steps must be in [1, {num_train}], got {num_steps}")
    ratio = num_train // num_steps
    return [k * ratio + offset for k in reversed(range(num_steps))]


def ddpm_step(x_t: Tensor, eps: Tensor, alpha_bar_t: float | Tensor, alpha_bar_prev: float | Tensor,
              noise: Tensor | None) -> tuple[Tensor, Tensor]:
    """One DDPM ancestral step with the "fixed_small" posterior variance, in float32.

    ``x_t``: scaled latent at timestep t; ``eps``: ε̂(x_t, t); ``alpha_bar_t`` = ᾱ_t and
    ``alpha_bar_prev`` = ᾱ of the previous (smaller) timestep of the plan, 1.0 past the
    last one. With α = ᾱ_t/ᾱ_prev, β = 1 − α:

        x̂0     = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t                     (no clipping)
        μ      = √ᾱ_prev·β/(1−ᾱ_t) · x̂0 + √α·(1−ᾱ_prev)/(1−ᾱ_t) · x_t
        σ²     = max((1−ᾱ_prev)/(1−ᾱ_t)·β, 1e-20)
        x_prev = μ + σ·noise          (noise None → μ)

    Returns ``(x_prev, x̂0)``, both float32.
    """
    a_t = torch.as_tensor(alpha_bar_t, dtype=torch.float32)
    a_prev = torch.as_tensor(alpha_bar_prev, dtype=torch.float32)
    b_t = 1.0 - a_t
    b_prev = 1.0 - a_prev
    alpha = a_t / a_prev
    beta = 1.0 - alpha
    x = x_t.float()
    x0 = (x - b_t ** 0.5 * eps.float()) / a_t ** 0.5
    mean = (a_prev ** 0.5 * beta / b_t) * x0 + (alpha ** 0.5 * b_prev / b_t) * x
    if noise is None:
        return mean, x0
    variance = torch.clamp(b_prev / b_t * beta, min=1e-20)
    return mean + variance ** 0.5 * noise.float(), x0


def respaced_timesteps(count: int, num_train: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """IDDPM ``space_timesteps(num_train, [count])``: ``count`` timesteps spread over [0, num_train−1].

    The stride (num_train−1)/(count−1) is accumulated in float64 and each position rounded
    half-to-even, as guided-diffusion does (count = 45 → [0, 23, 45, ..., 976, 999]; the
    accumulated 22nd position 499.4999… rounds to 499). Ascending.
    """
    if not 1 <= count <= num_train:
        raise ValueError(f"respaced step count must be in [1, {num_train}], got {count}")
    stride = 1.0 if count <= 1 else (num_train - 1) / (count - 1)
    out, pos = [], 0.0
    for _ in range(count):
        out.append(round(pos))
        pos += stride
    return out


class RespacedChain:
    """The diffusion chain restricted to ``timesteps`` (IDDPM respacing), float64 tensors.

    For chain index i (timestep S[i]): β_i = 1 − ᾱ(S[i])/ᾱ(S[i−1]) (ᾱ(S[−1]) = 1), so the
    chain's ᾱ_i equals the original ᾱ at S[i]; ``alphas_cumprod_prev`` = ᾱ_{i−1} (1 at i = 0);
    the posterior q(x_{i−1} | x_i, x0) has mean ``coef_x0[i]``·x0 + ``coef_xt[i]``·x_i and
    variance ``posterior_variance[i]`` ("fixed_small").
    """

    def __init__(self, alphas_cumprod: Tensor, timesteps: list[int]) -> None:
        ac = alphas_cumprod.detach().double().cpu()
        self.timesteps = list(int(t) for t in timesteps)
        kept = ac[self.timesteps]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), kept[:-1]])
        self.betas = 1.0 - kept / prev
        alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        one_minus = 1.0 - self.alphas_cumprod
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / one_minus
        self.coef_x0 = self.betas * torch.sqrt(self.alphas_cumprod_prev) / one_minus
        self.coef_xt = (1.0 - self.alphas_cumprod_prev) * torch.sqrt(alphas) / one_minus
        self.sqrt_recip = torch.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1 = torch.sqrt(1.0 / self.alphas_cumprod - 1.0)

    def predict_x0(self, x_t: Tensor, eps: Tensor, i: int) -> Tensor:
        """x̂0 = √(1/ᾱ_i)·x_t − √(1/ᾱ_i − 1)·ε, coefficients cast to float32 (ldm's form)."""
        return float(self.sqrt_recip[i]) * x_t.float() - float(self.sqrt_recipm1[i]) * eps.float()

    def q_sample(self, x0: Tensor, noise: Tensor, i: int) -> Tensor:
        """√ᾱ_i·x0 + √(1−ᾱ_i)·noise at chain index i, float32."""
        a = self.alphas_cumprod[i]
        return float(torch.sqrt(a)) * x0.float() + float(torch.sqrt(1.0 - a)) * noise.float()

    def posterior_step(self, x_t: Tensor, x0: Tensor, i: int, noise: Tensor) -> Tensor:
        """x_{i−1} = coef_x0[i]·x̂0 + coef_xt[i]·x_i + √posterior_variance[i]·noise, float32."""
        mean = float(self.coef_x0[i]) * x0.float() + float(self.coef_xt[i]) * x_t.float()
        return mean + float(torch.sqrt(self.posterior_variance[i])) * noise.float()
