"""The benchmark end to end in its smallest configuration, and the levers it measures.

No timing is asserted anywhere: only that the benchmark runs, reports every stage for both
modes, and that the levers compute the same function as the plain path.
"""
from __future__ import annotations

import json
from pathlib import Path
import subprocess
import sys

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent  # (not from conftest: tests/host has one too)

STAGES = ("text", "prepare", "encode", "control", "unet", "sampler", "decode", "color_fix", "total")


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory) -> dict:
    pytest.importorskip("peft")  # the baseline runs the official peft adapters (test extra)
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    cmd = [sys.executable, "-m", "bench", "--models", "tiny", "--methods", "osediff,ccsr", "--sizes", "128",
           "--runs", "1", "--warmup", "0", "--tile-from", "128", "--max-memory", "64M", "--levers",
           "--lever-size", "128", "--lever-runs", "1", "--threads", "1", "--json", str(out)]
    p = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    res["_stdout"] = p.stdout
    return res


def test_every_stage_and_both_modes_are_reported(bench_result):
    assert not bench_result["errors"]
    cases = {(c["method"], c["size"]): c for c in bench_result["cases"]}
    assert set(cases) == {("osediff", 128), ("ccsr", 128)}
    for (method, _), case in cases.items():
        assert case["model"] == "tiny" and case["tiled"] is True
        assert set(case["modes"]) == {"baseline", "ours", "ours_untiled"}
        for mode in case["modes"].values():
            assert set(mode["stages"]) == set(STAGES)
            assert mode["output_ok"]
            assert mode["stages"]["total"]["n"] == 1 and mode["stages"]["total"]["median"] > 0
            assert mode["peak_mb"] >= mode["model_mb"] > 0
            assert mode["calls"]["unet"] >= 1
            assert (mode["calls"]["control"] >= 1) == (method == "ccsr")
        # baseline/optimised pairs: a ratio for every stage the baseline spends time in, and memory
        for mode in ("ours", "ours_untiled"):
            ratios = case["ratios"][mode]
            assert "total" in ratios and "encode" in ratios and "unet" in ratios and "decode" in ratios
            assert ratios["total"]["n"] == 1 and ratios["peak_mb"] > 0
        assert case["ratios"]["tiled_vs_untiled_peak_mb"] > 0
    ccsr = cases[("ccsr", 128)]
    assert ccsr["modes"]["baseline"]["calls"]["unet"] == 2  # two-step: 999 alone, then one CFG batch of 2
    assert ccsr["modes"]["ours"]["calls"]["unet"] == 2  # the CFG pair batched (sr_core.perf default on the CPU too)


def test_levers_are_measured_and_compute_the_same_function(bench_result):
    levers = {(lv["method"], lv["lever"], lv["stage"]): lv for lv in bench_result["levers"]}
    expected = {("osediff", "lora_merge", "unet"), ("osediff", "lora_merge", "encode"),
                ("osediff", "text_cache", "text"),
                ("osediff", "sdpa", "unet"), ("osediff", "sdpa", "decode"), ("osediff", "channels_last", "unet"),
                ("osediff", "channels_last", "encode"), ("osediff", "channels_last", "decode"),
                ("osediff", "fold_upsample", "decode"), ("osediff", "fold_upsample", "unet"),
                ("osediff", "bf16", "decode"), ("osediff", "bf16", "unet"), ("osediff", "batch_tiles", "unet"),
                ("ccsr", "cfg_batch", "control+unet"), ("ccsr", "single_encode", "encode"),
                ("ccsr", "channels_last", "control")}
    assert expected <= set(levers)
    for key, lv in levers.items():
        assert lv["off"]["n"] == 1 and lv["on"]["n"] == 1 and lv["ratio"]["median"] is not None
        assert lv["verdict"] in ("pays", "no clear gain", "does not pay", "unsafe (non-finite output)")
        if key[1] == "text_cache":
            continue
        tol = 5e-2 if key[1] == "bf16" else 1e-4  # bf16 keeps 8 mantissa bits
        assert lv["check"]["finite_on"] and lv["check"]["max_rel_diff"] < tol, (key, lv["check"])


def test_tables_print_and_a_saved_run_compares(bench_result, tmp_path):
    assert "× base (time)" in bench_result["_stdout"] and "lever" in bench_result["_stdout"]
    saved = tmp_path / "a.json"
    saved.write_text(json.dumps({k: v for k, v in bench_result.items() if k != "_stdout"}))
    from bench.run import compare_table, show

    text = show(json.loads(saved.read_text()), markdown=True)
    assert "| osediff | tiny | 128² | baseline |" in text
    cmp = compare_table(bench_result, bench_result)
    assert "1.000" in cmp


# ----------------------------------------------------------------------------------- levers


