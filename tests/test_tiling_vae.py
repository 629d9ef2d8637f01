"""Tiled VAE: exactness against the untiled diffusers VAE (PSNR), receptive fields, store
estimate, attention paths, out-of-memory back-off. Tiny random VAEs with SD's block structure."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

import tiny_models
from image_helpers import psnr
from sr_core.tiling import (Conv, TiledVAE, VAEExecutor, estimate_vae_store_bytes, measure_receptive_field,
                            split_at_attention, vae_ops, vae_tile_elems)


pytestmark = pytest.mark.usefixtures("one_thread")


PSNR_REQUIRED = 40.0  # dB, tiled vs untiled, encoder and decoder (the threshold)


def astronaut(h: int, w: int) -> torch.Tensor:
    """scikit-image's astronaut photo resized to (h, w), as (1, 3, h, w) in [-1, 1]."""
    from PIL import Image
    from skimage import data

    im = Image.fromarray(data.astronaut()).resize((w, h), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None].contiguous()


@pytest.fixture(scope="module")
def vaes():
    """Two tiny random VAEs (different seeds, norms and biases random too)."""
    return [tiny_models.build_models(seed)[1] for seed in (0, 7)]


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _untiled(vae, pixels=None, latent=None):
    with torch.no_grad():
        if pixels is not None:
            d = vae.encode(pixels).latent_dist
            return d.mean, d.logvar
        return vae.decode(latent).sample


def test_tiled_encoder_and_decoder_match_the_untiled_vae(vaes):
    """Photo (astronaut, 96×136) and random pixels through both random VAEs, tiles forced small."""
    photo = astronaut(96, 136)
    noise = torch.rand(1, 3, 96, 136, generator=torch.Generator().manual_seed(3)) * 2 - 1
    lines = []
    worst_enc, worst_dec = math.inf, math.inf
    for i, vae in enumerate(vaes):
        for what, px in (("astronaut", photo), ("random", noise)):
            mean, logvar = _untiled(vae, px)
            tv = TiledVAE(vae, encoder_tile=32, decoder_tile=4)
            t_mean, t_logvar = tv.encode_moments(px)
            assert tv.last_executor.tiles_run > 100  # really tiled
            p_enc = min(psnr(mean, t_mean), psnr(logvar, t_logvar))
            dec = _untiled(vae, latent=mean)
            t_dec = tv.decode(mean)
            assert t_dec.shape == dec.shape == px.shape
            p_dec = psnr(dec, t_dec)
            worst_enc, worst_dec = min(worst_enc, p_enc), min(worst_dec, p_dec)
            lines.append(f"vae seed {i} {what:9s}: encoder {p_enc:6.1f} dB, decoder {p_dec:6.1f} dB, "
                         f"max abs err enc {float((mean - t_mean).abs().max()):.1e} "
                         f"dec {float((dec - t_dec).abs().max()):.1e}")
    print("\n" + "\n".join(lines))
    print(f"tiled vs untiled VAE: worst encoder PSNR {worst_enc:.1f} dB, worst decoder PSNR {worst_dec:.1f} dB "
          f"(required ≥ {PSNR_REQUIRED} dB)")
    assert worst_enc >= PSNR_REQUIRED and worst_dec >= PSNR_REQUIRED
    assert worst_enc > 100 and worst_dec > 100  # exact up to float summation order


