"""`python -m sr_core upscale --method ccsr` and `stability` end to end on tiny models."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import ccsr_fixtures as fx
from sr_core.cli import main


@pytest.fixture(scope="module")
def ccsr_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ccsr_cli")
    v2 = fx.write_v2_folder(d / "ccsr-v2", seed=0)
    v1 = fx.write_v1_ckpt(d / "v1" / "real-world_ccsr.ckpt")
    img = d / "in" / "lq.png"
    img.parent.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((10, 12, 3)) * 255).astype(np.uint8)).save(img)
    return {"v2": v2, "v1": v1, "img": img}


def _png(path):
    return np.asarray(Image.open(path))


def test_explicit_settings_equal_the_two_step_preset(sd_folder, ccsr_files, tmp_path):
    common = [str(ccsr_files["img"]), "--method", "ccsr", "--base", str(sd_folder), "--weights", str(ccsr_files["v2"]),
              "--scale", "2", "--process-size", "0"]
    assert main(["upscale", *common, "-o", str(tmp_path / "preset"), "--preset", "two-step"]) == 0
    assert main(["upscale", *common, "-o", str(tmp_path / "explicit"), "--steps", "6", "--t-max", "0.6667",
                 "--t-min", "0.5", "--cfg", "4.5"]) == 0
    a, b = _png(tmp_path / "preset" / "lq.png"), _png(tmp_path / "explicit" / "lq.png")
    assert a.shape == (20, 24, 3) and np.array_equal(a, b)
    # one-step is another picture, and so is another seed
    assert main(["upscale", *common, "-o", str(tmp_path / "one"), "--preset", "one-step"]) == 0
    assert main(["upscale", *common, "-o", str(tmp_path / "seed"), "--seed", "1"]) == 0
    assert not np.array_equal(a, _png(tmp_path / "one" / "lq.png"))
    assert not np.array_equal(a, _png(tmp_path / "seed" / "lq.png"))


def test_v1_checkpoint_and_its_gan_decoder(sd_folder, ccsr_files, tmp_path, capsys):
    common = [str(ccsr_files["img"]), "--method", "ccsr", "--base", str(sd_folder), "--weights", str(ccsr_files["v1"]),
              "--scale", "2", "--process-size", "0"]
    assert main(["upscale", *common, "-o", str(tmp_path / "base")]) == 0
    err = capsys.readouterr().err
    assert "CCSR v1" in err and "also holds a GAN-finetuned decoder" in err
    assert main(["upscale", *common, "-o", str(tmp_path / "gan"), "--decoder", str(ccsr_files["v1"])]) == 0
    assert "GAN decoder" in capsys.readouterr().err
    a, b = _png(tmp_path / "base" / "lq.png"), _png(tmp_path / "gan" / "lq.png")
    assert a.shape == b.shape == (20, 24, 3) and not np.array_equal(a, b)


def test_settings_the_official_code_crashes_on_are_one_line_errors(sd_folder, ccsr_files, tmp_path, capsys):
    rc = main(["upscale", str(ccsr_files["img"]), "-o", str(tmp_path), "--method", "ccsr", "--base", str(sd_folder),
               "--weights", str(ccsr_files["v2"]), "--steps", "2", "--t-max", "0.5", "--t-min", "0.4",
               "--process-size", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)


def test_an_osediff_file_given_as_ccsr_weights_is_named(sd_folder, osediff_pkl, ccsr_files, tmp_path, capsys):
    rc = main(["upscale", str(ccsr_files["img"]), "-o", str(tmp_path), "--method", "ccsr", "--base", str(sd_folder),
               "--weights", str(osediff_pkl)])
    err = capsys.readouterr().err
    assert rc == 2 and "OSEDiff" in err


def test_stability_prints_g_std_and_l_std(sd_folder, ccsr_files, capsys):
    rc = main(["stability", str(ccsr_files["img"]), "--seeds", "3", "--method", "ccsr", "--base", str(sd_folder),
               "--weights", str(ccsr_files["v2"]), "--scale", "2", "--preset", "one-step",
               "--process-size", "0"])
    out = capsys.readouterr().out
    assert rc == 0 and "G-STD" in out and "L-STD" in out
    l_std = float(out.split("L-STD")[1].split()[0])
    assert l_std > 0  # N = 1 still draws its start noise: seeds differ


@pytest.mark.parametrize("method", ["osediff", "ccsr"])
def test_speed_levers_are_on_by_default_and_change_only_rounding(sd_folder, osediff_pkl, ccsr_files, tmp_path,
                                                                 monkeypatch, method):
    """The default CLI applies the measured levers (channels-last UNet, folded decoder upsampling,
    CCSR's CFG pair batched); ``--speed-levers off`` runs the plain modules; the PNGs agree to
    one 8-bit level (float summation order only)."""
    from sr_core import perf

    applied = []
    real = perf.apply_options
    monkeypatch.setattr(perf, "apply_options", lambda host, opts, **kw: applied.append(opts) or real(host, opts, **kw))
    monkeypatch.setattr(perf, "FOLD_MIN_PIXELS", 0)  # fold the tiny decoder's small maps too
    batched = []
    real_cfg = perf.batched_cfg_eps
    monkeypatch.setattr(perf, "batched_cfg_eps", lambda *a: batched.append(1) or real_cfg(*a))
    layouts = []
    real_cl = perf.set_channels_last
    monkeypatch.setattr(perf, "set_channels_last",
                        lambda *ms: layouts.extend(type(m).__name__ for m in ms) or real_cl(*ms))
    weights = osediff_pkl if method == "osediff" else ccsr_files["v2"]
    outs = {}
    for levers in ("on", "off"):
        out = tmp_path / levers
        assert main(["upscale", str(ccsr_files["img"]), "-o", str(out), "--base", str(sd_folder), "--weights",
                     str(weights), "--method", method, "--scale", "2", "--speed-levers", levers]
                    + (["--process-size", "0", "--preset", "two-step"] if method == "ccsr" else [])) == 0
        outs[levers] = np.asarray(Image.open(out / "lq.png")).astype(int)
    assert len(applied) == 1 and applied[0].channels_last == ("unet",) and applied[0].fold_upsample
    assert bool(batched) == (method == "ccsr")
    assert "UNet2DConditionModel" in layouts and "Decoder" in layouts  # the decoder: untiled images only
    assert outs["on"].shape == outs["off"].shape == (20, 24, 3)
    assert np.abs(outs["on"] - outs["off"]).max() <= 1
