"""ComfyUI entry point of the pack: registers the nodes, nothing else.

Importing this file outside ComfyUI (no ``comfy_api``) does nothing and raises nothing;
the host-agnostic code lives in ``sr_core`` and works on its own.
"""
import importlib.util

if importlib.util.find_spec("comfy_api") is not None and importlib.util.find_spec("folder_paths") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401

    __all__ = ["comfy_entrypoint"]
else:
    __all__ = []
