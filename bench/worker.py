"""One benchmark worker: one (model, method) pair, all its sizes and levers, in one process.

The models are built once; baseline and optimised runs alternate (baseline, ours, ours,
baseline, ...) so that a machine whose load drifts affects both alike, and each pair of
runs gives one ratio. Run as ``python -m bench.worker '<job json>'`` by :mod:`bench.run`
(which sets the environment) or call :func:`run_job` directly.
"""
from __future__ import annotations

import contextlib
import gc
import json
import sys
import time
from collections.abc import Callable, Iterator

import torch

from . import models as bm
from .baseline import Baseline, OfficialModels, inject_official_lora
from .measure import MB, Recorder, malloc_trim, module_bytes, paired_ratio, summary
from .ours import Ours

OSEDIFF_PROMPT = "a photo of a cat, high quality"
STAGES = ("text", "prepare", "encode", "control", "unet", "sampler", "decode", "color_fix", "total")


# --------------------------------------------------------------------- environment


class Env:
    """Models of one worker, the baseline runner, and the optimised runner."""

    def __init__(self, job: dict) -> None:
        from sr_core.ccsr import POSITIVE_PROMPT, NEGATIVE_PROMPT, v2_settings
        from sr_core.ccsr_host import DiffusersControlBranch
        from sr_core.diffusers_host import DiffusersSD21
        from sr_core.osediff import parse_official_dict
        from sr_core.perf import PerfOptions, default_options

        self.job = job
        self.method, self.model = job["method"], job["model"]
        self.device = torch.device(job.get("device", "cpu"))
        cuda = self.device.type == "cuda"
        if cuda:  # the official code turns TF32 on globally; same for both modes
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.base_dtype = torch.float16 if cuda else torch.float32  # official defaults
        self.our_dtype = torch.float16 if cuda else torch.float32
        opts = default_options(self.device)
        over = job.get("options") or {}
        if "vae_dtype" in over and over["vae_dtype"] is not None:
            over = dict(over, vae_dtype=getattr(torch, over["vae_dtype"]))
        if "channels_last" in over:
            v = over["channels_last"]
            over = dict(over, channels_last=tuple(p for p in v.split(",") if p) if isinstance(v, str)
                        else tuple(v or ()))
        self.options: PerfOptions = PerfOptions(**{**opts.__dict__, **over})
        t0 = time.perf_counter()
        unet, vae, text = bm.build_unet(self.model), bm.build_vae(self.model), bm.build_text(self.model)
        tok = bm.build_tokenizer()
        self.prompts = (OSEDIFF_PROMPT,) if self.method == "osediff" else (POSITIVE_PROMPT, NEGATIVE_PROMPT)
        self.ccsr_settings = v2_settings(job.get("ccsr_preset", "two-step"))
        self.control_net = None
        if self.method == "osediff":
            d = bm.osediff_dict(unet, vae)
            host = DiffusersSD21(unet, vae, text, tok, device=self.device, dtype=self.our_dtype, source="random")
            host.apply_osediff(parse_official_dict(d, "random osediff"))
            host.to_compute()
            gc.collect()
            malloc_trim()
            # the baseline's base weights: built again from the same seeds (identical to the unmerged ones;
            # cheaper in peak memory than a deep copy held through the merge)
            unet_b, vae_b = bm.build_unet(self.model), bm.build_vae(self.model)
            self.lora_layers = inject_official_lora(unet_b, vae_b, d)
            unet_b.to(self.device, self.base_dtype)
            vae_b.to(self.device, self.base_dtype)
            control_b = None
            self.shared = False
        else:
            host = DiffusersSD21(unet, vae, text, tok, device=self.device, dtype=self.our_dtype, source="random")
            host.to_compute()
            self.control_net = bm.build_control(self.model).to(self.device, self.our_dtype)
            self.lora_layers = 0
            if cuda:  # own copies (the same seeds, so the same weights): ours' levers (the VAE's dtype, CUDA
                # graphs) then stay in place between runs instead of being undone and redone around each
                unet_b, vae_b = (m.to(self.device, self.base_dtype) for m in (bm.build_unet(self.model),
                                                                              bm.build_vae(self.model)))
                control_b = bm.build_control(self.model).to(self.device, self.base_dtype)
                self.shared = False
            else:  # CCSR changes no weights: on the CPU the modes share modules (memory)
                unet_b, vae_b, control_b = host.unet, host.vae, self.control_net
                self.shared = True
        self.host = host
        self.control = DiffusersControlBranch(self.control_net, device=self.device, dtype=self.our_dtype,
                                              version="v2", source="random") if self.control_net is not None else None
        self.baseline = Baseline(OfficialModels(unet_b, vae_b, host.text_encoder, tok, self.device, self.base_dtype,
                                                host.alphas_cumprod, host.scale_factor,
                                                control_b))
        self.build_s = time.perf_counter() - t0
        self._undo: Callable[[], None] | None = None
        self._applied = None
        self._split = None

    # -- levers on/off for the optimised mode ------------------------------------------
    def options_for(self, tiled: bool):
        """The levers of one mode: with the VAE tiled, its parts stay NCHW (sr_core.tiling's tiled
        VAE executor was measured slower on channels-last maps: 1.28× for a tiny 1024² decode)."""
        from dataclasses import replace

        if not tiled:
            return self.options
        return replace(self.options, channels_last=tuple(p for p in self.options.channels_last
                                                          if p not in ("encoder", "decoder")))

    def apply_ours(self, tiled: bool = False) -> None:
        from sr_core.perf import SplitPrecisionVAE, apply_options

        opts = self.options_for(tiled)
        if self._undo is not None and self._applied == opts:
            return
        self.undo_ours()
        extra = [self.control_net] if self.control_net is not None else []
        self._undo = apply_options(self.host, opts, extra_modules=extra)
        self._applied = opts
        if opts.vae_dtype is not None and opts.vae_dtype != self.our_dtype:
            self._split = SplitPrecisionVAE(self.host, opts.vae_dtype, keep_original=True)

    def undo_ours(self) -> None:
        if self._split is not None:
            self._split.restore()
            self._split = None
        if self._undo is not None:
            self._undo()
            self._undo = None
        self._applied = None

    @contextlib.contextmanager
    def ours_active(self, tiled: bool = False) -> Iterator[None]:
        """The optimised levers for one run: toggled around it when the modes share modules (CCSR),
        re-applied when a mode needs other levers (tiled vs untiled)."""
        self.apply_ours(tiled)
        try:
            yield
        finally:
            if self.shared:
                self.undo_ours()

    def ours(self) -> Ours:
        return Ours(self.host, self._split or self.host, self.options, self.control)

    # -- bytes -------------------------------------------------------------------------
    def model_bytes(self, mode: str) -> int:
        b = self.baseline.m
        if mode == "baseline":
            mods = [b.unet, b.vae, b.text_encoder, b.control]
        else:
            mods = [self.host.unet, self.host.vae, self.host.text_encoder, self.control_net]
        cache = sum(m.__dict__["_fold_cache"][1].numel() * m.__dict__["_fold_cache"][1].element_size()
                    for mod in mods if mod is not None for m in mod.modules() if "_fold_cache" in m.__dict__)
        return module_bytes(*mods) + cache


