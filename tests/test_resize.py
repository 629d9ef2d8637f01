"""sr_core.images.resize_torch (the resize on a GPU) against Pillow's resize of float ("F")
images, which sr_core.images.resize uses on the CPU.

OSEDiff and CCSR enlarge the low-quality photo with Pillow's bicubic before encoding it; on a
GPU the resize runs in torch, so these tests pin that it computes what Pillow computes: the
same values when both sides grow, within one float32 rounding otherwise.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from image_helpers import smooth_photo
from sr_core.images import RESIZE_METHODS, resize, resize_torch


def pillow_resize(x: torch.Tensor, size: tuple[int, int], method: str) -> torch.Tensor:
    """Each channel through Pillow as a float image (the reference)."""
    src = x.numpy()
    out = np.empty(src.shape[:2] + size, dtype=np.float32)
    for n in range(src.shape[0]):
        for c in range(src.shape[1]):
            im = Image.fromarray(src[n, c], mode="F").resize(size[::-1], resample=RESIZE_METHODS[method])
            out[n, c] = np.asarray(im)
    return torch.from_numpy(out).clamp(0.0, 1.0)


def photo(h: int, w: int) -> torch.Tensor:
    return smooth_photo(h, w, seed=h * 1000 + w)


GROW = [((37, 53), (148, 212)), ((128, 128), (512, 512)), ((5, 7), (23, 9)), ((64, 64), (64, 200)),
        ((30, 31), (117, 101))]
OTHER = [((100, 77), (33, 250)), ((301, 199), (97, 61)), ((33, 250), (100, 77)), ((64, 80), (64, 37))]


@pytest.mark.parametrize("method", list(RESIZE_METHODS))
@pytest.mark.parametrize("src,dst", GROW)
def test_enlarging_equals_pillow(method, src, dst):
    x = photo(*src)
    ref = pillow_resize(x, dst, method)
    assert torch.equal(resize_torch(x, dst, method), ref)
    assert torch.equal(resize(x, dst, method), ref)  # the CPU path is Pillow itself


@pytest.mark.parametrize("method", list(RESIZE_METHODS))
@pytest.mark.parametrize("src,dst", OTHER)
def test_shrinking_within_one_rounding_of_pillow(method, src, dst):
    x = torch.rand(2, 3, *src, generator=torch.Generator().manual_seed(3))
    got, ref = resize_torch(x, dst, method), pillow_resize(x, dst, method)
    assert got.shape == (2, 3, *dst) and got.dtype == torch.float32
    assert (got - ref).abs().max().item() <= 1.2e-7


def test_values_clamped_and_input_untouched():
    x = torch.zeros(1, 3, 16, 16)
    x[..., 8:, :] = 1.0  # a hard edge: bicubic and Lanczos overshoot it
    before = x.clone()
    for fn in (resize, resize_torch):
        y = fn(x, (64, 64), "lanczos")
        assert torch.equal(x, before)
        assert y.min().item() == 0.0 and y.max().item() == 1.0
    assert torch.equal(resize(x, (16, 16)), x) and resize(x, (16, 16)) is not x


def test_unknown_method():
    x = photo(20, 24)
    for fn in (resize, resize_torch):
        with pytest.raises(ValueError, match="resize method must be one of"):
            fn(x, (40, 48), "cubic")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_equals_cpu():
    x = photo(96, 80)
    cpu = resize(x, (384, 320))  # Pillow
    gpu = resize(x.cuda(), (384, 320))  # torch on the GPU
    assert gpu.is_cuda and (gpu.cpu() - cpu).abs().max().item() <= 1.2e-7
