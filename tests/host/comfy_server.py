"""A real ComfyUI server for host tests: find it, start it with this pack installed, talk to it.

Standard library only (the test runner's environment need not have ``requests`` or ``yaml``).
Nothing here imports ComfyUI: the server runs in its own Python (ComfyUI's venv) as a child
process that listens on loopback only.

Environment:

- ``COMFYUI_DIR``: a ComfyUI checkout (``main.py``, ``comfy/``, ``folder_paths.py``).
- ``COMFYUI_PYTHON``: the Python that runs it; default ``$COMFYUI_DIR/../venv/bin/python``
  (the layout of the harness), then ``$COMFYUI_DIR/venv`` / ``$COMFYUI_DIR/.venv``.
- ``COMFY_START_TIMEOUT``: seconds to wait for ``GET /object_info`` (default 120).
- ``COMFY_NODE_MODULES``: a ``node_modules`` folder holding ``playwright-core`` (editor checks);
  default ``$COMFYUI_DIR/../node/node_modules``, then ``$HOME/comfy-harness/node/node_modules``.
- ``COMFY_CHROMIUM``: the Chromium binary (default ``/usr/bin/chromium`` or ``chromium`` on PATH).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PACK_ROOT = HERE.parent.parent          # the repository root is the pack
PACK_NAME = "comfyui-ccsr-osediff"      # the folder name ComfyUI sees in custom_nodes/
EDITOR_DRIVER = HERE / "editor_driver.js"

# Folders of the checkout's models/ that the test server also searches (read only).
SHARED_MODEL_FOLDERS = ("checkpoints", "vae", "loras", "upscale_models", "clip", "embeddings")
# The pack's own model folders: the tests put weights into these (a yaml-registered extra path).
PACK_MODEL_FOLDERS = ("osediff", "ccsr")
TEST_MODEL_FOLDERS = PACK_MODEL_FOLDERS + ("vae",)  # extra folders tests put files in (vae: GAN decoders)


class HostUnavailable(Exception):
    """No usable ComfyUI on this machine (the message is the skip reason)."""


class ComfyError(RuntimeError):
    """The server rejected a prompt or failed to run it; ``details`` holds the server's JSON."""

    def __init__(self, message: str, details: Any = None):
        super().__init__(message)
        self.details = details


# ---------------------------------------------------------------------------------------------
# locating ComfyUI

