"""`python -m sr_core upscale` end to end, and its handling of bad inputs."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import tiny_models
from sr_core.cli import main

ROOT = tiny_models.Path(__file__).resolve().parent.parent


def _run(*args: str) -> int:
    return main(["upscale", *args])


def test_folder_of_two_images_end_to_end(sd_folder, osediff_pkl, image_folder, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "sr_core", "upscale", str(image_folder), "--output-dir", str(out),
         "--method", "osediff", "--base", str(sd_folder), "--weights", str(osediff_pkl)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    a, c = Image.open(out / "astronaut.png"), Image.open(out / "cat.png")
    assert a.size == (96, 80) and c.size == (68, 52)  # exactly 4 × (24×20) and 4 × (17×13)
    assert a.mode == "RGB"
    # a summary line per image with its time
    assert "astronaut.png: 24×20 → 96×80 in" in proc.stderr and "cat.jpg: 17×13 → 68×52 in" in proc.stderr
    # the same command again refuses to overwrite, and --overwrite gives the same pixels (deterministic)
    before = np.asarray(a).copy()
    assert _run(str(image_folder / "astronaut.png"), "-o", str(out), "--base", str(sd_folder),
                "--weights", str(osediff_pkl)) == 1
    assert _run(str(image_folder / "astronaut.png"), "-o", str(out), "--base", str(sd_folder),
                "--weights", str(osediff_pkl), "--overwrite") == 0
    assert np.array_equal(np.asarray(Image.open(out / "astronaut.png")), before)


def test_options_change_the_result(sd_folder, osediff_pkl, image_folder, tmp_path):
    src = str(image_folder / "astronaut.png")
    common = ["--base", str(sd_folder), "--weights", str(osediff_pkl)]
    results = {}
    for name, extra in {"default": [], "wavelet": ["--color-fix", "wavelet"], "x2": ["--scale", "2"],
                        "prompt": ["--prompt", "a cat"], "sample": ["--latent-mode", "sample", "--seed", "3"]}.items():
        assert _run(src, "-o", str(tmp_path / name), *common, *extra) == 0
        results[name] = np.asarray(Image.open(tmp_path / name / "astronaut.png"))
    assert results["x2"].shape == (40, 48, 3)
    for name in ("wavelet", "prompt", "sample"):
        assert not np.array_equal(results[name], results["default"]), name


def test_rgba_grayscale_and_16bit_inputs_are_converted(sd_folder, osediff_pkl, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(0)
    rgb = (rng.random((12, 10, 3)) * 255).astype(np.uint8)
    Image.fromarray(np.dstack([rgb, np.full((12, 10), 128, np.uint8)]), "RGBA").save(d / "alpha.png")
    Image.fromarray(rgb[..., 0], "L").save(d / "gray.png")
    Image.fromarray((rng.random((12, 10)) * 65535).astype(np.uint16)).save(d / "deep.png")
    out = tmp_path / "out"
    assert _run(str(d), "-o", str(out), "--base", str(sd_folder), "--weights", str(osediff_pkl)) == 0
    for name in ("alpha", "gray", "deep"):
        im = Image.open(out / f"{name}.png")
        assert im.mode == "RGB" and im.size == (40, 48), name


def test_bad_images_are_reported_and_the_rest_still_run(sd_folder, osediff_pkl, tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.new("RGB", (1, 1)).save(d / "tiny.png")
    Image.new("RGB", (9, 9), (200, 30, 30)).save(d / "ok.png")
    out = tmp_path / "out"
    assert _run(str(d), "-o", str(out), "--base", str(sd_folder), "--weights", str(osediff_pkl)) == 1
    err = capsys.readouterr().err
    assert "broken.png: not a readable image" in err
    assert "tiny.png" in err and "at least 8 px" in err
    assert "2 of 3 images failed" in err
    assert (out / "ok.png").is_file() and not (out / "tiny.png").exists()


def test_wrong_weights_file_is_one_line_error(sd_folder, image_folder, tmp_path, capsys):
    bad = tmp_path / "model.safetensors"
    shutil.copy(sd_folder / "vae" / "diffusion_pytorch_model.safetensors", bad)
    assert _run(str(image_folder), "-o", str(tmp_path / "o"), "--base", str(sd_folder), "--weights", str(bad)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "not an OSEDiff safetensors file" in err[0]


@pytest.mark.parametrize("family,edit,message", [
    ("768-v", lambda f: _set(f / "scheduler" / "scheduler_config.json", prediction_type="v_prediction"), "768-v"),
    ("sd1", lambda f: _set(f / "unet" / "config.json", use_linear_projection=False, cross_attention_dim=768), "SD 1"),
    ("sdxl", lambda f: _set(f / "unet" / "config.json", addition_embed_type="text_time"), "SDXL"),
])
def test_base_of_the_wrong_family_is_refused(sd_folder, osediff_pkl, image_folder, tmp_path, capsys, family, edit, message):
    base = tmp_path / family
    shutil.copytree(sd_folder, base)
    edit(base)
    assert _run(str(image_folder), "-o", str(tmp_path / "o"), "--base", str(base), "--weights", str(osediff_pkl)) == 2
    err = capsys.readouterr().err
    assert message in err and "SD 2.1-base" in err and "Traceback" not in err


def _set(path, **values):
    cfg = json.loads(path.read_text())
    cfg.update(values)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("preset", [None, "0"])
def test_command_line_puts_torch_buffers_on_huge_pages_unless_told_otherwise(preset):
    """`python -m sr_core` sets THP_MEM_ALLOC_ENABLE before torch loads (torch reads it once);
    a value the user set is kept."""
    import os

    code = ("import os, sys; from sr_core.cli import huge_pages_for_torch; first = huge_pages_for_torch(); "
            "import torch; print(first, huge_pages_for_torch(), os.environ.get('THP_MEM_ALLOC_ENABLE'))")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == (["True", "False", "1"] if preset is None else ["False", "False", "0"])
