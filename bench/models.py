"""Random models for the benchmark, built once per worker process.

"tiny": the widths of tests/tiny_models.py (SD 2.1 block structure, so the official
OSEDiff LoRA selection picks the same 258 + 32 modules); "full": the SD 2.1-base
architecture (sr_core/sd21.py configs: UNet 865 M parameters, VAE 84 M, text encoder
340 M). Weights are random (normal, std 1/√fan_in; norms 1; small biases): timings and
memory do not depend on the values. The UNet, VAE and control branch are built on the
meta device and then materialised, so no time is spent on the default initialisers.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import tiny_models  # noqa: E402  (tests/tiny_models.py)

from sr_core.sd21 import TEXT_ENCODER_CONFIG, UNET_CONFIG, VAE_CONFIG  # noqa: E402

CONFIGS = {
    "tiny": {"unet": tiny_models.TINY_UNET, "vae": tiny_models.TINY_VAE,
             "text": {"vocab_size": 49408, **tiny_models.TINY_TEXT}},
    "full": {"unet": UNET_CONFIG, "vae": VAE_CONFIG, "text": TEXT_ENCODER_CONFIG},
}
LORA_STD = 0.02
"""std of the random LoRA A/B tensors: ΔW = 2·B@A has entries of about 4·std² = 0.0016."""


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if "norm" in name and name.endswith("weight"):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.normal_(0.0, 0.02, generator=g)
        else:
            fan_in = max(1, p[0].numel())
            p.normal_(0.0, fan_in ** -0.5, generator=g)
    return module.eval().requires_grad_(False)


def _materialise(factory, seed: int) -> torch.nn.Module:
    with torch.device("meta"):
        m = factory()
    m = m.to_empty(device="cpu")
    for name, b in m.named_buffers():  # no module here has buffers, but never leave garbage in one
        if b.is_floating_point():
            b.zero_()
    return randomize(m, seed)


def build_unet(model: str, seed: int = 0):
    from diffusers import UNet2DConditionModel

    return _materialise(lambda: UNet2DConditionModel(**CONFIGS[model]["unet"]), seed)


def build_vae(model: str, seed: int = 1):
    from diffusers import AutoencoderKL

    return _materialise(lambda: AutoencoderKL(**CONFIGS[model]["vae"]), seed)


def build_text(model: str, seed: int = 2):
    """CLIPTextModel built on the CPU (it has non-persistent position-id buffers), then randomised."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return randomize(CLIPTextModel(CLIPTextConfig(**CONFIGS[model]["text"])), seed)


def build_control(model: str, seed: int = 3):
    """A CCSR control branch (``CCSRControlNet``) for the model's UNet, random weights."""
    from sr_core.ccsr import CONTROLNET_ARCH_KEYS, build_control_net

    cfg = {k: v for k, v in CONFIGS[model]["unet"].items() if k in CONTROLNET_ARCH_KEYS}
    net = build_control_net(cfg, device="meta").to_empty(device="cpu")
    return randomize(net, seed)


def build_tokenizer():
    """The offline CLIP BPE tokenizer of tests/tiny_models.py (real SD 2 special-token ids)."""
    from transformers import CLIPTokenizer

    folder = Path(tempfile.mkdtemp(prefix="bench-tok-"))
    tiny_models.write_tokenizer(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!", model_max_length=77)


def osediff_dict(unet, vae, seed: int = 0) -> dict:
    """An osediff.pkl dict in the official layout (three UNet adapters, one VAE adapter, rank 4)."""
    return tiny_models.make_osediff_dict(unet, vae, rank=4, seed=seed, std=LORA_STD)
