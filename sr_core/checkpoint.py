"""Reading single-file Stable Diffusion checkpoints (``.safetensors`` / ``.ckpt``).

A single-file SD checkpoint holds the three networks under fixed prefixes, in the
original (ldm / OpenCLIP) layout:

- ``model.diffusion_model.*``: the UNet,
- ``first_stage_model.*``: the VAE,
- ``cond_stage_model.model.*``: the OpenCLIP ViT-H text tower (SD 2.x).

:func:`split_single_file` reads such a file, refuses anything that is not SD 2.x-base
(:func:`detect_family`), reads the model sizes from the tensor shapes and returns
diffusers-keyed state dicts plus the configs to build the diffusers / transformers
modules they load into. Only :func:`split_single_file` imports transformers (lazily,
to match the installed ``CLIPTextModel`` key layout).
"""
from __future__ import annotations

import functools
import os
import pickle
import re
from typing import Mapping

import torch

from . import keymap
from .errors import BaseModelError
from .files import describe_tensors, lightning_stub_allowed, unsafe_global
from .sd21 import ATTENTION_HEAD_WIDTH, TEXT_ENCODER_CONFIG, UNET_CONFIG, VAE_CONFIG

Tensor = torch.Tensor

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.model."

_SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
_NEEDED = "this pack needs an SD 2.x-base checkpoint (512 px, epsilon prediction, e.g. v2-1_512-ema-pruned)"
#: ComfyUI's rule: SD 2.x 768-v checkpoints have this tensor's std above 0.09.
_V_PRED_KEY = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
_V_PRED_STD = 0.09


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Load every tensor of a checkpoint file onto the CPU.

    ``.safetensors``/``.sft`` are read with safetensors; anything else with
    ``torch.load(weights_only=True)`` (pickled Python objects other than tensors and
    plain containers are refused, never executed; the Lightning callback class that
    original ``.ckpt`` files reference is read as an inert stub, as ComfyUI does). A
    top-level ``state_dict`` entry (Lightning checkpoints) is unwrapped. Raises
    BaseModelError naming the path for a missing, empty, truncated or otherwise
    unreadable file, and for an OSEDiff weights file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BaseModelError(f"checkpoint {path} does not exist or is not a file")
    if os.path.getsize(path) == 0:
        raise BaseModelError(f"checkpoint {path} is empty (0 bytes)")
    try:
        if path.lower().endswith(_SAFETENSORS_EXTENSIONS):
            from safetensors.torch import load_file

            obj = load_file(path, device="cpu")
        else:
            with lightning_stub_allowed():
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise BaseModelError(
            f"cannot read checkpoint {path}: it references {unsafe_global(str(e))}, which safe (weights-only) "
            f"loading refuses (nothing in it was run); {_NEEDED}, ideally as .safetensors"
        ) from None
    except Exception as e:  # any reader failure is a bad file, reported as such
        raise BaseModelError(
            f"cannot read checkpoint {path} (truncated, corrupt or not a checkpoint): "
            f"{type(e).__name__}: {e}"
        ) from e
    if isinstance(obj, Mapping) and "state_dict_unet" in obj:
        raise BaseModelError(f"{path}: this is an OSEDiff weights file (osediff.pkl), not a base model; {_NEEDED}")
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise BaseModelError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict; {_NEEDED}")
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not sd:
        raise BaseModelError(f"checkpoint {path} contains no tensors; {_NEEDED}")
    return sd


