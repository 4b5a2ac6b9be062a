"""Download stage: fetch one pinned revision of a Hub repo into a folder, verify it, write a manifest.

    params = DownloadParams(repo_id="org/name", revision="<40-hex sha>", local_dir="...", result_dir="...")
    result = download(params)   # -> DownloadResult; raises DownloadError with what/where on failure

The same code path serves the real Hub (GPU boxes) and m3lab's LocalHub on 127.0.0.1 (embedded default):
the only difference is `endpoint`. huggingface_hub reads HF_ENDPOINT once, at import time, so we never rely
on the environment being set early enough -- the endpoint is resolved here and passed explicitly to every call.

Steps:
  1. preflight: list the repo's files and sizes at `revision` (one API call), apply the patterns, and check
     that the disk at `local_dir` has room for what is still missing -- before any byte is written.
  2. `huggingface_hub.snapshot_download` of the *resolved commit sha*, so the listing and the bytes come
     from the same commit even if a branch moves in between. Already-complete files are skipped without a
     network call; a dropped connection is resumed with an HTTP Range request by the client.
  3. verify every file against the Hub's own hashes (sha256 for LFS files, git blob id otherwise); a bad
     file is deleted and fetched again once.
  4. write `manifest.json` (temp file + rename) into `result_dir`. The manifest is the stage's "done"
     marker: it is removed when a run starts and only written when everything checked out.

The HF token is read from the environment variable *named* by `token_env`; the value is handed to the client
and nowhere else -- not to params, results, manifest, logs or error messages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects

from m3lab import tinymodel
from m3lab.hub import LocalHub

__all__ = ["MANIFEST_NAME", "DownloadError", "DownloadParams", "DownloadResult", "ManifestFile", "download",
           "run_stage"]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "m3lab.download/1"
DEFAULT_ENDPOINT = "https://huggingface.co"
HASH_CHUNK = 8 * 1024 * 1024
# A killed run leaves the client's temp file behind (`*.incomplete`, a unique name per run, never reused).
# Older than this, no live download is still writing it, so it is only wasted disk.
STALE_PARTIAL_S = 600
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
HF_TOKEN_SHAPE = re.compile(r"hf_[A-Za-z0-9]{30,}")  # user access tokens: "hf_" + 34 letters/digits


class DownloadError(RuntimeError):
    """The download stage failed; the message says what failed and where (repo, revision, endpoint, path)."""


@dataclass(frozen=True)
class DownloadParams:
    repo_id: str  # "org/name"
    revision: str  # pin a 40-hex commit sha; a branch/tag works too and its resolved sha is recorded
    local_dir: str  # where the repo's files go (the client keeps its bookkeeping in local_dir/.cache/)
    result_dir: str  # where manifest.json goes
    allow_patterns: list[str] | None = None  # fnmatch patterns, as in snapshot_download
    ignore_patterns: list[str] | None = None
    endpoint: str | None = None  # None -> $HF_ENDPOINT read now, else https://huggingface.co
    token_env: str | None = "HF_TOKEN"  # NAME of the env var holding the token; unset var -> client's default
    min_free_gb: float = 1.0  # disk that must stay free at local_dir after the download
    max_workers: int = 8  # parallel file downloads

    def __post_init__(self) -> None:
        if not self.repo_id or self.repo_id != self.repo_id.strip() or self.repo_id.count("/") > 1:
            raise ValueError(f"repo_id must look like 'org/name', got {self.repo_id!r}")
        if not isinstance(self.revision, str) or not self.revision.strip():
            raise ValueError(f"revision is required (pin a commit sha) for {self.repo_id!r}, got {self.revision!r}")
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
    sha256: str


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
    fetched_files: tuple[str, ...]  # files that were missing or incomplete locally before this run
    seconds: float


@dataclass(frozen=True)
class _RemoteFile:
    """One file as the Hub lists it: its size and the hash the Hub vouches for."""

    path: str
    size: int
    sha256: str | None  # LFS files: sha256 of the content
    blob_id: str | None  # regular files: git blob id of the content (None for LFS files: theirs is the pointer's)


# -----------------------------------------------------------------------------
# The stage


def download(params: DownloadParams) -> DownloadResult:
    t0 = time.perf_counter()
    endpoint = (params.endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    token = _read_token(params.token_env)
    local_dir = Path(params.local_dir).expanduser().resolve()
    manifest_path = Path(params.result_dir).expanduser().resolve() / MANIFEST_NAME

    # Any manifest from an earlier run goes first: whatever fails below, no stale "done" marker remains.
    manifest_path.unlink(missing_ok=True)

    # 1. preflight: what to fetch, how big, and is there room -- nothing written to local_dir yet
    commit, wanted = _list_files(params, endpoint, token)
    where = f"{params.repo_id!r} at revision {params.revision!r} (commit {commit}) from {endpoint}"
    if any(manifest_path == local_dir / f.path for f in wanted):
        raise DownloadError(f"manifest path {manifest_path} would overwrite a downloaded file of {where}")
    _remove_stale_partials(local_dir)
    missing = [f for f in wanted if not _looks_complete(local_dir / f.path, f)]
    _check_disk(local_dir, sum(f.size for f in missing), params.min_free_gb)
    logger.info(
        "download %s: %d files, %d bytes; %d files (%d bytes) to fetch into %s",
        where,
        len(wanted),
        sum(f.size for f in wanted),
        len(missing),
        sum(f.size for f in missing),
        local_dir,
    )

    # 2. fetch (no-op for files already complete), 3. verify; one repair round for files that fail
    _fetch(params, endpoint, token, commit, local_dir, wanted, where)
    files, bad = _verify(local_dir, wanted)
    if bad:
        logger.warning("re-fetching %d file(s) that failed verification: %s", len(bad), bad)
        for path in bad:
            (local_dir / path).unlink(missing_ok=True)  # the client re-fetches a file that is not there
        _fetch(params, endpoint, token, commit, local_dir, wanted, where)
        files, bad = _verify(local_dir, wanted)
        if bad:
            raise DownloadError(f"files of {where} in {local_dir} do not match the Hub's hashes: {bad}")

    # 4. manifest, atomically
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
        fetched_files=tuple(f.path for f in missing),
        seconds=time.perf_counter() - t0,
    )
    logger.info("download %s: done in %.2fs, manifest %s", where, result.seconds, manifest_path)
    return result


# -----------------------------------------------------------------------------
# Steps


def _read_token(token_env: str | None) -> str | None:
    # None lets huggingface_hub fall back to its own lookup ($HF_TOKEN, `hf auth login`).
    value = os.environ.get(token_env, "").strip() if token_env else ""
    return value or None


def _list_files(params: DownloadParams, endpoint: str, token: str | None) -> tuple[str, list[_RemoteFile]]:
    """Resolve the revision to a commit sha and list the files the patterns select, with sizes and hashes."""
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(
            params.repo_id, revision=params.revision, files_metadata=True
        )
    except Exception as err:
        raise _wrap(err, params, endpoint, stage="listing files") from err
    if not info.sha or info.siblings is None:
        raise DownloadError(f"{endpoint} returned no commit sha / file list for {params.repo_id!r}@{params.revision!r}")
    files = [
        _RemoteFile(
            path=s.rfilename,
            size=s.size if s.size is not None else -1,
            sha256=s.lfs.sha256 if s.lfs is not None else None,
            blob_id=s.blob_id if s.lfs is None else None,
        )
        for s in info.siblings
    ]
    # The very filter snapshot_download applies, so both agree on the selection.
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
    if unsized := [f.path for f in wanted if f.size < 0]:
        raise DownloadError(f"{endpoint} did not report sizes for {unsized} of {params.repo_id!r}")
    return info.sha, sorted(wanted, key=lambda f: f.path)


def _remove_stale_partials(local_dir: Path) -> None:
    partials_dir = local_dir / ".cache" / "huggingface" / "download"
    now = time.time()
    for partial in partials_dir.rglob("*.incomplete") if partials_dir.is_dir() else ():
        try:
            if now - partial.stat().st_mtime > STALE_PARTIAL_S:
                logger.info("removing partial file left by an interrupted run: %s", partial)
                partial.unlink()
        except FileNotFoundError:
            pass


def _looks_complete(path: Path, f: _RemoteFile) -> bool:
    # Good enough for the space estimate; content is checked by hash after the fetch.
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


def _fetch(
    params: DownloadParams,
    endpoint: str,
    token: str | None,
    commit: str,
    local_dir: Path,
    wanted: list[_RemoteFile],
    where: str,
) -> None:
    try:
        snapshot_download(
            params.repo_id,
            revision=commit,
            allow_patterns=params.allow_patterns,
            ignore_patterns=params.ignore_patterns,
            local_dir=local_dir,
            endpoint=endpoint,
            token=token,
            max_workers=params.max_workers,
        )
    except Exception as err:
        not_done = [f.path for f in wanted if not _looks_complete(local_dir / f.path, f)]
        raise DownloadError(
            f"{_wrap(err, params, endpoint, stage='downloading')}; not downloaded into {local_dir}: {not_done}"
        ) from err


def _verify(local_dir: Path, wanted: list[_RemoteFile]) -> tuple[list[ManifestFile], list[str]]:
    """Hash every file; return the manifest entries and the paths that don't match what the Hub lists."""
    cache = _HashCache(local_dir / ".cache" / "m3lab" / "hashes.json")
    # hashlib releases the GIL on large buffers, so threads hash several big files in parallel.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        hashes = list(pool.map(lambda f: cache.hash(local_dir / f.path, f.path), wanted))
    cache.save()
    files, bad = [], []
    for f, h in zip(wanted, hashes, strict=True):
        if h is None or h[0] != f.size or (f.sha256 and h[1] != f.sha256) or (f.blob_id and h[2] != f.blob_id):
            bad.append(f.path)
        else:
            files.append(ManifestFile(path=f.path, size=f.size, sha256=h[1]))
    return files, bad


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


