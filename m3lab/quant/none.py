"""Pass-through: serve the download as it is (also how a card's published checkpoint is served)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from m3lab.quant.core import REPORT_NAME, QuantRecipe


def quantize(src: Path, tmp: Path, recipe: QuantRecipe) -> tuple[dict[str, float], list[str], list[str]]:
    """A folder of symlinks, not a symlink to the folder: the report and any later sibling files (the serve
    stage's `<model_dir>.text-*`) then never write into the download, and loaders already follow per-file
    symlinks (the Hugging Face cache itself is made of them)."""
    t = time.perf_counter()
    for entry in sorted(src.iterdir()):
        if entry.name == REPORT_NAME or (entry.name.startswith(".") and entry.is_dir()):  # e.g. hub's .cache/
            continue
        os.symlink(os.path.realpath(entry), tmp / entry.name)
    notes = [f"pass-through: every file is a symlink into {src} (no copy), so the download is served as is"]
    return {"link": round(time.perf_counter() - t, 3)}, [], notes


def plan_lines(section: Any) -> list[str]:
    return ["none: the download is served as is"]
