"""Download stage, end to end: the real huggingface_hub client against m3lab's LocalHub on 127.0.0.1.

No mocks: every test publishes a small model folder (config, safetensors weights, tokenizer, and a 12 MiB
blob that takes the Hub's large-file / LFS path) and downloads it with `m3lab.download.download`.
The hub's request log stands in for a packet capture: it says which files were fetched and how, and
`hub.bytes_sent(path)` what they cost.

Every detector has a test where it must fire and one where it must not: corrupt files on disk (a flipped
byte with the mtime kept), a server whose bytes do not match its own listing, partial files (resumed,
another commit's, corrupt, oversized, stale), and the commit-keyed download folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import time
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import m3lab.hub
from m3lab.download import (
    MANIFEST_NAME,
    PARTIAL_DIR,
    STALE_PARTIAL_S,
    DownloadError,
    DownloadParams,
    download,
    resolve_commit,
    run_stage,
)
from m3lab.hub import LocalHub
from m3lab.stage import StageContext

REPO = "m3lab/tiny-test"
BIG = "big.bin"  # > 10 MiB: served like an LFS file (redirect to the "CDN", X-Linked-Etag/Size)
BIG_SIZE = 12 * 1024 * 1024
FAKE_TOKEN = "hf_m3labFakeTokenNeverToBeSeen0123456789"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flip_byte_keep_mtime(path: Path, offset: int) -> None:
    """Corrupt one byte in place, then put the timestamps back: size and mtime say the file is unchanged."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def partials(local_dir: str | Path) -> list[Path]:
    """m3lab's partial files (bytes of files not yet complete) in a download folder."""
    folder = Path(local_dir) / PARTIAL_DIR
    return sorted(folder.glob("*.part")) if folder.is_dir() else []


def fetched(hub: LocalHub, name: str) -> list:
    """GETs of that file's bytes (from /resolve or the CDN) seen by the hub."""
    cdn_name = hub._repos[REPO].files[name].sha256  # large files are fetched by content hash
    return [r for r in hub.file_gets() if r.path.endswith("/" + name) or r.path.endswith("/" + cdn_name)]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "source"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 8}))
    save_file(
        {"w": torch.arange(64, dtype=torch.float32).reshape(8, 8), "b": torch.zeros(8)}, src / "model.safetensors"
    )
    (src / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"vocab": {"a": 0, "b": 1}}}))
    (src / "sub" / "notes.txt").write_text("nested path\n")
    (src / BIG).write_bytes(random.Random(0).randbytes(BIG_SIZE))
    return src


@pytest.fixture
def hub(source: Path):
    with LocalHub({REPO: source}) as h:
        yield h


@pytest.fixture
def make_params(tmp_path: Path, hub: LocalHub):
    def make(**overrides) -> DownloadParams:
        base = DownloadParams(
            repo_id=REPO,
            revision=hub.commit(REPO),
            local_dir=str(tmp_path / "model"),
            result_dir=str(tmp_path / "result"),
            endpoint=hub.endpoint,
            token_env=None,
            min_free_gb=0.0,
        )
        return dataclasses.replace(base, **overrides)

    return make


# -----------------------------------------------------------------------------
# happy paths


def test_downloads_every_file_and_manifest_hashes_match_source(source, hub, make_params):
    result = download(make_params())

    expected = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    manifest = json.loads(result.manifest_path.read_text())
    assert [f["path"] for f in manifest["files"]] == expected
    for f in manifest["files"]:
        assert f["sha256"] == sha256(source / f["path"]) == sha256(result.local_dir / f["path"])
        assert f["size"] == (source / f["path"]).stat().st_size
    assert manifest["total_bytes"] == result.total_bytes == sum(f["size"] for f in manifest["files"])
    assert manifest["repo_id"] == REPO and manifest["commit_sha"] == hub.commit(REPO)
    assert result.fetched_files == tuple(expected)
    # The large file went through the LFS path: redirect to the CDN host, which got no credentials.
    (big_get,) = fetched(hub, BIG)
    assert big_get.path.startswith("/_cdn/")


