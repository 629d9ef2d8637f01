"""``python -m sr_core download``: fetch the files of one catalogue model, safely.

For each model (:data:`sr_core.model_store.CATALOGUE`) the sources are tried in their
documented order until one has every file; a source that is gone, unreachable, lacks a file
or serves a file whose checksum differs from one the project pinned is skipped with a note.
Manual sources (Google Drive) end the list: their instructions are printed.

Each file:

1. An existing file at the destination is never overwritten: if it checks out (format,
   and size and checksum against the source's metadata) it is kept; otherwise the download
   stops with a message and the file is left as it is.
2. It is downloaded to ``<name>.sr-partial`` beside its destination, with a sidecar
   ``<name>.sr-partial.json`` naming the remote file (size, checksum). A later run resumes
   a partial file with an HTTP Range request when the sidecar names the same remote file.
   A dropped connection is retried (with Range) a few times; a Ctrl-C keeps the partial file.
3. When complete: an HTML page, a git-lfs pointer, a wrong size, a checksum mismatch or a
   truncated safetensors/zip file is refused and the partial file removed, with a message.
4. Only then is it moved to its name (a hard link that cannot replace an existing file,
   falling back to a rename).

Hub sources go through ``huggingface_hub`` (``get_hf_file_metadata`` for the size and the
SHA-256 of LFS files or the git blob id of small files, ``http_get`` for the ranged
transfer), so ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE`` and proxies work as usual. URL
sources (a raw GitHub file) use urllib. Progress bars go to stderr. Nothing here runs at
import: this module imports no network library until a download starts.
"""
from __future__ import annotations

import contextlib
import http.client
import inspect
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from . import __version__
from .errors import SRError
from .model_store import (
    HUB,
    MANUAL,
    URL,
    FileSpec,
    ModelSpec,
    Source,
    file_sha256,
    get_model,
    git_blob_sha1,
    human_size,
    inspect_file,
    looks_like_html,
    models_root,
)

PARTIAL_SUFFIX = ".sr-partial"
USER_AGENT = f"comfyui-ccsr-osediff/{__version__}"
#: Retries of a dropped URL transfer (each resumes with Range) and the wait between them.
URL_RETRIES = 5
RETRY_WAIT_S = 1.0
URL_TIMEOUT_S = 60.0
CHUNK = 1024 * 1024
#: Files above this size get a progress bar while their checksum is computed.
HASH_BAR_BYTES = 256 * 1024 * 1024
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")


class DownloadError(SRError):
    """A download failed; the message says why and what to do."""


class SourceUnavailable(Exception):
    """A source cannot serve this model (gone, unreachable, a file missing or different)."""


class _Interrupted(Exception):
    """A transfer stopped early; the partial file is kept for a resume."""


@dataclass
class PlannedFile:
    """One file to fetch from one source."""

    spec: FileSpec
    dest: Path
    remote: str
    url: str
    headers: dict[str, str]
    size: int | None
    sha256: str | None
    git_sha1: str | None
    ident: dict = field(default_factory=dict)

    @property
    def partial(self) -> Path:
        return self.dest.with_name(self.dest.name + PARTIAL_SUFFIX)

    @property
    def sidecar(self) -> Path:
        return self.dest.with_name(self.dest.name + PARTIAL_SUFFIX + ".json")


def _progress_bar(**kwargs):
    """A byte progress bar on stderr."""
    from tqdm import tqdm

    return tqdm(file=sys.stderr, unit="B", unit_scale=True, unit_divisor=1000, mininterval=0.25,
                dynamic_ncols=True, **kwargs)


def _bar_class():
    """A tqdm class for huggingface_hub's ``http_get``: bytes, on stderr, shown."""
    from tqdm import tqdm

    class StderrBar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            kwargs.setdefault("file", sys.stderr)
            kwargs.setdefault("mininterval", 0.25)
            kwargs.setdefault("dynamic_ncols", True)
            kwargs["disable"] = False
            super().__init__(*args, **kwargs)

    return StderrBar


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# Planning: what each source would serve
# ---------------------------------------------------------------------------------------

