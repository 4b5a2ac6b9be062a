"""Download stage: fetch one revision of a Hub repo into a folder, verify every byte, write a manifest.

    params = DownloadParams(repo_id="org/name", revision="<40-hex sha>", local_dir="...", result_dir="...")
    result = download(params)   # -> DownloadResult; raises DownloadError with what/where on failure

The same code path serves the real Hub (GPU boxes) and m3lab's LocalHub on 127.0.0.1 (embedded default):
the only difference is `endpoint`. huggingface_hub reads HF_ENDPOINT once, at import time, so we never rely
on the environment being set early enough -- the endpoint is resolved here and passed explicitly to every call.

Steps:
  1. preflight: resolve the revision to a commit sha and list that commit's files with sizes and hashes (one
     API call), apply the patterns, and check that the disk at `local_dir` has room for what is missing --
     before any byte is written. Everything below works on the commit, so a branch that moves in between
     cannot mix two commits.
  2. check what is already there: every file on disk is hashed now and compared with the Hub's own hash
     (sha256 for LFS files, git blob id otherwise). A file that does not match is deleted and fetched again.
     No hash is ever taken from a cache: size and mtime say nothing about a flipped byte.
  3. fetch what is missing with huggingface_hub's own primitives -- `get_hf_file_metadata` (the HEAD that
     finds the CDN location) and `http_get` (the GET, with HTTP Range) -- into a partial file whose name is
     the same in every run for (repo, commit, file). A dropped connection is resumed by the client within a
     run; a run that is interrupted leaves the partial, and the next run continues it with a Range request.
     (`snapshot_download` cannot do that: in huggingface_hub 1.33 it writes to a temp file unique to the
     process and deletes it on failure -- huggingface_hub PR 4228 -- so nothing survives for a next run.)
  4. hash what was fetched; a file that does not match is fetched once more from byte 0, and if it still
     does not match, the stage fails with a DownloadError naming the file, the Hub's hash and the file's.
  5. write `manifest.json` (temp file + rename) into `result_dir`, with the hashes computed in this run. The
     manifest is the stage's "done" marker: it is removed when a run starts and only written when every file
     checked out.

Every run hashes every file once: about 10 ms for the embedded model, disk speed for a real checkpoint. That
is the price of never reporting a hash the file does not have.

The HF token is read from the environment variable *named* by `token_env`; the value is handed to the client
and nowhere else -- not to params, results, manifest, logs or error messages -- and never to a CDN host.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import httpx
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import WeakFileLock, build_hf_headers, filter_repo_objects

from m3lab import tinymodel
from m3lab.hub import LocalHub

__all__ = ["MANIFEST_NAME", "DownloadError", "DownloadParams", "DownloadResult", "ManifestFile", "download",
           "resolve_commit", "run_stage"]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "m3lab.download/1"
DEFAULT_ENDPOINT = "https://huggingface.co"
HASH_CHUNK = 8 * 1024 * 1024
# Where a file's bytes collect until it is complete, inside local_dir (see _partial_path).
PARTIAL_DIR = Path(".cache") / "m3lab" / "partial"
# huggingface_hub's own temp files, left by a killed `snapshot_download` (a unique name per process: never resumed).
HF_PARTIAL_DIR = Path(".cache") / "huggingface" / "download"
# A partial file that this download will not continue (another commit, other patterns, or the client's), older
# than this, has no live download writing it, so it is only wasted disk.
STALE_PARTIAL_S = 600
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
HF_TOKEN_SHAPE = re.compile(r"hf_[A-Za-z0-9]{30,}")  # user access tokens: "hf_" + 34 letters/digits


class DownloadError(RuntimeError):
    """The download stage failed; the message says what failed and where (repo, revision, endpoint, path)."""


@dataclass(frozen=True)
class DownloadParams:
    repo_id: str  # "org/name"
    revision: str  # pin a 40-hex commit sha; a branch/tag works too and its resolved sha is recorded
    local_dir: str  # where the repo's files go (m3lab keeps its partial files in local_dir/.cache/)
    result_dir: str  # where manifest.json goes
    allow_patterns: list[str] | None = None  # fnmatch patterns, as in snapshot_download
    ignore_patterns: list[str] | None = None
    endpoint: str | None = None  # None -> $HF_ENDPOINT read now, else https://huggingface.co
    token_env: str | None = "HF_TOKEN"  # NAME of the env var holding the token; unset var -> client's default
    min_free_gb: float = 1.0  # disk that must stay free at local_dir after the download
    max_workers: int = 8  # parallel file downloads
    # The commit `revision` resolved to, when the caller resolved it already (run_stage does, to name local_dir
    # after it): files are then listed and fetched at this commit, and `revision` is only recorded.
    commit: str | None = None

    def __post_init__(self) -> None:
        if not self.repo_id or self.repo_id != self.repo_id.strip() or self.repo_id.count("/") > 1:
            raise ValueError(f"repo_id must look like 'org/name', got {self.repo_id!r}")
        if not isinstance(self.revision, str) or not self.revision.strip():
            raise ValueError(f"revision is required (pin a commit sha) for {self.repo_id!r}, got {self.revision!r}")
        if self.commit is not None and not COMMIT_SHA.fullmatch(self.commit):
            raise ValueError(f"commit must be a 40-hex commit sha, got {self.commit!r}")
        if self.token_env is not None and (
            not ENV_NAME.fullmatch(self.token_env) or HF_TOKEN_SHAPE.fullmatch(self.token_env)
        ):
            # Deliberately not echoed: a common mistake is pasting the token itself here.
            raise ValueError("token_env must be the NAME of an environment variable (e.g. 'HF_TOKEN'), not a token")
        if self.min_free_gb < 0:
            raise ValueError(f"min_free_gb must be >= 0, got {self.min_free_gb}")
        # Accept a single pattern string too, and store lists so params stay JSON-friendly.
        for name in ("allow_patterns", "ignore_patterns"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, [value])
            elif value is not None:
                object.__setattr__(self, name, list(value))


@dataclass(frozen=True)
class ManifestFile:
    path: str
    size: int
    sha256: str  # computed from the file in the run that wrote the manifest, never taken from a cache


@dataclass(frozen=True)
class DownloadResult:
    repo_id: str
    revision: str  # as requested
    commit_sha: str  # what it resolved to
    endpoint: str
    local_dir: Path
    manifest_path: Path
    files: tuple[ManifestFile, ...]
    total_bytes: int
    fetched_files: tuple[str, ...]  # files that were missing, incomplete or not the Hub's bytes before this run
    seconds: float


@dataclass(frozen=True)
class _RemoteFile:
    """One file as the Hub lists it: its size and the hash the Hub vouches for."""

    path: str
    size: int
    sha256: str | None  # LFS files: sha256 of the content
    blob_id: str | None  # regular files: git blob id of the content (None for LFS files: theirs is the pointer's)


@dataclass(frozen=True)
class _Source:
    """Where the bytes come from: one commit of one repo at one endpoint."""

    repo_id: str
    revision: str  # as asked, for messages
    commit: str
    endpoint: str
    token_env: str | None  # for messages: where the token came from
    token: str | None = field(default=None, repr=False)

    @property
    def where(self) -> str:
        return f"{self.repo_id!r} at revision {self.revision!r} (commit {self.commit}) from {self.endpoint}"


@dataclass(frozen=True)
class _Digest:
    """What a file on disk hashes to, now."""

    size: int
    sha256: str
    git_blob_id: str | None  # only computed for files whose Hub hash is a git blob id


# -----------------------------------------------------------------------------
# The stage


def download(params: DownloadParams) -> DownloadResult:
    t0 = time.perf_counter()
    endpoint = _endpoint(params.endpoint)
    token = _read_token(params.token_env)
    local_dir = Path(params.local_dir).expanduser().resolve()
    manifest_path = Path(params.result_dir).expanduser().resolve() / MANIFEST_NAME

    # Any manifest from an earlier run goes first: whatever fails below, no stale "done" marker remains.
    manifest_path.unlink(missing_ok=True)

    # 1. preflight: what to fetch, how big, and is there room -- nothing written to local_dir yet
    commit, wanted = _list_files(params, endpoint, token)
    src = _Source(params.repo_id, params.revision, commit, endpoint, params.token_env, token)
    if any(manifest_path == local_dir / f.path for f in wanted):
        raise DownloadError(f"manifest path {manifest_path} would overwrite a downloaded file of {src.where}")
    missing = [f for f in wanted if not _looks_complete(local_dir / f.path, f)]
    _check_disk(local_dir, sum(f.size for f in missing), params.min_free_gb)
    _remove_stale_partials(local_dir, keep={_partial_path(local_dir, src, f).name for f in wanted})

    # 2. what is already on disk is hashed now and must be the Hub's bytes
    files, wrong = _verify(local_dir, [f for f in wanted if f not in missing])
    for f, why in wrong:
        logger.warning("%s in %s is not the file of %s (%s): fetching it again", f.path, local_dir, src.where, why)
        (local_dir / f.path).unlink(missing_ok=True)
    to_fetch = sorted(missing + [f for f, _ in wrong], key=lambda f: f.path)
    logger.info(
        "download %s: %d files, %d bytes; %d files (%d bytes) to fetch into %s",
        src.where,
        len(wanted),
        sum(f.size for f in wanted),
        len(to_fetch),
        sum(f.size for f in to_fetch),
        local_dir,
    )

    # 3. fetch (resuming partials), 4. verify; one more fetch, from byte 0, for a file that fails
    if to_fetch:
        files += _fetch_verified(src, local_dir, to_fetch, params.max_workers)
    files.sort(key=lambda f: f.path)

    # 5. manifest, atomically
    total = sum(f.size for f in files)
    _write_json_atomic(
        manifest_path,
        {
            "format": MANIFEST_FORMAT,
            "repo_id": params.repo_id,
            "revision": params.revision,
            "commit_sha": commit,
            "allow_patterns": params.allow_patterns,
            "ignore_patterns": params.ignore_patterns,
            "files": [asdict(f) for f in files],
            "total_bytes": total,
        },
    )
    result = DownloadResult(
        repo_id=params.repo_id,
        revision=params.revision,
        commit_sha=commit,
        endpoint=endpoint,
        local_dir=local_dir,
        manifest_path=manifest_path,
        files=tuple(files),
        total_bytes=total,
        fetched_files=tuple(f.path for f in to_fetch),
        seconds=time.perf_counter() - t0,
    )
    logger.info("download %s: done in %.2fs, manifest %s", src.where, result.seconds, manifest_path)
    return result


def resolve_commit(repo_id: str, revision: str, *, endpoint: str | None = None,
                   token_env: str | None = "HF_TOKEN") -> str:
    """The commit sha that `revision` (branch, tag or sha) points to now, asked of the Hub (one API call).

    Name folders after this, never after the revision: a branch can point at other weights tomorrow, a
    commit cannot. Pass it on as `DownloadParams.commit` so the download fetches exactly that commit."""
    endpoint = _endpoint(endpoint)
    try:
        info = HfApi(endpoint=endpoint, token=_read_token(token_env)).model_info(repo_id, revision=revision)
    except Exception as err:
        raise _wrap(err, repo_id, revision, endpoint, token_env, stage="resolving the revision of") from err
    if not info.sha or not COMMIT_SHA.fullmatch(info.sha):
        raise DownloadError(f"{endpoint} returned no commit sha for {repo_id!r}@{revision!r} (got {info.sha!r})")
    return info.sha


# -----------------------------------------------------------------------------
# Steps


def _endpoint(endpoint: str | None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _read_token(token_env: str | None) -> str | None:
    # None lets huggingface_hub fall back to its own lookup ($HF_TOKEN, `hf auth login`).
    value = os.environ.get(token_env, "").strip() if token_env else ""
    return value or None


def _list_files(params: DownloadParams, endpoint: str, token: str | None) -> tuple[str, list[_RemoteFile]]:
    """Resolve the revision to a commit sha and list the files the patterns select, with sizes and hashes."""
    revision = params.commit or params.revision
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(
            params.repo_id, revision=revision, files_metadata=True
        )
    except Exception as err:
        raise _wrap(err, params.repo_id, params.revision, endpoint, params.token_env, stage="listing files of") from err
    if not info.sha or info.siblings is None:
        raise DownloadError(f"{endpoint} returned no commit sha / file list for {params.repo_id!r}@{revision!r}")
    files = [
        _RemoteFile(
            path=s.rfilename,
            size=s.size if s.size is not None else -1,
            sha256=s.lfs.sha256 if s.lfs is not None else None,
            blob_id=s.blob_id if s.lfs is None else None,
        )
        for s in info.siblings
    ]
    # The very filter snapshot_download applies, so a profile's patterns select what they always did.
    wanted = list(
        filter_repo_objects(
            files, allow_patterns=params.allow_patterns, ignore_patterns=params.ignore_patterns, key=lambda f: f.path
        )
    )
    if not wanted:
        raise DownloadError(
            f"allow_patterns={params.allow_patterns} ignore_patterns={params.ignore_patterns} match none of the "
            f"{len(files)} files of {params.repo_id!r} at revision {params.revision!r} "
            f"(files: {sorted(f.path for f in files)[:20]})"
        )
    if unsafe := [f.path for f in wanted if not _is_safe_relative(f.path)]:
        # The files are written to local_dir / path: a listed path must not reach outside local_dir.
        raise DownloadError(f"{endpoint} lists unsafe file paths {unsafe} for {params.repo_id!r}@{revision!r}")
    if unsized := [f.path for f in wanted if f.size < 0]:
        raise DownloadError(f"{endpoint} did not report sizes for {unsized} of {params.repo_id!r}")
    if unhashed := [f.path for f in wanted if not (f.sha256 or f.blob_id)]:
        # Without the Hub's hash a file cannot be verified, and an unverified file is never reported ok.
        raise DownloadError(f"{endpoint} did not report hashes (lfs.sha256 / blobId) for {unhashed} of "
                            f"{params.repo_id!r}@{revision!r}, so they cannot be verified")
    return info.sha, sorted(wanted, key=lambda f: f.path)


def _is_safe_relative(path: str) -> bool:
    """A repo path that stays inside the folder it is joined to: relative, no `..`, no drive, no backslash."""
    if not path or path.startswith("/") or "\\" in path or ":" in path.split("/")[0]:
        return False
    return ".." not in path.split("/")


def _partial_path(local_dir: Path, src: _Source, f: _RemoteFile) -> Path:
    """Where the bytes of `f` collect until it is complete: one name per (repo, commit, file), the same in
    every run, so a run finds -- and continues with a Range request -- what an interrupted one wrote."""
    key = hashlib.sha256(f"{src.repo_id}\0{src.commit}\0{f.path}".encode()).hexdigest()[:16]
    return local_dir / PARTIAL_DIR / f"{PurePosixPath(f.path).name}.{key}.part"


def _remove_stale_partials(local_dir: Path, keep: set[str]) -> None:
    """Delete partial files that no run of this download will continue, once older than STALE_PARTIAL_S
    (younger ones may belong to a download still running): m3lab's own for files not wanted now (another
    commit, other patterns) and huggingface_hub's `*.incomplete`. This download's own partials, named in
    `keep`, stay at any age: they are what the next Range request continues."""
    now = time.time()
    for folder, pattern in ((local_dir / PARTIAL_DIR, "*.part"), (local_dir / HF_PARTIAL_DIR, "*.incomplete")):
        for partial in folder.rglob(pattern) if folder.is_dir() else ():
            try:
                if partial.name not in keep and now - partial.stat().st_mtime > STALE_PARTIAL_S:
                    logger.info("removing a partial file no download will continue: %s", partial)
                    partial.unlink()
            except FileNotFoundError:
                pass


def _looks_complete(path: Path, f: _RemoteFile) -> bool:
    # Only for planning (space, what to fetch): content is always checked by hash before a verdict.
    return path.is_file() and path.stat().st_size == f.size


def _check_disk(local_dir: Path, needed: int, min_free_gb: float) -> None:
    probe = local_dir
    while not probe.exists():  # local_dir may not exist yet: measure the filesystem it will live on
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    margin = int(min_free_gb * 1e9)
    if free < needed + margin:
        raise DownloadError(
            f"not enough disk space at {probe} (for {local_dir}): need {needed + margin} bytes "
            f"({needed} to download + {margin} kept free by min_free_gb={min_free_gb}), {free} bytes free "
            f"({free / 1e9:.1f} GB)"
        )


def _fetch_verified(src: _Source, local_dir: Path, files: list[_RemoteFile], max_workers: int) -> list[ManifestFile]:
    """Fetch `files`, hash them, and fetch any that do not match once more, from byte 0. One that still does
    not match is deleted and raised as a DownloadError naming it, the Hub's hash and the file's."""
    _fetch(src, local_dir, files, max_workers)
    ok, wrong = _verify(local_dir, files)
    if wrong:
        logger.warning("fetching again %d file(s) that do not match the Hub's hashes: %s",
                       len(wrong), "; ".join(f"{f.path}: {why}" for f, why in wrong))
        retry = [f for f, _ in wrong]
        for f in retry:
            _discard(local_dir, src, f)
        _fetch(src, local_dir, retry, max_workers)
        again, wrong = _verify(local_dir, retry)
        ok += again
    if wrong:
        for f, _ in wrong:
            _discard(local_dir, src, f)  # nothing later may pick up bytes that are not the Hub's
        raise DownloadError(
            f"{len(wrong)} file(s) of {src.where} do not match the Hub's hashes, fetched twice into {local_dir}: "
            + "; ".join(f"{f.path}: {why}" for f, why in wrong)
        )
    return ok


def _fetch(src: _Source, local_dir: Path, files: list[_RemoteFile], max_workers: int) -> None:
    """Fetch `files` in parallel. The first failure stops the other transfers at their next chunk, keeping
    what they wrote for the next run, and is raised as a DownloadError. Ctrl-C stops them the same way."""
    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(files))), thread_name_prefix="m3lab-dl") as pool:
        futures = [pool.submit(_transfer, src, local_dir, f, stop) for f in files]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
        finally:
            stop.set()  # a no-op for transfers that finished
            for future in futures:
                future.cancel()  # those not started yet
    for f, future in zip(files, futures, strict=True):
        err = None if future.cancelled() else future.exception()
        if err is not None and not isinstance(err, _Stopped):
            not_done = [g.path for g in files if not _looks_complete(local_dir / g.path, g)]
            wrapped = _wrap(err, src.repo_id, src.revision, src.endpoint, src.token_env, stage="downloading",
                            local_dir=local_dir)
            raise DownloadError(f"{wrapped} (file {f.path}); not downloaded into {local_dir}: {not_done}") from err


def _transfer(src: _Source, local_dir: Path, f: _RemoteFile, stop: threading.Event) -> None:
    """Fetch one file through its stable partial file: continue what an earlier run (or attempt) wrote, then
    move it into place. On any failure the partial stays, for the next run's Range request."""
    dest, partial = local_dir / f.path, _partial_path(local_dir, src, f)
    partial.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(partial.with_name(partial.name + ".lock")):  # one writer per partial, across processes
        if _looks_complete(dest, f):  # another run finished it while this one waited; it is hashed next
            return
        url, headers = _locate(src, f)
        fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o666)
        with os.fdopen(fd, "r+b") as fh:
            have = fh.seek(0, os.SEEK_END)
            if have > f.size:  # cannot be this file's prefix
                have = fh.seek(0)
                fh.truncate()
            if have:
                logger.info("resuming %s at byte %d of %d from %s", f.path, have, f.size, partial)
            http_get(url, _StoppableWriter(fh, stop), resume_size=have, headers=headers, expected_size=f.size,
                     displayed_filename=f.path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, dest)


