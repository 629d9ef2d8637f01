"""The OSEDiff image pipeline in stages, shared by the CLI and the ComfyUI nodes.

    prepare_lq   images (N,3,H,W) [0,1] → upscaled reference (N,3,sH,sW) [0,1] and the
                 padded model input (N,3,H8,W8) [-1,1]   (H8, W8: sH, sW rounded up to 8)
    encode_lq    → raw LQ latent (N,4,H8/8,W8/8) (ComfyUI LATENT convention: unscaled)
    sample_osediff → raw latent of the x0 estimate
    decode_to_image → (N,3,sH,sW) [0,1]: decode, clamp, crop the padding, color fix

Sizes that are not multiples of 8: the upscaled image is padded (reflect) on the bottom
and right to the next multiple of 8 and the decoded result is cropped back, so the output
is exactly round(scale·H) × round(scale·W). (The official code squeezes to the lower
multiple of 8 instead, which changes the output size.)
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .color import apply_color_fix
from .errors import InputImageError, SizeLimitError
from .images import LATENT_FACTOR, check_pixels, crop_to, pad_to_multiple, resize, scaled_size
from .noise import NoiseSource, latent_from_moments
from .osediff import one_step_x0
from .protocols import Autoencoder, Denoiser

MIN_SIDE = 8
"""Smallest upscaled side in pixels (one latent pixel)."""
MAX_UNTILED_OUTPUT_PIXELS = 2048 * 2048
"""Largest output (pixels of the upscaled image) processed in one piece, before tiling exists."""

SMALL_IMAGE_PIXELS = 4 * 1024 * 1024
"""Upscaled images up to this many pixels are resized and colour-fixed on the VAE's device."""

Progress = Callable[[str], None]


def work_device(vae: object, pixels: int) -> torch.device:
    """Where the resize and the colour fix of an upscaled image of ``pixels`` pixels run: the
    VAE's device up to :data:`SMALL_IMAGE_PIXELS` (on a GPU they take a fraction of a CPU's
    time, and the model input is then already there), the CPU above (GPU memory is left to
    the tiles). Same picture either way, up to float rounding."""
    dev = getattr(vae, "device", None)
    return torch.device(dev) if dev is not None and pixels <= SMALL_IMAGE_PIXELS else torch.device("cpu")


@dataclass
class PreparedLQ:
    """``reference``: upscaled input (N,3,sH,sW) in [0,1], the color-fix reference.
    ``pixels``: padded model input (N,3,H8,W8) in [-1,1]. ``size``: (sH, sW)."""

    reference: Tensor
    pixels: Tensor
    size: tuple[int, int]


def prepare_lq(images: Tensor, scale: float, resize_method: str = "bicubic",
               max_output_pixels: int | None = MAX_UNTILED_OUTPUT_PIXELS, name: str = "image",
               vae: object | None = None) -> PreparedLQ:
    """Upscale ``images`` (N,3,H,W) in [0,1] by ``scale`` and pad to multiples of 8: on
    :func:`work_device` of ``vae`` (the VAE that will encode them), or on the images' own
    device without one."""
    check_pixels(images, name)
    if not scale > 0:
        raise InputImageError(f"{name}: scale must be positive, got {scale}")
    h, w = images.shape[-2:]
    sh, sw = scaled_size(h, w, scale)
    if sh < MIN_SIDE or sw < MIN_SIDE:
        raise InputImageError(
            f"{name}: {w}×{h} px at scale {scale:g} gives {sw}×{sh} px; each side of the upscaled "
            f"image must be at least {MIN_SIDE} px (use a larger scale or a larger image)")
    if max_output_pixels is not None and sh * sw > max_output_pixels:
        raise SizeLimitError(
            f"{name}: output {sw}×{sh} px ({sh * sw / 1e6:.1f} MP) exceeds the untiled limit of "
            f"{max_output_pixels / 1e6:.1f} MP; use a smaller scale or split the image")
    up = resize(images if vae is None else images.to(work_device(vae, sh * sw)), (sh, sw), resize_method)
    return PreparedLQ(reference=up, pixels=pad_to_multiple(up * 2.0 - 1.0, LATENT_FACTOR), size=(sh, sw))


def encode_lq(vae: Autoencoder, pixels: Tensor, latent_mode: str = "mean",
              noise: Sequence[NoiseSource] | None = None) -> Tensor:
    """Raw LQ latent (N,4,h,w) float32 of padded pixels in [-1,1]: posterior mean or a seeded sample."""
    mean, logvar = vae.encode_moments(pixels)
    return latent_from_moments(mean, logvar, latent_mode, noise)


def sample_osediff(denoiser: Denoiser, raw_latent: Tensor, context: Tensor, scale_factor: float) -> Tensor:
    """One OSEDiff step on a raw latent; returns the raw latent of x0 (float32)."""
    z = raw_latent.float() * scale_factor
    return one_step_x0(denoiser, z, context) / scale_factor


def decode_to_image(vae: Autoencoder, raw_latent: Tensor, size: tuple[int, int],
                    reference: Tensor | None, color_fix: str = "adain") -> Tensor:
    """Decode, clamp to [-1,1], map to [0,1], crop to ``size``, then color-fix against
    ``reference`` (on the decoded pixels' device); returns float32 on the CPU."""
    pixels = vae.decode(raw_latent).float().clamp(-1.0, 1.0)
    if not torch.isfinite(pixels).all():
        raise InputImageError("decoded image has NaN values (fp16 overflow?); use --precision fp32 or bf16")
    image = crop_to(pixels * 0.5 + 0.5, *size)
    if reference is None or color_fix == "none":
        return image.clamp(0.0, 1.0).cpu()
    return apply_color_fix(image, reference.to(image.device), color_fix).cpu()


def upscale_osediff(host_unet: Denoiser, host_vae: Autoencoder, images: Tensor, context: Tensor, *,
                    scale: float = 4.0, color_fix: str = "adain", latent_mode: str = "mean", seed: int = 0,
                    resize_method: str = "bicubic", max_output_pixels: int | None = MAX_UNTILED_OUTPUT_PIXELS,
                    progress: Progress | None = None, name: str = "image") -> Tensor:
    """The whole OSEDiff chain for a batch (N,3,H,W) in [0,1] → (N,3,sH,sW) in [0,1].

    Every image of the batch uses ``seed`` (so an image gives the same result alone or in a
    batch); with ``latent_mode="mean"`` nothing is random.
    """
    step = progress or (lambda _s: None)
    prep = prepare_lq(images, scale, resize_method, max_output_pixels, name, vae=host_vae)
    step("encode")
    noise = [NoiseSource(seed) for _ in range(images.shape[0])] if latent_mode == "sample" else None
    raw = encode_lq(host_vae, prep.pixels, latent_mode, noise)
    step("unet")
    x0 = sample_osediff(host_unet, raw, context, host_vae.scale_factor)
    step("decode")
    out = decode_to_image(host_vae, x0, prep.size, prep.reference, color_fix)
    step("done")
    return out
