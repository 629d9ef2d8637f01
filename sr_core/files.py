"""First checks of a weights path, before any parser sees it."""
from __future__ import annotations

from pathlib import Path

from .errors import WeightsError


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
