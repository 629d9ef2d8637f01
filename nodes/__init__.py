"""ComfyUI layer of the pack (node classes, host adapters). Imported only as a sub-package of the pack."""
