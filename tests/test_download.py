"""Download stage, end to end: the real huggingface_hub client against m3lab's LocalHub on 127.0.0.1.

No mocks: every test publishes a small model folder (config, safetensors weights, tokenizer, and a 12 MiB
blob that takes the Hub's large-file / LFS path) and downloads it with `m3lab.download.download`.
The hub's request log stands in for a packet capture: it says which files were fetched and how.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import shutil
import time
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from m3lab.download import MANIFEST_NAME, DownloadError, DownloadParams, download
from m3lab.hub import LocalHub

REPO = "m3lab/tiny-test"
BIG = "big.bin"  # > 10 MiB: served like an LFS file (redirect to the "CDN", X-Linked-Etag/Size)
BIG_SIZE = 12 * 1024 * 1024
FAKE_TOKEN = "hf_m3labFakeTokenNeverToBeSeen0123456789"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
    before = len(hub.file_gets())

    result = download(params)

    refetched = hub.file_gets()[before:]
    assert len(refetched) == 1 and refetched[0].path.startswith("/_cdn/")
    assert result.fetched_files == (BIG,)
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
