"""`m3lab verify`: re-hash the cached checkpoints a run used; a flipped byte (mtime kept) or a deleted file is
caught and named, an intact cache passes."""

from __future__ import annotations

import json
import os

from m3lab.cli import main
from m3lab.digest import artifact


def make_run(tmp_path):
    model = tmp_path / "cache" / "model"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (model / "config.json").write_text("{}")
    run = tmp_path / "results" / "p" / "20260101-000000-aaaa"
    (run / "quantize").mkdir(parents=True)
    (run / "params.json").write_text("{}")
    (run / "quantize" / "result.json").write_text(json.dumps({"artifacts": {"model": artifact(model)}}))
    return run, model


def test_an_intact_cache_passes(tmp_path, capsys):
    run, _ = make_run(tmp_path)
    assert main(["verify", str(tmp_path / "results")]) == 0
    assert "ok (2 files re-hashed)" in capsys.readouterr().out


def test_a_flipped_byte_with_its_mtime_kept_is_caught(tmp_path, capsys):
    run, model = make_run(tmp_path)
    f = model / "model.safetensors"
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[1000] ^= 0x01
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only the content says it changed
    assert main(["verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert "CHANGED" in out and f"{f} changed (sha256 differs" in out


def test_a_deleted_file_is_caught(tmp_path, capsys):
    run, model = make_run(tmp_path)
    (model / "config.json").unlink()
    assert main(["verify", str(run.parent)]) == 1
    assert f"{model / 'config.json'} is missing" in capsys.readouterr().out


def test_a_folder_without_runs_says_so(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert "no run folders" in capsys.readouterr().out
