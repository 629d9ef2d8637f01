"""The SR nodes (V3 schema). Thin: every node is a few calls into sr_core and comfy_host.

Node ids and input ids are a public contract (saved workflows store widget values by
position): never rename them, only append new inputs at the end, as optional inputs with a
default (API-format prompts written before they existed must still validate).
"""
from __future__ import annotations

import functools
import os

import torch

import comfy.model_management as mm
import comfy.utils
from comfy_api.v0_0_2 import io

from ..sr_core.ccsr import CCSRv1Settings, CCSRv2Settings, load_ccsr_decoder, load_ccsr_weights, plan_v1, plan_v2
from ..sr_core.ccsr_pipeline import PROCESS_SIZE, processing_scale, sample_ccsr
from ..sr_core.color import COLOR_FIXES
from ..sr_core.errors import InputImageError, SRError
from ..sr_core.images import RESIZE_METHODS, resize, scaled_size
from ..sr_core.noise import NoiseSource, latent_from_moments
from ..sr_core.osediff import OSEDiffWeights, load_osediff_weights
from ..sr_core.pipeline import decode_to_image, prepare_lq, sample_osediff
from .ccsr_host import build_ccsr_model
from .comfy_host import ComfyAutoencoder, SRModel, build_osediff_model, check_host_vae, context_from_conditioning
from .folders import resolve_weights, weight_files
from .tiling_host import autoencoder_for, resolve_tiles, tiled_denoiser
from ..sr_core.tiled_ccsr import tiled_ccsr_eps_fn
from ..sr_core.tiling import OFFICIAL_LATENT_OVERLAP, OFFICIAL_LATENT_TILE, TileSettings

PREFIX = "SRCO_"
CATEGORY = "image/upscaling/diffusion SR"
SRModelType = io.Custom("SR_MODEL")
SRTilingType = io.Custom("SR_TILING")
TILING_TOOLTIP = "from SR Tiling; without it: auto (tiles only what does not fit ComfyUI's free memory)"
MAX_SEED = 0xFFFFFFFFFFFFFFFF
LATENT_SIZE_KEY = "sr_size"  # (H, W) of the upscaled image the latent was encoded from (before padding)
LATENT_TARGET_KEY = "sr_target"  # (H, W) of the final output (CCSR: differs when small inputs were enlarged)
LATENT_LOGVAR_KEY = "sr_logvar"  # posterior log-variance, for latent_mode "sample"
DECODER_CHOICES = ["none", "from weights"]
CCSR_ONLY = "CCSR only (OSEDiff ignores it). "


@functools.lru_cache(maxsize=2)
def _load_weights_cached(path: str, mtime: float, size: int) -> OSEDiffWeights:
    return load_osediff_weights(path)


def load_weights(filename: str) -> OSEDiffWeights:
    path = resolve_weights("osediff", filename)
    st = os.stat(path)
    return _load_weights_cached(path, st.st_mtime, st.st_size)


def _images_nchw(image: torch.Tensor, what: str = "image") -> torch.Tensor:
    """IMAGE (B, H, W, C) in [0, 1] → (B, 3, H, W) float32; alpha dropped, gray repeated.

    InputImageError naming ``what`` for anything else (not 4-D, an empty batch, 2 channels); NaN
    and size checks follow in sr_core.
    """
    if not isinstance(image, torch.Tensor) or image.dim() != 4:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputImageError(f"{what}: expected an IMAGE batch (B, H, W, C), got {shape}")
    if image.shape[0] == 0:
        raise InputImageError(f"{what}: the IMAGE batch is empty (shape {tuple(image.shape)})")
    c = image.shape[-1]
    if c == 1:
        image = image.expand(-1, -1, -1, 3)
    elif c >= 3:
        image = image[..., :3]
    else:
        raise InputImageError(f"{what}: IMAGE has {c} channels; expected RGB (3), RGBA (4) or gray (1)")
    return image.movedim(-1, 1).float().cpu()


# -- functions shared by the chain nodes and the simple node ------------------------------
def load_osediff(model, vae, weights: str) -> SRModel:
    return build_osediff_model(model, vae, load_weights(weights), weights)


