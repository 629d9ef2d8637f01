"""The SR nodes (V3 schema). Thin: every node is a few calls into sr_core and comfy_host.

Node ids and input ids are a public contract (saved workflows store widget values by
position): never rename them, only append new inputs at the end.
"""
from __future__ import annotations

import functools
import os

import torch

import comfy.model_management as mm
import comfy.utils
from comfy_api.v0_0_2 import io

from ..sr_core.color import COLOR_FIXES
from ..sr_core.errors import SRError
from ..sr_core.images import RESIZE_METHODS
from ..sr_core.noise import NoiseSource, latent_from_moments
from ..sr_core.osediff import OSEDiffWeights, load_osediff_weights
from ..sr_core.pipeline import decode_to_image, prepare_lq, sample_osediff
from .comfy_host import ComfyAutoencoder, SRModel, build_osediff_model, check_host_vae, context_from_conditioning
from .folders import resolve_weights, weight_files

PREFIX = "SRCO_"
CATEGORY = "image/upscaling/diffusion SR"
SRModelType = io.Custom("SR_MODEL")
MAX_SEED = 0xFFFFFFFFFFFFFFFF
LATENT_SIZE_KEY = "sr_size"
LATENT_LOGVAR_KEY = "sr_logvar"


@functools.lru_cache(maxsize=2)
def _load_weights_cached(path: str, mtime: float, size: int) -> OSEDiffWeights:
    return load_osediff_weights(path)


def load_weights(filename: str) -> OSEDiffWeights:
    path = resolve_weights("osediff", filename)
    st = os.stat(path)
    return _load_weights_cached(path, st.st_mtime, st.st_size)


def _images_nchw(image: torch.Tensor, what: str = "image") -> torch.Tensor:
    """IMAGE (B, H, W, C) in [0, 1] → (B, 3, H, W) float32; alpha dropped, gray repeated."""
    if image.dim() != 4:
        raise SRError(f"{what}: expected an IMAGE batch (B, H, W, C), got shape {tuple(image.shape)}")
    if image.shape[0] == 0:
        raise SRError(f"{what}: the IMAGE batch is empty")
    c = image.shape[-1]
    if c == 1:
        image = image.expand(-1, -1, -1, 3)
    elif c >= 3:
        image = image[..., :3]
    else:
        raise SRError(f"{what}: IMAGE has {c} channels; expected RGB")
    return image.movedim(-1, 1).float().cpu()


# -- functions shared by the chain nodes and the simple node ------------------------------
def load_osediff(model, vae, weights: str) -> SRModel:
    return build_osediff_model(model, vae, load_weights(weights), weights)


def encode_lq(sr_model: SRModel, image: torch.Tensor, scale: float, resize_method: str) -> tuple[dict, torch.Tensor]:
    images = _images_nchw(image)
    prep = prepare_lq(images, scale, resize_method, max_output_pixels=None, name="image")
    pbar = comfy.utils.ProgressBar(images.shape[0])
    ae = sr_model.autoencoder()
    means, logvars = [], []
    for i in range(images.shape[0]):
        mean, logvar = ae.encode_moments(prep.pixels[i:i + 1])
        means.append(mean)
        logvars.append(logvar)
        pbar.update(1)
    latent = {"samples": torch.cat(means), LATENT_LOGVAR_KEY: torch.cat(logvars), LATENT_SIZE_KEY: prep.size}
    return latent, prep.reference.movedim(1, -1)


