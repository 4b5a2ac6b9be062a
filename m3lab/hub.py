"""A tiny Hugging Face Hub look-alike that serves local folders as model repos.

The download stage always goes through the real `huggingface_hub` client. On GPU boxes that client
talks to the real Hub; for the embedded default (no internet) it talks to this server on 127.0.0.1,
passed as `endpoint=`. The server implements exactly what huggingface_hub 1.33's `snapshot_download`,
`hf_hub_download`, `get_hf_file_metadata`, `http_get` and `HfApi.model_info` ask for (read from the client
source, then checked by running it):

    GET  /api/models/{repo}[/revision/{rev}]      repo info: `sha`, `siblings` (+ size/blobId/lfs with ?blobs=true)
    GET  /api/models/{repo}/tree/{rev}[/{path}]   tree listing (?recursive=true), used by snapshot_download
    HEAD /{repo}/resolve/{rev}/{path}             per-file metadata: X-Repo-Commit, ETag, Content-Length
    GET  /{repo}/resolve/{rev}/{path}             file bytes, with HTTP Range (the client resumes with it)
    GET  /_cdn/{sha256}                           large ("LFS") file bytes, reached through a 302 redirect

Large files behave like LFS files on the Hub: /resolve answers 302 with X-Linked-Etag (sha256) and
X-Linked-Size, and points at a different host name ("localhost" instead of "127.0.0.1", same socket) so
the client treats it as a CDN -- it stops following there and drops the Authorization header, as it does
for the real CDN. Errors carry the Hub's `X-Error-Code` header (RepoNotFound / RevisionNotFound /
EntryNotFound), which the client maps onto its own exception types.

A repo is a snapshot of its folder taken when the hub is created: its one commit (branch `main`) has a
sha derived from the files' content, so the same folder always gets the same sha and a caller can pin it.
A file deleted from the folder afterwards is answered with 404 EntryNotFound ("gone from the server").

Requests are recorded in `LocalHub.requests` (method, path, Range header, and whether an Authorization
header was present -- never its value), and `bytes_sent(path)` counts the file bytes each file cost. Nothing
here logs or echoes request headers.

Fault injection, for tests: `drop_connection_once` hangs up mid-file once (the client's own retry resumes it
within the run); `interrupt` hangs up and then refuses the file with 503 until `restore`, so the run ends
with a partial file on disk -- what a killed or failed run leaves for the next one to resume.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["LFS_THRESHOLD", "LocalHub", "RequestRecord"]

logger = logging.getLogger(__name__)

# Files at least this big are served like git-lfs files (the Hub's own threshold is 10 MB).
LFS_THRESHOLD = 10 * 1024 * 1024
CHUNK = 1024 * 1024
# Directories never published: VCS data and the client's own bookkeeping (a folder that was itself
# a `local_dir` download contains `.cache/huggingface/`).
SKIP_DIRS = {".git", ".cache"}

# Routes, matched against the raw (still percent-encoded) URL path. The client quotes the revision with
# `safe=""` (so "refs/pr/1" arrives as one segment) and the file path with `/` kept.
REPO = r"(?P<repo>[^/]+/[^/]+)"
API_INFO = re.compile(rf"^/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?/?$")
API_TREE = re.compile(rf"^/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+?))?/?$")
RESOLVE = re.compile(rf"^/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
CDN = re.compile(r"^/_cdn/(?P<sha256>[0-9a-f]{64})$")


# -----------------------------------------------------------------------------
# Published content


def _git_oid(data: bytes) -> str:
    """Git blob id of `data` -- what the Hub reports as a file's `oid` / `blobId` / ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class _File:
    path: str  # path inside the repo, "/"-separated
    source: Path  # where the bytes live on this machine
    size: int
    sha256: str
    oid: str  # git blob id of the content, or of the LFS pointer for large files (as on the Hub)
    lfs: bool
    pointer_size: int  # size of the LFS pointer text; 0 for regular files

    def tree_entry(self) -> dict:
        entry: dict = {"type": "file", "oid": self.oid, "size": self.size, "path": self.path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return entry

    def sibling(self, with_blobs: bool) -> dict:
        if not with_blobs:
            return {"rfilename": self.path}
        sibling: dict = {"rfilename": self.path, "size": self.size, "blobId": self.oid}
        if self.lfs:
            sibling["lfs"] = {"sha256": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return sibling


def _publish_file(source: Path, path: str, lfs_threshold: int) -> _File:
    sha256, size = hashlib.sha256(), 0
    sha1 = hashlib.sha1(b"blob %d\0" % source.stat().st_size)
    with open(source, "rb") as f:
        while chunk := f.read(CHUNK):
            sha256.update(chunk)
            sha1.update(chunk)
            size += len(chunk)
    digest = sha256.hexdigest()
    if size < lfs_threshold:
        return _File(path, source, size, digest, sha1.hexdigest(), lfs=False, pointer_size=0)
    # On the Hub a large file's git blob is the LFS pointer text, so its oid is the pointer's git id.
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{digest}\nsize {size}\n".encode()
    return _File(path, source, size, digest, _git_oid(pointer), lfs=True, pointer_size=len(pointer))


@dataclass(frozen=True)
class _Repo:
    repo_id: str
    files: dict[str, _File]
    commit: str  # sha of the single commit that branch `main` points to

    def resolve(self, revision: str) -> str | None:
        return self.commit if revision in ("main", self.commit) else None


def _publish_repo(repo_id: str, folder: Path, lfs_threshold: int) -> _Repo:
    if not folder.is_dir():
        raise FileNotFoundError(f"LocalHub: folder for repo {repo_id!r} does not exist: {folder}")
    files: dict[str, _File] = {}
    for source in sorted(folder.rglob("*")):
        rel = source.relative_to(folder)
        if source.is_file() and not SKIP_DIRS.intersection(rel.parts[:-1]):
            files[rel.as_posix()] = _publish_file(source, rel.as_posix(), lfs_threshold)
    # Commit sha = hash of (repo id, every path and blob id): same folder content -> same sha, always.
    h = hashlib.sha1(f"m3lab-localhub\n{repo_id}\n".encode())
    for path, f in sorted(files.items()):
        h.update(f"{path}\0{f.oid}\n".encode())
    return _Repo(repo_id, files, h.hexdigest())


# -----------------------------------------------------------------------------
# The server


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str  # URL path and query as received (percent-encoded)
    range: str | None  # the Range header, if any
    authorized: bool  # whether an Authorization header was sent; its value is never kept


class LocalHub:
    """Serve `{repo_id: folder}` as Hub model repos on 127.0.0.1; use as a context manager.

    token: if set, every API/resolve request must carry `Authorization: Bearer <token>`, like a private
        repo (answered 401 RepoNotFound otherwise, as the Hub does). The CDN path is open, like a signed URL.
    lfs_threshold: files at least this many bytes are served as LFS files (redirect + X-Linked-* headers).
    """

    def __init__(
        self,
        repos: Mapping[str, str | Path],
        *,
        token: str | None = None,
        lfs_threshold: int = LFS_THRESHOLD,
    ) -> None:
        self._repos = {rid: _publish_repo(rid, Path(folder), lfs_threshold) for rid, folder in repos.items()}
        self._by_sha256 = {f.sha256: f for r in self._repos.values() for f in r.files.values() if f.lfs}
        self._token = token
        self._lock = threading.Lock()
        self._drops: dict[str, int] = {}
        self._outages: set[str] = set()
        self._sent: dict[str, int] = {}
        self._conns: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.requests: list[RequestRecord] = []

    # -- lifecycle

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.hub = self  # type: ignore[attr-defined]
        self._server = server
        # A short poll interval keeps stop() (and so each `with LocalHub(...)`) fast.
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="m3lab-localhub", daemon=True
        )
        self._thread.start()
        logger.info("LocalHub serving %s at %s", sorted(self._repos), self.endpoint)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        # Close kept-alive client connections too, so no handler thread outlives the hub.
        with self._lock:
            for conn in list(self._conns):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._server = None

    # -- what callers use

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("LocalHub is not running; use it as a context manager")
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cdn(self) -> str:
        # Same socket, different host name: the client only follows redirects that stay on the same
        # host, so this makes the large-file path behave like the Hub's redirect to its CDN.
        return f"http://localhost:{self.port}/_cdn"

    def commit(self, repo_id: str) -> str:
        """The commit sha of `main` for `repo_id` (pin this as the revision)."""
        return self._repos[repo_id].commit

    def drop_connection_once(self, path_in_repo: str, after_bytes: int) -> None:
        """Fault injection: the next GET of that file's bytes sends `after_bytes` bytes, then hangs up."""
        with self._lock:
            self._drops[path_in_repo] = after_bytes

    def interrupt(self, path_in_repo: str, after_bytes: int) -> None:
        """Fault injection: an interrupted transfer. The next GET of that file's bytes sends `after_bytes` bytes
        and hangs up; every later GET of them is answered 503 until `restore(path_in_repo)`, so the client's
        in-run retry fails too and the run ends with whatever it had written."""
        with self._lock:
            self._drops[path_in_repo] = after_bytes
            self._outages.add(path_in_repo)

    def restore(self, path_in_repo: str) -> None:
        """End an `interrupt`: that file is served normally again."""
        with self._lock:
            self._drops.pop(path_in_repo, None)
            self._outages.discard(path_in_repo)

    def bytes_sent(self, path_in_repo: str) -> int:
        """File bytes of `path_in_repo` written to clients so far, over every GET (resolve or CDN)."""
        with self._lock:
            return self._sent.get(path_in_repo, 0)

    def file_gets(self) -> list[RequestRecord]:
        """GET requests that transferred file bytes (resolve or CDN), oldest first."""
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and ("/resolve/" in r.path or "/_cdn/" in r.path)]

    # -- used by the handler

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self.requests.append(record)

    def _take_drop(self, path_in_repo: str) -> int | None:
        with self._lock:
            return self._drops.pop(path_in_repo, None)

    def _in_outage(self, path_in_repo: str) -> bool:
        with self._lock:
            return path_in_repo in self._outages

    def _count_sent(self, path_in_repo: str, n: int) -> None:
        with self._lock:
            self._sent[path_in_repo] = self._sent.get(path_in_repo, 0) + n

    def _authorized(self, header: str | None) -> bool:
        if self._token is None:
            return True
        expected = f"Bearer {self._token}".encode()
        return header is not None and hmac.compare_digest(header.encode(), expected)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client pools connections
    timeout = 60  # idle kept-alive connections are closed after this many seconds
    server_version = "m3lab-localhub"

    @property
    def hub(self) -> LocalHub:
        return self.server.hub  # type: ignore[attr-defined]

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._conns.add(self.connection)

    def finish(self) -> None:
        with self.hub._lock:
            self.hub._conns.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: object) -> None:
        # The default writes the request line to stderr; send it to logging instead. Only the request
        # line and status are ever logged -- never headers, so never an Authorization value.
        logger.debug("%s - %s", self.address_string(), format % args)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    # -- routing

    def _dispatch(self, head: bool) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.hub._record(
            RequestRecord(self.command, self.path, self.headers.get("Range"), "Authorization" in self.headers)
        )
        try:
            if m := CDN.match(url.path):
                return self._cdn(m["sha256"], head)
            if not self.hub._authorized(self.headers.get("Authorization")):
                # What the Hub answers for a private repo without (valid) credentials.
                return self._error(401, "RepoNotFound", "Invalid username or password.", head)
            if m := API_INFO.match(url.path):
                return self._model_info(unquote(m["repo"]), unquote(m["rev"] or "main"), query, head)
            if m := API_TREE.match(url.path):
                path = unquote(m["path"]) if m["path"] else ""
                return self._tree(unquote(m["repo"]), unquote(m["rev"]), path, query, head)
            if m := RESOLVE.match(url.path):
                return self._resolve(unquote(m["repo"]), unquote(m["rev"]), unquote(m["path"]), head)
            self._error(404, None, f"Not Found: {url.path}", head)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # client went away mid-response; nothing to answer

    def _repo_and_commit(self, repo_id: str, revision: str, head: bool) -> tuple[_Repo, str] | None:
        repo = self.hub._repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository not found: {repo_id}", head)
            return None
        commit = repo.resolve(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
            return None
        return repo, commit

    # -- endpoints

    def _model_info(self, repo_id: str, revision: str, query: dict[str, str], head: bool) -> None:
        found = self._repo_and_commit(repo_id, revision, head)
        if found is None:
            return
        repo, commit = found
        with_blobs = query.get("blobs", "").lower() == "true"
        org, _, _ = repo_id.partition("/")
        info = {
            "_id": commit[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": org,
            "sha": commit,
            "private": self.hub._token is not None,
            "gated": False,
            "disabled": False,
            "tags": [],
            "siblings": [f.sibling(with_blobs) for f in repo.files.values()],
        }
        self._json(200, info, head)

    def _tree(self, repo_id: str, revision: str, path: str, query: dict[str, str], head: bool) -> None:
        found = self._repo_and_commit(repo_id, revision, head)
        if found is None:
            return
        repo, _ = found
        recursive = query.get("recursive", "").lower() == "true"
        prefix = f"{path}/" if path else ""
        entries: list[dict] = []
        dirs: set[str] = set()
        for f in repo.files.values():
            if not f.path.startswith(prefix):
                continue
            parts = f.path[len(prefix) :].split("/")
            # Every folder between `path` and the file (only the first level when not recursive).
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                dirs.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append(f.tree_entry())
        if path and not entries and not dirs:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}", head)
        for d in sorted(dirs):
            entries.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d})
        self._json(200, entries, head)

    def _resolve(self, repo_id: str, revision: str, path: str, head: bool) -> None:
        found = self._repo_and_commit(repo_id, revision, head)
        if found is None:
            return
        repo, commit = found
        f = repo.files.get(path)
        if f is None or not _still_there(f):
            return self._error(
                404, "EntryNotFound", f"{path} does not exist on {revision}", head, {"X-Repo-Commit": commit}
            )
        headers = {"X-Repo-Commit": commit, "ETag": f'"{f.oid}"'}
        if f.lfs:
            # Like the Hub: metadata on the redirect itself, bytes from the CDN.
            headers |= {
                "X-Linked-Etag": f'"{f.sha256}"',
                "X-Linked-Size": str(f.size),
                "Location": f"{self.hub.cdn}/{f.sha256}",
            }
            self._send(302, headers, b"", head)
            return
        self._file(f, headers, head)

    def _cdn(self, sha256: str, head: bool) -> None:
        f = self.hub._by_sha256.get(sha256)
        if f is None or not _still_there(f):
            return self._error(404, None, "NoSuchKey", head)
        self._file(f, {"ETag": f'"{f.sha256}"'}, head)

    # -- responses

    def _file(self, f: _File, headers: dict[str, str], head: bool) -> None:
        # Injected faults apply to GETs of the bytes only; a pending cut is served before an outage refuses.
        cut = None if head else self.hub._take_drop(f.path)
        if cut is None and not head and self.hub._in_outage(f.path):
            return self._error(503, None, "Service Unavailable (injected outage)", head)
        start, end = 0, f.size - 1
        status = 200
        if (rng := self.headers.get("Range")) is not None:
            parsed = _parse_range(rng, f.size)
            if parsed is None:
                return self._error(416, None, "Range Not Satisfiable", head, {"Content-Range": f"bytes */{f.size}"})
            start, end = parsed
            status = 206
            headers = headers | {"Content-Range": f"bytes {start}-{end}/{f.size}"}
        length = end - start + 1
        self.send_response(status)
        for k, v in (headers | {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if head:
            return
        with open(f.source, "rb") as src:
            src.seek(start)
            sent = 0
            while sent < length:
                chunk = src.read(min(CHUNK, length - sent))
                if not chunk:
                    break
                if cut is not None and sent + len(chunk) >= cut:
                    # Injected fault: send up to `cut` bytes and hang up, like a dropped connection.
                    self.wfile.write(chunk[: max(cut - sent, 0)])
                    self.wfile.flush()
                    self.hub._count_sent(f.path, max(cut - sent, 0))
                    self.close_connection = True
                    return
                self.wfile.write(chunk)
                self.hub._count_sent(f.path, len(chunk))
                sent += len(chunk)

    def _json(self, status: int, payload: object, head: bool) -> None:
        self._send(status, {"Content-Type": "application/json"}, json.dumps(payload).encode(), head)

    def _error(self, status: int, code: str | None, message: str, head: bool, extra: dict | None = None) -> None:
        # The client reads X-Error-Code to pick its exception type and shows X-Error-Message / the
        # JSON "error" field. Messages only ever contain repo ids, revisions and paths.
        headers = {"Content-Type": "application/json", "X-Error-Message": message.encode("ascii", "replace").decode()}
        if code is not None:
            headers["X-Error-Code"] = code
        self._send(status, headers | (extra or {}), json.dumps({"error": message}).encode(), head)

    def _send(self, status: int, headers: dict[str, str], body: bytes, head: bool) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)


def _still_there(f: _File) -> bool:
    """A published file deleted (or resized) on disk since publishing counts as gone from the server."""
    try:
        return f.source.stat().st_size == f.size
    except FileNotFoundError:
        return False


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Parse a single `bytes=a-b`, `bytes=a-` or `bytes=-n` range; None if malformed or unsatisfiable."""
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if m is None or (m[1] == "" and m[2] == ""):
        return None
    if m[1] == "":  # suffix range: the last n bytes
        start, end = max(size - int(m[2]), 0), size - 1
    else:
        start = int(m[1])
        end = min(int(m[2]), size - 1) if m[2] else size - 1
    if start >= size or start > end:
        return None
    return start, end
