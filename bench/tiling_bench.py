"""Peak memory and time of tiled vs untiled VAE encode, UNet and VAE decode.

Every point runs in its own child process (random weights built on the fly, CPU, fp32
unless said, ``--threads`` torch threads, default 1): peak RSS from ``resource.getrusage`` minus the RSS just before the measured
call ("extra MB": activations and stored maps, not the weights); on CUDA
``torch.cuda.max_memory_allocated`` instead. Prints a table and writes JSON.

    python bench/tiling_bench.py                      # the default plan (tiny + full models)
    python bench/tiling_bench.py --models tiny --sizes 512,1024,2048,4096
    python bench/tiling_bench.py --cost-model         # the points behind sr_core.tiling.COST_MODEL

Models: "tiny" = tests/tiny_models.py (SD 2.1 block structure, tiny widths); "full" = the
SD 2.1-base UNet / VAE architecture (sr_core/sd21.py configs). Sizes are output px.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

RSS_CAP_GB = 6.0


# ------------------------------------------------------------------------- child


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _build(kind: str, model: str):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    import tiny_models
    from sr_core.sd21 import UNET_CONFIG, VAE_CONFIG

    cfg = {("unet", "tiny"): tiny_models.TINY_UNET, ("unet", "full"): UNET_CONFIG,
           ("vae", "tiny"): tiny_models.TINY_VAE, ("vae", "full"): VAE_CONFIG}[(kind, model)]
    cls = UNet2DConditionModel if kind == "unet" else AutoencoderKL
    with torch.device("meta"):  # no transient copies: the RSS peak of the build is the weights
        m = cls(**cfg)
    m = m.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                fan_in = max(1, p[0].numel())
                p.normal_(0.0, fan_in ** -0.5, generator=g)
    return m.eval().requires_grad_(False), cfg


class _Host:
    def __init__(self, unet) -> None:
        from sr_core.schedule import sd_alphas_cumprod
        self.unet, self.alphas_cumprod = unet, sd_alphas_cumprod()

    def predict_eps(self, x, t, context, control=None):
        import torch
        ctx = context.expand(x.shape[0], -1, -1) if context.shape[0] == 1 else context
        return self.unet(x, torch.full((x.shape[0],), t), encoder_hidden_states=ctx).sample


def child(job: dict) -> dict:
    import torch

    from sr_core import tiling

    torch.set_num_threads(int(job.get("threads", 2)))
    kind = "unet" if job["stage"] == "unet" else "vae"
    model, cfg = _build(kind, job["model"])
    s = int(job["size"])
    cuda = torch.cuda.is_available() and job.get("device", "cpu") == "cuda"
    dev = "cuda" if cuda else "cpu"
    model.to(dev)
    g = torch.Generator().manual_seed(1)
    info: dict = {}
    with torch.no_grad():
        if kind == "unet":
            host = _Host(model)
            lat = torch.randn(1, 4, s // 8, s // 8, generator=g).to(dev)
            ctx = torch.zeros(1, 77, int(cfg["cross_attention_dim"]), device=dev)
            tile = job.get("tile")
            den = tiling.TiledDenoiser(host, tile, int(job.get("overlap", 32))) if tile else host
            plan = den.plan(s // 8, s // 8) if tile else None
            info["tiles"] = len(plan) if plan else 1
            run = lambda: den.predict_eps(lat, 999, ctx)  # noqa: E731
        else:
            store_dtype = getattr(torch, job["store_dtype"]) if job.get("store_dtype") else None
            if job["stage"] == "encode":
                x = (torch.rand(1, 3, s, s, generator=g) * 2 - 1).to(dev)
            else:
                x = torch.randn(1, 4, s // 8, s // 8, generator=g).to(dev)
            if job.get("tile"):
                tv = tiling.TiledVAE(model, encoder_tile=int(job["tile"]), decoder_tile=max(1, int(job["tile"]) // 8),
                                     store_dtype=store_dtype, store=job.get("store", "memory"),
                                     memory_budget=tiling.parse_memory(job.get("max_memory")))
                run = (lambda: tv.encode_moments(x)) if job["stage"] == "encode" else (lambda: tv.decode(x))  # noqa
            else:
                run = (lambda: model.encode(x).latent_dist.mean) if job["stage"] == "encode" \
                    else (lambda: model.decode(x).sample)  # noqa: E731
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        base_rss = _rss_bytes()
        t0 = time.perf_counter()
        out = run()
        if isinstance(out, tuple):
            out = out[0]
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res = {"extra_mb": (peak - base_rss) / 2 ** 20, "peak_rss_mb": peak / 2 ** 20, "time_s": dt,
           "out_shape": list(out.shape), **info}
    if cuda:
        res["cuda_extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    if kind == "vae" and job.get("tile"):
        res["store_peak_mb"] = tv.last_executor.peak_store_bytes / 2 ** 20
        res["disk_peak_mb"] = tv.last_executor.peak_disk_bytes / 2 ** 20
        res["tile_steps"] = tv.last_executor.tiles_run
    return res


# ------------------------------------------------------------------------ parent


def run_job(job: dict, timeout: float, env: dict | None = None) -> dict:
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True,
                           timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**job, "error": f"timeout after {timeout:.0f} s"}
    if p.returncode != 0:
        return {**job, "error": (p.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1]
    return {**job, **json.loads(line), "wall_s": time.time() - t0}


def default_plan(models: list[str], sizes: list[int]) -> list[dict]:
    jobs: list[dict] = []
    for model in models:
        for s in sizes:
            for stage in ("encode", "unet", "decode"):
                tiled = {"model": model, "stage": stage, "size": s}
                if stage == "unet":
                    tiled.update(tile=32 if model == "tiny" else 96, overlap=8 if model == "tiny" else 32)
                else:
                    tiled.update(tile=256)
                if stage == "decode" and s >= 4096:
                    tiled["store_dtype"] = "bfloat16"  # fp32 stored maps of a 4096² decode exceed the 6 GB cap
                jobs.append(tiled)
                if s <= 2048:
                    jobs.append({"model": model, "stage": stage, "size": s})
    return jobs


def cost_model_plan() -> list[dict]:
    jobs = [{"model": "full", "stage": "unet", "size": 8 * t, "tag": "unet-act"} for t in (16, 32, 48, 64)]
    jobs += [{"model": "full", "stage": "decode", "size": 384, "tile": t, "tag": "vae-tile"} for t in (64, 128, 256)]
    jobs += [{"model": "full", "stage": "encode", "size": 384, "tile": t, "tag": "vae-tile"} for t in (64, 128, 256)]
    jobs += [{"model": "full", "stage": st, "size": s, "tag": "vae-untiled"} for st in ("encode", "decode")
             for s in (256, 384)]
    return jobs


def table(rows: list[dict]) -> str:
    head = f"{'model':5} {'stage':7} {'out px':>7} {'mode':22} {'extra MB':>9} {'stored MB':>9} {'time s':>8}  note"
    out = [head, "-" * len(head)]
    for r in rows:
        mode = f"tile {r['tile']}" if r.get("tile") else "untiled"
        if r.get("stage") == "unet" and r.get("tile"):
            mode = f"tile {r['tile']}/{r.get('overlap', 32)} lat ({r.get('tiles', '?')} tiles)"
        elif r.get("tile"):
            mode = f"tile {r['tile']} px" + (" bf16 store" if r.get("store_dtype") else "") + \
                (" disk" if r.get("store") == "disk" else "") + (f" {r['max_memory']}" if r.get("max_memory") else "")
        if "error" in r:
            out.append(f"{r['model']:5} {r['stage']:7} {r['size']:>7} {mode:22} {'':>9} {'':>9} {'':>8}  {r['error']}")
            continue
        stored = f"{r['store_peak_mb']:.0f}" if "store_peak_mb" in r else ""
        note = r.get("note", "") or ("glibc mmap threshold 1 MiB" if r.get("mmap_threshold") else "")
        if r.get("disk_peak_mb"):
            note = f"disk {r['disk_peak_mb']:.0f} MB; {note}"
        if "cuda_extra_mb" in r:
            note = f"GPU {r['cuda_extra_mb']:.0f} MB above the weights; {note}"
        out.append(f"{r['model']:5} {r['stage']:7} {r['size']:>7} {mode:22} {r['extra_mb']:>9.0f} {stored:>9} "
                   f"{r['time_s']:>8.1f}  {note}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--models", default="tiny,full")
    ap.add_argument("--sizes", default="512,1024,2048,4096")
    ap.add_argument("--cost-model", action="store_true")
    ap.add_argument("--only", default="", help="comma list of stage names to keep (encode,unet,decode)")
    ap.add_argument("--max-size-full", type=int, default=1024, help="largest output px for the full models")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per point")
    ap.add_argument("--mmap-threshold", type=int, default=0,
                    help="bytes: set glibc's MALLOC_MMAP_THRESHOLD_ in the children so freed tile buffers "
                         "go back to the OS (0: leave glibc's default)")
    ap.add_argument("--stages", default="", help="comma list of model:stage:size[:tile] points to run instead")
    ap.add_argument("--max-memory", default=None,
                    help="memory budget of the tiled VAE (e.g. 1G): bounds the mid attention's resident keys and "
                         "values too (default: half the available RAM)")
    ap.add_argument("--store", default="memory", choices=("memory", "disk"),
                    help="where the tiled VAE keeps its whole feature maps (disk: memory grows with the tile only)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per point (1: stable timings on a shared machine)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="where the models run (cuda: also reports the peak allocated GPU memory)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "tiling_bench.json"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.cost_model:
        jobs = cost_model_plan()
    else:
        sizes = [int(s) for s in args.sizes.split(",")]
        jobs = [j for j in default_plan(args.models.split(","), sizes)
                if j["model"] == "tiny" or j["size"] <= args.max_size_full]
    if args.only:
        keep = set(args.only.split(","))
        jobs = [j for j in jobs if j["stage"] in keep]
    if args.stages:
        jobs = []
        for spec in args.stages.split(","):
            parts = spec.split(":")
            job = {"model": parts[0], "stage": parts[1], "size": int(parts[2])}
            if len(parts) > 3:
                job["tile"] = int(parts[3])
            jobs.append(job)
    env = dict(os.environ)
    for j in jobs:
        j["threads"] = args.threads
        if args.device != "cpu":
            j["device"] = args.device
        if j.get("tile") and j["stage"] != "unet":
            j["store"] = args.store
            if args.max_memory:
                j["max_memory"] = args.max_memory
            if args.store == "disk":
                j.pop("store_dtype", None)
        if args.mmap_threshold:
            j["mmap_threshold"] = args.mmap_threshold
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    rows = []
    for job in jobs:
        r = run_job(job, args.timeout, env)
        rows.append(r)
        print(table([r]).splitlines()[-1], flush=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
