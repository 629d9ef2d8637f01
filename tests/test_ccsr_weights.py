"""Reading CCSR weights in every official form, refusing everything else, converting to safetensors."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import ccsr_fixtures as fx
from sr_core import keymap
from sr_core.ccsr import (
    LIGHTNING_CALLBACK,
    SAFETENSORS_FORMAT,
    control_from_v1,
    convert_ccsr_weights,
    load_ccsr_decoder,
    load_ccsr_weights,
    load_control_net,
)
from sr_core.errors import WeightsError

ARCH = ("block_out_channels", "down_block_types", "layers_per_block", "cross_attention_dim", "use_linear_projection",
        "attention_head_dim", "in_channels")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ccsr")
    v2_sd = fx.v2_state_dict(0)
    out = {
        "v2_sd": v2_sd,
        "v2": fx.write_v2_folder(d / "v2", state_dict=v2_sd),
        "v2_bin": fx.write_v2_folder(d / "v2bin", state_dict=v2_sd, bin_format=True, with_vae=False),
        "v1": fx.write_v1_ckpt(d / "v1" / "real-world_ccsr.ckpt"),
        "v1_fp32": fx.write_v1_safetensors(d / "v1" / "real-world_ccsr-fp32.safetensors"),
        "v1_fp16": fx.write_v1_safetensors(d / "v1" / "real-world_ccsr-fp16.safetensors", dtype=torch.float16),
        "dir": d,
    }
    return out


def test_v2_folder_loads_with_its_official_config(files):
    w = load_ccsr_weights(files["v2"])
    assert w.version == "v2" and w.control.version == "v2"
    assert set(w.control.state_dict) == set(files["v2_sd"])
    assert all(torch.equal(w.control.state_dict[k], v) for k, v in files["v2_sd"].items())
    assert not any(k.startswith("controlnet_cond_embedding") for k in w.control.state_dict)
    cfg = fx.official_v2_config()
    for k in ARCH:
        want = tuple(cfg[k]) if isinstance(cfg[k], list) else cfg[k]
        assert w.control.config[k] == want, k
    assert "use_vae_encode_condition" not in w.control.config  # read, not an architecture field
    # the GAN decoder from vae/: decoder + post_quant_conv only, the perturbed ones
    gan = fx.gan_vae().state_dict()
    assert set(w.decoder.state_dict) == {k for k in gan if k.startswith(("decoder.", "post_quant_conv."))}
    assert all(torch.equal(v, gan[k]) for k, v in w.decoder.state_dict.items())
    # the module loads the keys strictly
    net = load_control_net(w.control)
    assert set(net.state_dict()) == set(files["v2_sd"])


def test_v2_paths_folder_controlnet_subfolder_bin_and_single_file(files):
    ref = load_ccsr_weights(files["v2"]).control.state_dict
    # the controlnet/ folder itself (its sibling vae/ is found), the .bin form, the bare safetensors file
    direct = load_ccsr_weights(files["v2"] / "controlnet")
    assert direct.decoder is not None
    binary = load_ccsr_weights(files["v2_bin"])
    assert binary.decoder is None
    single = load_ccsr_weights(files["v2"] / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert single.version == "v2" and single.decoder is None
    cfg = fx.official_v2_config()
    for k in ARCH[:-2] + ("attention_head_dim",):
        want = tuple(cfg[k]) if isinstance(cfg[k], list) else cfg[k]
        assert single.control.config[k] == want, k  # inferred from the tensor shapes
    for w in (direct, binary, single):
        assert all(torch.equal(w.control.state_dict[k], v) for k, v in ref.items())


def test_unknown_config_fields_are_ignored(files, tmp_path):
    cfg = dict(fx.official_v2_config(), some_future_field=[1, 2], _use_default_values=["x"])
    root = fx.write_v2_folder(tmp_path / "v2", state_dict=files["v2_sd"], config=cfg, with_vae=False)
    assert load_ccsr_weights(root).version == "v2"


def test_v1_checkpoint_loads_without_pytorch_lightning_and_converts_exactly(files):
    before = set(torch.serialization.get_safe_globals())
    w = load_ccsr_weights(files["v1"])
    assert "pytorch_lightning" not in sys.modules
    assert set(torch.serialization.get_safe_globals()) == before  # the stub is allowed only while reading
    assert w.version == "v1" and w.decoder is not None and w.decoder.version == "v1"
    ldm, _ = fx.v1_control()
    sd = w.control.state_dict
    w8, b = ldm["input_blocks.0.0.weight"], ldm["input_blocks.0.0.bias"]
    assert w8.shape[1] == 8
    assert torch.equal(sd["conv_in.weight"], w8[:, :4]) and torch.equal(sd["condition_conv_in.weight"], w8[:, 4:])
    assert torch.equal(sd["conv_in.bias"], b) and torch.equal(sd["condition_conv_in.bias"], torch.zeros_like(b))
    names = keymap.controlnet_module_map(w.control.config)
    for d_mod, l_mod in names.items():
        if d_mod != "conv_in":
            assert torch.equal(sd[f"{d_mod}.weight"], ldm[f"{l_mod}.weight"]), d_mod
    assert torch.equal(sd["controlnet_down_blocks.11.weight"], ldm["zero_convs.11.0.weight"])
    assert torch.equal(sd["controlnet_mid_block.bias"], ldm["middle_block_out.0.bias"])
    # the GAN decoder from first_stage_model.* (ldm names) equals the diffusers decoder it was written from
    gan = fx.gan_vae().state_dict()
    assert set(w.decoder.state_dict) == {k for k in gan if k.startswith(("decoder.", "post_quant_conv."))}
    assert all(torch.equal(v, gan[k]) for k, v in w.decoder.state_dict.items())


def test_v1_safetensors_copies_load_like_the_checkpoint(files):
    ck = load_ccsr_weights(files["v1"])
    fp32 = load_ccsr_weights(files["v1_fp32"])
    fp16 = load_ccsr_weights(files["v1_fp16"])
    for k, v in ck.control.state_dict.items():
        assert torch.equal(fp32.control.state_dict[k], v), k
        assert fp16.control.state_dict[k].dtype == torch.float16
        torch.testing.assert_close(fp16.control.state_dict[k].float(), v, rtol=2e-3, atol=2e-4)
    assert fp16.decoder.state_dict["decoder.conv_in.weight"].dtype == torch.float16


def test_v2_to_v1_layout_sums_the_biases_and_computes_the_same_function(files):
    """ccsr.md §9: v2 → v1 puts concat(conv_in, condition_conv_in) in one 8-channel conv with the SUM of
    the biases; reading that back gives a different split of the same function."""
    w = load_ccsr_weights(files["v2"]).control
    ldm = w.to_ldm()
    sd = w.state_dict
    w8 = torch.cat([sd["conv_in.weight"], sd["condition_conv_in.weight"]], 1)
    assert torch.equal(ldm["input_blocks.0.0.weight"], w8)
    assert torch.equal(ldm["input_blocks.0.0.bias"], sd["conv_in.bias"] + sd["condition_conv_in.bias"])
    back = control_from_v1(ldm, "roundtrip")
    a, b = load_control_net(w), load_control_net(back)
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        (da, ma), (db, mb) = a(x, 500, ctx, c), b(x, 500, ctx, c)
    for u, v in zip(da + [ma], db + [mb]):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ refusals


def test_dangerous_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    bad = fx.write_evil_pickle(tmp_path / "real-world_ccsr.ckpt", marker)
    refused = r"refused to load: the pickle references (posix|os|nt)\.system.*nothing in it was run"
    with pytest.raises(WeightsError, match=refused):
        load_ccsr_weights(bad)
    with pytest.raises(WeightsError, match="refused to load"):
        load_ccsr_decoder(bad)
    assert not marker.exists()


def test_other_lightning_globals_are_still_refused(tmp_path):
    """Only the one callback class is allowed, under its exact name."""
    with fx.fake_class("pytorch_lightning.trainer.states.TrainerFn") as trainer_fn:
        torch.save({"state_dict": {"x": torch.zeros(1)}, "loops": trainer_fn}, str(tmp_path / "x.ckpt"))
    with pytest.raises(WeightsError, match=r"references pytorch_lightning\.trainer\.states\.TrainerFn"):
        load_ccsr_weights(tmp_path / "x.ckpt")
    assert LIGHTNING_CALLBACK == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"


def test_wrong_kinds_of_files_are_told_apart(files, tmp_path, osediff_pkl):
    import tiny_models
    from safetensors.torch import save_file

    sd_file = tiny_models.write_single_file(tmp_path / "sd" / "v2-1_512.safetensors", with_tokenizer=False)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}, str(lora))
    vae_file = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in fx.gan_vae().state_dict().items()}, str(vae_file))
    stock = tmp_path / "stock"
    fx.stock_controlnet().save_pretrained(stock / "controlnet")
    hint = tmp_path / "hint.safetensors"
    ldm, _ = fx.v1_control()
    save_file({**{f"control_model.{k}": v for k, v in ldm.items()},
               "control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}, str(hint))
    cases = [
        (osediff_pkl, r"OSEDiff weights file \(osediff\.pkl\)"),
        (sd_file, r"Stable Diffusion checkpoint .*without a CCSR control branch"),
        (lora, r"a LoRA"),
        (vae_file, r"a VAE \(use it as the GAN decoder"),
        (stock, r"standard ControlNet with a pixel-hint input .*not CCSR.s control branch"),
        (hint, r"pixel-hint input \(input_hint_block"),
        (files["v2"] / "vae", r"diffusers AutoencoderKL folder, not a ControlNet"),
    ]
    for path, match in cases:
        with pytest.raises(WeightsError, match=match) as e:
            load_ccsr_weights(path)
        assert str(path) in str(e.value) and "expected" in str(e.value)


def test_broken_and_missing_files(files, tmp_path):
    trunc = tmp_path / "trunc.ckpt"
    trunc.write_bytes(files["v1"].read_bytes()[:5000])
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    html = tmp_path / "page.safetensors"
    html.write_text("<!DOCTYPE html><html>quota exceeded</html>")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    nofolder = tmp_path / "nothing_here"
    nofolder.mkdir()
    badcfg = tmp_path / "badcfg"
    shutil.copytree(files["v2"] / "controlnet", badcfg / "controlnet")
    (badcfg / "controlnet" / "config.json").write_text("{not json")
    for path, match in [
        (trunc, "not a readable PyTorch checkpoint"),
        (empty, r"empty \(0 bytes\)"),
        (html, "HTML page"),
        (garbage, "not a readable safetensors file"),
        (tmp_path / "missing.ckpt", "not found"),
        (nofolder, "not a CCSR folder"),
        (badcfg, "unreadable config"),
    ]:
        with pytest.raises(WeightsError, match=match) as e:
            load_ccsr_weights(path)
        assert str(path) in str(e.value) or "config.json" in str(e.value)


def test_incomplete_or_mismatched_control_branches_name_the_first_bad_key(files, tmp_path):
    sd = dict(files["v2_sd"])
    del sd["down_blocks.1.resnets.0.conv1.weight"]
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model\.safetensors: the control branch lacks key "
                                           r"'down_blocks\.1\.resnets\.0\.conv1\.weight'"):
        load_ccsr_weights(fx.write_v2_folder(tmp_path / "a", state_dict=sd, with_vae=False))
    sd = dict(files["v2_sd"], **{"mystery.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match=r"unexpected key 'mystery\.weight'"):
        load_ccsr_weights(fx.write_v2_folder(tmp_path / "b", state_dict=sd, with_vae=False))
    sd = dict(files["v2_sd"], **{"condition_conv_in.weight": torch.zeros(32, 8, 3, 3)})
    shape_msg = r"'condition_conv_in\.weight' has shape \(32, 8, 3, 3\), expected \(32, 4, 3, 3\)"
    with pytest.raises(WeightsError, match=shape_msg):
        load_ccsr_weights(fx.write_v2_folder(tmp_path / "c", state_dict=sd, with_vae=False))
    cfg = dict(fx.official_v2_config(), use_vae_encode_condition=False)
    with pytest.raises(WeightsError, match="pixel-hint"):
        load_ccsr_weights(fx.write_v2_folder(tmp_path / "d", state_dict=files["v2_sd"], config=cfg, with_vae=False))
    # v1 whose input conv takes 4 channels (not concat(x_t, c))
    ldm, _ = fx.v1_control()
    ldm["input_blocks.0.0.weight"] = ldm["input_blocks.0.0.weight"][:, :4]
    with pytest.raises(WeightsError, match=r"takes 4 input channels; CCSR-v1's takes 8"):
        control_from_v1(ldm, "x.ckpt")
    ldm, _ = fx.v1_control()
    del ldm["zero_convs.3.0.weight"]
    with pytest.raises(WeightsError, match=r"x\.ckpt: .*lacks key 'zero_convs\.3\.0\.weight'"):
        control_from_v1(ldm, "x.ckpt")


def test_gan_decoder_sources_and_refusals(files, tmp_path, osediff_pkl):
    from safetensors.torch import save_file

    gan = fx.gan_vae().state_dict()
    want = {k: v for k, v in gan.items() if k.startswith(("decoder.", "post_quant_conv."))}
    vae_file = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in gan.items()}, str(vae_file))
    ldm_file = tmp_path / "vae_ldm.safetensors"
    from tiny_models import TINY_VAE
    save_file({k: v.contiguous() for k, v in keymap.vae_diffusers_to_ldm(gan, TINY_VAE).items()}, str(ldm_file))
    for src in (files["v2"], files["v2"] / "vae", files["v1"], files["v1_fp32"], vae_file, ldm_file):
        d = load_ccsr_decoder(src)
        assert set(d.state_dict) == set(want), src
        assert all(torch.equal(d.state_dict[k].float(), v) for k, v in want.items()), src
    single = files["v2"] / "controlnet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(WeightsError, match="control branch without a GAN decoder"):
        load_ccsr_decoder(single)
    import tiny_models
    sd_file = tiny_models.write_single_file(tmp_path / "sd" / "sd.safetensors", with_tokenizer=False)
    with pytest.raises(WeightsError, match="its VAE decoder is the stock one"):
        load_ccsr_decoder(sd_file)
    with pytest.raises(WeightsError, match="OSEDiff"):
        load_ccsr_decoder(osediff_pkl)
    with pytest.raises(WeightsError, match=r"not a VAE folder"):
        load_ccsr_decoder(files["dir"])


# ------------------------------------------------------------------ conversion


def test_convert_round_trips_v1_and_v2(files, tmp_path):
    from safetensors import safe_open

    for src, version in ((files["v1"], "v1"), (files["v2"], "v2"), (files["v1_fp16"], "v1")):
        dst = tmp_path / f"ccsr-{version}-{Path(src).stem}.safetensors"
        orig = convert_ccsr_weights(src, dst)
        with safe_open(str(dst), "pt") as f:
            meta = f.metadata()
            keys = list(f.keys())
        assert meta["format"] == SAFETENSORS_FORMAT and meta["ccsr_version"] == version
        assert json.loads(meta["controlnet_config"])["block_out_channels"] == [32, 64, 128, 128]
        assert all(k.startswith(("controlnet.", "vae.decoder.", "vae.post_quant_conv.")) for k in keys)
        back = load_ccsr_weights(dst)
        assert back.version == version and back.control.version == version
        assert back.control.config == orig.control.config
        for part in ("control", "decoder"):
            a, b = getattr(orig, part).state_dict, getattr(back, part).state_dict
            assert set(a) == set(b), (src, part)
            assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a), (src, part)
        # our form converts again, and its decoder loads on its own
        again = convert_ccsr_weights(dst, tmp_path / "again.safetensors")
        assert set(again.control.state_dict) == set(orig.control.state_dict)
        assert set(load_ccsr_decoder(dst).state_dict) == set(orig.decoder.state_dict)
    # a control-only conversion plus a decoder from elsewhere
    out = convert_ccsr_weights(files["v2_bin"], tmp_path / "bin.safetensors", decoder=files["v2"] / "vae")
    assert out.decoder is not None and load_ccsr_weights(tmp_path / "bin.safetensors").decoder is not None
    with pytest.raises(WeightsError, match="overwrite the input"):
        convert_ccsr_weights(tmp_path / "bin.safetensors", tmp_path / "bin.safetensors")


def test_full_size_key_map_matches_diffusers_controlnet_and_the_official_v2_keys():
    """SD 2.1-base size, built on the meta device: our key list is a diffusers ControlNet's without the
    pixel embedding; CCSRControlNet has exactly those keys plus condition_conv_in (the official v2 keys)."""
    from diffusers import ControlNetModel

    from sr_core.ccsr import CONTROLNET_ARCH_KEYS, build_control_net
    from sr_core.sd21 import UNET_CONFIG

    cfg = {k: v for k, v in UNET_CONFIG.items() if k in CONTROLNET_ARCH_KEYS}
    with torch.device("meta"):
        stock = ControlNetModel(**cfg)
    stock_keys = {k for k in stock.state_dict() if not k.startswith("controlnet_cond_embedding.")}
    assert set(keymap.controlnet_keys(cfg)) == stock_keys
    net = build_control_net(cfg, device="meta")
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert set(shapes) == stock_keys | {"condition_conv_in.weight", "condition_conv_in.bias"}
    assert shapes["condition_conv_in.weight"] == (320, 4, 3, 3) and shapes["conv_in.weight"] == (320, 4, 3, 3)
    assert len(net.controlnet_down_blocks) == 12
    m = keymap.controlnet_module_map(cfg)
    assert m["controlnet_down_blocks.11"] == "zero_convs.11.0" and m["controlnet_mid_block"] == "middle_block_out.0"
    assert m["conv_in"] == "input_blocks.0.0" and m["down_blocks.3.resnets.1.conv1"] == "input_blocks.11.0.in_layers.2"
    assert net.config.use_vae_encode_condition is True


def test_the_core_imports_without_diffusers():
    """ComfyUI need not have diffusers: the samplers and loaders import only torch (+ safetensors)."""
    import subprocess

    code = ("import sys, sr_core.ccsr, sr_core.ccsr_pipeline; "
            "assert 'diffusers' not in sys.modules and 'transformers' not in sys.modules")
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_a_decoder_only_file_is_not_a_control_branch(files, tmp_path):
    from sr_core.ccsr import CCSRWeights, save_ccsr_safetensors

    w = load_ccsr_weights(files["v2"])
    path = tmp_path / "decoder_only.safetensors"
    from safetensors.torch import save_file
    save_file({f"vae.{k}": v.contiguous() for k, v in w.decoder.state_dict.items()}, str(path),
              metadata={"format": SAFETENSORS_FORMAT, "ccsr_version": "v2"})
    with pytest.raises(WeightsError, match="without a control branch"):
        load_ccsr_weights(path)
    assert set(load_ccsr_decoder(path).state_dict) == set(w.decoder.state_dict)
    no_dec = tmp_path / "control_only.safetensors"
    save_ccsr_safetensors(CCSRWeights("v2", w.control, None, "x"), no_dec)
    with pytest.raises(WeightsError, match="holds the control branch but no GAN decoder"):
        load_ccsr_decoder(no_dec)
