"""Data for the `tiny_arith` lm-eval task (tiny_arith.yaml): the tiny model's held-out arithmetic, GSM8K-shaped.

lm-eval imports this file by path (`custom_dataset: !function tiny_arith.load`), so it must not rely on being
part of a package, and it resolves the default jsonl from its own location: the task works from any cwd and
needs no network or datasets cache. `data_file` (from `--metadata '{"data_file": "..."}'`) overrides it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_DATA_FILE", "FEWSHOT", "resolve_data_file", "read_items", "load", "preflight"]

# m3lab/tasks/ → m3lab/assets/tiny-m3/arith_eval.jsonl (written by tools/tiny_m3/synthdata.py: write_arith_eval)
DEFAULT_DATA_FILE = Path(__file__).resolve().parent.parent / "assets" / "tiny-m3" / "arith_eval.jsonl"

# For --num_fewshot > 0: hand-written, so no held-out item ever leaks into a prompt.
FEWSHOT: list[dict[str, str]] = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A box holds 6 pens. How many pens are in 5 boxes?",
     "answer": "5 boxes hold 5 * 6 = <<5*6=30>>30 pens.\n#### 30"},
    {"question": "Mia had 20 stickers and gave away 8. How many stickers are left?",
     "answer": "She has 20 - 8 = <<20-8=12>>12 stickers left.\n#### 12"},
]


def resolve_data_file(path: str | Path | None = None) -> Path:
    """The jsonl the task reads; a clear error if it is missing (lm-eval would only say 'load failed')."""
    p = Path(path).expanduser() if path else DEFAULT_DATA_FILE
    if not p.is_file():
        hint = (" (build it from the repository root: python -c 'from tools.tiny_m3.synthdata import "
                f"write_arith_eval; write_arith_eval(\"{p}\")')" if p == DEFAULT_DATA_FILE else "")
        raise FileNotFoundError(f"tiny_arith: data file {p} not found{hint}")
    return p


def read_items(path: str | Path) -> list[dict[str, str]]:
    items = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        if "#### " not in item.get("answer", ""):
            raise ValueError(f"tiny_arith: {path}:{n}: answer must end with '#### N' (GSM8K format)")
        items.append({"question": item["question"], "answer": item["answer"]})
    return items


def load(data_file: str | None = None, **_: Any):
    """lm-eval's custom_dataset hook. It passes the whole task metadata (model_args included) as kwargs."""
    import datasets

    items = read_items(resolve_data_file(data_file))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(items),
                                 "fewshot": datasets.Dataset.from_list(FEWSHOT)})


def preflight(metadata: dict[str, Any]) -> None:
    """Called by m3lab.evals before lm_eval starts: a missing jsonl fails in milliseconds, not after lm-eval
    has indexed its ~14k task YAMLs."""
    resolve_data_file(metadata.get("data_file"))