# ------------------------------------------------------------------------ one run


def _stages(rec: Recorder) -> dict:
    t = rec.times
    s = {
        "text": t.get("text", 0.0), "prepare": t.get("prepare", 0.0), "encode": t.get("encode", 0.0),
        "control": t.get("control", 0.0), "unet": t.get("unet", 0.0),
        "sampler": max(0.0, t.get("sample", 0.0) - t.get("unet", 0.0) - t.get("control", 0.0)),
        "decode": max(0.0, t.get("decode", 0.0) - t.get("color_fix", 0.0)), "color_fix": t.get("color_fix", 0.0),
        "total": rec.total,
    }
    return s


def run_once(env: Env, mode: str, size: int, lr: torch.Tensor, tiles) -> dict:
    rec = Recorder(env.device)
    if mode == "baseline":
        if env.method == "osediff":
            out, info = env.baseline.osediff(lr, env.prompts[0], rec)
        else:
            out, info = env.baseline.ccsr(lr, env.prompts[0], env.prompts[1], env.ccsr_settings, rec)
    else:
        t = tiles if mode == "ours" else None
        with env.ours_active(tiled=t is not None):
            runner = env.ours()
            if env.method == "osediff":
                out, info = runner.osediff(lr, env.prompts[0], rec, tiles=t)
            else:
                out, info = runner.ccsr(lr, env.prompts[0], env.prompts[1], env.ccsr_settings, rec, tiles=t)
    ok = bool(torch.isfinite(out).all()) and tuple(out.shape[-2:]) == (size, size)
    return {"stages": _stages(rec), "calls": {"unet": rec.calls.get("unet", 0), "control": rec.calls.get("control", 0)},
            "peak_extra_mb": rec.peak / MB, "stage_peak_mb": {k: v / MB for k, v in rec.stage_peak.items()},
            "output_ok": ok, **info}


