"""Quantize stage: the card's recipe applied to the download (or the card's published checkpoint taken as it
is), written into a content-addressed folder under the cache, with a report of what is on disk.

The recipes live in `m3lab.quant` (one module each, registered in `m3lab.registry.RECIPES`).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from m3lab import envs
from m3lab.digest import artifact, verify_artifacts
from m3lab.fingerprint import code_digest
from m3lab.quant.core import QuantizeError, QuantRecipe, quantize
from m3lab.registry import RECIPES
from m3lab.stage import StageContext, read_json, write_json

__all__ = ["run_stage", "MADE_NAME"]

MADE_NAME = ".m3lab-made.json"  # in the output folder: the result that made it, with its files' sha256


def run_stage(ctx: StageContext) -> dict[str, Any]:
    """The same download + recipe + code always lands in the same folder, and a changed one never overwrites
    another's output."""
    cfg = ctx.params["quantize"]
    download = ctx.upstream("download")
    if download.get("published"):
        # The card's own checkpoint is already quantized with this recipe: serve it as downloaded, and let the
        # report say what is actually on disk (formats and bits per weight are read from the files).
        recipe = QuantRecipe.from_params({"recipe": "none", "verify": cfg["verify"]})
    else:
        recipe = QuantRecipe.from_params({k: v for k, v in cfg.items() if k != "tool"})
    code = code_digest(["m3lab.quant.core", RECIPES.get(recipe.recipe).module])
    env_name = RECIPES.get(recipe.recipe).meta.get("env")
    if env_name:  # the recipe's pinned packages decide its output as much as its code
        code = [code, envs.record(env_name)["requirements_sha256"]]
    key = hashlib.sha256(json.dumps([download["commit"], download["model_dir"], cfg, code],
                                    sort_keys=True).encode()).hexdigest()[:16]
    out = ctx.cache_dir / "quantized" / f"{Path(download['model_dir']).name}-{recipe.recipe}-{key}"
    made = out / MADE_NAME
    if made.is_file():
        # Made before from the same download, settings and code (another profile, or a run whose later stage
        # changed): reuse it if it still hashes to what was recorded. Rewriting it would change its report under
        # the runs that used it, and race a concurrent run of another profile that reads it.
        earlier = read_json(made)
        if not verify_artifacts(earlier):
            return {**earlier, "card_recipe": cfg["recipe"], "cache": "reused an intact folder made earlier"}
    isolated = os.environ.get("M3LAB_QUANTIZE_PYTHONPATH")
    environment: dict[str, Any] | None = None
    if env_name:
        # The recipe's own pinned environment (m3lab.envs): checked before anything is written.
        path = envs.pythonpath(env_name, f"quantize.recipe {recipe.recipe!r}")
        environment = envs.record(env_name)
        result = _quantize_isolated(download["model_dir"], out, recipe, path)
    elif isolated and recipe.recipe != "none":
        environment = {"name": "M3LAB_QUANTIZE_PYTHONPATH", "path": isolated}
        result = _quantize_isolated(download["model_dir"], out, recipe, isolated)
    else:
        result = quantize(download["model_dir"], out, recipe).to_dict()
    result = {**result, "card_recipe": cfg["recipe"], "published": bool(download.get("published")),
              "environment": environment, "artifacts": {"model": artifact(out)}}
    write_json(made, result)  # hidden: not part of the folder's own manifest
    return {**result, "cache": "made"}


def _quantize_isolated(src: str, out: Path, recipe: QuantRecipe, pythonpath: str) -> dict[str, Any]:
    """Quantize in a child interpreter whose import path starts with `pythonpath`.

    A serving host's environment can pin libraries the quantizer cannot use: vLLM 0.25.1 pins compressed-tensors
    0.17, llm-compressor 0.14 needs 0.19 (measured on the lent H200). The host's runner sets
    M3LAB_QUANTIZE_PYTHONPATH to a folder holding the quantizer's own versions; only this stage sees them."""
    code = ("import json, sys; from m3lab.quant.core import QuantRecipe, quantize; "
            "r = quantize(sys.argv[1], sys.argv[2], QuantRecipe(**json.loads(sys.argv[3]))); "
            "print('M3LAB_RESULT ' + json.dumps(r.to_dict()))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (pythonpath, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-c", code, src, str(out), json.dumps(asdict(recipe))], env=env,
                          capture_output=True, text=True)
    lines = [x for x in done.stdout.splitlines() if x.startswith("M3LAB_RESULT ")]
    if done.returncode != 0 or not lines:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise QuantizeError(f"quantize (isolated, PYTHONPATH={pythonpath} first) exited {done.returncode}:\n{tail}")
    return json.loads(lines[-1].removeprefix("M3LAB_RESULT "))
