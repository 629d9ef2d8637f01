"""The CCSR image pipeline (v1 and v2) and the paper's stability metrics.

    upscale_ccsr   images (N,3,H,W) [0,1] → (N,3,round(s·H),round(s·W)) [0,1]

Stages (reusing the OSEDiff pipeline's): :func:`~.pipeline.prepare_lq` (Pillow bicubic
upscale, pad to multiples of 8), :func:`~.pipeline.encode_lq` (posterior mean, or a seeded
sample), c = 0.18215·latent, the v1/v2 sampler, decode (with the GAN decoder when given),
clamp, crop the padding, color fix, and the resize back when the image was processed larger.

Deviations from the official preprocessing (reference/ccsr.md §2.1, §2.2), on purpose:
- Exact output size: we pad to the next multiple of 8 and crop back (v2 squeezes to the
  multiple of 8 below with bicubic and resizes back; v1 squeezes to a multiple of 64 with
  Lanczos and resizes back with Lanczos).
- Small images: the official scripts enlarge inputs so the processed image's short side is
  at least 512 px (v2: LR short side ≥ 512 // scale; v1: ``auto_resize`` to 512) and resize
  the result back. ``process_size`` (default 512) does the same on the upscaled image: if
  its short side is below ``process_size`` the LQ image is upscaled (one bicubic resize
  from the input) to a short side of ``process_size``, processed and color-fixed there, and
  resized back (bicubic) to the exact output size. ``process_size=None`` turns it off; an
  enlargement that would exceed ``max_output_pixels`` (very elongated images) is skipped.
- The color fix runs on float pixels after the clamp (v2: on 8-bit images, truncated;
  v1: before the clamp); outputs are rounded, not truncated, to 8 bits by the writer.
- Latent: posterior mean by default (v2 samples the posterior from an unseeded RNG; v1
  uses the mode = mean). ``latent_mode="sample"`` draws it from the seed.
- The UNet and control branch run in the host's precision; the latent math is fp32
  (official v2 keeps latents in fp16).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .ccsr import (
    CCSRv1Settings,
    CCSRv2Settings,
    ControlBranch,
    EpsFn,
    StepCallback,
    sample_ccsr_v1,
    sample_ccsr_v2,
)
from .errors import InputImageError
from .images import check_pixels, resize, scaled_size
from .noise import NoiseSource
from .pipeline import MAX_UNTILED_OUTPUT_PIXELS, MIN_SIDE, Progress, decode_to_image, encode_lq, prepare_lq
from .protocols import Autoencoder, Denoiser

PROCESS_SIZE = 512
"""Smallest short side (pixels) the official scripts process at (SD 2.1-base's 512)."""


def processing_scale(height: int, width: int, scale: float, process_size: int | None = PROCESS_SIZE) -> float:
    """The scale the model runs at: ``scale``, or larger so that the upscaled short side reaches
    ``process_size`` (None: never larger)."""
    sh, sw = scaled_size(height, width, scale)
    if process_size and min(sh, sw) < process_size:
        return scale * process_size / min(sh, sw)
    return scale


def sample_ccsr(denoiser: Denoiser, control: ControlBranch, raw_latent: Tensor, context_pos: Tensor,
                context_neg: Tensor | None, settings: CCSRv2Settings | CCSRv1Settings,
                noise: Sequence[NoiseSource], scale_factor: float, *, callback: StepCallback | None = None,
                eps_fn: EpsFn | None = None) -> Tensor:
    """Run the sampler the settings' type names on a raw LQ latent; returns the raw latent of x̂0 (fp32).

    ``raw_latent``: unscaled LQ latent (ComfyUI's LATENT convention); ``scale_factor``: 0.18215.
    ``eps_fn``: see :data:`~.ccsr.EpsFn` (the tiled path's hook)."""
    c = raw_latent.float() * scale_factor
    if isinstance(settings, CCSRv1Settings):
        x0 = sample_ccsr_v1(denoiser, control, c, context_pos, settings, noise, context_neg=context_neg,
                            eps_fn=eps_fn, callback=callback)
    elif isinstance(settings, CCSRv2Settings):
        x0 = sample_ccsr_v2(denoiser, control, c, context_pos, context_neg, settings, noise,
                            eps_fn=eps_fn, callback=callback)
    else:
        raise TypeError(f"settings must be CCSRv1Settings or CCSRv2Settings, got {type(settings).__name__}")
    return x0 / scale_factor


def upscale_ccsr(denoiser: Denoiser, vae: Autoencoder, control: ControlBranch, images: Tensor,
                 context_pos: Tensor, context_neg: Tensor | None = None, *,
                 settings: CCSRv2Settings | CCSRv1Settings, seed: int = 0, latent_mode: str = "mean",
                 color_fix: str = "adain", decoder_vae: Autoencoder | None = None, scale: float = 4.0,
                 resize_method: str = "bicubic", process_size: int | None = PROCESS_SIZE,
                 max_output_pixels: int | None = MAX_UNTILED_OUTPUT_PIXELS, progress: Progress | None = None,
                 callback: StepCallback | None = None, eps_fn: EpsFn | None = None, name: str = "image") -> Tensor:
    """The whole CCSR chain for a batch (N,3,H,W) in [0,1] → (N,3,round(s·H),round(s·W)) in [0,1].

    ``vae`` encodes (its encoder is CCSR's); ``decoder_vae`` (the GAN decoder, e.g.
    :class:`~.ccsr_host.GANDecoderVAE`) decodes if given, else ``vae``. ``context_pos`` /
    ``context_neg``: text embeddings (1 or N, 77, D); v2 defaults are
    :data:`~.ccsr.POSITIVE_PROMPT` / :data:`~.ccsr.NEGATIVE_PROMPT`, v1 uses "" and no
    negative. Every image uses ``seed`` (its own NoiseSource), so an image gives the same
    result alone or in a batch. ``progress`` gets stage names, ``callback(done, total)`` the
    model evaluations; ``eps_fn`` replaces the control+UNet evaluation (the tiled path's hook,
    :func:`~.tiled_ccsr.tiled_ccsr_eps_fn`).
    """
    step = progress or (lambda _s: None)
    check_pixels(images, name)
    if not scale > 0:
        raise InputImageError(f"{name}: scale must be positive, got {scale}")
    h, w = images.shape[-2:]
    target = scaled_size(h, w, scale)
    if min(target) < MIN_SIDE:  # before any enlargement for process_size
        prepare_lq(images, scale, resize_method, None, name)  # raises the same message as OSEDiff
    run_scale = processing_scale(h, w, scale, process_size)
    ph, pw = scaled_size(h, w, run_scale)
    if max_output_pixels is not None and ph * pw > max_output_pixels:  # never enlarge past the untiled limit
        run_scale = scale
    prep = prepare_lq(images, run_scale, resize_method, max_output_pixels, name, vae=vae)
    noise = [NoiseSource(seed) for _ in range(images.shape[0])]
    step("encode")
    raw = encode_lq(vae, prep.pixels, latent_mode, noise if latent_mode == "sample" else None)
    step("sample")
    x0 = sample_ccsr(denoiser, control, raw, context_pos, context_neg, settings, noise, vae.scale_factor,
                     callback=callback, eps_fn=eps_fn)
    step("decode")
    out = decode_to_image(decoder_vae or vae, x0, prep.size, prep.reference, color_fix)
    if prep.size != target:
        out = resize(out, target, "bicubic")
    step("done")
    return out


# ================================================================== stability (G-STD, L-STD)

_Y_WEIGHTS = (65.481, 128.553, 24.966)  # ITU-R BT.601 luma of RGB in [0,1] → [16, 235] (pyiqa's y channel)


def y_channel(images: Tensor) -> Tensor:
    """BT.601 luma (N,1,H,W) in [16/255, 235/255] of RGB (N,3,H,W) in [0,1] (pyiqa's ``test_y_channel``)."""
    wts = torch.tensor(_Y_WEIGHTS, dtype=torch.float64).view(1, 3, 1, 1)
    return ((images.double() * wts).sum(1, keepdim=True) + 16.0) / 255.0


def psnr_y(images: Tensor, reference: Tensor) -> Tensor:
    """PSNR (dB) per image on the Y channel, data range 1; (N,) float64."""
    mse = ((y_channel(images) - y_channel(reference)) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-20))