def load_ccsr(model, vae, weights: str, decoder: str = "none") -> SRModel:
    loaded = load_ccsr_weights(resolve_weights("ccsr", weights))
    if decoder == "none":
        dec = None
    elif decoder == "from weights":
        if loaded.decoder is None:
            raise SRError(f"decoder 'from weights': {weights} holds no GAN decoder; pick the v2 vae file in "
                          f"models/vae, or 'none'")
        dec = loaded.decoder
    else:
        dec = load_ccsr_decoder(resolve_weights("vae", decoder))
    return build_ccsr_model(model, vae, loaded, weights, dec)


def encode_lq(sr_model: SRModel, image: torch.Tensor, scale: float, resize_method: str,
              process_size: int = PROCESS_SIZE, tiling: TileSettings | None = None) -> tuple[dict, torch.Tensor]:
    images = _images_nchw(image)
    h, w = images.shape[-2:]
    target = scaled_size(h, w, scale)
    run_scale = scale
    if sr_model.method == "ccsr" and min(target) >= 8:  # the official CCSR enlargement of small inputs
        run_scale = processing_scale(h, w, scale, process_size or None)
    prep = prepare_lq(images, run_scale, resize_method, max_output_pixels=None, name="image")
    pbar = comfy.utils.ProgressBar(images.shape[0])
    ae = autoencoder_for(sr_model.vae, resolve_tiles(tiling), prep.size)
    means, logvars = [], []
    for i in range(images.shape[0]):
        mean, logvar = ae.encode_moments(prep.pixels[i:i + 1])
        means.append(mean)
        logvars.append(logvar)
        pbar.update(1)
    latent = {"samples": torch.cat(means), LATENT_LOGVAR_KEY: torch.cat(logvars), LATENT_SIZE_KEY: prep.size,
              LATENT_TARGET_KEY: target}
    return latent, prep.reference.movedim(1, -1)


def ccsr_settings(sr_model: SRModel, steps: int, t_max: float, t_min: float, cfg: float,
                  start_point: str) -> CCSRv1Settings | CCSRv2Settings:
    """The sampler settings for the SR_MODEL's CCSR release, checked before any model call."""
    if sr_model.extras.get("version") == "v1":
        settings = CCSRv1Settings(cfg=cfg)
        plan_v1(settings, sr_model.denoiser().alphas_cumprod)
    else:
        settings = CCSRv2Settings(steps=steps, t_max=t_max, t_min=t_min, cfg=cfg, start_point=start_point)
        plan_v2(settings)
    return settings


def _per_image(context: torch.Tensor | None, i: int, n: int) -> torch.Tensor | None:
    if context is None:
        return None
    return context[i:i + 1] if context.shape[0] == n else context[:1]


def sample(sr_model: SRModel, latent: dict, positive, seed: int, latent_mode: str, negative=None, steps: int = 6,
           t_max: float = 0.6667, t_min: float = 0.5, cfg: float = 4.5, start_point: str = "lr",
           tiling: TileSettings | None = None) -> dict:
    raw = latent["samples"].float()
    context = context_from_conditioning(positive)
    if latent_mode == "sample" and LATENT_LOGVAR_KEY not in latent:
        raise SRError("latent_mode 'sample' needs the LATENT of SR Encode LQ (it carries the posterior variance); "
                      "use 'mean' for other latents")
    denoiser = sr_model.denoiser()
    n = raw.shape[0]
    tiles = resolve_tiles(tiling)
    tiled = tiled_denoiser(denoiser, tiles, (raw.shape[-2] * 8, raw.shape[-1] * 8))
    if sr_model.method == "ccsr":
        settings = ccsr_settings(sr_model, steps, t_max, t_min, cfg, start_point)
        context_neg = context_from_conditioning(negative, "negative") if negative is not None else None
        if settings.cfg > 1 and context_neg is None:
            raise SRError(f"cfg {settings.cfg:g} > 1 needs a negative CONDITIONING (the paper's: 'blurry, dotted, "
                          f"noise, raster lines, unclear, lowres, over-smoothed'); or set cfg to 1")
    pbar = comfy.utils.ProgressBar(n)
    outs = []
    for i in range(n):
        one = raw[i:i + 1]
        noise = [NoiseSource(seed)]
        if latent_mode == "sample":
            one = latent_from_moments(one, latent[LATENT_LOGVAR_KEY][i:i + 1], "sample", noise)
        ctx = _per_image(context, i, n)
        if sr_model.method == "ccsr":
            def tick(done: int, total: int, i: int = i) -> None:
                pbar.update_absolute(i + done / total, n)
                mm.throw_exception_if_processing_interrupted()

            control = sr_model.extras["control"]
            eps_fn = tiled_ccsr_eps_fn(denoiser, control, tiled) if tiled is not denoiser else None
            outs.append(sample_ccsr(denoiser, control, one, ctx, _per_image(context_neg, i, n), settings, noise,
                                    ComfyAutoencoder.scale_factor, callback=tick, eps_fn=eps_fn))
        else:
            outs.append(sample_osediff(tiled, one, ctx, ComfyAutoencoder.scale_factor))
        pbar.update_absolute(i + 1, n)
    out = {k: v for k, v in latent.items() if k not in ("samples", LATENT_LOGVAR_KEY)}
    out["samples"] = torch.cat(outs)
    return out


