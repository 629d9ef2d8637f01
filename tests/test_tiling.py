"""Latent tiling: plan geometry, blending weights, tiled_call, TiledDenoiser, settings, OOM back-off."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tiny_models
from image_helpers import psnr
from sr_core.tiling import (COST_MODEL, TiledDenoiser, TilePlan, TileSettings, axis_starts, is_oom,
                            limit_cpu_heap_retention, max_unet_tile, max_vae_tile_px, parse_memory, repeat_for_tiles,
                            tiled_call)


pytestmark = pytest.mark.usefixtures("one_thread")


def border_energy_ratio(img: torch.Tensor, cols: list[int]) -> float:
    """Mean squared horizontal difference across the given column boundaries / mean over all boundaries."""
    d = (img[..., 1:] - img[..., :-1]).double() ** 2  # d[..., c-1] is the step between columns c-1 and c
    per_col = d.mean(dim=tuple(range(d.dim() - 1)))
    picked = per_col[[c - 1 for c in cols if 0 < c < img.shape[-1]]]
    return float(picked.mean() / per_col.mean())


# ------------------------------------------------------------------------ geometry


@pytest.mark.parametrize("size,count", [(96, 1), (97, 2), (128, 2), (160, 2), (192, 3), (256, 4), (512, 8)])
def test_tile_counts_follow_the_official_rule(size, count):
    starts, tile = axis_starts(size, 96, 32)
    assert len(starts) == count and tile == min(96, size)
    assert starts[0] == 0 and starts[-1] + tile == size  # last tile snapped to the edge
    assert all(b - a <= tile for a, b in zip(starts, starts[1:]))  # no gaps


def test_snapped_last_tile_at_128():
    assert axis_starts(128, 96, 32) == ((0, 32), 96)


@pytest.mark.parametrize("h,w", [(1, 1), (5, 300), (300, 5), (20, 20), (32, 200), (33, 97), (7, 7)])
def test_small_and_thin_latents_never_hang(h, w):
    for plan in (TilePlan.build(h, w, 96, 32), TilePlan.official(h, w, 96, 32), TilePlan.build(h, w, 16, 40)):
        assert len(plan) >= 1
        cover = torch.zeros(h, w)
        for y, x in plan.tiles:
            cover[y:y + plan.tile_h, x:x + plan.tile_w] += 1
        assert cover.min() >= 1
        assert plan.ys[-1] + plan.tile_h == h and plan.xs[-1] + plan.tile_w == w


def test_official_geometry_is_square_and_uses_min_side():
    plan = TilePlan.official(64, 200, 96, 32)
    assert (plan.tile_h, plan.tile_w) == (64, 64)
    assert plan.xs == (0, 32, 64, 96, 128, 136)


@pytest.mark.parametrize("weighting", ["cosine", "gaussian"])
def test_weights_are_positive_where_summed(weighting):
    plan = TilePlan.build(70, 150, 32, 12)
    wsum = torch.zeros(70, 150)
    for (y, x), w in zip(plan.tiles, plan.weights(weighting)):
        assert w.shape == (plan.tile_h, plan.tile_w) and w.dtype == torch.float32
        wsum[y:y + plan.tile_h, x:x + plan.tile_w] += w
    assert float(wsum.min()) > 0


def test_cosine_weights_are_a_partition_of_unity_with_zero_margins():
    starts, tile = axis_starts(100, 40, 16)
    plan = TilePlan.build(1, 100, (1, 40), 16)
    ws = plan.axis_weights("x", "cosine")
    total = torch.zeros(100, dtype=torch.float64)
    for s, w in zip(starts, ws):
        total[s:s + tile] += w
    torch.testing.assert_close(total, torch.ones(100, dtype=torch.float64))
    # the incoming tile's first overlap//4 px carry no weight
    assert float(ws[1][:16 // 4].abs().max()) == 0.0
    assert float(ws[0][0]) == 1.0  # image border: not tapered


def test_gaussian_weights_are_the_official_formula_with_asymmetric_centres():
    plan = TilePlan.official(200, 200, 96, 32)
    wy, wx = plan.axis_weights("y", "gaussian")[0], plan.axis_weights("x", "gaussian")[0]
    u = torch.arange(96, dtype=torch.float64)
    torch.testing.assert_close(wx, torch.exp(-(u - 47.5) ** 2 / (2 * 0.01 * 96 * 96)))
    torch.testing.assert_close(wy, torch.exp(-(u - 48.0) ** 2 / (2 * 0.01 * 96 * 96)))
    assert 3.5e-6 < float(wx[0]) < 6.5e-6


# ---------------------------------------------------------------------- tiled_call


def _local_net(seed: int = 0):
    """A conv net with a receptive field of 3 latent px (three 3x3 convs)."""
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(8, 4, 3, 3, generator=g) * 0.3, torch.randn(8, 8, 3, 3, generator=g) * 0.3,
          torch.randn(4, 8, 3, 3, generator=g) * 0.3]

    def fn(x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(F.conv2d(x, ws[0], padding=1))
        h = torch.tanh(F.conv2d(h, ws[1], padding=1))
        return F.conv2d(h, ws[2], padding=1)
    return fn


def test_tiled_call_is_exact_when_the_overlap_covers_the_receptive_field():
    fn = _local_net()
    x = torch.randn(2, 4, 45, 70, generator=torch.Generator().manual_seed(1))
    ref = fn(x)
    plan = TilePlan.build(45, 70, 24, 12)  # cosine margins 12//4 = 3 ≥ receptive field 3
    assert len(plan) > 4
    out = tiled_call(fn, [x], plan, "cosine")
    assert out.dtype == torch.float32
    err = float((out - ref).abs().max())
    print(f"\nlocal net, cosine tiles 24/12: max abs error {err:.2e}, PSNR {psnr(ref, out):.1f} dB")
    assert err < 1e-5
    gauss = tiled_call(fn, [x], TilePlan.official(45, 70, 24, 12), "gaussian")
    print(f"local net, official gaussian tiles: PSNR {psnr(ref, gauss):.1f} dB")
    assert psnr(ref, gauss) > 50


def test_single_tile_is_the_untiled_call():
    fn = _local_net()
    x = torch.randn(1, 4, 10, 12)
    assert torch.equal(tiled_call(fn, [x], TilePlan.build(10, 12, 96, 32)), fn(x))


def test_batched_and_one_at_a_time_give_the_same_result_and_report_progress():
    fn = _local_net()
    x = torch.randn(2, 4, 40, 52, generator=torch.Generator().manual_seed(2))
    plan = TilePlan.build(40, 52, 16, 8)
    seen: list[tuple[int, int]] = []
    calls: list[int] = []

    def counting(t):
        calls.append(t.shape[0])
        return fn(t)

    one = tiled_call(counting, [x], plan, batch_tiles=1, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(i + 1, len(plan)) for i in range(len(plan))]
    assert set(calls) == {2}
    calls.clear()
    many = tiled_call(counting, [x], plan, batch_tiles=4)
    assert max(calls) == 8
    torch.testing.assert_close(many, one, atol=1e-6, rtol=0)


def test_several_inputs_are_sliced_alike():
    x = torch.randn(1, 4, 30, 30)
    c = torch.randn(1, 4, 30, 30)
    out = tiled_call(lambda a, b: a * 2 + b, [x, c], TilePlan.build(30, 30, 12, 4))
    torch.testing.assert_close(out, x * 2 + c, atol=1e-6, rtol=0)


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="every input"):
        tiled_call(lambda a, b: a, [torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 9)], TilePlan.build(8, 8, 4, 2))


def _oom():
    return RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: "
                        "you tried to allocate 123 bytes")


def test_is_oom_recognises_cpu_and_cuda_errors():
    assert is_oom(_oom())
    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(ValueError("not enough memory"))


def test_out_of_memory_halves_the_tile_batch_then_the_tile():
    fn = _local_net()
    x = torch.randn(1, 4, 40, 40, generator=torch.Generator().manual_seed(3))
    plan = TilePlan.build(40, 40, 24, 12)
    notes: list[str] = []

    def batch_limited(t):
        if t.shape[0] > 1:
            raise _oom()
        return fn(t)

    ref = tiled_call(fn, [x], plan, batch_tiles=1)
    got = tiled_call(batch_limited, [x], plan, batch_tiles=4, on_backoff=notes.append)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    assert any("tiles per batch" in n for n in notes)

    def size_limited(t):
        if t.shape[-1] > 12:
            raise _oom()
        return fn(t)

    notes.clear()
    got = tiled_call(size_limited, [x], plan, on_backoff=notes.append)
    torch.testing.assert_close(got, tiled_call(fn, [x], plan.halved()), atol=1e-6, rtol=0)
    assert any("retrying with 12×12" in n for n in notes)
    with pytest.raises(RuntimeError, match="not enough memory"):
        tiled_call(size_limited, [x], plan, shrink_on_oom=False)
    with pytest.raises(RuntimeError, match="shape"):
        tiled_call(lambda t: (_ for _ in ()).throw(RuntimeError("shape")), [x], plan)


def test_repeat_for_tiles():
    ctx = torch.randn(2, 77, 8)
    assert repeat_for_tiles(ctx[:1], 6).shape[0] == 1
    r = repeat_for_tiles(ctx, 6)
    assert r.shape[0] == 6 and torch.equal(r[2:4], ctx)


# ------------------------------------------------------------------ tiny SD UNet


class _Host:
    """The tiny SD 2.1-architecture UNet as a Denoiser."""

    def __init__(self) -> None:
        from sr_core.schedule import sd_alphas_cumprod
        self.unet, _, _ = tiny_models.build_models()
        self.alphas_cumprod = sd_alphas_cumprod()
        self.calls: list[tuple[int, ...]] = []

    @torch.no_grad()
    def predict_eps(self, x, t, context, control=None):
        self.calls.append(tuple(x.shape))
        ctx = context.expand(x.shape[0], -1, -1) if context.shape[0] == 1 else context
        return self.unet(x, torch.full((x.shape[0],), t), encoder_hidden_states=ctx).sample


@pytest.fixture(scope="module")
def host():
    return _Host()


def test_tiled_unet_is_seamless_and_close_to_untiled(host):
    g = torch.Generator().manual_seed(4)
    z = torch.randn(1, 4, 32, 48, generator=g)
    ctx = torch.randn(1, 77, 32, generator=g)
    ref = host.predict_eps(z, 999, ctx)
    den = TiledDenoiser(host, tile=24, overlap=12)
    plan = den.plan(32, 48)
    out = den.predict_eps(z, 999, ctx)
    borders = sorted({x for x in plan.xs[1:]} | {x + plan.tile_w for x in plan.xs[:-1]})
    ratio = border_energy_ratio(out, borders)
    ratio_ref = border_energy_ratio(ref, borders)
    ratio_err = border_energy_ratio(out - ref, borders)  # a seam is a jump of the tiling error

    # negative control: independent tiles pasted without overlap show their seams
    hard = torch.zeros_like(ref)
    for y in range(0, 32, 16):
        for x in range(0, 48, 24):
            hard[..., y:y + 16, x:x + 24] = host.predict_eps(z[..., y:y + 16, x:x + 24], 999, ctx)
    ratio_hard = border_energy_ratio(hard - ref, [24])
    print(f"\ntiny UNet 32x48 latent, tiles 24/12: PSNR vs untiled {psnr(ref, out):.1f} dB; border/overall "
          f"gradient energy: output {ratio:.3f} (untiled {ratio_ref:.3f}), tiling error {ratio_err:.3f} "
          f"(hard-pasted tiles: {ratio_hard:.3f})")
    assert ratio < 1.1 * ratio_ref
    assert ratio_err < 1.5
    assert ratio_hard > 3
    assert psnr(ref, out) > 15  # the SD UNet is global (attention, GroupNorm): tiles change it a little


def test_tiled_denoiser_batches_tiles_and_repeats_a_batch_context(host):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, 4, 24, 24, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    one = TiledDenoiser(host, tile=16, overlap=8, batch_tiles=1).predict_eps(z, 999, ctx)
    host.calls.clear()
    many = TiledDenoiser(host, tile=16, overlap=8, batch_tiles=3).predict_eps(z, 999, ctx)
    assert max(c[0] for c in host.calls) == 6
    torch.testing.assert_close(many, one, atol=2e-5, rtol=0)
    # each image alone gives its own rows
    alone = TiledDenoiser(host, tile=16, overlap=8).predict_eps(z[1:], 999, ctx[1:])
    torch.testing.assert_close(one[1:], alone, atol=2e-5, rtol=0)


def test_tiled_denoiser_keeps_small_latents_whole(host):
    z = torch.randn(1, 4, 12, 20)
    ctx = torch.zeros(1, 77, 32)
    den = TiledDenoiser(host, tile=16, overlap=8)
    assert den.plan(12, 20) is None  # area 240 ≤ 16² (the official trigger)
    assert torch.equal(den.predict_eps(z, 999, ctx), host.predict_eps(z, 999, ctx))
    thin = torch.randn(1, 4, 3, 90)  # thinner than the overlap
    out = den.predict_eps(thin, 999, ctx)
    assert out.shape == thin.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="control"):
        den.predict_eps(z, 999, ctx, control=([], None))


# ---------------------------------------------------------------------- settings


def test_cli_flags_map_onto_settings():
    s = TileSettings.from_cli("64", overlap=16, vae_tile=512, max_memory="6G")
    assert (s.mode, s.latent_tile, s.overlap, s.vae_encoder_tile, s.vae_decoder_tile, s.max_memory) == \
        ("explicit", 64, 16, 512, 64, 6 << 30)
    assert TileSettings.from_cli("auto").mode == "auto"
    assert TileSettings.from_cli("off").mode == "off"
    with pytest.raises(ValueError, match="--tile"):
        TileSettings.from_cli("big")
    with pytest.raises(ValueError, match="multiple of 8"):
        TileSettings(vae_encoder_tile=100)
    with pytest.raises(ValueError, match="latent_tile"):
        TileSettings(mode="explicit")
    assert parse_memory("512M") == 512 << 20 and parse_memory("1.5GiB") == int(1.5 * (1 << 30))
    assert parse_memory("auto") is None and parse_memory(1000) == 1000
    assert isinstance(limit_cpu_heap_retention(1 << 20), bool)
    with pytest.raises(ValueError):
        parse_memory("lots")


def test_auto_sizes_follow_the_budget():
    big = TileSettings(max_memory=64 << 30).resolve("cpu")
    small = TileSettings(max_memory=1 << 30).resolve("cpu")
    tiny = TileSettings(max_memory=256 << 20).resolve("cpu")
    assert big.latent_tile == 96 and big.vae_encoder_tile >= small.vae_encoder_tile >= tiny.vae_encoder_tile
    assert tiny.latent_tile < 96 and tiny.latent_tile >= 16
    assert COST_MODEL.unet_bytes(small.latent_tile) <= 1 << 30
    half = TileSettings(max_memory=1 << 30).resolve("cpu", torch.float16)
    assert half.vae_encoder_tile > small.vae_encoder_tile  # fp16 halves the bytes per element
    assert max_vae_tile_px(1 << 30) % 8 == 0 and max_unet_tile(1e12) == 96
    off = TileSettings(mode="off").resolve("cpu")
    assert off.latent_tile is None and off.vae_encoder_tile is None
    ex = TileSettings(mode="explicit", latent_tile=48, vae_encoder_tile=256, vae_decoder_tile=32).resolve("cpu")
    assert (ex.latent_tile, ex.vae_encoder_tile, ex.vae_decoder_tile) == (48, 256, 32)
