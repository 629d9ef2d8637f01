"""CCSR over the diffusers host (:class:`~.diffusers_host.DiffusersSD21`): the control branch and
the GAN decoder on the host's device and dtype.

The host's own modules are never modified: the control branch is a separate
``CCSRControlNet``; the GAN decoder is a separate decoder + post_quant_conv, and encoding
still goes through the host VAE's (unchanged) encoder.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from .ccsr import (
    CCSRWeights,
    ControlWeights,
    DecoderWeights,
    load_ccsr_decoder,
    load_ccsr_weights,
    load_control_net,
)
from .diffusers_host import DiffusersSD21
from .errors import WeightsError

_COMPARED = ("block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim",
             "use_linear_projection")


def _norm(v: object) -> object:
    return tuple(v) if isinstance(v, (list, tuple)) else v


def check_control_fits(weights: ControlWeights, unet_config: dict) -> None:
    """WeightsError when the control branch was made for another UNet than the host's.

    Compared: block widths, layers per block, block types, text-context width and projection
    kind; the residual shapes depend on these.
    """
    for key in _COMPARED:
        mine, theirs = weights.config.get(key), unet_config.get(key)
        if mine is not None and theirs is not None and _norm(mine) != _norm(theirs):
            raise WeightsError(f"{weights.source}: the control branch's {key} is {_norm(mine)} but the loaded "
                               f"UNet's is {_norm(theirs)}; it was made for another base model (CCSR needs "
                               f"SD 2.1-base)")


class DiffusersControlBranch:
    """A CCSR control branch (``CCSRControlNet``) implementing :class:`~.ccsr.ControlBranch`.

    ``residuals`` casts its inputs to the module's device and dtype and returns the 13
    residuals in that dtype (the host's ``predict_eps`` casts them again as needed).
    """

    def __init__(self, net: torch.nn.Module, *, device: torch.device, dtype: torch.dtype,
                 version: str, source: str) -> None:
        self.net, self.device, self.dtype = net, torch.device(device), dtype
        self.version, self.source = version, source

    @torch.no_grad()
    def residuals(self, x_t: Tensor, t: int, context: Tensor, cond_latent: Tensor) -> tuple[list[Tensor], Tensor]:
        x = x_t.to(self.device, self.dtype)
        c = cond_latent.to(self.device, self.dtype)
        ctx = context.to(self.device, self.dtype)
        if ctx.shape[0] == 1 and x.shape[0] > 1:
            ctx = ctx.expand(x.shape[0], -1, -1)
        ts = torch.full((x.shape[0],), int(t), device=self.device, dtype=torch.long)
        return self.net(x, ts, ctx, c)


class GANDecoderVAE:
    """An :class:`~.protocols.Autoencoder` that encodes with the host VAE (its encoder is
    untouched) and decodes with CCSR's GAN-finetuned decoder + post_quant_conv."""

    def __init__(self, host: DiffusersSD21, parts: torch.nn.ModuleDict, source: str, version: str) -> None:
        self.host, self.parts, self.source, self.version = host, parts, source, version
        self.scale_factor = host.scale_factor

    def encode_moments(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        return self.host.encode_moments(pixels)

    @torch.no_grad()
    def decode(self, raw: Tensor) -> Tensor:
        z = raw.to(self.host.device, self.host.dtype)
        if "post_quant_conv" in self.parts:
            z = self.parts["post_quant_conv"](z)
        return self.parts["decoder"](z)


def load_control_branch(host: DiffusersSD21, weights: ControlWeights | CCSRWeights | str | os.PathLike
                        ) -> DiffusersControlBranch:
    """The control branch for ``host``: weights (or a path :func:`~.ccsr.load_ccsr_weights` reads)
    checked against the host UNet, built and put on the host's device and dtype."""
    if isinstance(weights, (str, os.PathLike)):
        weights = load_ccsr_weights(weights)
    if isinstance(weights, CCSRWeights):
        weights = weights.control
    check_control_fits(weights, dict(host.unet.config))
    net = load_control_net(weights, device=host.device, dtype=host.dtype)
    return DiffusersControlBranch(net, device=host.device, dtype=host.dtype, version=weights.version,
                                  source=weights.source)


def load_gan_decoder(host: DiffusersSD21, weights: DecoderWeights | CCSRWeights | str | os.PathLike) -> GANDecoderVAE:
    """CCSR's GAN decoder for ``host`` (weights or a path :func:`~.ccsr.load_ccsr_decoder` reads).

    The tensors must be exactly the host VAE's ``decoder.*`` and ``post_quant_conv.*`` with the
    same shapes; WeightsError names the first that is not.
    """
    from diffusers import AutoencoderKL

    if isinstance(weights, (str, os.PathLike)):
        weights = load_ccsr_decoder(weights)
    if isinstance(weights, CCSRWeights):
        if weights.decoder is None:
            raise WeightsError(f"{weights.source}: holds no GAN decoder")
        weights = weights.decoder
    want = {k: tuple(v.shape) for k, v in host.vae.state_dict().items()
            if k.startswith(("decoder.", "post_quant_conv."))}
    got = weights.state_dict
    for key in sorted(want):
        if key not in got:
            raise WeightsError(f"{weights.source}: the GAN decoder lacks key {key!r}")
        if tuple(got[key].shape) != want[key]:
            raise WeightsError(f"{weights.source}: GAN decoder key {key!r} has shape {tuple(got[key].shape)} but the "
                               f"loaded VAE's is {want[key]}; it was made for another base model")
    extra = sorted(set(got) - set(want))
    if extra:
        raise WeightsError(f"{weights.source}: unexpected GAN decoder key {extra[0]!r}")
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(host.vae.config)
    parts = torch.nn.ModuleDict({"decoder": vae.decoder})
    if getattr(vae, "post_quant_conv", None) is not None:
        parts["post_quant_conv"] = vae.post_quant_conv
    parts.load_state_dict({k: v.float() for k, v in got.items()}, strict=True, assign=True)
    parts = parts.to(device=host.device, dtype=host.dtype).eval().requires_grad_(False)
    return GANDecoderVAE(host, parts, weights.source, weights.version)


@dataclass
class CCSRModels:
    """What :func:`load_ccsr` gives: the control branch, the GAN decoder VAE (None if the weights
    have none) and the release ("v1"/"v2", which picks the sampler by default)."""

    control: DiffusersControlBranch
    decoder: GANDecoderVAE | None
    version: str


def load_ccsr(host: DiffusersSD21, path: str | os.PathLike, *, decoder: str | os.PathLike | None = None) -> CCSRModels:
    """Load CCSR weights for ``host`` (any form :func:`~.ccsr.load_ccsr_weights` reads); ``decoder``
    gives the GAN decoder from another path (otherwise the one the weights hold, if any)."""
    weights = load_ccsr_weights(path)
    control = load_control_branch(host, weights.control)
    dec_weights = load_ccsr_decoder(decoder) if decoder is not None else weights.decoder
    dec = load_gan_decoder(host, dec_weights) if dec_weights is not None else None
    return CCSRModels(control, dec, weights.version)