class _HashCache:
    """sha256 + git blob id per file, reused while (size, mtime) are unchanged.

    Re-hashing hundreds of GB on every no-op re-run would take minutes; a file rewritten in place changes
    its mtime, so a stale entry is never used.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.entries: dict[str, list] = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            self.entries = {}

    def hash(self, file: Path, key: str) -> tuple[int, str, str] | None:
        try:
            st = file.stat()
        except FileNotFoundError:
            self.entries.pop(key, None)
            return None
        cached = self.entries.get(key)
        if cached is not None and cached[:2] == [st.st_size, st.st_mtime_ns]:
            return st.st_size, cached[2], cached[3]
        sha256, git = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % st.st_size)
        with open(file, "rb") as fh:
            while chunk := fh.read(HASH_CHUNK):
                sha256.update(chunk)
                git.update(chunk)
        self.entries[key] = [st.st_size, st.st_mtime_ns, sha256.hexdigest(), git.hexdigest()]
        return st.st_size, sha256.hexdigest(), git.hexdigest()

    def save(self) -> None:
        try:
            _write_json_atomic(self.path, self.entries)
        except OSError as err:  # only a speed-up: never fail the stage over it
            logger.warning("could not save hash cache %s: %s", self.path, err)


def _wrap(err: Exception, params: DownloadParams, endpoint: str, stage: str) -> DownloadError:
    """Turn a huggingface_hub / network error into one DownloadError naming what and where."""
    repo, rev = params.repo_id, params.revision
    url = _url_of(err)
    token_from = f"${params.token_env}" if params.token_env else "huggingface_hub's default lookup"
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
        # snapshot_download reports an unreachable endpoint as LocalEntryNotFoundError (nothing cached).
        return DownloadError(f"cannot reach {endpoint} while {stage} {repo!r}@{rev!r}: {type(err).__name__}")
    if isinstance(err, OSError):
        return DownloadError(f"I/O error while {stage} {repo!r}@{rev!r} into {params.local_dir}: {err}")
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
    LocalHub on 127.0.0.1 for the duration of the download: the real client does a real HTTP download."""

    model, cfg = ctx.params["model"], ctx.params["download"]
    # `use: published` fetches the card's own quantized checkpoint instead of the base model.
    published = model.get("use") == "published" and model.get("published")
    repo_id = model["published"] if published else model["repo_id"]
    revision = (model.get("published_revision") or "main") if published else model["revision"]
    local_dir = cfg["local_dir"] or str(ctx.cache_dir / "models" / repo_id / revision)

    def fetch(endpoint: str | None) -> DownloadResult:
        return download(DownloadParams(
            repo_id=repo_id, revision=revision, local_dir=local_dir, result_dir=str(ctx.stage_dir),
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
        "local_dir": str(res.local_dir),
        "model_dir": str(res.local_dir),
        "manifest": str(res.manifest_path),
        "files": [asdict(f) for f in res.files],
        "total_bytes": res.total_bytes,
        "total_gib": round(res.total_bytes / 2**30, 3),
        "published": bool(published),
        "fetched_files": list(res.fetched_files),
        "seconds": round(res.seconds, 3),
    }
