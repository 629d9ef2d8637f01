"""First checks of a weights path, before any parser sees it; words for refusing a file; the one
non-tensor global the weights-only pickle readers allow (as an inert stand-in)."""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import WeightsError

OSEDIFF_FORMAT = "osediff-v1"
"""safetensors metadata ``format`` of our OSEDiff form (``sr_core.osediff``)."""
CCSR_FORMAT = "sr_core-ccsr"
"""safetensors metadata ``format`` of our CCSR form (``sr_core.ccsr``)."""

LIGHTNING_CALLBACK = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
"""The one non-tensor global the official v1 ``real-world_ccsr.ckpt`` pickle references (its
``callbacks`` dict is keyed by this class, Lightning < 1.5 style)."""


class LightningCallbackStub:
    """Inert stand-in for ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint``.

    Allow-listed (under that name) only while a CCSR-v1 checkpoint is read with
    ``torch.load(weights_only=True)``: the pickle uses the class as a dict key; an instance
    would keep nothing and run nothing. pytorch_lightning is never imported.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


# The stub under the callback's qualified name (torch names allowed globals "{__module__}.{__qualname__}").
_LIGHTNING_STAND_IN = type("ModelCheckpoint", (LightningCallbackStub,), {
    "__module__": LIGHTNING_CALLBACK.rpartition(".")[0], "__qualname__": LIGHTNING_CALLBACK.rpartition(".")[2],
    "__doc__": "LightningCallbackStub allow-listed under the ModelCheckpoint name (inert)."})


def lightning_stub_allowed() -> contextlib.AbstractContextManager:
    """A context in which ``torch.load(weights_only=True)`` accepts the Lightning callback class
    (as the inert :class:`LightningCallbackStub`) and nothing else new; a no-op before torch 2.5."""
    safe = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    return safe([_LIGHTNING_STAND_IN]) if safe is not None else contextlib.nullcontext()


def check_weights_path(p: Path, what: str) -> None:
    """WeightsError naming ``p`` when it is missing, an empty file, or an HTML page (a failed download)."""
    if not p.exists():
        raise WeightsError(f"{p}: {what} not found")
    if p.is_file():
        if p.stat().st_size == 0:
            raise WeightsError(f"{p}: {what} is empty (0 bytes); download it again")
        with open(p, "rb") as f:
            head = f.read(512).lstrip().lower()
        if head.startswith((b"<!doctype html", b"<html")):
            raise WeightsError(f"{p}: this is an HTML page, not a weights file (a failed download?)")


def describe_tensors(keys: Iterable[str], meta: Mapping[str, str] | None = None) -> str:
    """What a weights file looks like, from its tensor names (and safetensors metadata), as a
    noun phrase for refusal messages: "an OSEDiff weights file", "a LoRA", "a VAE", ...

    Only names are looked at (no tensor is read), so a file is described the same whether it
    is a safetensors header or an unpickled state dict.
    """
    keys = sorted(keys)
    fmt = (meta or {}).get("format")

    def has(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if fmt == OSEDIFF_FORMAT or "state_dict_unet" in keys or has("unet.conv_in.base_layer."):
        return "an OSEDiff weights file"
    if fmt == CCSR_FORMAT:
        return "a CCSR weights file written by convert-weights"
    if has("controlnet_cond_embedding.") or any("input_hint_block." in k for k in keys):
        return "a standard ControlNet (pixel-hint input)"
    if has("control_model."):
        return "a CCSR-v1 checkpoint (control branch control_model.* and a GAN-finetuned VAE)"
    if "condition_conv_in.weight" in keys:
        return "a CCSR-v2 control branch (a ControlNet with condition_conv_in)"
    if has("conditioner."):
        return "an SDXL checkpoint"
    if any("lora" in k.lower() for k in keys):
        return "a LoRA"
    if has("model.diffusion_model."):
        return "a Stable Diffusion checkpoint"
    if has("encoder.down", "decoder.up", "encoder.conv_in.", "decoder.conv_in.", "first_stage_model."):
        return "a VAE"
    if has("down_blocks.", "up_blocks.", "input_blocks.", "output_blocks."):
        return "a UNet"
    if has("text_model.", "transformer.resblocks.", "cond_stage_model."):
        return "a text encoder"
    return f"no known model (first tensor {keys[0]!r})" if keys else "a file without tensors"


def unsafe_global(message: str) -> str:
    """The global a ``torch.load(weights_only=True)`` refusal names (e.g. ``posix.system``), else the
    message's first line."""
    m = re.search(r"GLOBAL ([\w.]+)", message)
    if m:
        return m.group(1)
    lines = message.strip().splitlines()
    return lines[0] if lines else "an object that is not a tensor"
