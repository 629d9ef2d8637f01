"""Every weights file × every loader: right pairings load, wrong ones are refused by name.

Files (tiny, built at test time): OSEDiff (.pkl, .safetensors, two rank-broken copies), CCSR v2
(the release folder and its controlnet file), CCSR v1 (the Lightning .ckpt and its fp16
safetensors copy), a GAN decoder VAE, an SD 2.1-base single file (.safetensors, and a Lightning
.ckpt whose callbacks reference pytorch_lightning, as original checkpoints do), SD 1.5- and SDXL-shaped
single files (zeros; only the names and shapes that tell the family), a kohya and a peft LoRA,
and an unrelated safetensors. Loaders: OSEDiff weights, CCSR control branch, GAN decoder, base
model (``DiffusersSD21.load``: folders and single files).

A refusal must be the pack's own error class (WeightsError for method weights, BaseModelError
for the base), one line, name the file, say what the file looks like (the cell's pattern) and,
for a file of another kind, what the loader expected. Raw torch/safetensors/KeyError text or
a torch warning banner in the message fails the test.
"""
from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ccsr_fixtures as fx
import tiny_models
from sr_core.ccsr import load_ccsr_decoder, load_ccsr_weights
from sr_core.ccsr_host import check_control_fits
from sr_core.diffusers_host import DiffusersSD21
from sr_core.errors import BaseModelError, SRError, WeightsError
from sr_core.lora import LoraPair
from sr_core.osediff import load_osediff_weights, parse_official_dict, save_osediff_safetensors

OK = None
LOADERS: dict[str, Callable[[Path], object]] = {
    "osediff": load_osediff_weights,
    "ccsr": load_ccsr_weights,
    "decoder": load_ccsr_decoder,
    "base": DiffusersSD21.load,
}
ERROR_CLASS = {"osediff": WeightsError, "ccsr": WeightsError, "decoder": WeightsError, "base": BaseModelError}
# What each loader says it wanted, in every refusal of a file of another kind.
EXPECTS = {"osediff": r"osediff\.pkl", "ccsr": r"expected the CCSR-v2 controlnet/", "decoder": r"(VAE|GAN) decoder",
           "base": r"SD 2\.[x1]-base"}

