"""The CCSR samplers' call sequence, contexts and noise protocol, with a recording fake model;
the residual layouts (diffusers down/mid vs ComfyUI's control dict) on the tiny UNet."""
from __future__ import annotations

import pytest
import torch

from sr_core.ccsr import (
    T_START,
    CCSRSettingsError,
    CCSRv1Settings,
    CCSRv2Settings,
    V2_PRESETS,
    ccsr_eps,
    plan_v1,
    sample_ccsr_v1,
    sample_ccsr_v2,
    to_ldm_control,
)
from sr_core.noise import NoiseSource
from sr_core.protocols import Denoiser
from sr_core.schedule import ddpm_step, predict_x0, q_sample, sd_alphas_cumprod

SHAPE = (1, 4, 3, 5)
POS = torch.full((1, 77, 8), 1.0)
NEG = torch.full((1, 77, 8), -1.0)


class Recorder:
    """A fake UNet + control branch: ε depends on x, t, the context and the residuals; every call is recorded."""

    def __init__(self) -> None:
        self.alphas_cumprod = sd_alphas_cumprod()
        self.calls: list[tuple[torch.Tensor, int, float]] = []  # (x, t, context marker) per UNet call
        self.control_calls: list[tuple[int, float]] = []

    def residuals(self, x_t, t, context, cond_latent):
        self.control_calls.append((t, float(context.mean())))
        down = [torch.tanh(x_t + cond_latent) * (i + 1) / 12 for i in range(12)]
        return down, torch.tanh(x_t - cond_latent)

    def predict_eps(self, x_t, t, context, control=None):
        down, mid = control
        self.calls.append((x_t.clone(), int(t), float(context.mean())))
        return 0.3 * torch.tanh(x_t) + 0.1 * down[3] + 0.05 * mid + 0.02 * float(context.mean()) + t / 5000.0

    def eps(self, x_t, t, c, ctx):
        """The ε this fake gives (for the hand computation)."""
        down = torch.tanh(x_t + c) * 4 / 12
        return 0.3 * torch.tanh(x_t) + 0.1 * down + 0.05 * torch.tanh(x_t - c) + 0.02 * float(ctx.mean()) + t / 5000.0


def _cond(seed: int = 5) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _draws(seed: int, k: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g) for _ in range(k)]


def test_recorder_is_a_denoiser_and_control_branch():
    from sr_core.ccsr import ControlBranch

    r = Recorder()
    assert isinstance(r, Denoiser) and isinstance(r, ControlBranch)


def test_two_step_preset_calls_draws_and_output_by_hand():
    """Call at 999 with the NEGATIVE prompt (official quirk), re-noise to 499, one CFG step at 499
    (uncond first), output x̂0 at 499; draws n0, n1, one loop draw — nothing else."""
    r, c, seed = Recorder(), _cond(), 11
    src = NoiseSource(seed)
    out = sample_ccsr_v2(r, r, c, POS, NEG, V2_PRESETS["two-step"], [src])
    ac = r.alphas_cumprod
    n0, n1, n2 = _draws(seed, 3)
    assert src.draws == [SHAPE] * 3
    assert [(t, ctx) for _, t, ctx in r.calls] == [(999, -1.0), (499, -1.0), (499, 1.0)]
    assert r.control_calls == [(999, -1.0), (499, -1.0), (499, 1.0)]  # the control branch sees the same context
    x = q_sample(c, n0, ac[999])
    torch.testing.assert_close(r.calls[0][0], x, rtol=0, atol=0)
    x0_t = predict_x0(x, r.eps(x, 999, c, NEG), ac[999])
    x = q_sample(x0_t, n1, ac[499])
    torch.testing.assert_close(r.calls[1][0], x, rtol=0, atol=0)
    eps_u, eps_c = r.eps(x, 499, c, NEG), r.eps(x, 499, c, POS)
    _, want = ddpm_step(x, eps_u + 4.5 * (eps_c - eps_u), ac[499], ac[333], n2)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    # the generator advanced by exactly three latent draws
    g = torch.Generator().manual_seed(seed)
    _ = [torch.randn(SHAPE, generator=g) for _ in range(3)]
    assert torch.equal(src.generator.get_state(), g.get_state())


