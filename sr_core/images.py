"""Image tensors in and out: loading files, checks, resizing and padding.

Core image layout: float32 (N, 3, H, W), pixels in [0, 1], on the CPU.
Files: any format Pillow reads. Alpha is dropped (the color channels are kept as
stored); grayscale is repeated to RGB; 16-bit grayscale and float images keep their precision
(Pillow reads 16-bit color files at 8 bits per channel).
EXIF orientation is applied, as photo viewers do.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from .errors import InputImageError

RESIZE_METHODS: dict[str, int] = {
    "bicubic": Image.Resampling.BICUBIC,  # Pillow's bicubic (a = −0.5), the official OSEDiff filter
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
LATENT_FACTOR = 8  # pixels per latent pixel


def load_image(path: str | os.PathLike) -> Tensor:
    """Read an image file as (3, H, W) float32 in [0, 1]. InputImageError if unreadable."""
    p = Path(path)
    try:
        with Image.open(p) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
    except FileNotFoundError:
        raise InputImageError(f"{p}: image file not found") from None
    except Image.DecompressionBombError as e:
        raise InputImageError(f"{p}: {e} (Pillow's guard against decompression bombs; an input that large is "
                              f"not a low-resolution image)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputImageError(f"{p}: not a readable image ({e})") from None
    return pil_to_tensor(im, str(p))


def pil_to_tensor(im: Image.Image, name: str = "image") -> Tensor:
    """Pillow image of any mode → (3, H, W) float32 in [0, 1] (alpha dropped)."""
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float32) / 65535.0
    elif mode == "F":
        arr = np.asarray(im, dtype=np.float32)
    else:
        if "A" in im.getbands() or mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()
    check_pixels(t[None], name)
    return t.clamp(0.0, 1.0)


def check_pixels(images: Tensor, name: str = "image") -> None:
    """Refuse what the pipeline cannot take: wrong layout, empty, NaN or Inf pixels."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise InputImageError(f"{name}: expected (N, 3, H, W) RGB pixels, got shape {tuple(images.shape)}")
    if images.numel() == 0:
        raise InputImageError(f"{name}: the image is empty (shape {tuple(images.shape)})")
    if not torch.isfinite(images).all():
        raise InputImageError(f"{name}: the image has NaN or infinite pixel values; fix the node that made it")


def save_png(image: Tensor, path: str | os.PathLike) -> None:
    """Write (3, H, W) in [0, 1] as an 8-bit RGB PNG (values rounded to the nearest level)."""
    arr = (image.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    Image.fromarray(arr, mode="RGB").save(str(path), format="PNG")


def _pillow_filter(method: str):
    """(support, kernel) of Pillow's convolution filters, as functions of a float64 tensor."""
    if method == "bilinear":
        return 1.0, lambda x: (1.0 - x.abs()).clamp_min(0.0)
    if method == "bicubic":  # Keys' cubic with a = −0.5
        a = -0.5

        def cubic(x: Tensor) -> Tensor:
            x = x.abs()
            near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
            far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
            return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))
        return 2.0, cubic
    if method == "lanczos":  # sinc(x)·sinc(x/3) on [−3, 3)
        return 3.0, lambda x: torch.where((x >= -3.0) & (x < 3.0), torch.sinc(x) * torch.sinc(x / 3.0),
                                          torch.zeros_like(x))
    raise ValueError(method)


