"""Tiny random CCSR weights in BOTH official layouts, built at test time on the CPU.

- v2: a ``controlnet/`` folder (config.json like the official one, with
  ``use_vae_encode_condition: true`` and the unused pixel-embedding fields; keys of a
  diffusers ControlNet with ``condition_conv_in`` and no ``controlnet_cond_embedding``) and a
  ``vae/`` folder (stock AutoencoderKL, encoder = the base's, decoder "GAN-finetuned" = perturbed).
- v1: a Lightning-style ``real-world_ccsr.ckpt`` pickle whose ``callbacks`` dict is keyed by
  ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`` (a stand-in class with that
  module/qualname, registered in ``sys.modules`` only while pickling: pytorch_lightning is never
  imported), ``state_dict`` with ``control_model.`` (8-channel input conv), ``first_stage_model.``
  (GAN decoder), ``model.diffusion_model.``, ``cond_encoder.``, ``cond_stage_model.``,
  ``decoder_loss.`` and bare schedule buffers; and its flat fp16/fp32 safetensors copies.
- A pickle referencing ``os.system`` (must be refused without running).

The random control weights are written independently of sr_core.ccsr (stock diffusers
ControlNetModel + the existing, separately tested ``sr_core.keymap`` UNet map), so loading them
checks our conversion rather than re-reading our own output.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import sys
import types
from collections import OrderedDict
from pathlib import Path

import torch

import tiny_models
from tiny_models import TINY_UNET

CONTROL_CONFIG = dict(
    in_channels=4, block_out_channels=TINY_UNET["block_out_channels"], down_block_types=TINY_UNET["down_block_types"],
    layers_per_block=2, attention_head_dim=TINY_UNET["attention_head_dim"], cross_attention_dim=32,
    use_linear_projection=True, norm_num_groups=32,
)


def official_v2_config() -> dict:
    """config.json as ``ControlNetModel.from_unet(unet, use_vae_encode_condition=True)`` saves it (tiny sizes)."""
    return {
        "_class_name": "ControlNetModel", "_diffusers_version": "0.21.0",
        "_name_or_path": "preset/models/pretrained_controlnet", "act_fn": "silu", "addition_embed_type": None,
        "addition_embed_type_num_heads": 64, "addition_time_embed_dim": None,
        "attention_head_dim": list(TINY_UNET["attention_head_dim"]),
        "block_out_channels": list(TINY_UNET["block_out_channels"]), "class_embed_type": None,
        "conditioning_channels": 3, "conditioning_embedding_out_channels": [16, 32, 96, 256],
        "controlnet_conditioning_channel_order": "rgb", "cross_attention_dim": 32,
        "down_block_types": list(TINY_UNET["down_block_types"]), "downsample_padding": 1,
        "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0,
        "global_pool_conditions": False, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
        "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None,
        "only_cross_attention": False, "projection_class_embeddings_input_dim": None,
        "resnet_time_scale_shift": "default", "transformer_layers_per_block": 1, "upcast_attention": False,
        "use_linear_projection": True, "use_vae_encode_condition": True,
    }


def _randomize(module: torch.nn.Module, g: torch.Generator, skip: tuple[str, ...] = ()) -> None:
    """Every parameter random (norm weights around 1, the rest small), zero convs included."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith(skip):
                continue
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            else:
                fan_in = max(1, p[0].numel())
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)


def stock_controlnet(in_channels: int = 4, seed: int = 0):
    """A stock diffusers ControlNetModel of the tiny size with random weights (its pixel-hint
    embedding keeps its zero output conv, so it adds nothing)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel(**{**CONTROL_CONFIG, "in_channels": in_channels})
    _randomize(net, torch.Generator().manual_seed(100 + seed), skip=("controlnet_cond_embedding.",))
    return net.eval()


def v2_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Official v2 controlnet keys: a diffusers ControlNet with condition_conv_in, no controlnet_cond_embedding
    (a new dict each call; the tensors are shared, do not modify them in place)."""
    return dict(_v2_state_dict(seed))


