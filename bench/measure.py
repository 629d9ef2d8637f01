"""Clocks, stage recording, peak memory and statistics for the benchmark.

Times: ``time.perf_counter`` after ``torch.cuda.synchronize()`` on CUDA (every stage
boundary synchronises, so a stage's time is its GPU work). Memory: on the CPU the
process's peak RSS (``VmHWM`` of /proc/self/status, reset through /proc/self/clear_refs at
the start of every run and stage, after ``malloc_trim(0)`` so that memory glibc kept from
an earlier run is not silently reused); on CUDA ``torch.cuda.max_memory_allocated``. Both
are reported as *extra* bytes over what was resident when the run started (activations,
stored maps, caches) and, with the bytes of the modules the mode uses, as an estimated
peak of a process that holds only that mode's models.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch

MB = 2 ** 20


def _read_status(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_bytes() -> int:
    return _read_status("VmRSS")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_LIBC = None


def malloc_trim() -> None:
    """Give free heap memory back to the OS (glibc), so RSS is live memory only."""
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Memory:
    """Peak-memory probe of one device: ``start()`` resets, ``peak_extra()`` reads."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.base = 0
        self.hwm_ok = True

    def current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        return rss_bytes()

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            malloc_trim()
            self.hwm_ok = _reset_hwm()
        self.base = self.current()

    def peak_extra(self) -> int:
        if self.cuda:
            return max(0, torch.cuda.max_memory_allocated(self.device) - self.base)
        # without a reset (no clear_refs) VmHWM is the process's lifetime peak: an upper bound
        return max(0, _read_status("VmHWM") - self.base)


class Recorder:
    """Stage times and call counts of one run.

    ``mark(name)`` closes the open stage and opens ``name`` (``mark(None)`` closes);
    ``timed(name, fn)`` wraps a callable so every call adds its time to ``name`` and counts
    a call (nested inside the open stage, e.g. UNet calls inside "sample"). Peak memory is
    tracked for the whole run (and per top-level stage on the CPU and CUDA).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.times: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.stage_peak: dict[str, int] = {}
        self.mem = Memory(device)
        self._open: str | None = None
        self._t_open = 0.0
        self._t_start = 0.0
        self.total = 0.0
        self.peak = 0

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def begin(self) -> None:
        self.mem.start()
        self._t_start = self.now()

    def mark(self, name: str | None) -> None:
        t = self.now()
        if self._open is not None:
            self.times[self._open] += t - self._t_open
            self.calls[self._open] += 1
            peak = self.mem.peak_extra()
            self.peak = max(self.peak, peak)
            self.stage_peak[self._open] = max(self.stage_peak.get(self._open, 0), peak)
        self._open = name
        self._t_open = self.now() if name is not None else t

    def end(self) -> None:
        self.mark(None)
        self.total = self.now() - self._t_start
        self.peak = max(self.peak, self.mem.peak_extra())

    def timed(self, name: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            t0 = self.now()
            out = fn(*args, **kwargs)
            self.times[name] += self.now() - t0
            self.calls[name] += 1
            return out
        return wrapper

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        t0 = self.now()
        try:
            yield
        finally:
            self.times[name] += self.now() - t0
            self.calls[name] += 1


# ------------------------------------------------------------------------ stats


def summary(values: list[float]) -> dict:
    """median, min, max and relative spread ((max − min) / median) of ``values``."""
    if not values:
        return {"median": None, "min": None, "max": None, "spread": None, "n": 0}
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / med if med else 0.0, "n": len(values)}


def paired_ratio(num: list[float], den: list[float]) -> dict:
    """Ratios num[i] / den[i] of runs made back to back (robust to a machine whose load
    drifts): their median, min and max."""
    r = [a / b for a, b in zip(num, den) if b]
    return summary(r)


def module_bytes(*modules) -> int:
    """Bytes of the parameters and buffers of ``modules`` (each tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for m in modules:
        if m is None:
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            if t.data_ptr() in seen or t.is_meta:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