def _checksums_from_etag(etag: str | None) -> tuple[str | None, str | None]:
    """The hub's ETag is the SHA-256 of an LFS file or the git blob id of a small file."""
    e = (etag or "").strip('"').lower()
    if e.startswith("w/"):
        e = e[2:].strip('"')
    if _HEX64.match(e):
        return e, None
    if _HEX40.match(e):
        return None, e
    return None, None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _plan_hub(source: Source, files: tuple[FileSpec, ...], dest: Path) -> list[PlannedFile]:
    """HEAD every file in the hub repo (first existing remote candidate); pins the commit."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import build_hf_headers

    endpoint = (source.endpoint or os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
    revision = source.revision or "main"
    planned = []
    for spec in files:
        meta, remote = None, None
        for candidate in source.remote_candidates(spec):
            url = hf_hub_url(source.where, candidate, revision=revision, endpoint=endpoint)
            try:
                meta = get_hf_file_metadata(url, endpoint=endpoint)
            except (RepositoryNotFoundError, GatedRepoError) as e:
                raise SourceUnavailable(f"repository {source.where} not found or not public (taken down?): "
                                        f"{_first_line(e)}") from None
            except RevisionNotFoundError:
                raise SourceUnavailable(f"revision {revision} not found in {source.where}") from None
            except EntryNotFoundError:
                continue
            except OfflineModeIsEnabled:
                raise SourceUnavailable("offline mode is on (HF_HUB_OFFLINE)") from None
            except HfHubHTTPError as e:
                status = getattr(getattr(e, "response", None), "status_code", None)
                if status == 404:
                    continue
                raise SourceUnavailable(f"{source.where}: {_first_line(e)}") from None
            except Exception as e:  # network errors of the HTTP client: the source is unreachable
                raise SourceUnavailable(f"cannot reach {endpoint or 'the hub'} ({type(e).__name__}: "
                                        f"{_first_line(e)})") from None
            remote = candidate
            break
        if meta is None or remote is None:
            raise SourceUnavailable(f"{source.where} has no {' or '.join(source.remote_candidates(spec))}")
        if revision == (source.revision or "main") and meta.commit_hash:
            revision = meta.commit_hash  # the other files from the same commit
        sha256, git_sha1 = _checksums_from_etag(meta.etag)
        if spec.sha256 and sha256 and sha256 != spec.sha256:
            raise SourceUnavailable(f"{source.where}/{remote} is not the original file (SHA-256 {sha256[:12]}…, "
                                    f"the project pinned {spec.sha256[:12]}…)")
        if spec.git_sha1 and git_sha1 and git_sha1 != spec.git_sha1:
            raise SourceUnavailable(f"{source.where}/{remote} is not the original file (git blob {git_sha1[:12]}…)")
        headers = build_hf_headers()
        location = meta.location or url
        if urllib.parse.urlsplit(location)[:2] != urllib.parse.urlsplit(url)[:2]:
            headers.pop("authorization", None)  # never send a token to the CDN
        planned.append(PlannedFile(
            spec=spec, dest=dest / spec.local, remote=f"{source.where}/{remote}", url=location, headers=headers,
            size=meta.size, sha256=sha256 or spec.sha256, git_sha1=git_sha1 or spec.git_sha1,
            ident={"source": source.name, "repo": source.where, "path": remote, "etag": meta.etag,
                   "size": meta.size}))
    return planned


def _plan_url(source: Source, files: tuple[FileSpec, ...], dest: Path) -> list[PlannedFile]:
    """HEAD every URL: it must exist and not be an HTML page; its size is taken when given."""
    planned = []
    for spec in files:
        url = source.urls.get(spec.local)
        if not url:
            raise SourceUnavailable(f"no URL for {spec.local}")
        req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": USER_AGENT,
                                                                   "Accept-Encoding": "identity"})
        size = None
        try:
            with urllib.request.urlopen(req, timeout=URL_TIMEOUT_S) as resp:
                if "text/html" in resp.headers.get("Content-Type", "").lower():
                    raise SourceUnavailable(f"{url} answers with an HTML page, not the file (moved or gone?)")
                if resp.headers.get("Content-Length"):
                    size = int(resp.headers["Content-Length"])
        except urllib.error.HTTPError as e:
            if e.code not in (405, 501):  # HEAD not allowed: learn the size from the GET
                raise SourceUnavailable(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise SourceUnavailable(f"cannot reach {url} ({_first_line(e)})") from None
        planned.append(PlannedFile(
            spec=spec, dest=dest / spec.local, remote=url, url=url, headers={"User-Agent": USER_AGENT},
            size=size, sha256=spec.sha256, git_sha1=spec.git_sha1,
            ident={"source": source.name, "url": url, "size": size}))
    return planned


def plan_source(source: Source, files: tuple[FileSpec, ...], dest: Path) -> list[PlannedFile]:
    """What ``source`` would serve for ``files`` (network: metadata only). Raises SourceUnavailable."""
    if source.kind == HUB:
        return _plan_hub(source, files, dest)
    if source.kind == URL:
        return _plan_url(source, files, dest)
    raise SourceUnavailable(f"manual step: {source.instructions.format(target=dest)}")


# ---------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------

def _hash_with_bar(path: Path, algo: str) -> str:
    size = path.stat().st_size
    fn = file_sha256 if algo == "sha256" else git_blob_sha1
    if size < HASH_BAR_BYTES:
        return fn(path)
    with _progress_bar(total=size, desc=f"checking {path.name}"[:40], leave=False) as bar:
        return fn(path, bar)


def verify_file(path: Path, pf: PlannedFile) -> str | None:
    """Why ``path`` is not ``pf``'s file (None when it is): HTML, size, checksum, then format."""
    info = inspect_file(path, name=pf.dest.name)
    if info.format in ("html", "lfs-pointer", "empty", "missing"):
        return info.problem
    size = path.stat().st_size
    if pf.size is not None and size != pf.size:
        kind = "truncated" if size < pf.size else "too large"
        return f"{kind}: {size} bytes, the source says {pf.size}"
    if pf.sha256:
        got = _hash_with_bar(path, "sha256")
        if got != pf.sha256:
            return f"checksum mismatch: SHA-256 {got[:12]}…, expected {pf.sha256[:12]}…"
    elif pf.git_sha1:
        got = _hash_with_bar(path, "git")
        if got != pf.git_sha1:
            return f"checksum mismatch: git blob {got[:12]}…, expected {pf.git_sha1[:12]}…"
    if info.problem:
        return info.problem
    return None


