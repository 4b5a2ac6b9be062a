"""Intel AutoRound mixed-bit (card 002): planned. `m3lab plan` prints the card's settings; running it is the
issue on the other cards' recipes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from m3lab.quant.core import QuantizeError, QuantRecipe


def quantize(src: Path, tmp: Path, recipe: QuantRecipe) -> tuple[dict[str, float], list[str], list[str]]:
    raise QuantizeError("quantize.recipe: autoround is planned, not implemented yet")


def plan_lines(section: Any) -> list[str]:
    o = section.autoround
    return [f"auto-round mixed {'/'.join(map(str, o.bits))}-bit (average {o.average_bits} bits), group_size "
            f"{o.group_size}, sym={o.sym}",
            f"vLLM hf_overrides the card needed: {json.dumps(o.hf_overrides)}"]