SD_CKPT = r"Stable Diffusion checkpoint"
# file -> (its own loader or None, {loader: OK | pattern of the refusal})
MATRIX: dict[str, tuple[str | None, dict[str, str | None]]] = {
    "osediff.pkl": ("osediff", {
        "osediff": OK, "ccsr": r"an OSEDiff weights file", "decoder": r"an OSEDiff weights file",
        "base": r"an OSEDiff weights file \(osediff\.pkl\), not a base model"}),
    "osediff.safetensors": ("osediff", {
        "osediff": OK, "ccsr": r"an OSEDiff weights file", "decoder": r"an OSEDiff weights file.*not a VAE decoder",
        "base": r"looks like an OSEDiff weights file"}),
    "osediff-rank8.pkl": ("osediff", {
        "osediff": r"has rank 4 but the file says rank 8", "ccsr": r"an OSEDiff weights file",
        "decoder": r"an OSEDiff weights file", "base": r"an OSEDiff weights file"}),
    "osediff-rank-pair.safetensors": ("osediff", {
        "osediff": r"lora_A\.default_others\.weight has shape \(4, .*\) but lora_B has \(.*, 2\); they do not form",
        "ccsr": r"an OSEDiff weights file", "decoder": r"an OSEDiff weights file",
        "base": r"looks like an OSEDiff weights file"}),
    "ccsr-v2": ("ccsr", {
        "osediff": r"OSEDiff weights must be one file .*not a folder", "ccsr": OK, "decoder": OK,
        "base": r"looks like a CCSR-v2 release \(controlnet/\): give it as the CCSR weights"}),
    "ccsr-v2/controlnet/diffusion_pytorch_model.safetensors": ("ccsr", {
        "osediff": r"looks like a CCSR-v2 control branch", "ccsr": OK,
        "decoder": r"a CCSR control branch without a GAN decoder", "base": r"looks like a CCSR-v2 control branch"}),
    "real-world_ccsr.ckpt": ("ccsr", {
        "osediff": r"not an OSEDiff checkpoint: it looks like a CCSR-v1 checkpoint", "ccsr": OK, "decoder": OK, "base": r"CCSR-v1 checkpoint .*give it as the CCSR weights"}),
    "real-world_ccsr-fp16.safetensors": ("ccsr", {
        "osediff": r"looks like a CCSR-v1 checkpoint", "ccsr": OK, "decoder": OK,
        "base": r"CCSR-v1 checkpoint .*give it as the CCSR weights"}),
    "gan_vae.safetensors": ("decoder", {
        "osediff": r"looks like a VAE", "ccsr": r"a VAE \(use it as the GAN decoder", "decoder": OK,
        "base": r"looks like a VAE"}),
    "sd21.safetensors": ("base", {
        "osediff": r"looks like a " + SD_CKPT, "ccsr": SD_CKPT + r".*without a CCSR control branch",
        "decoder": SD_CKPT + r"; its VAE decoder is the stock one", "base": OK}),
    "sd21.ckpt": ("base", {  # the original Lightning layout (callbacks keyed by ModelCheckpoint)
        "osediff": r"not an OSEDiff checkpoint: it looks like a " + SD_CKPT,
        "ccsr": SD_CKPT + r".*without a CCSR control branch", "decoder": SD_CKPT + r"; its VAE decoder is the stock one",
        "base": OK}),
    "sd15.safetensors": ("base", {
        "osediff": r"looks like a " + SD_CKPT, "ccsr": SD_CKPT + r".*without a CCSR control branch",
        "decoder": SD_CKPT + r"; its VAE decoder is the stock one", "base": r"SD 1\.x checkpoint \(text context 768"}),
    "sdxl.safetensors": ("base", {
        "osediff": r"looks like an SDXL checkpoint", "ccsr": SD_CKPT + r".*without a CCSR control branch",
        "decoder": SD_CKPT + r"; its VAE decoder is the stock one", "base": r"SDXL checkpoint"}),
    "kohya_lora.safetensors": (None, {
        "osediff": r"looks like a LoRA", "ccsr": r"a LoRA", "decoder": r"a LoRA, not a VAE decoder",
        "base": r"looks like a LoRA"}),
    "peft_lora.safetensors": (None, {
        "osediff": r"looks like a LoRA", "ccsr": r"a LoRA", "decoder": r"a LoRA, not a VAE decoder",
        "base": r"looks like a LoRA"}),
    "random.safetensors": (None, {
        "osediff": r"looks like no known model \(first tensor 'bias'\)", "ccsr": r"not a CCSR control branch",
        "decoder": r"not a VAE decoder: it looks like no known model", "base": r"looks like no known model"}),
}
CELLS = [(f, loader) for f, (_, row) in MATRIX.items() for loader in row]


def _zeros(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}


