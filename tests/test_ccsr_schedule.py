"""CCSR timestep plans and step math against hand-derived tables and diffusers' DDPMScheduler."""
from __future__ import annotations

import pytest
import torch

from sr_core.ccsr import (
    V2_PRESETS,
    CCSRSettingsError,
    CCSRv1Settings,
    CCSRv2Settings,
    plan_v1,
    plan_v2,
    v2_settings,
)
from sr_core.schedule import RespacedChain, ddpm_step, leading_timesteps, respaced_timesteps, sd_alphas_cumprod

# v2, t_max 0.6667, t_min 0.5. ratio = 1000 // N; T = [ratio·k + 1 for k = N−1 … 0];
# k_max = round(N·0.6667), τ = T[−k_max] = 1 + ratio·(k_max − 1); loop = the last k_max of T
# without the last round(N·0.5); NFE = 1 (the call at 999) + len(loop).
V2_TABLE = {
    # N: (T, τ, loop, NFE)
    1: ([1], None, (), 1),                                    # one call at 999, output x̂0_T
    4: ([751, 501, 251, 1], 501, (501,), 2),                  # k_max = round(2.667) = 3, k_min = 2
    6: ([831, 665, 499, 333, 167, 1], 499, (499,), 2),        # k_max = round(4.0002) = 4, k_min = 3
    10: (list(range(901, 0, -100)), 601, (601, 501), 3),      # k_max = round(6.667) = 7, k_min = 5
    20: (list(range(951, 0, -50)), 601, (601, 551, 501), 4),  # k_max = round(13.334) = 13, k_min = 10
    50: (list(range(981, 0, -20)), 641, tuple(range(641, 500, -20)), 9),  # k_max = 33, k_min = 25
}

# v1 (ccsr.md §2.1): IDDPM space_timesteps(1000, "45")
S45 = [0, 23, 45, 68, 91, 114, 136, 159, 182, 204, 227, 250, 272, 295, 318, 341, 363, 386, 409, 431, 454,
       477, 499, 522, 545, 568, 590, 613, 636, 658, 681, 704, 727, 749, 772, 795, 817, 840, 863, 885, 908, 931,
       954, 976, 999]


@pytest.mark.parametrize("n", sorted(V2_TABLE))
def test_v2_plan_matches_the_hand_derived_table(n):
    ts, tau, loop, nfe = V2_TABLE[n]
    plan = plan_v2(CCSRv2Settings(steps=n, t_max=0.6667, t_min=0.5, cfg=4.5))
    assert list(plan.timesteps) == ts == leading_timesteps(n)
    assert plan.tau == tau and plan.loop == loop and plan.nfe == nfe
    if n > 1:
        assert plan.loop[0] == plan.tau  # v2: τ is always the first loop timestep
        # each loop step's previous timestep is the next entry of T (−1 past the end)
        assert plan.prev == tuple(ts[ts.index(t) + 1] if t != 1 else -1 for t in loop)


def test_v2_plan_variants():
    # t_min = 0: the loop runs down to t = 1 (whose previous ᾱ is 1)
    p = plan_v2(CCSRv2Settings(steps=6, t_max=0.6667, t_min=0.0, cfg=1.0))
    assert p.loop == (499, 333, 167, 1) and p.prev == (333, 167, 1, -1) and p.nfe == 5
    # t_max = 1 (official): no one-shot call, no re-noise, the loop covers all of T from the start latent
    p = plan_v2(CCSRv2Settings(steps=4, t_max=1.0, t_min=0.5, cfg=1.0))
    assert not p.first_call and p.tau is None and p.loop == (751, 501) and p.nfe == 2
    # Python's round is half-to-even as in the official code: N = 5, t_min 0.5 → round(2.5) = 2, one step at 401
    p = plan_v2(CCSRv2Settings(steps=5, t_max=0.6667, t_min=0.5, cfg=1.0))
    assert p.timesteps == (801, 601, 401, 201, 1) and p.loop == (401,)
    # N = 1 ignores t_min (the official code crashes there; documented fallback)
    p = plan_v2(CCSRv2Settings(steps=1, t_max=0.6667, t_min=0.5, cfg=4.5))
    assert p.first_call and p.loop == () and p.nfe == 1


def test_presets_are_the_papers_configs():
    one, two = V2_PRESETS["one-step"], V2_PRESETS["two-step"]
    assert (one.steps, one.cfg, one.t_min) == (1, 1.0, 0.0)
    assert (two.steps, two.t_max, two.t_min, two.cfg) == (6, 0.6667, 0.5, 4.5)
    assert plan_v2(two).loop == (499,) and plan_v2(two).nfe == 2 and plan_v2(one).nfe == 1
    assert two.start_point == "lr" and two.first_step_negative
    # explicit values build the identical settings object; None keeps the preset's value
    assert v2_settings("two-step", steps=6, t_max=0.6667, t_min=0.5, cfg=4.5) == two
    assert v2_settings("two-step", steps=None, cfg=None) == two
    assert v2_settings("two-step", steps=10).steps == 10
    with pytest.raises(CCSRSettingsError, match="unknown CCSR preset"):
        v2_settings("three-step")