def _resample_taps(in_size: int, out_size: int, method: str, device) -> tuple[Tensor, Tensor]:
    """Source indices and weights (out_size, K) of one axis, as Pillow computes them: output pixel
    i is centred at (i + ½)·in/out; when shrinking the filter is widened by in/out; the weights of
    the taps inside the image are normalised to sum 1 (float64)."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support, kernel = _pillow_filter(method)
    support *= filter_scale
    centre = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale
    lo = (centre - support + 0.5).trunc().clamp_min(0).long()  # C's (int) cast truncates toward zero
    hi = (centre + support + 0.5).trunc().clamp_max(in_size).long()
    k = int((hi - lo).max())
    idx = lo[:, None] + torch.arange(k)[None, :]
    inside = idx < hi[:, None]
    w = torch.where(inside, kernel((idx.double() - centre[:, None] + 0.5) * (1.0 / filter_scale)), 0.0)
    total = torch.zeros(out_size, 1, dtype=torch.float64)
    for j in range(k):  # summed tap by tap, as Pillow does
        total += w[:, j:j + 1]
    w = torch.where(total != 0, w / total, w)
    return idx.clamp_max(in_size - 1).to(device), w.to(device)


_CHUNK_ELEMS = 1 << 22
"""float64 elements of one resampling temporary (32 MB): a large image is resampled in slices."""


def _resample_axis(x: Tensor, out_size: int, method: str, dim: int) -> Tensor:
    """One separable pass along ``dim`` (-1 or -2) of a float32 (N, C, H, W) tensor; taps
    accumulated in float64, stored float32, in slices of the other axis (bounded memory)."""
    n = x.shape[dim]
    if method == "nearest":  # the source pixel under the output pixel's centre, found as Pillow
        step, pos, picks = n / out_size, 0.5 * n / out_size, []  # does: by adding the step (float64)
        for _ in range(out_size):
            picks.append(min(int(pos), n - 1))
            pos += step
        return x.index_select(dim, torch.tensor(picks, device=x.device))
    idx, w = _resample_taps(n, out_size, method, x.device)
    d = dim % 4
    other = 5 - d  # the other spatial axis (2 or 3): sliced to bound the float64 temporaries
    shape = list(x.shape)
    shape[d] = out_size
    out = torch.empty(shape, dtype=torch.float32, device=x.device)
    bshape = [1, 1, 1, 1]
    bshape[d] = out_size
    step = max(1, _CHUNK_ELEMS // max(1, x.shape[0] * x.shape[1] * out_size))
    for a in range(0, x.shape[other], step):
        part = x.narrow(other, a, min(step, x.shape[other] - a))
        acc = part.index_select(d, idx[:, 0]).double().mul_(w[:, 0].reshape(bshape))
        for j in range(1, idx.shape[1]):
            acc.add_(part.index_select(d, idx[:, j]).double().mul_(w[:, j].reshape(bshape)))
        out.narrow(other, a, part.shape[other]).copy_(acc)
    return out


def resize(images: Tensor, size: tuple[int, int], method: str = "bicubic") -> Tensor:
    """Resize (N, C, H, W) float images to ``size`` = (H', W') with Pillow's filters, on the
    images' device.

    On the CPU, Pillow itself resizes each channel as a float ("F") image (no 8-bit rounding;
    its C loops are about twice as fast as torch's gathers there). On other devices torch
    computes Pillow's arithmetic (:func:`resize_torch`): the same values when both sides
    grow (how OSEDiff and CCSR resize), within 1e-7 otherwise, so the picture does not depend
    on the device. Pillow's bicubic is Keys' cubic with a = −0.5 (the official OSEDiff
    filter). The result is float32, clamped to [0, 1] (bicubic and Lanczos overshoot at edges).
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize method must be one of {tuple(RESIZE_METHODS)}, got {method!r}")
    h, w = int(size[0]), int(size[1])
    if (h, w) == tuple(images.shape[-2:]):
        return images.detach().float().clone()
    if images.device.type != "cpu":
        return resize_torch(images, (h, w), method)
    src = images.detach().float().numpy()
    out = np.empty(src.shape[:2] + (h, w), dtype=np.float32)
    for n in range(src.shape[0]):
        for c in range(src.shape[1]):
            ch = Image.fromarray(src[n, c], mode="F").resize((w, h), resample=RESIZE_METHODS[method])
            out[n, c] = np.asarray(ch, dtype=np.float32)
    return torch.from_numpy(out).clamp_(0.0, 1.0)


def resize_torch(images: Tensor, size: tuple[int, int], method: str = "bicubic") -> Tensor:
    """:func:`resize` in torch on any device: Pillow's arithmetic for float images, a horizontal
    pass then a vertical one, each summing its taps in float64 and storing float32 (Pillow may
    run the passes in the other order when one side shrinks: then within 1e-7 of it)."""
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize method must be one of {tuple(RESIZE_METHODS)}, got {method!r}")
    h, w = int(size[0]), int(size[1])
    x = images.detach().float()
    if (h, w) == tuple(x.shape[-2:]):
        return x.clone()
    if w != x.shape[-1]:
        x = _resample_axis(x, w, method, dim=-1)
    if h != x.shape[-2]:
        x = _resample_axis(x, h, method, dim=-2)
    return x.clamp_(0.0, 1.0)


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """Output size for ``scale``: (round(scale·H), round(scale·W)), at least 1 px."""
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def pad_to_multiple(images: Tensor, multiple: int = LATENT_FACTOR) -> Tensor:
    """Pad (N, C, H, W) on the bottom/right up to multiples of ``multiple``.

    Reflect padding where the image is large enough, replicate otherwise. The caller
    crops the result back to (H, W) (:func:`crop_to`), so the output size never changes.
    """
    h, w = images.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return images
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(images, (0, pw, 0, ph), mode=mode)


def crop_to(images: Tensor, height: int, width: int) -> Tensor:
    """Top-left crop of (N, C, H', W') to (height, width)."""
    return images[..., :height, :width]


def list_inputs(inputs: list[str]) -> list[Path]:
    """Expand files and folders (their image files, sorted, not recursive) into a list of paths."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InputImageError(f"{p}: folder holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            out.extend(found)
        else:
            out.append(p)
    return out
