"""The quantize stage's content-addressed output folder: made once per (download, settings, code), reused while
it still hashes to what was recorded, and re-made when it does not."""

from __future__ import annotations

import json
from pathlib import Path

from m3lab import quantize as stage
from m3lab.stage import StageContext
from m3lab.tinymodel import build_tiny_checkpoint


def _ctx(tmp_path: Path, src: Path, name: str) -> StageContext:
    run = tmp_path / name
    (run / "download").mkdir(parents=True)
    (run / "download" / "result.json").write_text(json.dumps({"commit": "c" * 40, "model_dir": str(src)}))
    ctx = StageContext(stage="quantize", profile=name, run_dir=run,
                       params={"quantize": {"recipe": "none", "ignore": None, "verify": False, "tool": None,
                                            "quark": None, "autoround": None, "mlx": None}},
                       cache_dir=tmp_path / "cache")
    ctx.stage_dir.mkdir(parents=True, exist_ok=True)
    return ctx


def test_the_same_inputs_reuse_the_folder_and_a_changed_one_is_made_again(tmp_path):
    src = build_tiny_checkpoint(tmp_path / "src", weights="random")
    first = stage.run_stage(_ctx(tmp_path, src, "a"))
    assert first["cache"] == "made"
    out = Path(first["model_dir"])
    report = (out / "quant_report.json").read_bytes()

    second = stage.run_stage(_ctx(tmp_path, src, "b"))  # another profile, same download and settings
    assert second["cache"].startswith("reused") and second["model_dir"] == first["model_dir"]
    assert (out / "quant_report.json").read_bytes() == report  # the first run's artifact is untouched

    (out / "quant_report.json").write_text("{}")  # changed behind m3lab's back
    third = stage.run_stage(_ctx(tmp_path, src, "c"))
    assert third["cache"] == "made" and json.loads((out / "quant_report.json").read_text())["recipe"] == "none"
