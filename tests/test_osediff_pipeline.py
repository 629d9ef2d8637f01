"""The OSEDiff sampler and pipeline on a tiny SD 2.1-base-architecture model, against the formulas."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from image_helpers import smooth_photo
from sr_core.diffusers_host import DiffusersSD21
from sr_core.errors import InputImageError, SizeLimitError
from sr_core.osediff import load_osediff_weights
from sr_core.pipeline import decode_to_image, encode_lq, prepare_lq, sample_osediff, upscale_osediff
from sr_core.schedule import sd_alphas_cumprod


@pytest.fixture(scope="module")
def hosts(sd_folder, osediff_pkl):
    base = DiffusersSD21.load(sd_folder)
    patched = DiffusersSD21.load(sd_folder)
    patched.apply_osediff(load_osediff_weights(osediff_pkl))
    return base, patched


def _photo(h=20, w=24, seed=0):
    return smooth_photo(h, w, seed)


def test_alpha_bar_999_is_the_official_constant():
    a = sd_alphas_cumprod()
    assert a.dtype == torch.float32 and a.shape == (1000,)
    assert abs(float(a[999]) - 0.0046600951) < 1e-9
    assert abs(1 / float(a[999].sqrt()) - 14.64881944) < 1e-5


def test_every_lora_delta_changes_its_layer_by_the_peft_runtime_amount(hosts, osediff_pkl):
    """For each of the 258 + 32 layers: merged(x) == base(x) + 2·B(A(x)) as peft computes it at run time."""
    base, patched = hosts
    w = load_osediff_weights(osediff_pkl)
    g = torch.Generator().manual_seed(5)
    for part, pairs, b_root, p_root in (("unet", w.unet_lora, base.unet, patched.unet),
                                         ("vae", w.vae_lora, base.vae, patched.vae)):
        b_mods, p_mods = dict(b_root.named_modules()), dict(p_root.named_modules())
        for name, pair in pairs.items():
            bm, pm = b_mods[name], p_mods[name]
            if isinstance(bm, torch.nn.Linear):
                x = torch.randn(3, bm.in_features, generator=g)
                lora = F.linear(F.linear(x, pair.down), pair.up)
            else:
                x = torch.randn(1, bm.in_channels, 9, 9, generator=g)
                h = F.conv2d(x, pair.down, stride=bm.stride, padding=bm.padding)
                lora = F.conv2d(h, pair.up)
            with torch.no_grad():
                if name == "conv_in":  # base layer replaced by the file's conv_in
                    ref = F.conv2d(x, w.conv_in_weight, w.conv_in_bias, padding=1) + 2.0 * lora
                else:
                    ref = bm(x) + 2.0 * lora
                got = pm(x)
            assert not torch.allclose(got, bm(x), atol=1e-4), f"{part} {name} unchanged"
            torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4, msg=f"{part} {name}")
    # the decoder and post_quant_conv stay the base model's
    for k, v in base.vae.state_dict().items():
        if k.startswith(("decoder.", "post_quant_conv.")):
            assert torch.equal(v, patched.vae.state_dict()[k]), k


def test_one_step_equals_the_x0_formula(hosts):
    _, host = hosts
    g = torch.Generator().manual_seed(1)
    raw = torch.randn(2, 4, 5, 7, generator=g)
    ctx = host.encode_prompt("a cat")
    out = sample_osediff(host, raw, ctx, host.scale_factor)
    z = raw * 0.18215
    with torch.no_grad():
        eps = host.unet(z, torch.tensor([999, 999]), encoder_hidden_states=ctx.expand(2, -1, -1)).sample
    x0 = 14.64881944 * z - 14.61464787 * eps  # (z − √(1−ᾱ)ε)/√ᾱ with ᾱ₉₉₉ = 0.0046600951
    assert out.dtype == torch.float32
    torch.testing.assert_close(out * 0.18215, x0, atol=2e-5, rtol=2e-5)


def test_pipeline_is_deterministic_and_sizes_are_exact(hosts):
    _, host = hosts
    img = _photo(13, 17)
    ctx = host.encode_prompt("")
    a = upscale_osediff(host, host, img, ctx, scale=4)
    b = upscale_osediff(host, host, img, ctx, scale=4)
    assert a.shape == (1, 3, 52, 68)  # 4 × (13, 17): padding to 56 × 72 is cropped back
    assert torch.equal(a, b)
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0


def test_pipeline_stages_compose(hosts):
    """prepare → encode (mean) → one step → decode (clamp, crop, AdaIN), checked stage by stage."""
    _, host = hosts
    img = _photo(10, 12, seed=3)
    prep = prepare_lq(img, 2.0)
    assert prep.size == (20, 24) and prep.pixels.shape == (1, 3, 24, 24)
    torch.testing.assert_close(prep.pixels[..., :20, :24], prep.reference * 2 - 1)
    raw = encode_lq(host, prep.pixels)
    with torch.no_grad():
        torch.testing.assert_close(raw, host.vae.encode(prep.pixels).latent_dist.mean)
    ctx = host.encode_prompt("")
    x0 = sample_osediff(host, raw, ctx, host.scale_factor)
    out = decode_to_image(host, x0, prep.size, prep.reference, "none")
    with torch.no_grad():
        dec = host.vae.decode(x0).sample.clamp(-1, 1)[..., :20, :24] * 0.5 + 0.5
    torch.testing.assert_close(out, dec)
    full = upscale_osediff(host, host, img, ctx, scale=2.0, color_fix="adain")
    from sr_core.color import adain
    torch.testing.assert_close(full, adain(out, prep.reference))


def test_latent_sample_mode_follows_the_seed(hosts):
    _, host = hosts
    img = _photo()
    ctx = host.encode_prompt("")
    a = upscale_osediff(host, host, img, ctx, latent_mode="sample", seed=7)
    b = upscale_osediff(host, host, img, ctx, latent_mode="sample", seed=7)
    c = upscale_osediff(host, host, img, ctx, latent_mode="sample", seed=8)
    m = upscale_osediff(host, host, img, ctx, latent_mode="mean")
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, m)
    # the draw is fp32 randn of the latent's shape from a CPU generator seeded with the seed
    prep = prepare_lq(img, 4)
    mean, logvar = host.encode_moments(prep.pixels)
    n = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    expect_raw = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * n
    from sr_core.noise import NoiseSource
    torch.testing.assert_close(encode_lq(host, prep.pixels, "sample", [NoiseSource(7)]), expect_raw)


def test_batch_gives_each_image_its_own_result(hosts):
    _, host = hosts
    ctx = host.encode_prompt("")
    x, y = _photo(seed=1), _photo(seed=2)
    both = upscale_osediff(host, host, torch.cat([x, y]), ctx, latent_mode="sample", seed=3)
    alone = upscale_osediff(host, host, y, ctx, latent_mode="sample", seed=3)
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=0)


def test_bad_inputs_are_refused_with_clear_errors(hosts):
    _, host = hosts
    ctx = host.encode_prompt("")
    with pytest.raises(InputImageError, match="at least 8 px"):
        upscale_osediff(host, host, torch.rand(1, 3, 1, 30), ctx, scale=4)
    nan = torch.rand(1, 3, 8, 8)
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputImageError, match="NaN"):
        upscale_osediff(host, host, nan, ctx)
    with pytest.raises(InputImageError, match=r"\(N, 3, H, W\)"):
        upscale_osediff(host, host, torch.rand(1, 4, 8, 8), ctx)
    with pytest.raises(SizeLimitError, match="exceeds the untiled limit"):
        prepare_lq(torch.rand(1, 3, 600, 600), 4)


def test_single_file_checkpoint_gives_the_same_image_as_the_folder(sd_folder, osediff_pkl, tmp_path):
    """An ldm single-file checkpoint (what ComfyUI's Load Checkpoint reads) of the same weights."""
    import tiny_models

    ckpt = tiny_models.write_single_file(tmp_path / "ckpt" / "tiny-sd21.safetensors")
    outs = []
    for base in (sd_folder, ckpt):
        host = DiffusersSD21.load(base)
        host.apply_osediff(load_osediff_weights(osediff_pkl))
        outs.append(upscale_osediff(host, host, _photo(), host.encode_prompt("a cat"), scale=4))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)


def test_single_file_without_tokenizer_says_where_to_put_one(tmp_path, monkeypatch):
    import tiny_models
    from sr_core.errors import BaseModelError

    monkeypatch.delenv("COMFYUI_DIR", raising=False)
    ckpt = tiny_models.write_single_file(tmp_path / "alone.safetensors", with_tokenizer=False)
    with pytest.raises(BaseModelError, match=r"carries no tokenizer.*--tokenizer"):
        DiffusersSD21.load(ckpt)