def _locate(src: _Source, f: _RemoteFile) -> tuple[str, dict[str, str]]:
    """The URL of the bytes of `f` at the commit and the headers to send there, found as hf_hub_download
    finds them: a HEAD of the file's /resolve URL. A redirect to another host is the CDN, and the token
    is not sent there."""
    url = hf_hub_url(src.repo_id, f.path, revision=src.commit, endpoint=src.endpoint)
    location = get_hf_file_metadata(url, token=src.token, endpoint=src.endpoint).location
    headers = build_hf_headers(token=src.token)
    if urlsplit(location).netloc != urlsplit(url).netloc:
        headers.pop("authorization", None)
    return location, headers


class _Stopped(Exception):
    """A transfer was stopped because the run is stopping (another transfer failed, or Ctrl-C)."""


class _StoppableWriter:
    """The partial file as `http_get` sees it: every write first checks the run's stop flag, so a stopping
    run ends each transfer at its next chunk instead of after the whole file."""

    def __init__(self, fh, stop: threading.Event) -> None:
        self._fh, self._stop = fh, stop

    def write(self, data: bytes) -> int:
        if self._stop.is_set():
            raise _Stopped()
        return self._fh.write(data)

    def __getattr__(self, name: str):  # seek, tell, truncate: what http_get needs when a server ignores Range
        return getattr(self._fh, name)