# ---------------------------------------------------------------------------------------
# Transfers
# ---------------------------------------------------------------------------------------

def _hub_transfer(pf: PlannedFile, f: IO[bytes], resume: int) -> None:
    from huggingface_hub.file_download import http_get

    kwargs = dict(resume_size=resume, headers=pf.headers, expected_size=pf.size,
                  displayed_filename=pf.spec.local)
    params = inspect.signature(http_get).parameters
    if "tqdm_class" in params:
        kwargs["tqdm_class"] = _bar_class()
    kwargs = {k: v for k, v in kwargs.items() if k in params}
    try:
        http_get(pf.url, f, **kwargs)
    except OSError as e:
        f.flush()
        if "Consistency check failed" in str(e):
            return  # wrong size: the verification names it and removes the file
        raise _Interrupted(_first_line(e)) from None
    except Exception as e:  # the HTTP client's own errors after its retries
        f.flush()
        raise _Interrupted(f"{type(e).__name__}: {_first_line(e)}") from None


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    m = re.match(r"bytes\s+(\d+)-\d+/(\d+|\*)", value or "")
    if not m:
        return None, None
    return int(m.group(1)), (None if m.group(2) == "*" else int(m.group(2)))


def _url_transfer(pf: PlannedFile, f: IO[bytes], resume: int) -> None:
    """GET ``pf.url`` into ``f`` from byte ``resume``; a dropped connection resumes with Range.

    The transfer ends when the server's own length is reached; whether that is the expected
    file is for :func:`verify_file` to say (a short file is reported as truncated).
    """
    pos = resume
    failures = 0
    target = pf.size  # what the server says it sends in total (learned from its answers)

    def restart() -> None:
        nonlocal pos
        f.seek(0)
        f.truncate()
        pos = 0
        bar.reset(total=target)

    def failed(why: str) -> None:
        nonlocal failures
        failures += 1
        if failures > URL_RETRIES:
            raise _Interrupted(why)
        bar.write(f"{pf.dest.name}: {why}; retrying from byte {pos}", file=sys.stderr)
        time.sleep(RETRY_WAIT_S * failures)

    with _progress_bar(total=pf.size, initial=pos, desc=_short(pf.spec.local)) as bar:
        while True:
            headers = dict(pf.headers, **{"Accept-Encoding": "identity"})
            if pos:
                headers["Range"] = f"bytes={pos}-"
            req = urllib.request.Request(pf.url, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=URL_TIMEOUT_S) as resp:
                    if "text/html" in resp.headers.get("Content-Type", "").lower():
                        raise DownloadError(f"{pf.url} sent an HTML page instead of {pf.dest.name} (a login, quota "
                                            f"or error page); nothing was saved")
                    if resp.status == 206:
                        start, total = _content_range(resp.headers.get("Content-Range"))
                        if start != pos:
                            restart()
                            failed(f"the server answered a range from byte {start}")
                            continue
                    else:
                        if pos:  # the server ignored the Range: the body starts at byte 0
                            restart()
                        length = resp.headers.get("Content-Length")
                        total = int(length) if length and length.isdigit() else None
                    if total is not None:
                        target = total
                        if pf.size is None:
                            pf.size = total
                        bar.total = total
                        bar.refresh()
                    first = pos == 0
                    while True:
                        chunk = resp.read(CHUNK)
                        if not chunk:
                            break
                        if first:
                            first = False
                            if looks_like_html(chunk[:1024]):
                                raise DownloadError(f"{pf.url} sent an HTML page instead of {pf.dest.name}; "
                                                    f"nothing was saved")
                        f.write(chunk)
                        pos += len(chunk)
                        bar.update(len(chunk))
                f.flush()
                if target is None or pos >= target:
                    return
                failed(f"connection closed after {pos} of {target} bytes")
            except urllib.error.HTTPError as e:
                if e.code == 416 and target is not None and pos >= target:
                    return
                if e.code == 416:
                    restart()
                    failed("the server refused the range")
                    continue
                if e.code in (408, 429, 500, 502, 503, 504):
                    failed(f"HTTP {e.code} {e.reason}")
                    continue
                raise DownloadError(f"{pf.url}: HTTP {e.code} {e.reason}") from None
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError) as e:
                f.flush()
                failed(_first_line(e))