def decode(latent: dict, reference: torch.Tensor | None, color_fix: str, sr_model: SRModel | None = None,
           vae=None, tiling: TileSettings | None = None) -> torch.Tensor:
    if vae is not None:
        check_host_vae(vae)
    elif sr_model is not None:
        vae = sr_model.extras.get("decoder_vae") or sr_model.vae
    else:
        raise SRError("SR Decode: wire an SR_MODEL or a VAE")
    raw = latent["samples"]
    ae = autoencoder_for(vae, resolve_tiles(tiling), (raw.shape[-2] * 8, raw.shape[-1] * 8))
    ref = _images_nchw(reference, "reference") if reference is not None else None
    if ref is not None:
        size = tuple(ref.shape[-2:])
        if ref.shape[0] not in (1, raw.shape[0]):
            raise SRError(f"reference: batch of {ref.shape[0]} images for {raw.shape[0]} latents")
    else:
        size = tuple(latent.get(LATENT_SIZE_KEY) or (raw.shape[-2] * 8, raw.shape[-1] * 8))
    if size[0] > raw.shape[-2] * 8 or size[1] > raw.shape[-1] * 8:
        raise SRError(f"reference: {size[1]}×{size[0]} px is larger than the latent's {raw.shape[-1] * 8}×"
                      f"{raw.shape[-2] * 8} px; wire the reference IMAGE of the same SR Encode LQ")
    pbar = comfy.utils.ProgressBar(raw.shape[0])
    outs = []
    for i in range(raw.shape[0]):
        r = None if ref is None else ref[i:i + 1] if ref.shape[0] > 1 else ref
        outs.append(decode_to_image(ae, raw[i:i + 1], size, r, color_fix if r is not None else "none"))
        pbar.update(1)
    out = torch.cat(outs)
    target = tuple(latent.get(LATENT_TARGET_KEY) or size)
    if target != tuple(out.shape[-2:]):  # CCSR ran a small input enlarged: back to scale × input
        out = resize(out, target, "bicubic")
    return out.movedim(1, -1)


# -- nodes --------------------------------------------------------------------------------
class LoadOSEDiff(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "LoadOSEDiff",
            display_name="SR Load OSEDiff",
            category=CATEGORY,
            description="Applies OSEDiff (one-step diffusion SR) to the SD 2.1-base MODEL and VAE you loaded. "
                        "Your MODEL and VAE stay unchanged: the SR_MODEL holds patched clones.",
            inputs=[
                io.Model.Input("model", tooltip="MODEL of an SD 2.1-base checkpoint (512 px, epsilon); "
                                                "not SD 1.x, SDXL or the 768-v model"),
                io.Vae.Input("vae", tooltip="VAE of the same checkpoint (its encoder gets OSEDiff's LoRA)"),
                io.Combo.Input("weights", options=weight_files("osediff"),
                               tooltip="OSEDiff weights in models/osediff: the official osediff.pkl "
                                       "(github cswry/OSEDiff, preset/models) or its .safetensors form"),
            ],
            outputs=[SRModelType.Output(display_name="sr_model")],
        )

    @classmethod
    def execute(cls, model, vae, weights) -> io.NodeOutput:
        return io.NodeOutput(load_osediff(model, vae, weights))