def _discard(local_dir: Path, src: _Source, f: _RemoteFile) -> None:
    """Delete a file that is not the Hub's, and its partial, so the next fetch of it starts from byte 0."""
    (local_dir / f.path).unlink(missing_ok=True)
    _partial_path(local_dir, src, f).unlink(missing_ok=True)


def _verify(local_dir: Path, files: list[_RemoteFile]) -> tuple[list[ManifestFile], list[tuple[_RemoteFile, str]]]:
    """Hash every file now and compare it with what the Hub lists. Returns the manifest entries of those that
    match, and (file, what is wrong) for the others."""
    # hashlib releases the GIL on large buffers, so threads hash several big files in parallel.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda f: _hash(local_dir / f.path, git_blob_id=f.blob_id is not None), files))
    ok, wrong = [], []
    for f, digest in zip(files, digests, strict=True):
        if why := _mismatch(f, digest):
            wrong.append((f, why))
        else:
            ok.append(ManifestFile(path=f.path, size=f.size, sha256=digest.sha256))
    return ok, wrong


def _hash(path: Path, git_blob_id: bool) -> _Digest | None:
    """sha256 of the file (and its git blob id if asked), read from disk now; None if there is no file."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        sha256 = hashlib.sha256()
        git = hashlib.sha1(b"blob %d\0" % size) if git_blob_id else None
        while chunk := fh.read(HASH_CHUNK):
            sha256.update(chunk)
            if git is not None:
                git.update(chunk)
    return _Digest(size, sha256.hexdigest(), git.hexdigest() if git is not None else None)


def _mismatch(f: _RemoteFile, digest: _Digest | None) -> str | None:
    """What is wrong with the file on disk compared with the Hub's listing of it, or None if it matches."""
    if digest is None:
        return "missing"
    if digest.size != f.size:
        return f"size {digest.size}, the Hub lists {f.size}"
    if f.sha256 is not None and digest.sha256 != f.sha256:
        return f"sha256 {digest.sha256}, the Hub lists {f.sha256}"
    if f.blob_id is not None and digest.git_blob_id != f.blob_id:
        return f"git blob id {digest.git_blob_id}, the Hub lists {f.blob_id}"
    return None