def mean_gradient(images: Tensor) -> Tensor:
    """No-reference sharpness: mean |horizontal| + |vertical| finite difference of the Y
    channel (pixel range [0,1]), per image; (N,) float64."""
    y = y_channel(images)
    gx = (y[..., :, 1:] - y[..., :, :-1]).abs().flatten(1).mean(1)
    gy = (y[..., 1:, :] - y[..., :-1, :]).abs().flatten(1).mean(1)
    return gx + gy


@dataclass
class StabilityResult:
    """``g_std``: per-image std of ``metric`` across runs, averaged over images; ``l_std``:
    per-pixel std across runs (border cropped), averaged over pixels, channels and images;
    ``metric``: "psnr_y" (with a reference) or "mean_gradient" (without);
    ``values``: the metric per (run, image); ``mean``: its mean."""

    g_std: float
    l_std: float
    metric: str
    values: Tensor
    mean: float


def stability_of_outputs(outputs: Sequence[Tensor], reference: Tensor | None = None,
                         border: int = 4) -> StabilityResult:
    """G-STD and L-STD (paper §5, ``cal_iqa``) of R ≥ 2 runs of the same images.

    ``outputs``: R tensors (N,3,H,W) in [0,1] (one per seed). ``reference``: ground truth
    (N,3,H,W) for PSNR (Y channel, as pyiqa); without it the no-reference
    :func:`mean_gradient` is the metric. Standard deviations are population ones (ddof 0,
    numpy's default). L-STD crops ``border`` pixels on each side first.
    """
    if len(outputs) < 2:
        raise InputImageError(f"stability needs at least 2 runs, got {len(outputs)}")
    runs = torch.stack([o.detach().double().cpu() for o in outputs])  # (R, N, 3, H, W)
    if reference is not None:
        values = torch.stack([psnr_y(o, reference.double().cpu()) for o in runs])
        metric = "psnr_y"
    else:
        values = torch.stack([mean_gradient(o) for o in runs])
        metric = "mean_gradient"
    g_std = float(values.std(dim=0, unbiased=False).mean())
    h, w = runs.shape[-2:]
    if h <= 2 * border or w <= 2 * border:
        raise InputImageError(f"stability: images of {w}×{h} px are too small for a {border}-px border crop")
    cropped = runs[..., border:h - border, border:w - border]
    l_std = float(cropped.std(dim=0, unbiased=False).flatten(1).mean(1).mean())
    return StabilityResult(g_std, l_std, metric, values, float(values.mean()))


def stability(run: Callable[[int], Tensor], seeds: Sequence[int] = tuple(range(10)),
              reference: Tensor | None = None, border: int = 4) -> StabilityResult:
    """Run ``run(seed)`` (→ (N,3,H,W) in [0,1]) for each seed (the paper uses 10) and measure
    G-STD / L-STD with :func:`stability_of_outputs`."""
    seeds = list(seeds)
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise InputImageError(f"stability needs at least 2 distinct seeds, got {seeds}")
    return stability_of_outputs([run(s) for s in seeds], reference, border)
