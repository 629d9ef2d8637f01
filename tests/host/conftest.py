"""Host tests: a real ComfyUI (from ``COMFYUI_DIR``) with this pack installed as a custom node.

Every test in this folder is marked ``host`` and is skipped, with the reason, when no ComfyUI is
configured (the default suite on CI). See tests/host/README.md.

Fixtures:

- ``comfy_server`` (session): a running :class:`comfy_server.ComfyServer`
  (``url``, ``log_text()``, ``object_info()``, ``upload_image(path)``, ``run_prompt(prompt)``,
  ``output_files(outputs)``, ``models_dir``, ``extra_model_dirs``, ...).
- ``sd21_checkpoint``: the name of the random SD 2.1-base checkpoint as ComfyUI lists it
  (skips when it is missing).
- ``sample_image``: the LoadImage name of a small uploaded RGB test image.
- ``editor_check``: ``editor_check(workflow_path, **kw) -> dict`` bound to the server (skips when
  node / playwright-core / Chromium are missing).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import comfy_server as cs  # noqa: E402

try:
    COMFY_DIR, COMFY_PYTHON = cs.find_comfyui()
    SKIP_REASON = None
except cs.HostUnavailable as e:
    COMFY_DIR = COMFY_PYTHON = None
    SKIP_REASON = str(e)

SD21_CHECKPOINT = os.environ.get("COMFY_SD21_CHECKPOINT", "sd21-random.safetensors")

_started: list[cs.ComfyServer] = []


def _in_this_folder(item) -> bool:
    try:
        return Path(str(item.fspath)).resolve().is_relative_to(HERE)
    except (OSError, ValueError):
        return False


@pytest.hookimpl(tryfirst=True)  # before `-m` selection, so `-m host` / `-m "not host"` see it
def pytest_collection_modifyitems(config, items):
    for item in items:
        if _in_this_folder(item):
            item.add_marker(pytest.mark.host)
            if SKIP_REASON:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


def pytest_report_header(config):
    if SKIP_REASON:
        return f"host tests: skipped ({SKIP_REASON})"
    return f"host tests: ComfyUI {COMFY_DIR} (python {COMFY_PYTHON})"


def pytest_terminal_summary(terminalreporter):
    for s in _started:
        terminalreporter.write_line(
            f"host: ComfyUI started in {s.start_seconds:.1f}s on {s.url}; log {s.log_path}")


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    if SKIP_REASON:
        pytest.skip(SKIP_REASON)
    server = cs.ComfyServer(COMFY_DIR, COMFY_PYTHON, tmp_path_factory.mktemp("comfy"))
    server.start()
    _started.append(server)
    try:
        yield server
    finally:
        server.stop()
        # no link into the repository left behind for tmp cleaners to walk into
        (server.custom_nodes_dir / cs.PACK_NAME).unlink(missing_ok=True)


@pytest.fixture(scope="session")
def sd21_checkpoint(comfy_server) -> str:
    names = comfy_server.object_info("CheckpointLoaderSimple")["input"]["required"]["ckpt_name"][0]
    if SD21_CHECKPOINT not in names:
        pytest.skip(f"checkpoint {SD21_CHECKPOINT} not in ComfyUI's checkpoints folders; make it "
                    "with make_sd21_random.py (harness) or set COMFY_SD21_CHECKPOINT")
    return SD21_CHECKPOINT


@pytest.fixture(scope="session")
def sample_image(comfy_server, tmp_path_factory) -> str:
    """A 96x64 RGB gradient PNG uploaded through POST /upload/image; its LoadImage name."""
    from PIL import Image

    w, h = 96, 64
    im = Image.new("RGB", (w, h))
    im.putdata([(x * 255 // (w - 1), y * 255 // (h - 1), 128) for y in range(h) for x in range(w)])
    p = tmp_path_factory.mktemp("img") / "host_sample.png"
    im.save(p)
    return comfy_server.upload_image(p)


@pytest.fixture()
def editor_check(comfy_server):
    def check(workflow_path, **kw) -> dict:
        return cs.editor_check(comfy_server, workflow_path, **kw)
    return check
