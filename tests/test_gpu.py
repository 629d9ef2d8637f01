"""The same pictures on a GPU: a seed gives the same image on the CPU and on CUDA (noise
protocol), the tiled VAE on CUDA is exact against the untiled one, and its disk store gives the
same values as its memory store there.

Skipped without CUDA. ``SR_TEST_DEVICE=cpu`` runs them with the CPU standing in for the GPU
(a check of the tests themselves, not of a GPU).

Tolerances: fp32 on both sides with TF32 off; the images are in [0, 1], and 2e-3 is half of
one 8-bit level, far below the change one seed step makes (checked in each test).
"""
from __future__ import annotations

import os

import pytest
import torch

import ccsr_fixtures as fx
import tiny_models
from image_helpers import psnr, smooth_photo
from sr_core.ccsr import NEGATIVE_PROMPT, POSITIVE_PROMPT, V2_PRESETS
from sr_core.ccsr_host import load_ccsr
from sr_core.ccsr_pipeline import upscale_ccsr
from sr_core.diffusers_host import DiffusersSD21
from sr_core.osediff import load_osediff_weights
from sr_core.pipeline import upscale_osediff
from sr_core.tiled_pipeline import upscale_osediff_tiled
from sr_core.tiling import TiledVAE, TileSettings

DEVICE = os.environ.get("SR_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no CUDA device (SR_TEST_DEVICE=cpu runs these on the CPU)")

SAME = 2e-3  # max |Δ| of two [0, 1] images that count as the same picture


@pytest.fixture(scope="module", autouse=True)
def exact_fp32():
    """TF32 off: the GPU computes in full fp32, as the CPU does."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _osediff_host(sd_folder, osediff_pkl, device: str) -> DiffusersSD21:
    host = DiffusersSD21.load(sd_folder, device=device)
    host.apply_osediff(load_osediff_weights(osediff_pkl))
    return host.to_compute()


@pytest.fixture(scope="module")
def osediff_hosts(sd_folder, osediff_pkl):
    return _osediff_host(sd_folder, osediff_pkl, "cpu"), _osediff_host(sd_folder, osediff_pkl, DEVICE)


def test_osediff_seed_gives_the_same_picture_on_the_gpu(osediff_hosts):
    """latent_mode="sample": the posterior noise is drawn on the CPU and moved, so CUDA matches."""
    cpu, gpu = osediff_hosts
    img = smooth_photo(13, 17)

    def run(host, seed):
        return upscale_osediff(host, host, img, host.encode_prompt(""), latent_mode="sample", seed=seed).cpu()

    a, b, other = run(cpu, 5), run(gpu, 5), run(cpu, 6)
    assert a.shape == b.shape == (1, 3, 52, 68)
    assert float((a - b).abs().max()) < SAME
    assert float((a - other).abs().max()) > 10 * SAME  # the seed matters, so the match above means something


def test_tiled_osediff_on_the_gpu_equals_the_cpu(osediff_hosts):
    """Tiled UNet and tiled VAE (tiles forced small) on CUDA give the CPU's picture."""
    cpu, gpu = osediff_hosts
    img = smooth_photo(24, 28, seed=2)
    tiles = TileSettings(mode="explicit", latent_tile=8, overlap=4, vae_encoder_tile=32, vae_decoder_tile=4,
                         batch_tiles=2)

    def run(host):
        return upscale_osediff_tiled(host, host, img, host.encode_prompt(""), tiles=tiles, latent_mode="sample",
                                     seed=9).cpu()

    a, b = run(cpu), run(gpu)
    assert a.shape == b.shape == (1, 3, 96, 112)
    assert float((a - b).abs().max()) < SAME


def test_ccsr_seed_gives_the_same_picture_on_the_gpu(sd_folder, tmp_path):
    """CCSR v2 two-step (noise at the start and at each step) on the CPU and on CUDA."""
    root = fx.write_v2_folder(tmp_path / "v2", state_dict=fx.v2_state_dict(0))
    runs = {}
    for dev in ("cpu", DEVICE):
        host = DiffusersSD21.load(sd_folder, device=dev)
        m = load_ccsr(host, root)
        host.to_compute()
        pos, neg = host.encode_prompt(POSITIVE_PROMPT), host.encode_prompt(NEGATIVE_PROMPT)
        for seed in (1, 2):
            runs[dev, seed] = upscale_ccsr(host, host, m.control, smooth_photo(13, 17), pos, neg,
                                           settings=V2_PRESETS["two-step"], seed=seed, decoder_vae=m.decoder,
                                           process_size=None).cpu()
    a, b = runs["cpu", 1], runs[DEVICE, 1]
    assert a.shape == b.shape == (1, 3, 52, 68)
    assert float((a - b).abs().max()) < SAME
    assert float((runs["cpu", 2] - b).abs().max()) > 10 * SAME


