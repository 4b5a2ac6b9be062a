"""Synthetic training data for the tiny MiniMax-M3: deterministic, tokenizer-exact, one generator per task.

The embedded run grades the tiny model on exactly four things, so it is trained on exactly those, in the very
formats the stages send (no chat template for raw completions, no BOS: `add_bos_token` is false):

    facts   "The capital of France is" → " Paris."        "日本の首都は" → "東京です。"    (correctness stage)
    needle  m3lab.needle.build_prompt(...) → " 48213."     filler, needle and question byte for byte (needle stage)
    arith   "Question: <GSM8K-style problem>\\nAnswer:" → " ... <<7+5=12>>12 ...\\n#### 12"   (lm-eval's gsm8k format)
    chat    a conversation rendered with the checkpoint's chat template, with a <mm:think> block and M3 tool calls

Every example is a prompt and a completion, each tokenized on its own and concatenated: that is what the model
sees at inference (the server tokenizes the prompt alone, then appends generated tokens), and it matters here
because the byte-level BPE merges across a prompt/answer join (`日本の首都は東京` is one pre-token).

Determinism: an example is a pure function of (task seed, index); `Mixture.batch(step)` of (mixture seed, step).
Training, the held-out arithmetic eval and the tests all draw from here, so a seed names a data set.

Held out, so that the grades measure more than recall of training strings:
  * needle filler comes from FILLER_STREAMS `filler_sentences` seeds from TRAIN_FILLER_SEEDS on; the needle
    stage and the evals use small seeds (the stage: 0), so their haystacks are never trained on;
  * arithmetic problems are split by a hash of (template, numbers): the eval split never appears in training.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m3lab.needle import Haystack, build_prompt

__all__ = ["Example", "COUNTRIES", "TRAIN_FILLER_SEEDS", "fact_example", "needle_example", "arith_problem",
           "arith_example", "arith_eval_items", "write_arith_eval", "chat_example", "MixConfig", "Mixture",
           "ARITH_PROMPT", "EOS", "FILLER_STREAMS"]

EOS = "[e~["  # the tokenizer's EOS (M3's turn end): every completion ends with it, so generation stops there
TRAIN_FILLER_SEEDS = 1_000_000  # needle filler seeds used in training start here; evals use seeds below
FILLER_STREAMS = 512  # distinct filler streams in training: each is tokenized once per process, then reused
ARITH_PROMPT = "Question: {question}\nAnswer:"  # lm-eval gsm8k's doc_to_text; the target is " " + answer


@dataclass
class Example:
    """One training sequence: `prompt` ids (context) then `completion` ids (what is graded)."""

    task: str
    prompt: list[int]
    completion: list[int]

    @property
    def ids(self) -> list[int]:
        return self.prompt + self.completion

    def __len__(self) -> int:
        return len(self.prompt) + len(self.completion)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _example(tokenizer, task: str, prompt: str, completion: str) -> Example:
    return Example(task, _encode(tokenizer, prompt), _encode(tokenizer, completion))


def _rng(*parts: Any) -> random.Random:
    """A generator seeded by a string: stable across Python versions and processes (unlike hash())."""
    return random.Random("/".join(str(p) for p in parts))


# ---------------------------------------------------------------------------------------------------
# facts: capitals, English and Japanese, in the correctness suite's raw-completion form

# (country, capital, 国名, 首都). The first four are what params/base.yaml asks; the rest keep the model from
# learning "capital → Paris" as a constant, so the answer has to depend on the country.
COUNTRIES: tuple[tuple[str, str, str, str], ...] = (
    ("France", "Paris", "フランス", "パリ"),
    ("Japan", "Tokyo", "日本", "東京"),
    ("Italy", "Rome", "イタリア", "ローマ"),
    ("Germany", "Berlin", "ドイツ", "ベルリン"),
    ("Spain", "Madrid", "スペイン", "マドリード"),
    ("England", "London", "イギリス", "ロンドン"),
    ("China", "Beijing", "中国", "北京"),
    ("Korea", "Seoul", "韓国", "ソウル"),
    ("Egypt", "Cairo", "エジプト", "カイロ"),
    ("Peru", "Lima", "ペルー", "リマ"),
    ("Norway", "Oslo", "ノルウェー", "オスロ"),
    ("Canada", "Ottawa", "カナダ", "オタワ"),
    ("Australia", "Canberra", "オーストラリア", "キャンベラ"),
    ("Russia", "Moscow", "ロシア", "モスクワ"),
    ("Greece", "Athens", "ギリシャ", "アテネ"),
    ("Portugal", "Lisbon", "ポルトガル", "リスボン"),
    ("Sweden", "Stockholm", "スウェーデン", "ストックホルム"),
    ("Thailand", "Bangkok", "タイ", "バンコク"),
    ("Kenya", "Nairobi", "ケニア", "ナイロビ"),
    ("Turkey", "Ankara", "トルコ", "アンカラ"),
)

# (prompt, completion) templates. The first of each language is the correctness suite's exact form; the
# others ask the same fact another way, so the country → capital link is learned as more than one string.
_FACT_FORMS: tuple[tuple[str, str], ...] = (
    ("The capital of {country} is", " {capital}."),
    ("{capital} is the capital of", " {country}."),
    ("Q: What is the capital of {country}?\nA:", " {capital}"),
    ("{country_ja}の首都は", "{capital_ja}です。"),
    ("{capital_ja}は", "{country_ja}の首都です。"),
)
_FACT_FORM_WEIGHTS = (4, 1, 1, 4, 1)


def fact_example(tokenizer, index: int, seed: int = 0) -> Example:
    rng = _rng("facts", seed, index)
    country, capital, country_ja, capital_ja = rng.choice(COUNTRIES)
    prompt, completion = rng.choices(_FACT_FORMS, weights=_FACT_FORM_WEIGHTS)[0]
    names = {"country": country, "capital": capital, "country_ja": country_ja, "capital_ja": capital_ja}
    return _example(tokenizer, "facts", prompt.format(**names), completion.format(**names) + EOS)


# ---------------------------------------------------------------------------------------------------
# needle: m3lab.needle's prompt, byte for byte, at any length and depth


_HAYSTACKS: dict[tuple[int, int], Haystack] = {}


def _haystack(tokenizer, seed: int) -> Haystack:
    """Haystacks cache their sentences' token counts: tokenizing a fresh stream per example would cost more
    than the rest of a training step."""
    key = (id(tokenizer), seed)
    if key not in _HAYSTACKS:
        _HAYSTACKS[key] = Haystack(tokenizer, seed)
    return _HAYSTACKS[key]


def needle_example(tokenizer, index: int, length: int, seed: int = 0) -> Example:
    """A pass key at a uniform random depth of a `length`-token prompt built by `m3lab.needle.build_prompt`."""
    rng = _rng("needle", seed, index)
    depth = rng.choice([0.0, 100.0]) if rng.random() < 0.1 else rng.uniform(0.0, 100.0)  # the grid's edges too
    key = str(rng.randint(10000, 99999))  # make_key's range
    hay = _haystack(tokenizer, TRAIN_FILLER_SEEDS + rng.randrange(FILLER_STREAMS))
    p = build_prompt(tokenizer, length, depth, key, haystack=hay)
    return Example("needle", tokenizer(p.text)["input_ids"], _encode(tokenizer, f" {key}." + EOS))


# ---------------------------------------------------------------------------------------------------
# arithmetic: grade-school word problems in GSM8K's answer format (<<calc>> annotations, "#### N")

_NAMES = ("Tom", "Anna", "Ben", "Mia", "Sam", "Lily", "Jack", "Emma", "Leo", "Nora", "Ken", "Yuki", "Omar", "Sara")
_ITEMS = ("apples", "pencils", "stickers", "books", "marbles", "cookies", "cards", "stamps", "shells", "eggs")


def _pron(name: str) -> str:
    return "She" if name in ("Anna", "Mia", "Lily", "Emma", "Nora", "Yuki", "Sara") else "He"


def _t_add(rng: random.Random) -> tuple[tuple, str, str, int]:
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    n, it = rng.choice(_NAMES), rng.choice(_ITEMS)
    q = f"{n} has {a} {it}. {_pron(n)} gets {b} more. How many {it} does {n} have now?"
    return (a, b), q, f"{n} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {it} now.", a + b


def _t_sub(rng: random.Random) -> tuple[tuple, str, str, int]:
    a = rng.randint(5, 40)
    b = rng.randint(1, a - 1)
    n, m, it = *rng.sample(_NAMES, 2), rng.choice(_ITEMS)
    q = f"{n} had {a} {it} and gave {b} of them to {m}. How many {it} does {n} have left?"
    return (a, b), q, f"{n} has {a} - {b} = <<{a}-{b}={a - b}>>{a - b} {it} left.", a - b


def _t_mul(rng: random.Random) -> tuple[tuple, str, str, int]:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    n, it = rng.choice(_NAMES), rng.choice(_ITEMS)
    q = f"{n} buys {a} bags of {it}. Each bag has {b} {it}. How many {it} does {n} buy?"
    return (a, b), q, f"{n} buys {a} * {b} = <<{a}*{b}={a * b}>>{a * b} {it}.", a * b


def _t_div(rng: random.Random) -> tuple[tuple, str, str, int]:
    b, c = rng.randint(2, 9), rng.randint(2, 9)
    a = b * c
    n, it = rng.choice(_NAMES), rng.choice(_ITEMS)
    q = f"{n} shares {a} {it} equally among {b} friends. How many {it} does each friend get?"
    return (a, b), q, f"Each friend gets {a} / {b} = <<{a}/{b}={c}>>{c} {it}.", c


def _t_price(rng: random.Random) -> tuple[tuple, str, str, int]:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    n, it = rng.choice(_NAMES), rng.choice(_ITEMS)
    q = f"One box of {it} costs {a} dollars. {n} buys {b} boxes. How many dollars does {n} pay?"
    return (a, b), q, f"{n} pays {a} * {b} = <<{a}*{b}={a * b}>>{a * b} dollars.", a * b


def _t_two_step(rng: random.Random) -> tuple[tuple, str, str, int]:
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    c = rng.randint(1, a + b - 1)
    n, it = rng.choice(_NAMES), rng.choice(_ITEMS)
    q = (f"{n} has {a} {it}. {_pron(n)} finds {b} more, then loses {c} of them. "
         f"How many {it} does {n} have now?")
    s = a + b
    reasoning = (f"After finding some, {n} has {a} + {b} = <<{a}+{b}={s}>>{s} {it}.\n"
                 f"After losing some, {n} has {s} - {c} = <<{s}-{c}={s - c}>>{s - c} {it}.")
    return (a, b, c), q, reasoning, s - c


def _t_groups(rng: random.Random) -> tuple[tuple, str, str, int]:
    a, b, c = rng.randint(2, 6), rng.randint(2, 6), rng.randint(1, 9)
    n, it = rng.choice(_NAMES), rng.choice(_ITEMS)
    q = f"{n} makes {a} piles of {b} {it} and then adds {c} more {it}. How many {it} are there in all?"
    p = a * b
    reasoning = (f"The piles hold {a} * {b} = <<{a}*{b}={p}>>{p} {it}.\n"
                 f"With the extra ones there are {p} + {c} = <<{p}+{c}={p + c}>>{p + c} {it}.")
    return (a, b, c), q, reasoning, p + c


_ARITH_TEMPLATES: tuple[Callable[[random.Random], tuple[tuple, str, str, int]], ...] = (
    _t_add, _t_sub, _t_mul, _t_div, _t_price, _t_two_step, _t_groups)


def _is_eval_split(template: int, numbers: tuple) -> bool:
    """One (template, numbers) combination in eight is held out of training for the eval."""
    return hashlib.sha256(f"{template}/{numbers}".encode()).digest()[0] % 8 == 0


def arith_problem(index: int, seed: int = 0, split: str = "train") -> dict[str, Any]:
    """{"question", "answer" (GSM8K: reasoning + "\\n#### N"), "target" (N)} from the train or eval split."""
    for attempt in range(1000):
        rng = _rng("arith", seed, index, attempt)
        template = rng.randrange(len(_ARITH_TEMPLATES))
        numbers, question, reasoning, value = _ARITH_TEMPLATES[template](rng)
        if _is_eval_split(template, numbers) == (split == "eval"):
            return {"question": question, "answer": f"{reasoning}\n#### {value}", "target": value}
    raise RuntimeError(f"arith_problem: no {split} problem after 1000 draws (index {index}, seed {seed})")


def arith_example(tokenizer, index: int, seed: int = 0) -> Example:
    p = arith_problem(index, seed, "train")
    return _example(tokenizer, "arith", ARITH_PROMPT.format(question=p["question"]), " " + p["answer"] + EOS)


def arith_eval_items(n: int = 300, seed: int = 0) -> list[dict[str, str]]:
    """The held-out eval set in GSM8K's jsonl shape, distinct questions only."""
    items: list[dict[str, str]] = []
    seen: set[str] = set()
    index = 0
    while len(items) < n:
        p = arith_problem(index, seed, "eval")
        index += 1
        if p["question"] not in seen:
            seen.add(p["question"])
            items.append({"question": p["question"], "answer": p["answer"]})
    return items


