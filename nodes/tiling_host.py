"""Tiled processing over ComfyUI's models: the SR_TILING settings resolved against ComfyUI's
free memory, the exact tiled VAE on the ldm ``first_stage_model``, tiled UNet / control branch.

Nothing here changes the picture of the VAE (GroupNorm statistics are whole-image); UNet
tiles are a blend of overlapping windows (documented in sr_core.tiling).
"""
from __future__ import annotations

import torch
from torch import Tensor

import comfy.model_management as mm
import comfy.utils
import folder_paths

from ..sr_core.sd21 import LATENT_SCALE
from ..sr_core.tiling import ResolvedTiles, TiledDenoiser, TiledVAE, TileSettings, tiles_fit
from .comfy_host import ComfyAutoencoder

FREE_MEMORY_SHARE = 0.8


def resolve_tiles(settings: TileSettings | None, dtype: torch.dtype = torch.float32) -> ResolvedTiles | None:
    """Concrete tiles for ComfyUI's compute device (auto: from its free memory); None = untiled."""
    settings = settings or TileSettings()
    if settings.mode == "off":
        return None
    device = mm.get_torch_device()
    if settings.max_memory is None and (settings.mode == "auto" or not settings.vae_encoder_tile):
        settings = TileSettings(**{**settings.__dict__, "max_memory": int(mm.get_free_memory(device) * FREE_MEMORY_SHARE)})
    return settings.resolve(device, dtype)


def _bar(total_hint: int = 1):
    pbar = comfy.utils.ProgressBar(total_hint)

    def progress(done: int, total: int) -> None:
        pbar.update_absolute(done, total)
        mm.throw_exception_if_processing_interrupted()

    return progress


class ComfyTiledAutoencoder:
    """sr_core's Autoencoder over a ComfyUI VAE, tile by tile with whole-image GroupNorm statistics.
    The VAE's patcher is loaded first, so patches (OSEDiff's encoder LoRA) are in the weights."""

    scale_factor = LATENT_SCALE

    def __init__(self, vae, tiles: ResolvedTiles) -> None:
        self.vae, self.tiles = vae, tiles

    def _tiled(self) -> TiledVAE:
        vae = self.vae
        mm.load_models_gpu([vae.patcher])
        store = mm.intermediate_device() if torch.device(vae.device).type != "cpu" else None
        kwargs = self.tiles.vae_kwargs()
        if kwargs["scratch_dir"] is None:
            kwargs["scratch_dir"] = folder_paths.get_temp_directory()
        return TiledVAE(vae.first_stage_model, **kwargs, device=vae.device, dtype=vae.vae_dtype, store_device=store,
                        progress=_bar())

    def encode_moments(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = self._tiled().encode_moments(pixels)
        out = mm.intermediate_device()
        return mean.float().to(out), logvar.float().to(out)

    def decode(self, raw: Tensor) -> Tensor:
        return self._tiled().decode(raw).float().to(mm.intermediate_device())


def autoencoder_for(vae, tiles: ResolvedTiles | None, image_hw: tuple[int, int]):
    """The plain adapter when the image fits one VAE tile (or tiling is off), the tiled one otherwise."""
    vae_fits, _ = tiles_fit(tiles, image_hw)
    return ComfyAutoencoder(vae) if vae_fits else ComfyTiledAutoencoder(vae, tiles)


def tiled_denoiser(denoiser, tiles: ResolvedTiles | None, image_hw: tuple[int, int]):
    """``denoiser`` itself when the latent fits one tile, a TiledDenoiser around it otherwise."""
    _, unet_fits = tiles_fit(tiles, image_hw)
    if unet_fits:
        return denoiser
    return TiledDenoiser(denoiser, tiles.latent_tile, tiles.overlap, tiles.weighting, tiles.batch_tiles,
                         progress=_bar())
