"""ComfyUI entry point of the pack: registers the nodes, nothing else.

Importing this file outside ComfyUI (no ``comfy_api``) does nothing and raises nothing;
the host-agnostic code lives in ``sr_core`` and works on its own.
"""
__all__: list[str] = []