def test_first_step_context_follows_the_quirk_flag_and_cfg():
    for settings, want in [
        (V2_PRESETS["two-step"], -1.0),                                               # cfg > 1: negative (official)
        (CCSRv2Settings(steps=6, t_min=0.5, cfg=4.5, first_step_negative=False), 1.0),  # flag off: positive
        (CCSRv2Settings(steps=6, t_min=0.5, cfg=1.0), 1.0),                              # no CFG: positive
    ]:
        r = Recorder()
        sample_ccsr_v2(r, r, _cond(), POS, NEG, settings, [NoiseSource(0)])
        assert r.calls[0][1] == 999 and r.calls[0][2] == want
    r = Recorder()  # no CFG anywhere with cfg 1: one UNet call per step, positive context
    sample_ccsr_v2(r, r, _cond(), POS, NEG, CCSRv2Settings(steps=10, t_min=0.5, cfg=1.0), [NoiseSource(0)])
    assert [(t, ctx) for _, t, ctx in r.calls] == [(999, 1.0), (601, 1.0), (501, 1.0)]


def test_one_step_is_one_call_and_one_draw():
    r, c = Recorder(), _cond()
    src = NoiseSource(3)
    out = sample_ccsr_v2(r, r, c, POS, None, V2_PRESETS["one-step"], [src])
    assert len(r.calls) == 1 and r.calls[0][1] == T_START and src.draws == [SHAPE]
    x = q_sample(c, _draws(3, 1)[0], r.alphas_cumprod[999])
    torch.testing.assert_close(out, predict_x0(x, r.eps(x, 999, c, POS), r.alphas_cumprod[999]), rtol=0, atol=0)


@pytest.mark.parametrize("settings,draws,timesteps", [
    (CCSRv2Settings(steps=10, t_max=0.6667, t_min=0.5, cfg=1.0), 4, [999, 601, 501]),
    (CCSRv2Settings(steps=6, t_max=0.6667, t_min=0.0, cfg=1.0), 6, [999, 499, 333, 167, 1]),
    # t_max = 1: no re-noise draw, no call at 999; the loop starts at T[0] = 751 from q(c, 999, n0)
    (CCSRv2Settings(steps=4, t_max=1.0, t_min=0.5, cfg=1.0), 3, [751, 501]),
    # start point "noise": the same draws, x starts as n0 itself
    (CCSRv2Settings(steps=6, t_min=0.5, cfg=1.0, start_point="noise"), 3, [999, 499]),
])
def test_noise_protocol_draw_count_and_call_timesteps(settings, draws, timesteps):
    r, c, src = Recorder(), _cond(), NoiseSource(4)
    sample_ccsr_v2(r, r, c, POS, NEG, settings, [src])
    assert src.draws == [SHAPE] * draws
    assert [t for _, t, _ in r.calls] == timesteps
    n0 = _draws(4, 1)[0]
    first = n0 if settings.start_point == "noise" else q_sample(c, n0, r.alphas_cumprod[999])
    torch.testing.assert_close(r.calls[0][0], first, rtol=0, atol=0)


