"""Key maps diffusers <-> ldm and single-file SD checkpoint reading.

What a user would notice if these broke: OSEDiff's LoRA landing on the wrong (or no)
layer of ComfyUI's model, a checkpoint that loads into the wrong slots (garbage
images), a wrong model family accepted, or an unreadable file crashing with a
traceback instead of a message naming it.
"""
from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

import tiny_models
from sr_core import checkpoint, keymap, sd21
from sr_core.errors import BaseModelError

# Head counts follow the SD 2 rule (heads = max(1, width // 64)), as a checkpoint
# reader must infer them: TINY_UNET's (1, 1, 2, 2) already does; the 32-wide text
# model gets 1 head.
TINY_UNET = tiny_models.TINY_UNET
TINY_TEXT = dict(tiny_models.TINY_TEXT, num_attention_heads=1)
# ComfyUI's ldm UNet takes either one head count for all blocks or a head width;
# for its 32-wide first block only "1 head everywhere" works.
COMFY_UNET = dict(TINY_UNET, attention_head_dim=(1, 1, 1, 1))
# A second structure: 3 levels, one resnet per level, so no index is hard-wired.
SMALL_UNET = dict(
    TINY_UNET, layers_per_block=1, block_out_channels=(32, 64, 64), attention_head_dim=(1, 1, 1),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SMALL_VAE = dict(
    tiny_models.TINY_VAE, layers_per_block=1, block_out_channels=(32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
)

# Independent facts of SD 2.1-base's ldm layout (names and shapes of a real
# v2-1_512-ema-pruned checkpoint, without the model.diffusion_model. /
# first_stage_model. prefixes).
KNOWN_UNET_KEYS = {
    "time_embed.0.weight": (1280, 320),
    "input_blocks.0.0.weight": (320, 4, 3, 3),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
    "input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "middle_block.1.proj_in.weight": (1280, 1280),
    "middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
    "output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
    "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "output_blocks.11.1.transformer_blocks.0.norm1.bias": (320,),
    "out.2.weight": (4, 320, 3, 3),
}
KNOWN_VAE_KEYS = {
    "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.conv_out.weight": (8, 512, 3, 3),
    "quant_conv.weight": (8, 8, 1, 1),
    "post_quant_conv.weight": (4, 4, 1, 1),
    "decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
    "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
}


def _official_vae_targets(vae) -> list[str]:
    """The official OSEDiff VAE selection loop, duplicates included: it has no ``break``,
    so a name is listed once per matching pattern and ``quant_conv`` (which takes the
    ``elif`` branch) once per pattern, i.e. 10 times."""
    out = []
    for name, _ in vae.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        for pattern in tiny_models.VAE_TARGETS:
            if pattern in name and "encoder" in name:
                out.append(name.replace(".weight", ""))
            elif "quant_conv" in name and "post_quant_conv" not in name:
                out.append(name.replace(".weight", ""))
    return out


def _shapes(sd: dict) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.fixture(scope="module")
def full_size():
    """SD 2.1-base UNet and VAE on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd21.UNET_CONFIG)
        vae = AutoencoderKL(**sd21.VAE_CONFIG)
    unet_ldm = keymap.unet_diffusers_to_ldm(unet.state_dict(), sd21.UNET_CONFIG)
    vae_ldm = keymap.vae_diffusers_to_ldm(vae.state_dict(), sd21.VAE_CONFIG)
    return unet, vae, _shapes(unet_ldm), _shapes(vae_ldm)


@pytest.fixture(scope="module")
def tiny():
    """Tiny random UNet, VAE and text encoder (seeded, CPU)."""
    return tiny_models.build_models(seed=3, unet_config=TINY_UNET, text_config=TINY_TEXT)


def _unet_out(unet, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(1, cfg.in_channels, 16, 16, generator=g)
    ctx = torch.randn(1, 5, cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, 999, encoder_hidden_states=ctx).sample


def _vae_out(vae, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        return vae.encode(img).latent_dist.mean, vae.decode(torch.randn(1, 4, 4, 4, generator=g)).sample


_IDS = torch.tensor([[49406, 320, 1125, 539, 49407, 0, 0, 0]])


def _text_out(text) -> torch.Tensor:
    with torch.no_grad():
        return text(_IDS).last_hidden_state


# ----------------------------------------------------------- full-size SD 2.1


def test_osediff_lora_targets_map_to_existing_ldm_layers(full_size):
    """All 258 UNet / 32 VAE modules of the official OSEDiff rule land on an ldm layer
    of the same shape (so the LoRA applies to ComfyUI's model)."""
    unet, vae, unet_ldm, vae_ldm = full_size
    groups = tiny_models.select_unet_modules(unet)
    assert {k: len(v) for k, v in groups.items()} == {"encoder": 94, "decoder": 148, "others": 16}
    vae_modules = _official_vae_targets(vae)
    assert (len(vae_modules), len(set(vae_modules))) == (65, 32)

    umap = keymap.unet_module_map(sd21.UNET_CONFIG)
    params = dict(unet.named_parameters())
    targets = [m for g in groups.values() for m in g]
    assert len(set(umap[m] for m in targets)) == 258
    for m in targets:
        assert unet_ldm[umap[m] + ".weight"] == tuple(params[m + ".weight"].shape), m

    vmap = keymap.vae_module_map(sd21.VAE_CONFIG)
    vparams = dict(vae.named_parameters())
    for m in set(vae_modules):
        w = vparams[m + ".weight"]
        assert vae_ldm[vmap[m] + ".weight"] == tuple(keymap.reshape_for_ldm(m, w).shape), m
    assert vmap["encoder.mid_block.attentions.0.to_q"] == "encoder.mid.attn_1.q"
    assert vmap["quant_conv"] == "quant_conv"
    assert umap["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == (
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q")


def test_full_size_layout_matches_sd21_checkpoint_facts(full_size):
    """The converters produce exactly the 686 UNet / 248 VAE keys of an SD 2.1-base
    single-file checkpoint, including well-known names and shapes."""
    _, _, unet_ldm, vae_ldm = full_size
    assert len(unet_ldm) == 686 and len(vae_ldm) == 248
    for key, shape in KNOWN_UNET_KEYS.items():
        assert unet_ldm.get(key) == shape, key
    for key, shape in KNOWN_VAE_KEYS.items():
        assert vae_ldm.get(key) == shape, key


# ------------------------------------------------ cross-check against ComfyUI

# The harness convention (../shared/harness/README.md): COMFYUI_DIR, COMFY_VENV.
COMFYUI_DIR = Path(os.environ.get("COMFYUI_DIR", Path.home() / "comfy-harness" / "ComfyUI"))
COMFYUI_PYTHON = Path(os.environ.get("COMFY_VENV", Path.home() / "comfy-harness" / "venv")) / "bin" / "python"

# Runs in ComfyUI's own environment: dumps ComfyUI's ldm key shapes of SD 2.1-base
# (built on meta), its diffusers->ldm UNet map, and runs tiny ldm models on inputs.
_COMFY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    work = sys.argv[1]
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import torch, comfy.ops, comfy.utils
    from safetensors.torch import load_file, save_file
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.ldm.models.autoencoder import AutoencoderKL

    def unet_cfg(ch, context_dim, heads):
        return dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True,
                    legacy=False, adm_in_channels=None, in_channels=4, model_channels=ch,
                    num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                    channel_mult=[1, 2, 4, 4], transformer_depth_middle=1, use_linear_in_transformer=True,
                    context_dim=context_dim, num_heads=heads, num_head_channels=-1 if heads > 0 else 64,
                    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                    use_temporal_attention=False, use_temporal_resblock=False)

    def vae_cfg(ch):
        return dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=ch,
                    ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)

    ops = comfy.ops.disable_weight_init
    full = unet_cfg(320, 1024, -1)
    with torch.device("meta"):
        unet = UNetModel(**full, device="meta", operations=ops)
        vae = AutoencoderKL(ddconfig=vae_cfg(128), embed_dim=4)
    out = {
        "unet": {k: list(v.shape) for k, v in unet.state_dict().items()},
        "vae": {k: list(v.shape) for k, v in vae.state_dict().items()},
        "map": comfy.utils.unet_to_diffusers(full),
    }
    unet = UNetModel(**unet_cfg(32, 32, 1), operations=ops)
    unet.load_state_dict(load_file(work + "/unet.safetensors"))
    vae = AutoencoderKL(ddconfig=vae_cfg(32), embed_dim=4)
    vae.load_state_dict(load_file(work + "/vae.safetensors"))
    inp = load_file(work + "/inputs.safetensors")
    with torch.no_grad():
        eps = unet.eval()(inp["x"], inp["t"], inp["ctx"])
        moments = vae.eval().quant_conv(vae.encoder(inp["img"]))
        dec = vae.decoder(vae.post_quant_conv(inp["z"]))
    save_file({"eps": eps, "mean": moments[:, :4].contiguous(), "dec": dec}, work + "/outputs.safetensors")
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def comfy_unet():
    return tiny_models.build_models(seed=5, unet_config=COMFY_UNET, text_config=TINY_TEXT)[0]


@pytest.fixture(scope="module")
def comfy_run(tmp_path_factory, tiny, comfy_unet):
    """ComfyUI's view of the ldm layout, and ComfyUI's ldm modules run on our converted
    tiny weights; skipped where no ComfyUI environment is available."""
    if not (COMFYUI_DIR / "comfy").is_dir() or not COMFYUI_PYTHON.is_file():
        pytest.skip("no ComfyUI checkout / environment (set COMFYUI_DIR and COMFY_VENV)")
    _, vae, _ = tiny
    unet = comfy_unet
    work = tmp_path_factory.mktemp("comfy")
    save_file(keymap.unet_diffusers_to_ldm(unet.state_dict(), unet.config), str(work / "unet.safetensors"))
    save_file({k: v.contiguous() for k, v in keymap.vae_diffusers_to_ldm(vae.state_dict(), vae.config).items()},
              str(work / "vae.safetensors"))
    g = torch.Generator().manual_seed(7)
    inputs = {"x": torch.randn(1, 4, 16, 16, generator=g), "t": torch.tensor([999.0]),
              "ctx": torch.randn(1, 5, 32, generator=g), "img": torch.rand(1, 3, 32, 32, generator=g) * 2 - 1,
              "z": torch.randn(1, 4, 4, 4, generator=g)}
    save_file(inputs, str(work / "inputs.safetensors"))
    try:
        proc = subprocess.run([str(COMFYUI_PYTHON), "-c", _COMFY_SCRIPT, str(work)], cwd=COMFYUI_DIR,
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"ComfyUI environment did not run: {e}")
    if proc.returncode != 0:
        if "ModuleNotFoundError" in proc.stderr or "ImportError" in proc.stderr:
            pytest.skip("ComfyUI environment incomplete: " + proc.stderr.strip().splitlines()[-1])
        raise AssertionError("ComfyUI reference script failed:\n" + proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1]), inputs, load_file(str(work / "outputs.safetensors"))


def test_ldm_layout_is_comfyui_layout(full_size, comfy_run):
    """Our ldm state dicts of SD 2.1-base have exactly ComfyUI's keys and shapes, and
    our UNet map agrees with ComfyUI's own diffusers->ldm map (what its LoRA loader uses)."""
    unet, _, unet_ldm, vae_ldm = full_size
    ref, _, _ = comfy_run
    assert unet_ldm == {k: tuple(v) for k, v in ref["unet"].items()}
    assert vae_ldm == {k: tuple(v) for k, v in ref["vae"].items()}
    umap = keymap.unet_module_map(sd21.UNET_CONFIG)
    keys = set(unet.state_dict())
    ours = {f"{d}.{p}": f"{l}.{p}" for d, l in umap.items() for p in ("weight", "bias") if f"{d}.{p}" in keys}
    common = set(ours) & set(ref["map"])
    assert len(common) == 686
    assert {k: ours[k] for k in common} == {k: ref["map"][k] for k in common}


def test_converted_weights_run_identically_in_comfyui(tiny, comfy_unet, comfy_run):
    """The same (converted) weights give the same UNet eps, latent and decoded image in
    ComfyUI's ldm modules as in diffusers: the maps put every tensor in its right slot."""
    _, vae, _ = tiny
    unet = comfy_unet
    _, inp, out = comfy_run
    with torch.no_grad():
        eps = unet(inp["x"], 999, encoder_hidden_states=inp["ctx"]).sample
        mean = vae.encode(inp["img"]).latent_dist.mean
        dec = vae.decode(inp["z"]).sample
    torch.testing.assert_close(out["eps"], eps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["mean"], mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["dec"], dec, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------- round trips


def _assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("config", [TINY_UNET, SMALL_UNET], ids=["4-levels", "3-levels-1-layer"])
def test_unet_round_trip(config):
    """diffusers -> ldm -> diffusers is lossless and a fresh model loaded from it computes
    the same eps."""
    unet, _, _ = tiny_models.build_models(seed=1, unet_config=config, text_config=TINY_TEXT)
    sd = unet.state_dict()
    ldm = keymap.unet_diffusers_to_ldm(sd, config)
    assert "input_blocks.0.0.weight" in ldm and "out.2.weight" in ldm
    back = keymap.unet_ldm_to_diffusers(ldm, config)
    _assert_same_state(sd, back)
    fresh, _, _ = tiny_models.build_models(seed=2, unet_config=config, text_config=TINY_TEXT)
    assert not torch.equal(_unet_out(fresh), _unet_out(unet))
    fresh.load_state_dict(back)
    assert torch.equal(_unet_out(fresh), _unet_out(unet))


@pytest.mark.parametrize("config", [tiny_models.TINY_VAE, SMALL_VAE], ids=["4-levels", "3-levels-1-layer"])
def test_vae_round_trip(config):
    """VAE round trip, with the mid attention stored as 1x1 convs on the ldm side."""
    _, vae, _ = tiny_models.build_models(seed=1, unet_config=TINY_UNET, vae_config=config, text_config=TINY_TEXT)
    sd = vae.state_dict()
    ldm = keymap.vae_diffusers_to_ldm(sd, config)
    width = config["block_out_channels"][-1]
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (width, width, 1, 1)
    assert ldm["decoder.mid.attn_1.proj_out.weight"].shape == (width, width, 1, 1)
    back = keymap.vae_ldm_to_diffusers(ldm, config)
    _assert_same_state(sd, back)
    _, fresh, _ = tiny_models.build_models(seed=2, unet_config=TINY_UNET, vae_config=config, text_config=TINY_TEXT)
    fresh.load_state_dict(back)
    for a, b in zip(_vae_out(fresh), _vae_out(vae)):
        assert torch.equal(a, b)


def _openclip_forward(oc: dict, ids: torch.Tensor, layers: int, heads: int) -> torch.Tensor:
    """OpenCLIP's text tower (pre-LN, causal, exact GELU) up to block ``layers``, then
    ln_final: SD 2.x's conditioning, computed straight from OpenCLIP-layout weights."""
    width = oc["token_embedding.weight"].shape[1]
    x = oc["token_embedding.weight"][ids] + oc["positional_embedding"][: ids.shape[1]]
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    ln = torch.nn.functional.layer_norm
    for n in range(layers):
        p = {k[len(f"transformer.resblocks.{n}."):]: v for k, v in oc.items()
             if k.startswith(f"transformer.resblocks.{n}.")}
        h = ln(x, (width,), p["ln_1.weight"], p["ln_1.bias"])
        attn, _ = torch.nn.functional.multi_head_attention_forward(
            h.transpose(0, 1), h.transpose(0, 1), h.transpose(0, 1), width, heads,
            p["attn.in_proj_weight"], p["attn.in_proj_bias"], None, None, False, 0.0,
            p["attn.out_proj.weight"], p["attn.out_proj.bias"], training=False, need_weights=False,
            attn_mask=mask)
        x = x + attn.transpose(0, 1)
        h = ln(x, (width,), p["ln_2.weight"], p["ln_2.bias"])
        h = torch.nn.functional.gelu(h @ p["mlp.c_fc.weight"].T + p["mlp.c_fc.bias"])
        x = x + h @ p["mlp.c_proj.weight"].T + p["mlp.c_proj.bias"]
    return ln(x, (width,), oc["ln_final.weight"], oc["ln_final.bias"])


def test_text_encoder_openclip_layout(tiny):
    """HF -> OpenCLIP (N+1 blocks + text_projection, as SD 2 files store it) -> HF is
    lossless, and the OpenCLIP weights computed the OpenCLIP way give the HF model's
    last_hidden_state (penultimate block + final LayerNorm)."""
    _, _, text = tiny
    sd = text.state_dict()
    layers = text.config.num_hidden_layers
    oc = keymap.text_hf_to_openclip(sd)
    width = text.config.hidden_size
    assert f"transformer.resblocks.{layers}.attn.in_proj_weight" in oc
    assert f"transformer.resblocks.{layers + 1}.ln_1.weight" not in oc
    assert oc["transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * width, width)
    assert oc["text_projection"].shape == (width, width)
    back = keymap.text_openclip_to_hf(oc, layers, prefix=checkpoint.hf_text_prefix())
    _assert_same_state(sd, back)
    hf_layout = keymap.text_openclip_to_hf(oc, layers)
    assert all(k.startswith("text_model.") for k in hf_layout)
    expected = _openclip_forward(oc, _IDS, layers, text.config.num_attention_heads)
    torch.testing.assert_close(_text_out(text), expected, atol=1e-5, rtol=1e-5)


def test_reshape_helpers_cover_vae_attention_only():
    """A diffusers-shaped VAE attention weight, LoRA factor or delta gets the 1x1-conv
    shape ComfyUI's VAE needs and back; everything else passes through unchanged."""
    w = torch.randn(8, 8)
    name = "encoder.mid_block.attentions.0.to_out.0"
    assert keymap.reshape_for_ldm(name, w).shape == (8, 8, 1, 1)
    assert keymap.reshape_for_ldm(name + ".weight", torch.randn(4, 8)).shape == (4, 8, 1, 1)  # lora_A
    assert torch.equal(keymap.reshape_for_diffusers(name, keymap.reshape_for_ldm(name, w)), w)
    conv = torch.randn(8, 8, 3, 3)
    assert keymap.reshape_for_ldm("encoder.down_blocks.0.resnets.0.conv1", conv) is conv
    linear = torch.randn(8, 8)
    unet_q = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    assert keymap.reshape_for_ldm(unet_q, linear) is linear
    assert keymap.reshape_for_ldm(name, torch.randn(8)).shape == (8,)  # bias


def test_converters_name_the_offending_key(tiny):
    unet, vae, text = tiny
    ldm = keymap.unet_diffusers_to_ldm(unet.state_dict(), unet.config)
    with pytest.raises(BaseModelError, match=r"input_blocks\.99\.0\.op\.weight"):
        keymap.unet_ldm_to_diffusers({**ldm, "input_blocks.99.0.op.weight": torch.zeros(1)}, unet.config)
    missing = dict(ldm)
    del missing["middle_block.1.proj_out.bias"]
    with pytest.raises(BaseModelError, match=r"middle_block\.1\.proj_out\.bias"):
        keymap.unet_ldm_to_diffusers(missing, unet.config)
    with pytest.raises(BaseModelError, match=r"decoder\.foo\.weight"):
        keymap.vae_diffusers_to_ldm({**vae.state_dict(), "decoder.foo.weight": torch.zeros(1)}, vae.config)
    oc = keymap.text_hf_to_openclip(text.state_dict())
    with pytest.raises(BaseModelError, match=r"visual\.proj"):
        keymap.text_openclip_to_hf({**oc, "visual.proj": torch.zeros(1)}, 2)
    with pytest.raises(BaseModelError, match=r"resblocks\.3\.attn\.in_proj_weight"):
        keymap.text_openclip_to_hf(oc, 6)


# ------------------------------------------------------- single-file checkpoints


def _single_file_sd(unet, vae, text) -> dict:
    sd = {"model.diffusion_model." + k: v for k, v in keymap.unet_diffusers_to_ldm(unet.state_dict(), unet.config).items()}
    sd.update({"first_stage_model." + k: v for k, v in keymap.vae_diffusers_to_ldm(vae.state_dict(), vae.config).items()})
    sd.update({"cond_stage_model.model." + k: v for k, v in keymap.text_hf_to_openclip(text.state_dict()).items()})
    # Extra entries real SD files carry, ignored by the reader.
    sd["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    return {k: v.contiguous() for k, v in sd.items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_split_single_file_loads_strictly_and_reproduces_outputs(tmp_path, tiny, suffix):
    unet, vae, text = tiny
    sd = _single_file_sd(unet, vae, text)
    path = tmp_path / f"tiny-sd21{suffix}"
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:  # Lightning layout: weights under "state_dict"
        torch.save({"state_dict": sd, "global_step": 1}, str(path))
    unet_sd, vae_sd, text_sd, ucfg, vcfg, tcfg = checkpoint.split_single_file(path)
    assert tuple(ucfg["block_out_channels"]) == TINY_UNET["block_out_channels"]
    assert list(ucfg["attention_head_dim"]) == list(TINY_UNET["attention_head_dim"])
    assert ucfg["cross_attention_dim"] == 32 and ucfg["use_linear_projection"] is True
    assert tuple(vcfg["block_out_channels"]) == tiny_models.TINY_VAE["block_out_channels"]
    assert tcfg["num_hidden_layers"] == TINY_TEXT["num_hidden_layers"]

    new_unet = UNet2DConditionModel(**ucfg).eval()
    new_unet.load_state_dict(unet_sd, strict=True)
    new_vae = AutoencoderKL(**vcfg).eval()
    new_vae.load_state_dict(vae_sd, strict=True)
    new_text = CLIPTextModel(CLIPTextConfig(**tcfg)).eval()
    new_text.load_state_dict(text_sd, strict=True)
    assert torch.equal(_unet_out(new_unet), _unet_out(unet))
    for a, b in zip(_vae_out(new_vae), _vae_out(vae)):
        assert torch.equal(a, b)
    assert torch.equal(_text_out(new_text), _text_out(text))


def test_full_size_configs_are_inferred_from_shapes(full_size):
    """From SD 2.1-base's tensor shapes alone, the inferred configs are SD 2.1-base's."""
    unet, vae, unet_ldm, vae_ldm = full_size
    meta = lambda shapes, prefix: {prefix + k: torch.empty(s, device="meta") for k, s in shapes.items()}  # noqa: E731
    ucfg = checkpoint.infer_unet_config(meta(unet_ldm, "model.diffusion_model."))
    plain = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    for key in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
                "attention_head_dim", "cross_attention_dim", "use_linear_projection", "in_channels"):
        assert plain(ucfg[key]) == plain(sd21.UNET_CONFIG[key]), key
    vcfg = checkpoint.infer_vae_config(meta(vae_ldm, "first_stage_model."))
    assert tuple(vcfg["block_out_channels"]) == (128, 256, 512, 512) and vcfg["layers_per_block"] == 2
    with torch.device("meta"):
        text = CLIPTextModel(CLIPTextConfig(**dict(sd21.TEXT_ENCODER_CONFIG)))
    oc = keymap.text_hf_to_openclip(text.state_dict())
    assert len({k.split(".")[2] for k in oc if k.startswith("transformer.resblocks.")}) == 24
    assert len(oc) == 294  # cond_stage_model.model.* keys of an SD 2.1 single-file checkpoint
    tcfg = checkpoint.infer_text_config({"cond_stage_model.model." + k: v for k, v in oc.items()})
    assert {k: tcfg[k] for k in ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size")} == {
        "num_hidden_layers": 23, "num_attention_heads": 16, "hidden_size": 1024, "intermediate_size": 4096}


def test_comfyui_saved_sd21_checkpoint_splits_and_loads():
    """A full-size SD 2.1-base file written by ComfyUI's own CheckpointSave code path
    (the harness's random-weight sd21-random.safetensors) splits into parts that load
    strictly into diffusers / transformers models of SD 2.1-base's exact configs."""
    path = COMFYUI_DIR / "models" / "checkpoints" / "sd21-random.safetensors"
    if not path.is_file():
        pytest.skip(f"{path} not there (../shared/harness/make_sd21_random.py writes it)")
    unet_sd, vae_sd, text_sd, ucfg, vcfg, tcfg = checkpoint.split_single_file(path)
    assert (len(unet_sd), len(vae_sd)) == (686, 248)
    plain = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    assert {k: plain(v) for k, v in ucfg.items()} == {k: plain(v) for k, v in sd21.UNET_CONFIG.items()}
    assert {k: plain(v) for k, v in vcfg.items()} == {k: plain(v) for k, v in sd21.VAE_CONFIG.items()}
    assert tcfg == sd21.TEXT_ENCODER_CONFIG
    with torch.device("meta"):
        unet = UNet2DConditionModel(**ucfg)
        vae = AutoencoderKL(**vcfg)
        text = CLIPTextModel(CLIPTextConfig(**tcfg))
    unet.load_state_dict(unet_sd, strict=True, assign=True)
    vae.load_state_dict(vae_sd, strict=True, assign=True)
    text.load_state_dict(text_sd, strict=True, assign=True)


# ------------------------------------------------------------- detect_family

P = "model.diffusion_model."


def _fake_sd2(**overrides) -> dict:
    """Only the tensors detect_family decides on, shaped like SD 2.1-base's."""
    sd = {
        P + "input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        P + "input_blocks.1.1.proj_in.weight": torch.zeros(320, 320),
        P + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 1024),
        P + "output_blocks.11.1.transformer_blocks.0.norm1.bias": 0.02 * torch.randn(320, generator=torch.Generator().manual_seed(0)),
    }
    sd.update(overrides)
    return {k: v for k, v in sd.items() if v is not None}


def test_detect_family_accepts_sd2_base(tiny):
    assert checkpoint.detect_family(_fake_sd2()) == "sd2-base"
    assert checkpoint.detect_family(_single_file_sd(*tiny)) == "sd2-base"


@pytest.mark.parametrize("overrides, family", [
    ({P + "input_blocks.1.1.proj_in.weight": torch.zeros(320, 320, 1, 1),
      P + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768)}, "SD 1.x"),
    ({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(768),
      P + "label_emb.0.0.weight": torch.zeros(1280, 2816)}, "SDXL"),
    ({P + "label_emb.0.0.weight": torch.zeros(1280, 2816)}, "SDXL"),
    ({P + "output_blocks.11.1.transformer_blocks.0.norm1.bias": 0.2 * torch.randn(320, generator=torch.Generator().manual_seed(1))}, "768-v"),
    ({"v_pred": torch.tensor([])}, "768-v"),
    ({P + "label_emb.0.0.weight": torch.zeros(1280, 2048)}, "unCLIP"),
    ({P + "input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3)}, "inpainting"),
], ids=["sd1", "sdxl", "sdxl-label-only", "768-v-std", "768-v-key", "unclip", "inpainting"])
def test_detect_family_refuses_other_families(overrides, family):
    with pytest.raises(BaseModelError, match=family):
        checkpoint.detect_family(_fake_sd2(**overrides))


def test_detect_family_refuses_non_sd_files():
    with pytest.raises(BaseModelError, match="not a Stable Diffusion.*LoRA"):
        checkpoint.detect_family({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 4)})
    with pytest.raises(BaseModelError, match="not a Stable Diffusion"):
        checkpoint.detect_family({"weight": torch.zeros(3)})


# -------------------------------------------------------------- bad files


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_unreadable_files_name_the_path(tmp_path, suffix):
    empty = tmp_path / f"empty{suffix}"
    empty.write_bytes(b"")
    with pytest.raises(BaseModelError, match=r"empty.*0 bytes") as e:
        checkpoint.read_state_dict(empty)
    assert str(empty) in str(e.value)

    whole = tmp_path / f"whole{suffix}"
    tensors = {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(64, 4, 3, 3)}
    save_file(tensors, str(whole)) if suffix == ".safetensors" else torch.save(tensors, str(whole))
    assert torch.equal(checkpoint.read_state_dict(whole)["model.diffusion_model.input_blocks.0.0.weight"],
                       tensors["model.diffusion_model.input_blocks.0.0.weight"])
    cut = tmp_path / f"cut{suffix}"
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BaseModelError) as e:
        checkpoint.read_state_dict(cut)
    assert str(cut) in str(e.value)
    with pytest.raises(BaseModelError) as e:
        checkpoint.split_single_file(cut)
    assert str(cut) in str(e.value)

    with pytest.raises(BaseModelError, match="does not exist"):
        checkpoint.read_state_dict(tmp_path / f"missing{suffix}")


def test_weights_only_refusal_is_a_clear_error(tmp_path):
    """A pickle with arbitrary Python objects is refused (never executed), with advice."""
    path = tmp_path / "objects.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hparams": Path("/x")}, str(path))
    with pytest.raises(BaseModelError, match="safetensors") as e:
        checkpoint.read_state_dict(path)
    assert str(path) in str(e.value)


def test_split_single_file_refuses_wrong_family_with_path(tmp_path):
    path = tmp_path / "sd15.safetensors"
    save_file(_fake_sd2(**{P + "input_blocks.1.1.proj_in.weight": torch.zeros(320, 320, 1, 1),
                           P + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768)}),
              str(path))
    with pytest.raises(BaseModelError, match="SD 1.x") as e:
        checkpoint.split_single_file(path)
    assert str(path) in str(e.value)
