"""The ComfyUI path and the diffusers path of sr_core give the same image from the same weights.

Runs parity_check.py under ComfyUI's python (a random full-architecture SD 2.1-base saved
both as a single-file ldm checkpoint and as a diffusers folder, one random osediff.pkl,
fp32 on the CPU). Needs about 10 GB of RAM and two minutes.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

# fp32 on both sides; the two hosts differ only in op order (ComfyUI's apply_model scales the
# input by 1/√(1+σ²) and returns x − σ·ε, from which ε is recovered) and attention kernels.
IMAGE_MAX_ABS = 1e-4      # pixels in [0, 1]: far below one 8-bit level (0.0039)
LATENT_MAX_REL = 2e-5     # x0 latent max error relative to its std (measured: 4.6e-6)


def _comfy_python() -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    return str(Path(os.environ["COMFYUI_DIR"]).resolve().parent / "venv" / "bin" / "python")


@pytest.mark.host
def test_comfyui_path_equals_diffusers_path(tmp_path):
    if not os.environ.get("COMFYUI_DIR"):
        pytest.skip("COMFYUI_DIR is not set")
    python = _comfy_python()
    if not Path(python).exists():
        pytest.skip(f"ComfyUI python not found at {python} (set COMFYUI_PYTHON)")
    proc = subprocess.run([python, str(HERE / "parity_check.py"), os.environ["COMFYUI_DIR"], str(tmp_path)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(report, indent=1))
    assert report["comfy_model_class"] == "SD20"
    assert report["output_size"] == [120, 108]  # 4 × (30, 27)
    assert report["image_none"]["max_abs"] < IMAGE_MAX_ABS
    assert report["image_adain"]["max_abs"] < IMAGE_MAX_ABS
    assert report["lq_latent"]["max_abs"] < 1e-4
    assert report["x0_latent"]["max_abs"] < LATENT_MAX_REL * report["x0_latent"]["ref_std"]
    for family, words in (("SD15", "SD 1.x"), ("SDXL", "SDXL"), ("SD21UnclipH", "unCLIP")):
        msg = report["refusals"][family]
        assert msg and msg.startswith("BaseModelError") and words in msg and "SD 2.1-base" in msg, msg
    # the exact tiled VAE on ComfyUI's own ldm modules (OSEDiff's encoder LoRA applied), tiles forced small
    assert report["tiled_lq_latent"]["max_abs"] < 1e-3, report["tiled_lq_latent"]
    assert report["tiled_decode_psnr"] >= 40.0, report["tiled_decode_psnr"]
    assert report["tiled_unet_shape_ok"]
    # CCSR v2 (random full-size control branch + GAN decoder): node path == diffusers path, both presets
    for name in ("ccsr_two_step", "ccsr_one_step"):
        assert report[name]["max_abs"] < IMAGE_MAX_ABS, (name, report[name])
    assert report["user_model_unchanged_after_ccsr"] and report["user_vae_unchanged_after_ccsr"]
    # the user's MODEL and VAE give bit-identical results after the SR run
    assert report["user_model_unchanged"] and report["user_vae_decode_unchanged"] and report["user_vae_encode_unchanged"]
