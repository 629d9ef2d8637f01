"""CCSR (content consistent super-resolution), v1 and v2: settings, samplers, control branch, weights.

Notation (scaled latents = raw VAE latent × 0.18215; integer timesteps of SD's 1000-step
schedule; ᾱ_t from the host's ``alphas_cumprod``):

    x̂0(x, t, ε) = (x − √(1−ᾱ_t)·ε) / √ᾱ_t          q(x0, t, n) = √ᾱ_t·x0 + √(1−ᾱ_t)·n

The SD UNet is frozen and unchanged. A *control branch* (a ControlNet copy of the UNet
encoder, conditioned on the LQ latent c, no pixel hint) produces 13 residuals that are added
to the UNet's 12 skip connections and to its mid block at scale 1.0:

    h = conv_in(x_t) + condition_conv_in(c) → down blocks → mid block
    residuals = 12 zero convs on the 12 encoder skips + 1 zero conv after the mid block

v1 ships an ldm ControlNet whose first conv takes concat(x_t, c) (8 channels); it is
*exactly* this module with ``conv_in.weight = W[:, :4]``, ``condition_conv_in.weight =
W[:, 4:]``, ``conv_in.bias = b`` and a zero ``condition_conv_in.bias``, so one module
serves both releases.

v2 sampler (DESIGN.md §4, reference/ccsr.md §2.2), N = ``steps``, "leading" timesteps
T_N = (arange(N)·(1000//N))[::-1] + 1:
 1. x = q(c, 999, n0) (start point "lr") or x = n0 ("noise").
 2. One control+UNet call at t = 999 WITHOUT CFG → x̂0_T. Official quirk (on by default):
    when cfg > 1 this call uses the NEGATIVE prompt embedding.  N = 1: output x̂0_T.
 3. k = round(N·t_max); τ = T_N[−k]; x = q(x̂0_T, τ, n1).
 4. For t in T_N[−k:] without the last round(N·t_min): ε = ε_u + cfg·(ε_c − ε_u) (uncond
    call first) and a DDPM ancestral step ("fixed_small" variance, no clipping).
 5. Output: x̂0 predicted at the last loop step (the last step's x is discarded).
 With t_max = 1 (official): steps 2–3 are skipped and the loop runs over all of T_N from
 the start latent (plain DDPM sampling with the control branch).

v1 sampler (reference/ccsr.md §2.1): 45-step IDDPM-respaced chain S; x_T pure noise;
one call at S[N−1] = 999 → x̂0; re-noise to S[round((N−1)·t_max)] (t = 658); ancestral
posterior steps over chain indices round(N·t_max)−1 … round(N·t_min) (658 → 341, 15 steps);
output x̂0 at the last step (t = 341). Empty prompt, no CFG (a cfg > 1 applies to every call,
the first included, as the official ``predict_noise`` does).

Noise protocol (pinned by tests): all noise of one image comes from ONE
:class:`~.noise.NoiseSource` (fp32 ``randn`` of the whole latent, then moved to the device):
v2: n0; the re-noise n1 only when used (N > 1 and t_max ≠ 1); one draw per loop step, the
last one included. v1: x_T; the re-noise; one draw per ancestral step. A posterior sample
of c (``latent_mode="sample"``) draws before all of these. Nothing else draws.

Rounding: ``round`` is Python's (half to even) as in the official code, e.g. N·t_min = 2.5 → 2.

Residual layouts: :meth:`ControlBranch.residuals` returns ``(down, mid)``: a list of 12
tensors in encoder order (conv_in output first) and the mid-block tensor, exactly
diffusers' ``down_block_additional_residuals`` / ``mid_block_additional_residual``. CCSR
passes ``control=(down, mid)`` to :meth:`Denoiser.predict_eps`. For ComfyUI's UNet use
:func:`to_ldm_control`.

Everything here imports only torch (+ safetensors for files); diffusers is imported lazily
by :func:`build_control_net` / :data:`CCSRControlNet`.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from . import keymap
from .errors import BaseModelError, SRError, WeightsError
from .files import (CCSR_FORMAT, LIGHTNING_CALLBACK, check_weights_path, describe_tensors, lightning_stub_allowed,
                    unsafe_global)
from .noise import NoiseSource
from .protocols import Denoiser
from .schedule import RespacedChain, ddpm_step, leading_timesteps, predict_x0, q_sample, respaced_timesteps

T_START = 999
"""Timestep of the first (one-shot) prediction in both versions."""
POSITIVE_PROMPT = "clean, high-resolution, 8k"
"""v2's default prompt (``--added_prompt`` of the official script)."""
NEGATIVE_PROMPT = "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed"
"""v2's default negative prompt."""
V1_PROMPT = ""
"""v1 always conditions on the empty prompt."""


class CCSRSettingsError(SRError, ValueError):
    """Sampler settings that cannot run (the official code crashes on them or they make no sense)."""


# ================================================================== settings and plans


@dataclass(frozen=True)
class CCSRv2Settings:
    """v2 sampler settings.

    ``steps``: N in [1, 1000]; ``t_max`` in (0, 1]; ``t_min`` in [0, t_max); ``cfg`` ≥ 1
    (CFG only when > 1, as the official ``guidance_scale > 1``); ``start_point`` "lr"
    (q(c, 999, n0), official default) or "noise" (n0); ``first_step_negative``: the official
    quirk of running the first call with the negative prompt when cfg > 1 (False: positive).
    """

    steps: int = 6
    t_max: float = 0.6667
    t_min: float = 0.5
    cfg: float = 4.5
    start_point: str = "lr"
    first_step_negative: bool = True


V2_PRESETS: dict[str, CCSRv2Settings] = {
    # README one-step config (official CLI defaults: t_max 0.6666, t_min 0, cfg 1): one call in total.
    "one-step": CCSRv2Settings(steps=1, t_max=0.6666, t_min=0.0, cfg=1.0),
    # README multi-step config: call at 999, re-noise to 499, one CFG step at 499, output x̂0 at 499.
    "two-step": CCSRv2Settings(steps=6, t_max=0.6667, t_min=0.5, cfg=4.5),
}