def _write_all(d: Path, osediff_pkl: Path) -> dict[str, Path]:
    unet, vae, _ = fx.base_models()
    out: dict[str, Path] = {"osediff.pkl": osediff_pkl}
    official = tiny_models.make_osediff_dict(unet, vae)
    weights = parse_official_dict(official, "mem")
    save_osediff_safetensors(weights, d / "osediff.safetensors")
    out["osediff.safetensors"] = d / "osediff.safetensors"
    torch.save({**official, "rank_unet": 8}, d / "osediff-rank8.pkl")  # the file says 8, its tensors are rank 4
    out["osediff-rank8.pkl"] = d / "osediff-rank8.pkl"
    m = "mid_block.attentions.0.proj_in"  # one pair whose lora_B is rank 2 against lora_A's 4
    pair = weights.unet_lora[m]
    weights.unet_lora[m] = LoraPair(pair.down, pair.up[:, :2].contiguous(), pair.adapter)
    save_osediff_safetensors(weights, d / "osediff-rank-pair.safetensors")
    out["osediff-rank-pair.safetensors"] = d / "osediff-rank-pair.safetensors"

    fx.write_v2_folder(d / "ccsr-v2")
    out["ccsr-v2"] = d / "ccsr-v2"
    out["ccsr-v2/controlnet/diffusion_pytorch_model.safetensors"] = (
        d / "ccsr-v2" / "controlnet" / "diffusion_pytorch_model.safetensors")
    out["real-world_ccsr.ckpt"] = fx.write_v1_ckpt(d / "v1" / "real-world_ccsr.ckpt")
    out["real-world_ccsr-fp16.safetensors"] = fx.write_v1_safetensors(
        d / "v1" / "real-world_ccsr-fp16.safetensors", dtype=torch.float16)
    save_file({k: v.contiguous() for k, v in fx.gan_vae().state_dict().items()}, str(d / "gan_vae.safetensors"))
    out["gan_vae.safetensors"] = d / "gan_vae.safetensors"
    out["sd21.safetensors"] = tiny_models.write_single_file(d / "sd" / "sd21.safetensors")  # + tokenizer/ beside it
    with fx.fake_lightning() as model_checkpoint:
        torch.save({"state_dict": load_file(str(out["sd21.safetensors"])), "global_step": 1,
                    "callbacks": {model_checkpoint: {"best_model_path": "last.ckpt"}}}, str(d / "sd" / "sd21.ckpt"))
    out["sd21.ckpt"] = d / "sd" / "sd21.ckpt"

    u, v, t = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
    sd15 = _zeros({  # SD 1.x: conv proj_in, 768-wide CLIP-L context
        u + "input_blocks.0.0.weight": (8, 4, 3, 3), u + "input_blocks.1.1.proj_in.weight": (8, 8, 1, 1),
        u + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 768),
        v + "encoder.conv_in.weight": (8, 3, 3, 3), t + "transformer.text_model.final_layer_norm.weight": (768,)})
    sdxl = _zeros({  # SDXL: conditioner.* text encoders, label_emb over 2816 features, 2048-wide context
        u + "input_blocks.0.0.weight": (8, 4, 3, 3), u + "label_emb.0.0.weight": (8, 2816),
        u + "input_blocks.4.1.proj_in.weight": (8, 8),
        u + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (8, 2048),
        v + "encoder.conv_in.weight": (8, 3, 3, 3),
        "conditioner.embedders.1.model.ln_final.weight": (1280,)})
    kohya = _zeros({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32),
                    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (32, 4),
                    "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": (),
                    "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 32),
                    "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": (64, 4)})
    peft = _zeros({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 32),
                   "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": (32, 4)})
    for name, sd in (("sd15", sd15), ("sdxl", sdxl), ("kohya_lora", kohya), ("peft_lora", peft),
                     ("random", {"weight": torch.randn(10, 10), "bias": torch.randn(10)})):
        save_file(sd, str(d / f"{name}.safetensors"))
        out[f"{name}.safetensors"] = d / f"{name}.safetensors"
    assert set(out) == set(MATRIX)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory, osediff_pkl) -> dict[str, Path]:
    return _write_all(tmp_path_factory.mktemp("matrix"), osediff_pkl)


@pytest.mark.parametrize("name,loader", CELLS, ids=[f"{f}-{loader}" for f, loader in CELLS])
def test_file_by_loader(files, name, loader):
    path = files[name]
    own, row = MATRIX[name]
    pattern = row[loader]
    if pattern is OK:
        assert LOADERS[loader](path) is not None
        return
    with pytest.raises(SRError) as e:
        LOADERS[loader](path)
    err, msg = e.value, str(e.value)
    assert isinstance(err, ERROR_CLASS[loader]), f"{type(err).__name__}: {msg}"
    assert str(path) in msg, msg
    assert "\n" not in msg and "\x1b" not in msg and "Weights only load failed" not in msg, msg
    assert re.search(pattern, msg), f"{pattern!r} not in: {msg}"
    if own != loader:  # a file of another kind: the refusal says what this loader wanted
        assert re.search(EXPECTS[loader], msg), f"{EXPECTS[loader]!r} not in: {msg}"


