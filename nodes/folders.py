"""Model folders of the pack, registered with ComfyUI's folder_paths.

``models/osediff`` holds OSEDiff weights (.pkl as released, or .safetensors). Paths the
user set in extra_model_paths.yaml under the same name are kept.
"""
from __future__ import annotations

import os

import folder_paths

from ..sr_core.errors import WeightsError

WEIGHT_EXTENSIONS = {".pkl", ".pt", ".pth", ".ckpt", ".safetensors", ".sft"}
FOLDERS = ("osediff", "ccsr")


def register_folders() -> None:
    """Add ``models/<name>`` for each pack folder and give it the weight-file extension filter."""
    for name in FOLDERS:
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name), is_default=False)
        paths, extensions = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = (paths, set(extensions) | WEIGHT_EXTENSIONS)


def weight_files(name: str) -> list[str]:
    """Files the user can pick in a weights combo (relative names)."""
    return folder_paths.get_filename_list(name)


def resolve_weights(name: str, filename: str) -> str:
    """Full path of ``filename`` inside the registered folder ``name``; refuses anything else.

    A crafted workflow cannot point outside the model folders: only names listed by
    folder_paths are accepted.
    """
    if filename not in weight_files(name):
        folders = ", ".join(folder_paths.get_folder_paths(name)) or f"models/{name}"
        pack = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        fetch = (f", or fetch it with: cd {pack} && python -m sr_core download "
                 f"{'ccsr-v2' if name == 'ccsr' else name} --models-dir {folder_paths.models_dir}"
                 if name in FOLDERS else "")
        raise WeightsError(f"weights {filename!r}: not found in the {name} model folder(s) ({folders}). Put the file "
                           f"there and refresh{fetch}")
    path = folder_paths.get_full_path(name, filename)
    if path is None:
        raise WeightsError(f"weights {filename!r}: not found in the {name} model folder")
    return path