def test_loop_steps_use_the_draws_in_order_including_the_last():
    """N = 10: x at the second loop step = DDPM step from the first with draw #3; draw #4 is made
    for the last step even though its result is discarded."""
    r, c, seed = Recorder(), _cond(), 21
    settings = CCSRv2Settings(steps=10, t_max=0.6667, t_min=0.5, cfg=1.0)
    out = sample_ccsr_v2(r, r, c, POS, None, settings, [NoiseSource(seed)])
    ac = r.alphas_cumprod
    n = _draws(seed, 4)
    x1 = r.calls[1][0]
    x2, _ = ddpm_step(x1, r.eps(x1, 601, c, POS), ac[601], ac[501], n[2])
    torch.testing.assert_close(r.calls[2][0], x2, rtol=0, atol=0)
    _, want = ddpm_step(x2, r.eps(x2, 501, c, POS), ac[501], ac[401], n[3])
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_batch_images_each_draw_from_their_own_source():
    r = Recorder()
    c = torch.cat([_cond(1), _cond(2)])
    srcs = [NoiseSource(7), NoiseSource(8)]
    sample_ccsr_v2(r, r, c, POS, NEG, V2_PRESETS["two-step"], srcs)
    assert srcs[0].draws == srcs[1].draws == [SHAPE] * 3
    x = r.calls[0][0]
    torch.testing.assert_close(x[1:], q_sample(c[1:], _draws(8, 1)[0], r.alphas_cumprod[999]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="one noise source per image"):
        sample_ccsr_v2(r, r, c, POS, NEG, V2_PRESETS["two-step"], srcs[:1])


def test_seeds_decide_the_result():
    c = _cond()
    for settings in (V2_PRESETS["one-step"], V2_PRESETS["two-step"]):
        a = sample_ccsr_v2(Recorder(), Recorder(), c, POS, NEG, settings, [NoiseSource(1)])
        b = sample_ccsr_v2(Recorder(), Recorder(), c, POS, NEG, settings, [NoiseSource(1)])
        d = sample_ccsr_v2(Recorder(), Recorder(), c, POS, NEG, settings, [NoiseSource(2)])
        assert torch.equal(a, b) and not torch.allclose(a, d)


def test_bad_settings_fail_before_any_model_call():
    class Boom(Recorder):
        def predict_eps(self, *a, **k):
            raise AssertionError("model called")

    r = Boom()
    with pytest.raises(CCSRSettingsError, match="official sampler crashes"):
        sample_ccsr_v2(r, r, _cond(), POS, NEG, CCSRv2Settings(steps=2, t_min=0.2), [NoiseSource(0)])
    with pytest.raises(CCSRSettingsError, match="needs a negative prompt"):
        sample_ccsr_v2(r, r, _cond(), POS, None, V2_PRESETS["two-step"], [NoiseSource(0)])
    with pytest.raises(CCSRSettingsError, match="leave no step"):
        sample_ccsr_v1(r, r, _cond(), POS, CCSRv1Settings(steps=4, t_max=0.3, t_min=0.2), [NoiseSource(0)])


def test_cfg_combination_unconditional_first():
    r, c, x = Recorder(), _cond(1), _cond(2)
    eps = ccsr_eps(r, r, x, 499, c, POS, NEG, 4.5)
    assert [ctx for _, _, ctx in r.calls] == [-1.0, 1.0]
    eu, ec = r.eps(x, 499, c, NEG), r.eps(x, 499, c, POS)
    torch.testing.assert_close(eps, eu + 4.5 * (ec - eu))
    r.calls.clear()
    torch.testing.assert_close(ccsr_eps(r, r, x, 499, c, POS, NEG, 1.0), ec)
    assert len(r.calls) == 1


def test_eps_fn_replaces_the_model_call_and_callback_counts_evaluations():
    """The hook a tiled path uses: every evaluation goes through eps_fn with (x, t, c, ctx, neg, cfg)."""
    r, c = Recorder(), _cond()
    seen, progress = [], []

    def eps_fn(x, t, cond, ctx, neg, cfg):
        seen.append((t, None if neg is None else float(neg.mean()), cfg))
        return ccsr_eps(r, r, x, t, cond, ctx, neg, cfg)

    plain = sample_ccsr_v2(Recorder(), Recorder(), c, POS, NEG, V2_PRESETS["two-step"], [NoiseSource(5)])
    hooked = sample_ccsr_v2(r, r, c, POS, NEG, V2_PRESETS["two-step"], [NoiseSource(5)], eps_fn=eps_fn,
                            callback=lambda d, n: progress.append((d, n)))
    assert torch.equal(plain, hooked)
    assert seen == [(999, None, 1.0), (499, -1.0, 4.5)]
    assert progress == [(1, 2), (2, 2)]


def test_v1_calls_draws_and_output_by_hand():
    """x_T = draw 1; call at 999; re-noise to 658 with draw 2; 15 posterior steps 658 → 341 (one draw
    each, the last included); output x̂0 at 341; empty-prompt context everywhere, no CFG."""
    r, c, seed = Recorder(), _cond(), 31
    src = NoiseSource(seed)
    out = sample_ccsr_v1(r, r, c, POS, CCSRv1Settings(), [src])
    plan = plan_v1(CCSRv1Settings(), r.alphas_cumprod)
    n = _draws(seed, 17)
    assert src.draws == [SHAPE] * 17
    assert [t for _, t, _ in r.calls] == [999] + list(plan.loop_timesteps)
    assert {ctx for _, _, ctx in r.calls} == {1.0}
    ch = plan.chain
    torch.testing.assert_close(r.calls[0][0], n[0], rtol=0, atol=0)
    x = ch.q_sample(ch.predict_x0(n[0], r.eps(n[0], 999, c, POS), 44), n[1], 29)
    for k, i in enumerate(plan.loop):
        torch.testing.assert_close(r.calls[1 + k][0], x, rtol=1e-6, atol=1e-6)
        x0 = ch.predict_x0(x, r.eps(x, ch.timesteps[i], c, POS), i)
        x = ch.posterior_step(x, x0, i, n[2 + k])
    torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)