def test_pinned_commit_sha_is_deterministic_and_resolves(source, hub, make_params):
    with LocalHub({REPO: source}) as same_folder_again:
        assert same_folder_again.commit(REPO) == hub.commit(REPO)  # content-derived: safe to pin
    sha = hub.commit(REPO)
    assert len(sha) == 40 and int(sha, 16) >= 0

    result = download(make_params(revision=sha))
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["revision"] == manifest["commit_sha"] == result.commit_sha == sha


def test_branch_revision_is_recorded_with_its_resolved_sha(hub, make_params):
    result = download(make_params(revision="main"))
    manifest = json.loads(result.manifest_path.read_text())
    assert (manifest["revision"], manifest["commit_sha"]) == ("main", hub.commit(REPO))


def test_allow_and_ignore_patterns_select_files(hub, make_params):
    result = download(make_params(allow_patterns=["*.json", "*.safetensors"], ignore_patterns=["tokenizer*"]))

    assert [f.path for f in result.files] == ["config.json", "model.safetensors"]
    on_disk = sorted(p.name for p in result.local_dir.iterdir() if p.is_file())
    assert on_disk == ["config.json", "model.safetensors"]
    assert fetched(hub, BIG) == []


def test_endpoint_from_env_is_read_at_call_time(hub, make_params, monkeypatch):
    # huggingface_hub froze HF_ENDPOINT when it was imported; download() must still honour the env now.
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    result = download(make_params(endpoint=None, allow_patterns=["config.json"]))
    assert result.endpoint == hub.endpoint and [f.path for f in result.files] == ["config.json"]


# -----------------------------------------------------------------------------
# re-runs and resume


def test_second_run_fetches_nothing(hub, make_params):
    params = make_params()
    download(params)
    before = len(hub.requests)

    t0 = time.perf_counter()
    result = download(params)
    elapsed = time.perf_counter() - t0

    again = hub.requests[before:]
    assert [r.method for r in again] == ["GET"] and "/api/models/" in again[0].path  # only the preflight listing
    assert result.fetched_files == ()
    assert elapsed < 2.0, f"no-op re-run took {elapsed:.2f}s"
    # Nothing fetched, yet every hash in the manifest was computed from the file in this run.
    for f in json.loads(result.manifest_path.read_text())["files"]:
        assert f["sha256"] == sha256(result.local_dir / f["path"])


def test_dropped_connection_resumes_with_range_request(source, hub, make_params):
    # The client reads in 10 MiB chunks and resumes from the last chunk it wrote, so drop past 10 MiB.
    hub.drop_connection_once(BIG, after_bytes=11_000_000)

    result = download(make_params())

    first, second = fetched(hub, BIG)
    assert first.range is None and second.range == f"bytes={10 * 1024 * 1024}-"
    assert sha256(result.local_dir / BIG) == sha256(source / BIG)


def test_rerun_after_failed_run_fetches_only_missing_files(source, hub, make_params, tmp_path):
    params = make_params()
    shutil.move(source / BIG, tmp_path / "away.bin")  # the server loses the big file mid-way
    with pytest.raises(DownloadError):
        download(params)
    assert not Path(params.result_dir, MANIFEST_NAME).exists()
    shutil.move(tmp_path / "away.bin", source / BIG)  # ...and has it back
    # The client fetches files in parallel: which small files finished before the failure stopped the others
    # depends on timing. Those that did must not be fetched again.
    complete = {p.relative_to(params.local_dir).as_posix() for p in Path(params.local_dir).rglob("*")
                if p.is_file() and ".cache" not in p.parts}
    before = len(hub.file_gets())

    result = download(params)

    refetched = hub.file_gets()[before:]
    assert sum(r.path.startswith("/_cdn/") for r in refetched) == 1  # the big file, once
    again = [r.path.rsplit("/", 1)[-1] for r in refetched if not r.path.startswith("/_cdn/")]
    assert not set(again) & complete, f"refetched files that were already complete: {set(again) & complete}"
    assert BIG in result.fetched_files and not set(result.fetched_files) & complete
    assert sha256(result.local_dir / BIG) == sha256(source / BIG)


