"""sr_core: host-agnostic diffusion super-resolution (OSEDiff) over SD 2.1-base.

Never imports ComfyUI. The ComfyUI nodes (``nodes/``) and the command line
(``python -m sr_core``) are both thin layers over these modules.
"""
__version__ = "0.1.0"
