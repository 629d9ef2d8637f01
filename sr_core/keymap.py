"""Name maps between diffusers module names and the original (ldm) names.

SD checkpoints in a single file (CompVis / Stability ``.ckpt``/``.safetensors``) and
ComfyUI's in-memory models use the original latent-diffusion ("ldm") module names;
the official OSEDiff / CCSR weights and the diffusers backend use diffusers names.
This module maps one onto the other for the three networks of SD 2.x:

- UNet: ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` <->
  ``input_blocks.1.1.transformer_blocks.0.attn1.to_q`` (relative to the ldm
  ``UNetModel``, i.e. without ``model.diffusion_model.``). Same tensor layouts.
- VAE: ``encoder.down_blocks.0.resnets.0.conv1`` <-> ``encoder.down.0.block.0.conv1``
  (relative to the ldm autoencoder, i.e. without ``first_stage_model.``). The
  mid-block attention q/k/v/out are ``Linear`` ([C, C]) in diffusers and 1x1 ``Conv2d``
  ([C, C, 1, 1]) in ldm and ComfyUI: see :func:`reshape_for_ldm` /
  :func:`reshape_for_diffusers`.
- Text encoder: OpenCLIP (``cond_stage_model.model.*`` without that prefix) <->
  transformers ``CLIPTextModel`` checkpoint keys (``text_model.*``).

Module maps (``*_module_map``) name modules (no ``.weight``/``.bias``); the state-dict
converters handle whole state dicts and raise :class:`~.errors.BaseModelError` naming
the first key that does not fit. The maps are computed from a diffusers config, so
they work for any model with SD 2.x's block structure (tests use tiny ones).
Nothing here imports diffusers or transformers.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch

from .errors import BaseModelError
from .sd21 import UNET_CONFIG, VAE_CONFIG

Tensor = torch.Tensor

# diffusers ResnetBlock2D part -> ldm ResBlock part (UNet).
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# diffusers ResnetBlock2D part -> ldm ResnetBlock part (VAE).
_VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
# diffusers VAE mid-block Attention part -> ldm AttnBlock part.
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
# Modules of one BasicTransformerBlock; the names are the same in both layouts.
# The flag says whether the module has a bias (attention q/k/v have none).
_TRANSFORMER_BLOCK = [
    ("norm1", True),
    ("attn1.to_q", False),
    ("attn1.to_k", False),
    ("attn1.to_v", False),
    ("attn1.to_out.0", True),
    ("norm2", True),
    ("attn2.to_q", False),
    ("attn2.to_k", False),
    ("attn2.to_v", False),
    ("attn2.to_out.0", True),
    ("norm3", True),
    ("ff.net.0.proj", True),
    ("ff.net.2", True),
]

_UNET_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UNET_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# One entry of a layout: (diffusers module, ldm module, has_bias).
_Entry = tuple[str, str, bool]


def _per_level(value: int | Sequence[int], levels: int, what: str) -> list[int]:
    """Expand an int-or-sequence config value to one int per block level."""
    if isinstance(value, int):
        return [value] * levels
    values = [int(v) for v in value]
    if len(values) != levels:
        raise BaseModelError(f"config {what} has {len(values)} entries for {levels} blocks")
    return values


# --------------------------------------------------------------------------- UNet


def _unet_entries(config: Mapping) -> list[_Entry]:
    """Every weight-owning module of a UNet with SD 2.x's block structure."""
    cfg = {**UNET_CONFIG, **dict(config)}
    channels = list(cfg["block_out_channels"])
    levels = len(channels)
    down_types = list(cfg["down_block_types"])
    up_types = list(cfg["up_block_types"])
    if len(down_types) != levels or len(up_types) != levels:
        raise BaseModelError(
            f"UNet config has {len(down_types)} down / {len(up_types)} up blocks "
            f"for {levels} block_out_channels"
        )
    for t in down_types + up_types:
        if t not in _UNET_DOWN_TYPES + _UNET_UP_TYPES:
            raise BaseModelError(f"UNet block type {t!r} is not part of the SD 2.x structure")
    if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise BaseModelError(f"UNet mid block {cfg['mid_block_type']!r} is not SD 2.x's")
    layers = _per_level(cfg["layers_per_block"], levels, "layers_per_block")
    depth = _per_level(cfg["transformer_layers_per_block"], levels, "transformer_layers_per_block")
    up_depth = cfg.get("reverse_transformer_layers_per_block") or list(reversed(depth))
    up_depth = _per_level(up_depth, levels, "reverse_transformer_layers_per_block")

    entries: list[_Entry] = [
        ("time_embedding.linear_1", "time_embed.0", True),
        ("time_embedding.linear_2", "time_embed.2", True),
        ("conv_in", "input_blocks.0.0", True),
    ]

    def resnet(src: str, dst: str, shortcut: bool) -> None:
        for d_part, l_part in _UNET_RESNET.items():
            if d_part != "conv_shortcut" or shortcut:
                entries.append((f"{src}.{d_part}", f"{dst}.{l_part}", True))

    def attention(src: str, dst: str, n_transformers: int) -> None:
        entries.append((f"{src}.norm", f"{dst}.norm", True))
        entries.append((f"{src}.proj_in", f"{dst}.proj_in", True))
        for t in range(n_transformers):
            for part, bias in _TRANSFORMER_BLOCK:
                entries.append(
                    (f"{src}.transformer_blocks.{t}.{part}", f"{dst}.transformer_blocks.{t}.{part}", bias)
                )
        entries.append((f"{src}.proj_out", f"{dst}.proj_out", True))

    # Encoder: ldm input_blocks.0 is conv_in, then one entry per resnet(+attention)
    # and one per downsampler.
    n = 1
    in_ch = channels[0]
    for x, out_ch in enumerate(channels):
        has_attn = down_types[x].startswith("CrossAttn")
        for i in range(layers[x]):
            src = f"down_blocks.{x}"
            resnet(f"{src}.resnets.{i}", f"input_blocks.{n}.0", in_ch != out_ch)
            in_ch = out_ch
            if has_attn:
                attention(f"{src}.attentions.{i}", f"input_blocks.{n}.1", depth[x])
            n += 1
        if x < levels - 1:
            entries.append((f"down_blocks.{x}.downsamplers.0.conv", f"input_blocks.{n}.0.op", True))
            n += 1

    resnet("mid_block.resnets.0", "middle_block.0", False)
    attention("mid_block.attentions.0", "middle_block.1", depth[-1])
    resnet("mid_block.resnets.1", "middle_block.2", False)

    # Decoder: one ldm output block per resnet; every up resnet takes a concatenated
    # skip connection, so it always has a shortcut conv.
    n = 0
    up_layers = list(reversed(layers))
    for x in range(levels):
        has_attn = up_types[x].startswith("CrossAttn")
        count = up_layers[x] + 1
        for i in range(count):
            resnet(f"up_blocks.{x}.resnets.{i}", f"output_blocks.{n}.0", True)
            if has_attn:
                attention(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", up_depth[x])
            if i == count - 1 and x < levels - 1:
                sub = 2 if has_attn else 1
                entries.append((f"up_blocks.{x}.upsamplers.0.conv", f"output_blocks.{n}.{sub}.conv", True))
            n += 1

    entries += [
        ("conv_norm_out", "out.0", True),
        ("conv_out", "out.2", True),
    ]
    return entries


def unet_module_map(config: Mapping) -> dict[str, str]:
    """Map every weight-owning diffusers UNet module to its ldm module path.

    ``config`` is a diffusers ``UNet2DConditionModel`` config (missing keys default
    to SD 2.1-base's); any size works as long as the blocks are SD 2.x's types.
    Example: ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` ->
    ``input_blocks.1.1.transformer_blocks.0.attn1.to_q``; ``conv_in`` ->
    ``input_blocks.0.0``. Weights have the same shape on both sides.
    """
    return {d: l for d, l, _ in _unet_entries(config)}


# ---------------------------------------------------------------------------- VAE


def _vae_entries(config: Mapping) -> list[_Entry]:
    """Every weight-owning module of an SD-style ``AutoencoderKL``."""
    cfg = {**VAE_CONFIG, **dict(config)}
    channels = list(cfg["block_out_channels"])
    levels = len(channels)
    layers = int(cfg["layers_per_block"])
    entries: list[_Entry] = []

    def resnet(src: str, dst: str, shortcut: bool) -> None:
        for d_part, l_part in _VAE_RESNET.items():
            if d_part != "conv_shortcut" or shortcut:
                entries.append((f"{src}.{d_part}", f"{dst}.{l_part}", True))

    def mid(side: str) -> None:
        resnet(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", False)
        for d_part, l_part in _VAE_ATTENTION.items():
            entries.append((f"{side}.mid_block.attentions.0.{d_part}", f"{side}.mid.attn_1.{l_part}", True))
        resnet(f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", False)

    entries.append(("encoder.conv_in", "encoder.conv_in", True))
    in_ch = channels[0]
    for i, out_ch in enumerate(channels):
        for j in range(layers):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", in_ch != out_ch)
            in_ch = out_ch
        if i < levels - 1:
            entries.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", True))
    mid("encoder")
    entries += [
        ("encoder.conv_norm_out", "encoder.norm_out", True),
        ("encoder.conv_out", "encoder.conv_out", True),
        ("quant_conv", "quant_conv", True),
        ("post_quant_conv", "post_quant_conv", True),
        ("decoder.conv_in", "decoder.conv_in", True),
    ]
    mid("decoder")
    # ldm numbers decoder levels from the highest resolution (up.0 = last to run);
    # diffusers numbers them in execution order.
    rev = list(reversed(channels))
    in_ch = rev[0]
    for i, out_ch in enumerate(rev):
        level = levels - 1 - i
        for j in range(layers + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", in_ch != out_ch)
            in_ch = out_ch
        if i < levels - 1:
            entries.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv", True))
    entries += [
        ("decoder.conv_norm_out", "decoder.norm_out", True),
        ("decoder.conv_out", "decoder.conv_out", True),
    ]
    return entries


def vae_module_map(config: Mapping) -> dict[str, str]:
    """Map every weight-owning diffusers ``AutoencoderKL`` module to its ldm path.

    Example: ``encoder.down_blocks.0.resnets.0.conv1`` -> ``encoder.down.0.block.0.conv1``,
    ``encoder.mid_block.attentions.0.to_q`` -> ``encoder.mid.attn_1.q``,
    ``decoder.up_blocks.0.resnets.0.conv1`` -> ``decoder.up.3.block.0.conv1`` (4 levels).
    The mid attention q/k/v/out weights change shape between the two layouts: use
    :func:`reshape_for_ldm` / :func:`reshape_for_diffusers` on their tensors.
    """
    return {d: l for d, l, _ in _vae_entries(config)}


def _is_vae_linear_as_conv(diffusers_module: str) -> bool:
    """True for the VAE mid attention Linear layers that ldm stores as 1x1 convs."""
    head, _, tail = diffusers_module.rpartition(".mid_block.attentions.0.")
    return head in ("encoder", "decoder") and tail in ("to_q", "to_k", "to_v", "to_out.0")


def reshape_for_ldm(diffusers_module: str, tensor: Tensor) -> Tensor:
    """Give a diffusers-shaped weight (or LoRA factor / weight delta) the ldm shape.

    Only the VAE mid-block attention q/k/v/out differ: a 2-D ``[out, in]`` tensor
    becomes ``[out, in, 1, 1]`` (a view). Every other module, biases and tensors
    already in ldm shape are returned unchanged. ``diffusers_module`` is the
    diffusers module path (``encoder.mid_block.attentions.0.to_q``), with or without
    a trailing ``.weight``.
    """
    module = diffusers_module.removesuffix(".weight")
    if _is_vae_linear_as_conv(module) and tensor.ndim == 2:
        return tensor[:, :, None, None]
    return tensor


def reshape_for_diffusers(diffusers_module: str, tensor: Tensor) -> Tensor:
    """Inverse of :func:`reshape_for_ldm`: ``[out, in, 1, 1]`` -> ``[out, in]`` for the
    VAE mid attention q/k/v/out; everything else is returned unchanged."""
    module = diffusers_module.removesuffix(".weight")
    if _is_vae_linear_as_conv(module) and tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
        return tensor[:, :, 0, 0]
    return tensor


# ---------------------------------------------------------------- state dicts


def _expected_keys(entries: Iterable[_Entry], ldm: bool) -> list[str]:
    keys = []
    for d, l, bias in entries:
        module = l if ldm else d
        keys.append(f"{module}.weight")
        if bias:
            keys.append(f"{module}.bias")
    return keys


def _convert(sd: Mapping[str, Tensor], entries: list[_Entry], to_ldm: bool, what: str) -> dict[str, Tensor]:
    """Rename (and reshape where needed) a whole state dict in one direction."""
    src_of = {(d if to_ldm else l): (d, l) for d, l, _ in entries}
    expected = set(_expected_keys(entries, ldm=not to_ldm))
    src_layout, dst_layout = ("diffusers", "ldm") if to_ldm else ("ldm", "diffusers")
    out: dict[str, Tensor] = {}
    for key, tensor in sd.items():
        module, _, param = key.rpartition(".")
        if key not in expected or module not in src_of:
            raise BaseModelError(
                f"{what} key {key!r} is not part of an SD 2.x {what} in {src_layout} layout "
                f"(no {dst_layout} counterpart)"
            )
        d_mod, l_mod = src_of[module]
        if param == "weight":
            tensor = reshape_for_ldm(d_mod, tensor) if to_ldm else reshape_for_diffusers(d_mod, tensor)
        out[f"{l_mod if to_ldm else d_mod}.{param}"] = tensor
    for key in _expected_keys(entries, ldm=not to_ldm):
        if key not in sd:
            raise BaseModelError(f"{what} state dict ({src_layout} layout) lacks key {key!r}")
    return out


def unet_ldm_to_diffusers(sd: Mapping[str, Tensor], config: Mapping) -> dict[str, Tensor]:
    """Convert an ldm UNet state dict (keys without ``model.diffusion_model.``) to
    diffusers keys for ``UNet2DConditionModel(**config)``. Raises BaseModelError on the
    first unknown or missing key."""
    return _convert(sd, _unet_entries(config), to_ldm=False, what="UNet")


def unet_diffusers_to_ldm(sd: Mapping[str, Tensor], config: Mapping) -> dict[str, Tensor]:
    """Convert a diffusers UNet state dict to ldm keys (relative to ``UNetModel``)."""
    return _convert(sd, _unet_entries(config), to_ldm=True, what="UNet")


def vae_ldm_to_diffusers(sd: Mapping[str, Tensor], config: Mapping) -> dict[str, Tensor]:
    """Convert an ldm VAE state dict (keys without ``first_stage_model.``) to diffusers
    ``AutoencoderKL(**config)`` keys; mid attention 1x1 convs become Linear weights."""
    return _convert(sd, _vae_entries(config), to_ldm=False, what="VAE")


def vae_diffusers_to_ldm(sd: Mapping[str, Tensor], config: Mapping) -> dict[str, Tensor]:
    """Convert a diffusers ``AutoencoderKL`` state dict to ldm keys; mid attention
    Linear weights become 1x1 conv weights."""
    return _convert(sd, _vae_entries(config), to_ldm=True, what="VAE")


# ------------------------------------------------------------------ text encoder

HF_TEXT_PREFIX = "text_model."

# OpenCLIP residual-block part -> HF CLIPEncoderLayer part (in_proj is split apart).
_TEXT_BLOCK = {
    "ln_1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TEXT_TOP = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
# OpenCLIP keys a text-only SD model may carry that CLIPTextModel has no use for.
_TEXT_UNUSED = ("text_projection", "logit_scale", "attn_mask")


def _openclip_block_keys() -> list[str]:
    keys = ["attn.in_proj_weight", "attn.in_proj_bias"]
    for part in _TEXT_BLOCK:
        keys += [f"{part}.weight", f"{part}.bias"]
    return keys


def text_openclip_to_hf(
    sd: Mapping[str, Tensor], num_layers: int, prefix: str = HF_TEXT_PREFIX
) -> dict[str, Tensor]:
    """Convert an OpenCLIP text tower (keys without ``cond_stage_model.model.``) to
    ``CLIPTextModel`` keys, keeping only the first ``num_layers`` blocks (23 for SD 2.x:
    the model's last hidden state is then the penultimate block output, and
    ``final_layer_norm`` (= ``ln_final``) is applied on it, as SD 2.x does).

    ``attn.in_proj_*`` is split into q/k/v. ``text_projection``, ``logit_scale`` and
    the dropped blocks are ignored. ``prefix`` is prepended to every output key: the
    default ``"text_model."`` is the HF checkpoint layout; pass ``""`` for a
    ``CLIPTextModel`` whose state dict has no such prefix (transformers >= 5).
    """
    out: dict[str, Tensor] = {}
    block_keys = _openclip_block_keys()
    for key in sd:
        if key in _TEXT_TOP or key in _TEXT_UNUSED:
            continue
        parts = key.split(".")
        if (
            key.startswith("transformer.resblocks.")
            and len(parts) > 3
            and parts[2].isdigit()
            and ".".join(parts[3:]) in block_keys
        ):
            continue
        raise BaseModelError(f"text encoder key {key!r} is not part of an OpenCLIP text tower")
    for key, hf in _TEXT_TOP.items():
        if key not in sd:
            raise BaseModelError(f"text encoder state dict (OpenCLIP layout) lacks key {key!r}")
        out[prefix + hf] = sd[key]
    for n in range(num_layers):
        src = f"transformer.resblocks.{n}."
        dst = f"{prefix}encoder.layers.{n}."
        for key in block_keys:
            if src + key not in sd:
                raise BaseModelError(f"text encoder state dict (OpenCLIP layout) lacks key {src + key!r}")
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{src}attn.in_proj_{kind}"].chunk(3, dim=0)
            out[f"{dst}self_attn.q_proj.{kind}"] = q
            out[f"{dst}self_attn.k_proj.{kind}"] = k
            out[f"{dst}self_attn.v_proj.{kind}"] = v
            for oc, hf in _TEXT_BLOCK.items():
                out[f"{dst}{hf}.{kind}"] = sd[f"{src}{oc}.{kind}"]
    return out


def text_hf_to_openclip(
    sd: Mapping[str, Tensor], extra_layer: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Convert ``CLIPTextModel`` keys (with or without ``text_model.``) to a complete
    OpenCLIP text tower as SD 2.x single-file checkpoints store it (used to write test
    checkpoints).

    The HF model holds N blocks (23 for SD 2.x); OpenCLIP files hold N + 1 (the last
    one is unused by SD) plus ``text_projection`` [H, H] and ``logit_scale``. These
    come from ``extra_layer`` where given: block-relative OpenCLIP names
    (``"ln_1.weight"``, ``"attn.in_proj_weight"``, ...) and/or ``"text_projection"``,
    ``"logit_scale"``; whatever is not given is zeros (``logit_scale``: log(1/0.07)).
    """
    hf = {k.removeprefix(HF_TEXT_PREFIX): v for k, v in sd.items()}
    out: dict[str, Tensor] = {}
    for oc, name in _TEXT_TOP.items():
        if name not in hf:
            raise BaseModelError(f"text encoder state dict (HF layout) lacks key {name!r}")
        out[oc] = hf.pop(name)
    layers = sorted({int(k.split(".")[2]) for k in hf if k.startswith("encoder.layers.")})
    if layers != list(range(len(layers))) or not layers:
        raise BaseModelError(f"text encoder state dict (HF layout) has layers {layers}, expected 0..N-1")
    for n in layers:
        src = f"encoder.layers.{n}."
        dst = f"transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            names = [f"{src}self_attn.{p}_proj.{kind}" for p in "qkv"]
            names += [f"{src}{h}.{kind}" for h in _TEXT_BLOCK.values()]
            for name in names:
                if name not in hf:
                    raise BaseModelError(f"text encoder state dict (HF layout) lacks key {name!r}")
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([hf.pop(x) for x in names[:3]], dim=0)
            for oc, h in _TEXT_BLOCK.items():
                out[f"{dst}{oc}.{kind}"] = hf.pop(f"{src}{h}.{kind}")
    if hf:
        raise BaseModelError(f"text encoder key {next(iter(hf))!r} is not part of a CLIPTextModel")

    extra = dict(extra_layer or {})
    last = f"transformer.resblocks.{len(layers)}."
    for key in _openclip_block_keys():
        ref = out[f"transformer.resblocks.0.{key}"]
        value = extra.pop(key, None)
        out[last + key] = torch.zeros_like(ref) if value is None else value
    width = out["token_embedding.weight"].shape[1]
    dtype = out["token_embedding.weight"].dtype
    projection = extra.pop("text_projection", None)
    out["text_projection"] = torch.zeros(width, width, dtype=dtype) if projection is None else projection
    scale = extra.pop("logit_scale", None)
    out["logit_scale"] = torch.tensor(math.log(1 / 0.07), dtype=dtype) if scale is None else scale
    if extra:
        raise BaseModelError(f"extra_layer key {next(iter(extra))!r} is not an OpenCLIP block key")
    return out


# ------------------------------------------------------- ControlNet (CCSR)

# A ControlNet is a copy of the UNet encoder (time embedding, conv_in, down blocks, mid
# block) plus one 1x1 "zero conv" per encoder skip connection and one after the mid block.
_CONTROLNET_ENCODER_PREFIXES = ("time_embedding.", "down_blocks.", "mid_block.")
_UP_OF_DOWN = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}


def _controlnet_entries(config: Mapping) -> list[_Entry]:
    """Every weight-owning module of a diffusers ControlNet with SD 2.x's encoder structure
    (without the pixel-hint ``controlnet_cond_embedding`` and without CCSR's
    ``condition_conv_in``, which have no ldm counterpart of their own)."""
    cfg = {**UNET_CONFIG, **dict(config)}
    down_types = list(cfg["down_block_types"])
    # the UNet map also walks the decoder: give it the decoder that mirrors this encoder
    cfg["up_block_types"] = tuple(_UP_OF_DOWN.get(t, t) for t in reversed(down_types))
    cfg.pop("reverse_transformer_layers_per_block", None)
    entries = [e for e in _unet_entries(cfg)
               if e[0] == "conv_in" or e[0].startswith(_CONTROLNET_ENCODER_PREFIXES)]
    levels = len(list(cfg["block_out_channels"]))
    layers = _per_level(cfg["layers_per_block"], levels, "layers_per_block")
    n_skips = 1 + sum(layers) + (levels - 1)  # conv_in, every resnet(+attention), every downsampler
    for i in range(n_skips):
        entries.append((f"controlnet_down_blocks.{i}", f"zero_convs.{i}.0", True))
    entries.append(("controlnet_mid_block", "middle_block_out.0", True))
    return entries


def controlnet_module_map(config: Mapping) -> dict[str, str]:
    """Map every weight-owning diffusers ControlNet module to its ldm ``ControlNet`` path.

    ``config`` is a diffusers ``ControlNetModel`` (or UNet) config; missing keys default to
    SD 2.1-base's. Encoder modules map as in :func:`unet_module_map`
    (``down_blocks.0.resnets.0`` -> ``input_blocks.1.0``, ``conv_in`` -> ``input_blocks.0.0``);
    the zero convs map ``controlnet_down_blocks.{i}`` -> ``zero_convs.{i}.0`` (12 for SD 2.x)
    and ``controlnet_mid_block`` -> ``middle_block_out.0``. The pixel-hint embedding
    (diffusers ``controlnet_cond_embedding``, ldm ``input_hint_block``) is not mapped.
    """
    return {d: l for d, l, _ in _controlnet_entries(config)}


def controlnet_ldm_to_diffusers(sd: Mapping[str, Tensor], config: Mapping) -> dict[str, Tensor]:
    """Convert an ldm ControlNet state dict (keys relative to the ControlNet, e.g. without
    ``control_model.``) to diffusers ``ControlNetModel`` keys. Tensors are not reshaped
    (an 8-channel ``input_blocks.0.0`` stays 8-channel in ``conv_in``). Raises
    BaseModelError on the first unknown or missing key."""
    return _convert(sd, _controlnet_entries(config), to_ldm=False, what="ControlNet")


def controlnet_diffusers_to_ldm(sd: Mapping[str, Tensor], config: Mapping) -> dict[str, Tensor]:
    """Inverse of :func:`controlnet_ldm_to_diffusers`."""
    return _convert(sd, _controlnet_entries(config), to_ldm=True, what="ControlNet")


def controlnet_keys(config: Mapping) -> list[str]:
    """Every state-dict key (diffusers names) of the ControlNet :func:`controlnet_module_map`
    covers: weights and biases of the encoder copy and the zero convs."""
    return _expected_keys(_controlnet_entries(config), ldm=False)


def _vae_decoder_entries(config: Mapping) -> list[_Entry]:
    return [e for e in _vae_entries(config) if e[0].startswith(("decoder.", "post_quant_conv"))]


def vae_decoder_ldm_to_diffusers(sd: Mapping[str, Tensor], config: Mapping) -> dict[str, Tensor]:
    """Convert the decoder half of an ldm VAE (``decoder.*`` and ``post_quant_conv.*``,
    keys without ``first_stage_model.``) to diffusers ``AutoencoderKL`` keys; the mid
    attention 1x1 convs become Linear weights. Every decoder key must be present and no
    other key may be; raises BaseModelError naming the first that is not."""
    return _convert(sd, _vae_decoder_entries(config), to_ldm=False, what="VAE decoder")