def find_comfyui() -> tuple[Path, Path]:
    """(ComfyUI dir, its Python) from the environment, or HostUnavailable with the reason."""
    raw = os.environ.get("COMFYUI_DIR", "").strip()
    if not raw:
        raise HostUnavailable(
            "COMFYUI_DIR is not set: host tests need a ComfyUI checkout with its venv "
            "(see tests/host/conftest.py)")
    comfy = Path(raw).expanduser().resolve()
    if not ((comfy / "main.py").is_file() and (comfy / "comfy").is_dir()
            and (comfy / "folder_paths.py").is_file()):
        raise HostUnavailable(f"COMFYUI_DIR={raw} is not a ComfyUI checkout "
                              "(no main.py / comfy/ / folder_paths.py)")
    py_env = os.environ.get("COMFYUI_PYTHON", "").strip()
    if py_env:
        py = Path(py_env).expanduser()
        if not (py.is_file() and os.access(py, os.X_OK)):
            raise HostUnavailable(f"COMFYUI_PYTHON={py_env} is not an executable file")
        return comfy, py
    for cand in (comfy.parent / "venv", comfy / "venv", comfy / ".venv"):
        py = cand / "bin" / "python"
        if py.is_file() and os.access(py, os.X_OK):
            return comfy, py
    raise HostUnavailable(
        f"no Python for ComfyUI: set COMFYUI_PYTHON, or put a venv at {comfy.parent / 'venv'}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # preexec_fn: SIGTERM the server if pytest dies (Linux only)
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _yaml_quote(p: Path | str) -> str:
    return json.dumps(str(p))  # a JSON string is a valid YAML double-quoted scalar


# ---------------------------------------------------------------------------------------------
# the server

class ComfyServer:
    """One ComfyUI process started by the tests, with this pack in its custom_nodes/.

    Layout under ``root`` (a temporary folder; ComfyUI's ``--base-directory``):
    ``custom_nodes/comfyui-ccsr-osediff`` -> the repository, ``models/`` (the default model
    folders, e.g. ``models/osediff`` where the pack registers its folder), ``extra_models/<name>``
    (registered through ``extra_model_paths.yaml``: tests put weights here), ``input/``,
    ``output/``, ``temp/``, ``user/``, ``comfyui.log``.
    """

    def __init__(self, comfy_dir: Path, python: Path, root: Path, port: int | None = None,
                 extra_args: tuple[str, ...] = ()):
        self.comfy_dir = Path(comfy_dir)
        self.python = Path(python)
        self.root = Path(root)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.custom_nodes_dir = self.root / "custom_nodes"
        self.models_dir = self.root / "models"
        self.extra_model_dirs = {n: self.root / "extra_models" / n for n in TEST_MODEL_FOLDERS}
        self.input_dir = self.root / "input"
        self.output_dir = self.root / "output"
        self.temp_dir = self.root / "temp"
        self.user_dir = self.root / "user"
        self.log_path = self.root / "comfyui.log"
        self.yaml_path = self.root / "extra_model_paths.yaml"
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        self.start_seconds: float | None = None
        self.last_history: dict | None = None   # the full /history entry of the last run_prompt
        self.last_run_seconds: float | None = None
        self._object_info: dict | None = None

    # ---- set-up
    def _prepare(self) -> None:
        for d in (self.custom_nodes_dir, self.models_dir, self.input_dir, self.output_dir,
                  self.temp_dir, self.user_dir, *self.extra_model_dirs.values()):
            d.mkdir(parents=True, exist_ok=True)
        for name in PACK_MODEL_FOLDERS:
            (self.models_dir / name).mkdir(exist_ok=True)
        link = self.custom_nodes_dir / PACK_NAME
        if not link.exists():
            link.symlink_to(PACK_ROOT, target_is_directory=True)
        lines = ["# written by tests/host/comfy_server.py", "comfyui_checkout:",
                 f"  base_path: {_yaml_quote(self.comfy_dir / 'models')}"]
        lines += [f"  {n}: {n}" for n in SHARED_MODEL_FOLDERS]
        lines += ["ccsr_osediff_tests:", f"  base_path: {_yaml_quote(self.root / 'extra_models')}"]
        lines += [f"  {n}: {n}" for n in TEST_MODEL_FOLDERS]
        self.yaml_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def command(self) -> list[str]:
        """The exact command line (run with cwd = COMFYUI_DIR)."""
        return [str(self.python), "main.py", "--cpu",
                "--listen", "127.0.0.1", "--port", str(self.port),
                # custom_nodes/, models/, input/, output/, temp/, user/ under our temporary folder:
                # packs linked into the checkout's own custom_nodes/ are not loaded, and nothing
                # is written into the checkout.
                "--base-directory", str(self.root),
                "--extra-model-paths-config", str(self.yaml_path),
                "--output-directory", str(self.output_dir),
                "--input-directory", str(self.input_dir),
                # ComfyUI appends "temp" to --temp-directory: this makes it root/temp
                "--temp-directory", str(self.root),
                "--user-directory", str(self.user_dir),
                "--database-url", "sqlite:///:memory:",
                "--disable-auto-launch", "--disable-api-nodes",
                *self.extra_args]

    def start(self, timeout: float | None = None) -> "ComfyServer":
        if timeout is None:
            timeout = float(os.environ.get("COMFY_START_TIMEOUT", "120"))
        self._prepare()
        env = dict(os.environ)
        env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   HF_HUB_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1", COMFYUI_DIR=str(self.comfy_dir))
        env.pop("PYTHONPATH", None)  # the test runner's paths must not leak into ComfyUI's Python
        t0 = time.monotonic()
        log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(
                self.command(), cwd=self.comfy_dir, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        finally:
            log.close()
        try:
            while True:
                if self.proc.poll() is not None:
                    raise ComfyError(f"ComfyUI exited with code {self.proc.returncode} during "
                                     f"start; log tail:\n{self.log_tail()}")
                try:
                    self._object_info = self._get_json("/object_info", timeout=30)
                    break
                except (OSError, urllib.error.URLError, ValueError):
                    pass
                if time.monotonic() - t0 > timeout:
                    raise ComfyError(f"ComfyUI did not answer GET /object_info within {timeout:.0f}s;"
                                     f" log tail:\n{self.log_tail()}")
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        # A fresh user dir shows the "get started" template dialog over the editor; skip it.
        try:
            self._post_json("/settings/Comfy.TutorialCompleted", True)
        except Exception:
            pass
        return self

    def stop(self) -> None:
        """SIGTERM the process this object started; SIGKILL after 30 s."""
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    # ---- HTTP
    def _request(self, path: str, data: bytes | None = None, headers: dict | None = None,
                 timeout: float = 60) -> bytes:
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()

    def _get_json(self, path: str, timeout: float = 60) -> Any:
        return json.loads(self._request(path, timeout=timeout))

    def _post_json(self, path: str, obj: Any, timeout: float = 60) -> Any:
        body = self._request(path, json.dumps(obj).encode(),
                             {"Content-Type": "application/json"}, timeout)
        return json.loads(body) if body.strip() else None

    def get_json(self, path: str) -> Any:
        return self._get_json(path)

    def post_json(self, path: str, obj: Any) -> Any:
        return self._post_json(path, obj)

    # ---- log
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # ---- API
    def object_info(self, node_class: str | None = None, cached: bool = False) -> dict:
        """GET /object_info, or one class's entry. Read afresh each call (file combos such as
        LoadImage's ``image`` change as files appear); ``cached`` reuses the last answer."""
        if not cached or self._object_info is None:
            self._object_info = self._get_json("/object_info")
        if node_class is None:
            return self._object_info
        return self._object_info[node_class]

    def upload_image(self, path: str | os.PathLike, name: str | None = None,
                     subfolder: str = "", overwrite: bool = True) -> str:
        """POST /upload/image; returns the value a LoadImage ``image`` input takes."""
        path = Path(path)
        name = name or path.name
        boundary = "----ccsr-osediff-" + uuid.uuid4().hex
        parts = []

        def field(k: str, v: str) -> None:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                         .encode())

        field("overwrite", "true" if overwrite else "false")
        field("type", "input")
        if subfolder:
            field("subfolder", subfolder)
        parts.append((f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
                      f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n').encode())
        parts.append(path.read_bytes() + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        resp = json.loads(self._request("/upload/image", b"".join(parts),
                                        {"Content-Type": f"multipart/form-data; boundary={boundary}"}))
        return f"{resp['subfolder']}/{resp['name']}" if resp.get("subfolder") else resp["name"]

    def queue_prompt(self, api_prompt: dict) -> str:
        """POST /prompt; returns the prompt id. Raises ComfyError with node_errors when rejected."""
        if "prompt" in api_prompt and isinstance(api_prompt["prompt"], dict):
            api_prompt = api_prompt["prompt"]
        try:
            resp = self._post_json("/prompt", {"prompt": api_prompt,
                                               "client_id": "host-tests-" + uuid.uuid4().hex[:8]})
        except urllib.error.HTTPError as e:
            body = e.read().decode("utf-8", "replace")
            try:
                details = json.loads(body)
            except ValueError:
                details = body
            raise ComfyError(f"POST /prompt rejected (HTTP {e.code}): {_format_rejection(details)}",
                             details) from None
        return resp["prompt_id"]

    def wait_history(self, prompt_id: str, timeout: float = 600) -> dict:
        t0 = time.monotonic()
        while True:
            hist = self._get_json(f"/history/{prompt_id}")
            if prompt_id in hist:
                return hist[prompt_id]
            if self.proc is not None and self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited (code {self.proc.returncode}) while running "
                                 f"{prompt_id}; log tail:\n{self.log_tail()}")
            if time.monotonic() - t0 > timeout:
                self.interrupt(prompt_id)
                raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f}s "
                                   "(interrupted)")
            time.sleep(0.25)

    def interrupt(self, prompt_id: str | None = None) -> None:
        try:
            if prompt_id:
                self._post_json("/queue", {"delete": [prompt_id]})
            self._post_json("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})
        except Exception:
            pass

    def run_prompt(self, api_prompt: dict, timeout: float = 600) -> dict:
        """Queue an API-format prompt, wait for it, return its outputs ({node_id: {...}}).

        Raises ComfyError on rejection (with node_errors) or execution error (exception type,
        message, node and traceback), TimeoutError after ``timeout`` seconds. The whole history
        entry is kept in ``last_history`` and the wall time in ``last_run_seconds``.
        """
        t0 = time.monotonic()
        pid = self.queue_prompt(api_prompt)
        entry = self.wait_history(pid, timeout)
        self.last_history = entry
        self.last_run_seconds = time.monotonic() - t0
        status = entry.get("status", {})
        if status.get("status_str") != "success" or not status.get("completed", True):
            msgs = {m[0]: m[1] for m in status.get("messages", [])}
            err = msgs.get("execution_error") or msgs.get("execution_interrupted") or {}
            tb = "".join(err.get("traceback", []))
            raise ComfyError(
                f"prompt {pid} failed in node {err.get('node_id')} ({err.get('node_type')}): "
                f"{err.get('exception_type')}: {err.get('exception_message')}\n{tb}", entry)
        return entry.get("outputs", {})

    def cached_nodes(self) -> list[str]:
        """Node ids the last run took from the cache (did not execute)."""
        for name, data in (self.last_history or {}).get("status", {}).get("messages", []):
            if name == "execution_cached":
                return list(data.get("nodes", []))
        return []

    def output_files(self, outputs: dict) -> list[Path]:
        """Absolute paths of the files listed in run_prompt's outputs (images, etc.)."""
        roots = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}
        files = []
        for node_out in outputs.values():
            for items in node_out.values():
                if not isinstance(items, list):
                    continue
                for it in items:
                    if isinstance(it, dict) and "filename" in it:
                        root = roots.get(it.get("type", "output"), self.output_dir)
                        files.append(root / it.get("subfolder", "") / it["filename"])
        return files


def pack_load_status(log: str, pack_name: str = PACK_NAME) -> tuple[str, list[str]]:
    """How ComfyUI's custom-node loader treated the pack, from the server log.

    Returns (status, lines): "loaded" (registered nodes), "no-nodes" (imported fine but exports
    neither NODE_CLASS_MAPPINGS nor comfy_entrypoint: ComfyUI then logs "Skip ..." and lists it
    as IMPORT FAILED), "failed" (exception on import or in comfy_entrypoint), or "absent".
    """
    mine = [ln for ln in log.splitlines() if f"custom_nodes/{pack_name}" in ln
            or f"custom_nodes{os.sep}{pack_name}" in ln]
    fail_marks = ("Cannot import", "Error while calling comfy_entrypoint", "is not callable",
                  "did not return")
    if any(m in ln for ln in mine for m in fail_marks):
        return "failed", mine
    if any("lack of NODE_CLASS_MAPPINGS" in ln for ln in mine):
        return "no-nodes", mine
    if any("IMPORT FAILED" in ln for ln in mine):
        return "failed", mine
    return ("loaded" if mine else "absent"), mine


def _format_rejection(details: Any) -> str:
    if not isinstance(details, dict):
        return str(details)
    out = []
    err = details.get("error")
    if isinstance(err, dict):
        out.append(f"{err.get('type')}: {err.get('message')} {err.get('details', '')}".strip())
    for nid, ne in (details.get("node_errors") or {}).items():
        for e in ne.get("errors", []):
            out.append(f"node {nid} ({ne.get('class_type')}): {e.get('type')}: {e.get('message')}"
                       f" [{e.get('details')}]")
    return "\n  ".join(out) if out else json.dumps(details)


# ---------------------------------------------------------------------------------------------
# the editor (headless Chromium through playwright-core)

def find_browser_tools() -> tuple[str, Path, str]:
    """(node binary, node_modules dir with playwright-core, chromium) or HostUnavailable."""
    node = shutil.which("node")
    if not node:
        raise HostUnavailable("no `node` on PATH: editor checks need Node.js, playwright-core "
                              "and Chromium (comfy_host.sh setup installs them)")
    cands = []
    if os.environ.get("COMFY_NODE_MODULES"):
        cands.append(Path(os.environ["COMFY_NODE_MODULES"]))
    if os.environ.get("COMFYUI_DIR"):
        cands.append(Path(os.environ["COMFYUI_DIR"]).expanduser().resolve().parent / "node"
                     / "node_modules")
    cands.append(Path.home() / "comfy-harness" / "node" / "node_modules")
    mods = next((c for c in cands if (c / "playwright-core" / "package.json").is_file()), None)
    if mods is None:
        raise HostUnavailable("playwright-core not found (looked in: "
                              + ", ".join(map(str, cands)) + "); set COMFY_NODE_MODULES")
    chromium = os.environ.get("COMFY_CHROMIUM") or (
        "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK)
        else shutil.which("chromium") or shutil.which("chromium-browser"))
    if not chromium or not os.access(chromium, os.X_OK):
        raise HostUnavailable("no Chromium (set COMFY_CHROMIUM or install Debian's chromium)")
    return node, mods, chromium


# Messages the frontend (1.27.x) prints on every load of a fresh user dir: not our problems.
BENIGN_BROWSER_NOTES = (
    "Cannot read properties of undefined (reading 'id')",  # settings onChange in the frontend
    "/user.css", "/api/userdata?dir=", "comfy.templates.json", "/templates/index",  # fresh user dir
    "Failed to load resource",
    # the missing-models check asks for the size of each download URL in a workflow's
    # `models` list; off-machine requests are refused here, so it always fails offline
    "Error fetching file size",
)


def editor_check(server: ComfyServer, workflow_path: str | os.PathLike, timeout: float = 180,
                 screenshot: str | os.PathLike | None = None) -> dict:
    """Load a workflow (UI format, or API format) into the real editor in headless Chromium.

    Returns ``{loaded_nodes, types, missing_types, errors, notes, blocked, api, ui}``:
    ``errors`` are browser page errors / console errors / failed loopback requests that are not
    in BENIGN_BROWSER_NOTES (those go to ``notes``); ``blocked`` lists off-machine requests the
    browser tried (all are refused); ``api`` is the API prompt the editor would queue
    (``graphToPrompt().output``) and ``ui`` the graph as the editor saves it.
    Skips the calling test (pytest.skip) when node / playwright-core / Chromium are missing.
    """
    try:
        node, mods, chromium = find_browser_tools()
    except HostUnavailable as e:
        import pytest
        pytest.skip(f"editor check not possible: {e}")
    wf = Path(workflow_path).resolve()
    (server.root / "editor").mkdir(exist_ok=True)
    out_json = server.root / "editor" / f"result-{uuid.uuid4().hex[:8]}.json"
    args = [node, str(EDITOR_DRIVER), "--url", server.url, "--workflow", str(wf),
            "--chromium", chromium, "--out", str(out_json), "--timeout", str(int(timeout * 1000))]
    if screenshot:
        args += ["--screenshot", str(Path(screenshot).resolve())]
    env = dict(os.environ, NODE_PATH=str(mods))
    # Own process group: on a time-out the driver and the browser it launched end together.
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout + 60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise ComfyError(f"editor driver timed out after {timeout + 60:.0f}s:\n{stderr[-3000:]}")
    if proc.returncode != 0 or not out_json.is_file():
        raise ComfyError(f"editor driver failed (rc {proc.returncode}):\n{stdout[-3000:]}\n"
                         f"{stderr[-3000:]}")
    res = json.loads(out_json.read_text())
    out_json.unlink()
    notes, errors = [], []
    for msg in res.pop("problems", []):
        (notes if any(b in msg for b in BENIGN_BROWSER_NOTES) else errors).append(msg)
    res["errors"], res["notes"] = errors, notes
    return res
