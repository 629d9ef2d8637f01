"""``python -m sr_core models`` and ``python -m sr_core download``.

``models`` prints a table of every model the pack can use, where it looked, what it found
(path, size, detected format), what is unusable and why, and the command that fetches what is
missing. It reads only local files. ``download MODEL`` fetches one model's files (see
:mod:`sr_core.download`).
"""
from __future__ import annotations

import argparse
import json

from .errors import SRError
from .model_store import (
    CATALOGUE,
    MANUAL,
    ModelReport,
    download_command,
    examine,
    human_size,
    models_root,
    resolve_upscale_paths,
    search_roots,
    target_dir,
)

__all__ = ["register", "cmd_models", "cmd_download", "resolve_upscale_paths"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` and ``download`` subcommands (each sets ``func`` returning an exit status)."""
    m = subparsers.add_parser("models", help="list the models the pack can use, where it looked and what it found")
    m.add_argument("--models-dir", metavar="DIR", default=None,
                   help="the pack's models folder (default: $SR_CORE_MODELS_DIR, else the user cache folder)")
    m.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    m.add_argument("--sources", action="store_true", help="print the download sources, in fallback order")
    m.add_argument("--verify", action="store_true",
                   help="also CRC-check large zip checkpoints (slow for multi-GB files)")
    m.set_defaults(func=cmd_models)

    d = subparsers.add_parser("download", help="download a model's files (resumable, verified)")
    d.add_argument("model", choices=list(CATALOGUE), help="which model")
    d.add_argument("--to", metavar="DIR", default=None,
                   help="put the files in exactly this folder (default: <models dir>/<the model's folder>)")
    d.add_argument("--models-dir", metavar="DIR", default=None,
                   help="the pack's models folder (default: $SR_CORE_MODELS_DIR, else the user cache folder)")
    d.add_argument("--source", metavar="NAME", default=None,
                   help="use only this source (see `models --sources`); default: each in order")
    d.add_argument("--variant", default=None, help="fp32 or fp16 where the model has both (sd21-base: fp32, "
                                                   "ccsr-v1: fp16 by default)")
    d.set_defaults(func=cmd_download)


# ---------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------

def _report_dict(r: ModelReport, models_dir: str | None) -> dict:
    def cand(c):
        return {"path": str(c.path), "origin": c.origin, "size": c.size, "format": c.format,
                "problem": c.problem, "missing": c.missing}

    return {
        "id": r.spec.id, "title": r.spec.title, "used_by": r.spec.used_by,
        "status": "found" if r.found else "missing",
        "found": cand(r.found) if r.found else None,
        "others": [cand(c) for c in r.others],
        "unusable": [cand(c) for c in r.problems],
        "looked_in": r.looked_in,
        "download": {"command": download_command(r.spec.id, models_dir),
                     "to": str(target_dir(r.spec.id, models_dir)),
                     "sizes": dict(r.spec.sizes),
                     "automatic": any(s.kind != MANUAL for s in r.spec.sources)},
    }


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_models(reports: list[ModelReport], models_dir: str | None) -> str:
    """The human-readable ``models`` output."""
    _, why = models_root(models_dir)
    out = []
    rows = [["model", "status", "size", "path (or what to run)"]]
    for r in reports:
        if r.found:
            rows.append([r.spec.id, "found", human_size(r.found.size), str(r.found.path)])
        else:
            rows.append([r.spec.id, "MISSING", "-", download_command(r.spec.id, models_dir)])
    out.append(_table(rows))
    out.append("")
    out.append("Search order (first usable wins; --base/--weights override):")
    for i, sr in enumerate(reports[0].roots if reports else search_roots(models_dir), 1):
        out.append(f"  {i}. {sr.origin}")
        for note in sr.notes:
            out.append(f"     extra_model_paths: {note}")
    if not any(sr.origin.startswith("ComfyUI") for sr in (reports[0].roots if reports else [])):
        out.append("  (ComfyUI's folders come first when running inside ComfyUI or with COMFYUI_DIR set)")
    if why == "default":
        out.append("  (set SR_CORE_MODELS_DIR or pass --models-dir to use another pack models folder)")
    for r in reports:
        out.append("")
        out.append(f"{r.spec.id}: {r.spec.title}; used by {r.spec.used_by}")
        if r.found:
            out.append(f"  found:    {r.found.path}  [{human_size(r.found.size)}, {r.found.format}; {r.found.origin}]")
        for c in r.others:
            out.append(f"  also:     {c.path}  [{human_size(c.size)}, {c.format}]")
        for c in r.problems:
            out.append(f"  unusable: {c.path}: {c.problem}")
        out.append("  looked in:")
        for line in r.looked_in:
            out.append(f"    {line}")
        sizes = ", ".join(f"{v}: {s}" for v, s in r.spec.sizes.items())
        auto = [s.name for s in r.spec.sources if s.kind != MANUAL]
        if auto and not r.found:
            out.append(f"  download: {download_command(r.spec.id, models_dir)}  → "
                       f"{target_dir(r.spec.id, models_dir)}  ({sizes}; sources: {', '.join(auto)})")
        for s in r.spec.sources:
            if s.kind == MANUAL and not r.found:
                out.append(f"  manual:   {s.instructions.format(target=target_dir(r.spec.id, models_dir))}")
    return "\n".join(out)


def format_sources() -> str:
    """The sources table of every model, in fallback order."""
    rows = [["model", "#", "--source", "kind", "where", "status", "note"]]
    for spec in CATALOGUE.values():
        for i, s in enumerate(spec.sources, 1):
            rows.append([spec.id, str(i), s.name, s.kind, s.where, s.status, s.note])
    return _table(rows)


def cmd_models(args: argparse.Namespace) -> int:
    """``models``: always exit status 0 (the table says what is missing)."""
    if args.sources:
        print(format_sources())
        return 0
    reports = [examine(mid, args.models_dir, all_candidates=True, deep=args.verify) for mid in CATALOGUE]
    if args.json:
        root, why = models_root(args.models_dir)
        print(json.dumps({
            "models_dir": str(root), "models_dir_from": why,
            "search_order": [{"origin": r.origin, "folders": {k: [str(p) for p in v] for k, v in r.folders.items()},
                              "notes": r.notes} for r in (reports[0].roots if reports else [])],
            "models": [_report_dict(r, args.models_dir) for r in reports],
        }, indent=2))
    else:
        print(format_models(reports, args.models_dir))
    return 0


# ---------------------------------------------------------------------------------------
# download
# ---------------------------------------------------------------------------------------

def cmd_download(args: argparse.Namespace) -> int:
    """``download MODEL``: 0 when the model is complete, 1 after printing a manual step,
    an SRError (exit 2) when it failed."""
    from .download import download_model

    spec = CATALOGUE[args.model]
    if args.variant is not None and args.variant not in spec.variants:
        raise SRError(f"{spec.id}: no variant {args.variant!r} (choose from {', '.join(spec.variants)})")
    if args.source is not None:
        src = spec.source(args.source)
        if src.kind == MANUAL:
            dest = args.to or str(target_dir(spec.id, args.models_dir))
            print(f"{spec.id} from {src.where} is a manual step: {src.instructions.format(target=dest)}")
            return 1
    result = download_model(spec, to=args.to, models_dir=args.models_dir, source=args.source,
                            variant=args.variant)
    print(result.dest)
    return 0

