"""ComfyUI layer of the pack: node classes, host adapters, model folders.

Imported only as a sub-package of the pack (ComfyUI has a top-level module named
``nodes``); imports ``comfy``/``comfy_api``, so only inside ComfyUI.
"""
from __future__ import annotations

from comfy_api.v0_0_2 import ComfyExtension, io

from .folders import register_folders


class SRExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .sr_nodes import NODES

        return list(NODES)


async def comfy_entrypoint() -> SRExtension:
    register_folders()
    return SRExtension()