def _remove_partial(pf: PlannedFile) -> None:
    for p in (pf.partial, pf.sidecar):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _publish(src: Path, dest: Path) -> None:
    """Give ``src`` the name ``dest`` without ever replacing an existing ``dest``."""
    try:
        os.link(src, dest)
    except FileExistsError:
        raise DownloadError(f"{dest} appeared during the download; it was left untouched") from None
    except OSError:  # no hard links on this file system
        if dest.exists():
            raise DownloadError(f"{dest} appeared during the download; it was left untouched") from None
        os.replace(src, dest)
        return
    src.unlink()


def _pid_alive(pid: int) -> bool:
    if sys.platform == "win32":  # os.kill would terminate it there: assume alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


@contextlib.contextmanager
def _write_lock(pf: PlannedFile):
    """One writer per partial file: ``<name>.sr-partial.lock`` holds the writer's pid; a lock
    whose process is gone (or older than a day on Windows) is taken over."""
    lock = pf.dest.with_name(pf.dest.name + PARTIAL_SUFFIX + ".lock")
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
                age = time.time() - lock.stat().st_mtime
            except (OSError, ValueError):
                pid, age = 0, 0.0
            if pid and pid != os.getpid() and _pid_alive(pid) and age < 86400:
                raise DownloadError(f"another download (pid {pid}) is writing {pf.partial}; wait for it to end "
                                    f"(or delete {lock} if no download is running)") from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
        return
    raise DownloadError(f"cannot take the lock {lock}")


def fetch_file(pf: PlannedFile, kind: str) -> str:
    """Download one planned file (resuming a matching partial), verify it, publish it.

    Returns a one-word result (``downloaded``/``resumed``). Raises DownloadError; a Ctrl-C
    or a connection lost for good keeps the partial file for the next run.
    """
    pf.dest.parent.mkdir(parents=True, exist_ok=True)
    with _write_lock(pf):
        return _fetch_locked(pf, kind)


def _fetch_locked(pf: PlannedFile, kind: str) -> str:
    resume = 0
    if pf.partial.exists():
        try:
            same = json.loads(pf.sidecar.read_text()) == pf.ident
        except (OSError, ValueError):
            same = False
        size = pf.partial.stat().st_size
        if same and (pf.size is None or size <= pf.size):
            resume = size
        else:
            _say(f"  {pf.dest.name}: discarding a partial download of another version")
            _remove_partial(pf)
    pf.sidecar.write_text(json.dumps(pf.ident))
    mode = "r+b" if pf.partial.exists() else "wb"
    try:
        with open(pf.partial, mode) as f:
            f.seek(resume)
            f.truncate()
            if kind == HUB:
                _hub_transfer(pf, f, resume)
            else:
                _url_transfer(pf, f, resume)
    except KeyboardInterrupt:
        _say(f"\ninterrupted: {pf.partial} is kept; run the same command again to resume")
        raise
    except _Interrupted as e:
        got = pf.partial.stat().st_size if pf.partial.exists() else 0
        raise DownloadError(f"{pf.dest.name}: the transfer stopped ({e}); {human_size(got)} kept in "
                            f"{pf.partial}; run the same command again to resume") from None
    except DownloadError:
        _remove_partial(pf)
        raise
    problem = verify_file(pf.partial, pf)
    if problem:
        _remove_partial(pf)
        raise DownloadError(f"{pf.dest.name} from {pf.remote} refused: {problem}; the partial file was "
                            f"removed, nothing was saved")
    _publish(pf.partial, pf.dest)
    with contextlib.suppress(FileNotFoundError):
        pf.sidecar.unlink()
    return "resumed" if resume else "downloaded"