def v2_settings(preset: str = "two-step", **overrides: Any) -> CCSRv2Settings:
    """A preset ("one-step", "two-step") with some fields replaced (``steps=10`` …); None values are ignored."""
    if preset not in V2_PRESETS:
        raise CCSRSettingsError(f"unknown CCSR preset {preset!r}; choose one of {', '.join(V2_PRESETS)}")
    return replace(V2_PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class CCSRv1Settings:
    """v1 sampler settings (official defaults): 45-step respaced chain, t_max 0.6667,
    t_min 0.3333, no CFG (cfg ≥ 1; > 1 needs a negative prompt and applies to every call)."""

    steps: int = 45
    t_max: float = 0.6667
    t_min: float = 0.3333
    cfg: float = 1.0


def _check_common(steps: int, t_max: float, t_min: float, cfg: float, lo_steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or not lo_steps <= steps <= 1000:
        raise CCSRSettingsError(f"CCSR steps must be an integer in [{lo_steps}, 1000], got {steps!r}")
    for name, v in (("t_max", t_max), ("t_min", t_min), ("cfg", cfg)):
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise CCSRSettingsError(f"CCSR {name} must be a finite number, got {v!r}")
    if not 0.0 < t_max <= 1.0:
        raise CCSRSettingsError(f"CCSR t_max must be in (0, 1], got {t_max}")
    if not 0.0 <= t_min < t_max:
        raise CCSRSettingsError(f"CCSR t_min must be in [0, t_max) = [0, {t_max}), got {t_min}")
    if cfg < 1.0:
        raise CCSRSettingsError(f"CCSR cfg must be ≥ 1 (the official sampler treats any value ≤ 1 as "
                                f"'no guidance'), got {cfg}")


@dataclass(frozen=True)
class V2Plan:
    """What the v2 sampler will do. ``timesteps``: the full leading list T_N;
    ``first_call``: the one-shot call at 999; ``tau``: re-noise timestep (None: no re-noise);
    ``loop``: loop timesteps, descending; ``prev``: ᾱ index of each loop step's previous
    timestep (−1: ᾱ_prev = 1); ``nfe``: control+UNet evaluations (a CFG pair counts once)."""

    timesteps: tuple[int, ...]
    first_call: bool
    tau: int | None
    loop: tuple[int, ...]
    prev: tuple[int, ...]
    nfe: int


def plan_v2(settings: CCSRv2Settings) -> V2Plan:
    """The v2 timestep plan; CCSRSettingsError for settings on which the official code crashes.

    Examples (t_max 0.6667, t_min 0.5): N=6 → T=[831,665,499,333,167,1], τ=499, loop (499,);
    N=10 → τ=601, loop (601, 501). N = 1 always gives the one-shot output (documented
    fallback: t_max/t_min are not used; the official code crashes for N = 1 with t_min > 0).
    """
    s = settings
    _check_common(s.steps, s.t_max, s.t_min, s.cfg, 1)
    if s.start_point not in ("lr", "noise"):
        raise CCSRSettingsError(f"CCSR start point must be 'lr' or 'noise', got {s.start_point!r}")
    n = s.steps
    ts = tuple(leading_timesteps(n))
    if n == 1:
        return V2Plan(ts, True, None, (), (), 1)
    k_max = round(n * s.t_max)
    k_min = round(n * s.t_min)
    if k_max == 0:
        raise CCSRSettingsError(
            f"CCSR: t_max = {s.t_max} with {n} steps gives round({n}·{s.t_max}) = 0 loop steps; "
            f"raise t_max or the number of steps")
    if s.t_min > 0 and k_min == 0:
        raise CCSRSettingsError(
            f"CCSR: t_min = {s.t_min} with {n} steps gives round({n}·{s.t_min}) = 0, on which the official "
            f"sampler crashes (empty loop); use t_min = 0 (run down to t = 1) or more steps")
    loop = ts[-k_max:]
    if k_min:
        loop = loop[:-k_min]
    if not loop:
        raise CCSRSettingsError(
            f"CCSR: t_max = {s.t_max} and t_min = {s.t_min} with {n} steps leave no step between them "
            f"(round(N·t_max) = {k_max} ≤ round(N·t_min) = {k_min}); widen the range or use more steps")
    prev = tuple(ts[ts.index(t) + 1] if ts.index(t) + 1 < len(ts) else -1 for t in loop)
    if s.t_max == 1:
        return V2Plan(ts, False, None, loop, prev, len(loop))
    return V2Plan(ts, True, ts[-k_max], loop, prev, 1 + len(loop))


@dataclass(frozen=True)
class V1Plan:
    """What the v1 sampler will do: ``chain`` (respaced, ``chain.timesteps`` = S ascending),
    ``tau_index`` (re-noise index into S), ``loop`` (chain indices, descending), ``nfe``."""

    chain: RespacedChain
    tau_index: int
    loop: tuple[int, ...]
    nfe: int

    @property
    def tau(self) -> int:
        return self.chain.timesteps[self.tau_index]

    @property
    def loop_timesteps(self) -> tuple[int, ...]:
        return tuple(self.chain.timesteps[i] for i in self.loop)


def plan_v1(settings: CCSRv1Settings, alphas_cumprod: Tensor) -> V1Plan:
    """The v1 plan on the host's ᾱ: S = respaced_timesteps(N); τ index = round((N−1)·t_max);
    loop indices round(N·t_max)−1 down to round(N·t_min). For N = 45 these agree (τ = 658 =
    first loop step); for other N the official code re-noises to one level and starts the
    loop one index lower (N = 20: τ = 684, loop 631 … 368); reproduced as is."""
    s = settings
    _check_common(s.steps, s.t_max, s.t_min, s.cfg, 2)
    n = s.steps
    start, stop = round(n * s.t_max) - 1, round(n * s.t_min)
    if start < stop:
        raise CCSRSettingsError(
            f"CCSR-v1: t_max = {s.t_max} and t_min = {s.t_min} with {n} steps leave no step between them "
            f"(round(N·t_max) = {start + 1} ≤ round(N·t_min) = {stop}); widen the range or use more steps")
    chain = RespacedChain(alphas_cumprod, respaced_timesteps(n))
    loop = tuple(range(start, stop - 1, -1))
    return V1Plan(chain, round((n - 1) * s.t_max), loop, 1 + len(loop))


# ================================================================== the model calls


@runtime_checkable
class ControlBranch(Protocol):
    """A CCSR control branch behind a host.

    ``residuals(x_t, t, context, cond_latent)``: for the scaled noisy latent ``x_t``
    (B, 4, h, w) at integer timestep ``t`` in [0, 999], text embedding ``context`` (B or 1,
    77, D) and the scaled LQ latent ``cond_latent`` (B, 4, h, w), return ``(down, mid)``:
    12 tensors (encoder order, conv_in output first) and the mid-block tensor, in the
    diffusers layout. Must be pure (no state kept between calls).
    """

    def residuals(self, x_t: Tensor, t: int, context: Tensor, cond_latent: Tensor) -> tuple[list[Tensor], Tensor]: ...


EpsFn = Callable[[Tensor, int, Tensor, Tensor, "Tensor | None", float], Tensor]
"""``eps_fn(x_t, t, cond_latent, context, context_neg, cfg) -> ε`` (float32): one guided
control+UNet evaluation. :func:`ccsr_eps` bound to a denoiser and a control branch is the
default; a tiled implementation calls :func:`ccsr_eps` per tile and blends."""

StepCallback = Callable[[int, int], None]
"""``callback(done, total)`` after each control+UNet evaluation (may raise to interrupt)."""


def ccsr_eps(denoiser: Denoiser, control: ControlBranch, x_t: Tensor, t: int, cond_latent: Tensor,
             context: Tensor, context_neg: Tensor | None = None, cfg: float = 1.0) -> Tensor:
    """ε̂ of one control+UNet evaluation, float32, shape of ``x_t`` (scaled latent).

    Without guidance (``context_neg`` None or cfg ≤ 1): one call with ``context``. With it:
    the unconditional call (``context_neg``) first, then the conditional one, and
    ε = ε_u + cfg·(ε_c − ε_u). The control branch sees the same context as the UNet.
    """
    def one(ctx: Tensor) -> Tensor:
        down, mid = control.residuals(x_t, t, ctx, cond_latent)
        return denoiser.predict_eps(x_t, t, ctx, (down, mid)).float()

    if context_neg is None or cfg <= 1.0:
        return one(context)
    eps_u = one(context_neg)
    eps_c = one(context)
    return eps_u + cfg * (eps_c - eps_u)


def _draw(noise: Sequence[NoiseSource], like: Tensor) -> Tensor:
    """One fp32 N(0, I) draw of ``like``'s shape: image b from ``noise[b]``, moved to like's device."""
    if len(noise) != like.shape[0]:
        raise ValueError(f"need one noise source per image: {len(noise)} for a batch of {like.shape[0]}")
    per_image = (1,) + tuple(like.shape[1:])
    return torch.cat([src.randn(per_image) for src in noise]).to(like.device)


def sample_ccsr_v2(denoiser: Denoiser, control: ControlBranch, cond_latent: Tensor, context: Tensor,
                   context_neg: Tensor | None, settings: CCSRv2Settings, noise: Sequence[NoiseSource], *,
                   eps_fn: EpsFn | None = None, callback: StepCallback | None = None) -> Tensor:
    """CCSR-v2 sampling (see the module docstring); returns the scaled latent x̂0, float32.

    ``cond_latent``: scaled LQ latent c (B, 4, h, w); ``context``/``context_neg``: positive
    and negative text embeddings (B or 1, 77, D); ``context_neg`` is needed when cfg > 1.
    ``noise``: one NoiseSource per image (draw order in the module docstring).
    """
    plan = plan_v2(settings)
    cfg_on = settings.cfg > 1.0
    if cfg_on and context_neg is None:
        raise CCSRSettingsError(f"CCSR cfg = {settings.cfg} needs a negative prompt embedding")
    model: EpsFn = eps_fn or (lambda x, t, c, ctx, neg, g: ccsr_eps(denoiser, control, x, t, c, ctx, neg, g))
    ac = denoiser.alphas_cumprod.float()
    c = cond_latent.float()
    done, step = 0, callback or (lambda _d, _n: None)

    n0 = _draw(noise, c)
    x = q_sample(c, n0, ac[T_START]).to(c.device) if settings.start_point == "lr" else n0
    x0 = x
    if plan.first_call:
        first_ctx = context_neg if (cfg_on and settings.first_step_negative) else context
        eps = model(x, T_START, c, first_ctx, None, 1.0)
        x0 = predict_x0(x, eps, ac[T_START])
        done += 1
        step(done, plan.nfe)
        if not plan.loop:
            return x0
        x = q_sample(x0, _draw(noise, c), ac[plan.tau])
    for t, t_prev in zip(plan.loop, plan.prev):
        eps = model(x, t, c, context, context_neg if cfg_on else None, settings.cfg)
        a_prev = ac[t_prev] if t_prev >= 0 else 1.0
        x, x0 = ddpm_step(x, eps, ac[t], a_prev, _draw(noise, c))
        done += 1
        step(done, plan.nfe)
    return x0


def sample_ccsr_v1(denoiser: Denoiser, control: ControlBranch, cond_latent: Tensor, context: Tensor,
                   settings: CCSRv1Settings, noise: Sequence[NoiseSource], *, context_neg: Tensor | None = None,
                   eps_fn: EpsFn | None = None, callback: StepCallback | None = None) -> Tensor:
    """CCSR-v1 sampling (see the module docstring); returns the scaled latent x̂0, float32.

    ``context``: the empty-prompt embedding (official); ``context_neg`` only for cfg > 1.
    """
    plan = plan_v1(settings, denoiser.alphas_cumprod)
    cfg_on = settings.cfg > 1.0
    if cfg_on and context_neg is None:
        raise CCSRSettingsError(f"CCSR cfg = {settings.cfg} needs a negative prompt embedding")
    model: EpsFn = eps_fn or (lambda x, t, c, ctx, neg, g: ccsr_eps(denoiser, control, x, t, c, ctx, neg, g))
    chain = plan.chain
    c = cond_latent.float()
    neg = context_neg if cfg_on else None
    step = callback or (lambda _d, _n: None)

    last = len(chain.timesteps) - 1
    x = _draw(noise, c)
    eps = model(x, chain.timesteps[last], c, context, neg, settings.cfg)
    x0 = chain.predict_x0(x, eps, last)
    step(1, plan.nfe)
    x = chain.q_sample(x0, _draw(noise, c), plan.tau_index)
    for done, i in enumerate(plan.loop, start=2):
        eps = model(x, chain.timesteps[i], c, context, neg, settings.cfg)
        x0 = chain.predict_x0(x, eps, i)
        x = chain.posterior_step(x, x0, i, _draw(noise, c))
        step(done, plan.nfe)
    return x0


# ================================================================== residual layouts


def to_ldm_control(down: Sequence[Tensor], mid: Tensor) -> dict[str, list[Tensor]]:
    """The residuals in the layout ComfyUI's UNet takes as ``control``.

    ComfyUI's ControlNet returns ``{"middle": [mid], "output": [zc_0, …, zc_11]}`` (zero-conv
    outputs in encoder order) and its UNet pops from the END of each list: ``middle`` once
    after the middle block; ``output`` once per output block, together with ``hs.pop()``
    (the skips, also popped from the end). So ``output[j]`` meets skip j, exactly what
    diffusers does with ``down[j]``: the mapping is ``output = list(down)``,
    ``middle = [mid]``, ``input = []`` (nothing is added inside the encoder). Fresh lists are
    returned on every call because the UNet consumes them.
    """
    return {"input": [], "middle": [mid], "output": list(down)}


# ================================================================== the control-branch module

_CONTROLNET_CLASS: type | None = None

CONTROLNET_ARCH_KEYS = (
    "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type",
    "only_cross_attention", "block_out_channels", "layers_per_block", "downsample_padding",
    "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim",
    "transformer_layers_per_block", "attention_head_dim", "num_attention_heads",
    "use_linear_projection", "upcast_attention", "resnet_time_scale_shift",
)
"""``diffusers.ControlNetModel`` config fields that shape the CCSR control branch. Other
fields of a config.json (``use_vae_encode_condition``, ``_class_name``, the unused
pixel-embedding sizes, anything unknown) are ignored."""
_UNSUPPORTED_CONFIG = ("encoder_hid_dim", "encoder_hid_dim_type", "class_embed_type", "addition_embed_type",
                       "num_class_embeds", "projection_class_embeddings_input_dim", "addition_time_embed_dim")


def _control_net_class() -> type:
    """``CCSRControlNet``: diffusers' ControlNetModel with the pixel-hint embedding replaced by
    ``condition_conv_in`` (Conv2d in→C0, 3×3, bias). Built on first use (imports diffusers)."""
    global _CONTROLNET_CLASS
    if _CONTROLNET_CLASS is not None:
        return _CONTROLNET_CLASS
    from diffusers import ControlNetModel

    class CCSRControlNet(ControlNetModel):
        """The CCSR control branch (v1 and v2): a ControlNet copy of the SD UNet encoder,
        conditioned on the scaled LQ latent through ``condition_conv_in``. State-dict keys are
        those of the official v2 ``controlnet/`` (no ``controlnet_cond_embedding``)."""

        def __init__(self, **config: Any) -> None:
            super().__init__(**config)
            del self.controlnet_cond_embedding
            width = self.config.block_out_channels[0]
            self.condition_conv_in = torch.nn.Conv2d(self.config.in_channels, width, kernel_size=3, padding=1)
            self.register_to_config(use_vae_encode_condition=True)

        def forward(self, sample: Tensor, timestep: Tensor | int, encoder_hidden_states: Tensor,
                    cond_latent: Tensor) -> tuple[list[Tensor], Tensor]:  # type: ignore[override]
            """``(down, mid)`` residuals for scaled latents ``sample`` and ``cond_latent`` (B, 4, h, w)."""
            ts = torch.as_tensor(timestep, device=sample.device)
            if ts.dim() == 0:
                ts = ts[None]
            ts = ts.expand(sample.shape[0])
            emb = self.time_embedding(self.time_proj(ts).to(sample.dtype))
            h = self.conv_in(sample) + self.condition_conv_in(cond_latent)
            skips = [h]
            for block in self.down_blocks:
                if getattr(block, "has_cross_attention", False):
                    h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
                else:
                    h, res = block(hidden_states=h, temb=emb)
                skips.extend(res)
            if getattr(self.mid_block, "has_cross_attention", False):
                h = self.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
            else:
                h = self.mid_block(h, emb)
            down = [zero_conv(s) for zero_conv, s in zip(self.controlnet_down_blocks, skips, strict=True)]
            return down, self.controlnet_mid_block(h)

    CCSRControlNet.__module__ = __name__
    CCSRControlNet.__qualname__ = "CCSRControlNet"
    _CONTROLNET_CLASS = CCSRControlNet
    return CCSRControlNet


def __getattr__(name: str) -> Any:  # PEP 562: ``from sr_core.ccsr import CCSRControlNet`` imports diffusers only then
    if name == "CCSRControlNet":
        return _control_net_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_control_net(config: Mapping[str, Any], device: torch.device | str | None = None):
    """An empty ``CCSRControlNet`` for ``config`` (CONTROLNET_ARCH_KEYS; others ignored), on
    ``device`` ("meta" builds it without allocating)."""
    cls = _control_net_class()
    kwargs = {k: config[k] for k in CONTROLNET_ARCH_KEYS if k in config}
    with torch.device(device or "cpu"):
        return cls(**kwargs)


def load_control_net(weights: ControlWeights, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32):
    """``CCSRControlNet`` with ``weights`` loaded strictly, in eval mode, on ``device``/``dtype``.

    Where the weights already have that dtype and device the module shares their storage (no copy)."""
    net = build_control_net(weights.config, device="meta")
    try:
        net.load_state_dict({k: v.to(dtype) for k, v in weights.state_dict.items()}, strict=True, assign=True)
    except RuntimeError as e:
        raise WeightsError(f"{weights.source}: the control branch does not fit its config: "
                           f"{str(e).strip().splitlines()[-1].strip()}") from None
    return net.to(device=device).eval().requires_grad_(False)  # already in dtype (diffusers warns on .to(dtype))


# ================================================================== weights: data


@dataclass
class ControlWeights:
    """A control branch in our (v2) form: diffusers ControlNet keys with ``condition_conv_in``.

    ``version``: "v1" or "v2" (which release it came from: decides the default sampler);
    ``config``: ControlNetModel architecture fields (CONTROLNET_ARCH_KEYS); ``source``: file.
    """

    version: str
    config: dict[str, Any]
    state_dict: dict[str, Tensor]
    source: str

    def to_ldm(self) -> dict[str, Tensor]:
        """The v1 (ldm ControlNet) layout, keys relative to ``control_model.``: one 8-channel
        ``input_blocks.0.0`` = concat(conv_in, condition_conv_in) along the input channels with
        the SUM of both biases (ccsr.md §9), zero convs as ``zero_convs.*``/``middle_block_out``."""
        sd = dict(self.state_dict)
        cw, cb = sd.pop("condition_conv_in.weight"), sd.pop("condition_conv_in.bias")
        sd["conv_in.weight"] = torch.cat([sd["conv_in.weight"], cw], dim=1)
        sd["conv_in.bias"] = sd["conv_in.bias"] + cb
        return keymap.controlnet_diffusers_to_ldm(sd, self.config)


@dataclass
class DecoderWeights:
    """A GAN-finetuned VAE decoder: ``decoder.*`` and ``post_quant_conv.*`` tensors with
    diffusers ``AutoencoderKL`` names (the encoder is never part of it)."""

    state_dict: dict[str, Tensor]
    source: str
    version: str


@dataclass
class CCSRWeights:
    """What a CCSR weights path holds: the control branch and, where the path has one, the GAN decoder."""

    version: str
    control: ControlWeights
    decoder: DecoderWeights | None
    source: str


# ================================================================== weights: reading files

SAFETENSORS_FORMAT = CCSR_FORMAT
_SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
_EXPECTED = ("expected the CCSR-v2 controlnet/ folder (or its diffusion_pytorch_model.safetensors), the CCSR-v1 "
             "real-world_ccsr.ckpt (or its -fp16/-fp32.safetensors copy), or a file written by convert-weights")
_DECODER_EXPECTED = ("expected a GAN decoder: the CCSR-v2 vae/ folder, the CCSR-v1 checkpoint, a VAE file or a file "
                     "written by convert-weights")
_V1_PREFIX = "control_model."
_V1_DECODER_PREFIX = "first_stage_model."
_LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclass
class _Tensors:
    """The tensors of one file, read lazily where the format allows (safetensors)."""

    source: str
    keys: list[str]
    get: Callable[[str], Tensor]
    meta: dict[str, str] = field(default_factory=dict)


def _open_safetensors(p: Path) -> _Tensors:
    from safetensors import safe_open

    try:
        f = safe_open(str(p), framework="pt", device="cpu")
        keys = list(f.keys())
        meta = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for a damaged header
        raise WeightsError(f"{p}: not a readable safetensors file ({e})") from None
    return _Tensors(str(p), keys, f.get_tensor, dict(meta))


def _load_pickle(p: Path, expected: str = _EXPECTED) -> object:
    """``torch.load(weights_only=True)`` with only the inert Lightning stub allow-listed."""
    try:
        with lightning_stub_allowed():
            return torch.load(str(p), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(p))
    except pickle.UnpicklingError as e:
        msg = str(e)
        if unsafe_global(msg) == LIGHTNING_CALLBACK:
            raise WeightsError(f"{p}: reading this Lightning checkpoint safely needs torch >= 2.5 (found "
                               f"{torch.__version__}); use its .safetensors copy or convert it elsewhere") from None
        if "GLOBAL" in msg or "global" in msg.lower():
            raise WeightsError(
                f"{p}: refused to load: the pickle references {unsafe_global(msg)}, which is not a tensor, a "
                f"plain container or the Lightning callback CCSR-v1 files reference; nothing in it was run. "
                f"Not a CCSR weights file ({expected})") from None
        raise WeightsError(f"{p}: not a readable PyTorch checkpoint ({msg.strip().splitlines()[0]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{p}: not a readable PyTorch checkpoint (truncated or another format: {first})") from None


def _pickle_tensors(p: Path, expected: str = _EXPECTED) -> _Tensors:
    obj = _load_pickle(p, expected)
    if isinstance(obj, Mapping) and "state_dict_unet" in obj and "rank_unet" in obj:
        raise WeightsError(f"{p}: this is an OSEDiff weights file (osediff.pkl), not CCSR; {expected}")
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{p}: holds a {type(obj).__name__}, not a state dict; {expected}")
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if not sd:
        raise WeightsError(f"{p}: contains no tensors; {expected}")
    return _Tensors(str(p), list(sd), sd.__getitem__)


def _open_file(p: Path, expected: str = _EXPECTED) -> _Tensors:
    """The tensors of a safetensors file or a weights-only pickle; ``expected`` ends refusal messages."""
    return _open_safetensors(p) if p.suffix.lower() in _SAFETENSORS_SUFFIXES else _pickle_tensors(p, expected)


_AS_CONTROL = {  # what a file looks like (files.describe_tensors) → what that means for this loader
    "an OSEDiff weights file": "an OSEDiff weights file (osediff.pkl or its .safetensors form)",
    "a standard ControlNet (pixel-hint input)": "a standard ControlNet with a pixel-hint input (input_hint_block or "
                                                "controlnet_cond_embedding), not CCSR's control branch (which has "
                                                "condition_conv_in)",
    "a Stable Diffusion checkpoint": "a Stable Diffusion checkpoint (UNet, VAE, text encoder) without a CCSR control "
                                     "branch (control_model.*)",
    "an SDXL checkpoint": "a Stable Diffusion checkpoint (SDXL) without a CCSR control branch (control_model.*)",
    "a VAE": "a VAE (use it as the GAN decoder, not as the control branch)",
    "a UNet": "a UNet, not a ControlNet",
}


def _describe(keys: Iterable[str], meta: Mapping[str, str]) -> str:
    """What a file that is not a CCSR control branch looks like, for the refusal message."""
    if meta.get("format") == SAFETENSORS_FORMAT:
        return "a CCSR file written by convert-weights but without a control branch (a GAN decoder only)"
    looks = describe_tensors(keys, meta)
    if looks.startswith("no known model") or looks == "a file without tensors":
        return f"not a CCSR control branch ({looks})"
    return _AS_CONTROL.get(looks, looks)


# ================================================================== weights: control branch


def controlnet_config(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The architecture fields of a ControlNet config.json (lists become tuples); unknown fields
    are ignored; features the SD 2.x control branch does not have are refused."""
    for k in _UNSUPPORTED_CONFIG:
        if raw.get(k) is not None:
            raise WeightsError(f"{source}: config field {k!r} = {raw[k]!r}: this ControlNet is not for SD 2.x-base "
                               f"(CCSR's control branch has no extra embeddings)")
    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in CONTROLNET_ARCH_KEYS}
    cfg.setdefault("in_channels", 4)
    return cfg


def _infer_config_from_diffusers_keys(sd: Mapping[str, Tensor], source: str) -> dict[str, Any]:
    """ControlNet architecture read from the tensor shapes of a diffusers-keyed state dict."""
    def need(key: str) -> Tensor:
        if key not in sd:
            raise WeightsError(f"{source}: the control branch lacks {key!r}")
        return sd[key]

    channels, types, depth = [], [], 1
    while f"down_blocks.{len(channels)}.resnets.0.conv2.weight" in sd:
        i = len(channels)
        channels.append(int(sd[f"down_blocks.{i}.resnets.0.conv2.weight"].shape[0]))
        attn = f"down_blocks.{i}.attentions.0.proj_in.weight" in sd
        types.append("CrossAttnDownBlock2D" if attn else "DownBlock2D")
    if not channels:
        raise WeightsError(f"{source}: the control branch has no down_blocks.*.resnets.0.conv2.weight")
    layers = 0
    while f"down_blocks.0.resnets.{layers}.conv1.weight" in sd:
        layers += 1
    first_attn = next((i for i, t in enumerate(types) if t.startswith("CrossAttn")), None)
    to_k = need("mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight")
    proj_in = need("mid_block.attentions.0.proj_in.weight")
    if first_attn is not None:
        while f"down_blocks.{first_attn}.attentions.0.transformer_blocks.{depth}.norm1.weight" in sd:
            depth += 1
    return {
        "in_channels": int(need("conv_in.weight").shape[1]),
        "down_block_types": tuple(types),
        "block_out_channels": tuple(channels),
        "layers_per_block": layers,
        "transformer_layers_per_block": depth,
        "attention_head_dim": tuple(max(1, c // 64) for c in channels),
        "cross_attention_dim": int(to_k.shape[1]),
        "use_linear_projection": proj_in.dim() == 2,
    }


def _check_control(sd: Mapping[str, Tensor], config: Mapping[str, Any], source: str) -> None:
    """Every key of the control branch for ``config`` present, nothing else, the two input convs shaped right."""
    try:
        expected = set(keymap.controlnet_keys(config))
    except BaseModelError as e:
        raise WeightsError(f"{source}: the control branch is not SD 2.x's structure ({e})") from None
    expected |= {"condition_conv_in.weight", "condition_conv_in.bias"}
    missing = sorted(expected - set(sd))
    if missing:
        raise WeightsError(f"{source}: the control branch lacks key {missing[0]!r} "
                           f"({len(missing)} missing); the file is incomplete or not CCSR's")
    extra = sorted(set(sd) - expected)
    if extra:
        raise WeightsError(f"{source}: unexpected key {extra[0]!r} in the control branch ({len(extra)} unexpected)")
    width, cin = sd["conv_in.weight"].shape[0], config.get("in_channels", 4)
    for key in ("conv_in.weight", "condition_conv_in.weight"):
        if tuple(sd[key].shape) != (width, cin, 3, 3):
            raise WeightsError(f"{source}: key {key!r} has shape {tuple(sd[key].shape)}, expected {(width, cin, 3, 3)}")
    for key in ("conv_in.bias", "condition_conv_in.bias"):
        if tuple(sd[key].shape) != (width,):
            raise WeightsError(f"{source}: key {key!r} has shape {tuple(sd[key].shape)}, expected {(width,)}")


def control_from_v1(sd: Mapping[str, Tensor], source: str) -> ControlWeights:
    """Convert a v1 ldm ControlNet (keys relative to ``control_model.``) to our v2 form:
    conv_in = W[:, :4] (+ bias), condition_conv_in = W[:, 4:] (zero bias)."""
    from .checkpoint import infer_unet_config

    w = sd.get("input_blocks.0.0.weight")
    if w is None or w.dim() != 4:
        raise WeightsError(f"{source}: the v1 control branch lacks control_model.input_blocks.0.0.weight")
    if w.shape[1] != 8:
        raise WeightsError(f"{source}: control_model.input_blocks.0.0.weight takes {w.shape[1]} input channels; "
                           f"CCSR-v1's takes 8 (noisy latent + LQ latent)")
    try:
        unet_cfg = infer_unet_config(sd)
    except BaseModelError as e:
        raise WeightsError(f"{source}: the v1 control branch is not SD 2.x's structure ({e})") from None
    config = controlnet_config({**unet_cfg, "in_channels": 4}, source)
    try:
        out = keymap.controlnet_ldm_to_diffusers(sd, config)
    except BaseModelError as e:
        raise WeightsError(f"{source}: control_model.* does not form CCSR-v1's control branch: {e}") from None
    w8 = out.pop("conv_in.weight")
    bias = out["conv_in.bias"]
    out["conv_in.weight"] = w8[:, :4].clone()
    out["condition_conv_in.weight"] = w8[:, 4:].clone()
    out["condition_conv_in.bias"] = torch.zeros_like(bias)
    _check_control(out, config, source)
    return ControlWeights("v1", config, out, source)


def _control_from_tensors(f: _Tensors) -> tuple[str, ControlWeights]:
    """Classify a file and read its control branch; WeightsError saying what the file is otherwise."""
    keys = f.keys
    if f.meta.get("format") == SAFETENSORS_FORMAT and any(k.startswith("controlnet.") for k in keys):
        try:
            config = controlnet_config(json.loads(f.meta["controlnet_config"]), f.source)
            version = f.meta["ccsr_version"]
        except (KeyError, ValueError) as e:
            raise WeightsError(f"{f.source}: CCSR safetensors metadata is incomplete ({e})") from None
        sd = {k[len("controlnet."):]: f.get(k) for k in keys if k.startswith("controlnet.")}
        _check_control(sd, config, f.source)
        return "ours", ControlWeights(version, config, sd, f.source)
    if any(k.startswith(_V1_PREFIX) for k in keys):
        if any(k.startswith(_V1_PREFIX + "input_hint_block.") for k in keys):
            raise WeightsError(f"{f.source}: {_describe(keys, f.meta)}; {_EXPECTED}")
        sd = {k[len(_V1_PREFIX):]: f.get(k) for k in keys if k.startswith(_V1_PREFIX)}
        return "v1", control_from_v1(sd, f.source)
    bare_ldm = "zero_convs.0.0.weight" in keys and "input_blocks.0.0.weight" in keys
    if bare_ldm and "input_hint_block.0.weight" not in keys:
        return "v1", control_from_v1({k: f.get(k) for k in keys}, f.source)  # a bare v1 control_model
    if "condition_conv_in.weight" in keys and "controlnet_cond_embedding.conv_in.weight" not in keys:
        sd = {k: f.get(k) for k in keys}
        config = _infer_config_from_diffusers_keys(sd, f.source)
        _check_control(sd, config, f.source)
        return "v2", ControlWeights("v2", config, sd, f.source)
    raise WeightsError(f"{f.source}: {_describe(keys, f.meta)}; {_EXPECTED}")


def _weights_file_in(folder: Path) -> Path | None:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_config(folder: Path) -> dict[str, Any]:
    p = folder / "config.json"
    try:
        cfg = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{p}: unreadable config ({e})") from None
    if not isinstance(cfg, dict):
        raise WeightsError(f"{p}: config is not a JSON object")
    return cfg


def _subfolder(folder: Path, name: str) -> Path | None:
    for child in (folder / name, folder / name.capitalize(), folder / name.upper()):
        if child.is_dir():
            return child
    return None


def _control_from_folder(folder: Path) -> ControlWeights:
    """A diffusers ``controlnet/`` folder: config.json + diffusion_pytorch_model.safetensors (or .bin)."""
    cfg_raw = _read_config(folder)
    cls = cfg_raw.get("_class_name")
    if cls not in (None, "ControlNetModel"):
        raise WeightsError(f"{folder}: this is a diffusers {cls} folder, not a ControlNet; {_EXPECTED}")
    wfile = _weights_file_in(folder)
    if wfile is None:
        raise WeightsError(f"{folder}: no diffusion_pytorch_model.safetensors (or .bin) next to config.json")
    check_weights_path(wfile, "ControlNet weights file")
    if cfg_raw.get("use_vae_encode_condition") is False:
        raise WeightsError(f"{folder / 'config.json'}: use_vae_encode_condition is false: a ControlNet with a "
                           f"pixel-hint embedding, not CCSR's control branch (which conditions on the LQ latent)")
    f = _open_file(wfile)
    if "controlnet_cond_embedding.conv_in.weight" in f.keys:
        raise WeightsError(f"{wfile}: {_describe(f.keys, {})}; {_EXPECTED}")
    if "condition_conv_in.weight" not in f.keys:
        raise WeightsError(f"{wfile}: {_describe(f.keys, f.meta)}; {_EXPECTED}")
    config = controlnet_config(cfg_raw, str(folder))
    sd = {k: f.get(k) for k in f.keys}
    _check_control(sd, config, str(wfile))
    return ControlWeights("v2", config, sd, str(folder))


# ================================================================== weights: GAN decoder


def _fix_legacy_attention(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for k, v in sd.items():
        head, sep, tail = k.partition(".mid_block.attentions.0.")
        if sep:
            name, _, param = tail.partition(".")
            tail = f"{_LEGACY_VAE_ATTENTION.get(name, name)}.{param}"
        out[head + sep + tail] = v
    return out


def _decoder_from_ldm(sd: Mapping[str, Tensor], source: str, version: str) -> DecoderWeights:
    """ldm ``decoder.*`` + ``post_quant_conv.*`` → diffusers names (sizes read from the shapes)."""
    levels = 0
    while f"decoder.up.{levels}.block.0.conv2.weight" in sd:
        levels += 1
    layers = 0
    while f"decoder.up.0.block.{layers}.conv1.weight" in sd:
        layers += 1
    if not levels or layers < 2:
        raise WeightsError(f"{source}: the VAE decoder has no decoder.up.*.block.* layers")
    widths = tuple(int(sd[f"decoder.up.{i}.block.0.conv2.weight"].shape[0]) for i in range(levels))
    config = {"block_out_channels": widths, "layers_per_block": layers - 1}
    try:
        out = keymap.vae_decoder_ldm_to_diffusers(sd, config)
    except BaseModelError as e:
        raise WeightsError(f"{source}: not an SD VAE decoder: {e}") from None
    return DecoderWeights(out, source, version)


def _decoder_from_tensors(f: _Tensors, version_hint: str = "vae") -> DecoderWeights:
    keys = f.keys
    if f.meta.get("format") == SAFETENSORS_FORMAT:
        sd = {k[len("vae."):]: f.get(k) for k in keys if k.startswith("vae.")}
        if not sd:
            raise WeightsError(f"{f.source}: this CCSR file holds the control branch but no GAN decoder; "
                               f"give the decoder separately (the v2 vae/ folder or the v1 checkpoint)")
        return DecoderWeights(sd, f.source, f.meta.get("ccsr_version", "v2"))
    if any(k.startswith(_V1_PREFIX) for k in keys):
        sd = {k[len(_V1_DECODER_PREFIX):]: f.get(k) for k in keys
              if k.startswith((_V1_DECODER_PREFIX + "decoder.", _V1_DECODER_PREFIX + "post_quant_conv."))}
        if not sd:
            raise WeightsError(f"{f.source}: this CCSR-v1 file has no first_stage_model.decoder.* (GAN decoder)")
        return _decoder_from_ldm(sd, f.source, "v1")
    if any(k.startswith("model.diffusion_model.") for k in keys):
        raise WeightsError(f"{f.source}: this is a Stable Diffusion checkpoint; its VAE decoder is the stock one, not "
                           f"CCSR's GAN decoder (expected the v2 vae/ folder, the v1 checkpoint or a VAE file)")
    if "condition_conv_in.weight" in keys or "zero_convs.0.0.weight" in keys:
        raise WeightsError(f"{f.source}: this is a CCSR control branch without a GAN decoder; give the decoder "
                           f"separately (the v2 vae/ folder or the v1 checkpoint)")
    if "decoder.up.0.block.0.conv1.weight" in keys:
        sd = {k: f.get(k) for k in keys if k.startswith(("decoder.", "post_quant_conv."))}
        return _decoder_from_ldm(sd, f.source, version_hint)
    if "decoder.conv_in.weight" in keys and any(k.startswith("decoder.up_blocks.") for k in keys):
        sd = _fix_legacy_attention({k: f.get(k) for k in keys if k.startswith(("decoder.", "post_quant_conv."))})
        return DecoderWeights(sd, f.source, version_hint)
    if f.meta.get("format") == "osediff-v1" or any("lora" in k.lower() for k in keys):
        raise WeightsError(f"{f.source}: {_describe(keys, f.meta)}, not a VAE decoder")
    raise WeightsError(f"{f.source}: not a VAE decoder: it looks like {describe_tensors(keys, f.meta)}; "
                       f"{_DECODER_EXPECTED}")


def _decoder_from_folder(folder: Path) -> DecoderWeights:
    cfg = _read_config(folder)
    if cfg.get("_class_name") not in (None, "AutoencoderKL"):
        raise WeightsError(f"{folder}: this is a diffusers {cfg.get('_class_name')} folder, not a VAE (AutoencoderKL)")
    wfile = _weights_file_in(folder)
    if wfile is None:
        raise WeightsError(f"{folder}: no diffusion_pytorch_model.safetensors (or .bin) next to config.json")
    check_weights_path(wfile, "VAE weights file")
    d = _decoder_from_tensors(_open_file(wfile, _DECODER_EXPECTED), "v2")
    return DecoderWeights(d.state_dict, str(folder), "v2")


def load_ccsr_decoder(path: str | os.PathLike) -> DecoderWeights:
    """Read a GAN decoder: the v2 ``vae/`` folder (or a folder holding ``vae/``), the v1 checkpoint
    (.ckpt or its safetensors copies), a VAE file (diffusers or ldm names), or our safetensors form.
    Only ``decoder.*`` and ``post_quant_conv.*`` are kept."""
    p = Path(path)
    check_weights_path(p, "GAN decoder")
    if p.is_dir():
        if (p / "config.json").is_file():
            return _decoder_from_folder(p)
        sub = _subfolder(p, "vae")
        if sub is None:
            raise WeightsError(f"{p}: not a VAE folder (no config.json and no vae/ subfolder)")
        return _decoder_from_folder(sub)
    return _decoder_from_tensors(_open_file(p, _DECODER_EXPECTED))


# ================================================================== weights: entry points


def load_ccsr_weights(path: str | os.PathLike) -> CCSRWeights:
    """Read CCSR weights; WeightsError naming the file (and first bad key) for anything else.

    Accepts: the v2 ``controlnet/`` folder (config.json + diffusion_pytorch_model.safetensors or
    .bin), a folder holding ``controlnet/`` (and ``vae/``: the GAN decoder), a ``controlnet/``
    folder with a sibling ``vae/`` (the official ``preset/models`` layout), a single-file v2
    controlnet .safetensors; the v1 ``real-world_ccsr.ckpt`` (Lightning pickle, weights-only with
    the inert callback stub) and its ``-fp16``/``-fp32.safetensors`` copies (control branch and
    GAN decoder); our ``convert-weights`` safetensors. ``decoder`` is None where the path has none.
    """
    p = Path(path)
    check_weights_path(p, "CCSR weights")
    if p.is_dir():
        if (p / "config.json").is_file():
            control = _control_from_folder(p)
            vae = _subfolder(p.parent, "vae")
        else:
            sub = _subfolder(p, "controlnet")
            if sub is None:
                raise WeightsError(f"{p}: not a CCSR folder (no config.json and no controlnet/ subfolder); {_EXPECTED}")
            control = _control_from_folder(sub)
            vae = _subfolder(p, "vae")
        decoder = _decoder_from_folder(vae) if vae is not None and (vae / "config.json").is_file() else None
        return CCSRWeights("v2", control, decoder, str(p))
    f = _open_file(p)
    kind, control = _control_from_tensors(f)
    decoder = None
    if kind == "ours" and any(k.startswith("vae.") for k in f.keys):
        decoder = _decoder_from_tensors(f)
    elif kind == "v1" and any(k.startswith(_V1_DECODER_PREFIX + "decoder.") for k in f.keys):
        decoder = _decoder_from_tensors(f)
    return CCSRWeights(control.version, control, decoder, str(p))


def save_ccsr_safetensors(weights: CCSRWeights, path: str | os.PathLike) -> None:
    """Write our safetensors form: ``controlnet.<v2 key>`` and ``vae.<decoder key>`` tensors (dtypes
    kept), metadata ``format`` = "sr_core-ccsr", ``ccsr_version``, ``controlnet_config`` (JSON)."""
    from safetensors.torch import save_file

    tensors = {f"controlnet.{k}": v.contiguous() for k, v in weights.control.state_dict.items()}
    if weights.decoder is not None:
        tensors.update({f"vae.{k}": v.contiguous() for k, v in weights.decoder.state_dict.items()})
    meta = {"format": SAFETENSORS_FORMAT, "ccsr_version": weights.version,
            "controlnet_config": json.dumps(weights.control.config),
            "control_source": Path(weights.control.source).name,
            "decoder_source": Path(weights.decoder.source).name if weights.decoder else ""}
    save_file(tensors, str(path), metadata=meta)


def convert_ccsr_weights(src: str | os.PathLike, dst: str | os.PathLike, *,
                         decoder: str | os.PathLike | None = None) -> CCSRWeights:
    """Convert official CCSR weights (any form :func:`load_ccsr_weights` reads) to one safetensors
    file: v1 → the control branch in v2 form + the GAN decoder in diffusers names; v2 folder →
    controlnet + vae decoder in one file. ``decoder`` adds/replaces the GAN decoder from another
    path. Returns what was written."""
    if Path(src).resolve() == Path(dst).resolve():
        raise WeightsError(f"{dst}: the output would overwrite the input")
    weights = load_ccsr_weights(src)
    if decoder is not None:
        weights = replace(weights, decoder=load_ccsr_decoder(decoder))
    save_ccsr_safetensors(weights, dst)
    return weights
