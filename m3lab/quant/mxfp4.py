"""AMD Quark OCP MXFP4 (card 001): planned. `m3lab plan` prints the card's Quark calls; running it is the
issue on the other cards' recipes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from m3lab.quant.core import QuantizeError, QuantRecipe


def quantize(src: Path, tmp: Path, recipe: QuantRecipe) -> tuple[dict[str, float], list[str], list[str]]:
    raise QuantizeError("quantize.recipe: mxfp4 is planned, not implemented yet")


def plan_lines(section: Any) -> list[str]:
    o = section.quark
    return [f"quark LLMTemplate(model_type={o.model_type!r}, kv_layers_name={o.kv_layers_name}, "
            f"q_layer_name={o.q_layer_name!r}, exclude_layers_name={o.exclude_layers_name})",
            f"template.get_config(scheme={o.scheme!r}, exclude_layers={o.exclude_layers})",
            "ModelQuantizer(config).direct_quantize_checkpoint(pretrained_model_path=<download>, "
            "save_path=<out>)" + ("  # file to file, no full model load" if o.file_to_file else "")]