class LoadCCSR(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "LoadCCSR",
            display_name="SR Load CCSR",
            category=CATEGORY,
            description="Adds CCSR's control branch (v2, or v1 converted) to the SD 2.1-base MODEL you loaded; the "
                        "UNet itself stays frozen and unchanged. Optional GAN-finetuned decoder for SR Decode.",
            inputs=[
                io.Model.Input("model", tooltip="MODEL of an SD 2.1-base checkpoint (512 px, epsilon)"),
                io.Vae.Input("vae", tooltip="VAE of the same checkpoint (encodes the LQ image)"),
                io.Combo.Input("weights", options=weight_files("ccsr"),
                               tooltip="CCSR weights in models/ccsr: the v2 controlnet/ folder's "
                                       "diffusion_pytorch_model.safetensors (config.json beside it), the v1 "
                                       "real-world_ccsr.ckpt or its .safetensors copies, or a converted file"),
                io.Combo.Input("decoder", options=DECODER_CHOICES + weight_files("vae"), default="none", optional=True,
                               tooltip="GAN-finetuned decoder: none (the VAE decodes), the one inside the weights "
                                       "file (v1 checkpoints), or a file in models/vae (the v2 vae/ "
                                       "diffusion_pytorch_model.safetensors). A VAE Loader wired into SR Decode "
                                       "works too"),
            ],
            outputs=[SRModelType.Output(display_name="sr_model")],
        )

    @classmethod
    def execute(cls, model, vae, weights, decoder="none") -> io.NodeOutput:
        return io.NodeOutput(load_ccsr(model, vae, weights, decoder))


class EncodeLQ(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "EncodeLQ",
            display_name="SR Encode LQ",
            category=CATEGORY,
            description="Upscales the low-quality image by `scale` and encodes it with the SR model's VAE encoder. "
                        "The LATENT (unscaled, ComfyUI convention) goes to SR Sampler; the upscaled IMAGE is the "
                        "color-fix reference for SR Decode.",
            inputs=[
                SRModelType.Input("sr_model", tooltip="from SR Load OSEDiff or SR Load CCSR"),
                io.Image.Input("image", tooltip="low-quality image(s); alpha is dropped"),
                io.Float.Input("scale", default=4.0, min=1.0, max=8.0, step=0.25,
                               tooltip="upscale factor; the output is exactly scale × the input size "
                                       "(padded to multiples of 8 inside, cropped back at decode)"),
                io.Combo.Input("resize_method", options=list(RESIZE_METHODS), default="bicubic",
                               tooltip="filter of the upscale before encoding (bicubic: the official OSEDiff choice)"),
                io.Int.Input("process_size", default=PROCESS_SIZE, min=0, max=4096, step=8, optional=True,
                             tooltip=CCSR_ONLY + "inputs whose upscaled short side is below this are processed "
                                     "enlarged to it and resized back at decode, as the official code (0: off)"),
                SRTilingType.Input("tiling", optional=True, tooltip=TILING_TOOLTIP),
            ],
            outputs=[io.Latent.Output(display_name="latent"), io.Image.Output(display_name="reference")],
        )

    @classmethod
    def execute(cls, sr_model, image, scale, resize_method, process_size=PROCESS_SIZE, tiling=None) -> io.NodeOutput:
        latent, reference = encode_lq(sr_model, image, scale, resize_method, process_size, tiling)
        return io.NodeOutput(latent, reference)