def test_truncated_local_file_is_detected_and_refetched(source, hub, make_params):
    params = make_params()
    download(params)
    local_big = Path(params.local_dir) / BIG
    with open(local_big, "r+b") as f:  # a partially written file where a complete one should be
        f.truncate(BIG_SIZE // 3)
    before = len(hub.file_gets())

    result = download(params)

    assert len(hub.file_gets()[before:]) == 1
    assert sha256(local_big) == sha256(source / BIG)
    assert {f.path: f.sha256 for f in result.files}[BIG] == sha256(source / BIG)


# -----------------------------------------------------------------------------
# corrupt files: hashes are recomputed for every verdict, never taken from size + mtime


@pytest.mark.parametrize("name", ["model.safetensors", BIG])  # checked by git blob id / by LFS sha256
def test_flipped_byte_with_mtime_kept_is_caught_and_refetched(source, hub, make_params, name):
    params = make_params()
    download(params)
    local = Path(params.local_dir) / name
    flip_byte_keep_mtime(local, offset=local.stat().st_size // 2)
    before = len(fetched(hub, name))

    result = download(params)

    assert len(fetched(hub, name)) == before + 1  # that file, once
    assert result.fetched_files == (name,)
    assert sha256(local) == sha256(source / name)
    manifest = {f["path"]: f["sha256"] for f in json.loads(result.manifest_path.read_text())["files"]}
    assert manifest[name] == sha256(local)  # the file's real hash, not a remembered one


@pytest.mark.parametrize("name", ["model.safetensors", BIG])
def test_server_bytes_that_never_match_fail_naming_file_and_both_hashes(source, hub, make_params, name):
    listed = hub._repos[REPO].files[name]
    flip_byte_keep_mtime(source / name, offset=7)  # the hub now serves bytes its own listing does not vouch for
    actual = sha256(source / name)
    params = make_params()

    with pytest.raises(DownloadError) as exc:
        download(params)

    message = str(exc.value)
    expected = listed.sha256 if listed.lfs else listed.oid
    assert name in message and expected in message and REPO in message
    if listed.lfs:
        assert actual in message
    else:
        assert "git blob id" in message
    assert len(fetched(hub, name)) == 2  # fetched once more from byte 0, then given up
    assert fetched(hub, name)[1].range is None
    assert not (Path(params.local_dir) / name).exists()  # nothing later may pick up the wrong bytes
    assert not Path(params.result_dir, MANIFEST_NAME).exists()


def test_listing_without_hashes_is_refused(hub, make_params, monkeypatch):
    def sibling_without_hashes(self, with_blobs):
        return {"rfilename": self.path, "size": self.size}  # sizes, but no blobId / lfs.sha256

    monkeypatch.setattr(m3lab.hub._File, "sibling", sibling_without_hashes)
    with pytest.raises(DownloadError, match="did not report hashes.*cannot be verified"):
        download(make_params())
    assert hub.file_gets() == []


@pytest.mark.parametrize("evil", ["../escaped.json", "/tmp/m3lab-escaped.json", "sub/../../escaped.json"])
def test_listed_paths_outside_the_folder_are_refused(hub, make_params, monkeypatch, tmp_path, evil):
    real = m3lab.hub._File.sibling

    def sibling(self, with_blobs):
        entry = real(self, with_blobs)
        return entry | {"rfilename": evil} if self.path == "config.json" else entry

    monkeypatch.setattr(m3lab.hub._File, "sibling", sibling)
    with pytest.raises(DownloadError, match="unsafe file paths"):
        download(make_params())
    assert hub.file_gets() == [] and not (tmp_path / "escaped.json").exists()


# -----------------------------------------------------------------------------
# resume across runs: the partial file is named by (repo, commit, file), the same in every run

CUT = 11_000_000  # the client writes 10 MiB chunks: an interruption past 10 MiB leaves 10 MiB on disk
CHUNK = 10 * 1024 * 1024


def interrupted_run(hub: LocalHub, params: DownloadParams) -> Path:
    """A run whose big-file transfer is cut mid-way (and the server then refuses it): returns its partial."""
    hub.interrupt(BIG, after_bytes=CUT)
    with pytest.raises(DownloadError) as exc:
        download(params)
    assert BIG in str(exc.value) and "503" in str(exc.value)
    assert not Path(params.result_dir, MANIFEST_NAME).exists()
    (partial,) = partials(params.local_dir)
    assert partial.stat().st_size == CHUNK
    return partial


def test_interrupted_download_is_continued_by_the_next_run_with_range(source, hub, make_params):
    params = make_params()
    partial = interrupted_run(hub, params)
    sent_before = hub.bytes_sent(BIG)

    # The next run: another process, another server port -- the same repo, commit and file.
    with LocalHub({REPO: source}) as next_hub:
        result = download(dataclasses.replace(params, endpoint=next_hub.endpoint))
        (get,) = fetched(next_hub, BIG)
        resent = next_hub.bytes_sent(BIG)

    assert get.range == f"bytes={CHUNK}-"
    assert resent == BIG_SIZE - CHUNK  # before: the whole BIG_SIZE again
    assert sent_before == CUT
    assert sha256(result.local_dir / BIG) == sha256(source / BIG)
    assert {f.path: f.sha256 for f in result.files}[BIG] == sha256(source / BIG)
    assert not partial.exists() and partials(params.local_dir) == []


def test_partial_of_another_commit_is_not_continued(source, hub, make_params, tmp_path):
    params = make_params()
    old_partial = interrupted_run(hub, params)
    (source / BIG).write_bytes(random.Random(1).randbytes(BIG_SIZE))  # new weights, new commit

    with LocalHub({REPO: source}) as new_hub:
        assert new_hub.commit(REPO) != hub.commit(REPO)
        result = download(dataclasses.replace(params, endpoint=new_hub.endpoint, revision=new_hub.commit(REPO)))
        (get,) = fetched(new_hub, BIG)

    assert get.range is None  # the other commit's bytes are not a prefix of this file
    assert sha256(result.local_dir / BIG) == sha256(source / BIG)
    assert old_partial.exists()  # young: another run may still be continuing it


def test_corrupt_partial_is_caught_and_fetched_again_from_byte_0(source, hub, make_params):
    params = make_params()
    partial = interrupted_run(hub, params)
    flip_byte_keep_mtime(partial, offset=1234)
    hub.restore(BIG)
    before = len(fetched(hub, BIG))

    result = download(params)

    resumed, from_scratch = fetched(hub, BIG)[before:]
    assert resumed.range == f"bytes={CHUNK}-" and from_scratch.range is None
    assert sha256(result.local_dir / BIG) == sha256(source / BIG)
    assert {f.path: f.sha256 for f in result.files}[BIG] == sha256(source / BIG)


def test_partial_longer_than_the_file_is_started_over(source, hub, make_params):
    params = make_params()
    partial = interrupted_run(hub, params)
    partial.write_bytes(b"x" * (BIG_SIZE + 1))  # cannot be a prefix of the file
    hub.restore(BIG)
    before = len(fetched(hub, BIG))

    result = download(params)

    (get,) = fetched(hub, BIG)[before:]
    assert get.range is None
    assert sha256(result.local_dir / BIG) == sha256(source / BIG)


def test_stale_partials_of_other_downloads_are_removed_and_this_ones_kept(source, hub, make_params):
    params = make_params()
    own = interrupted_run(hub, params)
    hub.restore(BIG)
    local_dir = Path(params.local_dir)
    old = time.time() - STALE_PARTIAL_S - 60
    foreign_old = local_dir / PARTIAL_DIR / "other.0123456789abcdef.part"
    foreign_young = local_dir / PARTIAL_DIR / "other.fedcba9876543210.part"
    client_old = local_dir / ".cache" / "huggingface" / "download" / "abc.etag.1234abcd.incomplete"
    for path in (foreign_old, foreign_young, client_old):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"left over")
    for path in (foreign_old, client_old, own):
        os.utime(path, (old, old))  # `own` is old too: its age must not matter

    result = download(params)

    assert not foreign_old.exists() and not client_old.exists()
    assert foreign_young.exists()
    (get,) = fetched(hub, BIG)[-1:]
    assert get.range == f"bytes={CHUNK}-"  # this download's own partial was continued, however old
    assert sha256(result.local_dir / BIG) == sha256(source / BIG)


# -----------------------------------------------------------------------------
# the download folder is named by the resolved commit, not the branch


def stage_context(tmp_path: Path, endpoint: str, run: str) -> StageContext:
    params = {
        "model": {"source": "hub", "repo_id": REPO, "revision": "main", "use": "reproduce", "published": None,
                  "published_revision": None},
        "download": {"allow_patterns": None, "ignore_patterns": None, "endpoint": endpoint,
                     "token_env": "M3LAB_TEST_TOKEN_UNSET", "local_dir": None, "min_free_gb": 0.0},
    }
    return StageContext(stage="download", profile="t", run_dir=tmp_path / run, params=params,
                        cache_dir=tmp_path / "cache")


def test_other_weights_under_the_same_branch_get_their_own_folder(source, tmp_path):
    other = tmp_path / "other-weights"
    shutil.copytree(source, other)
    (other / BIG).write_bytes(random.Random(2).randbytes(BIG_SIZE))
    with LocalHub({REPO: source}) as hub_a, LocalHub({REPO: other}) as hub_b:
        a = run_stage(stage_context(tmp_path, hub_a.endpoint, "run-a"))
        b = run_stage(stage_context(tmp_path, hub_b.endpoint, "run-b"))
        commits = hub_a.commit(REPO), hub_b.commit(REPO)

    assert (a["revision"], b["revision"]) == ("main", "main")
    assert (a["commit"], b["commit"]) == commits and commits[0] != commits[1]
    assert a["model_dir"] != b["model_dir"]
    assert Path(a["model_dir"]) == tmp_path / "cache" / "models" / REPO / commits[0]
    assert Path(b["model_dir"]) == tmp_path / "cache" / "models" / REPO / commits[1]
    # The second profile did not overwrite the first one's weights.
    assert sha256(Path(a["model_dir"]) / BIG) == sha256(source / BIG)
    assert sha256(Path(b["model_dir"]) / BIG) == sha256(other / BIG)


def test_same_weights_under_the_same_branch_reuse_their_folder(source, tmp_path):
    with LocalHub({REPO: source}) as hub:
        first = run_stage(stage_context(tmp_path, hub.endpoint, "run-1"))
    with LocalHub({REPO: source}) as hub:  # a later run: new server, same content, same commit
        second = run_stage(stage_context(tmp_path, hub.endpoint, "run-2"))
        assert hub.file_gets() == []

    assert second["model_dir"] == first["model_dir"] and second["commit"] == first["commit"]
    assert second["fetched_files"] == [] and len(first["fetched_files"]) == len(first["files"])


def test_resolve_commit_asks_the_hub(hub):
    assert resolve_commit(REPO, "main", endpoint=hub.endpoint, token_env=None) == hub.commit(REPO)
    with pytest.raises(DownloadError) as exc:
        resolve_commit(REPO, "no-such-branch", endpoint=hub.endpoint, token_env=None)
    assert REPO in str(exc.value) and "no-such-branch" in str(exc.value)


def test_given_commit_is_fetched_and_the_asked_revision_recorded(hub, make_params):
    result = download(make_params(revision="main", commit=hub.commit(REPO)))
    manifest = json.loads(result.manifest_path.read_text())
    assert (manifest["revision"], manifest["commit_sha"]) == ("main", hub.commit(REPO))
    assert all(f"/revision/{hub.commit(REPO)}" in r.path for r in hub.requests if r.path.startswith("/api/models/"))
    with pytest.raises(ValueError, match="40-hex"):
        make_params(commit="main")


# -----------------------------------------------------------------------------
# errors


def test_wrong_revision_names_repo_and_revision(hub, make_params):
    params = make_params(revision="no-such-branch")
    with pytest.raises(DownloadError) as exc:
        download(params)
    assert REPO in str(exc.value) and "no-such-branch" in str(exc.value)
    assert not Path(params.local_dir).exists()  # failed before writing anything


def test_unknown_repo_names_repo_and_endpoint(hub, make_params):
    with pytest.raises(DownloadError) as exc:
        download(make_params(repo_id="m3lab/does-not-exist"))
    assert "m3lab/does-not-exist" in str(exc.value) and hub.endpoint in str(exc.value)


def test_patterns_matching_nothing_name_the_patterns(hub, make_params):
    with pytest.raises(DownloadError) as exc:
        download(make_params(allow_patterns=["*.gguf"]))
    assert "*.gguf" in str(exc.value) and REPO in str(exc.value)


def test_file_removed_from_server_after_listing_fails_clearly_without_manifest(source, hub, make_params):
    params = make_params()
    stale = Path(params.result_dir, MANIFEST_NAME)
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")  # left by an earlier run: must not survive a failed one
    (source / "tokenizer.json").unlink()  # listed by the hub, gone when the client asks for it

    with pytest.raises(DownloadError) as exc:
        download(params)

    message = str(exc.value)
    assert "tokenizer.json" in message and "missing on the server" in message and REPO in message
    assert not stale.exists()
    assert not (Path(params.local_dir) / "tokenizer.json").exists()


def test_disk_preflight_fails_before_any_byte_is_written(hub, make_params):
    # Simulated with an absurd margin (1e12 GB must stay free) -- the real free-space check, no injection.
    params = make_params(min_free_gb=1e12)
    with pytest.raises(DownloadError) as exc:
        download(params)
    message = str(exc.value)
    assert "not enough disk space" in message and params.local_dir in message
    assert "need" in message and "bytes free" in message
    assert hub.file_gets() == [] and not Path(params.local_dir).exists()


def test_private_repo_without_token_is_reported_as_not_found(source, tmp_path):
    with LocalHub({REPO: source}, token=FAKE_TOKEN) as private:
        params = DownloadParams(
            repo_id=REPO,
            revision=private.commit(REPO),
            local_dir=str(tmp_path / "m"),
            result_dir=str(tmp_path / "r"),
            endpoint=private.endpoint,
            token_env="M3LAB_TEST_TOKEN_UNSET",
        )
        with pytest.raises(DownloadError, match="not found.*M3LAB_TEST_TOKEN_UNSET"):
            download(params)


# -----------------------------------------------------------------------------
# the token


def test_token_never_appears_in_manifest_result_logs_or_errors(source, tmp_path, monkeypatch, caplog, capfd):
    monkeypatch.setenv("M3LAB_TEST_TOKEN", FAKE_TOKEN)
    caplog.set_level(logging.DEBUG)  # every logger, the hub's request log and huggingface_hub's included
    with LocalHub({REPO: source}, token=FAKE_TOKEN) as private:
        params = DownloadParams(
            repo_id=REPO,
            revision=private.commit(REPO),
            local_dir=str(tmp_path / "m"),
            result_dir=str(tmp_path / "r"),
            endpoint=private.endpoint,
            token_env="M3LAB_TEST_TOKEN",
        )
        result = download(params)  # works => the token was sent
        manifest_text = result.manifest_path.read_text()
        with pytest.raises(DownloadError) as exc:
            download(dataclasses.replace(params, revision="nope"))
        api_calls = [r for r in private.requests if not r.path.startswith("/_cdn/")]
        cdn_calls = [r for r in private.requests if r.path.startswith("/_cdn/")]

    assert api_calls and all(r.authorized for r in api_calls)
    assert cdn_calls and not any(r.authorized for r in cdn_calls)  # the client keeps it off the CDN
    out, err = capfd.readouterr()
    seen = [
        manifest_text,
        repr(result),
        repr(params),
        "".join(traceback.format_exception(exc.value)),  # the whole chain, client errors included
        caplog.text,
        out,
        err,
    ]
    assert caplog.text  # the check below is only meaningful if something was logged
    assert not any(FAKE_TOKEN in text for text in seen)


def test_params_refuse_a_token_in_token_env_without_echoing_it():
    with pytest.raises(ValueError) as exc:
        DownloadParams(REPO, "main", "m", "r", token_env=FAKE_TOKEN)
    assert FAKE_TOKEN not in str(exc.value)
