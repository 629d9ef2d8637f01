"""Random full-size method weights in the official layouts, for the host tests (CPU, seeded)."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)


def write_ccsr_v2(root: Path, vae, seed: int = 5) -> Path:
    """A CCSR v2 release as the official ``preset/models`` holds it: ``controlnet/`` (config.json with
    ``use_vae_encode_condition``, class ControlNetModel) and ``vae/`` (the given diffusers SD VAE with a
    perturbed decoder: the "GAN-finetuned" one). Zero convs are random so the branch matters."""
    from sr_core import sd21
    from sr_core.ccsr import build_control_net

    cfg = {k: sd21.UNET_CONFIG[k] for k in ("block_out_channels", "down_block_types", "layers_per_block",
                                            "attention_head_dim", "cross_attention_dim", "use_linear_projection")}
    cfg.update(in_channels=4, norm_num_groups=32)
    torch.manual_seed(seed)
    net = build_control_net(cfg)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "condition_conv_in")):
                p.copy_(0.02 * torch.randn(p.shape))
    (root / "controlnet").mkdir(parents=True, exist_ok=True)
    net.save_pretrained(root / "controlnet")
    conf = json.loads((root / "controlnet" / "config.json").read_text())
    conf.update(use_vae_encode_condition=True, _class_name="ControlNetModel")  # as the official config.json
    (root / "controlnet" / "config.json").write_text(json.dumps(conf))
    gan = copy.deepcopy(vae)
    with torch.no_grad():
        for name, p in gan.named_parameters():
            if name.startswith("decoder."):
                p.add_(0.02 * torch.randn(p.shape) * (p.abs().mean() + 1e-3))
    gan.save_pretrained(root / "vae")
    return root


def write_all(osediff_pkl: Path, ccsr_root: Path, gan_vae_file: Path) -> None:
    """osediff.pkl, a CCSR v2 release and its GAN VAE as one diffusers-format .safetensors file."""
    import shutil

    from diffusers import AutoencoderKL, UNet2DConditionModel

    import tiny_models
    from sr_core import sd21

    torch.manual_seed(0)
    unet, vae = UNet2DConditionModel(**sd21.UNET_CONFIG), AutoencoderKL(**sd21.VAE_CONFIG)
    tiny_models.write_osediff_pkl(osediff_pkl, unet, vae, seed=1)
    del unet
    write_ccsr_v2(ccsr_root, vae)
    shutil.copy(ccsr_root / "vae" / "diffusion_pytorch_model.safetensors", gan_vae_file)


if __name__ == "__main__":
    write_all(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