def _write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -----------------------------------------------------------------------------
# Helpers


def _wrap(err: Exception, repo: str, rev: str, endpoint: str, token_env: str | None, stage: str,
          local_dir: Path | str | None = None) -> DownloadError:
    """Turn a huggingface_hub / network error into one DownloadError naming what and where."""
    url = _url_of(err)
    token_from = f"${token_env}" if token_env else "huggingface_hub's default lookup"
    if isinstance(err, RevisionNotFoundError):
        return DownloadError(f"revision {rev!r} not found in repo {repo!r} at {endpoint}")
    if isinstance(err, RemoteEntryNotFoundError):
        return DownloadError(f"file missing on the server while {stage} {repo!r}@{rev!r}: 404 for {url}")
    if isinstance(err, GatedRepoError):
        return DownloadError(f"repo {repo!r} at {endpoint} is gated: accept its terms; token from {token_from}")
    if isinstance(err, RepositoryNotFoundError):
        return DownloadError(
            f"repo {repo!r} not found at {endpoint} (or it is private and the token from "
            f"{token_from} is missing or has no access)"
        )
    if isinstance(err, HfHubHTTPError):
        status = err.response.status_code if err.response is not None else "?"
        return DownloadError(f"HTTP {status} while {stage} {repo!r}@{rev!r}: {url}")
    if isinstance(err, OfflineModeIsEnabled):
        return DownloadError(f"HF_HUB_OFFLINE is set, so {endpoint} was not asked for {repo!r}@{rev!r}")
    if isinstance(err, (httpx.HTTPError, LocalEntryNotFoundError)):
        return DownloadError(f"cannot reach {endpoint} while {stage} {repo!r}@{rev!r}: {type(err).__name__}")
    if isinstance(err, OSError):
        return DownloadError(f"I/O error while {stage} {repo!r}@{rev!r} into {local_dir}: {err}")
    return DownloadError(f"{type(err).__name__} while {stage} {repo!r}@{rev!r} from {endpoint}: {err}")


