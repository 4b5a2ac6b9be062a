"""Planted faults: break the *served* copy of a checkpoint the way a naive loader would, so a test can prove that
the correctness and parity stages tell a broken server from a good one.

    zero_shared_experts   every MoE layer's shared expert loads as zeros — card 002's silent failure (vLLM's
                          official loader skipped `n_shared_experts` and the shared weights loaded as zero)
    wrong_rope_theta      RoPE base 10,000 instead of M3's 5,000,000 — a loader that ignores
                          `rope_parameters` and falls back to the Llama default

The checkpoint on disk (the quantize stage's output) stays intact; parity compares the server against it.
Params: `serve.fault` (default `none`). Never set it in a real profile: it exists for fault-injection tests.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from m3lab.checkpoint import read_tensors, write_tensors

__all__ = ["FAULTS", "apply_fault"]

FAULTS = ("none", "zero_shared_experts", "wrong_rope_theta")
_SHARED = re.compile(r"\.shared_experts\.[a-z_]+\.weight$")  # the weights, not their FP8 scales


def _zero_shared_experts(model_dir: Path) -> int:
    zeroed = 0
    for shard in sorted(model_dir.glob("*.safetensors")):
        tensors = dict(read_tensors(shard))
        hits = [k for k in tensors if _SHARED.search(k)]
        for k in hits:
            tensors[k] = torch.zeros_like(tensors[k])
        if hits:
            write_tensors(tensors, shard)
            zeroed += len(hits)
    if zeroed == 0:
        raise ValueError(f"zero_shared_experts: no shared-expert weights in {model_dir}")
    return zeroed


def _wrong_rope_theta(model_dir: Path) -> int:
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


def apply_fault(model_dir: str | Path, fault: str) -> int:
    """Break `model_dir` in place; returns how many tensors/fields were changed."""
    if fault not in FAULTS:
        raise ValueError(f"serve.fault: unknown fault {fault!r}; faults: {', '.join(FAULTS)}")
    if fault == "none":
        return 0
    return {"zero_shared_experts": _zero_shared_experts, "wrong_rope_theta": _wrong_rope_theta}[fault](
        Path(model_dir))
