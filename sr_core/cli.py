"""Command line: ``python -m sr_core upscale|convert-weights ...``.

Errors the user can fix end the command with one line on stderr and a non-zero exit
status (the traceback only with ``--debug``). A bad image in a batch is reported and
skipped; the others are still processed and the exit status is 1.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import SRError

PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sr_core", description="Diffusion super-resolution (OSEDiff) over SD 2.1-base.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("upscale", help="upscale image files or folders of images")
    up.add_argument("inputs", nargs="+", metavar="INPUT", help="an image file or a folder of images")
    up.add_argument("--output-dir", "-o", required=True, help="folder for the results (DIR/<input stem>.png)")
    up.add_argument("--method", choices=["osediff"], default="osediff")
    up.add_argument("--base", default=None,
                    help="SD 2.1-base: a diffusers folder (unet/, vae/, text_encoder/, tokenizer/) or a .safetensors/.ckpt "
                         "file (default: found by `python -m sr_core models`)")
    up.add_argument("--weights", default=None,
                    help="method weights: osediff.pkl or its .safetensors form (default: found by `models`)")
    up.add_argument("--models-dir", default=None, metavar="DIR",
                    help="the pack's models folder, searched after ComfyUI's (default: $SR_CORE_MODELS_DIR, "
                         "else the user cache folder)")
    up.add_argument("--scale", type=float, default=4.0, help="upscale factor (default 4)")
    up.add_argument("--prompt", default="", help="text prompt (default empty)")
    up.add_argument("--color-fix", choices=["adain", "wavelet", "none"], default="adain")
    up.add_argument("--precision", choices=list(PRECISIONS), default=None,
                    help="compute precision (default: fp16 on GPU, fp32 on CPU)")
    up.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    up.add_argument("--latent-mode", choices=["mean", "sample"], default="mean",
                    help="LQ latent: posterior mean (deterministic) or a sample drawn with --seed")
    up.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    up.add_argument("--resize", choices=["bicubic", "lanczos", "bilinear", "nearest"], default="bicubic",
                    help="filter of the LQ upscale (default bicubic, as the official code)")
    up.add_argument("--max-megapixels", type=float, default=None,
                    help="largest output processed in one piece, in megapixels (default 4.19 = 2048²)")
    up.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder for a single-file --base")
    up.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    up.set_defaults(func=_cmd_upscale)

    cv = sub.add_parser("convert-weights", help="write the .safetensors form of an official weights file")
    cv.add_argument("src", help="official weights file (osediff.pkl)")
    cv.add_argument("dst", help="output .safetensors file")
    cv.add_argument("--overwrite", action="store_true")
    cv.set_defaults(func=_cmd_convert)
    for module in _command_modules():
        module.register(sub)
    return parser


def _command_modules() -> list:
    """Modules that add subcommands: each has ``register(subparsers)`` setting ``func``."""
    from . import cli_models

    return [cli_models]


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SRError("--device cuda: no CUDA device is available")
    return torch.device(name)


def _cmd_upscale(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from .diffusers_host import DiffusersSD21
    from .images import list_inputs, load_image, save_png
    from .osediff import load_osediff_weights
    from .model_store import resolve_upscale_paths
    from .pipeline import MAX_UNTILED_OUTPUT_PIXELS, upscale_osediff

    args.base, args.weights = resolve_upscale_paths(args.base, args.weights, args.method, args.models_dir)
    device = _resolve_device(args.device)
    precision = args.precision or ("fp16" if device.type == "cuda" else "fp32")
    dtype = getattr(torch, PRECISIONS[precision])
    max_px = int(args.max_megapixels * 1e6) if args.max_megapixels else MAX_UNTILED_OUTPUT_PIXELS
    paths = list_inputs(args.inputs)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    weights = load_osediff_weights(args.weights)
    t0 = time.perf_counter()
    host = DiffusersSD21.load(args.base, device=device, dtype=dtype, tokenizer=args.tokenizer)
    host.apply_osediff(weights)
    host.to_compute()
    context = host.encode_prompt(args.prompt)
    print(f"loaded {host.source} + {args.weights} on {device} ({precision}) in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)

    failures: list[tuple[Path, str]] = []
    for path in paths:
        dst = out_dir / f"{path.stem}.png"
        t_img = time.perf_counter()
        try:
            if dst.exists() and not args.overwrite:
                raise SRError(f"{dst}: output exists (use --overwrite to replace it)")
            image = load_image(path)
            with tqdm(total=3, desc=path.name, unit="stage", file=sys.stderr, leave=False) as bar:
                def progress(stage: str) -> None:
                    if stage != "encode":
                        bar.update(1)
                    bar.set_postfix_str(stage)
                out = upscale_osediff(host, host, image[None], context, scale=args.scale, color_fix=args.color_fix,
                                      latent_mode=args.latent_mode, seed=args.seed, resize_method=args.resize,
                                      max_output_pixels=max_px, progress=progress, name=str(path))
            save_png(out[0], dst)
        except SRError as e:
            failures.append((path, str(e)))
            print(f"error: {e}", file=sys.stderr)
            continue
        h, w = image.shape[-2:]
        oh, ow = out.shape[-2:]
        print(f"{path.name}: {w}×{h} → {ow}×{oh} in {time.perf_counter() - t_img:.1f} s → {dst}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} of {len(paths)} images failed:", file=sys.stderr)
        for path, msg in failures:
            print(f"  {path}: {msg}", file=sys.stderr)
        return 1
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .osediff import load_osediff_weights, save_osediff_safetensors

    dst = Path(args.dst)
    if dst.suffix.lower() != ".safetensors":
        raise SRError(f"{dst}: the output must be a .safetensors file")
    if dst.exists() and not args.overwrite:
        raise SRError(f"{dst}: exists (use --overwrite to replace it)")
    weights = load_osediff_weights(args.src)
    save_osediff_safetensors(weights, dst)
    n = len(weights.unet_lora) + len(weights.vae_lora)
    print(f"wrote {dst}: {len(weights.unet_lora)} UNet + {len(weights.vae_lora)} VAE LoRA modules ({n} total), "
          f"rank {weights.rank_unet}/{weights.rank_vae}, conv_in", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SRError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
