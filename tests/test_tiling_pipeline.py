"""upscale_osediff_tiled: the OSEDiff chain with tiled VAE and UNet, against the untiled pipeline."""
from __future__ import annotations

import math

import pytest
import torch

import sr_core.tiled_pipeline as tp
from image_helpers import smooth_photo
from sr_core.diffusers_host import DiffusersSD21
from sr_core.noise import NoiseSource
from sr_core.osediff import load_osediff_weights
from sr_core.pipeline import upscale_osediff
from sr_core.tiling import TileSettings


pytestmark = pytest.mark.usefixtures("one_thread")


def psnr(ref: torch.Tensor, got: torch.Tensor, peak: float = 1.0) -> float:
    mse = float(((ref.double() - got.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


@pytest.fixture(scope="module")
def host(sd_folder, osediff_pkl):
    h = DiffusersSD21.load(sd_folder)
    h.apply_osediff(load_osediff_weights(osediff_pkl))
    return h


def _photo(h=20, w=24, seed=0):
    return smooth_photo(h, w, seed)


SMALL = TileSettings(mode="explicit", latent_tile=8, overlap=4, vae_encoder_tile=24, vae_decoder_tile=3)


def test_tiles_larger_than_the_image_give_the_untiled_result(host):
    img, ctx = _photo(), host.encode_prompt("")
    ref = upscale_osediff(host, host, img, ctx, scale=4)
    big = TileSettings(mode="explicit", latent_tile=96, vae_encoder_tile=1024, vae_decoder_tile=128)
    got = tp.upscale_osediff_tiled(host, host, img, ctx, tiles=big, scale=4)
    assert got.shape == ref.shape == (1, 3, 80, 96)
    torch.testing.assert_close(got, ref, atol=5e-5, rtol=0)


def test_small_tiles_stay_close_to_the_untiled_result(host):
    img, ctx = _photo(18, 22, seed=1), host.encode_prompt("a cat")
    ref = upscale_osediff(host, host, img, ctx, scale=4, color_fix="none")
    vae_only = TileSettings(mode="explicit", latent_tile=96, vae_encoder_tile=24, vae_decoder_tile=3)
    exact = tp.upscale_osediff_tiled(host, host, img, ctx, tiles=vae_only, scale=4, color_fix="none")
    stages: list[str] = []
    ticks: list[tuple[int, int]] = []
    got = tp.upscale_osediff_tiled(host, host, img, ctx, tiles=SMALL, scale=4, color_fix="none",
                                   progress=stages.append, tile_progress=lambda d, t: ticks.append((d, t)))
    assert stages == ["encode", "unet", "decode", "done"]
    assert got.shape == exact.shape == ref.shape == (1, 3, 72, 88)
    assert len(ticks) > 20
    p_vae, p_all = psnr(ref, exact), psnr(ref, got)
    print(f"\ntiny OSEDiff, 72x88 output: VAE tiles 24 px / 3 latent: PSNR vs untiled {p_vae:.1f} dB; "
          f"plus 8/4 latent UNet tiles: {p_all:.1f} dB")
    assert p_vae > 80  # the tiled VAE is exact
    assert p_all > 10  # 8-latent tiles of a random tiny UNet (global attention and GroupNorm) change it


def test_latent_sample_mode_draws_the_whole_latent_once(host, monkeypatch):
    img, ctx = _photo(16, 16, seed=2), host.encode_prompt("")
    sources: list[NoiseSource] = []

    class Spy(NoiseSource):
        def __init__(self, seed):
            super().__init__(seed)
            sources.append(self)

    import sr_core.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "NoiseSource", Spy)  # the tiled chain draws through the same stages
    two = torch.cat([img, _photo(16, 16, seed=3)])
    tiled = tp.upscale_osediff_tiled(host, host, two, ctx, tiles=SMALL, latent_mode="sample", seed=11)
    assert [s.draws for s in sources] == [[(1, 4, 8, 8)], [(1, 4, 8, 8)]]  # whole latent, one draw per image
    # same seed, same draw as the untiled pipeline: tiles big enough → same picture
    big = TileSettings(mode="explicit", latent_tile=96, vae_encoder_tile=1024, vae_decoder_tile=128)
    a = tp.upscale_osediff_tiled(host, host, img, ctx, tiles=big, latent_mode="sample", seed=11)
    b = upscale_osediff(host, host, img, ctx, latent_mode="sample", seed=11)
    torch.testing.assert_close(a, b, atol=5e-5, rtol=0)
    assert tiled.shape == (2, 3, 64, 64)


def test_mode_off_is_the_untiled_pipeline_with_its_limit(host):
    from sr_core.errors import SizeLimitError

    img, ctx = _photo(), host.encode_prompt("")
    off = TileSettings(mode="off")
    assert torch.equal(tp.upscale_osediff_tiled(host, host, img, ctx, tiles=off),
                       upscale_osediff(host, host, img, ctx))
    with pytest.raises(SizeLimitError):
        tp.upscale_osediff_tiled(host, host, torch.rand(1, 3, 600, 600), ctx, tiles=off)


def test_a_bare_autoencoderkl_module_works(host):
    img, ctx = _photo(12, 14, seed=4), host.encode_prompt("")
    a = tp.upscale_osediff_tiled(host, host.vae, img, ctx, tiles=SMALL, scale=4)
    b = tp.upscale_osediff_tiled(host, host, img, ctx, tiles=SMALL, scale=4)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
