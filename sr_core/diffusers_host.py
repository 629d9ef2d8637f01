"""SD 2.1-base through diffusers: the host the CLI and the tests use.

Loads a diffusers folder (unet/, vae/, text_encoder/, tokenizer/) or a single-file
.safetensors/.ckpt checkpoint, checks that it is SD 2.x-base (epsilon), implements the
Denoiser and Autoencoder protocols and merges OSEDiff weights into the loaded modules.
The host owns its modules: merging changes them in place (load again for a clean base).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from .errors import BaseModelError
from .osediff import OSEDiffWeights
from .schedule import sd_alphas_cumprod

DEFAULT_SCALE_FACTOR = 0.18215
DIFFUSERS_PARTS = ("unet", "vae", "text_encoder", "tokenizer")


def check_sd2_base(unet_config: dict, text_hidden_size: int | None, prediction_type: str | None, where: str) -> None:
    """Refuse a base model that is not SD 2.x-base (epsilon, 4-channel latent, linear-projection UNet)."""
    def refuse(what: str) -> None:
        raise BaseModelError(f"{where}: {what}; OSEDiff needs SD 2.1-base (512 px, epsilon prediction)")

    if unet_config.get("addition_embed_type") or unet_config.get("class_embed_type") \
            or unet_config.get("projection_class_embeddings_input_dim"):
        refuse("this UNet takes extra embeddings (SDXL or an unCLIP model)")
    if unet_config.get("in_channels", 4) != 4:
        refuse(f"this UNet takes {unet_config.get('in_channels')} input channels (an inpainting or upscaler model)")
    if not unet_config.get("use_linear_projection", False):
        refuse("this looks like SD 1.x (convolutional attention projections)")
    cross = unet_config.get("cross_attention_dim")
    if isinstance(cross, (list, tuple)):
        cross = cross[0]
    if cross == 768:
        refuse("the UNet's text context is 768-wide (SD 1.x)")
    if cross == 2048:
        refuse("the UNet's text context is 2048-wide (SDXL)")
    if text_hidden_size is not None and cross != text_hidden_size:
        refuse(f"the UNet expects {cross}-wide text context but the text encoder gives {text_hidden_size}")
    if prediction_type not in (None, "epsilon"):
        refuse(f"it predicts {prediction_type!r} (SD 2.x 768-v models predict v)")
    if unet_config.get("sample_size") == 96:
        refuse("its native latent size is 96 (SD 2.x 768-v)")


def _folder_hint(p: Path) -> str:
    """What a folder that is no diffusers pipeline looks like, for the refusal message ('' if unknown)."""
    if (p / "controlnet").is_dir():
        return "; it looks like a CCSR-v2 release (controlnet/): give it as the CCSR weights"
    if (p / "config.json").is_file():
        try:
            cls = json.loads((p / "config.json").read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            cls = None
        return f"; it looks like one diffusers component ({cls or 'config.json'}), not a whole pipeline"
    return ""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BaseModelError(f"{path}: unreadable config ({e})") from None


class DiffusersSD21:
    """SD 2.1-base modules on one device and dtype; a Denoiser and an Autoencoder."""

    def __init__(self, unet, vae, text_encoder, tokenizer, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, source: str = "model") -> None:
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.source = source
        self.device = torch.device(device)
        self.dtype = dtype
        self.alphas_cumprod = sd_alphas_cumprod()
        self.scale_factor = float(getattr(vae.config, "scaling_factor", None) or DEFAULT_SCALE_FACTOR)
        self._prompt_cache: dict[str, Tensor] = {}
        for m in (unet, vae, text_encoder):
            m.eval().requires_grad_(False)

    # -- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, tokenizer: str | os.PathLike | None = None) -> "DiffusersSD21":
        """Load SD 2.1-base from a diffusers folder or a single-file checkpoint (modules in fp32 on the CPU
        until :meth:`to_compute` moves them)."""
        p = Path(path)
        if p.is_dir():
            host = cls._load_folder(p)
        elif p.is_file():
            host = cls._load_single_file(p, tokenizer)
        else:
            raise BaseModelError(f"{p}: base model not found (expected a diffusers folder of SD 2.1-base or a "
                                 f".safetensors/.ckpt checkpoint)")
        host.device, host.dtype = torch.device(device), dtype
        return host

    @classmethod
    def _load_folder(cls, p: Path) -> "DiffusersSD21":
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        missing = [s for s in DIFFUSERS_PARTS if not (p / s).is_dir()]
        if missing:
            raise BaseModelError(f"{p}: not a diffusers SD 2.1-base folder (missing "
                                 f"{', '.join(s + '/' for s in missing)}){_folder_hint(p)}")
        unet_cfg = _read_json(p / "unet" / "config.json")
        sched = p / "scheduler" / "scheduler_config.json"
        pred = _read_json(sched).get("prediction_type", "epsilon") if sched.is_file() else None
        text_cfg = _read_json(p / "text_encoder" / "config.json")
        check_sd2_base(unet_cfg, text_cfg.get("hidden_size"), pred, str(p))
        try:
            unet = UNet2DConditionModel.from_pretrained(p, subfolder="unet", local_files_only=True,
                                                        torch_dtype=torch.float32)
            vae = AutoencoderKL.from_pretrained(p, subfolder="vae", local_files_only=True, torch_dtype=torch.float32)
            text = CLIPTextModel.from_pretrained(p / "text_encoder", local_files_only=True, dtype=torch.float32)
            tok = CLIPTokenizer.from_pretrained(p / "tokenizer", local_files_only=True)
        except BaseModelError:
            raise
        except Exception as e:  # diffusers/transformers raise many types for a broken folder
            raise BaseModelError(f"{p}: could not load the SD 2.1-base folder: {str(e).splitlines()[0]}") from None
        return cls(unet, vae, text, tok, source=str(p))

    @classmethod
    def _load_single_file(cls, p: Path, tokenizer: str | os.PathLike | None) -> "DiffusersSD21":
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from .checkpoint import split_single_file

        unet_sd, vae_sd, text_sd, unet_cfg, vae_cfg, text_cfg = split_single_file(p)
        check_sd2_base(unet_cfg, text_cfg.get("hidden_size"), "epsilon", str(p))
        tok = load_clip_tokenizer(p, tokenizer)
        with torch.device("meta"):  # no random init of ~1 G parameters that are overwritten next
            unet = UNet2DConditionModel(**unet_cfg)
            vae = AutoencoderKL(**vae_cfg)
        text = CLIPTextModel(CLIPTextConfig(**text_cfg))  # on the CPU: it has non-persistent buffers
        for name, module, sd in (("UNet", unet, unet_sd), ("VAE", vae, vae_sd), ("text encoder", text, text_sd)):
            try:
                module.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
            except RuntimeError as e:
                raise BaseModelError(f"{p}: the {name} weights do not fit SD 2.1-base: {str(e).splitlines()[0]}") from None
            left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
            if left:
                raise BaseModelError(f"{p}: the {name} has no value for {left[0]!r}")
        return cls(unet, vae, text, tok, source=str(p))

    def to_compute(self) -> "DiffusersSD21":
        """Move the modules to the compute device and dtype (after any weight merge)."""
        for m in (self.unet, self.vae, self.text_encoder):
            m.to(device=self.device, dtype=self.dtype)
        return self

    # -- method weights ------------------------------------------------------------------
    def unet_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.unet.state_dict().items()}

    def vae_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.vae.state_dict().items()}

    @torch.no_grad()
    def apply_osediff(self, weights: OSEDiffWeights) -> None:
        """Merge OSEDiff into the loaded UNet and VAE encoder (in place, computed in fp32)."""
        weights.check_fits(self.unet_shapes(), self.vae_shapes())
        w, b = weights.conv_in(torch.float32)
        _merge(self.unet, {"conv_in.weight": w, "conv_in.bias": b},
               ((f"{m}.weight", p, weights.unet_scale) for m, p in weights.unet_lora.items() if m != "conv_in"))
        _merge(self.vae, {}, ((f"{m}.weight", p, weights.vae_scale) for m, p in weights.vae_lora.items()))

    # -- protocols -----------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> Tensor:
        """Text embedding (1, 77, D) of ``prompt`` (last hidden state, SD 2.x's penultimate layer)."""
        if prompt not in self._prompt_cache:
            ids = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            out = self.text_encoder(ids.to(self.device))[0]
            self._prompt_cache[prompt] = out.float()
        return self._prompt_cache[prompt]

    @torch.no_grad()
    def predict_eps(self, x_t: Tensor, t: int, context: Tensor, control: object | None = None) -> Tensor:
        x = x_t.to(self.device, self.dtype)
        ctx = context.to(self.device, self.dtype)
        if ctx.shape[0] == 1 and x.shape[0] > 1:
            ctx = ctx.expand(x.shape[0], -1, -1)
        kwargs = {}
        if control is not None:
            down, mid = control
            kwargs = {"down_block_additional_residuals": [d.to(self.device, self.dtype) for d in down],
                      "mid_block_additional_residual": mid.to(self.device, self.dtype)}
        ts = torch.full((x.shape[0],), int(t), device=self.device, dtype=torch.long)
        return self.unet(x, ts, encoder_hidden_states=ctx, **kwargs).sample

    @torch.no_grad()
    def encode_moments(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        return dist.mean.float(), dist.logvar.float()

    @torch.no_grad()
    def decode(self, raw: Tensor) -> Tensor:
        return self.vae.decode(raw.to(self.device, self.dtype)).sample


def _merge(module: torch.nn.Module, replace: dict[str, Tensor], pairs) -> None:
    """Set ``replace`` and add scale·B@A of each (key, LoraPair, scale), one module at a time
    (fp32; the transient memory is one ΔW, not all of them)."""
    params = dict(module.named_parameters())
    for key, value in replace.items():
        params[key].data.copy_(value.to(params[key].dtype))
    for key, pair, scale in pairs:
        p = params[key]
        merged = p.data.float() + pair.delta(scale).reshape(p.shape)
        p.data.copy_(merged.to(p.dtype))


def load_clip_tokenizer(checkpoint: Path, explicit: str | os.PathLike | None = None):
    """Find the CLIP BPE tokenizer for a single-file checkpoint (which does not carry one).

    Looks, in order, at: ``explicit``; a ``tokenizer/`` folder next to the checkpoint;
    ComfyUI's bundled tokenizer (``$COMFYUI_DIR/comfy/sd1_tokenizer``). SD 2.x pads with
    "!" (id 0).
    """
    from transformers import CLIPTokenizer

    candidates = [Path(explicit)] if explicit else []
    candidates.append(checkpoint.parent / "tokenizer")
    if os.environ.get("COMFYUI_DIR"):
        candidates.append(Path(os.environ["COMFYUI_DIR"]) / "comfy" / "sd1_tokenizer")
    for c in candidates:
        if (c / "vocab.json").is_file() and (c / "merges.txt").is_file():
            try:
                return CLIPTokenizer(str(c / "vocab.json"), str(c / "merges.txt"), pad_token="!", model_max_length=77)
            except Exception as e:
                raise BaseModelError(f"{c}: unreadable CLIP tokenizer ({e})") from None
    raise BaseModelError(
        f"{checkpoint}: a single-file checkpoint carries no tokenizer; put the CLIP tokenizer (vocab.json, "
        f"merges.txt) in {checkpoint.parent / 'tokenizer'}, pass --tokenizer DIR, or set COMFYUI_DIR "
        f"(looked in: {', '.join(str(c) for c in candidates)})")
