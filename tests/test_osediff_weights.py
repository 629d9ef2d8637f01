"""Reading the official osediff.pkl format and our safetensors form; refusing bad files."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

import tiny_models
from sr_core.cli import main
from sr_core.errors import WeightsError
from sr_core.osediff import load_osediff_weights, parse_official_dict


@pytest.fixture(scope="module")
def base():
    unet, vae, _ = tiny_models.build_models()
    return unet, vae


@pytest.fixture(scope="module")
def official(base):
    return tiny_models.make_osediff_dict(*base)


def test_reads_official_layout(osediff_pkl):
    w = load_osediff_weights(osediff_pkl)
    assert (w.rank_unet, w.rank_vae) == (4, 4)
    assert w.unet_scale == 2.0 and w.vae_scale == 2.0  # peft's alpha 8 / rank 4
    assert len(w.unet_lora) == 258 and len(w.vae_lora) == 32  # VAE list holds duplicates; modules are unique
    adapters = {p.adapter for p in w.unet_lora.values()}
    assert adapters == {"default_encoder", "default_decoder", "default_others"}
    assert w.unet_lora["conv_in"].adapter == "default_encoder"
    assert w.unet_lora["mid_block.resnets.0.conv1"].adapter == "default_others"
    assert tuple(w.conv_in_weight.shape) == (32, 4, 3, 3)


def test_deltas_follow_the_lora_formula(official):
    w = parse_official_dict(official, "mem")
    sd = official["state_dict_unet"]
    replace, deltas = w.unet_weights()
    # a Linear: ΔW = 2 · B @ A
    m = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    a, b = sd[f"{m}.lora_A.default_encoder.weight"], sd[f"{m}.lora_B.default_encoder.weight"]
    torch.testing.assert_close(deltas[f"{m}.weight"], 2.0 * b @ a)
    # a 3×3 conv: ΔW[o,i,y,x] = 2 · Σ_r B[o,r] A[r,i,y,x]
    m = "up_blocks.1.resnets.2.conv2"
    a, b = sd[f"{m}.lora_A.default_decoder.weight"], sd[f"{m}.lora_B.default_decoder.weight"]
    expect = 2.0 * (b[:, :, 0, 0] @ a.reshape(a.shape[0], -1)).reshape(b.shape[0], *a.shape[1:])
    torch.testing.assert_close(deltas[f"{m}.weight"], expect)
    # conv_in is replaced by base_layer, then its own LoRA delta is added
    a, b = sd["conv_in.lora_A.default_encoder.weight"], sd["conv_in.lora_B.default_encoder.weight"]
    expect = sd["conv_in.base_layer.weight"] + 2.0 * torch.einsum("or,rihw->oihw", b[:, :, 0, 0], a)
    torch.testing.assert_close(replace["conv_in.weight"], expect)
    torch.testing.assert_close(replace["conv_in.bias"], sd["conv_in.base_layer.bias"])
    assert "conv_in.weight" not in deltas


def test_safetensors_form_round_trips(osediff_pkl, tmp_path):
    dst = tmp_path / "osediff.safetensors"
    assert main(["convert-weights", str(osediff_pkl), str(dst)]) == 0
    a, b = load_osediff_weights(osediff_pkl), load_osediff_weights(dst)
    assert a.module_lists == b.module_lists
    ra, da = a.unet_weights()
    rb, db = b.unet_weights()
    assert da.keys() == db.keys()
    for k in da:
        assert torch.equal(da[k], db[k]), k
    for k in ra:
        assert torch.equal(ra[k], rb[k])
    va, vb = a.vae_deltas(), b.vae_deltas()
    assert all(torch.equal(va[k], vb[k]) for k in va)
    # converting again refuses to overwrite
    assert main(["convert-weights", str(osediff_pkl), str(dst)]) == 2


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "lora.pkl"
    torch.save({"some.lora_down.weight": torch.zeros(2, 2)}, p)
    with pytest.raises(WeightsError, match=r"lora\.pkl.*not an OSEDiff checkpoint.*'unet_lora_encoder_modules'"):
        load_osediff_weights(p)
    p2 = tmp_path / "other.safetensors"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(p2))
    with pytest.raises(WeightsError, match="not an OSEDiff safetensors file"):
        load_osediff_weights(p2)


def test_missing_lora_b_names_file_and_key(official, tmp_path):
    d = {**official, "state_dict_unet": dict(official["state_dict_unet"])}
    key = "mid_block.attentions.0.proj_in.lora_B.default_others.weight"
    del d["state_dict_unet"][key]
    p = tmp_path / "broken.pkl"
    torch.save(d, p)
    with pytest.raises(WeightsError) as e:
        load_osediff_weights(p)
    assert "broken.pkl" in str(e.value)
    assert "mid_block.attentions.0.proj_in.lora_A.default_others.weight" in str(e.value)
    assert "lora_B" in str(e.value)


def test_rank_mismatch(official, tmp_path):
    d = {**official, "rank_unet": 8}
    p = tmp_path / "rank.pkl"
    torch.save(d, p)
    with pytest.raises(WeightsError, match=r"rank\.pkl.*rank 4 but the file says rank 8"):
        load_osediff_weights(p)


def test_shapes_that_do_not_fit_the_base(official, base):
    w = parse_official_dict(official, "osediff.pkl")
    unet, vae = base
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    vshapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    w.check_fits(shapes, vshapes)  # fits its own base
    bad = dict(shapes)
    bad["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"] = (64, 1024)  # SD2 text width
    with pytest.raises(WeightsError) as e:
        w.check_fits(bad, vshapes)
    assert "osediff.pkl" in str(e.value) and "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight" in str(e.value)


def test_empty_truncated_and_html_files(osediff_pkl, tmp_path):
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        load_osediff_weights(empty)
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(osediff_pkl.read_bytes()[: os.path.getsize(osediff_pkl) // 2])
    with pytest.raises(WeightsError, match="cut.pkl"):
        load_osediff_weights(cut)
    html = tmp_path / "osediff.pkl"
    html.write_text("<!DOCTYPE html><html><body>Google Drive - Virus scan warning</body></html>")
    with pytest.raises(WeightsError, match="HTML"):
        load_osediff_weights(html)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/sr_core_pwned",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = "/tmp/sr_core_pwned"
    if os.path.exists(marker):
        os.remove(marker)
    p = tmp_path / "evil.pkl"
    with open(p, "wb") as f:
        pickle.dump({"rank_unet": _Evil()}, f)
    with pytest.raises(WeightsError, match="refused"):
        load_osediff_weights(p)
    assert not os.path.exists(marker)