def test_v1_cfg_applies_to_every_call_including_the_first():
    r = Recorder()
    sample_ccsr_v1(r, r, _cond(), POS, CCSRv1Settings(steps=45, cfg=2.0), [NoiseSource(0)], context_neg=NEG)
    assert [ctx for _, _, ctx in r.calls[:4]] == [-1.0, 1.0, -1.0, 1.0] and len(r.calls) == 32


# ------------------------------------------------------------------ residual layouts


def test_ldm_control_layout_is_comfyuis_pop_order():
    """ComfyUI's UNet (openaimodel.apply_control) pops control['middle'] once after the middle block
    and control['output'] once per output block together with hs.pop(): output[j] must meet skip j."""
    down = [torch.tensor(float(j)) for j in range(12)]
    mid = torch.tensor(100.0)
    control = to_ldm_control(down, mid)
    assert control["input"] == [] and control["middle"] == [mid] and control["output"] == down
    assert control["output"] is not down  # a fresh list: the UNet consumes it
    hs = list(range(12))  # skip indices in encoder order, as ComfyUI appends them
    pairs = []
    while hs:
        pairs.append((hs.pop(), int(control["output"].pop())))
    assert pairs == [(j, j) for j in reversed(range(12))]
    assert to_ldm_control(down, mid)["output"] == down  # a second call is unaffected


def _apply_control(h, control, name):
    """ComfyUI's apply_control semantics (openaimodel.py): pop from the end of control[name], add."""
    if name in control and len(control[name]) > 0:
        ctrl = control[name].pop()
        if ctrl is not None:
            h = h + ctrl
    return h


def _comfy_style_forward(unet, x, t, ctx, control):
    """The tiny diffusers UNet run the way ComfyUI's UNetModel consumes ``control``: hs appended per
    input block (with control['input'] applied), control['middle'] after the mid block, and per
    output block hsp = hs.pop() + control['output'].pop()."""
    emb = unet.time_embedding(unet.time_proj(torch.tensor([t])).to(x.dtype))
    h = _apply_control(unet.conv_in(x), control, "input")
    hs = [h]
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=ctx)
        else:
            h, res = block(hidden_states=h, temb=emb)
        hs.extend(_apply_control(r, control, "input") for r in res)
    h = _apply_control(unet.mid_block(h, emb, encoder_hidden_states=ctx), control, "middle")
    skips = [None] * len(hs)
    while hs:
        j = len(hs) - 1
        skips[j] = _apply_control(hs.pop(), control, "output")
    for block in unet.up_blocks:
        res, skips = tuple(skips[-len(block.resnets):]), skips[:-len(block.resnets)]
        if getattr(block, "has_cross_attention", False):
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=ctx)
        else:
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res)
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))


def test_both_layouts_give_the_same_unet_output():
    import ccsr_fixtures

    unet = ccsr_fixtures.base_models()[0]
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    probe = torch.zeros(1, 4, 8, 8)
    with torch.no_grad():
        # residual shapes: the encoder skips of this latent size
        h = unet.conv_in(probe)
        shapes = [h.shape]
        emb = unet.time_embedding(unet.time_proj(torch.tensor([10])))
        for block in unet.down_blocks:
            kw = {"encoder_hidden_states": ctx} if getattr(block, "has_cross_attention", False) else {}
            h, res = block(hidden_states=h, temb=emb, **kw)
            shapes += [r.shape for r in res]
        mid_shape = unet.mid_block(h, emb, encoder_hidden_states=ctx).shape
        down = [0.5 * torch.randn(s, generator=g) for s in shapes]
        mid = 0.5 * torch.randn(mid_shape, generator=g)
        ref = unet(x, 10, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid).sample
        plain = unet(x, 10, encoder_hidden_states=ctx).sample
        comfy = _comfy_style_forward(unet, x, 10, ctx, to_ldm_control(down, mid))
        no_control = _comfy_style_forward(unet, x, 10, ctx, {})
    assert len(down) == 12
    torch.testing.assert_close(no_control, plain, rtol=1e-5, atol=1e-5)  # the emulation is the UNet
    torch.testing.assert_close(comfy, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ref, plain, atol=1e-3)