# ---------------------------------------------------------------------------------------
# The download command
# ---------------------------------------------------------------------------------------

@dataclass
class DownloadResult:
    """What ``download_model`` did."""

    model: str
    dest: Path
    source: str | None
    files: dict[str, str]


def _local_complete(spec_files: tuple[FileSpec, ...], dest: Path) -> bool:
    """Every file present and sound by local checks (pinned checksums verified)."""
    for spec in spec_files:
        p = dest / spec.local
        if not p.is_file():
            return False
        info = inspect_file(p)
        if info.problem:
            return False
        if spec.sha256 and _hash_with_bar(p, "sha256") != spec.sha256:
            return False
        if spec.git_sha1 and _hash_with_bar(p, "git") != spec.git_sha1:
            return False
    return True


def _check_disk(dest: Path, needed: int) -> None:
    probe = dest
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise DownloadError(f"not enough disk space in {probe}: {human_size(needed)} to download, "
                            f"{human_size(free)} free")


def download_model(model: str | ModelSpec, *, to: str | os.PathLike | None = None,
                   models_dir: str | os.PathLike | None = None, source: str | None = None,
                   variant: str | None = None) -> DownloadResult:
    """Fetch every file of ``model`` into ``to`` (default: its folder in the pack's models folder).

    ``source`` picks one source by name (no fallback); otherwise the catalogue's order is
    tried. Raises DownloadError (an SRError) with the reasons of every source tried and the
    manual steps when nothing worked.
    """
    spec = get_model(model) if isinstance(model, str) else model
    files = spec.files(variant)
    dest = Path(to).expanduser().absolute() if to else models_root(models_dir)[0] / spec.subdir
    sources = (spec.source(source),) if source else spec.sources
    _say(f"{spec.id}: {spec.title} → {dest}")

    if _local_complete(files, dest):
        _say(f"{spec.id}: already complete in {dest}; nothing downloaded")
        return DownloadResult(spec.id, dest, None, {f.local: "present" for f in files})

    reasons, manual = [], []
    for src in sources:
        if src.kind == MANUAL:
            manual.append(f"{src.name}: {src.instructions.format(target=dest)}")
            continue
        try:
            planned = plan_source(src, files, dest)
        except SourceUnavailable as e:
            reasons.append(f"{src.name}: {e}")
            _say(f"source {src.name}: {e}" + ("; trying the next one" if src is not sources[-1] else ""))
            continue
        return _run_plan(spec, dest, src, planned)
    msg = f"could not download {spec.id}: " + "; ".join(reasons) if reasons else f"{spec.id} has no automatic source"
    if manual:
        msg += ". Manual step: " + " | ".join(manual)
    raise DownloadError(msg)


def _run_plan(spec: ModelSpec, dest: Path, src: Source, planned: list[PlannedFile]) -> DownloadResult:
    results: dict[str, str] = {}
    todo = []
    for pf in planned:
        if pf.dest.exists():
            problem = verify_file(pf.dest, pf)
            if problem:
                raise DownloadError(f"{pf.dest} exists but is not {src.name}'s {pf.spec.local} ({problem}); it "
                                    f"was left untouched: move it away (or delete it) and run the command again")
            results[pf.spec.local] = "present"
        else:
            todo.append(pf)
    remaining = sum((pf.size or pf.spec.size_hint or 0) - (pf.partial.stat().st_size if pf.partial.exists() else 0)
                    for pf in todo)
    where = f"{src.kind} {src.where}"
    _say(f"source {src.name} ({where}): {len(todo)} of {len(planned)} files to fetch, {human_size(max(remaining, 0))}")
    _check_disk(dest, max(remaining, 0))
    for pf in todo:
        t0 = time.perf_counter()
        how = fetch_file(pf, src.kind)
        check = "SHA-256" if pf.sha256 else ("git blob id" if pf.git_sha1 else "size")
        _say(f"  {pf.spec.local}: {how} {human_size(pf.dest.stat().st_size)} in {time.perf_counter() - t0:.1f} s, "
             f"{check} verified")
        results[pf.spec.local] = how
    _say(f"{spec.id}: complete in {dest}")
    return DownloadResult(spec.id, dest, src.name, results)