def sample(sr_model: SRModel, latent: dict, positive, seed: int, latent_mode: str) -> dict:
    raw = latent["samples"].float()
    context = context_from_conditioning(positive)
    if latent_mode == "sample" and LATENT_LOGVAR_KEY not in latent:
        raise SRError("latent_mode 'sample' needs the LATENT of SR Encode LQ (it carries the posterior variance); "
                      "use 'mean' for other latents")
    denoiser = sr_model.denoiser()
    pbar = comfy.utils.ProgressBar(raw.shape[0])
    outs = []
    for i in range(raw.shape[0]):
        one = raw[i:i + 1]
        if latent_mode == "sample":
            one = latent_from_moments(one, latent[LATENT_LOGVAR_KEY][i:i + 1], "sample", [NoiseSource(seed)])
        ctx = context[i:i + 1] if context.shape[0] == raw.shape[0] else context[:1]
        outs.append(sample_osediff(denoiser, one, ctx, ComfyAutoencoder.scale_factor))
        pbar.update(1)
    out = {k: v for k, v in latent.items() if k not in ("samples", LATENT_LOGVAR_KEY)}
    out["samples"] = torch.cat(outs)
    return out


def decode(latent: dict, reference: torch.Tensor | None, color_fix: str, sr_model: SRModel | None = None,
           vae=None) -> torch.Tensor:
    if vae is not None:
        check_host_vae(vae)
        ae = ComfyAutoencoder(vae)
    elif sr_model is not None:
        ae = sr_model.autoencoder()
    else:
        raise SRError("SR Decode: wire an SR_MODEL or a VAE")
    raw = latent["samples"]
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
    return torch.cat(outs).movedim(1, -1)


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
                SRModelType.Input("sr_model", tooltip="from SR Load OSEDiff"),
                io.Image.Input("image", tooltip="low-quality image(s); alpha is dropped"),
                io.Float.Input("scale", default=4.0, min=1.0, max=8.0, step=0.25,
                               tooltip="upscale factor; the output is exactly scale × the input size "
                                       "(padded to multiples of 8 inside, cropped back at decode)"),
                io.Combo.Input("resize_method", options=list(RESIZE_METHODS), default="bicubic",
                               tooltip="filter of the upscale before encoding (bicubic: the official OSEDiff choice)"),
            ],
            outputs=[io.Latent.Output(display_name="latent"), io.Image.Output(display_name="reference")],
        )

    @classmethod
    def execute(cls, sr_model, image, scale, resize_method) -> io.NodeOutput:
        latent, reference = encode_lq(sr_model, image, scale, resize_method)
        return io.NodeOutput(latent, reference)


class Sample(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=PREFIX + "Sample",
            display_name="SR Sampler",
            category=CATEGORY,
            description="Runs the SR method on the LQ latent. OSEDiff: one UNet call at t=999, no CFG, through "
                        "the host model's own apply_model; the result is the x0 estimate.",
            inputs=[
                SRModelType.Input("sr_model", tooltip="from SR Load OSEDiff"),
                io.Latent.Input("latent", tooltip="from SR Encode LQ (or any SD latent)"),
                io.Conditioning.Input("positive", tooltip="CLIP Text Encode of the SD 2.1 checkpoint's CLIP; an empty "
                                                          "prompt works, tags describing the image help"),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True,
                             tooltip="seed of every random draw; OSEDiff only draws with latent_mode 'sample'"),
                io.Combo.Input("latent_mode", options=["mean", "sample"], default="mean",
                               tooltip="mean: the VAE posterior mean (deterministic); sample: a draw from the "
                                       "posterior with the seed (the official code's choice, unseeded there)"),
            ],
            outputs=[io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, sr_model, latent, positive, seed, latent_mode) -> io.NodeOutput:
        return io.NodeOutput(sample(sr_model, latent, positive, seed, latent_mode))


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
                SRModelType.Input("sr_model", optional=True, tooltip="decode with the SR model's VAE"),
                io.Vae.Input("vae", optional=True, tooltip="or decode with any SD VAE (wins over sr_model)"),
                io.Image.Input("reference", optional=True,
                               tooltip="reference IMAGE of SR Encode LQ: sets the output size and the colors"),
            ],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, latent, color_fix, sr_model=None, vae=None, reference=None) -> io.NodeOutput:
        return io.NodeOutput(decode(latent, reference, color_fix, sr_model, vae))


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


NODES: list[type[io.ComfyNode]] = [LoadOSEDiff, EncodeLQ, Sample, Decode, UpscaleSimple]