@functools.lru_cache(maxsize=4)
def _v2_state_dict(seed: int) -> dict[str, torch.Tensor]:
    net = stock_controlnet(4, seed)
    sd = {k: v.detach().clone() for k, v in net.state_dict().items() if not k.startswith("controlnet_cond_embedding.")}
    g = torch.Generator().manual_seed(200 + seed)
    width = CONTROL_CONFIG["block_out_channels"][0]
    sd["condition_conv_in.weight"] = torch.randn(width, 4, 3, 3, generator=g) / 6.0
    sd["condition_conv_in.bias"] = 0.02 * torch.randn(width, generator=g)
    return sd


@functools.lru_cache(maxsize=1)
def base_models():
    """``tiny_models.build_models(0)``: the modules of the ``sd_folder`` fixture (do not modify them)."""
    return tiny_models.build_models(0)


@functools.lru_cache(maxsize=2)
def gan_vae(seed: int = 7):
    """The tiny base VAE with a perturbed ("GAN-finetuned") decoder and post_quant_conv (shared: do not modify)."""
    vae = copy.deepcopy(base_models()[1])
    g = torch.Generator().manual_seed(300 + seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.startswith(("decoder.", "post_quant_conv.")):
                p.add_(0.05 * torch.randn(p.shape, generator=g) * (p.abs().mean() + 1e-3))
    return vae.eval()


def write_v2_folder(root: Path, seed: int = 0, *, bin_format: bool = False, config: dict | None = None,
                    state_dict: dict | None = None, with_vae: bool = True) -> Path:
    """``root/controlnet/{config.json, diffusion_pytorch_model.safetensors|.bin}`` and ``root/vae/``."""
    from safetensors.torch import save_file

    cdir = root / "controlnet"
    cdir.mkdir(parents=True, exist_ok=True)
    (cdir / "config.json").write_text(json.dumps(config or official_v2_config(), indent=2))
    sd = state_dict if state_dict is not None else v2_state_dict(seed)
    if bin_format:
        torch.save(sd, str(cdir / "diffusion_pytorch_model.bin"))
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(cdir / "diffusion_pytorch_model.safetensors"))
    if with_vae:
        gan_vae().save_pretrained(root / "vae")
    return root


# ------------------------------------------------------------------------------------ v1

def _zero_conv_names(n_skips: int) -> dict[str, str]:
    names = {f"controlnet_down_blocks.{i}": f"zero_convs.{i}.0" for i in range(n_skips)}
    names["controlnet_mid_block"] = "middle_block_out.0"
    return names


def v1_control(seed: int = 1):
    """(ldm control_model state dict without prefix, the stock 8-channel diffusers ControlNet it came from).

    Encoder names come from ``keymap.unet_module_map`` (the tested UNet map); the zero-conv
    names are the ldm ControlNet's (``zero_convs.{i}.0``, ``middle_block_out.0``). The dict is new
    on every call; the tensors and the module are shared (do not modify them in place).
    """
    sd, net = _v1_control(seed)
    return dict(sd), net


@functools.lru_cache(maxsize=2)
def _v1_control(seed: int):
    from sr_core import keymap

    net = stock_controlnet(8, seed)
    names = {d: l for d, l in keymap.unet_module_map(TINY_UNET).items()
             if d == "conv_in" or d.startswith(("time_embedding.", "down_blocks.", "mid_block."))}
    names.update(_zero_conv_names(len(net.controlnet_down_blocks)))
    sd = {}
    for key, value in net.state_dict().items():
        if key.startswith("controlnet_cond_embedding."):
            continue
        module, _, param = key.rpartition(".")
        sd[f"{names[module]}.{param}"] = value.detach().clone()
    return sd, net