def test_tiled_vae_on_the_gpu_is_exact_and_its_stores_agree():
    """Tiles forced small on CUDA: tiled vs untiled ≥ 40 dB for both halves of the VAE, and the
    disk store gives bit-identical values to the memory store."""
    vae = tiny_models.build_models(7)[1].to(DEVICE)
    g = torch.Generator().manual_seed(4)
    px = (torch.rand(1, 3, 96, 136, generator=g) * 2 - 1).to(DEVICE)
    lat = torch.randn(1, 4, 12, 17, generator=g).to(DEVICE)
    with torch.no_grad():
        ref_mean = vae.encode(px).latent_dist.mean
        ref_dec = vae.decode(lat).sample
        got = {}
        for store in ("memory", "disk"):
            tv = TiledVAE(vae, encoder_tile=32, decoder_tile=4, store=store)
            got[store] = tv.encode_moments(px)[0], tv.decode(lat)
            assert tv.last_executor.tiles_run > 4  # really tiled
            assert tv.last_executor.device.type == torch.device(DEVICE).type  # ...on the GPU
    # the tiled VAE returns its results where it keeps whole maps: the CPU beside a GPU
    mem, disk = got["memory"], got["disk"]
    ref_mean, ref_dec = ref_mean.cpu(), ref_dec.cpu()
    assert psnr(ref_mean, mem[0]) >= 40.0, psnr(ref_mean, mem[0])
    assert psnr(ref_dec, mem[1]) >= 40.0, psnr(ref_dec, mem[1])
    assert torch.equal(mem[0], disk[0]) and torch.equal(mem[1], disk[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA (no CPU stand-in)")
def test_cuda_graphs_replay_the_eager_picture(sd_folder, osediff_pkl):
    """The CUDA-graph lever (the UNet): the same picture as eager calls, a replay per image after
    one recording per size, fresh outputs (an earlier result is not overwritten by the next
    replay), a new recording after the weights move, and nothing left on the modules after undo."""
    from sr_core.cuda_graphs import graphed
    from sr_core.perf import PerfOptions, apply_options

    host = _osediff_host(sd_folder, osediff_pkl, "cuda")
    ctx = host.encode_prompt("")
    imgs = [smooth_photo(13, 17, seed=s) for s in (1, 2)] + [smooth_photo(9, 11, seed=3)]

    def run(img):
        return upscale_osediff(host, host, img, ctx)

    eager = [run(i) for i in imgs]
    undo = apply_options(host, PerfOptions(cuda_graphs=True))
    try:
        first = run(imgs[0])
        second = run(imgs[1])
        again = run(imgs[0])
        other_size = run(imgs[2])
        g = graphed(host.unet)
        assert g is not None and g.recorded == 2 and g.replayed == 4
        big = torch.randn(1, 4, 184, 184, device="cuda")  # above MAX_RECORDED_ELEMENTS: runs eagerly
        assert torch.isfinite(host.predict_eps(big, 999, ctx)).all() and (g.recorded, g.replayed) == (2, 4)
        assert graphed(host.vae.decoder) is None and graphed(host.vae.encoder) is None  # the VAE stays eager
        assert float((first - eager[0]).abs().max()) < SAME and float((second - eager[1]).abs().max()) < SAME
        assert float((other_size - eager[2]).abs().max()) < SAME
        assert torch.equal(first, again)  # `first` kept its values through the later replays
        assert float((first - second).abs().max()) > 10 * SAME
        host.unet.to(torch.float64).to(torch.float32)  # reallocated weights: recorded again, still right
        moved = run(imgs[1])
        assert g.recorded == 3 and float((moved - eager[1]).abs().max()) < SAME
    finally:
        undo()
    assert all("forward" not in m.__dict__ for m in (host.unet, host.vae.encoder, host.vae.decoder))
    assert float((run(imgs[0]) - eager[0]).abs().max()) < SAME


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA (no CPU stand-in)")
def test_cuda_graphs_in_the_tiled_path(sd_folder, osediff_pkl):
    """Batches of latent tiles with the prompt embedding broadcast over them (an expanded
    tensor) and a smaller last batch: recorded, replayed, and the eager picture."""
    from sr_core.cuda_graphs import graphed
    from sr_core.perf import PerfOptions, apply_options

    host = _osediff_host(sd_folder, osediff_pkl, "cuda")
    img = smooth_photo(24, 28, seed=2)
    tiles = TileSettings(mode="explicit", latent_tile=8, overlap=4, vae_encoder_tile=32, vae_decoder_tile=4,
                         batch_tiles=4)

    def run():
        return upscale_osediff_tiled(host, host, img, host.encode_prompt(""), tiles=tiles).cpu()

    eager = run()
    undo = apply_options(host, PerfOptions(cuda_graphs=True))
    try:
        first, second = run(), run()
        g = graphed(host.unet)
        assert g.failures == [] and g.recorded >= 1 and g.replayed > g.recorded
        assert float((first - eager).abs().max()) < SAME and torch.equal(first, second)
    finally:
        undo()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA (no CPU stand-in)")
def test_a_call_that_cannot_be_recorded_runs_eagerly_and_random_draws_still_work():
    from sr_core.cuda_graphs import GraphedForward

    class Syncs(torch.nn.Module):
        def forward(self, x):
            if torch.cuda.is_current_stream_capturing():
                torch.cuda.synchronize()  # waiting for the GPU is not allowed while recording
                raise RuntimeError("not recordable")  # (if the wait ever were allowed)
            return x * 2

    m = Syncs()
    g = GraphedForward(m).install()
    x = torch.ones(4, device="cuda")
    with pytest.warns(RuntimeWarning, match="recording failed"), torch.no_grad():
        y = m(x)
    assert torch.equal(y, x * 2) and g.recorded == 0 and len(g.failures) == 1
    with torch.no_grad():
        assert torch.equal(m(x), x * 2)  # known signature: straight to eager, no second try
    assert len(g.failures) == 1
    assert torch.randn(8, device="cuda").isfinite().all()  # the generator is usable after the failed capture
    g.uninstall()
