"""LoRA pairs as stored by peft, and the weight deltas they stand for.

A peft LoRA layer stores ``lora_A`` (down, shape (r, in) or (r, in, k, k)) and
``lora_B`` (up, shape (out, r) or (out, r, 1, 1)); at run time it adds
``scale · B(A(x))`` to the base layer's output, i.e. ΔW = scale · B @ A.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import WeightsError

# "<module>.lora_A.<adapter>.weight" (peft >= 0.3 layout)
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.(?P<adapter>[^.]+)\.weight$")


@dataclass(frozen=True)
class LoraPair:
    """One LoRA layer: ``down`` = lora_A, ``up`` = lora_B, both as stored."""

    down: Tensor
    up: Tensor
    adapter: str = "default"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, scale: float, dtype: torch.dtype = torch.float32) -> Tensor:
        """ΔW = scale · B @ A, in the shape of the base weight ((out, in) or (out, in, k, k))."""
        a = self.down.to(dtype)
        b = self.up.to(dtype)
        if a.dim() == 2:
            return (b @ a) * scale
        # k×k conv: ΔW[o, i] = scale · Σ_r B[o, r, 0, 0] · A[r, i]
        return torch.einsum("or,rihw->oihw", b.flatten(1), a) * scale

    def delta_shape(self) -> tuple[int, ...]:
        """Shape of ΔW without computing it."""
        return (int(self.up.shape[0]),) + tuple(int(s) for s in self.down.shape[1:])


def parse_peft_state_dict(state_dict: dict[str, Tensor], source: str, part: str) -> dict[str, LoraPair]:
    """Group peft LoRA tensors into ``{module name: LoraPair}``.

    Keys that are not LoRA tensors are ignored (the caller handles them). Raises
    WeightsError naming ``source`` and the first bad key when a lora_A has no lora_B
    (or the reverse), ranks disagree, or a tensor has an impossible shape.
    """
    halves: dict[str, dict[str, Tensor]] = {}
    adapters: dict[str, str] = {}
    for key in sorted(state_dict):
        m = _PEFT_KEY.match(key)
        if m is None:
            continue
        module, which, adapter = m.group("module"), m.group("which"), m.group("adapter")
        if module in adapters and adapters[module] != adapter:
            raise WeightsError(f"{source}: {part} module {module!r} has LoRA tensors for two adapters "
                               f"({adapters[module]!r} and {adapter!r}); expected one")
        adapters[module] = adapter
        tensor = state_dict[key]
        if not isinstance(tensor, Tensor):
            raise WeightsError(f"{source}: {part} key {key!r} is not a tensor")
        halves.setdefault(module, {})[which] = tensor
    pairs: dict[str, LoraPair] = {}
    for module in sorted(halves):
        h = halves[module]
        if "A" not in h or "B" not in h:
            have, miss = ("A", "B") if "A" in h else ("B", "A")
            raise WeightsError(
                f"{source}: {part} key {module}.lora_{have}.{adapters[module]}.weight has no matching "
                f"lora_{miss}; the file is incomplete or not an OSEDiff checkpoint"
            )
        a, b = h["A"], h["B"]
        ok = (
            (a.dim() == 2 and b.dim() == 2)
            or (a.dim() == 4 and b.dim() == 4 and tuple(b.shape[2:]) == (1, 1))
        ) and a.shape[0] == b.shape[1]
        if not ok:
            raise WeightsError(
                f"{source}: {part} key {module}.lora_A.{adapters[module]}.weight has shape {tuple(a.shape)} "
                f"but lora_B has {tuple(b.shape)}; they do not form a LoRA pair"
            )
        pairs[module] = LoraPair(down=a, up=b, adapter=adapters[module])
    return pairs