def test_folded_upsample_is_the_same_function(monkeypatch):
    import tiny_models
    import sr_core.perf as perf
    from sr_core.perf import fold_kernel, fold_upsamplers, set_channels_last, set_contiguous, unfold_upsamplers

    monkeypatch.setattr(perf, "FOLD_MIN_PIXELS", 0)  # fold the small maps of the tiny models too

    unet, vae, _ = tiny_models.build_models(0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w = torch.randn(5, 3, 3, 3, generator=g)
        x = torch.randn(2, 3, 7, 6, generator=g)
        ref = torch.nn.functional.conv2d(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"), w,
                                         padding=1)
        out = torch.nn.functional.conv_transpose2d(x, fold_kernel(w), stride=2, padding=1)
        assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)

        z = torch.randn(1, 4, 12, 10, generator=g)
        dec_ref = vae.decode(z).sample
        keys = list(vae.state_dict())
        folded = fold_upsamplers(vae)
        assert len(folded) == 3 and list(vae.state_dict()) == keys
        set_channels_last(vae)
        dec = vae.decode(z).sample
        assert all("_fold_cache" in m.__dict__ for m in folded)  # the folded path ran
        set_contiguous(vae)
        assert (dec - dec_ref).abs().max() <= 1e-4 * dec_ref.abs().max()
        unfold_upsamplers(folded)
        assert torch.equal(vae.decode(z).sample, dec_ref)

        ctx = torch.randn(1, 77, 32, generator=g)
        for shape in ((1, 4, 16, 24), (1, 4, 13, 21)):  # the second needs the UNet's output_size: fallback path
            xt = torch.randn(shape, generator=g)
            ref = unet(xt, 999, encoder_hidden_states=ctx).sample
            f = fold_upsamplers(unet)
            got = unet(xt, 999, encoder_hidden_states=ctx).sample
            unfold_upsamplers(f)
            assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_baseline_peft_lora_is_the_same_model_as_the_merged_host():
    """The baseline's unmerged peft adapters and DiffusersSD21's merged weights compute the same ε and moments."""
    import copy

    pytest.importorskip("peft")
    import tiny_models
    from bench.baseline import inject_official_lora
    from sr_core.diffusers_host import DiffusersSD21
    from sr_core.osediff import parse_official_dict

    unet, vae, text = tiny_models.build_models(0)
    d = tiny_models.make_osediff_dict(unet, vae)
    unet_b, vae_b = copy.deepcopy(unet), copy.deepcopy(vae)
    assert inject_official_lora(unet_b, vae_b, d) == 258 + 32
    host = DiffusersSD21(unet, vae, text, None)
    host.apply_osediff(parse_official_dict(d, "test"))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 77, 32, generator=g)
    px = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        ref = unet_b(x, torch.tensor([999]), encoder_hidden_states=ctx).sample
        got = host.predict_eps(x, 999, ctx)
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
        m_ref = vae_b.encode(px).latent_dist.mean
        m_got, _ = host.encode_moments(px)
        assert (m_got - m_ref).abs().max() <= 1e-4 * m_ref.abs().max()


def test_official_vae_tile_grid_covers_the_axis_once():
    from bench.baseline import DEC_PAD, DEC_TILE, ENC_PAD, ENC_TILE, official_axis_tiles

    for size, tile, pad in [(2048, ENC_TILE, ENC_PAD), (4096, ENC_TILE, ENC_PAD), (256, DEC_TILE, DEC_PAD),
                            (512, DEC_TILE, DEC_PAD), (300, DEC_TILE, DEC_PAD), (1100, ENC_TILE, ENC_PAD)]:
        tiles = official_axis_tiles(size, tile, pad)
        covered = [o for (_, _, a, b) in tiles for o in range(a, b)]
        assert covered == list(range(size)), (size, tiles)
        for i0, i1, o0, o1 in tiles:
            assert 0 <= i0 <= o0 < o1 <= i1 <= size and i1 - i0 <= tile + 2 * pad
    assert len(official_axis_tiles(2048, ENC_TILE, ENC_PAD)) == 2
    assert len(official_axis_tiles(256, DEC_TILE, DEC_PAD)) == 2


def test_batched_cfg_and_split_precision_vae_match_the_plain_path():
    import tiny_models
    from ccsr_fixtures import CONTROL_CONFIG, v2_state_dict
    from sr_core.ccsr import ControlWeights, ccsr_eps, load_control_net
    from sr_core.ccsr_host import DiffusersControlBranch
    from sr_core.diffusers_host import DiffusersSD21
    from sr_core.perf import PerfOptions, SplitPrecisionVAE, apply_options, batched_cfg_eps

    unet, vae, text = tiny_models.build_models(0)
    host = DiffusersSD21(unet, vae, text, None)
    net = load_control_net(ControlWeights("v2", dict(CONTROL_CONFIG), v2_state_dict(0), "test"))
    control = DiffusersControlBranch(net, device=torch.device("cpu"), dtype=torch.float32, version="v2", source="t")
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    pos, neg = torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        ref = ccsr_eps(host, control, x, 499, c, pos, neg, 4.5)
        got = batched_cfg_eps(host, control)(x, 499, c, pos, neg, 4.5)
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
        z = torch.randn(1, 4, 8, 8, generator=g)
        before = host.decode(z)
        undo = apply_options(host, PerfOptions(channels_last=("unet", "encoder", "decoder", "control"),
                                                fold_upsample=True), extra_modules=[net])
        after = host.decode(z)
        assert (after - before).abs().max() <= 1e-4 * before.abs().max()
        undo()
        split = SplitPrecisionVAE(host, torch.bfloat16, keep_original=True)
        low = split.decode(z)
        assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
        split.restore()
        assert torch.equal(host.decode(z), before)
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):  # refused, nothing changed
        apply_options(host, PerfOptions(cuda_graphs=True, channels_last=("unet",)))
    assert "forward" not in host.unet.__dict__ and host.unet.conv_in.weight.is_contiguous()
