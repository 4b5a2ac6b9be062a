"""Every MoE layer's shared expert loads as zeros: card 002's silent failure (vLLM's official loader skipped
`n_shared_experts`, and the shared weights loaded as zero)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from m3lab.checkpoint import read_tensors, write_tensors

_SHARED = re.compile(r"\.shared_experts\.[a-z_]+\.weight$")  # the weights, not their FP8 scales


def apply(model_dir: Path) -> int:
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
