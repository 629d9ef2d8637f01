"""Speed levers for the diffusers host that are options, not yet defaults.

Each lever was measured by ``python -m bench`` (see bench/ and the README's performance
section) against a baseline that runs the model the way the official code does; only the
ones that paid on the measured device are in :func:`default_options`.

- :func:`set_channels_last`: 4-D weights in channels-last layout, so convolutions run
  NHWC (oneDNN on the CPU, cuDNN tensor-core kernels on the GPU). Per part: on the CPU it
  paid for the UNet and the VAE decoder, not for the VAE encoder.
- :func:`fold_upsamplers`: every diffusers ``Upsample2D`` doing nearest ×2 then a 3×3
  conv (the VAE decoder's 3; the UNet's 3 run on maps too small to gain) runs as ONE
  stride-2 transposed conv with a 4×4 kernel folded from the 3×3 one. Exact up to float summation order: output pixel
  (2i+a, 2j+b) of conv3x3(nearest×2(x)) only ever reads x rows i−1..i+1 through 2 distinct
  taps per axis, so the fold does 16 instead of 36 multiply-adds per output pixel and
  channel pair and never materialises the 4× larger upsampled map. See :func:`fold_kernel`.
- :func:`set_attention`: diffusers' SDPA processor (``AttnProcessor2_0``, the default of
  current diffusers) or the classic baddbmm/softmax one.
- :class:`SplitPrecisionVAE`: the host's VAE in its own dtype (bf16 where ComfyUI would run
  it so: fp16 SD VAEs can overflow), the UNet staying in the host dtype.
- :func:`batched_cfg_eps`: CCSR's guided step with the unconditional and conditional
  evaluations in ONE batch-2 control+UNet call (the official v2 pipeline batches them
  too); a drop-in :data:`~.ccsr.EpsFn`.
- :func:`compile_modules`: ``torch.compile`` of the UNet / VAE / control branch (GPU).

:func:`apply_options` applies a :class:`PerfOptions` to a host (after any LoRA merge) and
returns a function that undoes it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------- options

CHANNELS_LAST_PARTS = ("unet", "encoder", "decoder", "control")


@dataclass(frozen=True)
class PerfOptions:
    """Levers of :func:`apply_options`.

    ``channels_last``: the parts whose 4-D weights go channels-last: "unet", "encoder" (VAE
    encoder + quant_conv), "decoder" (VAE decoder + post_quant_conv), "control" (the
    ``extra_modules`` of :func:`apply_options`: control branch, GAN decoder).
    ``fold_upsample``: nearest-×2 + 3×3 conv as one transposed conv (the VAE decoder's, and
    any ``extra_modules``'; only on maps of at least :data:`FOLD_MIN_PIXELS`).
    ``attention``: "sdpa" or "math". ``vae_dtype``: None (host dtype) or a dtype for the
    VAE alone (see :class:`SplitPrecisionVAE`). ``compile``: torch.compile the modules.
    ``cfg_batch``: CCSR guidance in one batch-2 call. ``batch_tiles``: latent tiles per
    UNet call when tiling. ``cuda_graphs``: the UNet and a control branch replay recorded
    CUDA graphs (:mod:`.cuda_graphs`; CUDA only).
    """

    channels_last: tuple[str, ...] = ()
    fold_upsample: bool = False
    attention: str = "sdpa"
    vae_dtype: torch.dtype | None = None
    compile: bool = False
    cfg_batch: bool = False
    batch_tiles: int = 1
    cuda_graphs: bool = False

    def describe(self) -> dict:
        d = dict(self.__dict__)
        d["channels_last"] = list(self.channels_last)
        d["vae_dtype"] = str(self.vae_dtype).replace("torch.", "") if self.vae_dtype is not None else None
        return d


def default_options(device: torch.device | str) -> PerfOptions:
    """The levers that paid in the measurements on this kind of device.

    CPU (fp32, full-size SD 2.1 architecture, measured with ``python -m bench --levers``):
    channels-last for the UNet and the VAE decoder (not the encoder: slower there; not the
    control branch: no change), the upsample fold in the VAE decoder (not in the UNet:
    slower on its small maps), SDPA attention, CCSR's CFG pair in one batch-2 call (the
    low-resolution UNet levels read their weights once for both). Not: bf16 (slower than
    fp32 on a CPU without AMX), tile batching (no clear gain: compute-bound).
    CUDA (fp16 UNet, full-size architecture, 512², measured with ``python -m bench --device
    cuda --levers`` on one H200): SDPA in the UNet (0.94×), CCSR's CFG pair in one batch
    (0.50×), 4 tiles per UNet call (0.35×); the VAE in bf16 (same time as fp16, 0.99×, and
    it cannot overflow to NaN as fp16 can). Not: channels-last (no gain in the UNet or the
    control branch, 1.22× slower in the VAE encoder and 1.24× in the decoder), the upsample
    fold (1.02× in the decoder, 1.08× in the UNet). CUDA graphs of the UNet and the control
    branch (one H100: 0.47× and 0.46× per call; not the VAE: 1.01× / 0.98×), recorded at the
    first call of each size and replayed after, so they pay from the second image of a size on.
    """
    if torch.device(device).type == "cuda":
        return PerfOptions(channels_last=(), fold_upsample=False, attention="sdpa",
                           vae_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else None,
                           cfg_batch=True, batch_tiles=4, cuda_graphs=True)
    return PerfOptions(channels_last=("unet", "decoder"), fold_upsample=True, attention="sdpa", cfg_batch=True)


def apply_options(host, options: PerfOptions, *, extra_modules: Iterable[nn.Module] = ()) -> Callable[[], None]:
    """Apply ``options`` to a :class:`~.diffusers_host.DiffusersSD21` (its ``unet`` and ``vae``)
    and ``extra_modules`` (a CCSR control branch's ``net``, a GAN decoder); returns ``undo``.

    Call after :meth:`~.diffusers_host.DiffusersSD21.apply_osediff` and ``to_compute`` (the fold
    reads the final weights). ``vae_dtype`` and ``cfg_batch`` are not module changes: wrap the
    VAE with :class:`SplitPrecisionVAE` and pass :func:`batched_cfg_eps` to the sampler.
    ``compile`` replaces ``host.unet`` / ``host.vae.decoder`` / ``host.vae.encoder`` by compiled
    wrappers (undo restores them).
    """
    if options.cuda_graphs and torch.device(host.device).type != "cuda":
        raise ValueError(f"cuda_graphs needs a CUDA device; the models are on {host.device}")
    if options.cuda_graphs and options.compile:
        raise ValueError("cuda_graphs and compile exclude each other (torch.compile records its own graphs)")
    unknown = set(options.channels_last) - set(CHANNELS_LAST_PARTS)
    if unknown:
        raise ValueError(f"channels_last parts must be among {CHANNELS_LAST_PARTS}, got {sorted(unknown)}")
    modules = [host.unet, host.vae, *extra_modules]
    undo: list[Callable[[], None]] = []
    if options.fold_upsample:  # the VAE decoder's upsamplers (and a GAN decoder's); not the UNet's (small maps)
        folded = [m for mod in [host.vae, *extra_modules] for m in fold_upsamplers(mod)]
        undo.append(lambda: unfold_upsamplers(folded))
    parts = {"unet": [host.unet], "encoder": [host.vae.encoder, host.vae.quant_conv],
             "decoder": [host.vae.decoder, host.vae.post_quant_conv], "control": list(extra_modules)}
    cl = [m for p in options.channels_last for m in parts[p] if m is not None]
    if cl:
        set_channels_last(*cl)
        undo.append(lambda: set_contiguous(*cl))
    if options.attention != "sdpa":
        set_attention(modules, options.attention)
        undo.append(lambda: set_attention(modules, "sdpa"))
    if options.cuda_graphs:
        from .cuda_graphs import graph_modules

        # the denoising networks (the UNet, a control branch: the modules with a timestep embedding) run
        # at the latent's size, where launching kernels is the cost; the VAE's convolutions at the
        # image's size keep the GPU busy anyway (measured: 1.01x / 0.98x at 512²)
        undo.append(graph_modules(host.unet, *(m for m in extra_modules if hasattr(m, "time_embedding"))))
    if options.compile:
        saved = (host.unet, host.vae.encoder, host.vae.decoder)
        host.unet = torch.compile(host.unet)
        host.vae.encoder = torch.compile(host.vae.encoder)
        host.vae.decoder = torch.compile(host.vae.decoder)

        def uncompile() -> None:
            host.unet, host.vae.encoder, host.vae.decoder = saved
        undo.append(uncompile)

    def run_undo() -> None:
        for fn in reversed(undo):
            fn()
    return run_undo


# ----------------------------------------------------------------- memory layout


@torch.no_grad()
def set_channels_last(*modules: nn.Module) -> None:
    """4-D parameters of ``modules`` in channels-last layout (in place)."""
    for m in modules:
        m.to(memory_format=torch.channels_last)


@torch.no_grad()
def set_contiguous(*modules: nn.Module) -> None:
    """4-D parameters back in the default (NCHW-contiguous) layout."""
    for m in modules:
        m.to(memory_format=torch.contiguous_format)


# -------------------------------------------------------------- upsample folding

_TAPS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
"""Row k of the 4-tap transposed kernel sums these rows of the 3-tap kernel (see fold_kernel)."""


def fold_kernel(weight: Tensor) -> Tensor:
    """The (in, out, 4, 4) ``conv_transpose2d`` kernel (stride 2, padding 1) equal to a 3×3
    conv (padding 1) of ``weight`` (out, in, 3, 3) applied after nearest ×2 upsampling.

    Along one axis, output row 2i reads upsampled rows 2i−1, 2i, 2i+1 = input rows i−1, i, i,
    and row 2i+1 reads input rows i, i, i+1. A stride-2, padding-1 transposed conv gives
    output row y = 2m + k − 1 the tap K[k] of input row m, so K = [W2, W1+W2, W0+W1, W0]
    (and the same along columns). Computed in float64, returned in ``weight``'s dtype.
    """
    taps = _TAPS.to(weight.device)
    k = torch.einsum("ya,oiab,xb->ioyx", taps, weight.double(), taps)
    return k.to(weight.dtype).contiguous()


_FOLDED: type | None = None
FOLD_MIN_PIXELS = 64 * 64
"""Below this many input pixels the original nearest + conv runs: on small maps with many
channels (the UNet's 1280-channel upsamplers at 8²-32²) the op is bound by reading the
weights, and the 16/9 larger folded kernel made it slower (measured on the CPU)."""


def _folded_class() -> type:
    """``FoldedUpsample2D`` (built on first use: diffusers is imported lazily)."""
    global _FOLDED
    if _FOLDED is not None:
        return _FOLDED
    from diffusers.models.upsampling import Upsample2D

    class FoldedUpsample2D(Upsample2D):
        """An ``Upsample2D`` (nearest ×2 + 3×3 conv) run as one folded transposed conv.

        Same attributes, parameters and state dict as the original (only the instance's class
        changes). The folded kernel is cached, keyed by the conv weight's version, storage,
        device and dtype, so a later weight change (a LoRA merge, ``.to()``) refolds. Falls back
        to the original forward for an ``output_size`` other than 2× the input."""

        def forward(self, hidden_states: Tensor, output_size=None, *args, **kwargs) -> Tensor:
            h, w = hidden_states.shape[-2:]
            if (output_size is not None and tuple(output_size) != (2 * h, 2 * w)) or h * w < FOLD_MIN_PIXELS:
                return super().forward(hidden_states, output_size, *args, **kwargs)
            wt = self.conv.weight
            key = (wt._version, wt.data_ptr(), wt.dtype, wt.device)
            cache = self.__dict__.get("_fold_cache")
            if cache is None or cache[0] != key:
                kernel = fold_kernel(wt.detach())
                if wt.is_contiguous(memory_format=torch.channels_last):
                    kernel = kernel.contiguous(memory_format=torch.channels_last)
                cache = (key, kernel)
                self.__dict__["_fold_cache"] = cache
            return F.conv_transpose2d(hidden_states.to(wt.dtype), cache[1], self.conv.bias, stride=2, padding=1)

    _FOLDED = FoldedUpsample2D
    return _FOLDED


def _foldable(m: nn.Module) -> bool:
    from diffusers.models.upsampling import Upsample2D

    conv = getattr(m, "conv", None)
    return (type(m) is Upsample2D and m.use_conv and not m.use_conv_transpose and m.norm is None
            and getattr(m, "interpolate", True) and isinstance(conv, nn.Conv2d)
            and tuple(conv.kernel_size) == (3, 3) and tuple(conv.stride) == (1, 1) and tuple(conv.padding) == (1, 1)
            and tuple(conv.dilation) == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def fold_upsamplers(module: nn.Module) -> list[nn.Module]:
    """Switch every foldable ``Upsample2D`` inside ``module`` to the folded forward (in place:
    the instance's class changes, its parameters and state-dict keys do not). Returns them."""
    cls = _folded_class()
    done = []
    for m in module.modules():
        if _foldable(m):
            m.__class__ = cls
            done.append(m)
    return done


def unfold_upsamplers(modules: Iterable[nn.Module]) -> None:
    """Undo :func:`fold_upsamplers` for the modules it returned."""
    from diffusers.models.upsampling import Upsample2D

    for m in modules:
        m.__class__ = Upsample2D
        m.__dict__.pop("_fold_cache", None)


# ----------------------------------------------------------------------- attention


def set_attention(modules: nn.Module | Iterable[nn.Module], kind: str) -> None:
    """diffusers attention processors of ``modules``: "sdpa" (``AttnProcessor2_0``, torch's
    scaled_dot_product_attention) or "math" (``AttnProcessor``: baddbmm, softmax, bmm)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    if kind not in ("sdpa", "math"):
        raise ValueError(f"attention must be 'sdpa' or 'math', got {kind!r}")
    mods = [modules] if isinstance(modules, nn.Module) else list(modules)
    for mod in mods:
        for m in mod.modules():
            if isinstance(m, Attention):
                m.set_processor(AttnProcessor2_0() if kind == "sdpa" else AttnProcessor())


# ------------------------------------------------------------------- VAE precision


class SplitPrecisionVAE:
    """An :class:`~.protocols.Autoencoder` over ``host.vae`` in its own ``dtype`` (e.g. bf16
    under an fp16 UNet, as ComfyUI runs SD VAEs on GPUs that have bf16: fp16 can overflow to
    inf/NaN in the decoder). The host's VAE module is converted in place; moments are
    returned in float32, decoded pixels in ``dtype``. ``keep_original``: keep the original
    tensors so that :meth:`restore` gives back exactly the same weights (costs their memory)."""

    def __init__(self, host, dtype: torch.dtype, keep_original: bool = False) -> None:
        self.host, self.dtype = host, dtype
        self.device = host.device
        self.scale_factor = host.scale_factor
        self.vae = host.vae
        self._dtype0 = next(host.vae.parameters()).dtype
        self._saved = {n: p.data for n, p in host.vae.named_parameters()} if keep_original else None
        host.vae.to(dtype=dtype)

    def restore(self) -> None:
        """Put the VAE back in its original dtype (exactly, with ``keep_original``)."""
        if self._saved is None:
            self.host.vae.to(dtype=self._dtype0)
            return
        for n, p in self.host.vae.named_parameters():
            p.data = self._saved[n]
        self._saved = None

    @torch.no_grad()
    def encode_moments(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        dist = self.host.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        return dist.mean.float(), dist.logvar.float()

    @torch.no_grad()
    def decode(self, raw: Tensor) -> Tensor:
        return self.host.vae.decode(raw.to(self.device, self.dtype)).sample


# -------------------------------------------------------------------- CCSR guidance


def batched_cfg_eps(denoiser, control) -> Callable[..., Tensor]:
    """A :data:`~.ccsr.EpsFn` that evaluates ε_u and ε_c in one batch-2 control+UNet call
    (same ε = ε_u + cfg·(ε_c − ε_u) as :func:`~.ccsr.ccsr_eps`, up to batched-kernel rounding).
    Without guidance it is one plain call."""
    from .ccsr import ccsr_eps

    def eps_fn(x_t: Tensor, t: int, cond: Tensor, context: Tensor, context_neg: Tensor | None,
               cfg: float) -> Tensor:
        if context_neg is None or cfg <= 1.0:
            return ccsr_eps(denoiser, control, x_t, t, cond, context)
        n = x_t.shape[0]
        ctx = torch.cat([context_neg.expand(n, -1, -1), context.expand(n, -1, -1)])
        x2, c2 = torch.cat([x_t, x_t]), torch.cat([cond, cond])
        down, mid = control.residuals(x2, t, ctx, c2)
        eps = denoiser.predict_eps(x2, t, ctx, (down, mid)).float()
        eps_u, eps_c = eps[:n], eps[n:]
        return eps_u + cfg * (eps_c - eps_u)

    return eps_fn


# ------------------------------------------------------------------------ compile


def compile_modules(*modules: nn.Module, **kwargs) -> list[nn.Module]:
    """``torch.compile`` each module (kwargs passed on); returns the compiled wrappers."""
    return [torch.compile(m, **kwargs) for m in modules]


__all__ = [
    "PerfOptions", "SplitPrecisionVAE", "apply_options", "batched_cfg_eps", "compile_modules", "default_options",
    "fold_kernel", "fold_upsamplers", "set_attention", "set_channels_last", "set_contiguous", "unfold_upsamplers",
]