def test_tile_size_and_odd_shapes_do_not_change_the_result(vaes):
    vae = vaes[0]
    px = torch.rand(2, 3, 8 * 9, 8 * 7, generator=torch.Generator().manual_seed(4)) * 2 - 1
    mean, _ = _untiled(vae, px)
    dec = _untiled(vae, latent=mean)
    for enc_tile, dec_tile in ((16, 2), (4096, 512)):
        tv = TiledVAE(vae, encoder_tile=enc_tile, decoder_tile=dec_tile)
        torch.testing.assert_close(tv.encode_moments(px)[0], mean, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(tv.decode(mean), dec, atol=5e-5, rtol=1e-5)


def test_seams_do_not_exist(vaes):
    """Gradient energy across tile borders of the decoded image is the untiled image's."""
    from test_tiling import border_energy_ratio

    vae = vaes[0]
    mean, _ = _untiled(vae, astronaut(96, 128))
    dec = _untiled(vae, latent=mean)
    t_dec = TiledVAE(vae, encoder_tile=64, decoder_tile=4).decode(mean)
    borders = list(range(32, 128, 32))
    r_tiled, r_ref = border_energy_ratio(t_dec, borders), border_energy_ratio(dec, borders)
    print(f"\ndecoder border/overall gradient energy: tiled {r_tiled:.4f}, untiled {r_ref:.4f}")
    assert abs(r_tiled - r_ref) < 1e-3 * r_ref


def test_key_chunked_attention_equals_resident_sdpa(vaes):
    vae = vaes[1]
    lat = torch.randn(1, 4, 10, 12, generator=torch.Generator().manual_seed(5))
    ops = vae_ops(vae)
    resident = VAEExecutor("cpu", torch.float32, vae_tile_elems(32, ops.base_channels)).run(ops.decoder, lat)
    chunked_ex = VAEExecutor("cpu", torch.float32, vae_tile_elems(32, ops.base_channels), kv_elems=2 * 128 * 12 * 3)
    chunked = chunked_ex.run(ops.decoder, lat)
    torch.testing.assert_close(chunked, resident, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(resident, _untiled(vae, latent=lat), atol=5e-5, rtol=1e-5)


def test_chunked_attention_splits_the_queries_so_its_scores_stay_in_the_budget(vaes, monkeypatch):
    """With keys and values over the budget, the scores of a query tile against a key chunk are
    computed in blocks of queries (the score matrix would otherwise outgrow the budget: 6.4 GB
    measured for a full-size 4096² decode with a 1 GB budget); same result as resident SDPA."""
    vae = vaes[1]
    lat = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(6))
    ops = vae_ops(vae)
    budget = 2 * 128 * 24 * 2  # two rows of keys and values
    largest = []
    real = torch.exp
    monkeypatch.setattr(torch, "exp", lambda t: (t.shape[-1] > 1 and largest.append(t.numel())) or real(t))
    chunked = VAEExecutor("cpu", torch.float32, float("inf"), kv_elems=budget).run(ops.decoder, lat)
    monkeypatch.undo()
    assert largest and max(largest) <= budget // 2  # scores of one block: ≤ half the budget
    resident = VAEExecutor("cpu", torch.float32, float("inf")).run(ops.decoder, lat)
    torch.testing.assert_close(chunked, resident, atol=2e-5, rtol=1e-5)


def test_store_estimate_matches_the_executor(vaes):
    ops = vae_ops(vaes[0])
    for seq, shape, tile in ((ops.encoder, (1, 3, 64, 96), 32), (ops.decoder, (1, 4, 8, 12), 32)):
        ex = VAEExecutor("cpu", torch.float32, vae_tile_elems(tile, ops.base_channels))
        ex.run(seq, torch.randn(shape))
        assert ex.peak_store_bytes == estimate_vae_store_bytes(seq, shape, 4)
        assert ex.store_bytes == 0  # every map is freed at the end
    tv = TiledVAE(vaes[0], encoder_tile=64, decoder_tile=8)
    est = tv.store_bytes((64, 96))
    assert est["encode"] > 0 and est["decode"] > 0


def test_writing_over_the_residual_input_saves_a_map_and_changes_nothing(vaes):
    ops = vae_ops(vaes[0])
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(8))
    outs, peaks = [], []
    for inplace in (True, False):
        ex = VAEExecutor("cpu", torch.float32, vae_tile_elems(24, ops.base_channels), inplace=inplace)
        outs.append(ex.run(ops.encoder, x))
        peaks.append(ex.peak_store_bytes)
        assert ex.peak_store_bytes == estimate_vae_store_bytes(ops.encoder, tuple(x.shape), 4, inplace=inplace)
    assert torch.equal(outs[0], outs[1])
    assert peaks[0] < 0.8 * peaks[1]
    assert torch.equal(x, torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(8)))  # input untouched


def test_reduced_precision_store(vaes):
    """Stored maps in bf16 (half the image-sized memory) with fp32 compute: close, not exact."""
    vae = vaes[0]
    mean, _ = _untiled(vae, astronaut(64, 96))
    dec = _untiled(vae, latent=mean)
    got = TiledVAE(vae, encoder_tile=32, decoder_tile=4, store_dtype=torch.bfloat16).decode(mean)
    p = psnr(dec, got.float())
    print(f"\ndecoder with bf16 stored maps: PSNR {p:.1f} dB")
    assert got.dtype == torch.bfloat16 and p > 30


