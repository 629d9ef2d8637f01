"""Same weights through both hosts: ComfyUI's loaded checkpoint vs sr_core's diffusers host.

Run with ComfyUI's python (it imports ``comfy``): ``python parity_check.py COMFYUI_DIR WORKDIR``.
Builds one random full-architecture SD 2.1-base model (seeded), saves it as a diffusers folder
and as a single-file ldm checkpoint (what Load Checkpoint reads), writes a random osediff.pkl
in the official layout, runs OSEDiff through the pack's node functions on the ComfyUI side
and through sr_core's diffusers host, all in fp32, and prints a JSON report on stdout.
Also checks that the user's MODEL and VAE give bit-identical results before and after.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def _import_pack():
    spec = importlib.util.spec_from_file_location("comfyui_ccsr_osediff_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    spec.loader.exec_module(pack)
    return pack


CCSR_CASES = {
    "two_step": dict(steps=6, t_max=0.6667, t_min=0.5, cfg=4.5),
    "one_step": dict(steps=1, t_max=0.6666, t_min=0.0, cfg=1.0),
}


def main(comfy_dir: str, work: str) -> dict:
    sys.path.insert(0, comfy_dir)
    sys.path.insert(0, str(HERE.parent))
    sys.path.insert(0, str(HERE))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management as mm
    import comfy.sd
    from safetensors.torch import save_file

    import tiny_models

    pack = _import_pack()
    from comfyui_ccsr_osediff_pack.nodes import comfy_host, sr_nodes  # noqa: E402
    from comfyui_ccsr_osediff_pack.sr_core import keymap, sd21
    from comfyui_ccsr_osediff_pack.sr_core.diffusers_host import DiffusersSD21
    from comfyui_ccsr_osediff_pack.sr_core.osediff import load_osediff_weights
    from comfyui_ccsr_osediff_pack.sr_core.pipeline import upscale_osediff

    torch.set_num_threads(4)
    work_dir = Path(work)
    folder = work_dir / "sd21-diffusers"
    unet, vae, text = tiny_models.build_models(seed=11, unet_config=dict(sd21.UNET_CONFIG),
                                               vae_config=dict(sd21.VAE_CONFIG),
                                               text_config={**sd21.TEXT_ENCODER_CONFIG, "num_hidden_layers": 2})
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    tiny_models.write_tokenizer(folder / "tokenizer")
    sd = {f"model.diffusion_model.{k}": v.contiguous() for k, v in keymap.unet_diffusers_to_ldm(unet.state_dict(), sd21.UNET_CONFIG).items()}
    sd.update({f"first_stage_model.{k}": v.contiguous() for k, v in keymap.vae_diffusers_to_ldm(vae.state_dict(), sd21.VAE_CONFIG).items()})
    ckpt = work_dir / "sd21-random-fp32.safetensors"
    save_file(sd, str(ckpt))
    pkl = tiny_models.write_osediff_pkl(work_dir / "osediff.pkl", unet, vae, seed=3)
    from random_weights import write_ccsr_v2

    ccsr_dir = write_ccsr_v2(work_dir / "ccsr-v2", vae)
    del unet, vae, text, sd

    g = torch.Generator().manual_seed(0)
    lq = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 5, generator=g), size=(30, 27), mode="bilinear")
    context = torch.randn(1, 77, 1024, generator=g)
    context_neg = torch.randn(1, 77, 1024, generator=g)
    weights = load_osediff_weights(pkl)

    # --- ComfyUI side -------------------------------------------------------------------
    model, _clip, cvae = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=False)[:3]
    report: dict = {"comfy_model_class": type(model.model.model_config).__name__,
                    "comfy_unet_dtype": str(model.model.get_dtype()), "comfy_vae_dtype": str(cvae.vae_dtype)}
    probe_latent = torch.randn(1, 4, 8, 8, generator=g)
    probe_sigma = torch.tensor([3.0])

    def user_outputs():
        mm.load_models_gpu([model])
        with torch.no_grad():
            eps_out = model.model.apply_model(probe_latent, probe_sigma, c_crossattn=context).cpu()
        return eps_out, cvae.decode(probe_latent).cpu(), cvae.encode(lq.movedim(1, -1)).cpu()

    # the loader refuses other families with a message naming them (fake MODELs: only the config differs)
    import types

    import comfy.supported_models as sm
    refusals = {}
    for cls in (sm.SD15, sm.SDXL, sm.SD21UnclipH):
        fake = types.SimpleNamespace(model=types.SimpleNamespace(model_config=cls({"in_channels": 4})))
        try:
            comfy_host.check_host_model(fake)
            refusals[cls.__name__] = None
        except Exception as e:  # noqa: BLE001 - the message is what is checked
            refusals[cls.__name__] = f"{type(e).__name__}: {e}"
    report["refusals"] = refusals

    before = user_outputs()
    sr_model = comfy_host.build_osediff_model(model, cvae, weights, "osediff.pkl")
    latent, reference = sr_nodes.encode_lq(sr_model, lq.movedim(1, -1), 4.0, "bicubic")
    sampled = sr_nodes.sample(sr_model, latent, [[context, {}]], 0, "mean")
    comfy_out = {fix: sr_nodes.decode(sampled, reference, fix, sr_model).movedim(-1, 1) for fix in ("none", "adain")}
    # tiles forced small through the node functions: the tiled VAE matches, the tiled UNet runs
    from comfyui_ccsr_osediff_pack.sr_core.tiling import TileSettings

    small = TileSettings(mode="explicit", latent_tile=8, overlap=4, vae_encoder_tile=64, vae_decoder_tile=8)
    lat_t, _ = sr_nodes.encode_lq(sr_model, lq.movedim(1, -1), 4.0, "bicubic", 512, small)
    dec_t = sr_nodes.decode(sampled, reference, "none", sr_model, tiling=small).movedim(-1, 1)
    sam_t = sr_nodes.sample(sr_model, latent, [[context, {}]], 0, "mean", tiling=small)
    report["tiled_lq_latent"] = {"max_abs": float((lat_t["samples"] - latent["samples"]).abs().max())}
    mse = float(((dec_t - comfy_out["none"]) ** 2).mean())
    report["tiled_decode_psnr"] = 99.0 if mse == 0 else 10 * float(torch.log10(torch.tensor(1.0 / mse)))
    report["tiled_unet_shape_ok"] = tuple(sam_t["samples"].shape) == tuple(sampled["samples"].shape)
    after = user_outputs()
    report["user_model_unchanged"] = bool(torch.equal(before[0], after[0]))
    report["user_vae_decode_unchanged"] = bool(torch.equal(before[1], after[1]))
    report["user_vae_encode_unchanged"] = bool(torch.equal(before[2], after[2]))


    comfy_latent = latent["samples"].clone()
    comfy_x0 = sampled["samples"].clone()
    from comfyui_ccsr_osediff_pack.nodes import ccsr_host
    from comfyui_ccsr_osediff_pack.sr_core.ccsr import load_ccsr_weights

    cw = load_ccsr_weights(ccsr_dir)
    ccsr_model = ccsr_host.build_ccsr_model(model, cvae, cw, "ccsr-v2", cw.decoder)
    c_latent, c_ref = sr_nodes.encode_lq(ccsr_model, lq.movedim(1, -1), 4.0, "bicubic", 0)
    ccsr_comfy = {}
    for name, kw in CCSR_CASES.items():
        out_latent = sr_nodes.sample(ccsr_model, c_latent, [[context, {}]], 7, "mean", [[context_neg, {}]], **kw)
        ccsr_comfy[name] = sr_nodes.decode(out_latent, c_ref, "adain", ccsr_model).movedim(-1, 1)
    after_ccsr = user_outputs()
    report["user_model_unchanged_after_ccsr"] = bool(torch.equal(before[0], after_ccsr[0]))
    report["user_vae_unchanged_after_ccsr"] = bool(torch.equal(before[1], after_ccsr[1]))
    del model, cvae, sr_model, ccsr_model
    mm.unload_all_models()

    # --- diffusers side -----------------------------------------------------------------
    host = DiffusersSD21.load(folder)
    host.apply_osediff(weights)
    host.to_compute()
    from comfyui_ccsr_osediff_pack.sr_core.pipeline import encode_lq, prepare_lq, sample_osediff
    prep = prepare_lq(lq, 4.0)
    d_latent = encode_lq(host, prep.pixels)
    d_x0 = sample_osediff(host, d_latent, context, host.scale_factor)
    diff_out = {fix: upscale_osediff(host, host, lq, context, scale=4.0, color_fix=fix) for fix in ("none", "adain")}

    def stats(a, b):
        d = (a.float() - b.float()).abs()
        return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "ref_std": float(b.float().std())}

    from comfyui_ccsr_osediff_pack.sr_core.ccsr import CCSRv2Settings
    from comfyui_ccsr_osediff_pack.sr_core.ccsr_host import load_ccsr
    from comfyui_ccsr_osediff_pack.sr_core.ccsr_pipeline import upscale_ccsr

    del host
    host = DiffusersSD21.load(folder)  # a clean base: the one above has OSEDiff merged in
    models = load_ccsr(host, ccsr_dir)
    for name, kw in CCSR_CASES.items():
        d_out = upscale_ccsr(host, host, models.control, lq, context, context_neg, settings=CCSRv2Settings(**kw),
                             seed=7, decoder_vae=models.decoder, process_size=None, color_fix="adain")
        report[f"ccsr_{name}"] = stats(ccsr_comfy[name], d_out)
    report["output_size"] = list(comfy_out["none"].shape[-2:])
    report["lq_latent"] = stats(comfy_latent, d_latent)
    report["x0_latent"] = stats(comfy_x0, d_x0)
    report["image_none"] = stats(comfy_out["none"], diff_out["none"])
    report["image_adain"] = stats(comfy_out["adain"], diff_out["adain"])

    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