class Sample(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "Sample",
            display_name="SR Sampler",
            category=CATEGORY,
            description="Runs the SR method on the LQ latent through the host model's own apply_model. OSEDiff: one "
                        "UNet call at t=999, no CFG. CCSR: a coarse jump from t=999, then a few DDPM steps with the "
                        "control branch and CFG, output truncated at t_min. The result is the x0 estimate.",
            inputs=[
                SRModelType.Input("sr_model", tooltip="from SR Load OSEDiff or SR Load CCSR"),
                io.Latent.Input("latent", tooltip="from SR Encode LQ (or any SD latent)"),
                io.Conditioning.Input("positive", tooltip="CLIP Text Encode of the SD 2.1 checkpoint's CLIP; an empty "
                                                          "prompt works, tags describing the image help"),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True,
                             tooltip="seed of every random draw; OSEDiff only draws with latent_mode 'sample'"),
                io.Combo.Input("latent_mode", options=["mean", "sample"], default="mean",
                               tooltip="mean: the VAE posterior mean (deterministic); sample: a draw from the "
                                       "posterior with the seed (the official code's choice, unseeded there)"),
                io.Int.Input("steps", default=6, min=1, max=1000, optional=True,
                             tooltip=CCSR_ONLY + "N, the DDPM steps of the plan (v2). Paper configs: two-step = 6 "
                                     "steps, t_max 0.6667, t_min 0.5, cfg 4.5; one-step = 1 step, cfg 1"),
                io.Float.Input("t_max", default=0.6667, min=0.0, max=1.0, step=0.0001, optional=True,
                               tooltip=CCSR_ONLY + "fraction of the plan where the loop starts after the coarse jump "
                                       "(v2; ignored with 1 step)"),
                io.Float.Input("t_min", default=0.5, min=0.0, max=1.0, step=0.0001, optional=True,
                               tooltip=CCSR_ONLY + "fraction of the plan cut at the end: the output is the x0 "
                                       "estimate there (v2; ignored with 1 step)"),
                io.Float.Input("cfg", default=4.5, min=1.0, max=30.0, step=0.1, optional=True,
                               tooltip=CCSR_ONLY + "classifier-free guidance; > 1 needs the negative input"),
                io.Combo.Input("start_point", options=["lr", "noise"], default="lr", optional=True,
                               tooltip=CCSR_ONLY + "lr: start from the LQ latent noised to t=999 (official); "
                                       "noise: pure noise"),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip=CCSR_ONLY + "negative prompt for CFG; the official code also runs "
                                              "the first (unguided) call with it"),
                SRTilingType.Input("tiling", optional=True, tooltip=TILING_TOOLTIP),
            ],
            outputs=[io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, sr_model, latent, positive, seed, latent_mode, steps=6, t_max=0.6667, t_min=0.5, cfg=4.5,
                start_point="lr", negative=None, tiling=None) -> io.NodeOutput:
        return io.NodeOutput(sample(sr_model, latent, positive, seed, latent_mode, negative, steps, t_max, t_min,
                                    cfg, start_point, tiling))


class Decode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "Decode",
            display_name="SR Decode",
            category=CATEGORY,
            description="Decodes the SR latent, crops it to the reference size and fixes its colors against the "
                        "reference (the upscaled LQ image).",
            inputs=[
                io.Latent.Input("latent", tooltip="from SR Sampler"),
                io.Combo.Input("color_fix", options=list(COLOR_FIXES), default="adain",
                               tooltip="adain: per-channel mean/std of the reference (official default); wavelet: "
                                       "detail of the result on the reference's low frequencies; none"),
                SRModelType.Input("sr_model", optional=True,
                                  tooltip="decode with the SR model's VAE (CCSR: its GAN decoder when it has one)"),
                io.Vae.Input("vae", optional=True, tooltip="or decode with any SD VAE (wins over sr_model)"),
                io.Image.Input("reference", optional=True,
                               tooltip="reference IMAGE of SR Encode LQ: sets the output size and the colors"),
                SRTilingType.Input("tiling", optional=True, tooltip=TILING_TOOLTIP),
            ],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, latent, color_fix, sr_model=None, vae=None, reference=None, tiling=None) -> io.NodeOutput:
        return io.NodeOutput(decode(latent, reference, color_fix, sr_model, vae, tiling))


