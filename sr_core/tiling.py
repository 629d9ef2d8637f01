"""Tiling for large images: latent tiles for the UNet, exact tiled VAE encode/decode.

Units: *latent px* are pixels of the (N, 4, h, w) latent; *image px* are pixels of the
(N, 3, H, W) image, H = 8·h. Every size below says which one it is.

Latent tiling (UNet, CCSR control branch + UNet): :class:`TilePlan` lays tiles over the
latent, :func:`tiled_call` runs a model call per tile (several tiles batched along the
batch dimension if asked) and blends the outputs with smooth weights in fp32;
:class:`TiledDenoiser` wraps a :class:`~.protocols.Denoiser` so an unmodified sampler
tiles its UNet calls (blending ε, as the official code does). Noise is never drawn
here: every draw is for the whole latent, outside the tiled call (see :mod:`.noise`).

Tiled VAE (:class:`TiledVAE`, an :class:`~.protocols.Autoencoder`): the encoder and
decoder are rebuilt as a layout-neutral op sequence (conv, resnet, down/upsample, mid
attention, norm-SiLU-conv head) from either a diffusers ``AutoencoderKL`` or ComfyUI's
ldm ``Encoder``/``Decoder`` tree (:func:`vae_ops`), and one executor runs it tile by
tile, re-tiling at every GroupNorm:

- every GroupNorm uses statistics of the WHOLE feature map: each tile step accumulates
  per-(image, group) count/mean/M2 of its output over the tile's interior (tiles
  partition the map, so nothing is counted twice) in fp32, merged in fp64 (Chan's
  parallel update, i.e. sum and sum of squares without the cancellation); eps and
  affine come from the module;
- between two GroupNorms a tile step reads its input with a halo of 1 px per 3x3 conv
  at that resolution (the receptive field of one step, which
  :func:`measure_receptive_field` measures), so outputs are exact, not blended;
- the mid-block attention runs on the assembled 1/8-resolution map of its stage: keys
  and values of the whole map, queries per tile (torch SDPA; key-chunked online softmax
  when K/V exceed the memory budget);
- the feature maps between steps are stored whole: in memory (on the CPU when computing
  on a GPU; :func:`estimate_vae_store_bytes` says how much) or, when that would exceed
  the budget, in scratch files (:mod:`.feature_store`), so that memory grows with the
  tile and only disk use grows with the image.

The result equals the untiled VAE up to float summation order (tests: 126-131 dB PSNR
on random SD-structure VAEs and a photo with the CPU's default channels-last tiles, 129-137
dB channels-first; the required figure is 40 dB).

Why re-tile at every GroupNorm instead of running the whole VAE per padded tile (the
official VAEHook): measured with :func:`measure_receptive_field` (GroupNorm statistics
frozen, SD 2.1 block structure), one changed pixel moves the output up to 84.5 image px
away through the encoder before its mid attention (68.5 px above 1e-3 of the peak
change) and 3 latent px after it; through the decoder 3 latent px before the attention
and 14.7 latent px (= 118 image px; 7.2-7.8 latent px above 1e-3) after it; the mid
attention itself reaches everywhere. The official pads (32 image px encoder, 11 latent
px decoder) are below these, and a whole-network tile would need them on every side
(for 512-px tiles: ≥ 2× the compute). Between two GroupNorms the spread is one 3x3 conv
(1 px at that step's resolution), which is all the halo a step here fetches.

Memory: ``auto`` tile sizes come from a byte budget through the cost model of
:data:`COST_MODEL` (measured, see its docstring); out-of-memory errors halve the tile
(or the tile batch) and retry instead of failing (:func:`is_oom`).
"""
from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .feature_store import DiskMap, FeatureMap, MemoryMap, ScratchDir
from .protocols import Denoiser

log = logging.getLogger(__name__)

Rect = tuple[int, int, int, int]
"""(y0, y1, x0, x1), half-open, in pixels of the map it refers to."""
TileProgress = Callable[[int, int], None]
"""progress(done, total): called after every tile (latent) or every tile step (VAE); may raise to abort."""
Backoff = Callable[[str], None]
"""on_backoff(message): told when an out-of-memory error made a tile (or tile batch) smaller."""

OOM_MESSAGES = ("not enough memory", "DefaultCPUAllocator", "out of memory")
MIN_LATENT_TILE = 8
"""Smallest UNet tile side (latent px) the out-of-memory back-off goes down to."""
MIN_VAE_SIDE = 8
"""Smallest VAE tile side (px of the step's map) the back-off goes down to."""
OFFICIAL_LATENT_TILE = 96
OFFICIAL_LATENT_OVERLAP = 32


# ----------------------------------------------------------------------------- errors


def is_oom(exc: BaseException) -> bool:
    """True for an out-of-memory error: ``torch.cuda.OutOfMemoryError`` (any device's
    ``torch.OutOfMemoryError``) or a RuntimeError saying "not enough memory" /
    "DefaultCPUAllocator" / "out of memory" (the CPU allocator's and older CUDA's)."""
    for name in ("OutOfMemoryError",):
        for mod in (torch, torch.cuda):
            cls = getattr(mod, name, None)
            if isinstance(cls, type) and isinstance(exc, cls):
                return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in OOM_MESSAGES)