def _tiles_for(env: Env, size: int):
    from sr_core.tiling import TileSettings, parse_memory

    job = env.job
    if size < int(job.get("tile_from", 2048)):
        return None
    return TileSettings(mode="auto", overlap=int(job.get("tile_overlap", 32)),
                        batch_tiles=int(job.get("batch_tiles") or env.options.batch_tiles),
                        max_memory=parse_memory(job.get("max_memory")))


def run_case(env: Env, size: int, log: Callable[[str], None]) -> dict:
    job = env.job
    runs, warmup = int(job.get("runs", 3)), int(job.get("warmup", 1))
    tiles = _tiles_for(env, size)
    modes = ["baseline", "ours"]
    skip = {tuple(s[:2]): s[2] for s in job.get("skip", [])}
    if tiles is not None and size <= int(job.get("untiled_max", 2048)):
        modes.append("ours_untiled")
    skipped = {m: skip[(size, m)] for m in modes if (size, m) in skip}
    modes = [m for m in modes if m not in skipped]
    g = torch.Generator().manual_seed(size)
    lr = torch.rand(1, 3, size // 4, size // 4, generator=g)
    results: dict[str, list[dict]] = {m: [] for m in modes}
    for rep in range(warmup + runs):
        order = modes if rep % 2 == 0 else list(reversed(modes))
        for mode in order:
            r = run_once(env, mode, size, lr, tiles)
            tag = "warm-up" if rep < warmup else f"run {rep - warmup + 1}/{runs}"
            log(f"{env.method} {env.model} {size} {mode:12} {tag}: {r['stages']['total']:.2f} s, "
                f"+{r['peak_extra_mb']:.0f} MB")
            if rep >= warmup:
                results[mode].append(r)
    if env.shared:
        env.undo_ours()
    case = {"method": env.method, "model": env.model, "size": size, "tiled": tiles is not None,
            "options": env.options_for(tiles is not None).describe(),
            "tile_settings": None if tiles is None else {k: getattr(tiles, k) for k in
                                                         ("mode", "overlap", "batch_tiles", "max_memory")},
            "modes": {}, "ratios": {}, "skipped": skipped}
    for mode, rs in results.items():
        if not rs:
            continue
        model_mb = env.model_bytes(mode) / MB
        peak_extra = max(r["peak_extra_mb"] for r in rs)
        case["modes"][mode] = {
            "stages": {s: summary([r["stages"][s] for r in rs]) for s in STAGES},
            "runs": rs, "calls": rs[-1]["calls"], "tiles": rs[-1].get("tiles", 1),
            "peak_extra_mb": peak_extra, "model_mb": model_mb, "peak_mb": model_mb + peak_extra,
            "output_ok": all(r["output_ok"] for r in rs),
            "dtype": str(env.base_dtype if mode == "baseline" else env.our_dtype).replace("torch.", ""),
        }
    if "baseline" in results and results["baseline"]:
        base = results["baseline"]
        for mode in [m for m in results if m != "baseline" and results[m]]:
            case["ratios"][mode] = {
                s: paired_ratio([r["stages"][s] for r in results[mode]], [r["stages"][s] for r in base])
                for s in STAGES if any(r["stages"][s] for r in base)}
            case["ratios"][mode]["peak_mb"] = case["modes"][mode]["peak_mb"] / case["modes"]["baseline"]["peak_mb"]
    if "ours" in case["modes"] and "ours_untiled" in case["modes"]:
        case["ratios"]["tiled_vs_untiled_peak_mb"] = \
            case["modes"]["ours"]["peak_mb"] / case["modes"]["ours_untiled"]["peak_mb"]
    return case


# -------------------------------------------------------------------------- main


def run_job(job: dict, log: Callable[[str], None] | None = None) -> dict:
    from .levers import run_levers

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    env = Env(job)
    log(f"{env.method} {env.model}: models built in {env.build_s:.1f} s ({env.lora_layers} peft LoRA layers)")
    out: dict = {"method": env.method, "model": env.model, "build_s": env.build_s, "cases": [], "levers": [],
                 "options": env.options.describe(), "threads": torch.get_num_threads(),
                 "lora_layers": env.lora_layers}
    if job.get("levers"):
        out["levers"] = run_levers(env, int(job.get("lever_size") or min(job["sizes"])),
                                   int(job.get("lever_runs") or job.get("runs", 3)), job.get("lever_names"), log)
    for size in job["sizes"]:
        out["cases"].append(run_case(env, int(size), log))
    return out


def main() -> None:
    job = json.loads(sys.argv[1])
    res = run_job(job)
    print("BENCH-RESULT " + json.dumps(res))


if __name__ == "__main__":
    main()
