"""CCSR end to end on tiny SD 2.1-architecture models: parity with an independent computation shaped
like the official v2 pipeline (diffusers DDPMScheduler), v1 against the original 8-channel control
branch, the GAN decoder, sizes, seeds and the stability metrics."""
from __future__ import annotations

import pytest
import torch

import ccsr_fixtures as fx
from image_helpers import smooth_photo
from sr_core.ccsr import (
    NEGATIVE_PROMPT,
    POSITIVE_PROMPT,
    V2_PRESETS,
    CCSRv1Settings,
    CCSRv2Settings,
    load_ccsr_weights,
    v2_settings,
)
from sr_core.ccsr_host import load_ccsr, load_control_branch, load_gan_decoder
from sr_core.ccsr_pipeline import stability, stability_of_outputs, upscale_ccsr
from sr_core.diffusers_host import DiffusersSD21
from sr_core.errors import InputImageError, WeightsError
from sr_core.pipeline import encode_lq, prepare_lq


@pytest.fixture(scope="module")
def setup(sd_folder, tmp_path_factory):
    d = tmp_path_factory.mktemp("ccsr_models")
    v2_sd = fx.v2_state_dict(0)
    root = fx.write_v2_folder(d / "v2", state_dict=v2_sd)
    ckpt = fx.write_v1_ckpt(d / "v1" / "real-world_ccsr.ckpt")
    host = DiffusersSD21.load(sd_folder)
    v2 = load_ccsr(host, root)
    v1 = load_ccsr(host, ckpt)
    return {"host": host, "v2": v2, "v1": v1, "v2_sd": v2_sd, "root": root, "ckpt": ckpt,
            "pos": host.encode_prompt(POSITIVE_PROMPT), "neg": host.encode_prompt(NEGATIVE_PROMPT),
            "empty": host.encode_prompt("")}


def _photo(h=12, w=16, seed=0):
    return smooth_photo(h, w, seed)


# ------------------------------------------------------------------ the independent v2 reference


def _official_controlnet(v2_sd):
    """How the official repo runs the control branch: diffusers' ControlNetModel forward, with the
    pixel embedding replaced by condition_conv_in applied to the VAE latent."""
    net = fx.stock_controlnet(4)
    conv = torch.nn.Conv2d(4, 32, 3, padding=1)
    net.controlnet_cond_embedding = conv
    sd = {k: v for k, v in v2_sd.items() if not k.startswith("condition_conv_in")}
    sd["controlnet_cond_embedding.weight"] = v2_sd["condition_conv_in.weight"]
    sd["controlnet_cond_embedding.bias"] = v2_sd["condition_conv_in.bias"]
    net.load_state_dict(sd, strict=True)
    return net.eval()


