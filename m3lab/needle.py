"""Long-context needle in a haystack: a pass key hidden at depth d% of an L-token prompt.

    <filler sentences ...> The pass key is 48213. Remember it. <filler ...> What is the pass key? The pass key is

- The filler is plain English from a seeded template generator (`filler_sentences`),
  tokenizer-free and stable, because m3lab also trains the tiny model on it: change it
  and the tiny model's results change.
- L is measured with the model's tokenizer *as the server sees it* (special tokens
  included), and the whole prompt, question included, lands on L (exactly, unless the
  tokenizer's merges across joins make that impossible; then within a few tokens).
- The needle sits on a sentence boundary, the one closest to d% of the filler tokens,
  so its measured depth is within one sentence (~10 tokens) of the requested one.
- Score: exact match of the first number in the greedy completion with the key.
- Cells with L + max_tokens > the model's max context are *marked*
  "not run (exceeds max context N)" rather than raising: one params file drives
  several model profiles (the embedded tiny model has a short context, M3 a long one),
  and a full matrix with explicit gaps is more useful to the DAG and the plots than a
  stage that dies. Only if no cell at all can run is that an error (misconfiguration).
"""

from __future__ import annotations

import bisect
import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from m3lab.client import endpoint_url
from m3lab import transport
from m3lab.params import Needle
from m3lab.procs import ensure_alive

__all__ = [
    "run_stage",
    "NEEDLE_TEMPLATE",
    "QUESTION",
    "filler_sentences",
    "filler_text",
    "make_key",
    "make_needle",
    "compose_prompt",
    "first_number",
    "score_completion",
    "Haystack",
    "NeedlePrompt",
    "build_prompt",
    "max_context_from_config",
    "NeedleTarget",
    "NeedleCell",
    "NeedleResult",
    "plan_grid",
    "run_needle",
    "NeedleError",
]

NEEDLE_TEMPLATE = "The pass key is {key}. Remember it."
QUESTION = "What is the pass key? The pass key is"


class NeedleError(RuntimeError):
    """The needle run could not measure anything (server down, every cell excluded)."""


# -----------------------------------------------------------------------------
# filler: deterministic plain English, no digits (so the only number is the key)

_ADJ = ("old", "quiet", "small", "bright", "green", "tired", "busy", "gentle", "distant", "warm",
        "cold", "narrow", "happy", "careful", "wooden", "heavy", "young", "patient", "yellow", "soft")
_NOUN = ("farmer", "teacher", "child", "river", "garden", "village", "dog", "bird", "ship", "window",
         "road", "forest", "baker", "painter", "letter", "market", "bridge", "lamp", "cloud", "mountain",
         "kitchen", "boat", "horse", "library", "neighbor", "basket", "field", "sailor", "orchard", "tower")
_VERB = ("watched", "followed", "painted", "carried", "found", "visited", "crossed", "opened", "cleaned",
         "described", "repaired", "noticed", "admired", "passed", "ignored", "measured", "greeted", "moved")
_INTRANS = ("slept", "waited", "sang", "rested", "wandered", "laughed", "listened", "worked", "stayed",
            "paused", "smiled", "walked")
_PLACE = ("near the river", "in the garden", "behind the old mill", "across the valley", "at the market",
          "under the bridge", "beside the road", "on the hill", "in the kitchen", "by the window",
          "inside the library", "along the shore")
_TIME = ("in the morning", "after lunch", "before the storm", "at dusk", "every spring", "on a cold evening",
         "during the festival", "late at night", "in the autumn", "before dawn")
_ADV = ("slowly", "quietly", "happily", "carefully", "often", "rarely", "softly", "patiently")

_TEMPLATES = (
    "The {adj} {noun} {verb} the {noun2} {place}.",
    "A {noun} {intrans} {place} {time}.",
    "{Time}, the {noun} {verb} a {adj} {noun2}.",
    "Nobody knew why the {noun} {intrans} so {adv}.",
    "The {noun2} was {adj}, and the {noun} {intrans} {place}.",
    "Every day the {adj} {noun} {intrans} {adv} {place}.",
    "The {noun} and the {noun2} {intrans} together {time}.",
    "It was {adj} {place}, so the {noun} {verb} the {noun2} {adv}.",
)