def test_receptive_fields_are_measured_and_each_step_needs_one_pixel(vaes):
    """How far one changed input pixel moves the output (GroupNorm stats frozen: they are
    shared exactly). The executor re-tiles at every GroupNorm, so one tile step only needs
    the halo of its own convs (1 px at its resolution); these numbers are what a tiler that
    runs the whole VAE per tile would need as padding."""
    ops = vae_ops(vaes[0])
    e_pre, e_post = split_at_attention(ops.encoder)
    d_pre, d_post = split_at_attention(ops.decoder)
    rf = {
        "encoder before attention (image px)": measure_receptive_field(e_pre, (1, 3, 176, 176)),
        "encoder after attention (latent px)": measure_receptive_field(e_post, (1, 128, 16, 16)),
        "decoder before attention (latent px)": measure_receptive_field(d_pre, (1, 4, 16, 16)),
        "decoder after attention (latent px)": measure_receptive_field(d_post, (1, 128, 34, 34)),
    }
    print()
    for k, v in rf.items():
        print(f"receptive field, {k}: radius {v['radius']:.2f}, above 1e-3 of the peak change {v['radius_eff']:.2f}")
    assert rf["encoder before attention (image px)"]["radius"] == pytest.approx(84.5)
    assert rf["encoder after attention (latent px)"]["radius"] == 3
    assert rf["decoder before attention (latent px)"]["radius"] == 3
    assert rf["decoder after attention (latent px)"]["radius"] == pytest.approx(14.6875)
    # one conv step: the halo the executor fetches (1 px) is exactly the measured spread
    one = measure_receptive_field([ops.decoder[1]], (1, 4, 9, 9))
    assert one["radius"] == 1.0


def test_out_of_memory_in_a_tile_step_halves_the_tile(vaes):
    vae = vaes[0]
    ops = vae_ops(vae)
    real = ops.decoder[1]
    assert isinstance(real, Conv)

    def limited(t):
        if t.shape[-1] * t.shape[-2] > 10 * 10:
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 GB")
        return real.module(t)

    ops.decoder[1] = Conv(limited, real.kernel, real.in_channels, real.out_channels)
    notes: list[str] = []
    lat = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(6))
    ex = VAEExecutor("cpu", torch.float32, vae_tile_elems(128, ops.base_channels), on_backoff=notes.append)
    out = ex.run(ops.decoder, lat)
    assert notes and "out of memory" in notes[0]
    torch.testing.assert_close(out, _untiled(vae, latent=lat), atol=5e-5, rtol=1e-5)


def test_progress_counts_tile_steps(vaes):
    seen: list[tuple[int, int]] = []
    tv = TiledVAE(vaes[0], encoder_tile=32, decoder_tile=4, progress=lambda d, t: seen.append((d, t)))
    tv.decode(torch.randn(1, 4, 6, 6))
    total = VAEExecutor.count_steps(tv.ops.decoder)
    assert seen[-1] == (total, total) and len(seen) == total


def test_encode_needs_multiples_of_8(vaes):
    with pytest.raises(ValueError, match="multiples of 8"):
        TiledVAE(vaes[0], encoder_tile=32, decoder_tile=4).encode_moments(torch.zeros(1, 3, 20, 16))


@pytest.mark.parametrize("channels_last", [False, True])
def test_disk_store_gives_the_memory_store_result_bit_for_bit(vaes, tmp_path, channels_last):
    """Whole maps kept in scratch files instead of tensors: same values, in place writes and
    chunked attention included, in either compute layout; the scratch folder is empty
    afterwards and nothing image-sized stays in memory except the input and the output."""
    ops = vae_ops(vaes[0])
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(8))
    lat = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(9))
    for seq, inp in ((ops.encoder, x), (ops.decoder, lat)):
        for kv in (None, 2 * 128 * 12 * 3):
            mem = VAEExecutor("cpu", torch.float32, vae_tile_elems(24, ops.base_channels), kv_elems=kv,
                              channels_last=channels_last)
            disk = VAEExecutor("cpu", torch.float32, vae_tile_elems(24, ops.base_channels), kv_elems=kv,
                               store="disk", scratch_dir=tmp_path / "scratch", channels_last=channels_last)
            a, b = mem.run(seq, inp), disk.run(seq, inp)
            assert torch.equal(a, b)
            # on disk a map is written over only by one of as many channels: between the two estimates
            assert 0 < disk.peak_disk_bytes <= estimate_vae_store_bytes(seq, tuple(inp.shape), 4, inplace=False)
            assert disk.peak_store_bytes == 4 * (inp.numel() + b.numel())  # the caller's input and the output only
            assert disk.disk_bytes == 0 and not any((tmp_path / "scratch").iterdir())
            if os.path.isdir("/proc/self/fd"):  # and no file handle stays open
                assert not [f for f in os.listdir("/proc/self/fd") if "srco-vae-" in _link(f"/proc/self/fd/{f}")]