@torch.no_grad()
def official_v2(unet, controlnet, c, pos, neg, n, t_max, t_min, cfg, g):
    """CCSR-v2's ``StableDiffusionControlNetPipeline.__call__`` (pipelines/pipeline_ccsr.py at c5f7d4e) step
    by step in fp32 with diffusers' DDPMScheduler (SD 2.1's scheduler config), every random draw from
    the generator ``g`` in the sr_core order (start noise, re-noise, one per DDPM step)."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          clip_sample=False, steps_offset=1, prediction_type="epsilon")
    sched.set_timesteps(n)
    timesteps = sched.timesteps
    do_cfg = cfg > 1.0
    prompt_embeds = torch.cat([neg, pos]) if do_cfg else pos
    cond = torch.cat([c, c]) if do_cfg else c

    def predict(x, t, emb, vae_cond):
        down, mid = controlnet(x, t, encoder_hidden_states=emb, controlnet_cond=vae_cond, conditioning_scale=1.0,
                               guess_mode=False, return_dict=False)
        return unet(x, t, encoder_hidden_states=emb, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid, return_dict=False)[0]

    def x0_from(x, t, eps):
        a = sched.alphas_cumprod[t]
        return (x - (1 - a) ** 0.5 * eps) / a ** 0.5

    latents = torch.randn(c.shape, generator=g)
    latents = sched.add_noise(c[0:1], latents, torch.tensor([999]))  # start_point 'lr'
    t_tao = timesteps[-round(n * t_max)]
    if t_max != 1:
        t = torch.tensor([999])
        emb0, cond0 = (prompt_embeds.chunk(2)[0], cond.chunk(2)[0]) if do_cfg else (prompt_embeds, cond)
        eps = predict(latents, t, emb0, cond0)  # no CFG; the NEGATIVE prompt when cfg > 1
        x0_t = x0_from(latents, t, eps)
        latents = sched.add_noise(x0_t, torch.randn(c.shape, generator=g), t_tao)
    timesteps = timesteps[-round(n * t_max):]
    timesteps = timesteps[:-round(n * t_min)] if t_min > 0 else timesteps
    if n == 1:
        return x0_t
    for t in timesteps:
        inp = torch.cat([latents] * 2) if do_cfg else latents
        eps = predict(inp, t, prompt_embeds, cond)
        if do_cfg:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + cfg * (eps_c - eps_u)
        latents_old = latents
        latents = sched.step(eps, t, latents, generator=g, return_dict=False)[0]
    return x0_from(latents_old, t, eps) if t_min else latents


@pytest.mark.parametrize("name,settings", [
    ("one-step", V2_PRESETS["one-step"]),
    ("two-step", V2_PRESETS["two-step"]),
    ("ten-step", CCSRv2Settings(steps=10, t_max=0.6667, t_min=0.5, cfg=3.0)),
    ("to-t1", CCSRv2Settings(steps=4, t_max=0.6667, t_min=0.0, cfg=1.0)),
])
def test_v2_matches_the_official_pipeline_computation(setup, name, settings):
    """Within 0.5/255 mean absolute difference on the decoded image (fp32, posterior mean, same draws)."""
    host, models = setup["host"], setup["v2"]
    img = _photo(12, 16)
    out = upscale_ccsr(host, host, models.control, img, setup["pos"], setup["neg"], settings=settings, seed=5,
                       color_fix="none", decoder_vae=models.decoder, process_size=None)
    prep = prepare_lq(img, 4.0)
    with torch.no_grad():
        c = host.vae.encode(prep.pixels).latent_dist.mean * 0.18215
        z = official_v2(host.unet, _official_controlnet(setup["v2_sd"]), c, setup["pos"], setup["neg"], settings.steps,
                        settings.t_max, settings.t_min, settings.cfg, torch.Generator().manual_seed(5))
        ref = (fx.gan_vae().decode(z / 0.18215).sample / 2 + 0.5).clamp(0, 1)[..., :48, :64]
    assert out.shape == ref.shape == (1, 3, 48, 64)
    mad = (out - ref).abs().mean().item()
    print(f"{name}: MAD {mad * 255:.6f}/255, max {(out - ref).abs().max().item() * 255:.5f}/255")
    assert mad < 0.5 / 255, f"{name}: MAD {mad * 255:.4f}/255"
    assert (out - ref).abs().max().item() < 2e-3


def test_v2_posterior_sample_is_drawn_before_everything(setup):
    host, models = setup["host"], setup["v2"]
    img = _photo(12, 16, seed=2)
    settings = V2_PRESETS["two-step"]
    out = upscale_ccsr(host, host, models.control, img, setup["pos"], setup["neg"], settings=settings, seed=9,
                       latent_mode="sample", color_fix="none", decoder_vae=models.decoder, process_size=None)
    g = torch.Generator().manual_seed(9)
    prep = prepare_lq(img, 4.0)
    with torch.no_grad():
        dist = host.vae.encode(prep.pixels).latent_dist
        c = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)) * 0.18215
        z = official_v2(host.unet, _official_controlnet(setup["v2_sd"]), c, setup["pos"], setup["neg"], 6, 0.6667, 0.5,
                        4.5, g)
        ref = (fx.gan_vae().decode(z / 0.18215).sample / 2 + 0.5).clamp(0, 1)[..., :48, :64]
    assert (out - ref).abs().mean().item() < 0.5 / 255


# ------------------------------------------------------------------ v1


@torch.no_grad()
def original_v1(unet, control8, c, ctx, g, n=45, t_max=0.6667, t_min=0.3333):
    """ccsr.md §2.1 written out: guided-diffusion respacing in float64, the ORIGINAL 8-channel control
    branch on concat(x_t, c), ldm's x̂0 / q_sample / posterior on the respaced chain."""
    import numpy as np

    # ldm: betas in float64, ᾱ = cumprod in float64, registered as a float32 buffer
    ac = np.cumprod(1 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2)
    ac = ac.astype(np.float32).astype(np.float64)
    stride, pos, use = 999 / (n - 1), 0.0, []
    for _ in range(n):
        use.append(round(pos))
        pos += stride
    new_ac = ac[use]
    betas = 1 - new_ac / np.append(1.0, new_ac[:-1])
    acp = np.cumprod(1 - betas)
    acp_prev = np.append(1.0, acp[:-1])
    var = betas * (1 - acp_prev) / (1 - acp)
    c1 = betas * np.sqrt(acp_prev) / (1 - acp)
    c2 = (1 - acp_prev) * np.sqrt(1 - betas) / (1 - acp)
    f = lambda arr, i: torch.tensor(arr[i], dtype=torch.float32)  # noqa: E731

    def eps_at(x, i):
        t = torch.tensor([use[i]])
        down, mid = control8(torch.cat([x, c], 1), t, encoder_hidden_states=ctx,
                             controlnet_cond=torch.zeros(1, 3, 8 * x.shape[2], 8 * x.shape[3]), return_dict=False)
        return unet(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample

    x0_of = lambda x, e, i: torch.sqrt(1 / f(acp, i)) * x - torch.sqrt(1 / f(acp, i) - 1) * e  # noqa: E731
    x = torch.randn(c.shape, generator=g)
    x0 = x0_of(x, eps_at(x, n - 1), n - 1)
    tau = round((n - 1) * t_max)
    x = torch.sqrt(f(acp, tau)) * x0 + torch.sqrt(1 - f(acp, tau)) * torch.randn(c.shape, generator=g)
    for i in range(round(n * t_max) - 1, round(n * t_min) - 1, -1):
        x0 = x0_of(x, eps_at(x, i), i)
        x = f(c1, i) * x0 + f(c2, i) * x + torch.sqrt(f(var, i)) * torch.randn(c.shape, generator=g)
    return x0


def test_v1_matches_the_original_8_channel_computation(setup):
    host, models = setup["host"], setup["v1"]
    img = _photo(12, 16, seed=4)
    out = upscale_ccsr(host, host, models.control, img, setup["empty"], settings=CCSRv1Settings(), seed=3,
                       color_fix="none", decoder_vae=models.decoder, process_size=None)
    prep = prepare_lq(img, 4.0)
    _, control8 = fx.v1_control()
    with torch.no_grad():
        c = host.vae.encode(prep.pixels).latent_dist.mean * 0.18215
        z = original_v1(host.unet, control8, c, setup["empty"], torch.Generator().manual_seed(3))
        ref = (fx.gan_vae().decode(z / 0.18215).sample / 2 + 0.5).clamp(0, 1)[..., :48, :64]
    assert (out - ref).abs().mean().item() < 0.5 / 255
    assert models.version == "v1" and models.control.version == "v1"


def test_v1_converted_control_branch_equals_the_8_channel_original(setup):
    _, control8 = fx.v1_control()
    branch = setup["v1"].control
    g = torch.Generator().manual_seed(1)
    for t in (999, 658, 341):
        x, c = torch.randn(2, 4, 6, 8, generator=g), torch.randn(2, 4, 6, 8, generator=g)
        ctx = torch.randn(2, 77, 32, generator=g)
        down, mid = branch.residuals(x, t, ctx, c)
        with torch.no_grad():
            ref_down, ref_mid = control8(torch.cat([x, c], 1), torch.tensor([t, t]), encoder_hidden_states=ctx,
                                         controlnet_cond=torch.zeros(2, 3, 48, 64), return_dict=False)
        assert len(down) == 12
        for a, b in zip(down + [mid], list(ref_down) + [ref_mid]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


# ------------------------------------------------------------------ modules


def test_zero_convs_decide_whether_the_unet_output_changes(setup):
    host = setup["host"]
    branch = load_control_branch(host, load_ccsr_weights(setup["root"]))
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(1, 4, 6, 8, generator=g), torch.randn(1, 4, 6, 8, generator=g)
    plain = host.predict_eps(x, 499, setup["pos"])
    with_control = host.predict_eps(x, 499, setup["pos"], branch.residuals(x, 499, setup["pos"], c))
    assert not torch.allclose(plain, with_control, atol=1e-4)
    with torch.no_grad():
        for conv in list(branch.net.controlnet_down_blocks) + [branch.net.controlnet_mid_block]:
            conv.weight.zero_()
            conv.bias.zero_()
    down, mid = branch.residuals(x, 499, setup["pos"], c)
    assert all(float(r.abs().max()) == 0.0 for r in down + [mid])
    assert torch.equal(host.predict_eps(x, 499, setup["pos"], (down, mid)), plain)


def test_gan_decoder_changes_the_decode_and_leaves_the_encoder_alone(setup):
    host, dec = setup["host"], setup["v2"].decoder
    before = {k: v.clone() for k, v in host.vae.state_dict().items()}
    pixels = prepare_lq(_photo(), 2.0).pixels
    assert all(torch.equal(a, b) for a, b in zip(dec.encode_moments(pixels), host.encode_moments(pixels)))
    raw = encode_lq(host, pixels)
    stock, gan = host.decode(raw), dec.decode(raw)
    assert (stock - gan).abs().mean() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(gan, fx.gan_vae().decode(raw).sample, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in host.vae.state_dict().items())  # the host VAE is untouched
    # the same decoder from the v1 checkpoint
    torch.testing.assert_close(setup["v1"].decoder.decode(raw), gan, rtol=1e-5, atol=1e-5)


def test_weights_for_another_base_are_refused(setup, tmp_path):
    host = setup["host"]
    w = load_ccsr_weights(setup["root"])
    w.control.config = dict(w.control.config, cross_attention_dim=1024)
    with pytest.raises(WeightsError, match=r"cross_attention_dim is 1024 but the loaded UNet's is 32"):
        load_control_branch(host, w.control)
    d = w.decoder
    d.state_dict = dict(d.state_dict, **{"decoder.conv_in.weight": torch.zeros(128, 8, 3, 3)})
    with pytest.raises(WeightsError, match=r"'decoder\.conv_in\.weight' has shape \(128, 8, 3, 3\)"):
        load_gan_decoder(host, d)


# ------------------------------------------------------------------ the pipeline


def test_sizes_seeds_and_batches(setup):
    host, m = setup["host"], setup["v2"]
    img = _photo(13, 17)
    run = lambda im, s, st=V2_PRESETS["two-step"]: upscale_ccsr(  # noqa: E731
        host, host, m.control, im, setup["pos"], setup["neg"], settings=st, seed=s, decoder_vae=m.decoder,
        process_size=None)
    a, b, c = run(img, 1), run(img, 1), run(img, 2)
    assert a.shape == (1, 3, 52, 68)  # exactly 4× (13, 17): padded to 56 × 72 and cropped back
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-3
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    one = V2_PRESETS["one-step"]
    assert not torch.equal(run(img, 1, one), run(img, 2, one))  # N = 1 still depends on the seed (q(c, 999, n0))
    y = _photo(13, 17, seed=6)
    both = run(torch.cat([img, y]), 1)
    torch.testing.assert_close(both[:1], a, rtol=0, atol=1e-5)
    torch.testing.assert_close(both[1:], run(y, 1), rtol=0, atol=1e-5)


def test_explicit_settings_equal_the_presets_bit_for_bit(setup):
    host, m = setup["host"], setup["v2"]
    img = _photo(8, 8)
    for preset, explicit in (("one-step", CCSRv2Settings(steps=1, t_max=0.6666, t_min=0.0, cfg=1.0)),
                             ("two-step", v2_settings("one-step", steps=6, t_max=0.6667, t_min=0.5, cfg=4.5))):
        outs = [upscale_ccsr(host, host, m.control, img, setup["pos"], setup["neg"], settings=s, seed=0,
                             process_size=None) for s in (V2_PRESETS[preset], explicit)]
        assert torch.equal(outs[0], outs[1]), preset


def test_small_images_are_processed_at_process_size_and_returned_at_the_exact_size(setup):
    host, m = setup["host"], setup["v2"]
    img = _photo(5, 7)
    calls = []
    kw = dict(settings=V2_PRESETS["one-step"], seed=0, decoder_vae=m.decoder)
    big = upscale_ccsr(host, host, m.control, img, setup["pos"], setup["neg"], process_size=48,
                       callback=lambda d, n: calls.append((d, n)), **kw)
    small = upscale_ccsr(host, host, m.control, img, setup["pos"], setup["neg"], process_size=None, **kw)
    assert big.shape == small.shape == (1, 3, 20, 28) and calls == [(1, 1)]
    assert (big - small).abs().mean() > 1e-3  # it really ran at 48 × 67 px
    with pytest.raises(InputImageError, match="at least 8 px"):  # no enlargement rescues a sliver
        upscale_ccsr(host, host, m.control, torch.rand(1, 3, 1, 30), setup["pos"], process_size=512, **kw)


def test_color_fix_is_adain_against_the_upscaled_input(setup):
    from sr_core.color import adain

    host, m = setup["host"], setup["v2"]
    img = _photo(10, 12, seed=3)
    kw = dict(settings=V2_PRESETS["one-step"], seed=0, decoder_vae=m.decoder, process_size=None)
    raw = upscale_ccsr(host, host, m.control, img, setup["pos"], color_fix="none", **kw)
    fixed = upscale_ccsr(host, host, m.control, img, setup["pos"], color_fix="adain", **kw)
    torch.testing.assert_close(fixed, adain(raw, prepare_lq(img, 4.0).reference))


def test_stability_metrics(setup):
    base = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    same = stability_of_outputs([base, base.clone(), base.clone()], reference=base * 0.9)
    assert same.g_std == 0.0 and same.l_std == 0.0 and same.metric == "psnr_y"
    # two runs ±d around the base: per-pixel population std is d inside the 4-px border
    d = 0.01
    r = stability_of_outputs([base + d, base - d])
    assert abs(r.l_std - d) < 1e-6 and r.metric == "mean_gradient"
    # G-STD: per-image std of PSNR across runs, averaged over images
    ref = base.clone()
    runs = [base + 0.02, base + 0.04]
    got = stability_of_outputs(runs, reference=ref)
    p = got.values  # (runs, images)
    assert p.shape == (2, 2)
    assert abs(got.g_std - float(p.std(0, unbiased=False).mean())) < 1e-12
    dy = 0.02 * (65.481 + 128.553 + 24.966) / 255  # a +0.02 shift of R, G and B moves Y by this
    assert abs(float(p[0, 0]) - 10 * torch.log10(torch.tensor(1 / dy ** 2)).item()) < 1e-3
    # the real pipeline: different seeds give different pictures, one-step less than the full 45-step v1
    host, m = setup["host"], setup["v2"]
    img = _photo(8, 8)
    one = stability(lambda s: upscale_ccsr(host, host, m.control, img, setup["pos"], settings=V2_PRESETS["one-step"],
                                           seed=s, process_size=None), seeds=[0, 1, 2])
    assert one.l_std > 0 and one.g_std > 0
    with pytest.raises(InputImageError, match="at least 2 distinct seeds"):
        stability(lambda s: img, seeds=[1, 1])
