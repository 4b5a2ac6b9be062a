"""One routed expert of the first MoE layer holds NaN, like a buffer read out of bounds or never written: every
token routed there turns NaN, and attention carries the NaN to every later position. What vLLM 0.25.1's M3
sparse path showed on the H200 (tools/f2/): NaN logits from some position to the end of the prompt, token id 0
under greedy, HTTP 400 for logprobs. The numerics checks (m3lab.numerics) must turn red on it."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from m3lab.checkpoint import read_tensors, write_tensors

# A fused experts tensor [experts, out, in] (transformers' text layout) or one expert's own weight (hub layout).
_FUSED = re.compile(r"layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|w1)(?:\.weight)?$")
_SINGLE = re.compile(r"layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.0\.(gate_proj|w1)\.weight$")


def apply(model_dir: Path) -> int:
    shards = sorted(model_dir.glob("*.safetensors"))
    found: list[tuple[int, Path, str, bool]] = []
    for shard in shards:
        for k, _ in read_tensors(shard):
            for pattern, fused in ((_FUSED, True), (_SINGLE, False)):
                if m := pattern.search(k):
                    found.append((int(m[1]), shard, k, fused))
    if not found:
        raise ValueError(f"nan_routed_expert: no routed-expert weights in {model_dir}")
    layer = min(f[0] for f in found)
    changed = 0
    for shard in shards:
        hits = [(k, fused) for lay, s, k, fused in found if s == shard and lay == layer]
        if not hits:
            continue
        tensors = dict(read_tensors(shard))
        for k, fused in hits:
            dtype = tensors[k].dtype  # FP8 has a NaN too; set it through float32, where every op exists
            t = tensors[k].to(torch.float32)
            if fused and t.dim() == 3:
                t[0] = float("nan")  # expert 0 of the fused [experts, …] tensor
            else:
                t.fill_(float("nan"))
            tensors[k] = t.to(dtype)
            changed += 1
        write_tensors(tensors, shard)
    return changed
