"""ComfyUI's loaded models behind sr_core's protocols, and the OSEDiff patches for them.

The user's MODEL and VAE are never modified: the patched models are clones
(``ModelPatcher.clone()`` + ``add_patches``) whose patches ComfyUI applies when it loads
them and removes when another clone of the same weights is loaded.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

import comfy.model_management as mm
import comfy.model_sampling

from ..sr_core.ccsr import to_ldm_control
from ..sr_core.errors import BaseModelError, SRError
from ..sr_core.keymap import unet_module_map, vae_module_map
from ..sr_core.osediff import OSEDiffWeights
from ..sr_core.sd21 import LATENT_SCALE, UNET_CONFIG, VAE_CONFIG

log = logging.getLogger("comfyui-ccsr-osediff")

_NEEDS = "the SR methods need an SD 2.1-base checkpoint (512 px, epsilon prediction), e.g. v2-1_512-ema-pruned"


def check_host_model(model) -> None:
    """Refuse a MODEL that is not SD 2.x-base epsilon (SD1.x, SDXL, 768-v, unCLIP, inpainting, ...)."""
    base = getattr(model, "model", None)
    config = getattr(base, "model_config", None)
    if config is None:
        raise BaseModelError(f"MODEL: not a ComfyUI diffusion model; {_NEEDS}")
    family = type(config).__name__
    if family != "SD20":
        hint = {"SD15": "SD 1.x", "SDXL": "SDXL", "SDXLRefiner": "SDXL refiner", "SD21UnclipL": "SD 2.1 unCLIP",
                "SD21UnclipH": "SD 2.1 unCLIP", "SD_X4Upscaler": "the SD x4 upscaler"}.get(family, family)
        raise BaseModelError(f"MODEL: this is a {hint} model; {_NEEDS}")
    unet_config = getattr(config, "unet_config", {})
    if unet_config.get("in_channels", 4) != 4:
        raise BaseModelError(f"MODEL: this SD 2.x model takes {unet_config.get('in_channels')} input channels "
                             f"(inpainting/depth); {_NEEDS}")
    sampling = model.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.V_PREDICTION) or not isinstance(sampling, comfy.model_sampling.EPS):
        raise BaseModelError(f"MODEL: this model predicts {type(sampling).__mro__[1].__name__}, not epsilon "
                             f"(SD 2.x 768-v predicts v); {_NEEDS}")
    if not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete) or len(sampling.sigmas) != 1000:
        raise BaseModelError(f"MODEL: its sampling is not SD's discrete 1000-step schedule; {_NEEDS}")
    scale = getattr(getattr(base, "latent_format", None), "scale_factor", None)
    if scale is not None and abs(scale - LATENT_SCALE) > 1e-6:
        raise BaseModelError(f"MODEL: latent scale {scale} is not SD's 0.18215; {_NEEDS}")


def check_host_vae(vae, what: str = "VAE") -> None:
    """Refuse a VAE that is not an SD-style KL autoencoder with a 4-channel latent."""
    fsm = getattr(vae, "first_stage_model", None)
    if fsm is None or not hasattr(fsm, "encoder") or not hasattr(fsm, "quant_conv"):
        raise BaseModelError(f"{what}: not an SD VAE (KL autoencoder); use the VAE of the SD 2.1-base checkpoint")
    if getattr(vae, "latent_channels", 4) != 4:
        raise BaseModelError(f"{what}: its latent has {vae.latent_channels} channels, SD's has 4 "
                             f"(an SDXL-family VAE is fine, an SD3/Flux one is not)")


def context_from_conditioning(conditioning, what: str = "positive") -> Tensor:
    """The cross-attention tensor (B, 77·k, 1024) of a CONDITIONING (its first entry)."""
    if not conditioning:
        raise SRError(f"{what}: empty CONDITIONING; wire a CLIP Text Encode from the SD 2.1 checkpoint's CLIP")
    ctx = conditioning[0][0]
    if not isinstance(ctx, Tensor) or ctx.dim() != 3 or ctx.shape[-1] != 1024:
        shape = tuple(ctx.shape) if isinstance(ctx, Tensor) else type(ctx).__name__
        raise SRError(f"{what}: CONDITIONING has shape {shape}; SD 2.x needs (B, 77, 1024) from the SD 2.1 CLIP")
    if len(conditioning) > 1:
        log.warning("%s: %d conditionings wired; the SR sampler uses the first", what, len(conditioning))
    return ctx


class ComfyDenoiser:
    """A ComfyUI MODEL (ModelPatcher) as an sr_core Denoiser, through its own ``apply_model``.

    For an epsilon model at σ_t = √((1−ᾱ_t)/ᾱ_t), ``apply_model(x, σ)`` returns x − σ·ε(x/√(1+σ²), t);
    feeding x = x_t/√ᾱ_t (the scaled latent in ComfyUI's sigma space) gives ε = (x − out)/σ.
    """

    def __init__(self, patcher) -> None:
        self.patcher = patcher
        self.sampling = patcher.get_model_object("model_sampling")
        sigmas = self.sampling.sigmas.detach().float().cpu()
        self.alphas_cumprod = (1.0 / (1.0 + sigmas.double() ** 2)).float()

    def predict_eps(self, x_t: Tensor, t: int, context: Tensor, control: object | None = None) -> Tensor:
        mm.throw_exception_if_processing_interrupted()
        base = self.patcher.model
        shape = list(x_t.shape)
        mm.load_models_gpu([self.patcher], memory_required=base.memory_required(shape) * 1.5)
        device = self.patcher.load_device
        sigma = self.sampling.sigmas[int(t)].float().to(device).expand(x_t.shape[0])
        x = x_t.to(device, torch.float32) * torch.sqrt(1.0 + sigma[:, None, None, None] ** 2)
        ctx = context.to(device)
        if ctx.shape[0] == 1 and x.shape[0] > 1:
            ctx = ctx.expand(x.shape[0], -1, -1)
        if isinstance(control, tuple):  # sr_core's (down, mid) residuals → ComfyUI's control dict
            control = to_ldm_control(*control)
        options = self.patcher.model_options
        transformer_options = dict(options.get("transformer_options", {}))
        wrapper = options.get("model_function_wrapper")
        with torch.no_grad():
            if wrapper is not None:
                c = {"c_crossattn": ctx, "control": control, "transformer_options": transformer_options}
                out = wrapper(base.apply_model, {"input": x, "timestep": sigma, "c": c,
                                                 "cond_or_uncond": [0] * x.shape[0]})
            else:
                out = base.apply_model(x, sigma, c_crossattn=ctx, control=control,
                                       transformer_options=transformer_options)
        return ((x - out.float()) / sigma[:, None, None, None]).to(mm.intermediate_device())


class ComfyAutoencoder:
    """A ComfyUI VAE as an sr_core Autoencoder (raw latents, pixels in [-1, 1], NCHW)."""

    scale_factor = LATENT_SCALE

    def __init__(self, vae) -> None:
        self.vae = vae

    def encode_moments(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        vae = self.vae
        mm.throw_exception_if_processing_interrupted()
        memory = vae.memory_used_encode(pixels.shape, vae.vae_dtype)
        mm.load_models_gpu([vae.patcher], memory_required=memory)
        fsm = vae.first_stage_model
        means, logvars = [], []
        with torch.no_grad():
            for i in range(pixels.shape[0]):
                x = pixels[i:i + 1].to(vae.device, vae.vae_dtype)
                moments = fsm.quant_conv(fsm.encoder(x)).float()
                mean, logvar = moments.chunk(2, dim=1)
                means.append(mean.to(mm.intermediate_device()))
                logvars.append(logvar.to(mm.intermediate_device()))
        return torch.cat(means), torch.cat(logvars)

    def decode(self, raw: Tensor) -> Tensor:
        mm.throw_exception_if_processing_interrupted()
        image = self.vae.decode(raw)  # (N, H, W, 3) in [0, 1], clamped by ComfyUI
        return image.movedim(-1, 1).float() * 2.0 - 1.0


@dataclass
class SRModel:
    """SR_MODEL: patched clones of the host MODEL and VAE plus what the method needs.

    ``model``/``vae``: ComfyUI ModelPatcher / VAE clones with the method's patches;
    ``method``: "osediff"; ``weights_name``: the file the patches came from.
    """

    method: str
    model: object
    vae: object
    weights_name: str
    extras: dict = field(default_factory=dict)

    def denoiser(self) -> ComfyDenoiser:
        return ComfyDenoiser(self.model)

    def autoencoder(self) -> ComfyAutoencoder:
        return ComfyAutoencoder(self.vae)


def _lora_patch(pair, scale: float, rank: int):
    """A ComfyUI weight patch adding scale·B@A (reshaped to the weight) at load time."""
    try:
        from comfy.weight_adapter.lora import LoRAAdapter
    except ImportError:  # older ComfyUI: a plain weight difference
        return ("diff", (pair.delta(scale),))
    # LoRAAdapter multiplies by alpha / rank: alpha = scale · rank reproduces ΔW = scale · B @ A
    return LoRAAdapter(set(), (pair.up, pair.down, scale * rank, None, None, None))


def osediff_patches(weights: OSEDiffWeights) -> tuple[dict[str, object], dict[str, object]]:
    """(UNet patches keyed ``diffusion_model.<ldm>.weight``, VAE patches keyed ``<ldm>.weight``)."""
    umap, vmap = unet_module_map(UNET_CONFIG), vae_module_map(VAE_CONFIG)
    unet: dict[str, object] = {}
    for module, pair in weights.unet_lora.items():
        if module == "conv_in":
            continue
        unet[f"diffusion_model.{umap[module]}.weight"] = _lora_patch(pair, weights.unet_scale, weights.rank_unet)
    w, b = weights.conv_in()
    unet[f"diffusion_model.{umap['conv_in']}.weight"] = ("set", (w,))
    unet[f"diffusion_model.{umap['conv_in']}.bias"] = ("set", (b,))
    vae = {f"{vmap[m]}.weight": _lora_patch(p, weights.vae_scale, weights.rank_vae) for m, p in weights.vae_lora.items()}
    return unet, vae


def _shapes_in_diffusers_names(state_dict: dict[str, Tensor], module_map: dict[str, str], prefix: str) -> dict:
    shapes = {}
    for d_module, l_module in module_map.items():
        for suffix in (".weight", ".bias"):
            t = state_dict.get(f"{prefix}{l_module}{suffix}")
            if t is not None:
                shapes[f"{d_module}{suffix}"] = tuple(t.shape)
    return shapes


def build_osediff_model(model, vae, weights: OSEDiffWeights, weights_name: str) -> SRModel:
    """Clone the host MODEL and VAE and add the OSEDiff patches to the clones."""
    check_host_model(model)
    check_host_vae(vae)
    umap, vmap = unet_module_map(UNET_CONFIG), vae_module_map(VAE_CONFIG)
    unet_sd = model.model.state_dict()
    vae_sd = vae.first_stage_model.state_dict()
    weights.check_fits(_shapes_in_diffusers_names(unet_sd, umap, "diffusion_model."),
                       _shapes_in_diffusers_names(vae_sd, vmap, ""))
    unet_patches, vae_patches = osediff_patches(weights)
    patched_model = model.clone()
    added = set(patched_model.add_patches(unet_patches, 1.0))
    missing = sorted(set(unet_patches) - added)
    if missing:
        raise BaseModelError(f"MODEL: has no weight {missing[0]!r}; {_NEEDS}")
    patched_vae = copy.copy(vae)
    patched_vae.patcher = vae.patcher.clone()
    added = set(patched_vae.patcher.add_patches(vae_patches, 1.0))
    missing = sorted(set(vae_patches) - added)
    if missing:
        raise BaseModelError(f"VAE: has no weight {missing[0]!r}; use the VAE of the SD 2.1-base checkpoint")
    return SRModel(method="osediff", model=patched_model, vae=patched_vae, weights_name=weights_name)