def test_disk_store_in_bf16_matches_the_memory_store_in_bf16(vaes, tmp_path):
    vae = vaes[0]
    mean, _ = _untiled(vae, astronaut(64, 96))
    kw = dict(encoder_tile=32, decoder_tile=4, store_dtype=torch.bfloat16)
    a = TiledVAE(vae, **kw, store="memory").decode(mean)
    b = TiledVAE(vae, **kw, store="disk", scratch_dir=tmp_path).decode(mean)
    assert torch.equal(a, b)


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_channels_last_and_channels_first_executors_agree(vaes, tmp_path, store):
    """The CPU default computes the tiles channels-last, CUDA's channels-first: the same encoder
    moments and decoded pixels up to float summation order, both equal to the untiled VAE."""
    vae = vaes[1]
    px = astronaut(64, 96)
    mean, logvar = _untiled(vae, px)
    ref = _untiled(vae, latent=mean)
    out = {}
    for cl in (False, True):
        tv = TiledVAE(vae, encoder_tile=32, decoder_tile=4, store=store, scratch_dir=tmp_path, channels_last=cl)
        assert tv.last_executor is None and tv.channels_last is cl
        m, lv = tv.encode_moments(px)
        out[cl] = (m, lv, tv.decode(mean))
        assert tv.last_executor.channels_last is cl and tv.last_executor.store == store
        assert out[cl][2].is_contiguous()  # the caller gets the plain layout either way
    for a, b in zip(out[False], out[True]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert min(psnr(mean, out[True][0]), psnr(logvar, out[True][1]), psnr(ref, out[True][2])) > 100
    assert TiledVAE(vae, encoder_tile=32, decoder_tile=4).channels_last  # the default on the CPU


def test_group_statistics_of_tiles_match_float64_on_offset_data():
    """Whole-map GroupNorm statistics merged from uneven tiles (per-channel two-pass moments,
    groups and tiles merged in fp64) against float64 over the whole map, on data whose mean
    is 1000x its spread (a sum of squares in fp32 would lose the variance entirely); in both
    memory layouts."""
    from sr_core.tiling import _Stats

    g = torch.Generator().manual_seed(4)
    n, c, h, w, groups = 2, 12, 37, 29, 4
    x = 100.0 + 0.1 * torch.randn(n, c, h, w, generator=g) + torch.linspace(0, 0.3, c)[None, :, None, None]
    ref_var, ref_mean = torch.var_mean(x.double().reshape(n, groups, -1), dim=-1, correction=0)
    for layout in (torch.contiguous_format, torch.channels_last):
        xs = x.contiguous(memory_format=layout)
        st = _Stats(n, groups)
        for y0, y1 in ((0, 5), (5, 30), (30, 37)):
            for x0, x1 in ((0, 13), (13, 14), (14, 29)):
                st.add(xs[:, :, y0:y1, x0:x1])  # cropped views, as the executor passes them
        mean, var = st.result()
        assert st.count == h * w * c // groups
        assert ((mean - ref_mean).abs() / ref_mean.abs()).max() < 1e-7
        assert ((var - ref_var).abs() / ref_var).max() < 1e-4


def test_auto_store_goes_to_disk_when_the_maps_exceed_the_budget(vaes, tmp_path):
    """``store="auto"``: memory while the whole maps fit in half the memory budget, else disk."""
    vae = vaes[0]
    mean, _ = _untiled(vae, astronaut(64, 96))
    need = TiledVAE(vae, encoder_tile=32, decoder_tile=4).store_bytes((64, 96))["decode"]
    roomy = TiledVAE(vae, encoder_tile=32, decoder_tile=4, memory_budget=4 * need, scratch_dir=tmp_path)
    tight = TiledVAE(vae, encoder_tile=32, decoder_tile=4, memory_budget=need, scratch_dir=tmp_path)
    a, b = roomy.decode(mean), tight.decode(mean)
    assert torch.equal(a, b)
    assert roomy.last_executor.store == "memory" and roomy.last_executor.peak_disk_bytes == 0
    assert tight.last_executor.store == "disk" and tight.last_executor.peak_disk_bytes > 0
    with pytest.raises(ValueError, match="store must be auto, memory or disk"):
        TiledVAE(vae, encoder_tile=32, decoder_tile=4, store="ssd")


def test_folded_upsampling_in_tiles_is_the_same_function(vaes, monkeypatch):
    """The decoder's nearest ×2 + 3×3 conv runs as one transposed conv per tile window (on windows
    of at least perf.FOLD_MIN_PIXELS; forced here on the tiny maps): the tiled decode agrees with
    the unfolded one to float rounding, tile borders included."""
    from sr_core import perf, tiling

    vae = vaes[1]
    mean, _ = _untiled(vae, astronaut(64, 96))
    ref = _untiled(vae, latent=mean)
    calls = []
    real = tiling._folded_up_kernel
    monkeypatch.setattr(tiling, "_folded_up_kernel", lambda m, like: calls.append(1) or real(m, like))
    monkeypatch.setattr(perf, "FOLD_MIN_PIXELS", 10 ** 9)
    plain = TiledVAE(vae, encoder_tile=32, decoder_tile=4).decode(mean)
    monkeypatch.setattr(perf, "FOLD_MIN_PIXELS", 0)
    calls.clear()
    folded = TiledVAE(vae, encoder_tile=32, decoder_tile=4).decode(mean)
    assert calls and tiling._FOLD_CACHE  # the fold ran
    torch.testing.assert_close(folded, plain, atol=2e-5, rtol=0)
    assert psnr(ref, folded) > 100


def test_a_scratch_folder_in_ram_is_warned_about(tmp_path, caplog):
    """A disk store on a tmpfs saves no memory: the user is told to point --scratch-dir at a disk."""
    import logging

    from sr_core.feature_store import ScratchDir, filesystem_type

    assert filesystem_type(tmp_path) not in (None, "tmpfs", "ramfs") or pytest.skip("tmp_path is not on a disk here")
    with caplog.at_level(logging.WARNING, logger="sr_core.feature_store"):
        ScratchDir(tmp_path).close()
        assert not caplog.records
        if filesystem_type("/dev/shm") != "tmpfs":
            pytest.skip("no tmpfs at /dev/shm")
        ScratchDir("/dev/shm").close()
    assert any("tmpfs" in r.getMessage() and "--scratch-dir" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("positional", [True, False])
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_disk_map_windows_equal_memory_map_windows(tmp_path, n, dtype, positional, monkeypatch):
    """Windows written (contiguous or cropped views, fewer channels than the map) and read back
    (channel sub-ranges) give the memory map's values, in one image and in a batch, through
    positional reads/writes and through the memory-map fallback (systems without them)."""
    from sr_core import feature_store
    from sr_core.feature_store import DiskMap, MemoryMap, ScratchDir

    if positional and not feature_store._POSITIONAL_IO:
        pytest.skip("no os.preadv/os.pwritev here")
    monkeypatch.setattr(feature_store, "_POSITIONAL_IO", positional)

    g = torch.Generator().manual_seed(n)
    shape = (n, 6, 9, 11)
    scratch = ScratchDir(tmp_path)
    disk = DiskMap.create(scratch, shape, dtype)
    assert (disk.file.fd is not None) is positional
    mem = MemoryMap(torch.zeros(shape, dtype=dtype))
    full = torch.randn(shape, generator=g).to(dtype)
    cl_src = (full * 3).contiguous(memory_format=torch.channels_last)
    for m in (disk, mem):
        m.write(0, 9, 0, 11, full)
        m.write(2, 7, 3, 8, full[:, :4, 1:6, 2:7] * 2)  # a cropped (non-contiguous) view, 4 of 6 channels
        m.write(6, 9, 0, 5, cl_src[:, :5, 2:5, 4:9])  # a cropped channels-last view, 5 of 6 channels
        m.write(1, 4, 2, 9, cl_src[:, :, 0:3, 1:8] + 1)  # all channels, cropped channels-last: one run per row
        m.write(7, 9, 0, 11, cl_src[:, :, 3:5] - 1)  # all channels, whole rows, channels-last
    for win in ((0, 9, 0, 11, 0, 6), (2, 7, 3, 8, 0, 4), (1, 5, 0, 4, 2, 6), (3, 4, 10, 11, 5, 6)):
        got = disk.read(*win)
        assert got.is_contiguous() and got.dtype == dtype
        assert torch.equal(got, mem.read(*win))
        last = disk.read(*win, channels_last=True)  # the file's layout, channels innermost
        assert last.stride(1) == 1 and torch.equal(last, got)
        if n == 1:  # channels-last contiguous with canonical strides: layout-sensitive kernels see a memory window
            assert last.is_contiguous(memory_format=torch.channels_last)
            assert last.stride() == got.contiguous(memory_format=torch.channels_last).stride()
    assert torch.equal(disk.tensor(), mem.tensor())
    scratch.close()
