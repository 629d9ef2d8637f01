"""Tiling through the command line: the auto mode keeps small images untiled, the tiled VAE gives
the untiled picture, forced UNet tiles run (OSEDiff and CCSR) at the exact output size."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import ccsr_fixtures as fx
from sr_core.cli import main


@pytest.fixture(scope="module")
def lq(tmp_path_factory):
    from skimage import data

    d = tmp_path_factory.mktemp("tile_in")
    Image.fromarray(data.astronaut()).resize((20, 18), Image.Resampling.LANCZOS).save(d / "a.png")
    return d / "a.png"


def _run(lq, out, base, weights, *extra) -> np.ndarray:
    assert main(["upscale", str(lq), "-o", str(out), "--base", str(base), "--weights", str(weights), "--scale", "2",
                 *extra]) == 0
    return np.asarray(Image.open(out / "a.png")).astype(np.float64)


def _psnr(a, b) -> float:
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def test_auto_keeps_small_images_untiled_and_the_tiled_vae_matches(sd_folder, osediff_pkl, lq, tmp_path):
    off = _run(lq, tmp_path / "off", sd_folder, osediff_pkl, "--tile", "off")
    auto = _run(lq, tmp_path / "auto", sd_folder, osediff_pkl)
    assert np.array_equal(off, auto)
    vae_tiled = _run(lq, tmp_path / "vae", sd_folder, osediff_pkl, "--tile", "1000", "--vae-tile", "16")
    assert off.shape == vae_tiled.shape == (36, 40, 3)
    assert _psnr(off, vae_tiled) >= 40.0  # GroupNorm statistics shared over the whole image


def test_disk_store_writes_the_same_png_and_leaves_no_scratch_files(sd_folder, osediff_pkl, lq, tmp_path):
    """``--vae-store disk``: the tiled VAE's whole feature maps go to scratch files; same PNG, and the
    scratch folder is left empty."""
    args = ("--tile", "1000", "--vae-tile", "16")
    mem = _run(lq, tmp_path / "mem", sd_folder, osediff_pkl, *args, "--vae-store", "memory")
    scratch = tmp_path / "scratch"
    disk = _run(lq, tmp_path / "disk", sd_folder, osediff_pkl, *args, "--vae-store", "disk", "--scratch-dir",
                str(scratch))
    assert np.array_equal(mem, disk)
    assert scratch.is_dir() and not any(scratch.iterdir())


def test_outputs_above_the_untiled_limit_are_tiled_not_refused(sd_folder, osediff_pkl, lq, tmp_path, capsys):
    """``--tile off`` refuses an output above ``--max-megapixels`` up front; the default (auto) tiles it."""
    limit = ["--max-megapixels", "0.0005"]  # 500 px: below the 36×40 output
    assert main(["upscale", str(lq), "-o", str(tmp_path / "off"), "--base", str(sd_folder), "--weights",
                 str(osediff_pkl), "--scale", "2", "--tile", "off", *limit]) == 1
    assert "exceeds the untiled limit" in capsys.readouterr().err
    out = _run(lq, tmp_path / "auto", sd_folder, osediff_pkl, *limit, "--max-memory", "64M", "--vae-tile", "16")
    assert out.shape == (36, 40, 3)


def test_forced_unet_tiles_run_for_both_methods(sd_folder, osediff_pkl, lq, tmp_path):
    out = _run(lq, tmp_path / "o", sd_folder, osediff_pkl, "--tile", "4", "--tile-overlap", "2", "--vae-tile", "16")
    assert out.shape == (36, 40, 3)
    ccsr = fx.write_v2_folder(tmp_path / "ccsr")
    out = _run(lq, tmp_path / "c", sd_folder, ccsr, "--method", "ccsr", "--process-size", "0", "--preset", "one-step",
               "--tile", "4", "--tile-overlap", "2", "--vae-tile", "16", "--decoder", str(ccsr / "vae"))
    assert out.shape == (36, 40, 3)


def test_bad_tile_options_are_one_line_errors(sd_folder, osediff_pkl, lq, tmp_path, capsys):
    assert main(["upscale", str(lq), "-o", str(tmp_path), "--base", str(sd_folder), "--weights", str(osediff_pkl),
                 "--vae-tile", "30"]) == 2
    assert "multiple of 8" in capsys.readouterr().err
