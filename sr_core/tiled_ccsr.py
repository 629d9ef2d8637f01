"""CCSR with latent tiles: the control branch and the UNet run per (x_t, condition) tile.

The samplers of :mod:`.ccsr` take an ``eps_fn`` hook; :func:`tiled_ccsr_eps_fn` is the tiled
one: one guided control+UNet evaluation (:func:`.ccsr.ccsr_eps`) per tile of the noisy latent
and of the LQ latent, blended like :class:`.tiling.TiledDenoiser` blends ε̂. All noise stays
whole-latent (drawn by the sampler outside this hook).
"""
from __future__ import annotations

from torch import Tensor

from .ccsr import ControlBranch, EpsFn, ccsr_eps
from .protocols import Denoiser
from .tiling import Backoff, TiledDenoiser, TileProgress, repeat_for_tiles, tiled_call


def tiled_ccsr_eps_fn(denoiser: Denoiser, control: ControlBranch, tiles: TiledDenoiser) -> EpsFn:
    """An :data:`~.ccsr.EpsFn` running ``ccsr_eps`` tile by tile with ``tiles``' geometry
    (latent px tile/overlap, weighting, batch). Small latents (area ≤ tile²) run untiled."""
    def eps_fn(x_t: Tensor, t: int, cond_latent: Tensor, context: Tensor, context_neg: Tensor | None,
               cfg: float) -> Tensor:
        plan = tiles.plan(*x_t.shape[-2:])
        if plan is None:
            return ccsr_eps(denoiser, control, x_t, t, cond_latent, context, context_neg, cfg)

        def fn(x: Tensor, c: Tensor) -> Tensor:
            neg = repeat_for_tiles(context_neg, x.shape[0]) if context_neg is not None else None
            return ccsr_eps(denoiser, control, x, t, c, repeat_for_tiles(context, x.shape[0]), neg, cfg)

        return tiled_call(fn, [x_t, cond_latent], plan, tiles.weighting, tiles.batch_tiles, tiles.progress,
                          on_backoff=tiles.on_backoff)

    return eps_fn


def ccsr_tiles(denoiser: Denoiser, tile: int | None, overlap: int, weighting: str = "cosine", batch_tiles: int = 1,
               progress: TileProgress | None = None, on_backoff: Backoff | None = None) -> TiledDenoiser:
    """The tile geometry holder for :func:`tiled_ccsr_eps_fn` (a TiledDenoiser over ``denoiser``)."""
    return TiledDenoiser(denoiser, tile, overlap, weighting, batch_tiles, progress=progress, on_backoff=on_backoff)