def _release(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _warn_backoff(msg: str) -> None:
    log.warning("%s", msg)


# ------------------------------------------------------------------------- tile plan


def axis_starts(size: int, tile: int, overlap: int) -> tuple[tuple[int, ...], int]:
    """Tile starts along one axis of ``size`` px and the tile length actually used.

    The tile is clipped to ``size`` (one tile covers an axis shorter than a tile; no
    loop can hang). Otherwise stride = tile − overlap, with the overlap clamped to at
    most tile // 2 (an overlap ≥ the tile hangs the official code); tile i starts at
    i·stride and the last one is snapped to ``size − tile``. Tile count = the smallest n
    with (n−1)·stride + tile ≥ size (the official rule).
    """
    size, tile = int(size), int(tile)
    if size < 1 or tile < 1:
        raise ValueError(f"tile plan needs positive sizes, got size {size}, tile {tile}")
    tile = min(tile, size)
    if tile == size:
        return (0,), tile
    ov = max(0, min(int(overlap), tile // 2))
    stride = tile - ov
    n = math.ceil((size - tile) / stride) + 1
    starts = tuple(sorted({min(i * stride, size - tile) for i in range(n)}))
    return starts, tile


@dataclass(frozen=True)
class TilePlan:
    """Latent tiles: ``tile_h`` × ``tile_w`` latent px at every (y, x) of ``ys`` × ``xs``.

    Build with :meth:`build` (rectangular tiles, each side clipped to the latent) or
    :meth:`official` (OSEDiff's square tiles, T = min(tile, h, w), where they work).
    Tiles are visited row-major.
    """

    height: int
    width: int
    tile_h: int
    tile_w: int
    overlap: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @classmethod
    def build(cls, height: int, width: int, tile: int | tuple[int, int], overlap: int = OFFICIAL_LATENT_OVERLAP) -> "TilePlan":
        """Tiles of ``tile`` latent px (an int or (th, tw)) with ``overlap`` latent px."""
        th, tw = (tile, tile) if isinstance(tile, int) else tile
        ys, th = axis_starts(height, th, overlap)
        xs, tw = axis_starts(width, tw, overlap)
        return cls(int(height), int(width), th, tw, int(overlap), ys, xs)

    @classmethod
    def official(cls, height: int, width: int, tile: int = OFFICIAL_LATENT_TILE,
                 overlap: int = OFFICIAL_LATENT_OVERLAP) -> "TilePlan":
        """OSEDiff's geometry: square tiles T = min(tile, h, w), stride T − overlap, last
        tile snapped to the edge. Where the official code hangs (T ≤ overlap: a latent
        side ≤ 32), falls back to :meth:`build` (each side clipped on its own)."""
        t = min(int(tile), int(height), int(width))
        if t <= overlap:
            return cls.build(height, width, tile, overlap)
        stride = t - overlap

        def starts(size: int) -> tuple[int, ...]:
            n = math.ceil((size - t) / stride) + 1 if size > t else 1
            return tuple(sorted({min(i * stride, size - t) for i in range(n)}))

        return cls(int(height), int(width), t, t, int(overlap), starts(height), starts(width))

    @property
    def tiles(self) -> list[tuple[int, int]]:
        """(y, x) latent px of every tile's top-left corner, row-major."""
        return [(y, x) for y in self.ys for x in self.xs]

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def halved(self, min_tile: int = MIN_LATENT_TILE) -> "TilePlan":
        """The same latent with tiles half as large (not below ``min_tile``), overlap halved too."""
        th = max(min_tile, self.tile_h // 2)
        tw = max(min_tile, self.tile_w // 2)
        return TilePlan.build(self.height, self.width, (th, tw), max(0, self.overlap // 2))

    # -- blending weights ---------------------------------------------------------
    def axis_weights(self, axis: str, weighting: str) -> list[Tensor]:
        """1-D weights (float64) of each tile along ``axis`` ("y" or "x")."""
        starts, tile, size = (self.ys, self.tile_h, self.height) if axis == "y" else (self.xs, self.tile_w, self.width)
        if weighting == "gaussian":
            # The official Mixture-of-Diffusers profile, centres (T−1)/2 for x and T/2 for y.
            m = (tile - 1) / 2 if axis == "x" else tile / 2
            u = torch.arange(tile, dtype=torch.float64)
            g = torch.exp(-((u - m) ** 2) / (2 * 0.01 * tile * tile))
            return [g.clone() for _ in starts]
        if weighting == "cosine":
            return _cosine_axis(starts, tile)
        raise ValueError(f"weighting must be 'cosine' or 'gaussian', got {weighting!r}")

    def weights(self, weighting: str = "cosine") -> list[Tensor]:
        """2-D weights (float32, tile_h × tile_w) of every tile, row-major like :attr:`tiles`."""
        wy = self.axis_weights("y", weighting)
        wx = self.axis_weights("x", weighting)
        return [(a[:, None] * b[None, :]).float() for a in wy for b in wx]


def _cosine_axis(starts: Sequence[int], tile: int) -> list[Tensor]:
    """Border-aware cosine weights along one axis.

    For two neighbouring tiles overlapping over L px, the hand-over happens in the middle
    half of the overlap: the outgoing tile keeps weight 1 and the incoming one 0 over the
    first L//4 px, then over the next L − 2·(L//4) px the weights are cos² and sin² of
    π(j + ½)/(2·len) (they sum to 1), then 0 and 1. Sides at the image border are not
    tapered. So every tile's first/last L//4 px of an overlap carry zero weight: a model
    whose receptive field is ≤ overlap // 4 latent px gives exactly the untiled result.
    Where three tiles meet (a snapped last tile), the blend divides by the weight sum.
    """
    out = []
    n = len(starts)
    for i, s in enumerate(starts):
        w = torch.ones(tile, dtype=torch.float64)
        u = torch.arange(s, s + tile, dtype=torch.float64)
        if i > 0 and starts[i - 1] + tile > s:
            a, ln = _zone(starts[i - 1], s, tile)
            j = u - a
            rise = torch.sin(math.pi * (j + 0.5) / (2 * ln)) ** 2
            w = w * torch.where(j < 0, torch.zeros_like(u), torch.where(j >= ln, torch.ones_like(u), rise))
        if i < n - 1 and s + tile > starts[i + 1]:
            a, ln = _zone(s, starts[i + 1], tile)
            j = u - a
            fall = torch.cos(math.pi * (j + 0.5) / (2 * ln)) ** 2
            w = w * torch.where(j < 0, torch.ones_like(u), torch.where(j >= ln, torch.zeros_like(u), fall))
        out.append(w)
    return out


def _zone(left: int, right: int, tile: int) -> tuple[int, int]:
    """Start (absolute px) and length of the hand-over zone of tiles starting at left < right."""
    ov = left + tile - right
    if ov <= 0:
        raise ValueError("neighbouring tiles must overlap")
    margin = ov // 4
    return right + margin, max(1, ov - 2 * margin)


# ---------------------------------------------------------------------- tiled call


class _TileOOM(Exception):
    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


@torch.no_grad()
def tiled_call(fn: Callable[..., Tensor], inputs: Sequence[Tensor], plan: TilePlan, weighting: str = "cosine",
               batch_tiles: int = 1, progress: TileProgress | None = None, *, shrink_on_oom: bool = True,
               on_backoff: Backoff | None = None) -> Tensor:
    """Run ``fn`` tile by tile over latents and blend the outputs.

    ``inputs``: tensors (N, C_i, h, w) with the same N, h, w (latent px) as ``plan``.
    ``fn(*tiles)`` gets, for each input, ``k`` tiles concatenated along the batch in
    tile-major order (tile 0's N images, then tile 1's, ...), k ≤ ``batch_tiles``, and
    returns (k·N, C_out, tile_h, tile_w). Per-image extras such as a text context must be
    repeated k times by ``fn`` (see :func:`repeat_for_tiles`). The outputs are blended
    with ``weighting`` weights ("cosine": see :func:`_cosine_axis`, the default;
    "gaussian": the official exp(−(u−m)²/(2·0.01·T²)) with centres (T−1)/2 in x, T/2 in y)
    accumulated in fp32 and divided by the weight sum. Returns (N, C_out, h, w) float32.
    A plan with one tile calls ``fn`` once on the whole inputs (the untiled result).

    ``progress(done, total)`` after every tile. On an out-of-memory error the tile batch
    is halved, then (``shrink_on_oom``) the tile itself, restarting the blend with the
    smaller plan (``progress`` then starts again with the new total). Batched and
    one-at-a-time runs give the same result (same blend order).
    """
    inputs = list(inputs)
    if not inputs:
        raise ValueError("tiled_call needs at least one input")
    n = inputs[0].shape[0]
    for t in inputs:
        if t.dim() != 4 or t.shape[0] != n or tuple(t.shape[-2:]) != (plan.height, plan.width):
            raise ValueError(f"every input must be (N={n}, C, {plan.height}, {plan.width}); got {tuple(t.shape)}")
    if weighting not in ("cosine", "gaussian"):
        raise ValueError(f"weighting must be 'cosine' or 'gaussian', got {weighting!r}")
    notify = on_backoff or _warn_backoff
    k = max(1, int(batch_tiles))
    while True:
        try:
            return _tiled_call_once(fn, inputs, plan, weighting, k, progress, notify)
        except _TileOOM as e:
            smaller = plan.halved()
            if not shrink_on_oom or (smaller.tile_h, smaller.tile_w) == (plan.tile_h, plan.tile_w):
                raise e.original from None
            notify(f"out of memory with {plan.tile_h}×{plan.tile_w} latent tiles; retrying with "
                   f"{smaller.tile_h}×{smaller.tile_w}")
            plan, k = smaller, 1
            _release(inputs[0].device)


def _tiled_call_once(fn, inputs: list[Tensor], plan: TilePlan, weighting: str, k: int,
                     progress: TileProgress | None, notify: Backoff) -> Tensor:
    n = inputs[0].shape[0]
    device = inputs[0].device
    total = len(plan)
    if total == 1:
        oom = None
        try:
            out = fn(*inputs)
        except Exception as e:  # noqa: BLE001 - OOM is re-raised as _TileOOM, others as is
            if not is_oom(e):
                raise
            oom = e
        if oom is not None:
            raise _TileOOM(oom)
        if progress:
            progress(1, 1)
        return out.float()
    tiles = plan.tiles
    weights = plan.weights(weighting)
    th, tw = plan.tile_h, plan.tile_w
    acc: Tensor | None = None
    wsum = torch.zeros((1, 1, plan.height, plan.width), dtype=torch.float32, device=device)
    i = 0
    while i < total:
        group = tiles[i:i + k]
        oom = None
        try:
            batch = [torch.cat([t[..., y:y + th, x:x + tw] for (y, x) in group]) for t in inputs]
            out = fn(*batch)
            del batch
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            oom = e
        if oom is not None:
            batch = out = None  # drop references before retrying
            _release(device)
            if k > 1:
                notify(f"out of memory with {k} tiles per batch; retrying with {k // 2}")
                k //= 2
                continue
            raise _TileOOM(oom)
        if out.shape[0] != len(group) * n or tuple(out.shape[-2:]) != (th, tw):
            raise ValueError(f"tiled fn returned {tuple(out.shape)}; expected ({len(group) * n}, C, {th}, {tw})")
        if acc is None:
            acc = torch.zeros((n, out.shape[1], plan.height, plan.width), dtype=torch.float32, device=device)
        for j, (y, x) in enumerate(group):
            w = weights[i + j].to(device)
            acc[..., y:y + th, x:x + tw] += out[j * n:(j + 1) * n].to(device=device, dtype=torch.float32) * w
            wsum[..., y:y + th, x:x + tw] += w
            if progress:
                progress(i + j + 1, total)
        i += len(group)
        del out
    assert acc is not None
    return acc / wsum


def repeat_for_tiles(extra: Tensor, batch: int) -> Tensor:
    """Repeat a per-image tensor (N, ...) for a tile batch of ``batch`` = k·N rows in
    :func:`tiled_call`'s tile-major order; a batch-1 tensor is returned unchanged."""
    if extra.shape[0] in (1, batch):
        return extra
    if batch % extra.shape[0]:
        raise ValueError(f"tile batch {batch} is not a multiple of {extra.shape[0]} images")
    return extra.repeat(batch // extra.shape[0], *([1] * (extra.dim() - 1)))


class TiledDenoiser:
    """A :class:`~.protocols.Denoiser` whose ``predict_eps`` tiles the latent.

    ``tile``/``overlap``: latent px. The latent is tiled only when its area exceeds
    tile² (the official trigger; ``tile=None`` never tiles). ε̂ of the tiles is blended
    (blending ε̂ or x0 is the same for one step: x0 is linear in ε̂ for a fixed x_t).
    ``control`` residuals are per tile: a CCSR sampler calls :func:`tiled_call` itself
    with a function running the control branch and the UNet on (x_t, condition) tiles.
    """

    def __init__(self, inner: Denoiser, tile: int | None = OFFICIAL_LATENT_TILE,
                 overlap: int = OFFICIAL_LATENT_OVERLAP, weighting: str = "cosine", batch_tiles: int = 1,
                 progress: TileProgress | None = None, on_backoff: Backoff | None = None,
                 official_geometry: bool = False) -> None:
        self.inner = inner
        self.tile = tile
        self.overlap = overlap
        self.weighting = weighting
        self.batch_tiles = batch_tiles
        self.progress = progress
        self.on_backoff = on_backoff
        self.official_geometry = official_geometry

    @property
    def alphas_cumprod(self) -> Tensor:
        return self.inner.alphas_cumprod

    def plan(self, height: int, width: int) -> TilePlan | None:
        """The plan for a (height, width) latent, or None when it is not tiled."""
        if self.tile is None or height * width <= self.tile * self.tile:
            return None
        if self.official_geometry:
            return TilePlan.official(height, width, self.tile, self.overlap)
        return TilePlan.build(height, width, self.tile, self.overlap)

    def predict_eps(self, x_t: Tensor, t: int, context: Tensor, control: object | None = None) -> Tensor:
        if control is not None:
            raise ValueError("TiledDenoiser cannot slice control residuals; run the control branch per tile "
                             "with tiled_call")
        plan = self.plan(*x_t.shape[-2:])
        if plan is None:
            return self.inner.predict_eps(x_t, t, context)

        def fn(x: Tensor) -> Tensor:
            return self.inner.predict_eps(x, t, repeat_for_tiles(context, x.shape[0]))

        return tiled_call(fn, [x_t], plan, self.weighting, self.batch_tiles, self.progress,
                          on_backoff=self.on_backoff)


# ======================================================================== tiled VAE
# Layout-neutral ops. ``module`` fields are the host's own modules (called, never
# re-implemented, so host weight casting / LoRA wrappers apply); GroupNorm is applied by
# the executor with whole-map statistics and the module's affine and eps.


@dataclass
class Conv:
    """A stride-1 conv whose module zero-pads kernel // 2 itself (3x3 pad 1, 1x1 pad 0)."""

    module: Callable[[Tensor], Tensor]
    kernel: int
    in_channels: int
    out_channels: int


@dataclass
class Norm:
    """A GroupNorm module: ``groups``, ``eps``, affine ``module.weight``/``module.bias``."""

    module: nn.Module
    groups: int
    eps: float
    channels: int


@dataclass
class Resnet:
    """out = (shortcut(x) + conv2(SiLU(norm2(conv1(SiLU(norm1(x))))))) / out_scale."""

    norm1: Norm
    conv1: Conv
    norm2: Norm
    conv2: Conv
    shortcut: Conv | None
    out_scale: float = 1.0


@dataclass
class Downsample:
    """Zero-pad one row/column at the bottom/right, then ``conv`` (3x3, stride 2, no padding)."""

    conv: Conv


@dataclass
class Upsample:
    """Nearest ×2, then ``conv`` (3x3, stride 1)."""

    conv: Conv


@dataclass
class Attention:
    """Single-map self-attention: out = (x + proj(SDPA(q, k, v))) / out_scale, q/k/v/proj
    pointwise callables on (N, C, h, w), ``heads`` heads of C/heads channels, softmax scale ``scale``."""

    norm: Norm
    q: Callable[[Tensor], Tensor]
    k: Callable[[Tensor], Tensor]
    v: Callable[[Tensor], Tensor]
    proj: Callable[[Tensor], Tensor]
    channels: int
    heads: int
    scale: float
    out_scale: float = 1.0


@dataclass
class NormActConv:
    """norm_out → SiLU → conv_out."""

    norm: Norm
    conv: Conv


Op = Conv | Resnet | Downsample | Upsample | Attention | NormActConv


@dataclass
class VAEOps:
    """The encoder and decoder of an SD-style VAE as op sequences.

    ``encoder``: pixels (N, 3, H, W) in [-1, 1] → moments (N, 2·latent_channels, H/8, W/8)
    (quant_conv included). ``decoder``: raw latent → pixels (post_quant_conv included).
    ``base_channels``: channels of the full-resolution stage (128 for SD).
    """

    encoder: list[Op]
    decoder: list[Op]
    latent_channels: int
    base_channels: int
    scale_factor: float
    device: torch.device
    dtype: torch.dtype
    layout: str


def _attr(module: Any, name: str) -> Any:
    """An attribute of a module or of the base layer a LoRA wrapper keeps."""
    if hasattr(module, name):
        return getattr(module, name)
    base = getattr(module, "base_layer", None)
    if base is not None and hasattr(base, name):
        return getattr(base, name)
    raise AttributeError(f"{type(module).__name__} has no {name!r}")


def _conv(module: nn.Module) -> Conv:
    k = _attr(module, "kernel_size")
    k = k[0] if isinstance(k, (tuple, list)) else int(k)
    pad = _attr(module, "padding")
    pad = pad[0] if isinstance(pad, (tuple, list)) else pad
    stride = _attr(module, "stride")
    stride = stride[0] if isinstance(stride, (tuple, list)) else stride
    if stride != 1 or pad != k // 2:
        raise ValueError(f"expected a stride-1 conv padded by kernel//2, got kernel {k}, stride {stride}, padding {pad}")
    return Conv(module, k, int(_attr(module, "in_channels")), int(_attr(module, "out_channels")))


def _down_conv(module: nn.Module) -> Conv:
    k = _attr(module, "kernel_size")
    stride = _attr(module, "stride")
    pad = _attr(module, "padding")
    if tuple(k) != (3, 3) or tuple(stride) != (2, 2) or tuple(pad) not in ((0, 0),):
        raise ValueError(f"expected the SD downsample conv (3x3, stride 2, padding 0), got {k}, {stride}, {pad}")
    return Conv(module, 3, int(_attr(module, "in_channels")), int(_attr(module, "out_channels")))


def _norm(module: nn.Module) -> Norm:
    return Norm(module, int(module.num_groups), float(module.eps), int(module.num_channels))


def _pointwise_linear(linear: nn.Module) -> Callable[[Tensor], Tensor]:
    def apply(t: Tensor) -> Tensor:
        return linear(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return apply


def _first_param(module: nn.Module) -> Tensor:
    for p in module.parameters():
        return p
    raise ValueError("the VAE has no parameters")


def vae_ops_diffusers(vae: nn.Module) -> VAEOps:
    """Op sequences of a diffusers ``AutoencoderKL`` (SD layout: DownEncoderBlock2D /
    UpDecoderBlock2D, one mid attention)."""
    enc, dec = vae.encoder, vae.decoder

    def resnet(r: nn.Module) -> Resnet:
        if getattr(r, "upsample", None) is not None or getattr(r, "downsample", None) is not None \
                or getattr(r, "time_emb_proj", None) is not None:
            raise ValueError("unsupported resnet block (up/down sampling or time embedding inside)")
        sc = r.conv_shortcut
        return Resnet(_norm(r.norm1), _conv(r.conv1), _norm(r.norm2), _conv(r.conv2),
                      _conv(sc) if sc is not None else None, float(r.output_scale_factor))

    def attention(a: nn.Module) -> Attention:
        if getattr(a, "spatial_norm", None) is not None or getattr(a, "norm_q", None) is not None \
                or not getattr(a, "residual_connection", True) or a.group_norm is None:
            raise ValueError("unsupported VAE attention variant")
        ch = int(a.group_norm.num_channels)
        return Attention(_norm(a.group_norm), _pointwise_linear(a.to_q), _pointwise_linear(a.to_k),
                         _pointwise_linear(a.to_v), _pointwise_linear(a.to_out[0]), ch, int(a.heads),
                         float(a.scale), float(a.rescale_output_factor))

    def mid(m: nn.Module) -> list[Op]:
        if len(m.attentions) != 1 or m.attentions[0] is None or len(m.resnets) != 2:
            raise ValueError("expected a mid block of resnet, attention, resnet")
        return [resnet(m.resnets[0]), attention(m.attentions[0]), resnet(m.resnets[1])]

    e: list[Op] = [_conv(enc.conv_in)]
    for block in enc.down_blocks:
        if getattr(block, "attentions", None):
            raise ValueError("down blocks with attention are not supported")
        e += [resnet(r) for r in block.resnets]
        if block.downsamplers:
            ds = block.downsamplers[0]
            if not ds.use_conv or ds.padding != 0 or getattr(ds, "norm", None) is not None:
                raise ValueError("expected SD's downsampler (conv, asymmetric padding)")
            e.append(Downsample(_down_conv(ds.conv)))
    e += mid(enc.mid_block)
    e.append(NormActConv(_norm(enc.conv_norm_out), _conv(enc.conv_out)))
    if getattr(vae, "quant_conv", None) is not None:
        e.append(_conv(vae.quant_conv))

    d: list[Op] = []
    if getattr(vae, "post_quant_conv", None) is not None:
        d.append(_conv(vae.post_quant_conv))
    d.append(_conv(dec.conv_in))
    d += mid(dec.mid_block)
    for block in dec.up_blocks:
        if getattr(block, "attentions", None):
            raise ValueError("up blocks with attention are not supported")
        d += [resnet(r) for r in block.resnets]
        if block.upsamplers:
            us = block.upsamplers[0]
            if not us.use_conv or us.use_conv_transpose or getattr(us, "norm", None) is not None:
                raise ValueError("expected SD's upsampler (nearest ×2 + conv)")
            d.append(Upsample(_conv(us.conv)))
    d.append(NormActConv(_norm(dec.conv_norm_out), _conv(dec.conv_out)))
    p = _first_param(vae)
    cfg = getattr(vae, "config", None)
    scale = float(getattr(cfg, "scaling_factor", None) or 0.18215) if cfg is not None else 0.18215
    latent = int(getattr(cfg, "latent_channels", 4)) if cfg is not None else 4
    return VAEOps(e, d, latent, _conv(enc.conv_in).out_channels, scale, p.device, p.dtype, "diffusers")


def vae_ops_ldm(first_stage_model: nn.Module, scale_factor: float = 0.18215) -> VAEOps:
    """Op sequences of an ldm-layout autoencoder (ComfyUI's ``first_stage_model``:
    ``encoder``/``decoder`` of comfy/ldm/modules/diffusionmodules/model.py plus
    ``quant_conv``/``post_quant_conv``)."""
    enc, dec = first_stage_model.encoder, first_stage_model.decoder

    def resnet(b: nn.Module) -> Resnet:
        if getattr(b, "temb_proj", None) is not None:
            raise ValueError("resnet blocks with a time embedding are not supported")
        sc = getattr(b, "nin_shortcut", None) or getattr(b, "conv_shortcut", None)
        return Resnet(_norm(b.norm1), _conv(b.conv1), _norm(b.norm2), _conv(b.conv2),
                      _conv(sc) if sc is not None else None, 1.0)

    def attention(a: nn.Module) -> Attention:
        ch = int(a.norm.num_channels)
        return Attention(_norm(a.norm), a.q, a.k, a.v, a.proj_out, ch, 1, ch ** -0.5, 1.0)

    def mid(m: nn.Module) -> list[Op]:
        return [resnet(m.block_1), attention(m.attn_1), resnet(m.block_2)]

    for part in (enc, dec):
        if getattr(part, "give_pre_end", False) or getattr(part, "tanh_out", False):
            raise ValueError("decoders with give_pre_end / tanh_out are not supported")
    e: list[Op] = [_conv(enc.conv_in)]
    for i, level in enumerate(enc.down):
        if len(level.attn) > 0:
            raise ValueError("encoder levels with attention are not supported")
        e += [resnet(b) for b in level.block]
        if hasattr(level, "downsample"):
            e.append(Downsample(_down_conv(level.downsample.conv)))
    e += mid(enc.mid)
    e.append(NormActConv(_norm(enc.norm_out), _conv(enc.conv_out)))
    if getattr(first_stage_model, "quant_conv", None) is not None:
        e.append(_conv(first_stage_model.quant_conv))

    d: list[Op] = []
    if getattr(first_stage_model, "post_quant_conv", None) is not None:
        d.append(_conv(first_stage_model.post_quant_conv))
    d.append(_conv(dec.conv_in))
    d += mid(dec.mid)
    for i_level in reversed(range(len(dec.up))):
        level = dec.up[i_level]
        if len(level.attn) > 0:
            raise ValueError("decoder levels with attention are not supported")
        d += [resnet(b) for b in level.block]
        if i_level != 0:
            d.append(Upsample(_conv(level.upsample.conv)))
    d.append(NormActConv(_norm(dec.norm_out), _conv(dec.conv_out)))
    p = _first_param(first_stage_model)
    latent = _conv(dec.conv_in).in_channels
    return VAEOps(e, d, latent, _conv(enc.conv_in).out_channels, float(scale_factor), p.device, p.dtype, "ldm")


def vae_ops(vae: Any, scale_factor: float | None = None) -> VAEOps:
    """Op sequences of a VAE in either layout: a diffusers ``AutoencoderKL`` (or an object
    whose ``.vae`` is one, e.g. :class:`~.diffusers_host.DiffusersSD21`), or an ldm
    autoencoder (``encoder.down``/``decoder.up``: ComfyUI's ``first_stage_model``)."""
    if isinstance(vae, VAEOps):
        return vae
    host_scale = getattr(vae, "scale_factor", None)
    module = vae.vae if hasattr(vae, "vae") and isinstance(vae.vae, nn.Module) else vae
    if hasattr(module, "encoder") and hasattr(module.encoder, "down_blocks"):
        ops = vae_ops_diffusers(module)
    elif hasattr(module, "encoder") and hasattr(module.encoder, "down"):
        ops = vae_ops_ldm(module)
    else:
        raise ValueError(f"{type(module).__name__} is neither a diffusers AutoencoderKL nor an ldm autoencoder")
    sf = scale_factor if scale_factor is not None else host_scale
    if isinstance(sf, (int, float)) and not isinstance(sf, bool):
        ops.scale_factor = float(sf)
    return ops


# ------------------------------------------------------------------------- windows


@dataclass
class _Win:
    """A tile tensor (N, C, h, w) at (y, x) of a map of H × W px; holds only exact values."""

    t: Tensor
    y: int
    x: int
    H: int
    W: int

    @property
    def y1(self) -> int:
        return self.y + self.t.shape[-2]

    @property
    def x1(self) -> int:
        return self.x + self.t.shape[-1]

    def crop(self, y0: int, y1: int, x0: int, x1: int) -> "_Win":
        if not (self.y <= y0 <= y1 <= self.y1 and self.x <= x0 <= x1 <= self.x1):
            raise AssertionError(f"tile window [{self.y},{self.y1})×[{self.x},{self.x1}) does not cover "
                                 f"[{y0},{y1})×[{x0},{x1}) (halo too small)")
        return _Win(self.t[..., y0 - self.y:y1 - self.y, x0 - self.x:x1 - self.x], y0, x0, self.H, self.W)


def _w_conv(w: _Win, conv: Conv) -> _Win:
    """The module pads with zeros: exact at map borders, wrong within kernel//2 of an inner
    window edge, which is cropped off."""
    return _inner(_Win(conv.module(w.t), w.y, w.x, w.H, w.W), conv.kernel // 2)


def _inner(out: _Win, p: int) -> _Win:
    """``out`` without the ``p`` px next to inner window edges (where zero padding made them wrong)."""
    if p == 0:
        return out
    return out.crop(out.y + (p if out.y > 0 else 0), out.y1 - (p if out.y1 < out.H else 0),
                    out.x + (p if out.x > 0 else 0), out.x1 - (p if out.x1 < out.W else 0))


def _need_conv(r: Rect, p: int, size: tuple[int, int]) -> Rect:
    y0, y1, x0, x1 = r
    return max(0, y0 - p), min(size[0], y1 + p), max(0, x0 - p), min(size[1], x1 + p)


def _w_down(w: _Win, conv: Conv) -> _Win:
    """Asymmetric zero pad (bottom/right, only where the window reaches the map edge) + stride-2 conv."""
    oy, ox = -(-w.y // 2), -(-w.x // 2)
    t = w.t[..., 2 * oy - w.y:, 2 * ox - w.x:]
    pb, pr = int(w.y1 == w.H), int(w.x1 == w.W)
    if pb or pr:
        t = F.pad(t, (0, pr, 0, pb))
    return _Win(conv.module(t), oy, ox, w.H // 2, w.W // 2)


def _need_down(r: Rect, size: tuple[int, int]) -> Rect:
    y0, y1, x0, x1 = r
    return 2 * y0, min(size[0], 2 * y1 + 1), 2 * x0, min(size[1], 2 * x1 + 1)


_FOLD_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[Any, Tensor]]" = weakref.WeakKeyDictionary()


def _folded_up_kernel(module: nn.Module, like: Tensor) -> Tensor | None:
    """The 4×4 stride-2 transposed-conv kernel equal to nearest ×2 then ``module`` (a plain 3×3
    conv; :func:`.perf.fold_kernel`) for windows like ``like``, or None where the fold does not
    apply: small windows (:data:`.perf.FOLD_MIN_PIXELS`), weights cast or patched at run time
    (ComfyUI's low-VRAM ops), another device or dtype. In ``like``'s memory layout (a
    channels-last kernel for channels-last windows). Cached per module and weight version."""
    from . import perf

    w = getattr(module, "weight", None)
    if (type(module).forward is not nn.Conv2d.forward and not hasattr(module, "comfy_cast_weights")) \
            or not isinstance(module, nn.Conv2d) or w is None or getattr(module, "comfy_cast_weights", False) \
            or getattr(module, "weight_function", None) or getattr(module, "bias_function", None) \
            or w.device != like.device or w.dtype != like.dtype \
            or like.shape[-2] * like.shape[-1] < perf.FOLD_MIN_PIXELS:
        return None
    if (tuple(module.kernel_size) != (3, 3) or tuple(module.stride) != (1, 1) or tuple(module.padding) != (1, 1)
            or tuple(module.dilation) != (1, 1) or module.groups != 1 or module.padding_mode != "zeros"):
        return None
    cl = like.dim() == 4 and like.shape[1] > 1 and like.stride(1) == 1  # channels innermost
    key = (w._version, w.data_ptr(), w.dtype, w.device, cl)
    hit = _FOLD_CACHE.get(module)
    if hit is None or hit[0] != key:
        k = perf.fold_kernel(w.detach())
        hit = (key, k.contiguous(memory_format=torch.channels_last) if cl else k)
        _FOLD_CACHE[module] = hit
    return hit[1]


def _w_up(w: _Win, conv: Conv) -> _Win:
    """Nearest ×2 then the 3×3 conv; as one folded transposed conv where it applies (same values
    up to float summation order, 16 instead of 36 multiply-adds per output px and channel pair,
    and no 4× larger upsampled window). Both are wrong only next to inner window edges."""
    k = _folded_up_kernel(conv.module, w.t)
    if k is not None:
        t = F.conv_transpose2d(w.t, k, conv.module.bias, stride=2, padding=1)
        return _inner(_Win(t, 2 * w.y, 2 * w.x, 2 * w.H, 2 * w.W), 1)
    t = F.interpolate(w.t, scale_factor=2.0, mode="nearest")
    return _w_conv(_Win(t, 2 * w.y, 2 * w.x, 2 * w.H, 2 * w.W), conv)


def _need_up(r: Rect, size: tuple[int, int]) -> Rect:
    """r at the upsampled (2H × 2W) map → rows/cols of the H × W input."""
    y0, y1, x0, x1 = _need_conv(r, 1, (2 * size[0], 2 * size[1]))
    return y0 // 2, (y1 + 1) // 2, x0 // 2, (x1 + 1) // 2


def _w_norm(w: _Win, norm: Norm, mean: Tensor, rstd: Tensor, act: bool) -> _Win:
    """GroupNorm with whole-map (mean, 1/std) per (image, group), in fp32, then SiLU if ``act``:
    x·a + b with a = rstd·γ, b = β − mean·rstd·γ per (image, channel)."""
    t = w.t
    n, c = t.shape[:2]
    per = c // norm.groups
    dev = t.device
    a = rstd.to(dev).repeat_interleave(per, dim=1)  # (N, C)
    b = -mean.to(dev).repeat_interleave(per, dim=1) * a
    weight = getattr(norm.module, "weight", None)
    bias = getattr(norm.module, "bias", None)
    if weight is not None:
        gamma = weight.detach().to(dev, torch.float32)[None]
        a, b = a * gamma, b * gamma
    if bias is not None:
        b = b + bias.detach().to(dev, torch.float32)[None]
    out = torch.addcmul(b[:, :, None, None], t.float(), a[:, :, None, None])
    out = out.to(t.dtype)
    if act:
        out = F.silu(out, inplace=True)
    return _Win(out, w.y, w.x, w.H, w.W)


def _w_add(a: _Win, b: _Win, scale: float) -> _Win:
    """(a + b) / scale over the common rectangle (diffusers' order: shortcut + hidden)."""
    y0, y1 = max(a.y, b.y), min(a.y1, b.y1)
    x0, x1 = max(a.x, b.x), min(a.x1, b.x1)
    a, b = a.crop(y0, y1, x0, x1), b.crop(y0, y1, x0, x1)
    t = a.t + b.t
    if scale != 1.0:
        t = t / scale
    return _Win(t, y0, x0, a.H, a.W)


# -------------------------------------------------------------------- statistics


class _Stats:
    """Per-(image, group) count, mean, M2 over tile interiors, merged in fp64 (Chan et al.).

    A tile gives per-(image, channel) mean and M2 = Σ(x − mean)² in two passes over it in
    fp32 (any memory layout, no copy); its channels merge into groups and the tiles into the
    whole map in fp64, so nothing is computed as a difference of large sums."""

    def __init__(self, n: int, groups: int) -> None:
        self.groups = groups
        self.count = 0
        self.mean = torch.zeros(n, groups, dtype=torch.float64)
        self.m2 = torch.zeros(n, groups, dtype=torch.float64)

    def add(self, t: Tensor) -> None:
        n, c, h, w = t.shape
        px = h * w
        if px == 0:
            return
        tf = t.float()
        mean_c = _channel_sums(tf) / px
        m2_c = _channel_sums((tf - mean_c[:, :, None, None]).square_()).double().cpu().view(n, self.groups, -1)
        mean_c = mean_c.double().cpu().view(n, self.groups, -1)
        mean_b = mean_c.mean(dim=-1)  # every channel of a group has the same count
        m2_b = m2_c.sum(dim=-1) + px * (mean_c - mean_b[..., None]).square().sum(dim=-1)
        cnt_b = px * (c // self.groups)
        tot = self.count + cnt_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (cnt_b / tot)
        self.m2 = self.m2 + m2_b + delta * delta * (self.count * cnt_b / tot)
        self.count = tot

    def result(self) -> tuple[Tensor, Tensor]:
        """(mean, biased variance), float64 (N, G)."""
        return self.mean, self.m2 / max(1, self.count)


def _channel_sums(t: Tensor) -> Tensor:
    """Σ over (h, w) per (image, channel) of a 4-D float tensor, as (N, C). A cropped
    channels-last window on the CPU is summed by matrix products over its rows (as it lies,
    no copy): torch's reduction over the two outer dims of such a view measured about 20x
    slower (a 128-channel 1024² window: 0.6 s against 25 ms)."""
    n, c, h, w = t.shape
    if t.device.type == "cpu" and c > 1 and t.stride(1) == 1 and not t.is_contiguous(memory_format=torch.channels_last):
        ones = t.new_ones(h, 1, w)
        return torch.stack([torch.bmm(ones, t[i].permute(1, 2, 0)).sum(dim=(0, 1)) for i in range(n)])
    return t.sum(dim=(2, 3))


def _mean_rstd(stats: tuple[Tensor, Tensor], eps: float) -> tuple[Tensor, Tensor]:
    mean, var = stats
    return mean.float(), (1.0 / torch.sqrt(var + eps)).float()


# ---------------------------------------------------------------------- executor


@dataclass
class _Stored:
    """A whole feature map (N, C, H, W) in the store (memory or disk), with GroupNorm stats by group count."""

    m: FeatureMap
    stats: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    fin: Any = None  # weakref.finalize of its byte accounting
    owned: bool = True  # False for the caller's input: never written in place

    @property
    def size(self) -> tuple[int, int]:
        return int(self.m.shape[-2]), int(self.m.shape[-1])


@dataclass
class _Lazy:
    """A tile step not yet run: ``body`` maps windows of ``sources`` to an output window;
    ``need`` maps an output rect to the rect each source must supply; ``work``: elements
    touched per output px (tile sizing)."""

    sources: list[_Stored]
    body: Callable[[list[_Win]], _Win]
    need: Callable[[Rect], list[Rect]]
    size: tuple[int, int]
    channels: int
    work: float
    identity: bool = False
    inplace: _Stored | None = None  # write the output over this map (read only at halo 0)


def _then(lz: _Lazy, fn: Callable[[_Win], _Win], need: Callable[[Rect], Rect], size: tuple[int, int],
          channels: int, work: float) -> _Lazy:
    body, need0 = lz.body, lz.need
    return _Lazy(lz.sources, lambda ws: fn(body(ws)), lambda r: need0(need(r)), size, channels, work)


_KV_SLAB_ELEMS = 1 << 22
"""Elements of one read of attention keys and values (all three of Q, K, V channels): 16 MB in fp32."""


class _KV:
    """Keys and values of a whole attention map, on the device or streamed in chunks."""

    def __init__(self, qkv: _Stored, op: Attention, device: torch.device, dtype: torch.dtype,
                 budget_elems: float) -> None:
        self.qkv, self.op, self.device, self.dtype = qkv, op, device, dtype
        n, _, h, w = qkv.m.shape
        c = op.channels
        self.resident = 2 * n * h * w * c <= budget_elems
        if self.resident:
            self.k, self.v = self._keys_values(0, h)
        rows = h if self.resident else max(1, int(budget_elems // max(1, 2 * n * w * c)))
        self.chunk_rows = min(h, rows)
        self.budget_elems = budget_elems

    def _keys_values(self, r0: int, r1: int) -> tuple[Tensor, Tensor]:
        """K and V of map rows r0:r1 in head layout (N, heads, rows·w, d), contiguous. Read
        from the store in slabs of a few rows (the disk store keeps a pixel's channels together:
        a slab's read holds all of Q, K and V) and copied straight into place, so the only
        buffers as large as the chunk are K and V themselves."""
        c, heads = self.op.channels, self.op.heads
        n, _, _, w = self.qkv.m.shape
        d = c // heads
        k = torch.empty(n, heads, (r1 - r0) * w, d, dtype=self.dtype, device=self.device)
        v = torch.empty_like(k)
        step = max(1, _KV_SLAB_ELEMS // max(1, n * w * 3 * c))
        for a in range(r0, r1, step):
            b = min(r1, a + step)
            kv = self.qkv.m.read(a, b, 0, w, c, 3 * c, device=self.device, channels_last=True)
            dst = slice((a - r0) * w, (b - r0) * w)
            k[:, :, dst].copy_(self._heads_view(kv[:, :c]))
            v[:, :, dst].copy_(self._heads_view(kv[:, c:]))
        return k, v

    def _heads_view(self, t: Tensor) -> Tensor:
        """(N, C, rows, w) → (N, heads, rows·w, d), a view where the layout allows (channels
        innermost, as the disk store and channels-last maps give them), else a copy."""
        n, c, h, w = t.shape
        heads = self.op.heads
        d = c // heads
        if t.stride(1) == 1:
            return t.permute(0, 2, 3, 1).reshape(n, h * w, heads, d).transpose(1, 2)
        return t.reshape(n, heads, d, h * w).transpose(2, 3)

    def attend(self, q: Tensor) -> Tensor:
        """q (N, heads, L_q, d) → attention output (N, heads, L_q, d)."""
        if self.resident:
            return F.scaled_dot_product_attention(q, self.k, self.v, scale=self.op.scale)
        _, _, h, w = self.qkv.m.shape
        qf = q.float()
        m = torch.full(q.shape[:-1] + (1,), -math.inf, device=q.device)
        s_sum = torch.zeros_like(m)
        acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        # queries in blocks so that a block's scores and probabilities (2 · rows of it × keys of a
        # chunk) stay within the budget too: they, not K/V, are the largest buffers here
        keys = self.chunk_rows * w * q.shape[0] * q.shape[1]
        qb = max(1, int(self.budget_elems // max(1, 2 * keys)))
        for r0 in range(0, h, self.chunk_rows):
            k, v = (t.float() for t in self._keys_values(r0, min(h, r0 + self.chunk_rows)))
            for q0 in range(0, q.shape[-2], qb):
                blk = slice(q0, min(q.shape[-2], q0 + qb))
                s = torch.matmul(qf[..., blk, :], k.transpose(-1, -2)).mul_(self.op.scale)
                m_old = m[..., blk, :]
                m_new = torch.maximum(m_old, s.amax(dim=-1, keepdim=True))
                p = torch.exp(s.sub_(m_new))
                del s
                corr = torch.exp(m_old - m_new)
                s_sum[..., blk, :] = s_sum[..., blk, :] * corr + p.sum(dim=-1, keepdim=True)
                acc[..., blk, :] = acc[..., blk, :] * corr + torch.matmul(p, v)
                m[..., blk, :] = m_new
                del p
        return (acc / s_sum).to(q.dtype)


def default_channels_last(device: torch.device | str) -> bool:
    """Whether the tiled VAE computes channels-last by default on ``device``: on the CPU yes
    (full-size SD VAE, 1024², 512-px tiles, 2 threads: decode 0.84x, encode 0.72x of the
    channels-first time with the maps in memory; 0.76x / 0.86x with the disk store), on
    CUDA no (channels-last convolutions measured slower there)."""
    return torch.device(device).type == "cpu"


def store_device_for(device: torch.device | str, store_device: torch.device | str | None = None) -> torch.device:
    """Where the tiled VAE's whole feature maps live: ``store_device`` if given, else the CPU
    when computing on a GPU, else the compute device."""
    if store_device is not None:
        return torch.device(store_device)
    dev = torch.device(device)
    return torch.device("cpu") if dev.type == "cuda" else dev


def _freed(ex: "weakref.ref[VAEExecutor]", nbytes: int, disk: bool) -> None:
    e = ex()
    if e is not None:
        if disk:
            e.disk_bytes -= nbytes
        else:
            e.store_bytes -= nbytes


class VAEExecutor:
    """Runs an op sequence (:class:`VAEOps` encoder or decoder) tile by tile.

    ``tile_elems``: working-set size of one tile step in elements (≈ tile px² × channels
    touched, see :meth:`side`); the tile side of each step follows from it, so every step
    uses about the same memory whatever its resolution. ``store_device``/``store_dtype``:
    where the whole feature maps between steps live (default: the CPU when computing on a
    GPU, else the compute device; the compute dtype). ``store``: "memory" keeps them as
    tensors on ``store_device``; "disk" keeps them in files of a private folder under
    ``scratch_dir`` (default: the system temp folder, removed after the run), so that
    memory grows with the tile and not with the image (:mod:`.feature_store`; the
    caller's input and the returned output stay in memory). ``kv_elems``: largest K+V of the
    mid attention kept on the device (else streamed in chunks). ``progress(done, total)``
    after every tile step. Peak bytes of stored maps in memory: :attr:`peak_store_bytes`;
    on disk: :attr:`peak_disk_bytes`.
    ``inplace``: a resnet's second step and the attention output read their residual
    input only at the tile's own rectangle, so they write over it instead of allocating
    (one whole map less at the peak; the results are the same).
    ``channels_last``: tiles are computed, and the maps between steps kept, in
    ``torch.channels_last`` layout (the disk store's own layout, so its windows need no
    transposition); the same values up to float summation order. Pays on the CPU (oneDNN's
    convolutions and the folded upsampling run faster on it), not on CUDA (see
    :func:`default_channels_last`).
    """

    def __init__(self, device: torch.device | str, dtype: torch.dtype, tile_elems: float, *,
                 store_device: torch.device | str | None = None, store_dtype: torch.dtype | None = None,
                 kv_elems: float | None = None, progress: TileProgress | None = None,
                 on_backoff: Backoff | None = None, inplace: bool = True, store: str = "memory",
                 scratch_dir: str | Any = None, channels_last: bool = False) -> None:
        if store not in ("memory", "disk"):
            raise ValueError(f"store must be memory or disk, got {store!r}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.tile_elems = float(tile_elems)
        self.store_device = store_device_for(self.device, store_device)
        self.store_dtype = store_dtype or dtype
        self.kv_elems = float(kv_elems) if kv_elems is not None else max(self.tile_elems, 2.0 ** 26)
        self.progress = progress
        self.on_backoff = on_backoff or _warn_backoff
        self.inplace = inplace
        self.channels_last = bool(channels_last)
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.frozen_stats: list[tuple[Tensor, Tensor]] | None = None
        self.recorded_stats: list[tuple[Tensor, Tensor]] = []
        self.store, self.scratch_dir = store, scratch_dir
        self._scratch: ScratchDir | None = None
        self.store_bytes = 0
        self.peak_store_bytes = 0
        self.disk_bytes = 0
        self.peak_disk_bytes = 0
        self.tiles_run = 0
        self._done = 0
        self._total = 0

    # -- geometry ----------------------------------------------------------------
    def side(self, work: float) -> int:
        """Tile side (px of the step's output map) for a step touching ``work`` elements per px."""
        if not math.isfinite(self.tile_elems):
            return 1 << 30
        s = int(math.sqrt(self.tile_elems / max(work, 1.0)))
        if s >= 16:
            s -= s % 8
        return max(MIN_VAE_SIDE, s)

    # -- stored maps ------------------------------------------------------------
    def _store(self, m: FeatureMap, nbytes: int | None = None) -> _Stored:
        """Account ``nbytes`` (default: m's, newly allocated) as alive until ``m`` is collected."""
        disk = isinstance(m, DiskMap)
        if nbytes is None:
            nbytes = m.nbytes
            if disk:
                self.disk_bytes += nbytes
                self.peak_disk_bytes = max(self.peak_disk_bytes, self.disk_bytes)
            else:
                self.store_bytes += nbytes
                self.peak_store_bytes = max(self.peak_store_bytes, self.store_bytes)
        return _Stored(m, fin=weakref.finalize(m, _freed, weakref.ref(self), nbytes, disk))

    def _new_map(self, shape: tuple[int, int, int, int], final: bool) -> FeatureMap:
        """An empty map for a step's output: on disk in disk mode (the run's output: in memory)."""
        if self.store == "disk" and not final:
            if self._scratch is None:
                self._scratch = ScratchDir(self.scratch_dir)
            return DiskMap.create(self._scratch, shape, self.store_dtype)
        fmt = torch.contiguous_format if final else self.memory_format  # the run's output: plain layout
        return MemoryMap(torch.empty(shape, dtype=self.store_dtype, device=self.store_device, memory_format=fmt))

    def _over(self, base: _Stored, channels: int) -> _Stored:
        """A map of ``channels`` written over ``base``'s storage (its first channels)."""
        detached = base.fin.detach()
        nbytes = detached[2][1] if detached else 0
        return self._store(base.m.head(channels), nbytes)

    def _source(self, s: _Stored) -> _Lazy:
        return _Lazy([s], lambda ws: ws[0], lambda r: [r], s.size, int(s.m.shape[1]), float(s.m.shape[1]),
                     identity=True)

    def _take_stats(self, stats: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        if self.frozen_stats is not None:
            return self.frozen_stats[len(self.recorded_stats) - 1]
        return stats

    def materialize(self, lz: _Lazy, groups: int | None, final: bool = False) -> _Stored:
        """Run a tile step over its whole output map; accumulate GroupNorm stats for ``groups``.
        ``final``: the run's output (kept in memory whatever the store)."""
        if lz.identity and (groups is None or groups in lz.sources[0].stats) and not final:
            self._tick()
            return lz.sources[0]
        h, w = lz.size
        n = lz.sources[0].m.shape[0]
        while True:
            side = self.side(lz.work)
            oom = None
            try:
                if lz.inplace is not None and not final:
                    stored = self._over(lz.inplace, lz.channels)
                else:
                    stored = self._store(self._new_map((n, lz.channels, h, w), final))
                out = stored.m
                acc = _Stats(n, groups) if groups else None
                for y0 in range(0, h, side):
                    for x0 in range(0, w, side):
                        r = (y0, min(h, y0 + side), x0, min(w, x0 + side))
                        wins = []
                        for src, (a0, a1, b0, b1) in zip(lz.sources, lz.need(r)):
                            t = src.m.read(a0, a1, b0, b1, device=self.device, channels_last=self.channels_last)
                            t = t.to(self.dtype).contiguous(memory_format=self.memory_format)
                            wins.append(_Win(t, a0, b0, *src.size))
                        res = lz.body(wins).crop(*r).t.to(self.store_dtype)
                        del wins
                        if acc is not None:
                            acc.add(res)
                        out.write(*r, res)
                        del res
                        self.tiles_run += 1
            except Exception as e:  # noqa: BLE001 - only OOM is handled
                if not is_oom(e) or side <= MIN_VAE_SIDE:
                    raise
                oom = e
            if oom is None:
                break
            stored = out = acc = wins = res = None  # noqa: F841 - drop references before retrying
            _release(self.device)
            self.tile_elems /= 4.0
            self.on_backoff(f"out of memory in a VAE tile step with {side} px tiles; retrying with "
                            f"{self.side(lz.work)} px tiles")
        del out
        if acc is not None:
            stats = acc.result()
            self.recorded_stats.append(stats)
            stored.stats[groups] = self._take_stats(stats)
        self._tick()
        return stored

    def _tick(self) -> None:
        self._done += 1
        if self.progress:
            self.progress(min(self._done, self._total), self._total)

    # -- op builders ----------------------------------------------------------------
    def _conv(self, lz: _Lazy, op: Conv) -> _Lazy:
        p = op.kernel // 2
        size = lz.size
        return _then(lz, lambda w: _w_conv(w, op), lambda r: _need_conv(r, p, size), size, op.out_channels,
                     lz.work + op.in_channels + op.out_channels)

    def _down(self, lz: _Lazy, op: Downsample) -> _Lazy:
        size = lz.size
        out = (size[0] // 2, size[1] // 2)
        return _then(lz, lambda w: _w_down(w, op.conv), lambda r: _need_down(r, size), out, op.conv.out_channels,
                     4 * lz.work + op.conv.out_channels)

    def _up(self, lz: _Lazy, op: Upsample) -> _Lazy:
        size = lz.size
        out = (size[0] * 2, size[1] * 2)
        return _then(lz, lambda w: _w_up(w, op.conv), lambda r: _need_up(r, size), out, op.conv.out_channels,
                     lz.work / 4 + 2 * op.conv.in_channels + op.conv.out_channels)

    def _norm_conv(self, x: _Stored, norm: Norm, conv: Conv) -> _Lazy:
        mean, rstd = _mean_rstd(x.stats[norm.groups], norm.eps)
        p = conv.kernel // 2
        size = x.size

        def body(ws: list[_Win]) -> _Win:
            return _w_conv(_w_norm(ws[0], norm, mean, rstd, act=True), conv)

        return _Lazy([x], body, lambda r: [_need_conv(r, p, size)], size, conv.out_channels,
                     2.0 * norm.channels + conv.out_channels)

    def _res_b(self, x: _Stored, h: _Stored, op: Resnet) -> _Lazy:
        mean, rstd = _mean_rstd(h.stats[op.norm2.groups], op.norm2.eps)
        p = op.conv2.kernel // 2
        ps = op.shortcut.kernel // 2 if op.shortcut is not None else 0
        size = x.size

        def body(ws: list[_Win]) -> _Win:
            hh = _w_conv(_w_norm(ws[0], op.norm2, mean, rstd, act=True), op.conv2)
            xs = _w_conv(ws[1], op.shortcut) if op.shortcut is not None else ws[1]
            return _w_add(xs, hh, op.out_scale)

        c_in, c_out = op.conv1.in_channels, op.conv2.out_channels
        # on disk only over a map of as many channels: a narrower view of a file would be read
        # with the strides of the wider one (more bytes, one more copy)
        fits = c_out == c_in or (c_out < c_in and self.store == "memory")
        inplace = x if (self.inplace and x.owned and ps == 0 and fits) else None
        return _Lazy([h, x], body, lambda r: [_need_conv(r, p, size), _need_conv(r, ps, size)], size, c_out,
                     2.0 * op.norm2.channels + c_in + 3.0 * c_out, inplace=inplace)

    def _qkv(self, x: _Stored, op: Attention) -> _Lazy:
        mean, rstd = _mean_rstd(x.stats[op.norm.groups], op.norm.eps)

        def body(ws: list[_Win]) -> _Win:
            nw = _w_norm(ws[0], op.norm, mean, rstd, act=False)
            return _Win(torch.cat([op.q(nw.t), op.k(nw.t), op.v(nw.t)], dim=1), nw.y, nw.x, nw.H, nw.W)

        return _Lazy([x], body, lambda r: [r], x.size, 3 * op.channels, 6.0 * op.channels)

    def _attn_out(self, qkv: _Stored, x: _Stored, op: Attention) -> _Lazy:
        kv = _KV(qkv, op, self.device, self.dtype, self.kv_elems)
        c, heads = op.channels, op.heads
        d = c // heads

        def body(ws: list[_Win]) -> _Win:
            qw, xw = ws
            n, _, h, w = qw.t.shape
            q = qw.t[:, :c].reshape(n, heads, d, h * w).transpose(2, 3).contiguous()
            o = kv.attend(q).transpose(2, 3).reshape(n, c, h, w).to(qw.t.dtype)
            o = op.proj(o)
            t = o + xw.t
            if op.out_scale != 1.0:
                t = t / op.out_scale
            return _Win(t, qw.y, qw.x, qw.H, qw.W)

        inplace = x if (self.inplace and x.owned) else None
        return _Lazy([qkv, x], body, lambda r: [r, r], x.size, c, 8.0 * c, inplace=inplace)

    # -- run --------------------------------------------------------------------
    @staticmethod
    def count_steps(ops: Sequence[Op]) -> int:
        """Tile steps (progress units) of an op sequence."""
        n = 1
        for op in ops:
            n += 2 if isinstance(op, (Resnet, Attention)) else 1 if isinstance(op, NormActConv) else 0
        return n

    @torch.no_grad()
    def run(self, ops: Sequence[Op], x: Tensor) -> Tensor:
        """Apply ``ops`` to ``x`` (N, C, H, W); returns the output on the store device."""
        self._done, self._total = 0, self.count_steps(ops)
        self.recorded_stats = []
        try:
            return self._run(ops, x)
        finally:
            if self._scratch is not None:
                self._scratch.close()
                self._scratch = None

    def _run(self, ops: Sequence[Op], x: Tensor) -> Tensor:
        first = self._store(MemoryMap(x.to(self.store_device, self.store_dtype)))
        first.owned = False
        cur = self._source(first)
        for op in ops:
            if isinstance(op, Conv):
                cur = self._conv(cur, op)
            elif isinstance(op, Downsample):
                cur = self._down(cur, op)
            elif isinstance(op, Upsample):
                cur = self._up(cur, op)
            elif isinstance(op, Resnet):
                xs = self.materialize(cur, op.norm1.groups)
                cur = None
                hs = self.materialize(self._norm_conv(xs, op.norm1, op.conv1), op.norm2.groups)
                cur = self._res_b(xs, hs, op)
                del xs, hs
            elif isinstance(op, Attention):
                xs = self.materialize(cur, op.norm.groups)
                cur = None
                qkv = self.materialize(self._qkv(xs, op), None)
                cur = self._attn_out(qkv, xs, op)
                del xs, qkv
            elif isinstance(op, NormActConv):
                xs = self.materialize(cur, op.norm.groups)
                cur = None
                cur = self._norm_conv(xs, op.norm, op.conv)
                del xs
            else:
                raise TypeError(f"unknown op {type(op).__name__}")
        out = self.materialize(cur, None, final=True)
        cur = None
        return out.m.tensor()


# ------------------------------------------------------------- store estimate


def estimate_vae_store_bytes(ops: Sequence[Op], shape: tuple[int, int, int, int], element_size: int = 4,
                             inplace: bool = True) -> int:
    """Peak bytes of whole feature maps the executor keeps for ``ops`` on an input of
    ``shape`` (N, C, H, W) (image px for the encoder, latent px for the decoder), the
    caller's input included: the part of the memory that grows with the image, held on
    the store device (the CPU when computing on a GPU). Mirrors :meth:`VAEExecutor.run`."""
    n = shape[0]
    alive: dict[int, int] = {}
    peak = 0

    def new(channels: int, size: tuple[int, int]) -> int:
        nonlocal peak
        key = len(alive) + 1 + max(alive, default=0)
        alive[key] = n * channels * size[0] * size[1] * element_size
        peak = max(peak, sum(alive.values()))
        return key

    inp = new(shape[1], (shape[2], shape[3]))
    cur = {"src": [inp], "over": None, "identity": True, "ch": shape[1], "size": (shape[2], shape[3])}

    def materialize(lz: dict) -> int:
        if lz["identity"]:
            return lz["src"][0]
        key = lz["over"] if lz["over"] is not None else new(lz["ch"], lz["size"])
        for k in lz["src"]:
            if k not in (key, inp):
                alive.pop(k, None)
        return key

    def local(lz: dict, ch: int, size: tuple[int, int]) -> dict:
        return {**lz, "over": None, "identity": False, "ch": ch, "size": size}

    for op in ops:
        size = cur["size"]
        if isinstance(op, Conv):
            cur = local(cur, op.out_channels, size)
        elif isinstance(op, Downsample):
            cur = local(cur, op.conv.out_channels, (size[0] // 2, size[1] // 2))
        elif isinstance(op, Upsample):
            cur = local(cur, op.conv.out_channels, (size[0] * 2, size[1] * 2))
        elif isinstance(op, Resnet):
            x = materialize(cur)
            h = new(op.conv1.out_channels, size)
            c_in, c_out = op.conv1.in_channels, op.conv2.out_channels
            ok = inplace and x != inp and (op.shortcut is None or op.shortcut.kernel == 1) and c_out <= c_in
            cur = {"src": [h, x], "over": x if ok else None, "identity": False, "ch": c_out, "size": size}
        elif isinstance(op, Attention):
            x = materialize(cur)
            q = new(3 * op.channels, size)
            ok = inplace and x != inp
            cur = {"src": [q, x], "over": x if ok else None, "identity": False, "ch": op.channels, "size": size}
        elif isinstance(op, NormActConv):
            x = materialize(cur)
            cur = {"src": [x], "over": None, "identity": False, "ch": op.conv.out_channels, "size": size}
    materialize(cur)
    return int(peak)


# --------------------------------------------------------------------- cost model


@dataclass(frozen=True)
class CostModel:
    """Bytes of the tile working set, measured on the full-size SD 2.1 architecture.

    Measured with ``python bench/tiling_bench.py --cost-model`` (CPU, fp32, random
    weights, one child process per point, 1 thread; "extra" = peak RSS from ``getrusage``
    minus the RSS just before the call, weights excluded):

    ============================  =========================================================
    UNet, one tile of t² latent   t = 16: 153 MB, 32: 175 MB, 48: 213 MB, 64: 246 MB
    VAE decode 384², tiles T px   extra − stored maps (252 MB): T = 64: 100 MB,
                                  128: 114 MB, 256: 173 MB (E = 3·128·T² = 1.6/6.3/25 M)
    VAE encode 384², tiles T px   extra − stored maps (164 MB): 31 / 34 / 90 MB
    untiled VAE                   decode 256²: 356 MB, 384²: 569 MB; encode 384²: 369 MB
    ============================  =========================================================

    Fits (fp32; other dtypes scale with the element size):

    - UNet tile batch of ``batch`` tiles of t × t latent px: ``unet_fixed + unet_per_px ·
      t² · batch`` (≈150 MB + 25 KB per latent px: SDPA keeps attention linear; a host
      with quadratic "math" attention needs more).
    - VAE tile step of E working-set elements (:class:`VAEExecutor` ``tile_elems``; a
      full-resolution SD tile of T image px has E = 3·128·T²): ``vae_fixed + vae_per_elem
      · E`` (measured slope 3.0–3.3 B per element, used with a 1.5× margin).
    - The stored whole maps come on top (the image-sized part, on the CPU when computing
      on a GPU): :func:`estimate_vae_store_bytes` (decoder ≈ 1.7 GB per megapixel in
      fp32, 0.85 GB in fp16/bf16).
    - Untiled VAE: ``vae_untiled_per_px`` per image px (decoder; the encoder is below it).
    """

    unet_fixed: float = 150e6
    unet_per_px: float = 26e3
    vae_fixed: float = 100e6
    vae_per_elem: float = 5.0
    vae_untiled_per_px: float = 4.0e3

    def unet_bytes(self, tile: int, batch: int = 1, element_size: int = 4) -> float:
        """Working set (bytes) of a UNet call on ``batch`` tiles of ``tile`` latent px."""
        return (self.unet_fixed + self.unet_per_px * tile * tile * batch) * element_size / 4

    def vae_bytes(self, tile_elems: float, element_size: int = 4) -> float:
        """Working set (bytes) of a VAE tile step of ``tile_elems`` elements."""
        return (self.vae_fixed + self.vae_per_elem * tile_elems) * element_size / 4


COST_MODEL = CostModel()


def vae_tile_elems(tile_px: int, base_channels: int = 128) -> float:
    """Working-set elements of a VAE tile step for full-resolution tiles of ``tile_px`` image px."""
    return 3.0 * base_channels * float(tile_px) ** 2


def max_vae_tile_px(budget_bytes: float, element_size: int = 4, base_channels: int = 128,
                    model: CostModel = COST_MODEL) -> int:
    """Largest full-resolution VAE tile (image px, multiple of 8, ≥ 64) within ``budget_bytes``."""
    elems = (budget_bytes * 4 / element_size - model.vae_fixed) / model.vae_per_elem
    t = int(math.sqrt(max(elems, 1.0) / (3.0 * base_channels)))
    return max(64, t - t % 8)


def max_unet_tile(budget_bytes: float, element_size: int = 4, batch: int = 1, model: CostModel = COST_MODEL,
                  preferred: int = OFFICIAL_LATENT_TILE) -> int:
    """``preferred`` (latent px) if it fits ``budget_bytes``, else the largest multiple of 8 ≥ 16 that does."""
    if model.unet_bytes(preferred, batch, element_size) <= budget_bytes:
        return preferred
    rest = budget_bytes * 4 / element_size - model.unet_fixed
    t = int(math.sqrt(max(rest, 0.0) / (model.unet_per_px * batch)))
    return max(16, min(preferred, t - t % 8))


def default_memory_budget(device: torch.device | str) -> int:
    """Bytes the tiles may use: 85 % of free CUDA memory, or half of MemAvailable on the CPU
    (4 GiB if /proc/meminfo is unreadable)."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free * 0.85)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 4 << 30


def limit_cpu_heap_retention(threshold: int = 1 << 20) -> bool:
    """Make glibc hand freed buffers of ≥ ``threshold`` bytes back to the OS at once.

    On the CPU, tile buffers below glibc's dynamic mmap threshold (up to 32 MiB) come from
    the heap and stay resident after being freed: measured on the full SD VAE decode at
    512² (tiles of 256 px), 891 MB above the RSS before the call with the default, 541 MB
    with a 1 MiB threshold (448 MB of it the stored maps). ``mallopt(M_MMAP_THRESHOLD)``
    is process-global, so this is for a command-line process (call it once at start),
    not for a host such as ComfyUI. Same as ``MALLOC_MMAP_THRESHOLD_=1048576`` in the
    environment. Returns False where glibc is not available.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3
    return bool(libc.mallopt(m_mmap_threshold, int(threshold)))


def parse_memory(text: str | int | None) -> int | None:
    """"6G", "6GB", "512M", "1.5GiB", "4000000000" → bytes (binary units); None/""/"auto" → None."""
    if text is None or isinstance(text, int):
        return text
    s = str(text).strip().upper().replace("IB", "").rstrip("B")
    if s in ("", "AUTO"):
        return None
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if s[-1] in mult:
            return int(float(s[:-1]) * mult[s[-1]])
        return int(float(s))
    except ValueError:
        raise ValueError(f"memory size must look like 6G, 512M or a number of bytes, got {text!r}") from None


# ------------------------------------------------------------------- tiled VAE


class TiledVAE:
    """An :class:`~.protocols.Autoencoder` that encodes and decodes tile by tile, exactly.

    ``vae``: a diffusers ``AutoencoderKL``, a host with ``.vae`` (DiffusersSD21), an ldm
    autoencoder (ComfyUI ``first_stage_model``) or :class:`VAEOps`. ``encoder_tile``:
    image px side of the encoder's full-resolution tiles; ``decoder_tile``: latent px side
    of the decoder's (its full-resolution tiles are 8× that in image px). Lower-resolution
    steps get tiles of the same working-set size. ``None`` picks them from
    ``memory_budget`` bytes (default :func:`default_memory_budget`) with
    :data:`COST_MODEL`. ``device``/``dtype``: compute (default: the VAE's parameters').
    Images of a batch are processed one after another. ``progress(done, total)`` per tile
    step of each image.

    ``store``: where the whole feature maps between GroupNorms live (see
    :class:`VAEExecutor`): "memory", "disk" (scratch files under ``scratch_dir``), or
    "auto": memory while their estimated peak (:func:`estimate_vae_store_bytes`, per
    image) fits in ``store_budget`` bytes, else disk. ``store_budget`` defaults to half of
    ``memory_budget`` when the maps live on the compute device (the other half is the
    tiles'), and to half of the CPU's available memory when computing on a GPU (the maps
    then live in CPU memory). ``channels_last``: compute and keep the maps channels-last
    (:class:`VAEExecutor`; default :func:`default_channels_last` of the compute device).
    """

    def __init__(self, vae: Any, *, encoder_tile: int | None = None, decoder_tile: int | None = None,
                 memory_budget: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, store_device: torch.device | str | None = None,
                 store_dtype: torch.dtype | None = None, scale_factor: float | None = None,
                 progress: TileProgress | None = None, on_backoff: Backoff | None = None,
                 cost_model: CostModel = COST_MODEL, store: str = "auto", scratch_dir: str | Any = None,
                 store_budget: int | None = None, channels_last: bool | None = None) -> None:
        if store not in ("auto", "memory", "disk"):
            raise ValueError(f"store must be auto, memory or disk, got {store!r}")
        self.ops = vae_ops(vae, scale_factor)
        self.scale_factor = self.ops.scale_factor
        self.device = torch.device(device) if device is not None else self.ops.device
        self.dtype = dtype or self.ops.dtype
        self.store_device, self.store_dtype = store_device, store_dtype
        self.progress, self.on_backoff = progress, on_backoff
        esize = torch.tensor([], dtype=self.dtype).element_size()
        budget = memory_budget
        if (encoder_tile is None or decoder_tile is None) and budget is None:
            budget = default_memory_budget(self.device)
        auto_px = max_vae_tile_px(budget, esize, self.ops.base_channels, cost_model) if budget else 1024
        self.encoder_tile = int(encoder_tile) if encoder_tile is not None else auto_px
        self.decoder_tile = int(decoder_tile) if decoder_tile is not None else max(8, auto_px // 8)
        self.budget = budget
        self.store, self.scratch_dir, self._store_budget = store, scratch_dir, store_budget
        self.channels_last = default_channels_last(self.device) if channels_last is None else bool(channels_last)
        self.last_executor: VAEExecutor | None = None

    def store_budget(self) -> int:
        """Bytes the whole feature maps may take in memory in ``store="auto"`` mode."""
        if self._store_budget is not None:
            return int(self._store_budget)
        store_dev = store_device_for(self.device, self.store_device)
        if store_dev == self.device:  # half of the tiles' budget; the other half is the tiles'
            return int(self.budget or default_memory_budget(store_dev)) // 2
        return default_memory_budget(store_dev)  # CPU RAM beside a GPU: half of its available memory

    def _store_for(self, ops: Sequence[Op], shape: tuple[int, int, int, int]) -> str:
        if self.store != "auto":
            return self.store
        esize = torch.tensor([], dtype=self.store_dtype or self.dtype).element_size()
        need = estimate_vae_store_bytes(ops, (1,) + tuple(shape[1:]), esize)  # type: ignore[arg-type]
        return "memory" if need <= self.store_budget() else "disk"

    def _executor(self, tile_px: int, ops: Sequence[Op], shape: tuple[int, int, int, int]) -> VAEExecutor:
        elems = vae_tile_elems(tile_px, self.ops.base_channels)
        kv = max(elems, self.budget / max(1, torch.tensor([], dtype=self.dtype).element_size()) / 4) \
            if self.budget else None
        ex = VAEExecutor(self.device, self.dtype, elems, store_device=self.store_device, store_dtype=self.store_dtype,
                         kv_elems=kv, progress=self.progress, on_backoff=self.on_backoff,
                         store=self._store_for(ops, shape), scratch_dir=self.scratch_dir,
                         channels_last=self.channels_last)
        self.last_executor = ex
        return ex

    @torch.no_grad()
    def encode_raw(self, pixels: Tensor) -> Tensor:
        """Moments (N, 2·latent, H/8, W/8) of pixels (N, 3, H, W) in [-1, 1], H and W multiples of 8."""
        if pixels.shape[-1] % 8 or pixels.shape[-2] % 8:
            raise ValueError(f"tiled encode needs H and W multiples of 8, got {tuple(pixels.shape[-2:])}")
        enc = self.ops.encoder
        outs = [self._executor(self.encoder_tile, enc, tuple(pixels.shape)).run(enc, pixels[i:i + 1])
                for i in range(pixels.shape[0])]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    @torch.no_grad()
    def encode_moments(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior (mean, logvar) as float32 raw latents; logvar clamped to [−30, 20] like diffusers."""
        m = self.encode_raw(pixels).float()
        lc = self.ops.latent_channels
        return m[:, :lc], m[:, lc:2 * lc].clamp(-30.0, 20.0)

    @torch.no_grad()
    def decode(self, raw: Tensor) -> Tensor:
        """Raw latent (N, 4, h, w) → pixels (N, 3, 8h, 8w), about [-1, 1], not clamped (store dtype/device)."""
        dec = self.ops.decoder
        outs = [self._executor(self.decoder_tile * 8, dec, tuple(raw.shape)).run(dec, raw[i:i + 1])
                for i in range(raw.shape[0])]
        return outs[0] if len(outs) == 1 else torch.cat(outs)  # no second copy of a one-image output

    def store_bytes(self, image_hw: tuple[int, int]) -> dict[str, int]:
        """Estimated peak bytes of whole feature maps for one image of ``image_hw`` image px."""
        esize = torch.tensor([], dtype=self.store_dtype or self.dtype).element_size()
        h, w = image_hw
        return {"encode": estimate_vae_store_bytes(self.ops.encoder, (1, 3, h, w), esize),
                "decode": estimate_vae_store_bytes(self.ops.decoder, (1, self.ops.latent_channels, h // 8, w // 8), esize)}


# ---------------------------------------------------------- receptive field


@torch.no_grad()
def measure_receptive_field(ops: Sequence[Op], shape: tuple[int, int, int, int], *, seed: int = 0,
                            rel_threshold: float = 1e-3, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """How far a change of one input pixel propagates through ``ops`` (no attention inside).

    GroupNorm statistics are frozen at those of the unperturbed input (they are global:
    the tiled executor shares them exactly), so only the local spread is measured. The
    centre pixel of a random input of ``shape`` (N, C, H, W) is changed; returns
    ``radius`` (input px: the largest Chebyshev distance, in input px, of an output pixel
    that changed at all), ``radius_eff`` (the same for changes above ``rel_threshold`` ×
    the largest change) and ``out_per_in`` (output px per input px). Runs on the CPU in
    ``dtype`` (the modules' dtype) with a single tile.
    """
    if any(isinstance(op, Attention) for op in ops):
        raise ValueError("attention is global; measure the segments before and after it")
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)
    ex = VAEExecutor("cpu", dtype, float("inf"))
    y0 = ex.run(ops, x).double()
    frozen = list(ex.recorded_stats)
    xp = x.clone()
    py, px = h // 2, w // 2
    xp[:, :, py, px] += 1.0
    ex2 = VAEExecutor("cpu", dtype, float("inf"))
    ex2.frozen_stats = frozen
    y1 = ex2.run(ops, xp).double()
    diff = (y1 - y0).abs().amax(dim=(0, 1))
    ratio = y0.shape[-2] / h
    ys, xs = torch.nonzero(diff > 0, as_tuple=True)
    if len(ys) == 0:
        return {"radius": 0.0, "radius_eff": 0.0, "out_per_in": ratio}

    def radius(mask: Tensor) -> float:
        yy, xx = torch.nonzero(mask, as_tuple=True)
        cy = (yy.double() + 0.5) / ratio - 0.5
        cx = (xx.double() + 0.5) / ratio - 0.5
        return float(torch.maximum((cy - py).abs(), (cx - px).abs()).max())

    return {"radius": radius(diff > 0), "radius_eff": radius(diff > rel_threshold * diff.max()),
            "out_per_in": ratio}


def split_at_attention(ops: Sequence[Op]) -> tuple[list[Op], list[Op]]:
    """(ops before the mid attention, ops after it)."""
    for i, op in enumerate(ops):
        if isinstance(op, Attention):
            return list(ops[:i]), list(ops[i + 1:])
    return list(ops), []


# ------------------------------------------------------------------ settings


@dataclass
class TileSettings:
    """How to tile, as the user says it. Maps 1:1 onto the CLI and the ComfyUI node.

    field (unit)                    CLI flag                    ComfyUI ``SR_TILING`` input
    ``mode``                        ``--tile auto|off|SIZE``    ``mode`` (auto / off / explicit)
                                    (a SIZE means "explicit")
    ``latent_tile`` (latent px)     ``--tile SIZE``             ``latent_tile``
    ``overlap`` (latent px)         ``--tile-overlap N``        ``overlap``
    ``vae_encoder_tile`` (image px) ``--vae-tile PX``           ``vae_encoder_tile``
    ``vae_decoder_tile`` (latent)   ``--vae-tile PX`` (PX // 8) ``vae_decoder_tile``
    ``batch_tiles``                 ``--tile-batch K``          ``batch_tiles``
    ``weighting``                   ``--tile-weighting W``      ``weighting``
    ``max_memory`` (bytes)          ``--max-memory 6G``         the node passes free VRAM
                                    (:func:`parse_memory`)      (``model_management.get_free_memory``)
    ``vae_store``                   ``--vae-store auto|memory|disk``  ``vae_store``
    ``scratch_dir``                 ``--scratch-dir DIR``       (ComfyUI's temp folder)

    ``mode``: "off" = no tiling (the untiled path and its size limit); "auto" = tile sizes
    from ``max_memory`` (default :func:`default_memory_budget`) and the cost model, the
    UNet tile being the official 96 latent px when it fits (the latent is tiled only when
    its area exceeds tile²); "explicit" = ``latent_tile`` as given, VAE tiles as given or
    auto when None. ``weighting``: "cosine" (default) or "gaussian" (official parity).
    The VAE is exact whatever its tile size, so its tiles are a memory/speed knob only;
    the UNet tile size changes the picture (context per tile). ``vae_store``: where the
    tiled VAE keeps the whole feature maps between GroupNorms (:class:`TiledVAE`): "auto"
    (memory while they fit half the budget, else scratch files), "memory" or "disk"; the
    picture is the same either way.
    """

    mode: str = "auto"
    latent_tile: int | None = None
    overlap: int = OFFICIAL_LATENT_OVERLAP
    vae_encoder_tile: int | None = None
    vae_decoder_tile: int | None = None
    batch_tiles: int = 1
    weighting: str = "cosine"
    max_memory: int | None = None
    vae_store: str = "auto"
    scratch_dir: str | None = None

    def __post_init__(self) -> None:
        if self.vae_store not in ("auto", "memory", "disk"):
            raise ValueError(f"vae_store must be auto, memory or disk, got {self.vae_store!r}")
        if self.mode not in ("auto", "off", "explicit"):
            raise ValueError(f"tile mode must be auto, off or explicit, got {self.mode!r}")
        if self.weighting not in ("cosine", "gaussian"):
            raise ValueError(f"tile weighting must be cosine or gaussian, got {self.weighting!r}")
        if self.mode == "explicit" and not self.latent_tile:
            raise ValueError("explicit tiling needs latent_tile (latent px)")
        for name in ("latent_tile", "vae_encoder_tile", "vae_decoder_tile"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be positive, got {v}")
        if self.vae_encoder_tile is not None and self.vae_encoder_tile % 8:
            raise ValueError(f"vae_encoder_tile must be a multiple of 8 image px, got {self.vae_encoder_tile}")
        if self.overlap < 0 or self.batch_tiles < 1:
            raise ValueError("overlap must be ≥ 0 and batch_tiles ≥ 1")

    @classmethod
    def from_cli(cls, tile: str | int = "auto", overlap: int = OFFICIAL_LATENT_OVERLAP, vae_tile: int | None = None,
                 max_memory: str | int | None = None, batch_tiles: int = 1, weighting: str = "cosine",
                 vae_store: str = "auto", scratch_dir: str | None = None) -> "TileSettings":
        """``--tile auto|off|SIZE --tile-overlap N --vae-tile PX --max-memory 6G --vae-store auto --scratch-dir D``."""
        t = str(tile).strip().lower()
        if t in ("auto", "off"):
            mode, latent = t, None
        else:
            try:
                latent = int(t)
            except ValueError:
                raise ValueError(f"--tile must be auto, off or a latent tile size, got {tile!r}") from None
            mode = "explicit"
        return cls(mode=mode, latent_tile=latent, overlap=int(overlap),
                   vae_encoder_tile=int(vae_tile) if vae_tile else None,
                   vae_decoder_tile=max(1, int(vae_tile) // 8) if vae_tile else None,
                   batch_tiles=int(batch_tiles), weighting=weighting, max_memory=parse_memory(max_memory),
                   vae_store=vae_store, scratch_dir=scratch_dir)

    def resolve(self, device: torch.device | str, dtype: torch.dtype = torch.float32,
                cost_model: CostModel = COST_MODEL, base_channels: int = 128) -> "ResolvedTiles":
        """Concrete sizes for a device and dtype (``None`` latent tile: UNet untiled)."""
        if self.mode == "off":
            return ResolvedTiles(None, self.overlap, None, None, self.batch_tiles, self.weighting, None,
                                 self.vae_store, self.scratch_dir)
        esize = torch.tensor([], dtype=dtype).element_size()
        budget = self.max_memory
        need_budget = self.mode == "auto" or self.vae_encoder_tile is None or self.vae_decoder_tile is None
        if budget is None and need_budget:
            budget = default_memory_budget(device)
        latent = self.latent_tile if self.mode == "explicit" else \
            (self.latent_tile or max_unet_tile(budget, esize, self.batch_tiles, cost_model))
        auto_px = max_vae_tile_px(budget, esize, base_channels, cost_model) if budget else 1024
        enc = self.vae_encoder_tile or auto_px
        dec = self.vae_decoder_tile or max(8, auto_px // 8)
        return ResolvedTiles(latent, self.overlap, enc, dec, self.batch_tiles, self.weighting, budget,
                             self.vae_store, self.scratch_dir)


@dataclass(frozen=True)
class ResolvedTiles:
    """Concrete tile sizes: ``latent_tile`` (latent px; None = UNet untiled), ``overlap``
    (latent px), ``vae_encoder_tile`` (image px), ``vae_decoder_tile`` (latent px; both None
    = VAE untiled), ``budget`` (bytes, None when not used), ``vae_store`` and
    ``scratch_dir`` as in :class:`TileSettings`."""

    latent_tile: int | None
    overlap: int
    vae_encoder_tile: int | None
    vae_decoder_tile: int | None
    batch_tiles: int
    weighting: str
    budget: int | None
    vae_store: str = "auto"
    scratch_dir: str | None = None

    def vae_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`TiledVAE` for these tiles."""
        return {"encoder_tile": self.vae_encoder_tile, "decoder_tile": self.vae_decoder_tile,
                "memory_budget": self.budget, "store": self.vae_store, "scratch_dir": self.scratch_dir}


def tiles_fit(tiles: "ResolvedTiles | None", image_hw: tuple[int, int]) -> tuple[bool, bool]:
    """(VAE fits one tile, UNet latent fits one tile) for an image of ``image_hw`` px (None: untiled)."""
    if tiles is None:
        return True, True
    h, w = image_hw
    lh, lw = -(-h // 8), -(-w // 8)
    vae = max(h, w) <= (tiles.vae_encoder_tile or 0) and max(lh, lw) <= (tiles.vae_decoder_tile or 0)
    unet = tiles.latent_tile is None or lh * lw <= tiles.latent_tile ** 2
    return vae, unet


__all__ = [
    "Attention", "Conv", "COST_MODEL", "CostModel", "Downsample", "Norm", "NormActConv", "Resnet",
    "ResolvedTiles", "TiledDenoiser", "TiledVAE", "TilePlan", "TileSettings", "Upsample", "VAEExecutor", "VAEOps",
    "axis_starts", "default_channels_last", "default_memory_budget", "estimate_vae_store_bytes", "is_oom", "limit_cpu_heap_retention",
    "store_device_for",
    "max_unet_tile",
    "max_vae_tile_px", "measure_receptive_field", "parse_memory", "repeat_for_tiles", "split_at_attention",
    "tiled_call", "tiles_fit", "vae_ops", "vae_ops_diffusers", "vae_ops_ldm", "vae_tile_elems",
]
