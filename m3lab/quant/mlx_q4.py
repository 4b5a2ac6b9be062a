"""MLX affine 4-bit (card 003): planned. `m3lab plan` prints the mlx-lm conversion; running it is the issue
on the other cards' recipes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from m3lab.quant.core import QuantizeError, QuantRecipe


def quantize(src: Path, tmp: Path, recipe: QuantRecipe) -> tuple[dict[str, float], list[str], list[str]]:
    raise QuantizeError("quantize.recipe: mlx_q4 is planned, not implemented yet")


def plan_lines(section: Any) -> list[str]:
    o = section.mlx
    return [f"mlx_lm.convert --hf-path <download> -q --q-bits {o.bits} --q-group-size {o.group_size}  "
            f"# {o.high_bits}-bit on {o.high_bits_modules}; vision tower {'kept' if o.keep_vision else 'dropped'}"]
