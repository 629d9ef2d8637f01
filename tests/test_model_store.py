"""The model lookup (`models`, `upscale` without --base/--weights): folders, order, format checks,
and that importing the package or running `models` opens no socket."""
from __future__ import annotations

import ast
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import types
import zipfile
from pathlib import Path

import pytest

import tiny_models
from sr_core import model_store as ms
from sr_core.model_store import ModelNotFoundError, resolve_upscale_paths

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No ComfyUI, no models-dir override, the user cache under tmp_path."""
    for var in (ms.ENV_COMFYUI_DIR, ms.ENV_MODELS_DIR, ms.ENV_EXTRA_MODEL_PATHS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delitem(sys.modules, "folder_paths", raising=False)


# -- small files in the formats the lookup recognises ------------------------------------

def safetensors_file(path: Path, tensors: dict[str, list[int]], meta: dict | None = None, cut: int = 0) -> Path:
    """A valid safetensors file of zero-filled F32 tensors with these shapes (``cut`` bytes removed)."""
    header, off = {}, 0
    for name, shape in tensors.items():
        n = 4
        for s in shape:
            n *= s
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + n]}
        off += n
    if meta:
        header["__metadata__"] = meta
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    data = struct.pack("<Q", len(h)) + h + bytes(off)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) - cut] if cut else data)
    return path


def pkl_file(path: Path, cut: int = 0) -> Path:
    """A zip shaped like torch.save's output (never unpickled by the lookup)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("osediff/data.pkl", b"\x80\x02}q\x00.")
        z.writestr("osediff/data/0", bytes(range(256)) * 40)
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) - cut] if cut else data)
    return path


HTML = "<!DOCTYPE html>\n<html><head><title>Google Drive - Quota exceeded</title></head></html>\n"


