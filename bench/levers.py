"""Each lever alone: one stage timed with the lever off and on, on the optimised host
BEFORE any other lever is applied (so each ratio is that lever's own), runs alternating.

OSEDiff worker (UNet / VAE / text levers; the CCSR modules are the same architecture):
  lora_merge     unet, encode   peft adapters unmerged (official) → LoRA merged into the weights
  text_cache     text           text encoder every image → cached embedding of the prompt
  sdpa           unet, decode   classic attention (baddbmm/softmax) → torch SDPA
  channels_last  unet, encode, decode
  fold_upsample  decode, unet   nearest ×2 + 3×3 conv → one folded transposed conv
  bf16           unet, decode   CPU: fp32 → bf16; CUDA: fp16 → bf16 (both checked for NaN)
  batch_tiles    unet           3×3 latent tiles, one per call → 4 per call
  cuda_graphs    unet, encode, decode (CUDA) eager → replay of a recorded CUDA graph
CCSR worker:
  cfg_batch      control+unet   guided step as two batch-1 calls → one batch-2 call
  single_encode  encode         the LQ encoded for both CFG halves (official) → once
  channels_last  control        the control branch
  cuda_graphs    control (CUDA) eager → replay of a recorded CUDA graph
``torch.compile`` (GPU) and the tile-loop host/device copies (GPU) are not measured on a CPU.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .measure import paired_ratio, summary

PAYS_BELOW = 0.97
"""A lever "pays" when its median paired ratio (on/off time) is below this and no pair of runs
has it at 1 or above ("no clear gain" when the median is below but some pair is not)."""


def judge(ratio: dict, check: dict | None = None) -> str:
    """"pays", "no clear gain", "does not pay" or "unsafe (non-finite output)" (see PAYS_BELOW)."""
    if check and not check.get("finite_on", True):
        return "unsafe (non-finite output)"
    if ratio.get("median") is None or ratio["median"] >= PAYS_BELOW:
        return "does not pay"
    if ratio.get("n", 1) > 1 and ratio["max"] >= 1.0:
        return "no clear gain"  # the pairs disagree: the spread crosses 1
    return "pays"


def _noop() -> None:
    return None


@dataclass
class Lever:
    name: str
    stage: str
    off: Callable[[], object]
    on: Callable[[], object]
    off_enter: Callable[[], None] = _noop
    off_exit: Callable[[], None] = _noop
    on_enter: Callable[[], None] = _noop
    on_exit: Callable[[], None] = _noop
    exact: bool = True
    note: str = ""
    info: dict = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _first(x):
    if isinstance(x, (tuple, list)):
        return _first(x[0])
    return x


def measure(lever: Lever, runs: int, device: torch.device, log) -> dict:
    times = {"off": [], "on": []}
    outs = {}
    for rep in range(1 + runs):
        for side in (("off", "on") if rep % 2 == 0 else ("on", "off")):
            enter, fn, leave = ((lever.off_enter, lever.off, lever.off_exit) if side == "off"
                                else (lever.on_enter, lever.on, lever.on_exit))
            enter()
            try:
                _sync(device)
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = fn()
                _sync(device)
                dt = time.perf_counter() - t0
                outs[side] = _first(out).detach().float().cpu() if isinstance(_first(out), torch.Tensor) else None
            finally:
                leave()
            if rep > 0:
                times[side].append(dt)
    ratio = paired_ratio(times["on"], times["off"])
    check = {}
    a, b = outs.get("off"), outs.get("on")
    if a is not None and b is not None and a.shape == b.shape:
        check = {"finite_on": bool(torch.isfinite(b).all()), "finite_off": bool(torch.isfinite(a).all()),
                 "max_rel_diff": float((b - a).abs().max() / a.abs().max().clamp_min(1e-12))}
    verdict = judge(ratio, check)
    r = {"lever": lever.name, "stage": lever.stage, "off": summary(times["off"]), "on": summary(times["on"]),
         "ratio": ratio, "verdict": verdict, "check": check, "note": lever.note, **lever.info}
    log(f"lever {lever.name:14} {lever.stage:13} off {r['off']['median']:.3f} s  on {r['on']['median']:.3f} s  "
        f"ratio {ratio['median']:.3f} [{ratio['min']:.3f}-{ratio['max']:.3f}]  {verdict}")
    return r


def graph_lever(stage: str, fn: Callable[[], object], module: torch.nn.Module) -> Lever:
    """CUDA graphs for one module: eager calls vs replays of a recording that persists across the
    toggles (made in the untimed first pair of runs), as in a CLI run over many images."""
    from sr_core.cuda_graphs import GraphedForward

    g = GraphedForward(module)
    info: dict = {"graph_failures": g.failures}  # read when the measurement ends
    return Lever("cuda_graphs", stage, fn, fn, on_enter=g.install, on_exit=g.uninstall,
                 note="recorded once, then replayed", info=info)


def osediff_levers(env, size: int) -> list[Lever]:
    from sr_core.perf import (SplitPrecisionVAE, fold_upsamplers, set_attention, set_channels_last,
                              set_contiguous, unfold_upsamplers)
    from sr_core.tiling import TiledDenoiser

    host, base = env.host, env.baseline
    dev, dt = host.device, host.dtype
    g = torch.Generator().manual_seed(7)
    lat = size // 8
    z = torch.randn(1, 4, lat, lat, generator=g).to(dev)
    px = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(dev)
    prompt = env.prompts[0]
    ctx = host.encode_prompt(prompt)
    ts = torch.full((1,), 999, device=dev, dtype=torch.long)
    unet = lambda: host.predict_eps(z, 999, ctx)  # noqa: E731
    enc = lambda: host.encode_moments(px)  # noqa: E731
    dec = lambda: host.decode(z)  # noqa: E731
    levers: list[Lever] = []

    levers.append(Lever("lora_merge", "unet", lambda: base.m.unet(z.to(base.m.dtype), ts,
                                                                  encoder_hidden_states=ctx.to(base.m.dtype)).sample,
                        unet, exact=False, note="peft unmerged vs merged weights (same function up to rounding)"))
    levers.append(Lever("lora_merge", "encode", lambda: base.m.vae.encode(px.to(base.m.dtype)).latent_dist.mean,
                        lambda: enc()[0], exact=False))
    levers.append(Lever("text_cache", "text", lambda: base.text(prompt), lambda: host.encode_prompt(prompt)))

    def attn(kind, module):
        return lambda: set_attention(module, kind)
    for stage, fn, mod in (("unet", unet, host.unet), ("decode", dec, host.vae)):
        levers.append(Lever("sdpa", stage, fn, fn, off_enter=attn("math", mod), off_exit=attn("sdpa", mod)))
    parts = (("unet", unet, host.unet), ("encode", lambda: enc()[0], host.vae), ("decode", dec, host.vae))
    for stage, fn, mod in parts:
        levers.append(Lever("channels_last", stage, fn, fn, on_enter=lambda m=mod: set_channels_last(m),
                            on_exit=lambda m=mod: set_contiguous(m)))
    import sr_core.perf as perf

    min_px = perf.FOLD_MIN_PIXELS
    for stage, fn, mod, floor in (("decode", dec, host.vae, min_px), ("unet", unet, host.unet, 0)):
        folded: list = []

        def fold_on(m=mod, f=folded, floor=floor):
            perf.FOLD_MIN_PIXELS = floor
            f.extend(fold_upsamplers(m))

        def fold_off(f=folded):
            perf.FOLD_MIN_PIXELS = min_px
            unfold_upsamplers(f)
            f.clear()
        levers.append(Lever("fold_upsample", stage, fn, fn, on_enter=fold_on, on_exit=fold_off,
                            note="" if floor else "every UNet upsampler folded (default: maps ≥ 64² only, "
                                                   "so none in the UNet)"))

    # bf16: CPU fp32 → bf16; CUDA fp16 → bf16 (the VAE: ComfyUI's choice, no fp16 overflow)
    split: list = []
    levers.append(Lever("bf16", "decode", dec, lambda: split[0].decode(z),
                        on_enter=lambda: split.append(SplitPrecisionVAE(host, torch.bfloat16, keep_original=True)),
                        on_exit=lambda: (split.pop().restore()), exact=False,
                        note=f"VAE {str(dt).replace('torch.', '')} → bf16"))

    saved: dict = {}

    def unet_bf16_enter():  # keeps the original tensors so the toggle is exact
        saved.update({n: p.data for n, p in host.unet.named_parameters()})
        host.unet.to(torch.bfloat16)
        host.dtype = torch.bfloat16

    def unet_bf16_exit():
        for n, p in host.unet.named_parameters():
            p.data = saved[n]
        saved.clear()
        host.dtype = dt
    levers.append(Lever("bf16", "unet", unet, unet, on_enter=unet_bf16_enter, on_exit=unet_bf16_exit, exact=False,
                        note=f"UNet {str(dt).replace('torch.', '')} → bf16"))

    if dev.type == "cuda":
        for stage, fn, mod in (("unet", unet, host.unet), ("encode", lambda: enc()[0], host.vae.encoder),
                               ("decode", dec, host.vae.decoder)):
            levers.append(graph_lever(stage, fn, mod))

    tile, overlap = max(8, lat // 2), max(2, lat // 8)
    one = TiledDenoiser(host, tile, overlap, "cosine", batch_tiles=1)
    four = TiledDenoiser(host, tile, overlap, "cosine", batch_tiles=4)
    plan = one.plan(lat, lat)
    levers.append(Lever("batch_tiles", "unet", lambda: one.predict_eps(z, 999, ctx),
                        lambda: four.predict_eps(z, 999, ctx), exact=False,
                        info={"tiles": len(plan) if plan else 1, "tile": tile, "overlap": overlap},
                        note=f"{len(plan) if plan else 1} tiles of {tile}² latent px: 1 vs 4 per call"))
    return levers


def ccsr_levers(env, size: int) -> list[Lever]:
    from sr_core.ccsr import ccsr_eps
    from sr_core.perf import batched_cfg_eps, set_channels_last, set_contiguous

    host, control = env.host, env.control
    dev = host.device
    g = torch.Generator().manual_seed(8)
    lat = size // 8
    x = torch.randn(1, 4, lat, lat, generator=g).to(dev)
    c = torch.randn(1, 4, lat, lat, generator=g).to(dev)
    px = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(dev)
    pos, neg = host.encode_prompt(env.prompts[0]), host.encode_prompt(env.prompts[1])
    cfg = env.ccsr_settings.cfg
    batched = batched_cfg_eps(host, control)
    return [
        Lever("cfg_batch", "control+unet", lambda: ccsr_eps(host, control, x, 499, c, pos, neg, cfg),
              lambda: batched(x, 499, c, pos, neg, cfg), exact=False,
              note="guided step: 2 calls of batch 1 → 1 call of batch 2"),
        Lever("single_encode", "encode", lambda: host.encode_moments(torch.cat([px, px]))[0][:1],
              lambda: host.encode_moments(px)[0], exact=False,
              note="official v2 encodes the CFG-duplicated image batch"),
        Lever("channels_last", "control", lambda: control.residuals(x, 499, pos, c)[1],
              lambda: control.residuals(x, 499, pos, c)[1], on_enter=lambda: set_channels_last(env.control_net),
              on_exit=lambda: set_contiguous(env.control_net)),
    ] + ([graph_lever("control", lambda: control.residuals(x, 499, pos, c)[1], env.control_net)]
         if dev.type == "cuda" else [])


def run_levers(env, size: int, runs: int, names: list[str] | None, log) -> list[dict]:
    levers = osediff_levers(env, size) if env.method == "osediff" else ccsr_levers(env, size)
    if names:
        levers = [lv for lv in levers if lv.name in names or f"{lv.name}:{lv.stage}" in names]
    out = []
    for lv in levers:
        r = measure(lv, runs, env.device, log)
        r.update(model=env.model, method=env.method, size=size, device=str(env.device))
        out.append(r)
    return out
