"""The SR nodes on edge-case IMAGE inputs, in ComfyUI's own process, and a failure half-way through
sampling: what the user's MODEL and VAE look like afterwards.

Run with ComfyUI's python: ``python node_edges_check.py COMFYUI_DIR WORKDIR CHECKPOINT``. Loads the
SD 2.1-base CHECKPOINT with ComfyUI's loader (CPU), writes a random full-size osediff.pkl into
WORKDIR/osediff (registered as a model folder) and calls the nodes the way ComfyUI's executor does
(``VALIDATE_CLASS``, ``PREPARE_CLASS_CLONE``, ``EXECUTE_NORMALIZED``). Prints one JSON report:

- ``cases``: per input, ``{"ok": true, "shape", "finite", "min", "max"}`` or ``{"ok": false, "error"
  (class name), "sr_error" (a subclass of the pack's SRError), "message"}`` for the chain
  (Encode LQ → Sampler → Decode) and for SR Upscale (simple) (``simple_*``);
- ``alpha_dropped_equal`` / ``gray_repeated_equal``: the RGBA / 1-channel result equals the result of
  the RGB / repeated-gray image; ``simple_equals_chain``: SR Upscale (simple) gives the chain's image;
  ``batch_vs_single_max_abs``: a batch of 3 against each image alone;
- ``failure``: an exception raised by the patched model's first UNet call (a model-function wrapper on
  the SR_MODEL's clone): its message, whether OSEDiff's conv_in was in the shared UNet at that moment,
  and whether the user's MODEL (a plain apply_model after ComfyUI loads it) and VAE (decode, encode)
  are bit-identical to before, with no patch, wrapper, dtype or device change.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _images() -> dict[str, tuple[torch.Tensor, float]]:
    """name → (IMAGE (B, H, W, C) in [0, 1], scale)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g)

    nan = rand(1, 8, 8, 3)
    nan[0, 3, 4, 1] = float("nan")
    inf = rand(1, 8, 8, 3)
    inf[0, 0, 0, 0] = float("inf")
    rgba = rand(1, 8, 12, 4)
    gray = rand(1, 8, 12, 1)
    return {
        "rgb": (rgba[..., :3].contiguous(), 2.0),
        "rgba": (rgba, 2.0),
        "gray": (gray, 2.0),
        "gray_as_rgb": (gray.expand(-1, -1, -1, 3).contiguous(), 2.0),
        "two_channels": (rand(1, 8, 8, 2), 2.0),
        "empty_batch": (rand(0, 8, 8, 3), 2.0),
        "nan": (nan, 2.0),
        "inf": (inf, 2.0),
        "one_px_x8": (rand(1, 1, 1, 3), 8.0),
        "one_px_side_x8": (rand(1, 1, 9, 3), 8.0),
        "one_px_side_x4": (rand(1, 1, 9, 3), 4.0),
        "seven_px_x2": (rand(1, 7, 7, 3), 2.0),
        "strip_1x300_x8": (rand(1, 1, 300, 3), 8.0),
        "strip_1x300_x4": (rand(1, 1, 300, 3), 4.0),
        "batch3": (rand(3, 8, 8, 3), 2.0),
    }


SIMPLE_CASES = ("rgba", "empty_batch", "nan", "one_px_side_x4")  # each run re-patches the full UNet: few