def _url_of(err: Exception) -> str | None:
    response = getattr(err, "response", None)
    try:
        return str(response.request.url) if response is not None else None
    except RuntimeError:  # httpx raises if the response has no request attached
        return None


# -----------------------------------------------------------------------------
# the DAG stage


def _embedded_checkpoint(cache_dir: Path, overrides: dict, seed: int) -> Path:
    """Build the tiny M3 once per (spec, seed, weights, code) into the cache; the build is deterministic, so the
    folder name is a hash of what decides its bytes (for trained weights: the committed file's own hash).
    Built in a temp folder and renamed: never half-written.

    `overrides` are TinySpec fields, plus `weights`: "trained" (default; the committed weights, default spec
    only) or "random"."""
    import dataclasses

    import transformers


    overrides = dict(overrides)
    weights = overrides.pop("weights", "trained")
    if weights not in ("trained", "random"):
        raise DownloadError(f"model.embedded.weights: {weights!r}; expected 'trained' or 'random'")
    names = {f.name for f in dataclasses.fields(tinymodel.TinySpec)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise DownloadError(f"model.embedded: unknown TinySpec field(s) {unknown}; fields: {sorted(names)} "
                            f"and weights")
    spec = tinymodel.TinySpec(**overrides)
    try:
        weights_id = (hashlib.sha256(tinymodel.trained_weights(spec, seed).read_bytes()).hexdigest()
                      if weights == "trained" else "random")
    except (FileNotFoundError, ValueError) as err:
        raise DownloadError(f"model.embedded: {err}") from err
    key = hashlib.sha256(json.dumps([dataclasses.asdict(spec), seed, weights_id, transformers.__version__,
                                     Path(tinymodel.__file__).read_text()], sort_keys=True).encode()).hexdigest()
    out = cache_dir / "embedded" / key[:16]
    if not (out / "model.safetensors").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
        tinymodel.build_tiny_checkpoint(tmp, spec, seed, weights=weights)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return out


def run_stage(ctx) -> dict:
    """Download the profile's checkpoint. `model.source: embedded` builds the tiny M3 and serves it from a
    LocalHub on 127.0.0.1 for the duration of the download: the real client does a real HTTP download.

    The revision is resolved to its commit first, and the default folder is named after that commit
    (`<cache>/models/<repo_id>/<commit>`): two profiles whose weights share a branch name get two folders."""

    model, cfg = ctx.params["model"], ctx.params["download"]
    # `use: published` fetches the card's own quantized checkpoint instead of the base model.
    published = model.get("use") == "published" and model.get("published")
    repo_id = model["published"] if published else model["repo_id"]
    revision = (model.get("published_revision") or "main") if published else model["revision"]

    def fetch(endpoint: str | None) -> DownloadResult:
        commit = resolve_commit(repo_id, revision, endpoint=endpoint, token_env=cfg["token_env"])
        local_dir = cfg["local_dir"] or str(ctx.cache_dir / "models" / repo_id / commit)
        return download(DownloadParams(
            repo_id=repo_id, revision=revision, commit=commit, local_dir=local_dir, result_dir=str(ctx.stage_dir),
            allow_patterns=cfg["allow_patterns"], ignore_patterns=cfg["ignore_patterns"], endpoint=endpoint,
            token_env=cfg["token_env"], min_free_gb=cfg["min_free_gb"],
        ))

    if model["source"] == "embedded":
        folder = _embedded_checkpoint(ctx.cache_dir, model.get("embedded") or {}, model.get("seed", 0))
        with LocalHub({model["repo_id"]: folder}) as hub:
            res = fetch(hub.endpoint)
        endpoint = "embedded LocalHub on 127.0.0.1"
    else:
        res = fetch(cfg["endpoint"])
        endpoint = res.endpoint
    return {
        "repo_id": res.repo_id,
        "revision": res.revision,
        "commit": res.commit_sha,
        "endpoint": endpoint,
        "model_dir": str(res.local_dir),  # what the quantize stage reads
        "manifest": str(res.manifest_path),
        # The runner re-hashes these before it reuses this stage (m3lab.digest.verify_artifacts).
        "artifacts": {"model": {"path": str(res.local_dir), "files": {f.path: f.sha256 for f in res.files}}},
        "files": [asdict(f) for f in res.files],
        "total_bytes": res.total_bytes,
        "total_gib": round(res.total_bytes / 2**30, 3),
        "published": bool(published),
        "fetched_files": list(res.fetched_files),
        "seconds": round(res.seconds, 3),
    }
