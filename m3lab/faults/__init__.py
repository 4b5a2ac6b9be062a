"""Planted faults: break the *served* copy of a checkpoint the way a naive loader would, so a test can prove that
the correctness, parity and needle checks tell a broken server from a good one.

One module per fault (registered in `m3lab.registry.FAULTS`), each with `apply(model_dir) -> int` (how many
tensors or fields it changed). The checkpoint on disk (the quantize stage's output) stays intact; parity compares
the server against it. Params: `serve.fault` (default `none`). Never set it in a real profile.
"""

from __future__ import annotations

from pathlib import Path

from m3lab.registry import FAULTS

__all__ = ["apply_fault"]


def apply_fault(model_dir: str | Path, fault: str) -> int:
    """Break `model_dir` in place; returns how many tensors/fields were changed."""
    return FAULTS.load(fault).apply(Path(model_dir))