def main(comfy_dir: str, work: str, checkpoint: str) -> dict:
    sys.path.insert(0, comfy_dir)
    sys.path.insert(0, str(HERE.parent))
    sys.path.insert(0, str(HERE))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management as mm
    import comfy.sd
    import folder_paths

    import tiny_models
    from parity_check import _import_pack

    _import_pack()
    from comfyui_ccsr_osediff_pack.nodes import folders, sr_nodes
    from comfyui_ccsr_osediff_pack.sr_core import sd21
    from comfyui_ccsr_osediff_pack.sr_core.errors import SRError

    torch.set_num_threads(2)
    work_dir = Path(work)
    folders.register_folders()
    (work_dir / "osediff").mkdir(parents=True, exist_ok=True)
    folder_paths.add_model_folder_path("osediff", str(work_dir / "osediff"))
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):  # names and shapes only; the LoRA tensors are drawn on the CPU
        unet, vae_meta = UNet2DConditionModel(**sd21.UNET_CONFIG), AutoencoderKL(**sd21.VAE_CONFIG)
    unet.conv_in = torch.nn.Conv2d(4, unet.conv_in.out_channels, 3, padding=1)  # its base_layer is read
    tiny_models.write_osediff_pkl(work_dir / "osediff" / "osediff-edges.pkl", unet, vae_meta, seed=2)
    del unet, vae_meta
    weights = "osediff-edges.pkl"

    model, clip, vae = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clip=True)[:3]
    positive = clip.encode_from_tokens_scheduled(clip.tokenize(""))

    def node(cls, **inputs):
        """Run a node as ComfyUI's executor does (class clone, inference mode); its outputs."""
        cls.VALIDATE_CLASS()
        with torch.inference_mode():
            return cls.PREPARE_CLASS_CLONE({}).EXECUTE_NORMALIZED(**inputs).args

    def outcome(fn) -> tuple[dict, torch.Tensor | None]:
        try:
            image = fn()
        except Exception as e:  # noqa: BLE001 - the report says what was raised
            return {"ok": False, "error": type(e).__name__, "sr_error": isinstance(e, SRError),
                    "message": str(e)}, None
        finite = bool(torch.isfinite(image).all())
        return {"ok": True, "shape": list(image.shape), "finite": finite,
                "min": float(image.min()) if image.numel() else None,
                "max": float(image.max()) if image.numel() else None}, image

    sr = node(sr_nodes.LoadOSEDiff, model=model, vae=vae, weights=weights)[0]

    def chain(image: torch.Tensor, scale: float) -> torch.Tensor:
        latent, reference = node(sr_nodes.EncodeLQ, sr_model=sr, image=image, scale=scale, resize_method="bicubic")
        out = node(sr_nodes.Sample, sr_model=sr, latent=latent, positive=positive, seed=0, latent_mode="mean")[0]
        return node(sr_nodes.Decode, latent=out, color_fix="adain", sr_model=sr, reference=reference)[0]

    def simple(image: torch.Tensor, scale: float) -> torch.Tensor:
        return node(sr_nodes.UpscaleSimple, model=model, vae=vae, clip=clip, image=image, weights=weights,
                    scale=scale, prompt="", color_fix="adain")[0]

    report: dict = {"cases": {}}
    results: dict[str, torch.Tensor | None] = {}
    images = _images()
    for name, (image, scale) in images.items():
        report["cases"][name], results[name] = outcome(lambda: chain(image, scale))
    for name in SIMPLE_CASES:
        image, scale = images[name]
        report["cases"][f"simple_{name}"], results[f"simple_{name}"] = outcome(lambda: simple(image, scale))

    def same(a: str, b: str) -> bool:
        return results[a] is not None and results[b] is not None and torch.equal(results[a], results[b])

    report["alpha_dropped_equal"] = same("rgba", "rgb")
    report["simple_equals_chain"] = same("simple_rgba", "rgba")
    report["gray_repeated_equal"] = same("gray", "gray_as_rgb")
    if results["batch3"] is not None:
        batch = images["batch3"][0]
        singles = torch.cat([chain(batch[i:i + 1], 2.0) for i in range(batch.shape[0])])
        report["batch_vs_single_max_abs"] = float((results["batch3"] - singles).abs().max())

    # -- the tiled VAE's disk store: the memory store's image, no scratch files left ----------
    def tiled_chain(image: torch.Tensor, store: str) -> torch.Tensor:
        tiling = node(sr_nodes.Tiling, mode="explicit", latent_tile=8, overlap=4, vae_tile=64, batch_tiles=1,
                      weighting="cosine", vae_store=store)[0]
        latent, reference = node(sr_nodes.EncodeLQ, sr_model=sr, image=image, scale=8.0, resize_method="bicubic",
                                 tiling=tiling)
        out = node(sr_nodes.Sample, sr_model=sr, latent=latent, positive=positive, seed=0, latent_mode="mean",
                   tiling=tiling)[0]
        return node(sr_nodes.Decode, latent=out, color_fix="adain", sr_model=sr, reference=reference,
                    tiling=tiling)[0]

    temp = Path(folder_paths.get_temp_directory())
    on_disk = tiled_chain(images["rgb"][0], "disk")
    in_memory = tiled_chain(images["rgb"][0], "memory")
    report["disk_store"] = {"equal": bool(torch.equal(on_disk, in_memory)), "shape": list(on_disk.shape),
                            "left_in_temp": sorted(p.name for p in temp.glob("srco-vae-*")) if temp.is_dir() else []}

    # -- a failure half-way through sampling ------------------------------------------------
    g = torch.Generator().manual_seed(1)
    probe_latent, probe_pixels = torch.randn(1, 4, 8, 8, generator=g), torch.rand(1, 64, 64, 3, generator=g)
    context = positive[0][0]

    def user_state() -> dict:
        mm.load_models_gpu([model])
        with torch.no_grad():
            eps = model.model.apply_model(probe_latent, torch.tensor([3.0]), c_crossattn=context).cpu()
        decoded, encoded = vae.decode(probe_latent).cpu(), vae.encode(probe_pixels).cpu()
        w = model.model.diffusion_model.input_blocks[0][0].weight
        vw = vae.first_stage_model.encoder.conv_in.weight
        return {"eps": eps, "decode": decoded, "encode": encoded, "conv_in": w.detach().clone(),
                "model_patches": len(model.patches), "vae_patches": len(vae.patcher.patches),
                "wrapper": "model_function_wrapper" in model.model_options,
                "dtypes": (str(w.dtype), str(vw.dtype), str(model.model.get_dtype()), str(vae.vae_dtype)),
                "devices": (str(w.device), str(vw.device))}

    before = user_state()
    failing = node(sr_nodes.LoadOSEDiff, model=model, vae=vae, weights=weights)[0]
    latent, _ = node(sr_nodes.EncodeLQ, sr_model=failing, image=images["rgb"][0], scale=2.0, resize_method="bicubic")
    seen: dict = {"calls": 0}

    def fail_first_call(apply_model, args):
        seen["calls"] += 1
        current = model.model.diffusion_model.input_blocks[0][0].weight
        seen["patched_at_failure"] = not torch.equal(current, before["conv_in"])
        raise RuntimeError("injected failure in the UNet call")

    failing.model.set_model_unet_function_wrapper(fail_first_call)
    try:
        node(sr_nodes.Sample, sr_model=failing, latent=latent, positive=positive, seed=0, latent_mode="mean")
        raised = None
    except RuntimeError as e:
        raised = str(e)
    after = user_state()
    report["failure"] = {
        "raised": raised, "calls": seen["calls"], "patched_at_failure": seen.get("patched_at_failure"),
        **{f"{k}_equal": bool(torch.equal(before[k], after[k])) for k in ("eps", "decode", "encode", "conv_in")},
        **{k: [before[k], after[k]] for k in ("model_patches", "vae_patches", "wrapper", "dtypes", "devices")},
    }
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3])))