@contextlib.contextmanager
def fake_class(qualified_name: str):
    """Make ``qualified_name`` (e.g. ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint``)
    resolvable for pickle as a plain stand-in class while the block runs: its module and the parent
    packages are put in sys.modules and restored afterwards. Nothing real is imported."""
    module_name, _, cls_name = qualified_name.rpartition(".")
    parts = module_name.split(".")
    names = [".".join(parts[:i + 1]) for i in range(len(parts))]
    saved = {n: sys.modules.get(n) for n in names}
    mods = {n: types.ModuleType(n) for n in names}
    stand_in = type(cls_name, (), {"__module__": module_name, "__qualname__": cls_name})
    setattr(mods[module_name], cls_name, stand_in)
    for parent, child in zip(names, names[1:]):
        setattr(mods[parent], child.rpartition(".")[2], mods[child])
    sys.modules.update(mods)
    try:
        yield stand_in
    finally:
        for n in names:
            if saved[n] is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = saved[n]


def fake_lightning():
    """The ``ModelCheckpoint`` stand-in the v1 checkpoint's callbacks dict is keyed by."""
    return fake_class("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")


def v1_state_dict(seed: int = 1) -> OrderedDict:
    """The full ``state_dict`` of a CCSR-v1 Lightning checkpoint (tiny), every prefix of the real one."""
    from sr_core import keymap
    from tiny_models import TINY_VAE

    control, _ = v1_control(seed)
    unet, base_vae, text = base_models()
    gvae = gan_vae()
    sd: OrderedDict = OrderedDict()
    for k, v in keymap.unet_diffusers_to_ldm(unet.state_dict(), TINY_UNET).items():
        sd[f"model.diffusion_model.{k}"] = v
    for k, v in control.items():
        sd[f"control_model.{k}"] = v
    for k, v in keymap.vae_diffusers_to_ldm(gvae.state_dict(), TINY_VAE).items():
        sd[f"first_stage_model.{k}"] = v
    for k, v in keymap.vae_diffusers_to_ldm(base_vae.state_dict(), TINY_VAE).items():
        if k.startswith(("encoder.", "quant_conv.")):
            sd[f"cond_encoder.{k}"] = v
    for k, v in keymap.text_hf_to_openclip(text.state_dict()).items():
        sd[f"cond_stage_model.model.{k}"] = v
    g = torch.Generator().manual_seed(9)
    sd["decoder_loss.logvar"] = torch.zeros(())
    sd["decoder_loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4, generator=g)
    sd["decoder_loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(8, 3, 3, 3, generator=g)
    ac = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0)
    sd["betas"] = (1 - ac / torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])).float()
    sd["alphas_cumprod"] = ac.float()
    sd["alphas_cumprod_inter"] = ac[:45].float()
    sd["logvar"] = torch.zeros(1000)
    return sd


def write_v1_ckpt(path: Path, seed: int = 1) -> Path:
    """A Lightning-style ``real-world_ccsr.ckpt`` (callbacks keyed by the ModelCheckpoint class)."""
    sd = v1_state_dict(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with fake_lightning() as model_checkpoint:
        torch.save({
            "epoch": 3, "global_step": 60, "pytorch-lightning_version": "1.7.7",
            "state_dict": sd,
            "callbacks": {model_checkpoint: {"best_model_score": torch.tensor(0.1), "best_model_path": "last.ckpt",
                                             "current_score": None, "dirpath": "/exp/ckpts"}},
            "optimizer_states": [{"state": {0: {"step": torch.tensor(60.0), "exp_avg": torch.zeros(3)}},
                                  "param_groups": [{"lr": 5e-6, "betas": (0.5, 0.9), "params": [0]}]}],
            "lr_schedulers": [],
        }, str(path))
    return path


def write_v1_safetensors(path: Path, seed: int = 1, dtype: torch.dtype = torch.float32) -> Path:
    """The flat ``real-world_ccsr-fp16/-fp32.safetensors`` copies (same keys as the ckpt's state_dict)."""
    from safetensors.torch import save_file

    sd = v1_state_dict(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}, str(path))
    return path


class _RunsCommand:
    """Pickles as a call of os.system (what a malicious checkpoint does)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def write_evil_pickle(path: Path, marker: Path) -> Path:
    """A checkpoint that would create ``marker`` through os.system if it were unpickled unsafely."""
    sd = {"control_model.input_blocks.0.0.weight": torch.zeros(32, 8, 3, 3)}
    torch.save({"state_dict": sd, "callbacks": _RunsCommand(f"touch {marker}")}, str(path))
    return path
