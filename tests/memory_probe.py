"""Measure what repeated OSEDiff + CCSR runs leave behind in a fresh process (used by test_memory_release.py).

``python memory_probe.py SD_FOLDER OSEDIFF_PKL CCSR_V2_FOLDER RUNS`` loads the tiny models once, runs
both pipelines once to warm up (allocator pools, lazily built classes, cached prompt embeddings),
then measures one run's transient memory (peak RSS of the run above the RSS before it) and runs
RUNS more times, dropping every result. Prints one JSON line: ``rss_start`` (bytes after the warm
up), ``transient`` (one run's peak above it), ``rss`` (after each further run), ``tensors`` (live
torch tensors the garbage collector sees after each run, and ``tensors_start``), ``model_bytes``
(the parameters of the smallest module set a run uses: one UNet).

Linux only (/proc). glibc's heap keeps freed buffers below its mmap threshold resident, so the
process first calls ``sr_core.tiling.limit_cpu_heap_retention()`` as the command line does.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parent), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """Resident set size of this process in bytes (/proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def live_tensors() -> int:
    """Tensors reachable by the garbage collector (parameters and buffers included)."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def peak_during(fn) -> int:
    """Peak RSS in bytes while ``fn()`` runs: the kernel's high-water mark reset first
    (/proc/self/clear_refs "5"), or, where that is not allowed, RSS sampled every millisecond."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        peak, done = [rss()], threading.Event()

        def sample() -> None:
            while not done.wait(0.001):
                peak[0] = max(peak[0], rss())

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        try:
            fn()
        finally:
            done.set()
            t.join()
        return max(peak[0], rss())
    fn()
    with open("/proc/self/status") as f:
        hwm = next(line for line in f if line.startswith("VmHWM:"))
    return int(hwm.split()[1]) * 1024


def main(sd_folder: str, osediff_pkl: str, ccsr_folder: str, runs: int) -> dict:
    from sr_core.ccsr import NEGATIVE_PROMPT, POSITIVE_PROMPT, v2_settings
    from sr_core.ccsr_host import load_ccsr
    from sr_core.ccsr_pipeline import upscale_ccsr
    from sr_core.diffusers_host import DiffusersSD21
    from sr_core.osediff import load_osediff_weights
    from sr_core.pipeline import upscale_osediff
    from sr_core.tiling import limit_cpu_heap_retention

    limit_cpu_heap_retention()
    torch.set_num_threads(1)
    osediff = DiffusersSD21.load(sd_folder)
    osediff.apply_osediff(load_osediff_weights(osediff_pkl))
    osediff.to_compute()
    ccsr = DiffusersSD21.load(sd_folder)
    models = load_ccsr(ccsr, ccsr_folder)
    ctx = osediff.encode_prompt("")
    pos, neg = ccsr.encode_prompt(POSITIVE_PROMPT), ccsr.encode_prompt(NEGATIVE_PROMPT)
    settings = v2_settings("two-step")
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))

    def run_once() -> None:
        out = upscale_osediff(osediff, osediff, image, ctx, scale=4.0)
        assert out.shape == (1, 3, 128, 192)
        out = upscale_ccsr(ccsr, ccsr, models.control, image, pos, neg, settings=settings, scale=4.0,
                           decoder_vae=models.decoder, process_size=None)
        assert out.shape == (1, 3, 128, 192)

    with torch.no_grad():
        run_once()
        gc.collect()
        report = {"rss_start": rss(), "tensors_start": live_tensors(), "rss": [], "tensors": []}
        report["transient"] = peak_during(run_once) - report["rss_start"]
        for _ in range(runs):
            run_once()
            report["tensors"].append(live_tensors())
            report["rss"].append(rss())
    report["model_bytes"] = sum(p.numel() * p.element_size() for p in osediff.unet.parameters())
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))))
