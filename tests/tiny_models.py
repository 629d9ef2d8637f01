"""Small random models with SD 2.1-base's architecture, built at test time on the CPU.

Same block structure and module names as SD 2.1-base (so the official OSEDiff LoRA
selection rule picks the same kinds of modules: 258 UNet, 32 VAE), tiny widths.
Also: an offline CLIP BPE tokenizer and an ``osediff.pkl`` in the official format.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(32, 64, 128, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(1, 1, 2, 2), cross_attention_dim=32, use_linear_projection=True,
    norm_num_groups=32,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(32, 64, 128, 128),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, sample_size=64,
)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1,
                 max_position_embeddings=77, hidden_act="gelu", projection_dim=32,
                 bos_token_id=49406, eos_token_id=49407, pad_token_id=0)

# The official OSEDiff selection rule (facts of the released code).
UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut",
                "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj")
VAE_TARGETS = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0")


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte → printable-unicode table, in table order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(folder: Path) -> Path:
    """A CLIP BPE tokenizer with a small vocabulary: 256 bytes ×2 (+ "</w>"), a few merges,
    and the two specials, padded to ids 49406/49407 like CLIP's. "!" is id 0 (SD 2 pads with it)."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    merges = [("h", "i"), ("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    vocab_list = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    filler = 0
    while len(vocab) < 49406:
        vocab[f"<|filler{filler}|>"] = len(vocab)
        filler += 1
    vocab["<|startoftext|>"] = 49406
    vocab["<|endoftext|>"] = 49407
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "!"}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>", "pad_token": "!", "tokenizer_class": "CLIPTokenizer"}))
    return folder


def build_models(seed: int = 0, unet_config: dict | None = None, vae_config: dict | None = None,
                 text_config: dict | None = None):
    """(unet, vae, text_encoder) with seeded random weights; every parameter, norms included, random."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(unet_config or TINY_UNET))
    vae = AutoencoderKL(**(vae_config or TINY_VAE))
    text = CLIPTextModel(CLIPTextConfig(**{"vocab_size": 49408, **(text_config or TINY_TEXT)}))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in (unet, vae, text):
            for name, p in m.named_parameters():
                if "norm" in name and name.endswith("weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                elif name.endswith("bias"):
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return unet.eval(), vae.eval(), text.eval()


def write_diffusers_folder(folder: Path, seed: int = 0, scheduler_prediction: str = "epsilon", **configs) -> Path:
    """A diffusers SD-2.1-base-layout folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    unet, vae, text = build_models(seed, **configs)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    write_tokenizer(folder / "tokenizer")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "prediction_type": scheduler_prediction, "steps_offset": 1}))
    return folder


def select_unet_modules(unet) -> dict[str, list[str]]:
    """The official UNet LoRA targets grouped as (encoder, decoder, others)."""
    groups: dict[str, list[str]] = {"encoder": [], "decoder": [], "others": []}
    for name, _ in unet.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        if not any(t in name for t in UNET_TARGETS):
            continue
        module = name.replace(".weight", "")
        if "down_blocks" in name or "conv_in" in name:
            groups["encoder"].append(module)
        elif "up_blocks" in name or "conv_out" in name:
            groups["decoder"].append(module)
        elif "mid_block" in name:
            groups["others"].append(module)
    return groups


def select_vae_modules(vae) -> list[str]:
    """The official VAE LoRA targets, with the duplicates the official list holds."""
    out: list[str] = []
    for name, _ in vae.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        if name.startswith("encoder.") or name.startswith("quant_conv"):
            for t in VAE_TARGETS + ("quant_conv",):
                if t in name and not name.startswith("post_quant_conv"):
                    out.append(name.replace(".weight", ""))
    return out


def make_osediff_dict(unet, vae, rank: int = 4, seed: int = 0, std: float = 0.05) -> dict:
    """An osediff.pkl dict in the official layout for these base modules, non-zero LoRA weights."""
    g = torch.Generator().manual_seed(1000 + seed)
    groups = select_unet_modules(unet)
    vae_modules = select_vae_modules(vae)
    mods = dict(unet.named_modules())
    vmods = dict(vae.named_modules())

    def pair(module, adapter: str, prefix: str) -> dict:
        w = module.weight
        if w.dim() == 2:
            a_shape, b_shape = (rank, w.shape[1]), (w.shape[0], rank)
        else:
            a_shape, b_shape = (rank, w.shape[1], w.shape[2], w.shape[3]), (w.shape[0], rank, 1, 1)
        return {f"{prefix}.lora_A.{adapter}.weight": std * torch.randn(a_shape, generator=g),
                f"{prefix}.lora_B.{adapter}.weight": std * torch.randn(b_shape, generator=g)}

    sd_unet: dict = {}
    for group, adapter in (("encoder", "default_encoder"), ("decoder", "default_decoder"), ("others", "default_others")):
        for m in groups[group]:
            sd_unet.update(pair(mods[m], adapter, m))
    cin = unet.conv_in
    sd_unet["conv_in.base_layer.weight"] = cin.weight.detach() + 0.05 * torch.randn(cin.weight.shape, generator=g)
    sd_unet["conv_in.base_layer.bias"] = cin.bias.detach() + 0.05 * torch.randn(cin.bias.shape, generator=g)
    sd_vae: dict = {}
    for m in dict.fromkeys(vae_modules):
        sd_vae.update(pair(vmods[m], "default_encoder", m))
    return {
        "unet_lora_encoder_modules": groups["encoder"],
        "unet_lora_decoder_modules": groups["decoder"],
        "unet_lora_others_modules": groups["others"],
        "vae_lora_encoder_modules": vae_modules,
        "rank_unet": rank, "rank_vae": rank,
        "state_dict_unet": sd_unet, "state_dict_vae": sd_vae,
    }


def write_osediff_pkl(path: Path, unet, vae, rank: int = 4, seed: int = 0) -> Path:
    torch.save(make_osediff_dict(unet, vae, rank, seed), str(path))
    return path


def write_single_file(path: Path, seed: int = 0, with_tokenizer: bool = True) -> Path:
    """The same models as ``write_diffusers_folder(seed=seed)`` as one ldm-layout .safetensors
    (``model.diffusion_model.``, ``first_stage_model.``, ``cond_stage_model.model.``), with a
    ``tokenizer/`` folder beside it."""
    from safetensors.torch import save_file

    from sr_core import keymap

    unet, vae, text = build_models(seed)
    sd = {f"model.diffusion_model.{k}": v for k, v in keymap.unet_diffusers_to_ldm(unet.state_dict(), TINY_UNET).items()}
    sd.update({f"first_stage_model.{k}": v for k, v in keymap.vae_diffusers_to_ldm(vae.state_dict(), TINY_VAE).items()})
    sd.update({f"cond_stage_model.model.{k}": v for k, v in keymap.text_hf_to_openclip(text.state_dict()).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    if with_tokenizer:
        write_tokenizer(path.parent / "tokenizer")
    return path
