"""OSEDiff: the official weights file and the one-step sampler.

Weights: ``osediff.pkl`` as released (a torch.save'd dict, read with
``weights_only=True``) or our ``.safetensors`` form of the same content. The UNet gets
258 LoRA deltas (3 peft adapters) plus a fully fine-tuned ``conv_in`` that replaces SD's;
the VAE encoder and ``quant_conv`` get 32 LoRA deltas. LoRA scale = 8 / rank (peft's
default alpha 8, not stored in the file).

Sampler (scaled latents, timestep 999 of the 1000-step SD schedule):
    z  = 0.18215 · E'(2·up − 1)              (posterior mean, or a seeded sample)
    ε  = UNet'(z, 999, c)                     (one call, no CFG)
    x0 = (z − √(1−ᾱ₉₉₉)·ε) / √ᾱ₉₉₉           (float32, no clamp)
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .errors import WeightsError
from .files import OSEDIFF_FORMAT, check_weights_path, describe_tensors, lightning_stub_allowed, unsafe_global
from .lora import LoraPair, parse_peft_state_dict
from .protocols import Denoiser
from .schedule import predict_x0

T_ONE_STEP = 999
PEFT_DEFAULT_ALPHA = 8.0

UNET_GROUPS = ("unet_lora_encoder_modules", "unet_lora_decoder_modules", "unet_lora_others_modules")
VAE_GROUP = "vae_lora_encoder_modules"
REQUIRED_KEYS = UNET_GROUPS + (VAE_GROUP, "rank_unet", "rank_vae", "state_dict_unet", "state_dict_vae")
CONV_IN_WEIGHT = "conv_in.base_layer.weight"
CONV_IN_BIAS = "conv_in.base_layer.bias"
SAFETENSORS_FORMAT = OSEDIFF_FORMAT
_EXPECTED = ("expected the official osediff.pkl (cswry/OSEDiff, preset/models) or its .safetensors form "
             "written by `python -m sr_core convert-weights`")


@dataclass
class OSEDiffWeights:
    """The content of an OSEDiff weights file, with diffusers module names.

    ``unet_lora`` / ``vae_lora``: {module: LoraPair}; ``conv_in_weight`` (320, 4, 3, 3)
    and ``conv_in_bias`` (320,) replace SD's conv_in before its LoRA delta is added.
    """

    source: str
    rank_unet: int
    rank_vae: int
    unet_lora: dict[str, LoraPair]
    vae_lora: dict[str, LoraPair]
    conv_in_weight: Tensor
    conv_in_bias: Tensor
    module_lists: dict[str, list[str]] = field(default_factory=dict)

    @property
    def unet_scale(self) -> float:
        return PEFT_DEFAULT_ALPHA / self.rank_unet

    @property
    def vae_scale(self) -> float:
        return PEFT_DEFAULT_ALPHA / self.rank_vae

    def unet_weights(self, dtype: torch.dtype = torch.float32) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(replacements, deltas) for the UNet, keyed by diffusers parameter name.

        ``replacements``: ``conv_in.weight`` (base_layer weight + its LoRA delta, i.e. the
        final conv_in weight) and ``conv_in.bias``. ``deltas``: ΔW for every other module,
        to be added to the base model's weight.
        """
        deltas = {f"{m}.weight": p.delta(self.unet_scale, dtype) for m, p in self.unet_lora.items() if m != "conv_in"}
        weight, bias = self.conv_in(dtype)
        return {"conv_in.weight": weight, "conv_in.bias": bias}, deltas

    def conv_in(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """The final conv_in (weight, bias): the file's base_layer plus conv_in's own LoRA delta."""
        weight = self.conv_in_weight.to(dtype)
        if "conv_in" in self.unet_lora:
            weight = weight + self.unet_lora["conv_in"].delta(self.unet_scale, dtype)
        return weight, self.conv_in_bias.to(dtype)

    def vae_deltas(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """ΔW for the VAE encoder and quant_conv, keyed by diffusers parameter name."""
        return {f"{m}.weight": p.delta(self.vae_scale, dtype) for m, p in self.vae_lora.items()}

    def check_fits(self, unet_shapes: dict[str, tuple[int, ...]], vae_shapes: dict[str, tuple[int, ...]]) -> None:
        """Raise WeightsError naming the first key whose shape does not fit the base model.

        ``*_shapes`` map diffusers parameter names of the base model to weight shapes.
        A Linear ΔW may meet a 1×1 conv (or the reverse): that fits.
        """
        def squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
            return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape

        wanted = [(f"{m}.weight", p.delta_shape(), unet_shapes, "UNet") for m, p in self.unet_lora.items()]
        wanted.append(("conv_in.weight", tuple(self.conv_in_weight.shape), unet_shapes, "UNet"))
        wanted.append(("conv_in.bias", tuple(self.conv_in_bias.shape), unet_shapes, "UNet"))
        wanted += [(f"{m}.weight", p.delta_shape(), vae_shapes, "VAE") for m, p in self.vae_lora.items()]
        for key, shape, table, part in sorted(wanted, key=lambda w: (w[3] != "UNet", w[0])):
            if key not in table:
                raise WeightsError(f"{self.source}: {part} key {key!r} has no counterpart in the base model; "
                                   f"is the base model SD 2.1-base?")
            if squeeze(tuple(table[key])) != squeeze(shape):
                raise WeightsError(
                    f"{self.source}: {part} key {key!r} has shape {shape} but the base model's is "
                    f"{tuple(table[key])}; these weights were made for another base model (OSEDiff needs SD 2.1-base)"
                )

    def to_official_dict(self) -> dict:
        """The content in the official ``osediff.pkl`` dict layout (for writing)."""
        def peft_sd(pairs: dict[str, LoraPair]) -> dict[str, Tensor]:
            out: dict[str, Tensor] = {}
            for m, p in pairs.items():
                out[f"{m}.lora_A.{p.adapter}.weight"] = p.down
                out[f"{m}.lora_B.{p.adapter}.weight"] = p.up
            return out

        sd_unet = peft_sd(self.unet_lora)
        sd_unet[CONV_IN_WEIGHT] = self.conv_in_weight
        sd_unet[CONV_IN_BIAS] = self.conv_in_bias
        d: dict = {k: list(self.module_lists.get(k, [])) for k in UNET_GROUPS + (VAE_GROUP,)}
        d.update(rank_unet=self.rank_unet, rank_vae=self.rank_vae, state_dict_unet=sd_unet,
                 state_dict_vae=peft_sd(self.vae_lora))
        return d


def _strip_prefix(sd: dict[str, Tensor], prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


def parse_official_dict(d: object, source: str) -> OSEDiffWeights:
    """Validate and convert the official dict layout; WeightsError on anything off."""
    if not isinstance(d, dict):
        raise WeightsError(f"{source}: not an OSEDiff checkpoint (top level is {type(d).__name__}, expected a dict "
                           f"with keys {', '.join(REQUIRED_KEYS)})")
    missing = [k for k in REQUIRED_KEYS if k not in d]
    if missing:
        found = f"found keys: {', '.join(sorted(map(str, d))[:8]) or 'none'}"
        if len(missing) < len(REQUIRED_KEYS):
            raise WeightsError(f"{source}: an incomplete OSEDiff checkpoint: missing key {missing[0]!r} ({found})")
        inner = d.get("state_dict") if isinstance(d.get("state_dict"), dict) else d
        looks = describe_tensors(k for k in inner if isinstance(k, str))
        raise WeightsError(f"{source}: not an OSEDiff checkpoint: it looks like {looks} (no key "
                           f"{missing[0]!r}; {found}); {_EXPECTED}")
    ranks = {}
    for k in ("rank_unet", "rank_vae"):
        r = d[k]
        if isinstance(r, Tensor) and r.numel() == 1:
            r = int(r.item())
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise WeightsError(f"{source}: key {k!r} must be a positive int, got {r!r}")
        ranks[k] = r
    for k in ("state_dict_unet", "state_dict_vae"):
        if not isinstance(d[k], dict) or not d[k]:
            raise WeightsError(f"{source}: key {k!r} must be a non-empty dict of tensors")
    module_lists: dict[str, list[str]] = {}
    for k in UNET_GROUPS + (VAE_GROUP,):
        if not isinstance(d[k], (list, tuple)) or not all(isinstance(s, str) for s in d[k]):
            raise WeightsError(f"{source}: key {k!r} must be a list of module names")
        module_lists[k] = list(d[k])

    sd_unet = _strip_prefix(d["state_dict_unet"], ("base_model.model.", "unet."))
    sd_vae = _strip_prefix(d["state_dict_vae"], ("base_model.model.", "vae."))
    for k in (CONV_IN_WEIGHT, CONV_IN_BIAS):
        if k not in sd_unet:
            raise WeightsError(f"{source}: state_dict_unet lacks {k!r} (the fine-tuned conv_in); not an OSEDiff checkpoint")
    unet_lora = parse_peft_state_dict(sd_unet, source, "state_dict_unet")
    vae_lora = parse_peft_state_dict(sd_vae, source, "state_dict_vae")
    stray = sorted(k for k in sd_unet if k not in (CONV_IN_WEIGHT, CONV_IN_BIAS) and ".lora_" not in k)
    stray += sorted(k for k in sd_vae if ".lora_" not in k)
    if stray:
        raise WeightsError(f"{source}: unexpected key {stray[0]!r}; expected only LoRA tensors and conv_in.base_layer")
    for part, pairs, rank in (("state_dict_unet", unet_lora, ranks["rank_unet"]),
                              ("state_dict_vae", vae_lora, ranks["rank_vae"])):
        if not pairs:
            raise WeightsError(f"{source}: {part} holds no LoRA tensors; not an OSEDiff checkpoint")
        for m, p in pairs.items():
            if p.rank != rank:
                raise WeightsError(f"{source}: {part} key {m}.lora_A.{p.adapter}.weight has rank {p.rank} "
                                   f"but the file says rank {rank}")
    for group, pairs, part in [(g, unet_lora, "state_dict_unet") for g in UNET_GROUPS] + [(VAE_GROUP, vae_lora, "state_dict_vae")]:
        for m in module_lists[group]:
            if m not in pairs:
                raise WeightsError(f"{source}: module {m!r} is listed in {group!r} but {part} has no "
                                   f"{m}.lora_A/lora_B tensors")
    cw, cb = sd_unet[CONV_IN_WEIGHT], sd_unet[CONV_IN_BIAS]
    if cw.dim() != 4 or cb.dim() != 1 or cw.shape[0] != cb.shape[0]:
        raise WeightsError(f"{source}: {CONV_IN_WEIGHT!r} {tuple(cw.shape)} / {CONV_IN_BIAS!r} {tuple(cb.shape)} "
                           f"are not a conv weight and bias")
    return OSEDiffWeights(source=source, rank_unet=ranks["rank_unet"], rank_vae=ranks["rank_vae"],
                          unet_lora=unet_lora, vae_lora=vae_lora, conv_in_weight=cw, conv_in_bias=cb,
                          module_lists=module_lists)


def _read_safetensors(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != SAFETENSORS_FORMAT:  # decided from the header: no tensor is read
                raise WeightsError(f"{path}: not an OSEDiff safetensors file: it looks like "
                                   f"{describe_tensors(f.keys(), meta)} (metadata 'format' is {meta.get('format')!r}, "
                                   f"not {SAFETENSORS_FORMAT!r}); {_EXPECTED}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except WeightsError:
        raise
    except Exception as e:  # safetensors raises several types for a damaged header
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        d: dict = {k: json.loads(meta[k]) for k in UNET_GROUPS + (VAE_GROUP,)}
        d["rank_unet"] = int(meta["rank_unet"])
        d["rank_vae"] = int(meta["rank_vae"])
    except (KeyError, ValueError) as e:
        raise WeightsError(f"{path}: OSEDiff safetensors metadata is incomplete ({e})") from None
    d["state_dict_unet"] = {k[5:]: v for k, v in tensors.items() if k.startswith("unet.")}
    d["state_dict_vae"] = {k[4:]: v for k, v in tensors.items() if k.startswith("vae.")}
    return d


def _read_pickle(path: Path) -> object:
    """``torch.load(weights_only=True)``; the Lightning callback class of ``.ckpt`` files is read as
    an inert stub (so such a file is described by its content), any other global is refused."""
    try:
        with lightning_stub_allowed():
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        name = unsafe_global(str(e))
        looks = " (a PyTorch Lightning training checkpoint)" if name.startswith("pytorch_lightning.") else ""
        raise WeightsError(f"{path}: refused to load: the pickle references {name}{looks}, which is not a tensor "
                           f"or a plain container; nothing in it was run. Not an OSEDiff checkpoint; "
                           f"{_EXPECTED}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint (truncated or another format: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def load_osediff_weights(path: str | os.PathLike) -> OSEDiffWeights:
    """Read an OSEDiff weights file (.pkl/.pt/.ckpt/.pth official format, or .safetensors)."""
    p = Path(path)
    check_weights_path(p, "OSEDiff weights file")
    if not p.is_file():
        raise WeightsError(f"{p}: OSEDiff weights must be one file (osediff.pkl or .safetensors), not a folder")
    d = _read_safetensors(p) if p.suffix.lower() == ".safetensors" else _read_pickle(p)
    return parse_official_dict(d, str(p))


def save_osediff_safetensors(weights: OSEDiffWeights, path: str | os.PathLike) -> None:
    """Write ``weights`` as our safetensors form (tensors ``unet.*``/``vae.*``; lists and ranks in metadata)."""
    from safetensors.torch import save_file

    d = weights.to_official_dict()
    tensors = {f"unet.{k}": v.contiguous() for k, v in d["state_dict_unet"].items()}
    tensors.update({f"vae.{k}": v.contiguous() for k, v in d["state_dict_vae"].items()})
    meta = {k: json.dumps(d[k]) for k in UNET_GROUPS + (VAE_GROUP,)}
    meta.update(format=SAFETENSORS_FORMAT, rank_unet=str(d["rank_unet"]), rank_vae=str(d["rank_vae"]))
    save_file(tensors, str(path), metadata=meta)


def one_step_x0(denoiser: Denoiser, z: Tensor, context: Tensor) -> Tensor:
    """OSEDiff's one step: ε = UNet'(z, 999, context); returns x0 in float32 (scaled latent).

    ``z``: scaled LQ latent (N, 4, h, w); ``context``: text embedding (N or 1, 77, D).
    """
    eps = denoiser.predict_eps(z, T_ONE_STEP, context)
    return predict_x0(z, eps, denoiser.alphas_cumprod[T_ONE_STEP])