class Tiling(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "Tiling",
            display_name="SR Tiling",
            category=CATEGORY,
            description="Tile settings for large images, for SR Encode LQ, SR Sampler and SR Decode. The VAE tiles "
                        "share GroupNorm statistics over the whole image (no seams, no color shifts); UNet tiles "
                        "overlap and are blended smoothly. Out of memory: the tile is halved and the step retried.",
            inputs=[
                io.Combo.Input("mode", options=["auto", "off", "explicit"], default="auto",
                               tooltip="auto: tile only what does not fit ComfyUI's free memory; off: never tile; "
                                       "explicit: the sizes below"),
                io.Int.Input("latent_tile", default=OFFICIAL_LATENT_TILE, min=8, max=512, step=8,
                             tooltip="UNet tile side in latent px (×8 image px); explicit mode (auto picks it)"),
                io.Int.Input("overlap", default=OFFICIAL_LATENT_OVERLAP, min=0, max=256, step=4,
                             tooltip="UNet tile overlap in latent px"),
                io.Int.Input("vae_tile", default=0, min=0, max=8192, step=64,
                             tooltip="VAE tile side in image px (0: from the memory budget); changes memory use, "
                                     "not the picture"),
                io.Int.Input("batch_tiles", default=1, min=1, max=64,
                             tooltip="UNet tiles per model call (more: faster on a large GPU, more memory)"),
                io.Combo.Input("weighting", options=["cosine", "gaussian"], default="cosine",
                               tooltip="blend of overlapping UNet tiles; gaussian is the official OSEDiff weighting"),
                io.Combo.Input("vae_store", options=["auto", "memory", "disk"], default="auto", optional=True,
                               tooltip="where the tiled VAE keeps its whole-image feature maps (about 1.7 GB per "
                                       "output megapixel in fp32): auto (RAM while they fit half of the free RAM, "
                                       "else files in ComfyUI's temp folder), memory, or disk; same picture"),
            ],
            outputs=[SRTilingType.Output(display_name="tiling")],
        )

    @classmethod
    def execute(cls, mode, latent_tile, overlap, vae_tile, batch_tiles, weighting, vae_store="auto") -> io.NodeOutput:
        try:
            settings = TileSettings(mode=mode, latent_tile=latent_tile if mode == "explicit" else None, overlap=overlap,
                                    vae_encoder_tile=vae_tile or None, vae_decoder_tile=(vae_tile // 8) or None,
                                    batch_tiles=batch_tiles, weighting=weighting, vae_store=vae_store)
        except ValueError as e:
            raise SRError(f"SR Tiling: {e}") from None
        return io.NodeOutput(settings)


class UpscaleSimple(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "UpscaleSimple",
            display_name="SR Upscale (simple)",
            category=CATEGORY,
            description="OSEDiff super-resolution in one node: load, encode, one step, decode, color fix. "
                        "The same functions as the SR Load / Encode / Sampler / Decode chain.",
            inputs=[
                io.Model.Input("model", tooltip="MODEL of an SD 2.1-base checkpoint"),
                io.Vae.Input("vae", tooltip="VAE of the same checkpoint"),
                io.Clip.Input("clip", tooltip="CLIP of the same checkpoint (encodes the prompt)"),
                io.Image.Input("image", tooltip="low-quality image(s)"),
                io.Combo.Input("weights", options=weight_files("osediff"), tooltip="OSEDiff weights in models/osediff"),
                io.Float.Input("scale", default=4.0, min=1.0, max=8.0, step=0.25, tooltip="upscale factor"),
                io.String.Input("prompt", default="", multiline=True,
                                tooltip="what the image shows (optional; tags such as 'portrait, face, hair')"),
                io.Combo.Input("color_fix", options=list(COLOR_FIXES), default="adain", tooltip="color fix"),
            ],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, model, vae, clip, image, weights, scale, prompt, color_fix) -> io.NodeOutput:
        sr_model = load_osediff(model, vae, weights)
        latent, reference = encode_lq(sr_model, image, scale, "bicubic")
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        out = sample(sr_model, latent, positive, 0, "mean")
        mm.throw_exception_if_processing_interrupted()
        return io.NodeOutput(decode(out, reference, color_fix, sr_model))


NODES: list[type[io.ComfyNode]] = [LoadOSEDiff, LoadCCSR, EncodeLQ, Sample, Decode, Tiling, UpscaleSimple]
