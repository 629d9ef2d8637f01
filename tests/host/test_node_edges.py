"""The SR nodes on edge-case IMAGEs inside ComfyUI, and the user's MODEL/VAE after a failure mid-sampling.

Runs node_edges_check.py under ComfyUI's python with the random SD 2.1-base checkpoint (CPU, fp32;
about 8 GB of RAM and a few minutes). See that script for what each report field means.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CHECKPOINT = os.environ.get("COMFY_SD21_CHECKPOINT", "sd21-random.safetensors")

# name -> output (B, H, W, 3) = (B, round(scale·H), round(scale·W), 3), or a pattern the error must match
WORKS = {
    "rgb": [1, 16, 24, 3], "rgba": [1, 16, 24, 3], "gray": [1, 16, 24, 3], "one_px_x8": [1, 8, 8, 3],
    "one_px_side_x8": [1, 8, 72, 3], "seven_px_x2": [1, 14, 14, 3], "strip_1x300_x8": [1, 8, 2400, 3],
    "batch3": [3, 16, 16, 3], "simple_rgba": [1, 16, 24, 3],
}
REFUSED = {
    "two_channels": r"^image: IMAGE has 2 channels; expected RGB",
    "empty_batch": r"^image: the IMAGE batch is empty",
    "nan": r"^image: the image has NaN or infinite pixel values",
    "inf": r"^image: the image has NaN or infinite pixel values",
    "one_px_side_x4": r"^image: 9×1 px at scale 4 gives 36×4 px; each side .* at least 8 px",
    "strip_1x300_x4": r"^image: 300×1 px at scale 4 gives 1200×4 px; each side .* at least 8 px",
    "simple_empty_batch": r"^image: the IMAGE batch is empty",
    "simple_nan": r"^image: the image has NaN",
    "simple_one_px_side_x4": r"^image: 9×1 px at scale 4",
}


def _comfy_python() -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    return str(Path(os.environ["COMFYUI_DIR"]).resolve().parent / "venv" / "bin" / "python")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    if not os.environ.get("COMFYUI_DIR"):
        pytest.skip("COMFYUI_DIR is not set")
    python = _comfy_python()
    if not Path(python).exists():
        pytest.skip(f"ComfyUI python not found at {python} (set COMFYUI_PYTHON)")
    ckpt = Path(os.environ["COMFYUI_DIR"]) / "models" / "checkpoints" / CHECKPOINT
    if not ckpt.is_file():
        pytest.skip(f"no {ckpt} (set COMFY_SD21_CHECKPOINT)")
    work = tmp_path_factory.mktemp("edges")
    proc = subprocess.run([python, str(HERE / "node_edges_check.py"), os.environ["COMFYUI_DIR"], str(work), str(ckpt)],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_edge_case_images_work_at_exactly_scale_times_the_input(report):
    """RGBA (alpha dropped), 1-channel gray (repeated), 1-px and 7-px sides, a 1×300 strip at ×8 and a
    batch of 3 run through Encode LQ → Sampler → Decode (and the simple node) to finite images of
    exactly round(scale·H) × round(scale·W) in [0, 1]."""
    for name, shape in WORKS.items():
        case = report["cases"][name]
        assert case["ok"], (name, case)
        assert case["shape"] == shape and case["finite"] and 0.0 <= case["min"] <= case["max"] <= 1.0, (name, case)
    assert report["alpha_dropped_equal"]  # RGBA gives the RGB image's result
    assert report["gray_repeated_equal"]  # gray gives the result of the gray repeated to RGB
    assert report["simple_equals_chain"]  # SR Upscale (simple) = the chain with an empty prompt
    assert report["batch_vs_single_max_abs"] < 1e-4  # each image of the batch as it comes alone


def test_unusable_images_are_refused_with_the_packs_error_naming_the_input(report):
    import re

    for name, pattern in REFUSED.items():
        case = report["cases"][name]
        assert not case["ok"] and case["sr_error"], (name, case)
        assert case["error"] == "InputImageError", (name, case)
        assert re.search(pattern, case["message"]), (name, case["message"])


def test_a_failure_mid_sampling_leaves_the_user_model_and_vae_untouched(report):
    """The patched clone's first UNet call raises while OSEDiff's weights are in the shared UNet (and its
    encoder LoRA in the shared VAE, from Encode LQ); afterwards a plain apply_model of the user's MODEL,
    and the user's VAE decode and encode, are bit-identical to before, with no patch, no wrapper, and
    the same dtypes and devices."""
    f = report["failure"]
    assert f["raised"] == "injected failure in the UNet call" and f["calls"] == 1, f
    assert f["patched_at_failure"], f  # the failure really happened with the patched weights loaded
    assert f["eps_equal"] and f["conv_in_equal"] and f["decode_equal"] and f["encode_equal"], f
    for key in ("model_patches", "vae_patches", "wrapper", "dtypes", "devices"):
        assert f[key][0] == f[key][1], (key, f[key])
    assert f["model_patches"] == [0, 0] and f["vae_patches"] == [0, 0] and f["wrapper"] == [False, False], f


def test_the_tiled_vae_disk_store_gives_the_memory_store_image_and_cleans_up(report):
    """SR Tiling with vae_store "disk" (64-px VAE tiles, 8-latent-px UNet tiles; 8×12 at ×8 → 64×96):
    the same IMAGE as "memory", bit for bit, and no scratch folder left in ComfyUI's temp folder."""
    d = report["disk_store"]
    assert d["shape"] == [1, 64, 96, 3]
    assert d["equal"]
    assert d["left_in_temp"] == []
