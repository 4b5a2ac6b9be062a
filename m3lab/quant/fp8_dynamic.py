"""FP8-dynamic with llm-compressor (card 000): `oneshot` + QuantizationModifier(targets="Linear",
scheme="FP8_DYNAMIC"), saved as compressed-tensors, then renamed back to the upstream hub layout (see
`m3lab.quant.core` for the story and the CPU facts)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from m3lab.quant.core import (DEFAULT_IGNORE, NOTE_EXAMPLES, QuantRecipe, check_ignore_consistency, check_layout,
                              copy_side_files, model_class, rewrite_hub_layout, write_config)

SCHEME = "FP8_DYNAMIC"


def quantize(src: Path, tmp: Path, recipe: QuantRecipe) -> tuple[dict[str, float], list[str], list[str]]:
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    from llmcompressor import oneshot  # 1-6 s to import on 2 cores: only when a recipe needs it
    from llmcompressor.modifiers.quantization import QuantizationModifier

    seconds["import"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    model = model_class(src).from_pretrained(src, dtype="auto")
    seconds["load"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=SCHEME, ignore=recipe.ignore))
    seconds["oneshot"] = round(time.perf_counter() - t, 3)
    linearized = sum(type(m).__name__ == "LinearExperts2D" for m in model.modules())

    t = time.perf_counter()
    model.save_pretrained(tmp, max_shard_size=recipe.max_shard_size)  # llm-compressor's compressed save
    del model
    seconds["save"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    restored = rewrite_hub_layout(tmp, src)
    write_config(tmp, src, recipe.ignore)
    copy_side_files(src, tmp)
    dropped = check_layout(tmp, src)
    check_ignore_consistency(tmp, recipe.ignore)
    seconds["layout"] = round(time.perf_counter() - t, 3)

    notes = [f"llm-compressor linearized {linearized} MiniMaxM3VLExperts modules (3D nn.Parameter) into "
             "per-expert nn.Linear (generic linearize_moe) before quantizing: see routed_expert_formats"]
    if restored:
        notes.append(f"{len(restored)} unquantized tensors put back in the download's dtype (transformers had cast "
                     f"them to the model dtype), e.g. {restored[:3]}")
    if dropped:
        notes.append(f"{len(dropped)} download tensors are not loaded by transformers and are not in the output, "
                     f"e.g. {dropped[:NOTE_EXAMPLES]}")
    return seconds, dropped, notes


def plan_lines(section: Any) -> list[str]:
    ignore = section.ignore or list(DEFAULT_IGNORE)
    return [f"llmcompressor.oneshot(model=<download>, recipe=QuantizationModifier(targets='Linear', "
            f"scheme={SCHEME!r}, ignore={ignore})) → compressed-tensors, renamed back to the hub layout"]