CRASHES = [
    (CCSRv2Settings(steps=2, t_max=0.6667, t_min=0.2), r"round\(2·0.2\) = 0.*official sampler crashes"),
    (CCSRv2Settings(steps=6, t_max=0.6667, t_min=0.6), r"leave no step"),
    (CCSRv2Settings(steps=3, t_max=0.1, t_min=0.0), r"round\(3·0.1\) = 0 loop steps"),
    (CCSRv2Settings(steps=6, t_max=0.5, t_min=0.5), r"t_min must be in \[0, t_max\)"),
    (CCSRv2Settings(steps=6, t_max=1.5, t_min=0.5), r"t_max must be in \(0, 1\]"),
    (CCSRv2Settings(steps=0), r"steps must be an integer in \[1, 1000\]"),
    (CCSRv2Settings(steps=1001), r"steps must be an integer"),
    (CCSRv2Settings(steps=2.5), r"steps must be an integer"),  # type: ignore[arg-type]
    (CCSRv2Settings(cfg=0.5), r"cfg must be ≥ 1"),
    (CCSRv2Settings(cfg=float("nan")), r"cfg must be a finite number"),
    (CCSRv2Settings(start_point="middle"), r"start point must be 'lr' or 'noise'"),
]


@pytest.mark.parametrize("settings,match", CRASHES)
def test_settings_the_official_code_crashes_on_give_a_clear_error(settings, match):
    with pytest.raises(CCSRSettingsError, match=match):
        plan_v2(settings)


def test_v1_plan_is_the_official_45_step_chain():
    ac = sd_alphas_cumprod()
    assert respaced_timesteps(45) == S45
    plan = plan_v1(CCSRv1Settings(), ac)
    assert plan.chain.timesteps == S45
    assert plan.tau == 658 and plan.tau_index == 29
    assert plan.loop_timesteps == (658, 636, 613, 590, 568, 545, 522, 499, 477, 454, 431, 409, 386, 363, 341)
    assert plan.nfe == 16  # "CCSR-S15": 1 + 15 calls


@pytest.mark.parametrize("n,tau,first,last,steps", [
    (15, 642, 642, 357, 5), (30, 655, 655, 344, 10),
    (20, 684, 631, 368, 6),  # the official off-by-one: re-noised to 684, first step labelled 631
])
def test_v1_plan_other_step_counts_reproduce_the_official_indices(n, tau, first, last, steps):
    plan = plan_v1(CCSRv1Settings(steps=n), sd_alphas_cumprod())
    assert plan.tau == tau and plan.loop_timesteps[0] == first and plan.loop_timesteps[-1] == last
    assert len(plan.loop) == steps and plan.nfe == steps + 1


def test_v1_bad_settings_give_a_clear_error():
    ac = sd_alphas_cumprod()
    with pytest.raises(CCSRSettingsError, match=r"steps must be an integer in \[2, 1000\]"):
        plan_v1(CCSRv1Settings(steps=1), ac)
    with pytest.raises(CCSRSettingsError, match="leave no step"):
        plan_v1(CCSRv1Settings(steps=4, t_max=0.3, t_min=0.2), ac)


def test_respaced_chain_keeps_alpha_bar_and_has_the_iddpm_posterior():
    ac = sd_alphas_cumprod().double()
    chain = RespacedChain(ac, S45)
    torch.testing.assert_close(chain.alphas_cumprod, ac[S45], rtol=1e-12, atol=0)
    i = 29
    a, a_prev = ac[S45[i]], ac[S45[i - 1]]
    beta = 1 - a / a_prev
    torch.testing.assert_close(chain.posterior_variance[i], beta * (1 - a_prev) / (1 - a))
    torch.testing.assert_close(chain.coef_x0[i], beta * a_prev.sqrt() / (1 - a))
    torch.testing.assert_close(chain.coef_xt[i], (1 - a_prev) * (1 - beta).sqrt() / (1 - a))
    g = torch.Generator().manual_seed(0)
    x, eps, n = (torch.randn(1, 4, 3, 3, generator=g) for _ in range(3))
    x0 = chain.predict_x0(x, eps, i)
    want_x0 = (x.double() - (1 - a).sqrt() * eps.double()) / a.sqrt()
    torch.testing.assert_close(x0, want_x0.float(), rtol=1e-5, atol=1e-5)
    got = chain.posterior_step(x, x0, i, n)
    want = (chain.coef_x0[i] * x0.double() + chain.coef_xt[i] * x.double()
            + chain.posterior_variance[i].sqrt() * n.double())
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [6, 10])
def test_ddpm_step_equals_diffusers_ddpm_scheduler(n):
    """Our hand-written step against DDPMScheduler (SD 2.1 config: scaled_linear, steps_offset 1,
    "leading", fixed_small, clip_sample False), same noise draws, every timestep of the plan."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          clip_sample=False, steps_offset=1, timestep_spacing="leading", variance_type="fixed_small")
    sched.set_timesteps(n)
    assert sched.timesteps.tolist() == leading_timesteps(n)
    ac = sd_alphas_cumprod()
    torch.testing.assert_close(sched.alphas_cumprod, ac, rtol=0, atol=0)
    ts = leading_timesteps(n)
    for j, t in enumerate(ts):
        g = torch.Generator().manual_seed(j)
        x, eps = torch.randn(1, 4, 5, 6, generator=g), torch.randn(1, 4, 5, 6, generator=g)
        ref = sched.step(eps, t, x, generator=torch.Generator().manual_seed(100 + j))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + j))
        prev = ac[ts[j + 1]] if j + 1 < len(ts) else 1.0
        got, x0 = ddpm_step(x, eps, ac[t], prev, noise)
        torch.testing.assert_close(x0, ref.pred_original_sample, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got, ref.prev_sample, rtol=1e-6, atol=1e-6)