@pytest.fixture(scope="module")
def single_file(tmp_path_factory) -> Path:
    """A tiny SD 2.1-base-structure single-file checkpoint (ldm keys)."""
    return tiny_models.write_single_file(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


# ---------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------

def test_models_dir_precedence(monkeypatch, tmp_path):
    assert ms.models_root() == (tmp_path / "xdg" / "comfyui-ccsr-osediff", "default")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ms.models_root()[0] == tmp_path / "home" / ".cache" / "comfyui-ccsr-osediff"
    monkeypatch.setenv(ms.ENV_MODELS_DIR, str(tmp_path / "env"))
    assert ms.models_root() == (tmp_path / "env", ms.ENV_MODELS_DIR)
    assert ms.models_root(str(tmp_path / "flag")) == (tmp_path / "flag", "--models-dir")
    assert ms.target_dir("sd21-base", str(tmp_path / "flag")) == tmp_path / "flag" / "diffusers" / \
        "stable-diffusion-2-1-base"
    assert ms.download_command("osediff", "/my models") == 'python -m sr_core download osediff --models-dir "/my models"'


EXTRA_YAML = """\
# ComfyUI's example layout
a111:
    base_path: ../webui/          # relative: from this file's folder

    checkpoints: models/Stable-diffusion
    vae: models/VAE
    loras: |
         models/Lora
         models/LyCORIS
    controlnet: models/ControlNet

shared:
    base_path: $SHARED_MODELS
    is_default: true
    osediff: sr/osediff
    checkpoints: |
        ckpt-a
        ckpt-b

plain:
    ccsr: /abs/ccsr
    diffusers: rel/diffusers

empty:
"""


def _expected_extra(base: Path, shared: Path) -> list[tuple[str, Path, bool]]:
    webui = (base / ".." / "webui").resolve()
    n = os.path.normpath
    return [
        ("checkpoints", Path(n(webui / "models/Stable-diffusion")), False),
        ("vae", Path(n(webui / "models/VAE")), False),
        ("loras", Path(n(webui / "models/Lora")), False),
        ("loras", Path(n(webui / "models/LyCORIS")), False),
        ("controlnet", Path(n(webui / "models/ControlNet")), False),
        ("osediff", shared / "sr" / "osediff", True),
        ("checkpoints", shared / "ckpt-a", True),
        ("checkpoints", shared / "ckpt-b", True),
        ("ccsr", Path("/abs/ccsr"), False),
        ("diffusers", base / "rel" / "diffusers", False),
    ]


@pytest.mark.parametrize("parser", ["pyyaml", "fallback"])
def test_extra_model_paths_yaml(parser, monkeypatch, tmp_path):
    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    (comfy / "extra_model_paths.yaml").write_text(EXTRA_YAML)
    monkeypatch.setenv("SHARED_MODELS", str(tmp_path / "shared"))
    if parser == "fallback":
        monkeypatch.setitem(sys.modules, "yaml", None)  # PyYAML not importable
    got = ms.parse_extra_model_paths(comfy / "extra_model_paths.yaml")
    assert [(k, Path(os.path.normpath(p)), d) for k, p, d in got] == _expected_extra(comfy, tmp_path / "shared")


def test_fallback_parser_matches_pyyaml_on_the_example():
    yaml = pytest.importorskip("yaml")
    assert ms.parse_simple_yaml(EXTRA_YAML) == yaml.safe_load(EXTRA_YAML)


def test_broken_yaml_is_ignored(tmp_path):
    (tmp_path / "extra_model_paths.yaml").write_text("a: [unclosed\n  - : :\n")
    assert ms.parse_extra_model_paths(tmp_path / "extra_model_paths.yaml") == []


# ---------------------------------------------------------------------------------------
# Lookup order
# ---------------------------------------------------------------------------------------

def test_lookup_order_comfyui_extra_paths_then_cache_and_flags_win(monkeypatch, tmp_path):
    comfy, cache, shared = tmp_path / "ComfyUI", tmp_path / "cache", tmp_path / "shared"
    in_cache = pkl_file(cache / "osediff" / "osediff.pkl")
    assert ms.find_weights("osediff", str(cache)) == in_cache  # no ComfyUI: the pack's folder
    monkeypatch.setenv(ms.ENV_COMFYUI_DIR, str(comfy))
    (comfy / "models").mkdir(parents=True)
    (comfy / "extra_model_paths.yaml").write_text(f"mine:\n    base_path: {shared}\n    osediff: sr\n")
    assert ms.find_weights("osediff", str(cache)) == in_cache
    in_extra = pkl_file(shared / "sr" / "osediff.pkl")
    assert ms.find_weights("osediff", str(cache)) == in_extra  # extra_model_paths.yaml before the cache
    in_comfy = pkl_file(comfy / "models" / "osediff" / "osediff.pkl")
    assert ms.find_weights("osediff", str(cache)) == in_comfy  # ComfyUI's own folder first...
    (comfy / "extra_model_paths.yaml").write_text(
        f"mine:\n    base_path: {shared}\n    is_default: true\n    osediff: sr\n")
    assert ms.find_weights("osediff", str(cache)) == in_extra  # ...unless the yaml entry is_default
    # a converted .safetensors is preferred to the .pkl in the same folder
    st = safetensors_file(shared / "sr" / "osediff.safetensors", {"unet.x": [2]}, {"format": "osediff-v1"})
    assert ms.find_weights("osediff", str(cache)) == st
    # flags win: nothing is looked up
    assert resolve_upscale_paths("my/base", "my/w.pkl", "osediff", str(cache)) == ("my/base", "my/w.pkl")
    # COMFYUI_EXTRA_MODEL_PATHS adds more yaml files
    other = tmp_path / "more.yaml"
    other.write_text(f"x:\n    base_path: {tmp_path / 'more'}\n    is_default: true\n    osediff: o\n")
    monkeypatch.setenv(ms.ENV_EXTRA_MODEL_PATHS, str(other))
    in_more = pkl_file(tmp_path / "more" / "o" / "osediff.pkl")
    assert ms.find_weights("osediff", str(cache)) == in_more


def test_running_comfyui_folder_paths_are_used(monkeypatch, tmp_path):
    live = tmp_path / "live"
    fake = types.SimpleNamespace(models_dir=str(live / "models"), folder_names_and_paths={
        "osediff": ([str(live / "a"), str(live / "b")], {".pkl"}),
        "checkpoints": ([str(live / "ckpt")], {".safetensors"}),
    })
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    monkeypatch.setenv(ms.ENV_COMFYUI_DIR, str(tmp_path / "ignored"))
    b = pkl_file(live / "b" / "osediff.pkl")
    assert ms.find_weights("osediff", str(tmp_path / "cache")) == b
    a = pkl_file(live / "a" / "osediff.pkl")
    assert ms.find_weights("osediff", str(tmp_path / "cache")) == a
    roots = ms.search_roots(str(tmp_path / "cache"))
    assert roots[0].origin == "ComfyUI (running)"
    assert roots[0].folders["ccsr"] == [live / "models" / "ccsr"]  # not registered: models/ccsr


# ---------------------------------------------------------------------------------------
# Format checks
# ---------------------------------------------------------------------------------------

def test_bad_files_are_reported_and_the_error_names_the_download_command(tmp_path):
    cache = tmp_path / "cache"
    (cache / "osediff").mkdir(parents=True)
    (cache / "osediff" / "osediff.pkl").write_text(HTML)
    report = ms.examine("osediff", str(cache))
    assert report.found is None
    assert "HTML page" in report.problems[0].problem
    with pytest.raises(ModelNotFoundError) as e:
        resolve_upscale_paths("base", None, "osediff", str(cache))
    msg = str(e.value)
    assert f"`python -m sr_core download osediff --models-dir {cache}`" in msg
    assert f"saves to {cache / 'osediff'}" in msg and "HTML page" in msg and "--weights FILE" in msg
    assert "\n" not in msg
    with pytest.raises(ModelNotFoundError) as e:
        resolve_upscale_paths(None, "w.pkl", "osediff", None)
    default = tmp_path / "xdg" / "comfyui-ccsr-osediff" / "diffusers" / "stable-diffusion-2-1-base"
    assert "`python -m sr_core download sd21-base` (saves to " + str(default) in str(e.value)


@pytest.mark.parametrize("make,problem", [
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.write_text(HTML), "HTML page"),
    (lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n"), "git-lfs pointer"),
    (lambda p: pkl_file(p, cut=200), "truncated or damaged zip"),
    (lambda p: p.write_bytes(b"\x00junk" * 100), "unknown format"),
])
def test_inspect_file_problems(make, problem, tmp_path):
    p = tmp_path / "osediff.pkl"
    make(p)
    assert problem in ms.inspect_file(p).problem


def test_inspect_safetensors_header_only(tmp_path):
    p = safetensors_file(tmp_path / "a.safetensors", {"x": [4, 4], "y": [3]}, {"format": "pt"})
    info = ms.inspect_file(p)
    assert info.problem is None and info.format == "safetensors" and "F32, 2 tensors" in info.detail
    assert info.metadata == {"format": "pt"}
    t = safetensors_file(tmp_path / "b.safetensors", {"x": [1000]}, cut=100)
    assert ms.inspect_file(t).problem.startswith("truncated:")
    (tmp_path / "c.safetensors").write_bytes(b"\xff" * 64)
    assert "not a safetensors file" in ms.inspect_file(tmp_path / "c.safetensors").problem
    # a legacy pickle is recognised by its magic, never opened
    (tmp_path / "d.ckpt").write_bytes(b"\x80\x02" + b"\x00" * 50)
    assert ms.inspect_file(tmp_path / "d.ckpt").format == "pickle"


def test_osediff_files(tmp_path):
    d = tmp_path / "cache" / "osediff"
    safetensors_file(d / "osediff.safetensors", {"unet.x": [2]}, {"format": "something-else"})
    pkl = pkl_file(d / "osediff.pkl")
    report = ms.examine("osediff", str(tmp_path / "cache"))
    assert report.found.path == pkl and "not the official release file" in report.found.format
    assert "not an OSEDiff safetensors file" in report.problems[0].problem


def test_sd21_diffusers_folder(sd_folder, tmp_path):
    models = tmp_path / "models"
    (models / "diffusers").mkdir(parents=True)
    (models / "diffusers" / "stable-diffusion-2-1-base").symlink_to(sd_folder, target_is_directory=True)
    report = ms.examine("sd21-base", str(models))
    assert report.found is not None, report.problems
    assert report.found.format.startswith("diffusers folder, SD 2.x-base") and report.found.size > 0
    assert ms.find_base(str(models)) == models / "diffusers" / "stable-diffusion-2-1-base"


def test_sd21_folder_incomplete_or_wrong(tmp_path):
    folder = tmp_path / "models" / "diffusers" / "stable-diffusion-2-1-base"
    for sub in ("unet", "vae"):
        safetensors_file(folder / sub / "diffusion_pytorch_model.safetensors", {"w": [2]})
    (folder / "unet" / "config.json").write_text(json.dumps({"in_channels": 4, "use_linear_projection": True,
                                                             "cross_attention_dim": 1024}))
    report = ms.examine("sd21-base", str(tmp_path / "models"))
    assert report.found is None
    assert "incomplete: missing vae/config.json, text_encoder/config.json" in report.problems[0].problem
    (folder / "vae" / "config.json").write_text("{}")
    (folder / "text_encoder").mkdir()
    (folder / "text_encoder" / "config.json").write_text(json.dumps({"hidden_size": 1024}))
    safetensors_file(folder / "text_encoder" / "model.safetensors", {"w": [2]})
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.json").write_text("{}")
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    report = ms.examine("sd21-base", str(tmp_path / "models"))
    assert report.found is None and "predicts 'v_prediction'" in report.problems[0].problem
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "epsilon"}))
    assert ms.find_base(str(tmp_path / "models")) == folder


