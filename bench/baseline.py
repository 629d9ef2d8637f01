"""The baseline: the same models run the way the official code runs them.

Facts from ../shared/reference/osediff.md and ccsr.md (the official code itself is not
used or copied):

OSEDiff (``test_osediff.py`` + ``OSEDiff_test``):
- LoRA *unmerged*, through peft: one ``LoraConfig(r=rank, init_lora_weights="gaussian",
  target_modules=<stored list>)`` per adapter (lora_alpha left at its default 8), three
  UNet adapters (default_encoder / default_decoder / default_others) and one VAE adapter,
  every tensor whose name holds "lora" (UNet: or "conv_in") copied by exact name, then
  ``set_adapter`` of all of them. Each adapted layer adds lora_B(lora_A(x))·2 at run time.
- The prompt is encoded for every image; posterior ``sample()``; one UNet call at t = 999.
- Latent tiles (when h·w > 96²): 96×96, overlap 32, the official geometry (square tiles,
  last one snapped to the edge), Gaussian weights, ONE TILE PER UNET CALL.
- VAE: the encoder is tiled above 1088 px (1024-px tiles, 32-px pad), the decoder above
  246 latent px (224-latent tiles, 11-px pad); see :class:`PaddedTileVAE`.
- fp16 on a GPU (official default; TF32 on), fp32 on the CPU.

CCSR v2 (``test_ccsr_tile.py`` + its pipeline), preset "two-step" (README multi-step):
- Positive and negative prompts encoded for every image (two text-encoder calls).
- Under CFG the LQ image batch is duplicated before the VAE encode: the encoder runs on a
  batch of 2 (the redundant encode).
- First call (t = 999) without CFG on the negative prompt; the CFG steps run
  control + UNet on a batch of 2 ([uncond, cond]).
- ``--tile_diffusion``: 64-latent tiles, stride 32 (512/256 px), Gaussian weights, one tile
  (a CFG batch of 2) at a time; ``--tile_vae``: the decoder as above, the encoder never
  (its hook is commented out in v2). Used here when the latent exceeds one tile.
- The GAN decoder has the VAE decoder's architecture: the host VAE's decoder stands in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sr_core.ccsr import T_START, CCSRv2Settings, plan_v2
from sr_core.color import apply_color_fix
from sr_core.pipeline import prepare_lq
from sr_core.schedule import ddpm_step, predict_x0, q_sample
from sr_core.tiling import TilePlan

from .measure import Recorder

OSEDIFF_UNET_ADAPTERS = (("unet_lora_encoder_modules", "default_encoder"),
                         ("unet_lora_decoder_modules", "default_decoder"),
                         ("unet_lora_others_modules", "default_others"))
OFFICIAL_LATENT_TILE, OFFICIAL_LATENT_OVERLAP = 96, 32
CCSR_LATENT_TILE, CCSR_LATENT_STRIDE = 64, 32
ENC_TILE, ENC_PAD = 1024, 32
DEC_TILE, DEC_PAD = 224, 11


# ------------------------------------------------------------------------ peft LoRA


def inject_official_lora(unet, vae, d: dict) -> int:
    """Inject the OSEDiff adapters with peft exactly as the official loader does; returns the
    number of LoRA-wrapped layers (258 + 32 for SD 2.1)."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    for group, name in OSEDIFF_UNET_ADAPTERS:
        unet.add_adapter(LoraConfig(r=d["rank_unet"], init_lora_weights="gaussian", target_modules=d[group]),
                         adapter_name=name)
    with torch.no_grad():
        for k, v in unet.state_dict().items():
            if "lora" in k or "conv_in" in k:
                v.copy_(d["state_dict_unet"][k])
    unet.set_adapter([name for _, name in OSEDIFF_UNET_ADAPTERS])
    vae.add_adapter(LoraConfig(r=d["rank_vae"], init_lora_weights="gaussian",
                               target_modules=d["vae_lora_encoder_modules"]), adapter_name="default_encoder")
    with torch.no_grad():
        for k, v in vae.state_dict().items():
            if "lora" in k:
                v.copy_(d["state_dict_vae"][k])
    vae.set_adapter(["default_encoder"])
    return sum(isinstance(m, LoraLayer) for mod in (unet, vae) for m in mod.modules())


