"""Our path: sr_core's pipelines over :class:`~sr_core.diffusers_host.DiffusersSD21`.

The host holds the OSEDiff LoRA merged into its weights (``apply_osediff``), caches the text
embedding of a repeated prompt (``encode_prompt``), encodes the LQ image once (CCSR's
control branch and sampler share that latent), and gets the levers of
:mod:`sr_core.perf` that paid on the device (:func:`sr_core.perf.default_options`).

Stage times come from the pipelines' own ``progress`` callbacks ("encode", "unet"/"sample",
"decode", "done" mark the boundaries), UNet / control-branch calls from thin proxies around
the host objects, and the colour fix from a timing wrapper around the pipeline module's
``apply_color_fix`` (installed for the run only). The code that runs is sr_core's.

OSEDiff: untiled → :func:`sr_core.pipeline.upscale_osediff`; tiled →
:func:`sr_core.tiled_pipeline.upscale_osediff_tiled` (TiledVAE + TiledDenoiser, tiles batched).
CCSR: the stages of :func:`sr_core.ccsr_pipeline.upscale_ccsr` (prepare_lq, encode_lq,
sample_ccsr, decode_to_image) composed here because ``upscale_ccsr`` takes no ``eps_fn``
(needed for batched CFG and for latent tiles through :func:`sr_core.tiling.tiled_call`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

import sr_core.pipeline as sr_pipeline
from sr_core.ccsr import CCSRv2Settings, ccsr_eps
from sr_core.noise import NoiseSource
from sr_core.perf import PerfOptions, batched_cfg_eps
from sr_core.pipeline import decode_to_image, encode_lq, prepare_lq, upscale_osediff
from sr_core.tiling import TilePlan, TileSettings, repeat_for_tiles, tiled_call

from .measure import Recorder


class _TimedDenoiser:
    """A Denoiser whose predict_eps calls are timed as "unet"."""

    def __init__(self, inner, rec: Recorder) -> None:
        self.inner = inner
        self.alphas_cumprod = inner.alphas_cumprod
        self.predict_eps = rec.timed("unet", inner.predict_eps)


class _TimedControl:
    def __init__(self, inner, rec: Recorder) -> None:
        self.inner = inner
        self.residuals = rec.timed("control", inner.residuals)


@contextlib.contextmanager
def _timed_color_fix(rec: Recorder) -> Iterator[None]:
    orig = sr_pipeline.apply_color_fix
    sr_pipeline.apply_color_fix = rec.timed("color_fix", orig)
    try:
        yield
    finally:
        sr_pipeline.apply_color_fix = orig


def _progress(rec: Recorder, names: dict[str, str]):
    def step(stage: str) -> None:
        if stage == "done":
            rec.mark(None)
        else:
            rec.mark(names.get(stage, stage))
    return step


def latent_plan(h: int, w: int, tiles: TileSettings | None, device, dtype) -> TilePlan | None:
    """The latent tile plan the tiled path will use for an (h, w) latent (None: one call)."""
    if tiles is None or tiles.mode == "off":
        return None
    r = tiles.resolve(device, dtype)
    if r.latent_tile is None or h * w <= r.latent_tile ** 2:
        return None
    return TilePlan.build(h, w, r.latent_tile, r.overlap)


class Ours:
    """Optimised OSEDiff and CCSR runs. ``host``: DiffusersSD21 (merged, levers applied);
    ``vae``: the Autoencoder to use untiled (the host, or a SplitPrecisionVAE); ``control``:
    a DiffusersControlBranch (CCSR)."""

    def __init__(self, host, vae, options: PerfOptions, control=None) -> None:
        self.host, self.vae, self.options, self.control = host, vae, options, control

    @torch.no_grad()
    def osediff(self, lr: Tensor, prompt: str, rec: Recorder, *, tiles: TileSettings | None,
                scale: float = 4.0) -> tuple[Tensor, dict]:
        from sr_core.tiled_pipeline import upscale_osediff_tiled

        unet = _TimedDenoiser(self.host, rec)
        rec.begin()
        rec.mark("text")
        ctx = self.host.encode_prompt(prompt)
        rec.mark("prepare")
        progress = _progress(rec, {"encode": "encode", "unet": "sample", "decode": "decode"})
        with _timed_color_fix(rec):
            if tiles is None:
                out = upscale_osediff(unet, self.vae, lr, ctx, scale=scale, color_fix="adain", latent_mode="mean",
                                      max_output_pixels=None, progress=progress)
            else:
                out = upscale_osediff_tiled(unet, self.host, lr, ctx, tiles=tiles, scale=scale, color_fix="adain",
                                            latent_mode="mean", max_output_pixels=None, progress=progress)
        rec.end()
        h, w = (round(lr.shape[-2] * scale) + 7) // 8, (round(lr.shape[-1] * scale) + 7) // 8
        plan = latent_plan(h, w, tiles, self.host.device, self.host.dtype)
        return out, {"tiles": len(plan) if plan else 1}

    @torch.no_grad()
    def ccsr(self, lr: Tensor, pos: str, neg: str, settings: CCSRv2Settings, rec: Recorder, *,
             tiles: TileSettings | None, scale: float = 4.0, seed: int = 0) -> tuple[Tensor, dict]:
        from sr_core.ccsr_pipeline import sample_ccsr
        from sr_core.tiled_pipeline import make_tiled_vae

        host = self.host
        unet, control = _TimedDenoiser(host, rec), _TimedControl(self.control, rec)
        base = batched_cfg_eps(unet, control) if self.options.cfg_batch else \
            (lambda x, t, c, ctx, neg_, g: ccsr_eps(unet, control, x, t, c, ctx, neg_, g))
        rec.begin()
        rec.mark("text")
        ctx_pos = host.encode_prompt(pos)
        ctx_neg = host.encode_prompt(neg) if settings.cfg > 1.0 else None
        rec.mark("prepare")
        prep = prepare_lq(lr, scale, "bicubic", None, vae=self.vae)  # where upscale_ccsr resizes
        vae = self.vae
        plan = None
        if tiles is not None:
            resolved = tiles.resolve(host.device, host.dtype)
            vae = make_tiled_vae(host, resolved)
            h, w = prep.pixels.shape[-2] // 8, prep.pixels.shape[-1] // 8
            plan = latent_plan(h, w, tiles, host.device, host.dtype)
        rec.mark("encode")
        raw = encode_lq(vae, prep.pixels, "mean")  # once: the control branch and the sampler share it
        rec.mark("sample")
        noise = [NoiseSource(seed) for _ in range(lr.shape[0])]
        eps_fn = base
        if plan is not None:
            k = resolved.batch_tiles
            weighting = resolved.weighting

            def tiled_eps(x, t, c, ctx, neg_, g):
                def fn(xt: Tensor, ct: Tensor) -> Tensor:
                    return base(xt, t, ct, repeat_for_tiles(ctx, xt.shape[0]),
                                None if neg_ is None else repeat_for_tiles(neg_, xt.shape[0]), g)
                return tiled_call(fn, [x, c], plan, weighting, k)
            eps_fn = tiled_eps
        x0 = sample_ccsr(unet, control, raw, ctx_pos, ctx_neg, settings, noise, vae.scale_factor, eps_fn=eps_fn)
        rec.mark("decode")
        with _timed_color_fix(rec):
            out = decode_to_image(vae, x0, prep.size, prep.reference, "adain")
        rec.end()
        return out, {"tiles": len(plan) if plan else 1}