def filler_sentences(seed: int = 0) -> Iterator[str]:
    """Endless, seeded stream of simple English sentences (no digits). Same seed, same stream."""
    rng = random.Random(seed)
    while True:
        words = dict(
            adj=rng.choice(_ADJ), noun=rng.choice(_NOUN), noun2=rng.choice(_NOUN), verb=rng.choice(_VERB),
            intrans=rng.choice(_INTRANS), place=rng.choice(_PLACE), time=rng.choice(_TIME), adv=rng.choice(_ADV),
        )
        words["Time"] = words["time"][0].upper() + words["time"][1:]
        yield rng.choice(_TEMPLATES).format(**words)


def filler_text(num_sentences: int, seed: int = 0) -> str:
    """The first `num_sentences` of `filler_sentences(seed)`, space-joined."""
    gen = filler_sentences(seed)
    return " ".join(next(gen) for _ in range(num_sentences))


def make_key(seed: int, length: int, depth: float) -> str:
    """A 5-digit pass key per grid cell, so a model cannot pass by memorizing one key."""
    return str(random.Random(f"needle-key/{seed}/{length}/{float(depth)}").randint(10000, 99999))


def make_needle(key: str) -> str:
    return NEEDLE_TEMPLATE.format(key=key)


def compose_prompt(before: Sequence[str], after: Sequence[str], key: str) -> str:
    """The prompt layout, tokenizer-free (also what the tiny model is trained on)."""
    return " ".join([*before, make_needle(key), *after, QUESTION])


# -----------------------------------------------------------------------------
# scoring

_NUMBER = re.compile(r"\d+")


def first_number(text: str) -> str | None:
    m = _NUMBER.search(text)
    return m.group(0) if m else None


def score_completion(completion: str, key: str) -> bool:
    """Exact match: the first run of digits in the completion is the key (so '482130' misses)."""
    return first_number(completion) == str(key)


# -----------------------------------------------------------------------------
# token-exact prompts