def test_sd21_single_file_by_name_and_by_header(single_file, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    comfy = tmp_path / "ComfyUI"
    ckpts = comfy / "models" / "checkpoints"
    ckpts.mkdir(parents=True)
    monkeypatch.setenv(ms.ENV_COMFYUI_DIR, str(comfy))
    cache = str(tmp_path / "cache")
    # an SD 2.x 768-v file (norm1.bias std above ComfyUI's 0.09) and a LoRA: skipped by the scan
    sd = load_file(str(single_file))
    key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"  # ComfyUI's v-pred probe
    sd[key] = sd[key].normal_(0, 0.5)
    save_file(sd, str(ckpts / "aaa-768-v.safetensors"))
    safetensors_file(ckpts / "a-lora.safetensors", {"lora_unet_x.lora_up.weight": [4, 4]})
    assert ms.find_base(cache) is None
    # any SD 2.x-base .safetensors in checkpoints/ (header + one small tensor)
    (ckpts / "sub").mkdir()
    os.link(single_file, ckpts / "sub" / "my-sd21.safetensors")
    assert ms.find_base(cache) == ckpts / "sub" / "my-sd21.safetensors"
    # the usual file name wins over the scan
    os.link(single_file, ckpts / "v2-1_512-ema-pruned.safetensors")
    report = ms.examine("sd21-base", cache)
    assert report.found.path == ckpts / "v2-1_512-ema-pruned.safetensors"
    assert report.found.format.startswith("single-file SD 2.x-base, safetensors, F32")
    assert [c.path for c in report.others] == [ckpts / "sub" / "my-sd21.safetensors"]
    # a known name that is not SD 2.x-base is reported, not used
    (ckpts / "v2-1_512-ema-pruned.safetensors").unlink()
    os.link(ckpts / "aaa-768-v.safetensors", ckpts / "v2-1_512-ema-pruned.safetensors")
    report = ms.examine("sd21-base", cache)
    assert report.found.path == ckpts / "sub" / "my-sd21.safetensors"
    assert "768-v" in report.problems[0].problem


def test_ccsr_folders_and_files(tmp_path):
    models = tmp_path / "models"
    v2 = models / "ccsr" / "ccsr-v2"
    (v2 / "Controlnet").mkdir(parents=True)
    report = ms.examine("ccsr-v2", str(models))
    assert "found Controlnet/: rename it to controlnet/" in report.problems[0].problem
    (v2 / "Controlnet").rename(v2 / "controlnet")
    for sub, key in (("controlnet", "condition_conv_in.weight"), ("vae", "decoder.conv_in.weight")):
        (v2 / sub).mkdir(exist_ok=True)
        (v2 / sub / "config.json").write_text("{}")
        safetensors_file(v2 / sub / "diffusion_pytorch_model.safetensors", {key: [2]})
    assert ms.find_weights("ccsr", str(models)) == v2
    safetensors_file(models / "ccsr" / "real-world_ccsr-fp16.safetensors",
                     {"control_model.input_blocks.0.0.weight": [320, 4, 3, 3]})
    assert "8 input channels" in ms.examine("ccsr-v1", str(models)).problems[0].problem
    good = safetensors_file(models / "checkpoints" / "real-world_ccsr-fp16.safetensors",
                            {"control_model.input_blocks.0.0.weight": [320, 8, 3, 3]})
    assert ms.find_weights("ccsr-v1", str(models)) == good


def test_catalogue_is_consistent():
    for spec in ms.CATALOGUE.values():
        assert spec.default_variant in spec.variants and spec.sources
        names = [s.name for s in spec.sources]
        assert len(names) == len(set(names))
        kinds = [s.kind for s in spec.sources]
        assert kinds.index(ms.MANUAL) == len(kinds) - 1 if ms.MANUAL in kinds else True  # manual steps last
        for s in spec.sources:
            if s.kind == ms.MANUAL:
                assert "{target}" in s.instructions and "drive.google.com" in s.instructions
            if s.kind == ms.URL:
                assert all(spec_file.local in s.urls for spec_file in spec.files())
        for f in (f for v in spec.variants for f in spec.files(v)):
            assert f.sha256 is None or len(f.sha256) == 64
            assert f.git_sha1 is None or len(f.git_sha1) == 40
    assert ms.OSEDIFF.sources[0].urls["osediff.pkl"].endswith(f"{ms.OSEDIFF_COMMIT}/preset/models/osediff.pkl")


# ---------------------------------------------------------------------------------------
# The `models` command
# ---------------------------------------------------------------------------------------

def _main(argv: list[str]) -> int:
    from sr_core.cli import main  # `models` and `download` are registered by the CLI itself

    return main(argv)


def test_models_command(tmp_path, capsys):
    models = tmp_path / "models"
    pkl = pkl_file(models / "osediff" / "osediff.pkl")
    (models / "ccsr").mkdir(parents=True)
    (models / "ccsr" / "real-world_ccsr.ckpt").write_text(HTML)
    assert _main(["models", "--models-dir", str(models)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["model", "status", "size", "path", "(or", "what", "to", "run)"]
    row = {ln.split()[0]: ln for ln in lines[2:6]}
    assert set(row) == {"sd21-base", "osediff", "ccsr-v2", "ccsr-v1"}
    assert "found" in row["osediff"] and str(pkl) in row["osediff"] and "kB" in row["osediff"]
    assert "MISSING" in row["sd21-base"] and f"python -m sr_core download sd21-base --models-dir {models}" in out
    assert f"unusable: {models / 'ccsr' / 'real-world_ccsr.ckpt'}: an HTML page" in out
    assert f"{models / 'diffusers' / 'stable-diffusion-2-1-base'}{os.sep} (diffusers folder)" in out
    assert "drive.google.com" in out  # the manual steps of what is missing
    assert _main(["models", "--models-dir", str(models), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    by_id = {m["id"]: m for m in data["models"]}
    assert by_id["osediff"]["found"]["path"] == str(pkl) and by_id["sd21-base"]["status"] == "missing"
    assert by_id["sd21-base"]["download"]["to"] == str(models / "diffusers" / "stable-diffusion-2-1-base")
    assert _main(["models", "--sources"]) == 0
    out = capsys.readouterr().out
    for name in ("sd2-community", "manojb", "github", "github-main", "nightraven109", "kharma1", "kijai", "gdrive"):
        assert name in out


# ---------------------------------------------------------------------------------------
# No network at import, at registration, in `models`
# ---------------------------------------------------------------------------------------

_NO_NET = textwrap.dedent("""
    import importlib, pkgutil, socket, sys

    def deny(*args, **kwargs):
        raise RuntimeError(f"network access: {args!r}")

    socket.socket.connect = deny
    socket.socket.connect_ex = deny
    socket.create_connection = deny
    socket.getaddrinfo = deny
    mode = sys.argv[1]
    if mode == "light":
        import sr_core.download, sr_core.model_store, sr_core.cli_models
        assert "huggingface_hub" not in sys.modules and "urllib.request" in sys.modules
        print("OK")
        raise SystemExit(0)
    import sr_core
    for m in pkgutil.iter_modules(sr_core.__path__):
        if m.name != "__main__":
            importlib.import_module("sr_core." + m.name)
    import argparse
    from sr_core import cli_models
    parser = argparse.ArgumentParser()
    cli_models.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["models", "--models-dir", sys.argv[2]])
    assert args.func(args) == 0
    print("OK")
""")


@pytest.mark.parametrize("mode", ["light", "all"])
def test_no_socket_at_import_registration_or_models(mode, tmp_path):
    pkl_file(tmp_path / "osediff" / "osediff.pkl")
    env = {k: v for k, v in os.environ.items() if k not in (ms.ENV_COMFYUI_DIR, ms.ENV_MODELS_DIR)}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", _NO_NET, mode, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")


def test_nodes_never_import_network_code():
    """The ComfyUI layer (imported at node registration, run inside nodes) has no download code."""
    forbidden = {"huggingface_hub", "requests", "httpx", "urllib.request", "sr_core.download"}
    files = sorted((ROOT / "nodes").glob("*.py")) + [ROOT / "__init__.py"]
    assert len(files) > 1
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                names = [mod] + [f"{mod}.{a.name}".lstrip(".") for a in node.names]
            else:
                continue
            for n in names:
                assert not any(n == f or n.startswith(f + ".") or n.endswith("." + f) for f in forbidden), \
                    f"{path.name} imports {n}"
