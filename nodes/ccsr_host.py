"""CCSR over ComfyUI's loaded models: the control branch as a ComfyUI ControlNet module under a
ModelPatcher, and the GAN-finetuned decoder as a ComfyUI VAE.

The control branch is ComfyUI's own ldm ``ControlNet`` (built with ``comfy.ops``, loaded through
``load_models_gpu``, so ComfyUI places, casts and offloads it) whose pixel-hint CNN is replaced
by CCSR's single ``condition_conv_in`` (4 → 320, 3×3): ``conv_in(x_t) + condition_conv_in(c)``
is exactly what ComfyUI's ControlNet computes when its ``input_hint_block`` is that conv.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor

import comfy.cldm.cldm
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.sd
from comfy.ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential

from ..sr_core import keymap
from ..sr_core.ccsr import CCSRWeights, ControlWeights, DecoderWeights
from ..sr_core.errors import WeightsError
from ..sr_core.sd21 import VAE_CONFIG
from .comfy_host import SRModel, check_host_model, check_host_vae

_HINT = "input_hint_block.0"


def control_state_dict_ldm(weights: ControlWeights) -> dict[str, Tensor]:
    """The control branch in ComfyUI's ldm ControlNet names (v2 form: 4-channel conv_in and
    ``input_hint_block.0`` = condition_conv_in)."""
    sd = dict(weights.state_dict)
    cw, cb = sd.pop("condition_conv_in.weight"), sd.pop("condition_conv_in.bias")
    out = keymap.controlnet_diffusers_to_ldm(sd, weights.config)
    out[f"{_HINT}.weight"], out[f"{_HINT}.bias"] = cw, cb
    return out


class ComfyControlBranch:
    """sr_core's ControlBranch over a ComfyUI ControlNet module; ``patcher`` is its ModelPatcher."""

    def __init__(self, patcher, version: str, source: str) -> None:
        self.patcher, self.version, self.source = patcher, version, source

    def residuals(self, x_t: Tensor, t: int, context: Tensor, cond_latent: Tensor) -> tuple[list[Tensor], Tensor]:
        mm.throw_exception_if_processing_interrupted()
        mm.load_models_gpu([self.patcher])
        net = self.patcher.model
        device = self.patcher.load_device
        dtype = net.dtype
        x = x_t.to(device, dtype)
        ctx = context.to(device, dtype)
        if ctx.shape[0] == 1 and x.shape[0] > 1:
            ctx = ctx.expand(x.shape[0], -1, -1)
        ts = torch.full((x.shape[0],), float(t), device=device)
        with torch.no_grad():
            out = net(x=x, hint=cond_latent.to(device, dtype), timesteps=ts, context=ctx)
        return list(out["output"]), out["middle"][0]


def build_control_branch(model, weights: ControlWeights) -> ComfyControlBranch:
    """A ComfyUI ControlNet module (the host UNet's config, dtype and ops) holding the CCSR branch."""
    host_config = dict(model.model.model_config.unet_config)
    unet_dtype = model.model.get_dtype()
    load_device = mm.get_torch_device()
    manual_cast = mm.unet_manual_cast(unet_dtype, load_device)
    operations = comfy.ops.pick_operations(unet_dtype, manual_cast)
    config = {k: v for k, v in host_config.items() if k != "out_channels"}
    config.update(operations=operations, dtype=unet_dtype, device=mm.unet_offload_device(), hint_channels=4)
    net = comfy.cldm.cldm.ControlNet(**config)
    channels = host_config["model_channels"]
    net.input_hint_block = TimestepEmbedSequential(
        operations.conv_nd(2, 4, channels, 3, padding=1, dtype=unet_dtype, device=mm.unet_offload_device()))
    sd = control_state_dict_ldm(weights)
    own = net.state_dict()
    for key, value in sd.items():
        if key not in own:
            raise WeightsError(f"{weights.source}: control branch key {key!r} has no place in the host model's "
                               f"ControlNet; it was made for another base model (CCSR needs SD 2.1-base)")
        if tuple(own[key].shape) != tuple(value.shape):
            raise WeightsError(f"{weights.source}: control branch key {key!r} has shape {tuple(value.shape)}, the "
                               f"host model needs {tuple(own[key].shape)}; CCSR needs SD 2.1-base")
    missing = sorted(set(own) - set(sd))
    if missing:
        raise WeightsError(f"{weights.source}: the control branch lacks {missing[0]!r}")
    net.load_state_dict({k: v.to(unet_dtype) for k, v in sd.items()}, strict=True)
    patcher = comfy.model_patcher.ModelPatcher(net.eval(), load_device=load_device, offload_device=mm.unet_offload_device())
    return ComfyControlBranch(patcher, weights.version, weights.source)


def build_decoder_vae(vae, decoder: DecoderWeights):
    """A ComfyUI VAE with the host VAE's encoder and the GAN-finetuned decoder (a new VAE object;
    the host VAE is untouched)."""
    check_host_vae(vae)
    mm.load_models_gpu([vae.patcher])
    host_sd = {k: v.detach().cpu() for k, v in vae.first_stage_model.state_dict().items()}
    ldm = _decoder_to_ldm(decoder)
    for key, value in ldm.items():
        if key not in host_sd or tuple(host_sd[key].shape) != tuple(value.shape):
            raise WeightsError(f"{decoder.source}: GAN decoder key {key!r} does not fit the VAE "
                               f"(expected an SD VAE decoder)")
    merged = dict(host_sd)
    merged.update({k: v.to(host_sd[k].dtype) for k, v in ldm.items()})
    return comfy.sd.VAE(sd=merged)


def _decoder_to_ldm(decoder: DecoderWeights) -> dict[str, Tensor]:
    """Decoder + post_quant_conv tensors (diffusers names) → ldm names, via the full VAE map."""
    vmap = keymap.vae_module_map(VAE_CONFIG)
    out: dict[str, Tensor] = {}
    for key, value in decoder.state_dict.items():
        module, _, leaf = key.rpartition(".")
        if module not in vmap:
            raise WeightsError(f"{decoder.source}: GAN decoder key {key!r} is not an SD VAE decoder key")
        out[f"{vmap[module]}.{leaf}"] = keymap.reshape_for_ldm(module, value)
    return out


def build_ccsr_model(model, vae, weights: CCSRWeights, weights_name: str, decoder: DecoderWeights | None) -> SRModel:
    """SR_MODEL for CCSR: the host MODEL and VAE (the SD UNet is frozen in CCSR: nothing is patched),
    the control branch, and the GAN decoder VAE if given."""
    check_host_model(model)
    check_host_vae(vae)
    control = build_control_branch(model, weights.control)
    extras = {"control": control, "version": weights.control.version,
              "decoder_vae": build_decoder_vae(vae, decoder) if decoder is not None else None}
    return SRModel(method="ccsr", model=model.clone(), vae=copy.copy(vae), weights_name=weights_name, extras=extras)
