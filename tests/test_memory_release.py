"""Memory is given back after a run: RSS measured over repeated runs, and weak references to what a
run creates (its intermediate tensors, the patched models of a command) dead once it is over."""
from __future__ import annotations

import gc
import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

import ccsr_fixtures as fx
from sr_core.ccsr import NEGATIVE_PROMPT, POSITIVE_PROMPT, v2_settings
from sr_core.ccsr_host import load_ccsr
from sr_core.ccsr_pipeline import upscale_ccsr
from sr_core.diffusers_host import DiffusersSD21
from sr_core.osediff import load_osediff_weights
from sr_core.pipeline import upscale_osediff

HERE = Path(__file__).resolve().parent
RUNS = 4

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@pytest.fixture(scope="module")
def ccsr_folder(tmp_path_factory) -> Path:
    return fx.write_v2_folder(tmp_path_factory.mktemp("ccsr_mem") / "ccsr-v2")


def test_repeated_runs_leave_rss_and_live_tensors_where_they_were(sd_folder, osediff_pkl, ccsr_folder):
    """memory_probe.py in a fresh process: after one warm-up run of OSEDiff + CCSR v2 (two-step, GAN
    decoder) on a 32×48 image (×4), RUNS more runs must leave

    - the number of live tensors exactly unchanged: any tensor of a run kept afterwards (an output,
      a latent, a cached activation, however small) shows up here;
    - RSS within a quarter of one run's transient (its peak above the RSS before it, measured:
      about 24 MB; RSS moved by under 1.5 MB between runs): a run that kept a twentieth of its
      transient, RUNS times, or one more copy of a UNet (34 MB here, checked to exceed the bound),
      crosses it. The process limits glibc's heap retention first, as the command line does.
    """
    proc = subprocess.run([sys.executable, str(HERE / "memory_probe.py"), str(sd_folder), str(osediff_pkl),
                           str(ccsr_folder), str(RUNS)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    bound = r["transient"] / 4
    assert r["transient"] > 4 << 20, r  # the run does allocate: the bound is not vacuous
    assert r["model_bytes"] > bound, r  # a leaked UNet would exceed it
    assert r["tensors"] == [r["tensors_start"]] * RUNS, r
    growth = r["rss"][-1] - r["rss_start"]
    assert growth < bound, f"RSS grew {growth / 2**20:.1f} MiB over {RUNS} runs (bound {bound / 2**20:.1f} MiB): {r}"


class _Spy:
    """Delegates to a host / control branch and keeps a weak reference to every tensor a run passes
    through it (inputs and results of encode, UNet, control branch and decode calls)."""

    def __init__(self, inner: object, refs: list) -> None:
        self._inner, self._refs = inner, refs

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def _keep(self, *tensors) -> None:
        for t in tensors:
            if isinstance(t, (list, tuple)):
                self._keep(*t)
            elif isinstance(t, torch.Tensor):
                self._refs.append(weakref.ref(t))

    def predict_eps(self, x_t, t, context, control=None):
        eps = self._inner.predict_eps(x_t, t, context, control)
        self._keep(x_t, control, eps)
        return eps

    def encode_moments(self, pixels):
        out = self._inner.encode_moments(pixels)
        self._keep(pixels, out)
        return out

    def decode(self, raw):
        out = self._inner.decode(raw)
        self._keep(raw, out)
        return out

    def residuals(self, x_t, t, context, cond_latent):
        out = self._inner.residuals(x_t, t, context, cond_latent)
        self._keep(x_t, cond_latent, out)
        return out


def test_a_runs_tensors_die_with_it_and_models_with_their_last_reference(sd_folder, osediff_pkl, ccsr_folder):
    """Every tensor a run passed through the models is freed by reference counting when the run
    returns and its result is dropped (no garbage-collector pass: nothing waits in a cycle), while
    the models stay loaded; the models themselves (OSEDiff-merged host, CCSR control branch and GAN
    decoder) are collected once the caller drops them: nothing in sr_core keeps them."""
    image = torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(1))
    osediff = DiffusersSD21.load(sd_folder)
    osediff.apply_osediff(load_osediff_weights(osediff_pkl))
    ccsr = DiffusersSD21.load(sd_folder)
    models = load_ccsr(ccsr, ccsr_folder)
    model_refs = [weakref.ref(m) for m in (osediff, osediff.unet, osediff.vae, ccsr, ccsr.unet, models.control,
                                           models.control.net, models.decoder, models.decoder.parts)]
    ctx, pos, neg = osediff.encode_prompt(""), ccsr.encode_prompt(POSITIVE_PROMPT), ccsr.encode_prompt(NEGATIVE_PROMPT)
    refs: list = []
    gc.collect()
    gc.disable()
    try:
        o = _Spy(osediff, refs)
        out = upscale_osediff(o, o, image, ctx, scale=2.0)
        refs.append(weakref.ref(out))
        c, dec = _Spy(ccsr, refs), _Spy(models.decoder, refs)
        out = upscale_ccsr(c, c, _Spy(models.control, refs), image, pos, neg, settings=v2_settings("two-step"),
                           scale=2.0, decoder_vae=dec, process_size=None)
        refs.append(weakref.ref(out))
        assert tuple(out.shape) == (1, 3, 24, 20)
        del out, o, c, dec
        alive = [tuple(r().shape) for r in refs if r() is not None]
        assert len(refs) > 20
        assert alive == [], f"{len(alive)} of the run's {len(refs)} tensors still alive, shapes {alive}"
    finally:
        gc.enable()
    assert all(r() is not None for r in model_refs)  # the models were still loaded meanwhile
    del osediff, ccsr, models, ctx, pos, neg
    gc.collect()
    assert [r for r in model_refs if r() is not None] == []


def test_the_command_lets_go_of_its_patched_model(sd_folder, osediff_pkl, image_folder, tmp_path, monkeypatch):
    """`upscale` run in-process (a notebook, a batch script): once main() returns, the base model it
    loaded and patched (OSEDiff merged into its UNet and VAE encoder) is collected."""
    from sr_core.cli import main

    loaded: list = []
    real_load = DiffusersSD21.load.__func__

    def load(cls, *args, **kwargs):
        host = real_load(cls, *args, **kwargs)
        loaded.extend(weakref.ref(m) for m in (host, host.unet, host.vae, host.text_encoder))
        return host

    monkeypatch.setattr(DiffusersSD21, "load", classmethod(load))
    assert main(["upscale", str(image_folder / "cat.jpg"), "-o", str(tmp_path), "--base", str(sd_folder),
                 "--weights", str(osediff_pkl), "--scale", "2"]) == 0
    assert (tmp_path / "cat.png").is_file()
    gc.collect()
    assert len(loaded) == 4 and [r for r in loaded if r() is not None] == []