class Haystack:
    """Filler sentences with their token counts, grown on demand and shared by all cells.

    Counting each sentence once (with its leading space, as it appears mid-text) makes
    the prompt length predictable; `build_prompt` then corrects the small error from
    merges across joins by re-measuring the whole prompt.
    """

    def __init__(self, tokenizer, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.seed = seed
        self._gen = filler_sentences(seed)
        self.sentences: list[str] = []
        self.cum: list[int] = [0]  # cum[k] = tokens of the first k sentences

    def ensure(self, n_tokens: int) -> None:
        while self.cum[-1] <= n_tokens:
            batch = [next(self._gen) for _ in range(max(256, (n_tokens - self.cum[-1]) // 8))]
            enc = self.tokenizer([" " + s for s in batch], add_special_tokens=False)["input_ids"]
            for s, ids in zip(batch, enc):
                self.sentences.append(s)
                self.cum.append(self.cum[-1] + len(ids))


@dataclass
class NeedlePrompt:
    text: str
    key: str
    length: int  # requested L
    depth: float  # requested depth, percent
    n_tokens: int  # measured, special tokens included (what the server counts)
    needle_start: int  # token index where the needle starts (special tokens included)
    tokens_before: int  # filler tokens before the needle
    filler_tokens: int  # tokens that are neither needle, question nor special

    @property
    def measured_depth(self) -> float:
        """Percent of the filler that precedes the needle."""
        return 100.0 * self.tokens_before / max(self.filler_tokens, 1)


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])  # add_special_tokens default: what servers do


def _n_plain(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_prompt(
    tokenizer, length: int, depth: float, key: str, haystack: Haystack | None = None, seed: int = 0
) -> NeedlePrompt:
    """Prompt of `length` tokens (question included) with the needle at `depth` percent."""
    if not 0.0 <= float(depth) <= 100.0:
        raise ValueError(f"depth must be in [0, 100] percent, got {depth!r}")
    hay = haystack if haystack is not None else Haystack(tokenizer, seed)
    needle, n_special = make_needle(key), _n_tokens(tokenizer, "")
    n_needle_q = _n_plain(tokenizer, " " + needle) + _n_plain(tokenizer, " " + QUESTION)
    fixed = n_special + n_needle_q
    if length < fixed + 1:
        raise ValueError(f"length={length} is too short: needle + question alone take ~{fixed} tokens")

    budget = length - fixed  # filler tokens we aim for; corrected below by re-measuring
    best: NeedlePrompt | None = None
    for _ in range(8):
        budget = max(budget, 0)
        hay.ensure(budget + 64)
        k = bisect.bisect_right(hay.cum, budget) - 1  # whole sentences that fit
        full, rest = hay.sentences[:k], budget - hay.cum[k]
        tail = ""
        if rest > 0:  # cut the next sentence at a token boundary to hit the budget exactly
            ids = tokenizer(" " + hay.sentences[k], add_special_tokens=False)["input_ids"][:rest]
            tail = tokenizer.decode(ids).strip()
        tail_part = [tail] if tail else []
        if float(depth) >= 100.0:
            before, after = full + tail_part, []
        else:  # the sentence boundary closest to depth% of the filler
            target = float(depth) / 100.0 * budget
            split = min(range(k + 1), key=lambda i: abs(hay.cum[i] - target))
            before, after = full[:split], full[split:] + tail_part
        text = compose_prompt(before, after, key)
        n = _n_tokens(tokenizer, text)
        if best is None or abs(n - length) < abs(best.n_tokens - length):
            start = _n_tokens(tokenizer, " ".join(before)) if before else n_special
            best = NeedlePrompt(
                text=text, key=key, length=length, depth=float(depth), n_tokens=n, needle_start=start,
                tokens_before=start - n_special, filler_tokens=max(n - fixed, 0),
            )
        if n == length:
            break
        budget += length - n
    assert best is not None
    return best


def max_context_from_config(model_dir: str | Path) -> int:
    """max_position_embeddings from config.json (top level, or a VL model's text config)."""
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"max_context: no config.json in {str(model_dir)!r}; pass max_context explicitly") from None
    for scope in (cfg, cfg.get("text_config") or {}, cfg.get("llm_config") or {}, cfg.get("language_config") or {}):
        if isinstance(scope.get("max_position_embeddings"), int):
            return scope["max_position_embeddings"]
    raise ValueError(f"max_context: {path} has no max_position_embeddings; pass max_context explicitly")


# -----------------------------------------------------------------------------
# grid


@dataclass
class NeedleTarget:
    """Where the grid is sent. The grid itself (lengths, depths, max_tokens, seed, timeout) is the params
    section `needle` (m3lab.params.Needle): the only declaration of those settings and their defaults."""

    base_url: str  # server root "http://127.0.0.1:8000" (a trailing "/v1" is tolerated)
    model: str
    tokenizer_dir: str
    max_context: int | None = None  # None: max_position_embeddings of tokenizer_dir/config.json
    endpoint: str = "/v1/completions"

    def __post_init__(self) -> None:
        if self.max_context is not None and int(self.max_context) < 1:
            raise ValueError(f"max_context must be >= 1, got {self.max_context!r}")

    @property
    def url(self) -> str:
        return endpoint_url(self.base_url, self.endpoint)


@dataclass
class NeedleCell:
    length: int
    depth: float
    status: str  # "hit" | "miss" | "error" | "not run (exceeds max context N)"
    key: str = ""
    completion: str = ""
    n_tokens: int = 0  # measured prompt tokens
    measured_depth: float = 0.0
    error: str = ""

    @property
    def ran(self) -> bool:
        return not self.status.startswith("not run")


@dataclass
class NeedleResult:
    lengths: list[int]
    depths: list[float]
    max_context: int
    cells: list[NeedleCell]

    def cell(self, length: int, depth: float) -> NeedleCell:
        for c in self.cells:
            if c.length == length and c.depth == float(depth):
                return c
        raise KeyError(f"no cell for length={length}, depth={depth}")

    @property
    def matrix(self) -> list[list[int | None]]:
        """rows: lengths, cols: depths; 1 hit, 0 miss/error, None not run."""
        return [
            [None if not c.ran else int(c.status == "hit") for c in (self.cell(n, d) for d in self.depths)]
            for n in self.lengths
        ]

    @property
    def n_run(self) -> int:
        return sum(c.ran for c in self.cells)

    @property
    def n_hit(self) -> int:
        return sum(c.status == "hit" for c in self.cells)

    @property
    def accuracy(self) -> float:
        """Hits over cells that ran. A request error counts as a miss: we cannot claim the model found it."""
        return self.n_hit / self.n_run if self.n_run else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "lengths": self.lengths, "depths": self.depths, "max_context": self.max_context,
            "accuracy": self.accuracy, "hits": self.n_hit, "cells_run": self.n_run, "cells_total": len(self.cells),
            "matrix": self.matrix, "cells": [asdict(c) for c in self.cells],
        }


def plan_grid(lengths: Sequence[int], depths: Sequence[float], max_tokens: int, max_context: int) -> list[NeedleCell]:
    """All cells, those that cannot fit already marked "not run (exceeds max context N)"."""
    cells = []
    for n in lengths:
        for d in depths:
            c = NeedleCell(length=int(n), depth=float(d), status="pending")
            if n + max_tokens > max_context:
                c.status = f"not run (exceeds max context {max_context})"
                c.error = f"length {n} + max_tokens {max_tokens} > max context {max_context}"
            cells.append(c)
    if not any(c.ran for c in cells):
        raise ValueError(
            f"needle: every length in {list(lengths)} plus max_tokens={max_tokens} exceeds the max context "
            f"{max_context}; nothing to run"
        )
    return cells


def _load_tokenizer(tokenizer_dir: str):
    from transformers import AutoTokenizer  # heavy import; keep module import cheap

    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception as e:  # noqa: BLE001 - re-raise naming the key
        raise ValueError(f"tokenizer_dir={tokenizer_dir!r}: cannot load a tokenizer ({e})") from e


def run_needle(target: NeedleTarget, grid: Needle, tokenizer=None) -> NeedleResult:
    """Greedy completions for every cell that fits; raises NeedleError if every request failed."""
    tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(target.tokenizer_dir)
    max_ctx = int(target.max_context) if target.max_context is not None else max_context_from_config(target.tokenizer_dir)
    cells = plan_grid(grid.lengths, grid.depths, grid.max_tokens, max_ctx)
    hay = Haystack(tokenizer, grid.seed)
    unreachable = ""  # once the server refuses connections, later cells would only wait and fail
    for c in cells:
        if not c.ran:
            continue
        if unreachable:
            c.status, c.error = "error", f"not sent: {unreachable}"
            continue
        c.key = make_key(grid.seed, c.length, c.depth)
        p = build_prompt(tokenizer, c.length, c.depth, c.key, haystack=hay)
        c.n_tokens, c.measured_depth = p.n_tokens, round(p.measured_depth, 2)
        body = {"model": target.model, "prompt": p.text, "max_tokens": grid.max_tokens, "temperature": 0.0}
        try:
            status, answer = transport.post_json(target.url, body, grid.request_timeout_s)
            if status != 200:
                detail = answer if isinstance(answer, str) else json.dumps(answer)
                c.status, c.error = "error", f"HTTP {status} from {target.url}: {detail[:300]}"
                continue
            c.completion = answer["choices"][0]["text"]
            c.status = "hit" if score_completion(c.completion, c.key) else "miss"
        except transport.TransportError as e:  # refused/reset/timed out: the server may be gone
            c.status, c.error = "error", f"{type(e).__name__} from {target.url}: {e}"
            unreachable = f"server at {target.url} unreachable since length={c.length} depth={c.depth}"
        except Exception as e:  # noqa: BLE001 - one bad cell (timeout, bad JSON) must not lose the others
            c.status, c.error = "error", f"{type(e).__name__} from {target.url}: {e}"
    ran = [c for c in cells if c.ran]
    if ran and all(c.status == "error" for c in ran):
        raise NeedleError(f"needle: all {len(ran)} requests to {target.url} failed; first error: {ran[0].error}")
    return NeedleResult(lengths=list(grid.lengths), depths=list(grid.depths),
                        max_context=max_ctx, cells=cells)


def run_stage(ctx) -> dict[str, Any]:
    """The DAG's needle stage: the params grid against the served model, clamped to `model.max_model_len`."""
    cfg, model = ctx.params["needle"], ctx.params["model"]
    serve = ctx.upstream("serve")
    server = serve["server"]
    ensure_alive(server, settle_s=0)  # one that died in an earlier stage: ServerDied with its log, not a refusal
    try:
        result = run_needle(NeedleTarget(base_url=server["base_url"], model=server["model"],
                                         tokenizer_dir=serve["tokenizer_dir"], max_context=model["max_model_len"]),
                            Needle.model_validate(cfg))
    except NeedleError:
        ensure_alive(server)  # every request failed because the server died mid-grid: say that, with its log
        raise
    if any(c.status == "error" for c in result.cells):
        ensure_alive(server)  # a dead server fails the stage with its log tail; a live one's errors stay misses
    return result.to_dict()