# ------------------------------------------------------------- official VAE tiles


def official_axis_tiles(size: int, tile: int, pad: int) -> list[tuple[int, int, int, int]]:
    """Tiles along one axis as the official VAE hook lays them: (in0, in1, out0, out1).

    n = ceil((size − 2·pad)/tile) tiles; their interior length ceil((size − 2·pad)/n),
    rounded up to a multiple of 32 (else 16, 8) while it stays ≤ tile; interiors start at
    ``pad``; an input tile is its interior grown by ``pad`` on both sides (clipped); the
    outermost tiles' outputs reach the border.
    """
    n = max(1, math.ceil((size - 2 * pad) / tile))
    real = math.ceil((size - 2 * pad) / n)
    for m in (32, 16, 8):
        r = math.ceil(real / m) * m
        if r <= tile:
            real = r
            break
    out = []
    for i in range(n):
        a = pad + i * real
        if i > 0 and a >= size - pad:
            break
        last = i == n - 1 or pad + (i + 1) * real >= size - pad
        b = size - pad if last else pad + (i + 1) * real
        out.append((max(0, a - pad), min(size, b + pad), 0 if i == 0 else a, size if last else b))
        if last:
            break
    return out


class PaddedTileVAE:
    """Cost model of the official VAE hook: the same tile grid and pads, the whole encoder
    (decoder) run on each padded tile, the interiors pasted together.

    Left out: the hook's GroupNorm synchronisation across tiles (a task queue that pauses
    every tile at every GroupNorm, keeping all tiles' maps) and its offloading of tiles to
    the CPU between steps. Both only add time and memory, so this baseline is, if anything,
    faster and leaner than the official one. Below the thresholds the VAE runs whole.
    """

    def __init__(self, vae, device: torch.device, dtype: torch.dtype, *, tile_encoder: bool = True,
                 tile_decoder: bool = True) -> None:
        self.vae, self.device, self.dtype = vae, device, dtype
        self.tile_encoder, self.tile_decoder = tile_encoder, tile_decoder
        self.tiles_run = 0

    def _encoder(self, x: Tensor) -> Tensor:
        m = self.vae.encoder(x)
        return self.vae.quant_conv(m) if self.vae.quant_conv is not None else m

    def _decoder(self, z: Tensor) -> Tensor:
        if self.vae.post_quant_conv is not None:
            z = self.vae.post_quant_conv(z)
        return self.vae.decoder(z)

    @torch.no_grad()
    def moments(self, pixels: Tensor) -> Tensor:
        x = pixels.to(self.device, self.dtype)
        h, w = x.shape[-2:]
        if not self.tile_encoder or max(h, w) <= 2 * ENC_PAD + ENC_TILE:
            return self._encoder(x)
        out = torch.empty(x.shape[0], 8, h // 8, w // 8, device=self.device, dtype=self.dtype)
        for y0, y1, oy0, oy1 in official_axis_tiles(h, ENC_TILE, ENC_PAD):
            for x0, x1, ox0, ox1 in official_axis_tiles(w, ENC_TILE, ENC_PAD):
                m = self._encoder(x[..., y0:y1, x0:x1])
                out[..., oy0 // 8:oy1 // 8, ox0 // 8:ox1 // 8] = \
                    m[..., (oy0 - y0) // 8:(oy1 - y0) // 8, (ox0 - x0) // 8:(ox1 - x0) // 8]
                self.tiles_run += 1
        return out

    @torch.no_grad()
    def decode(self, raw: Tensor) -> Tensor:
        z = raw.to(self.device, self.dtype)
        h, w = z.shape[-2:]
        if not self.tile_decoder or max(h, w) <= 2 * DEC_PAD + DEC_TILE:
            return self._decoder(z)
        out = torch.empty(z.shape[0], 3, h * 8, w * 8, device=self.device, dtype=self.dtype)
        for y0, y1, oy0, oy1 in official_axis_tiles(h, DEC_TILE, DEC_PAD):
            for x0, x1, ox0, ox1 in official_axis_tiles(w, DEC_TILE, DEC_PAD):
                p = self._decoder(z[..., y0:y1, x0:x1])
                out[..., oy0 * 8:oy1 * 8, ox0 * 8:ox1 * 8] = \
                    p[..., (oy0 - y0) * 8:(oy1 - y0) * 8, (ox0 - x0) * 8:(ox1 - x0) * 8]
                self.tiles_run += 1
        return out


def posterior_sample(moments: Tensor) -> Tensor:
    """``latent_dist.sample()`` of diffusers: mean + exp(½·clamp(logvar, −30, 20))·N(0, I)."""
    mean, logvar = moments.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    return mean + std * torch.randn(mean.shape, device=mean.device)


# --------------------------------------------------------------------- the runner


@dataclass
class OfficialModels:
    """What the baseline runs: peft-wrapped (OSEDiff) or plain (CCSR) diffusers modules."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    alphas_cumprod: Tensor
    scale_factor: float = 0.18215
    control: torch.nn.Module | None = None


class Baseline:
    """Official-style OSEDiff and CCSR-v2 runs with per-stage timing (see the module docstring)."""

    def __init__(self, m: OfficialModels) -> None:
        self.m = m

    # -- pieces ----------------------------------------------------------------------
    @torch.no_grad()
    def text(self, prompt: str) -> Tensor:
        ids = self.m.tokenizer(prompt, padding="max_length", max_length=self.m.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids
        return self.m.text_encoder(ids.to(self.m.device))[0].to(self.m.dtype)

    def _ts(self, t: int, n: int) -> Tensor:
        return torch.full((n,), int(t), device=self.m.device, dtype=torch.long)

    @torch.no_grad()
    def _unet(self, rec: Recorder, x: Tensor, t: int, ctx: Tensor, control=None) -> Tensor:
        kwargs = {}
        if control is not None:
            kwargs = {"down_block_additional_residuals": control[0], "mid_block_additional_residual": control[1]}
        with rec.span("unet"):
            return self.m.unet(x, self._ts(t, x.shape[0]), encoder_hidden_states=ctx, **kwargs).sample

    @torch.no_grad()
    def _control(self, rec: Recorder, x: Tensor, t: int, ctx: Tensor, cond: Tensor):
        with rec.span("control"):
            return self.m.control(x, self._ts(t, x.shape[0]), ctx, cond)

    @staticmethod
    def _tiled(fn, inputs: list[Tensor], plan: TilePlan | None, device: torch.device) -> Tensor:
        """One tile per call, Gaussian weights (built on the device once), ε blended in fp32."""
        if plan is None:
            return fn(*inputs).float()
        weights = [w.to(device) for w in plan.weights("gaussian")]
        n = inputs[0].shape[0]
        acc = wsum = None
        for (y, x), w in zip(plan.tiles, weights):
            out = fn(*[t[..., y:y + plan.tile_h, x:x + plan.tile_w] for t in inputs]).float()
            if acc is None:
                acc = torch.zeros(n, out.shape[1], plan.height, plan.width, device=device)
                wsum = torch.zeros(1, 1, plan.height, plan.width, device=device)
            acc[..., y:y + plan.tile_h, x:x + plan.tile_w] += out * w
            wsum[..., y:y + plan.tile_h, x:x + plan.tile_w] += w
        return acc / wsum

    def _finish(self, rec: Recorder, vae: PaddedTileVAE, x0: Tensor, reference: Tensor, size) -> Tensor:
        rec.mark("decode")
        pixels = vae.decode((x0 / self.m.scale_factor).to(self.m.dtype)).float().clamp(-1.0, 1.0)
        image = (pixels * 0.5 + 0.5)[..., :size[0], :size[1]].cpu()
        with rec.span("color_fix"):
            out = apply_color_fix(image, reference, "adain")
        rec.end()
        return out

    # -- OSEDiff ---------------------------------------------------------------------
    @torch.no_grad()
    def osediff(self, lr: Tensor, prompt: str, rec: Recorder, scale: float = 4.0) -> tuple[Tensor, dict]:
        m = self.m
        rec.begin()
        rec.mark("text")
        ctx = self.text(prompt)
        rec.mark("prepare")
        prep = prepare_lq(lr, scale, "bicubic", None)
        rec.mark("encode")
        vae = PaddedTileVAE(m.vae, m.device, m.dtype)
        z = posterior_sample(vae.moments(prep.pixels.to(m.device, m.dtype))) * m.scale_factor
        rec.mark("sample")
        h, w = z.shape[-2:]
        plan = TilePlan.official(h, w, OFFICIAL_LATENT_TILE, OFFICIAL_LATENT_OVERLAP) \
            if h * w > OFFICIAL_LATENT_TILE ** 2 else None
        eps = self._tiled(lambda x: self._unet(rec, x, 999, ctx), [z.to(m.dtype)], plan, m.device)
        x0 = predict_x0(z, eps, m.alphas_cumprod[999])
        out = self._finish(rec, vae, x0, prep.reference, prep.size)
        return out, {"tiles": len(plan) if plan else 1, "vae_tiles": vae.tiles_run}

    # -- CCSR v2 ---------------------------------------------------------------------
    @torch.no_grad()
    def ccsr(self, lr: Tensor, pos: str, neg: str, settings: CCSRv2Settings, rec: Recorder,
             scale: float = 4.0) -> tuple[Tensor, dict]:
        m = self.m
        plan_s = plan_v2(settings)
        cfg_on = settings.cfg > 1.0
        ac = m.alphas_cumprod.float().to(m.device)
        rec.begin()
        rec.mark("text")
        ctx_pos = self.text(pos)
        ctx_neg = self.text(neg) if cfg_on else None
        rec.mark("prepare")
        prep = prepare_lq(lr, scale, "bicubic", None)
        rec.mark("encode")
        vae = PaddedTileVAE(m.vae, m.device, m.dtype, tile_encoder=False)
        pixels = prep.pixels.to(m.device, m.dtype)
        if cfg_on:  # the image batch is duplicated for CFG before the encode
            pixels = torch.cat([pixels, pixels])
        c = posterior_sample(vae.moments(pixels)) * m.scale_factor
        rec.mark("sample")
        h, w = c.shape[-2:]
        plan = TilePlan.build(h, w, CCSR_LATENT_TILE, CCSR_LATENT_TILE - CCSR_LATENT_STRIDE) \
            if max(h, w) > CCSR_LATENT_TILE else None
        c1 = c[:1]
        x = q_sample(c1, torch.randn(c1.shape, device=m.device), ac[T_START])

        def model(xt: Tensor, t: int, cond: Tensor, ctx: Tensor) -> Tensor:
            res = self._control(rec, xt.to(m.dtype), t, ctx, cond.to(m.dtype))
            return self._unet(rec, xt.to(m.dtype), t, ctx, res).float()

        x0 = x
        if plan_s.first_call:
            first = ctx_neg if cfg_on and settings.first_step_negative else ctx_pos
            eps = self._tiled(lambda xt, ct: model(xt, T_START, ct, first), [x, c1], plan, m.device)
            x0 = predict_x0(x, eps, ac[T_START])
            if plan_s.loop:
                x = q_sample(x0, torch.randn(x0.shape, device=m.device), ac[plan_s.tau])
        for t, t_prev in zip(plan_s.loop, plan_s.prev):
            if cfg_on:  # [uncond, cond] in one batch-2 call; the condition halves are the two encodes
                ctx2 = torch.cat([ctx_neg, ctx_pos])

                def guided(xt: Tensor, ct: Tensor, t=t, ctx2=ctx2) -> Tensor:
                    e = model(torch.cat([xt, xt]), t, ct, ctx2)
                    return e[:1] + settings.cfg * (e[1:] - e[:1])
                eps = self._tiled(guided, [x, c], plan, m.device)
            else:
                eps = self._tiled(lambda xt, ct, t=t: model(xt, t, ct, ctx_pos), [x, c1], plan, m.device)
            a_prev = ac[t_prev] if t_prev >= 0 else torch.tensor(1.0, device=m.device)
            x, x0 = ddpm_step(x, eps, ac[t], a_prev, torch.randn(x.shape, device=m.device))
        out = self._finish(rec, vae, x0, prep.reference, prep.size)
        return out, {"tiles": len(plan) if plan else 1, "vae_tiles": vae.tiles_run,
                     "encode_batch": int(pixels.shape[0])}

