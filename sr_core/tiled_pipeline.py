"""The OSEDiff chain with tiled VAE and tiled UNet, for images of any size.

Same stages, semantics and noise protocol as :func:`.pipeline.upscale_osediff`
(prepare_lq → encode_lq → sample_osediff → decode_to_image), with the host's VAE replaced
by :class:`.tiling.TiledVAE` (exact tiled encode/decode) and its UNet by
:class:`.tiling.TiledDenoiser` (latent tiles, blended ε). Noise (``latent_mode="sample"``)
is drawn by :func:`.noise.latent_from_moments` over the whole latent after the tiled
encode, never per tile, so a seed gives the same draw tiled or not.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .pipeline import MAX_UNTILED_OUTPUT_PIXELS, Progress, upscale_osediff
from .protocols import Autoencoder, Denoiser
from .tiling import Backoff, ResolvedTiles, TiledDenoiser, TiledVAE, TileProgress, TileSettings


def _vae_dtype_device(vae: Any) -> tuple[torch.device, torch.dtype]:
    module = vae.vae if hasattr(vae, "vae") and isinstance(vae.vae, torch.nn.Module) else vae
    p = next(module.parameters())
    device = getattr(vae, "device", None) or p.device
    return torch.device(device), p.dtype


def make_tiled_vae(host_vae_modules: Any, tiles: ResolvedTiles, *, progress: TileProgress | None = None,
                   on_backoff: Backoff | None = None, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> TiledVAE:
    """A :class:`TiledVAE` over ``host_vae_modules`` (diffusers ``AutoencoderKL``, a host with
    ``.vae`` such as DiffusersSD21, or an ldm autoencoder) with the resolved VAE tile sizes."""
    return TiledVAE(host_vae_modules, **tiles.vae_kwargs(), device=device, dtype=dtype, progress=progress,
                    on_backoff=on_backoff)


def make_tiled_denoiser(host_unet: Denoiser, tiles: ResolvedTiles, *, progress: TileProgress | None = None,
                        on_backoff: Backoff | None = None) -> TiledDenoiser:
    """A :class:`TiledDenoiser` over ``host_unet`` with the resolved latent tile geometry."""
    return TiledDenoiser(host_unet, tiles.latent_tile, tiles.overlap, tiles.weighting, tiles.batch_tiles,
                         progress=progress, on_backoff=on_backoff)


def upscale_osediff_tiled(host_unet: Denoiser, host_vae_modules: Any, images: Tensor, context: Tensor, *,
                          tiles: TileSettings, scale: float = 4.0, color_fix: str = "adain",
                          latent_mode: str = "mean", seed: int = 0, resize_method: str = "bicubic",
                          max_output_pixels: int | None = MAX_UNTILED_OUTPUT_PIXELS,
                          progress: Progress | None = None, tile_progress: TileProgress | None = None,
                          on_backoff: Backoff | None = None, name: str = "image") -> Tensor:
    """The whole OSEDiff chain for a batch (N,3,H,W) in [0,1] → (N,3,sH,sW) in [0,1], tiled.

    ``host_vae_modules``: the VAE whose modules are run tile by tile: a diffusers
    ``AutoencoderKL``, a host with ``.vae`` (:class:`~.diffusers_host.DiffusersSD21`) or an
    ldm autoencoder. ``tiles``: :class:`TileSettings`; with ``mode="off"`` this is exactly
    :func:`.pipeline.upscale_osediff` (``host_vae_modules`` must then be an Autoencoder and
    ``max_output_pixels`` applies); otherwise there is no size limit. ``progress(stage)``
    as in the untiled pipeline; ``tile_progress(done, total)`` per UNet tile / VAE tile
    step (it restarts at each stage). Every image of the batch uses ``seed``.
    """
    if tiles.mode == "off":
        if not isinstance(host_vae_modules, Autoencoder):
            host_vae_modules = TiledVAE(host_vae_modules, encoder_tile=1 << 20, decoder_tile=1 << 17, store="memory")
        return upscale_osediff(host_unet, host_vae_modules, images, context, scale=scale, color_fix=color_fix,
                               latent_mode=latent_mode, seed=seed, resize_method=resize_method,
                               max_output_pixels=max_output_pixels, progress=progress, name=name)
    device, dtype = _vae_dtype_device(host_vae_modules)
    resolved = tiles.resolve(device, dtype)
    vae = make_tiled_vae(host_vae_modules, resolved, progress=tile_progress, on_backoff=on_backoff)
    unet = make_tiled_denoiser(host_unet, resolved, progress=tile_progress, on_backoff=on_backoff)
    return upscale_osediff(unet, vae, images, context, scale=scale, color_fix=color_fix, latent_mode=latent_mode,
                           seed=seed, resize_method=resize_method, max_output_pixels=None, progress=progress,
                           name=name)