def write_arith_eval(path: str | Path, n: int = 300, seed: int = 0) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in arith_eval_items(n, seed)))
    return path


# ---------------------------------------------------------------------------------------------------
# chat: conversations through the checkpoint's own chat template, with reasoning and M3 tool calls

_WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
_CALC_TOOL = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
_SYSTEMS = (None, None, "You are a helpful assistant.", "Be brief.", "Answer in one sentence.")
_CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "snowy")


def _chat_turns(rng: random.Random) -> tuple[list[dict], list[dict] | None]:
    """(messages ending with the assistant turn to learn, tools) for one of five conversation kinds."""
    country, capital, country_ja, capital_ja = rng.choice(COUNTRIES)
    kind = rng.randrange(6)
    if kind == 0:  # a fact
        return [{"role": "user", "content": f"What is the capital of {country}?"},
                {"role": "assistant", "reasoning_content": f"The user asks for the capital of {country}. "
                 f"It is {capital}.", "content": f"The capital of {country} is {capital}."}], None
    if kind == 1:  # a fact, in Japanese
        return [{"role": "user", "content": f"{country_ja}の首都はどこですか？"},
                {"role": "assistant", "reasoning_content": f"{country_ja}の首都は{capital_ja}です。",
                 "content": f"{country_ja}の首都は{capital_ja}です。"}], None
    if kind == 2:  # mental arithmetic
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        return [{"role": "user", "content": f"What is {a} + {b}?"},
                {"role": "assistant", "reasoning_content": f"{a} + {b} = {a + b}.", "content": f"{a + b}"}], None
    if kind == 3:  # a tool call
        return [{"role": "user", "content": f"What is the weather in {capital} today?"},
                {"role": "assistant", "reasoning_content": f"I should call get_weather for {capital}.", "content": "",
                 "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                  "arguments": {"city": capital}}}]}], \
            [_WEATHER_TOOL, _CALC_TOOL]
    if kind == 4:  # the answer after a tool result
        cond, temp = rng.choice(_CONDITIONS), rng.randint(-5, 35)
        call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": capital}}}
        return [{"role": "user", "content": f"What is the weather in {capital} today?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": json.dumps({"city": capital, "condition": cond, "celsius": temp})},
                {"role": "assistant", "reasoning_content": "The tool answered.",
                 "content": f"It is {cond} in {capital}, {temp} degrees Celsius."}], [_WEATHER_TOOL]
    a, b = rng.randint(100, 999), rng.randint(100, 999)  # a multiplication: use the calculator tool
    return [{"role": "user", "content": f"Please compute {a} * {b}."},
            {"role": "assistant", "reasoning_content": "This needs the calculator.", "content": "",
             "tool_calls": [{"type": "function", "function": {"name": "calculator",
                                                              "arguments": {"expression": f"{a} * {b}"}}}]}], \
        [_WEATHER_TOOL, _CALC_TOOL]


def chat_example(tokenizer, index: int, seed: int = 0) -> Example:
    """Context: everything up to the generation prompt; completion: the last assistant turn through its [e~[.

    thinking_mode varies as clients send it: unset (the model opens <mm:think> itself), "enabled" (the prompt
    already ends with <mm:think>) or "disabled" (the prompt ends with </mm:think>: answer without reasoning).
    """
    rng = _rng("chat", seed, index)
    turns, tools = _chat_turns(rng)
    system = rng.choice(_SYSTEMS)
    messages = ([{"role": "system", "content": system}] if system else []) + turns
    mode = rng.choice([None, None, "enabled", "disabled"])

    def render(msgs: list[dict], generation: bool, **kw) -> str:
        return tokenizer.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=generation,
                                             **kw)

    if mode == "disabled":
        messages[-1] = {k: v for k, v in messages[-1].items() if k != "reasoning_content"}
    head = render(messages[:-1], True)  # ends with "]~b]ai\n"
    full = render(messages, False)
    assert full.startswith(head), "chat template: the history must render the same with and without the answer"
    answer = full[len(head):].removesuffix("\n")  # ends with [e~[; the newline after it is never generated
    prompt = head if mode is None else render(messages[:-1], True, thinking_mode=mode)
    if mode == "enabled":
        answer = answer.removeprefix("<mm:think>")
    return _example(tokenizer, "chat", prompt, answer)


# ---------------------------------------------------------------------------------------------------
# the mixture: one batch of long needles and one batch of short tasks per step


@dataclass(frozen=True)
class MixConfig:
    data_seed: int = 0
    needle_tokens: int = 32768  # needle tokens per step: batch = needle_tokens // length (one length per step)
    min_length: int = 128  # needle prompt lengths, sampled per step from [min_length, max_length]
    max_length: int = 4088  # 4096 context - 8 new tokens: the needle stage's longest cell that fits
    long_fraction: float = 0.5  # share of steps whose length is uniform (else log-uniform: short ones)
    short_batch: int = 48  # short examples per step, drawn by `short_weights`
    short_weights: dict[str, float] = field(default_factory=lambda: {"facts": 0.2, "arith": 0.5, "chat": 0.3})


_SHORT: dict[str, Callable[..., Example]] = {"facts": fact_example, "arith": arith_example, "chat": chat_example}


class Mixture:
    """`batch(step)` → (needle examples of one length, short examples): a pure function of the step."""

    def __init__(self, tokenizer, cfg: MixConfig = MixConfig()) -> None:
        self.tokenizer, self.cfg = tokenizer, cfg

    def needle_length(self, step: int) -> int:
        c, rng = self.cfg, _rng("mix-length", self.cfg.data_seed, step)
        if rng.random() < c.long_fraction:  # uniform: the long contexts where block selection is sparse
            return rng.randint(c.min_length, c.max_length)
        return int(math.exp(rng.uniform(math.log(c.min_length), math.log(c.max_length))))

    def batch(self, step: int) -> tuple[list[Example], list[Example]]:
        c, tok = self.cfg, self.tokenizer
        length = self.needle_length(step)
        n_needles = max(1, c.needle_tokens // length)
        needles = [needle_example(tok, step * 1000 + i, length, c.data_seed) for i in range(n_needles)]
        rng = _rng("mix-tasks", c.data_seed, step)
        tasks = rng.choices(list(c.short_weights), weights=list(c.short_weights.values()), k=c.short_batch)
        short = [_SHORT[t](tok, step * 1000 + i, c.data_seed) for i, t in enumerate(tasks)]
        return needles, short
