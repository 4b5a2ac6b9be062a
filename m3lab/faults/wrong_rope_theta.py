"""RoPE base 10,000 instead of M3's 5,000,000: a loader that ignores `rope_parameters` and falls back to the
Llama default."""

from __future__ import annotations

import json
from pathlib import Path


def apply(model_dir: Path) -> int:
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    changed = 0
    for scope in (cfg, cfg.get("text_config") or {}):
        if "rope_theta" in scope:
            scope["rope_theta"] = 10_000.0
            changed += 1
        if isinstance(scope.get("rope_parameters"), dict):
            scope["rope_parameters"]["rope_theta"] = 10_000.0
            changed += 1
    if changed == 0:
        raise ValueError(f"wrong_rope_theta: {path} has no rope_theta to change")
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return changed