def test_right_pairings_fit_the_base_they_were_made_for(files):
    """What loads also fits: OSEDiff and CCSR weights against the base loaded from the single file,
    GAN decoders against its VAE (same keys and shapes as the base's decoder)."""
    base = DiffusersSD21.load(files["sd21.safetensors"])
    for name in ("osediff.pkl", "osediff.safetensors"):
        w = load_osediff_weights(files[name])
        assert (len(w.unet_lora), len(w.vae_lora)) == (258, 32)
        w.check_fits(base.unet_shapes(), base.vae_shapes())
    versions = {}
    for name in ("ccsr-v2", "ccsr-v2/controlnet/diffusion_pytorch_model.safetensors", "real-world_ccsr.ckpt",
                 "real-world_ccsr-fp16.safetensors"):
        w = load_ccsr_weights(files[name])
        check_control_fits(w.control, dict(base.unet.config))
        versions[name] = (w.version, w.decoder is not None)
    assert versions == {"ccsr-v2": ("v2", True),
                        "ccsr-v2/controlnet/diffusion_pytorch_model.safetensors": ("v2", False),
                        "real-world_ccsr.ckpt": ("v1", True), "real-world_ccsr-fp16.safetensors": ("v1", True)}
    vae_shapes = base.vae_shapes()
    for name in ("ccsr-v2", "real-world_ccsr.ckpt", "real-world_ccsr-fp16.safetensors", "gan_vae.safetensors"):
        d = load_ccsr_decoder(files[name])
        want = {k for k in vae_shapes if k.startswith(("decoder.", "post_quant_conv."))}
        assert set(d.state_dict) == want, name
        assert all(tuple(t.shape) == vae_shapes[k] for k, t in d.state_dict.items()), name


def test_a_base_file_is_described_without_reading_its_tensors(files, monkeypatch):
    """The OSEDiff loader decides from the safetensors header: a multi-GB checkpoint given as OSEDiff
    weights is refused without loading it (no tensor is read)."""
    import safetensors

    real = safetensors.safe_open

    class Spy:
        def __init__(self, *a, **kw):
            self.f = real(*a, **kw)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def metadata(self):
            return self.f.metadata()

        def keys(self):
            return self.f.keys()

        def get_tensor(self, key):
            raise AssertionError(f"read tensor {key}")

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    with pytest.raises(WeightsError, match="looks like a Stable Diffusion checkpoint"):
        load_osediff_weights(files["sd21.safetensors"])


def test_the_base_lookup_does_not_take_a_ccsr_v1_file(files, tmp_path, monkeypatch):
    """CCSR-v1 copies may sit in checkpoints/ (some node packs put them there); they hold an SD 2.1
    UNet, so the header scan for "any SD 2.x-base file" used to pick one as the base, GAN decoder
    and all. It is reported as CCSR-v1 instead, and a real base beside it is found."""
    import os

    from sr_core import model_store as ms

    for var in (ms.ENV_COMFYUI_DIR, ms.ENV_MODELS_DIR, ms.ENV_EXTRA_MODEL_PATHS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delitem(sys.modules, "folder_paths", raising=False)
    ckpts = tmp_path / "models" / "checkpoints"
    ckpts.mkdir(parents=True)
    os.link(files["real-world_ccsr-fp16.safetensors"], ckpts / "real-world_ccsr-fp16.safetensors")
    assert ms.find_base(str(tmp_path / "models")) is None
    os.link(files["sd21.safetensors"], ckpts / "my-sd21.safetensors")
    assert ms.find_base(str(tmp_path / "models")) == ckpts / "my-sd21.safetensors"
