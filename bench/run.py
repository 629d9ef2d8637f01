"""Where time and memory go in OSEDiff and CCSR, against the way the official code runs.

    python -m bench                                    # tiny + full models, 512/1024/2048, both methods
    python -m bench --models tiny --sizes 512 --runs 3 --levers
    python -m bench --models full --methods osediff --sizes 512 --threads 2 --json out.json
    python -m bench --device cuda --models full --sizes 512,1024,2048,4096 --levers
    python -m bench --compare old.json --json new.json ...   # ratios of two benchmark runs
    python -m bench --show results.json [--markdown]          # print the tables of a saved run

For every (method, model, size) the same random-weight models run in two modes, in the
same process, alternating run by run (warm-up runs first, not counted):

- ``baseline``: as the official code runs them (bench/baseline.py): peft LoRA unmerged,
  prompt encoded per image, official tile geometry one tile per call, the official VAE
  tiling, CCSR's CFG-duplicated encode; fp16 on a GPU, fp32 on the CPU.
- ``ours``: sr_core's pipelines on DiffusersSD21 with the LoRA merged, the prompt
  embedding cached, one encode, and the levers of ``sr_core.perf.default_options``;
  tiled (TiledVAE + batched latent tiles) from ``--tile-from`` px on.
- ``ours_untiled`` (sizes ≥ --tile-from up to 2048): the same without tiling, the
  reference of the tiled peak memory.

Per stage (text, prepare, encode, control, unet, sampler, decode, color_fix, total) the
median over ``--runs`` runs and the spread (max − min)/median; ratios are medians of the
per-pair ratios ours/baseline (robust to load drift); memory is the peak over the runs
(CPU: RSS high-water mark, CUDA: max allocated) above the start of the run, plus the bytes
of the modes's modules ("peak MB"). ``--levers`` adds each lever measured alone
(bench/levers.py). Results: a table on stdout, everything in ``--json``.

Each (model, method) runs in its own worker process (models built once per process),
so a full-size OSEDiff worker holds two UNets (baseline peft + ours merged): about 9 GB.
Configurations that do not fit ``--mem-cap`` or exceed ``--max-size-*`` are skipped and
listed with the reason.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Extra bytes per OUTPUT pixel of an untiled fp32 VAE pass (measured: bench/tiling_bench.json and
# sr_core.tiling.COST_MODEL); used only to skip what cannot fit.
VAE_BYTES_PER_PX = {("tiny", "encode"): 650.0, ("tiny", "decode"): 950.0,
                    ("full", "encode"): 2600.0, ("full", "decode"): 4000.0}
MODEL_GB = {"tiny": {"osediff": 0.1, "ccsr": 0.1}, "full": {"osediff": 9.0, "ccsr": 6.6}}


def _estimate_gb(model: str, method: str, size: int, mode: str, tile_from: int, cuda: bool) -> float:
    """Rough peak (GB) of one mode at one size: resident models + the largest untiled VAE pass."""
    px = size * size
    scale = 0.5 if cuda else 1.0  # fp16/bf16 activations on the GPU
    enc = VAE_BYTES_PER_PX[(model, "encode")] * px * scale
    dec = VAE_BYTES_PER_PX[(model, "decode")] * px * scale
    if mode == "baseline":
        enc_tiled = method == "osediff" and size > 1088
        dec_tiled = size > 1968
        need = max(0.0 if enc_tiled else enc * (2 if method == "ccsr" else 1), 0.0 if dec_tiled else dec)
    elif mode == "ours" and size >= tile_from:
        need = 0.0
    else:
        need = max(enc, dec)
    return MODEL_GB[model][method] * (0.5 if cuda else 1.0) + need / 1e9


def plan_jobs(args) -> tuple[list[dict], list[dict]]:
    cuda = args.device == "cuda"
    jobs, skipped = [], []
    for model in args.models.split(","):
        for method in args.methods.split(","):
            limit = args.max_size_full if model == "full" else args.max_size_tiny
            sizes, skip = [], []
            for s in (int(x) for x in args.sizes.split(",")):
                if s > limit:
                    skipped.append({"method": method, "model": model, "size": s, "mode": "all",
                                    "reason": f"above --max-size-{model} {limit} (time on this machine)"})
                    continue
                modes = ["baseline", "ours"] + (["ours_untiled"] if args.tile_from <= s <= 2048 else [])
                fits = []
                for mode in modes:
                    gb = _estimate_gb(model, method, s, mode, args.tile_from, cuda)
                    if gb > args.mem_cap:
                        reason = f"needs about {gb:.0f} GB > --mem-cap {args.mem_cap:g} GB"
                        skip.append([s, mode, reason])
                        skipped.append({"method": method, "model": model, "size": s, "mode": mode, "reason": reason})
                    else:
                        fits.append(mode)
                if fits:
                    sizes.append(s)
            if not sizes:
                continue
            jobs.append({
                "model": model, "method": method, "sizes": sizes, "runs": args.runs, "warmup": args.warmup,
                "device": args.device, "threads": args.threads, "tile_from": args.tile_from,
                "max_memory": args.max_memory, "tile_overlap": args.tile_overlap, "batch_tiles": args.batch_tiles,
                "levers": args.levers, "lever_size": args.lever_size, "lever_runs": args.lever_runs,
                "lever_names": args.lever_names.split(",") if args.lever_names else None,
                "ccsr_preset": args.ccsr_preset, "skip": skip, "options": _options(args),
            })
    return jobs, skipped


def _options(args) -> dict:
    o: dict = {}
    if args.compile:
        o["compile"] = True
    for flag in args.set or []:
        k, _, v = flag.partition("=")
        o[k] = {"true": True, "false": False, "none": None}.get(v.lower(), int(v) if v.isdigit() else v)
        if k == "channels_last" and o[k] in (False, None):
            o[k] = ""
    return o


def run_worker(job: dict, timeout: float, in_process: bool) -> dict:
    if in_process:
        from bench.worker import run_job
        return run_job(job)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if job.get("threads"):
        env["OMP_NUM_THREADS"] = str(job["threads"])
    cmd = [sys.executable, "-m", "bench.worker", json.dumps(job)]
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    result = None
    try:
        import selectors
        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        sel.register(p.stderr, selectors.EVENT_READ)
        tail: list[str] = []
        open_streams = 2
        while open_streams:
            if time.time() - t0 > timeout:
                p.kill()
                return {"method": job["method"], "model": job["model"], "error": f"timeout after {timeout:.0f} s",
                        "cases": [], "levers": []}
            for key, _ in sel.select(timeout=1.0):
                line = key.fileobj.readline()
                if not line:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                    continue
                if key.fileobj is p.stdout and line.startswith("BENCH-RESULT "):
                    result = json.loads(line[len("BENCH-RESULT "):])
                elif key.fileobj is p.stderr:
                    if "warn" not in line.lower():
                        print("  " + line.rstrip(), file=sys.stderr, flush=True)
                    tail = (tail + [line.rstrip()])[-20:]
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
    if result is None:
        return {"method": job["method"], "model": job["model"], "cases": [], "levers": [],
                "error": f"worker failed (exit {p.returncode}): " + " | ".join(tail[-5:])}
    result["wall_s"] = time.time() - t0
    return result


# ------------------------------------------------------------------------ tables

_COLS = ("text", "prepare", "encode", "control", "unet", "sampler", "decode", "color_fix", "total")


def _f(v, fmt="{:.2f}") -> str:
    return "" if v is None else fmt.format(v)


def pipeline_table(cases: list[dict], markdown: bool = False) -> str:
    head = ["method", "model", "size", "mode", "tiles"] + [f"{c} s" for c in _COLS] + \
        ["spread", "peak MB", "× base (time)", "× base (peak)"]
    rows = []
    for c in cases:
        for mode, m in c["modes"].items():
            st = m["stages"]
            r = c["ratios"].get(mode, {})
            tot = r.get("total")
            ratio = "" if not tot else f"{tot['median']:.3f} [{tot['min']:.2f}-{tot['max']:.2f}]"
            peak_ratio = "" if "peak_mb" not in r else f"{r['peak_mb']:.2f}"
            if mode == "ours" and "tiled_vs_untiled_peak_mb" in c["ratios"]:
                peak_ratio += f" ({c['ratios']['tiled_vs_untiled_peak_mb']:.2f}× untiled)"
            rows.append([c["method"], c["model"], f"{c['size']}²", mode, str(m.get("tiles", 1))]
                        + [_f(st[k]["median"], "{:.3f}" if st[k]["median"] and st[k]["median"] < 1 else "{:.2f}")
                           for k in _COLS]
                        + [f"{st['total']['spread']:.0%}", f"{m['peak_mb']:.0f}", ratio, peak_ratio])
    return _render(head, rows, markdown)


def lever_table(levers: list[dict], markdown: bool = False) -> str:
    head = ["lever", "stage", "model", "size", "off s", "on s", "on/off", "verdict", "max rel diff", "note"]
    from bench.levers import judge

    rows = []
    for lv in levers:
        r = lv["ratio"]
        lv = dict(lv, verdict=judge(r, lv.get("check")))
        rows.append([lv["lever"], lv["stage"], lv["model"], f"{lv['size']}²", _f(lv["off"]["median"], "{:.3f}"),
                     _f(lv["on"]["median"], "{:.3f}"), f"{r['median']:.3f} [{r['min']:.2f}-{r['max']:.2f}]",
                     lv["verdict"], _f(lv.get("check", {}).get("max_rel_diff"), "{:.1e}"), lv.get("note", "")])
    return _render(head, rows, markdown)


def _render(head: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), "-" * len(line(head))] + [line(r) for r in rows])


def compare_table(old: dict, new: dict) -> str:
    """new/old of the median total time and peak per (method, model, size, mode), and of lever ratios."""
    def index(res):
        return {(c["method"], c["model"], c["size"], m): v for c in res.get("cases", []) for m, v in c["modes"].items()}
    a, b = index(old), index(new)
    head = ["method", "model", "size", "mode", "old s", "new s", "new/old", "old peak MB", "new peak MB"]
    rows = []
    for k in sorted(set(a) & set(b), key=str):
        to, tn = a[k]["stages"]["total"]["median"], b[k]["stages"]["total"]["median"]
        rows.append([k[0], k[1], f"{k[2]}²", k[3], f"{to:.2f}", f"{tn:.2f}", f"{tn / to:.3f}",
                     f"{a[k]['peak_mb']:.0f}", f"{b[k]['peak_mb']:.0f}"])
    return _render(head, rows, False)


def show(res: dict, markdown: bool = False) -> str:
    parts = [f"device: {res['meta'].get('device_name')}  torch {res['meta'].get('torch')}  "
             f"threads {res['meta'].get('threads')}  runs {res['meta'].get('runs')} (+{res['meta'].get('warmup')} "
             f"warm-up)"]
    if res.get("cases"):
        parts += ["", pipeline_table(res["cases"], markdown)]
    if res.get("levers"):
        parts += ["", lever_table(res["levers"], markdown)]
    if res.get("skipped"):
        parts += ["", "skipped:"] + [f"  {s['method']} {s['model']} {s['size']}² {s['mode']}: {s['reason']}"
                                     for s in res["skipped"]]
    for e in res.get("errors", []):
        parts.append(f"error: {e}")
    return "\n".join(parts)


def _meta(args) -> dict:
    import torch
    meta = {"command": "python -m bench " + " ".join(sys.argv[1:]), "date": datetime.datetime.now().isoformat(
        timespec="seconds"), "device": args.device, "torch": torch.__version__, "python": platform.python_version(),
        "runs": args.runs, "warmup": args.warmup, "threads": args.threads or torch.get_num_threads()}
    try:
        import diffusers
        import peft
        meta.update(diffusers=diffusers.__version__, peft=peft.__version__)
    except ImportError:
        pass
    if args.device == "cuda" and torch.cuda.is_available():
        meta["device_name"] = torch.cuda.get_device_name()
    else:
        name = platform.processor()
        try:
            with open("/proc/cpuinfo") as f:
                name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
        except OSError:
            pass
        meta["device_name"] = f"{name}, {os.cpu_count()} CPUs"
    try:
        meta["load_avg"] = os.getloadavg()
    except OSError:
        pass
    return meta


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,full", help="tiny,full")
    ap.add_argument("--methods", default="osediff,ccsr", help="osediff,ccsr")
    ap.add_argument("--sizes", default="512,1024,2048", help="output sizes (px, square), e.g. 512,1024,2048,4096")
    ap.add_argument("--runs", type=int, default=3, help="counted runs per mode (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up runs per mode (not counted)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--levers", action="store_true", help="also measure each lever alone")
    ap.add_argument("--lever-size", type=int, default=None, help="output px of the lever measurements "
                                                                 "(default: the smallest size)")
    ap.add_argument("--lever-runs", type=int, default=None, help="runs per lever side (default: --runs)")
    ap.add_argument("--lever-names", default="", help="only these levers (name or name:stage, comma list)")
    ap.add_argument("--tile-from", type=int, default=2048, help="ours tiles from this output size on")
    ap.add_argument("--max-memory", default="2G", help="tile memory budget of ours (TileSettings.max_memory)")
    ap.add_argument("--tile-overlap", type=int, default=32, help="latent overlap of ours' tiles")
    ap.add_argument("--batch-tiles", type=int, default=None, help="latent tiles per UNet call (default: the "
                                                                   "device default of sr_core.perf)")
    ap.add_argument("--ccsr-preset", default="two-step", help="CCSR v2 preset (one-step, two-step)")
    ap.add_argument("--compile", action="store_true", help="torch.compile ours' UNet and VAE (GPU)")
    ap.add_argument("--set", action="append", metavar="OPTION=VALUE",
                    help="override a lever of ours (sr_core.perf.PerfOptions), e.g. "
                         "--set channels_last=unet,decoder or --set fold_upsample=false")
    ap.add_argument("--max-size-full", type=int, default=None,
                    help="largest size for the full models (default: 512 on the CPU, no limit on CUDA)")
    ap.add_argument("--max-size-tiny", type=int, default=None,
                    help="largest size for the tiny models (default: 2048 on the CPU, no limit on CUDA)")
    ap.add_argument("--mem-cap", type=float, default=None, help="skip modes estimated above this many GB "
                                                                "(default: 12 on the CPU, the GPU's memory on CUDA)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker")
    ap.add_argument("--in-process", action="store_true", help="run the workers in this process (debugging)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "latest.json"),
                    help="where to write the results (default bench/results/latest.json)")
    ap.add_argument("--compare", help="a previous --json to compare with")
    ap.add_argument("--show", help="print the tables of a saved --json and exit")
    ap.add_argument("--markdown", action="store_true", help="tables in markdown")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.show:
        print(show(json.loads(Path(args.show).read_text()), args.markdown))
        return 0
    cuda = args.device == "cuda"
    if cuda:
        import torch
        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device here", file=sys.stderr)
            return 2
        if args.mem_cap is None:
            args.mem_cap = torch.cuda.get_device_properties(0).total_memory / 1e9
    args.mem_cap = 12.0 if args.mem_cap is None else args.mem_cap
    args.max_size_full = args.max_size_full or (1 << 20 if cuda else 512)
    args.max_size_tiny = args.max_size_tiny or (1 << 20 if cuda else 2048)
    jobs, skipped = plan_jobs(args)
    res: dict = {"meta": _meta(args), "workers": [], "cases": [], "levers": [], "skipped": skipped, "errors": []}
    for job in jobs:
        print(f"worker: {job['method']} {job['model']} sizes {job['sizes']}", file=sys.stderr, flush=True)
        w = run_worker(job, args.timeout, args.in_process)
        res["workers"].append({k: v for k, v in w.items() if k not in ("cases", "levers")})
        res["cases"] += w.get("cases", [])
        res["levers"] += w.get("levers", [])
        if w.get("error"):
            res["errors"].append(f"{job['method']} {job['model']}: {w['error']}")
        for c in w.get("cases", []):
            for mode, reason in c.get("skipped", {}).items():
                if not any(s["size"] == c["size"] and s["mode"] == mode and s["method"] == c["method"]
                           and s["model"] == c["model"] for s in skipped):
                    skipped.append({"method": c["method"], "model": c["model"], "size": c["size"], "mode": mode,
                                    "reason": reason})
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(res, indent=1))
    print(show(res, args.markdown))
    if args.compare:
        print("\ncompared with " + args.compare + ":")
        print(compare_table(json.loads(Path(args.compare).read_text()), res))
    return 1 if res["errors"] else 0


if __name__ == "__main__":  # python bench/run.py ... (python -m bench ... is the same)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    sys.exit(main())
