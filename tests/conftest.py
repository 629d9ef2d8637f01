"""Shared fixtures: tiny SD 2.1-base-architecture models and OSEDiff weights, built once per session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
for p in (str(ROOT), str(TESTS)):
    if p not in sys.path:
        sys.path.insert(0, p)

import tiny_models  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_thread():
    """Many small tile ops: one thread avoids OpenMP barrier stalls on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory) -> Path:
    """A diffusers folder of a tiny random SD 2.1-base-architecture model."""
    return tiny_models.write_diffusers_folder(tmp_path_factory.mktemp("sd21") / "tiny-sd21")


@pytest.fixture(scope="session")
def osediff_pkl(tmp_path_factory, sd_folder) -> Path:
    """An osediff.pkl in the official format for ``sd_folder``'s modules (rank 4, non-zero LoRA)."""
    unet, vae, _ = tiny_models.build_models()
    return tiny_models.write_osediff_pkl(tmp_path_factory.mktemp("weights") / "osediff.pkl", unet, vae)


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    """Two small photo-like images (scikit-image's samples, downscaled), one not a multiple of 8."""
    from PIL import Image
    from skimage import data

    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(data.astronaut()).resize((24, 20), Image.Resampling.LANCZOS).save(d / "astronaut.png")
    Image.fromarray(data.chelsea()).resize((17, 13), Image.Resampling.LANCZOS).save(d / "cat.jpg")
    return d