def _sub(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Keys under ``prefix`` with the prefix removed; ``sd`` itself if none has it."""
    sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sub if sub else dict(sd)


def _first(sd: Mapping[str, Tensor], pattern: str) -> tuple[str, Tensor] | None:
    """The first (sorted) key matching a regex, with its tensor."""
    rx = re.compile(pattern)
    for key in sorted(sd):
        if rx.search(key):
            return key, sd[key]
    return None


def detect_family(sd: Mapping[str, Tensor]) -> str:
    """Return ``"sd2-base"`` for an SD 2.x 512 epsilon checkpoint, else raise.

    ``sd`` is a whole single-file state dict (prefixed keys). Refused with a
    BaseModelError naming the family: CCSR-v1 checkpoints (an SD 2.1 UNet plus
    ``control_model.*`` and a GAN-finetuned VAE decoder, not a stock base), SD 1.x
    (768-wide text context or conv ``proj_in``), SDXL (``conditioner.*`` / 2816-wide
    ``label_emb``), SD 2.x unCLIP (``label_emb``), SD 2.x 768-v (a ``v_pred`` key, or
    ComfyUI's rule: std of the last output block's ``norm1.bias`` above 0.09),
    inpainting (9 input channels), other input-channel variants, and files that are no
    SD checkpoint at all.
    Sizes are not checked (tests use tiny models of the same structure).
    """
    unet = {k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    if any(k.startswith("control_model.") for k in sd):
        raise BaseModelError(f"CCSR-v1 checkpoint (control branch control_model.* and a GAN-finetuned VAE "
                             f"decoder): give it as the CCSR weights; as the base, {_NEEDED}")
    if any(k.startswith("conditioner.") for k in sd):
        raise BaseModelError(f"SDXL checkpoint (has conditioner.* text encoders): {_NEEDED}")
    label = unet.get("label_emb.0.0.weight")
    if label is not None and label.ndim == 2 and label.shape[1] == 2816:
        raise BaseModelError(f"SDXL checkpoint (label_emb takes 2816 features): {_NEEDED}")
    conv_in = unet.get("input_blocks.0.0.weight")
    if conv_in is None or conv_in.ndim != 4:
        raise BaseModelError(
            f"not a Stable Diffusion (UNet) checkpoint: no {UNET_PREFIX}input_blocks.0.0.weight (it looks like "
            f"{describe_tensors(sd)}); {_NEEDED}"
        )
    if label is not None or any(k.startswith(("embedder.", "noise_augmentor.")) for k in sd):
        raise BaseModelError(f"SD 2.x unCLIP checkpoint (image-variation model with label_emb): {_NEEDED}")
    to_k = _first(unet, r"\.attn2\.to_k\.weight$")
    proj_in = _first(unet, r"\.1\.proj_in\.weight$")
    if to_k is None or proj_in is None:
        raise BaseModelError(f"not a Stable Diffusion (UNet) checkpoint: its UNet has no cross-attention; {_NEEDED}")
    if to_k[1].shape[-1] == 768 or proj_in[1].ndim == 4:
        raise BaseModelError(
            f"SD 1.x checkpoint (text context {to_k[1].shape[-1]}, "
            f"{'conv' if proj_in[1].ndim == 4 else 'linear'} proj_in): {_NEEDED}"
        )
    in_ch = conv_in.shape[1]
    if in_ch == 9:
        raise BaseModelError(f"inpainting checkpoint (9 input channels): {_NEEDED}")
    if in_ch != 4:
        raise BaseModelError(
            f"SD 2.x variant with {in_ch} input channels (depth, x4-upscaler or instruct-pix2pix): {_NEEDED}"
        )
    if "v_pred" in sd:
        raise BaseModelError(f"SD 2.x 768-v checkpoint (v-prediction, marked by a v_pred key): {_NEEDED}")
    norm = sd.get(_V_PRED_KEY)
    if norm is None:  # smaller models of the same structure: the last output block
        rx = re.compile(r"^output_blocks\.(\d+)\.1\.transformer_blocks\.0\.norm1\.bias$")
        found = [(int(m.group(1)), k) for k in unet if (m := rx.match(k))]
        norm = unet[max(found)[1]] if found else None
    if norm is not None and norm.float().std(unbiased=False).item() > _V_PRED_STD:
        raise BaseModelError(f"SD 2.x 768-v checkpoint (v-prediction, 768 px): {_NEEDED}")
    return "sd2-base"


def infer_unet_config(sd: Mapping[str, Tensor]) -> dict:
    """diffusers ``UNet2DConditionModel`` kwargs read from an ldm UNet's tensor shapes.

    ``sd`` may be the whole single-file state dict or the UNet part without prefix.
    Attention heads follow SD 2.x: ``max(1, channels // 64)`` per block.
    """
    u = _sub(sd, UNET_PREFIX)
    if "input_blocks.0.0.weight" not in u:
        raise BaseModelError("UNet state dict lacks input_blocks.0.0.weight")
    levels: list[dict] = [{"channels": None, "resnets": 0, "attn": False, "depth": 0}]
    n = 1
    while True:
        base = f"input_blocks.{n}."
        if base + "0.op.weight" in u:
            levels.append({"channels": None, "resnets": 0, "attn": False, "depth": 0})
        elif base + "0.out_layers.3.weight" in u:
            level = levels[-1]
            ch = u[base + "0.out_layers.3.weight"].shape[0]
            if level["channels"] not in (None, ch):
                raise BaseModelError(f"UNet input block {n} changes channels inside a level")
            level["channels"] = ch
            level["resnets"] += 1
            depth = 0
            while f"{base}1.transformer_blocks.{depth}.norm1.weight" in u:
                depth += 1
            level["attn"] = level["attn"] or depth > 0
            level["depth"] = max(level["depth"], depth)
        else:
            break
        n += 1
    if not levels[-1]["resnets"] or any(lv["channels"] is None for lv in levels):
        raise BaseModelError("UNet input blocks do not form SD-style levels")
    channels = tuple(lv["channels"] for lv in levels)
    layers = [lv["resnets"] for lv in levels]
    depths = {lv["depth"] for lv in levels if lv["attn"]} or {1}
    mid_depth = 0
    while f"middle_block.1.transformer_blocks.{mid_depth}.norm1.weight" in u:
        mid_depth += 1
    if len(depths) != 1 or mid_depth not in depths:
        raise BaseModelError("UNet has different transformer depths per block; not SD 2.x's structure")
    # Up blocks run deepest first; the first output block of each shows if it attends.
    up_types = []
    n = 0
    for count in reversed(layers):
        up_types.append("CrossAttnUpBlock2D" if f"output_blocks.{n}.1.proj_in.weight" in u else "UpBlock2D")
        n += count + 1
    to_k = _first(u, r"\.attn2\.to_k\.weight$")
    proj_in = _first(u, r"\.1\.proj_in\.weight$")
    if to_k is None or proj_in is None:
        raise BaseModelError("UNet has no cross-attention; not SD 2.x's structure")
    config = dict(UNET_CONFIG)
    config.update(
        in_channels=u["input_blocks.0.0.weight"].shape[1],
        out_channels=u["out.2.weight"].shape[0] if "out.2.weight" in u else 4,
        block_out_channels=channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if lv["attn"] else "DownBlock2D" for lv in levels),
        up_block_types=tuple(up_types),
        layers_per_block=layers[0] if len(set(layers)) == 1 else tuple(layers),
        transformer_layers_per_block=depths.pop(),
        attention_head_dim=[max(1, c // ATTENTION_HEAD_WIDTH) for c in channels],
        cross_attention_dim=to_k[1].shape[1],
        use_linear_projection=proj_in[1].ndim == 2,
    )
    if "time_embed.0.weight" in u and u["time_embed.0.weight"].shape[0] != 4 * channels[0]:
        config["time_embedding_dim"] = u["time_embed.0.weight"].shape[0]
    return config


def infer_vae_config(sd: Mapping[str, Tensor]) -> dict:
    """diffusers ``AutoencoderKL`` kwargs read from an ldm VAE's tensor shapes.

    ``sd`` may be the whole single-file state dict or the VAE part without prefix.
    """
    v = _sub(sd, VAE_PREFIX)
    for key in ("encoder.conv_in.weight", "decoder.conv_out.weight", "post_quant_conv.weight"):
        if key not in v:
            raise BaseModelError(f"VAE state dict lacks {key}")
    channels = []
    while f"encoder.down.{len(channels)}.block.0.conv1.weight" in v:
        channels.append(v[f"encoder.down.{len(channels)}.block.0.conv1.weight"].shape[0])
    layers = 0
    while f"encoder.down.0.block.{layers}.conv1.weight" in v:
        layers += 1
    if not channels:
        raise BaseModelError("VAE state dict has no encoder.down.* blocks")
    config = dict(VAE_CONFIG)
    config.update(
        in_channels=v["encoder.conv_in.weight"].shape[1],
        out_channels=v["decoder.conv_out.weight"].shape[0],
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=tuple(channels),
        layers_per_block=layers,
        latent_channels=v["post_quant_conv.weight"].shape[1],
    )
    return config


def infer_text_config(sd: Mapping[str, Tensor]) -> dict:
    """transformers ``CLIPTextConfig`` kwargs for an OpenCLIP text tower.

    ``sd`` may be the whole single-file state dict or the tower without
    ``cond_stage_model.model.``. ``num_hidden_layers`` is one less than the stored
    blocks (SD 2.x conditions on the penultimate block); heads = max(1, width // 64).
    """
    t = _sub(sd, TEXT_PREFIX)
    for key in ("token_embedding.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight"):
        if key not in t:
            raise BaseModelError(f"text encoder ({TEXT_PREFIX}*, OpenCLIP layout) lacks {key}")
    blocks = 0
    while f"transformer.resblocks.{blocks}.ln_1.weight" in t:
        blocks += 1
    if blocks < 2:
        raise BaseModelError(f"text encoder has {blocks} block(s); SD 2.x uses the penultimate of 24")
    vocab, width = t["token_embedding.weight"].shape
    config = dict(TEXT_ENCODER_CONFIG)
    config.update(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=t["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=blocks - 1,
        num_attention_heads=max(1, width // ATTENTION_HEAD_WIDTH),
        max_position_embeddings=t["positional_embedding"].shape[0],
    )
    return config


@functools.lru_cache(maxsize=1)
def hf_text_prefix() -> str:
    """Key prefix of the installed transformers' ``CLIPTextModel`` state dict:
    ``"text_model."`` (transformers 4.x) or ``""`` (5.x); ``"text_model."`` if
    transformers is not installed."""
    try:
        from transformers import CLIPTextConfig, CLIPTextModel
    except ImportError:
        return keymap.HF_TEXT_PREFIX
    tiny = CLIPTextConfig(  # built on meta: costs nothing
        vocab_size=49408, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=1, max_position_embeddings=4,
    )
    with torch.device("meta"):
        keys = CLIPTextModel(tiny).state_dict().keys()
    return keymap.HF_TEXT_PREFIX if any(k.startswith(keymap.HF_TEXT_PREFIX) for k in keys) else ""


def split_single_file(
    path: str | os.PathLike,
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor], dict, dict, dict]:
    """Read an SD 2.x-base single-file checkpoint into diffusers-keyed parts.

    Returns ``(unet_sd, vae_sd, text_sd, unet_config, vae_config, text_config)``:
    ``UNet2DConditionModel(**unet_config).load_state_dict(unet_sd)``,
    ``AutoencoderKL(**vae_config).load_state_dict(vae_sd)`` and
    ``CLIPTextModel(CLIPTextConfig(**text_config)).load_state_dict(text_sd)`` all load
    strictly. Tensors keep the file's dtype. Raises BaseModelError (naming the path)
    for unreadable files, other model families and keys that do not fit.
    """
    sd = read_state_dict(path)
    try:
        detect_family(sd)
        for prefix in (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX):
            if not any(k.startswith(prefix) for k in sd):
                raise BaseModelError(f"no {prefix}* tensors in the file")
        unet_config = infer_unet_config(sd)
        vae_config = infer_vae_config(sd)
        text_config = infer_text_config(sd)
        unet_sd = keymap.unet_ldm_to_diffusers(_sub(sd, UNET_PREFIX), unet_config)
        vae_sd = keymap.vae_ldm_to_diffusers(_sub(sd, VAE_PREFIX), vae_config)
        text_sd = keymap.text_openclip_to_hf(
            _sub(sd, TEXT_PREFIX), text_config["num_hidden_layers"], prefix=hf_text_prefix()
        )
    except BaseModelError as e:
        raise BaseModelError(f"{os.fspath(path)}: {e}") from e
    return unet_sd, vae_sd, text_sd, unet_config, vae_config, text_config
