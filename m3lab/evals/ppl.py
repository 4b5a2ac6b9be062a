"""Token-level perplexity of a corpus, measured through a server's `prompt_logprobs` (card 002's method:
`ppl_official_offline.py`, "wikitext-2 PPL via prompt_logprobs").

    corpus ──tokenizer──▶ ids ──plan_windows──▶ windows ──POST /v1/completions──▶ prompt_logprobs ──▶ PPL

One request per window: {"prompt": [ids...], "max_tokens": 1, "prompt_logprobs": 0}. vLLM answers with
`choices[0].prompt_logprobs`, one entry per prompt token: None for the first (nothing to condition on), then
{"<token id>": {"logprob": -2.31, "rank": 7, "decoded_token": " the"}} (vllm/entrypoints/openai/protocol.py
CompletionResponseChoice.prompt_logprobs: list[dict[int, Logprob] | None]; JSON turns the int keys into strings).
With prompt_logprobs=0 each dict holds only the prompt token itself; vLLM clamps -inf to -9999.0
(serving_engine.clamp_prompt_logprobs).

Windows are sent as token-id lists, not text: the windows are cut in token space, and text would be re-tokenized
by the server (a cut can merge differently, and the server may add a BOS), so the scored tokens would no longer
be the ones counted here. vLLM skips the prefix cache for requests that ask for prompt logprobs, so overlapping
windows are recomputed rather than served stale.

PPL = exp(-(sum of the scored tokens' logprobs) / (number of scored tokens)), in nats, per token of the
checkpoint's own tokenizer (so it compares across quantizations of one model, not across tokenizers).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from m3lab import needle
from m3lab import client
from m3lab.client import RequestFailed

__all__ = ["PPLNotSupported", "PPLResponseError", "PPLConfig", "PPLResult", "Window", "plan_windows",
           "token_logprobs", "perplexity", "read_wikitext", "detokenize_wikitext", "tokenize",
           "probe_prompt_logprobs", "score_window", "server_perplexity", "corpus_perplexity"]

CLAMPED_LOGPROB = -9999.0  # what vLLM sends for a -inf logprob


class PPLNotSupported(RuntimeError):
    """The engine does not return prompt_logprobs (it rejects or ignores vLLM's extension)."""


class PPLResponseError(ValueError):
    """The server returned prompt_logprobs, but not in the shape this module reads."""


@dataclass
class PPLConfig:
    window_tokens: int = 2048  # tokens per request (the server needs max_model_len ≥ window_tokens + 1)
    stride: int | None = None  # tokens a window advances; None → window_tokens - 1 (one token of carried context)
    max_windows: int | None = None  # stop after this many windows (bounds the cost; the result says truncated)
    concurrency: int = 4
    timeout_s: float = 600.0
    detokenize: bool = False  # undo wikitext's " @-@ " / " , " spacing before tokenizing (see detokenize_wikitext)


@dataclass
class PPLResult:
    ppl: float
    mean_nll: float  # nats per scored token; ppl = exp(mean_nll)
    scored_tokens: int
    windows: int
    corpus_tokens: int  # the whole tokenized corpus, scored or not
    truncated: bool  # max_windows stopped before the end of the corpus
    window_tokens: int
    stride: int
    clamped_tokens: int  # tokens whose logprob came back as vLLM's -9999.0 (i.e. -inf); they dominate the mean
    duration_s: float
    method: str = "prompt_logprobs"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# The math
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Window:
    start: int  # corpus index of the window's first token
    end: int  # one past its last token
    score_from: int  # tokens [score_from, end) are scored; [start, score_from) are context only

    @property
    def token_count(self) -> int:
        return self.end - self.start


def plan_windows(n_tokens: int, window_tokens: int, stride: int | None = None,
                 max_windows: int | None = None) -> list[Window]:
    """Windows of `window_tokens` advancing by `stride`, each scoring only the tokens no earlier window scored.

    Token 0 has nothing to condition on; every later token is scored exactly once, by the first window that
    holds it with at least one token of context before it. That needs consecutive windows to overlap by at
    least one token, hence stride ≤ window_tokens - 1 (the default: each window carries exactly one token of
    context over). A smaller stride gives every scored token more context, at more tokens sent per token
    scored (window_tokens / stride)."""
    if window_tokens < 2:
        raise ValueError(f"ppl.window_tokens must be at least 2 (one context token, one scored), got {window_tokens}")
    stride = window_tokens - 1 if stride is None else stride
    if not 1 <= stride <= window_tokens - 1:
        raise ValueError(f"ppl.stride must be between 1 and window_tokens - 1 = {window_tokens - 1}, got {stride}: "
                         f"windows must overlap by at least one token, or each window's first token is never scored")
    windows: list[Window] = []
    scored_until = 1  # token 0 is never scored
    start = 0
    while scored_until < n_tokens and (max_windows is None or len(windows) < max_windows):
        end = min(start + window_tokens, n_tokens)
        windows.append(Window(start, end, scored_until))
        scored_until = end
        start += stride
    return windows


def token_logprobs(prompt_logprobs: Sequence[Any], token_ids: Sequence[int]) -> list[float | None]:
    """The logprob of each prompt token from a vLLM `prompt_logprobs` list: None where vLLM has none (the first
    token). Entries are looked up by the token's own id (with prompt_logprobs=k>0 the dict also holds the top-k
    alternatives), as a string key (JSON) or an int key (an in-process RequestOutput turned into a dict)."""
    if not isinstance(prompt_logprobs, (list, tuple)):
        raise PPLResponseError(f"prompt_logprobs is a {type(prompt_logprobs).__name__}, not a list")
    if len(prompt_logprobs) != len(token_ids):
        raise PPLResponseError(f"prompt_logprobs has {len(prompt_logprobs)} entries for {len(token_ids)} prompt "
                               f"tokens (did the server add or drop tokens, e.g. a BOS?)")
    out: list[float | None] = []
    for position, (entry, token) in enumerate(zip(prompt_logprobs, token_ids)):
        if entry is None:
            if position:
                raise PPLResponseError(f"prompt_logprobs[{position}] is null; only the first token may be")
            out.append(None)
            continue
        if not isinstance(entry, dict):
            raise PPLResponseError(f"prompt_logprobs[{position}] is a {type(entry).__name__}, not a dict")
        value = entry.get(str(token), entry.get(token))
        if value is None:
            raise PPLResponseError(f"prompt_logprobs[{position}] has no entry for the prompt token {token} "
                                   f"(keys: {list(entry)[:5]})")
        logprob = value.get("logprob") if isinstance(value, dict) else value
        if not isinstance(logprob, (int, float)) or isinstance(logprob, bool) or math.isnan(logprob):
            raise PPLResponseError(f"prompt_logprobs[{position}][{token}] has no numeric logprob: {value!r}")
        out.append(float(logprob))
    return out


def perplexity(logprobs: Sequence[float]) -> float:
    """exp(-mean logprob) over the scored tokens."""
    if not logprobs:
        raise ValueError("perplexity of no tokens")
    return math.exp(-math.fsum(logprobs) / len(logprobs))


# ---------------------------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------------------------

def read_wikitext(path: str | Path, detokenize: bool = False, max_chars: int | None = None) -> str:
    """A wikitext-2 split as one string, as the file has it (the tokenized v1 form keeps `<unk>` and the
    ` @-@ ` number/hyphen markers; card 002 scored the raw variant, which has neither)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ppl corpus: {path} does not exist (a wikitext-2 split, e.g. test.txt)")
    text = path.read_text(encoding="utf-8")
    text = text[:max_chars] if max_chars else text
    return detokenize_wikitext(text) if detokenize else text


_WT_RULES = [  # the tokenized form's spacing, undone: "1 @,@ 000" → "1,000", "word , word" → "word, word"
    (re.compile(r" @([-,.])@ "), r"\1"),
    (re.compile(r" ([.,;:!?)\]}])"), r"\1"),
    (re.compile(r"([(\[{]) "), r"\1"),
    (re.compile(r" (n't|'s|'re|'ve|'ll|'m|'d)\b"), r"\1"),
    (re.compile(r"^ +| +$", re.MULTILINE), ""),
]


def detokenize_wikitext(text: str) -> str:
    """An approximation of the raw form (the spacing rules, not `<unk>`, which the v1 form lost for good)."""
    for pattern, replacement in _WT_RULES:
        text = pattern.sub(replacement, text)
    return text


def tokenize(text: str, tokenizer: Any) -> list[int]:
    """Token ids of `text` without special tokens; `tokenizer` is a transformers tokenizer or a folder/hub id."""
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


# ---------------------------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------------------------

def _post(server: dict[str, Any], body: dict[str, Any], timeout_s: float) -> tuple[int, Any]:
    """(HTTP status, parsed JSON or error text). No answer: ServerDied if the server died, else RequestFailed."""
    return client.post(server, "/completions", body, timeout_s)


def _request(server: dict[str, Any], token_ids: Sequence[int]) -> dict[str, Any]:
    return {"model": server["model"], "prompt": list(token_ids), "max_tokens": 1, "temperature": 0,
            "prompt_logprobs": 0}


def _prompt_logprobs(response: Any) -> Any:
    """choices[0].prompt_logprobs (completions), or the top-level field (chat responses carry it there)."""
    if not isinstance(response, dict):
        return None
    choices = response.get("choices") or [{}]
    found = choices[0].get("prompt_logprobs") if isinstance(choices[0], dict) else None
    return found if found is not None else response.get("prompt_logprobs")


def probe_prompt_logprobs(server: dict[str, Any], token_ids: Sequence[int], timeout_s: float = 120.0) -> None:
    """One small request in the real shape; PPLNotSupported when the engine rejects the request (a 4xx: it
    does not accept token-id prompts or the prompt_logprobs field — transformers serve answers 422) or answers
    without prompt_logprobs. A 5xx or a dead server is a real failure, raised as such."""
    status, body = _post(server, _request(server, token_ids), timeout_s)
    engine = server.get("engine", "the")
    if 400 <= status < 500:
        raise PPLNotSupported(f"{engine} engine at {server['base_url']} rejected a prompt_logprobs request "
                              f"(HTTP {status}: {str(body)[:300]}); perplexity needs vLLM's prompt_logprobs")
    if status >= 300:
        raise RequestFailed(f"{server['base_url']}/completions answered HTTP {status}: {str(body)[:300]}")
    if _prompt_logprobs(body) is None:
        raise PPLNotSupported(f"{engine} engine at {server['base_url']} does not return prompt_logprobs "
                              f"(the field is absent from its /v1/completions answer)")
    token_logprobs(_prompt_logprobs(body), token_ids)  # the shape is readable, or PPLResponseError now


def score_window(server: dict[str, Any], token_ids: Sequence[int], timeout_s: float = 600.0) -> list[float | None]:
    """Per-token logprobs of one window (None for its first token)."""
    status, body = _post(server, _request(server, token_ids), timeout_s)
    if status != 200:
        raise RequestFailed(f"{server['base_url']}/completions answered HTTP {status} for a {len(token_ids)}-token "
                            f"window: {str(body)[:300]}")
    found = _prompt_logprobs(body)
    if found is None:
        raise PPLNotSupported(f"{server['base_url']} answered a window without prompt_logprobs")
    return token_logprobs(found, token_ids)


def server_perplexity(server: dict[str, Any], token_ids: Sequence[int], window_tokens: int = 2048,
                      stride: int | None = None, max_windows: int | None = None, concurrency: int = 4,
                      timeout_s: float = 600.0) -> PPLResult:
    """Perplexity of `token_ids` on the server (a serve-stage record: base_url and model, plus pid to tell a
    dead server from a refused request). Probes first, so an engine without prompt_logprobs costs one small
    request, not a corpus."""
    t0 = time.monotonic()
    windows = plan_windows(len(token_ids), window_tokens, stride, max_windows)
    if not windows:
        raise ValueError(f"ppl: the corpus has {len(token_ids)} token(s); at least 2 are needed")
    probe_prompt_logprobs(server, token_ids[: min(8, len(token_ids))], min(timeout_s, 120.0))

    def scored(window: Window) -> list[float]:
        logprobs = score_window(server, token_ids[window.start:window.end], timeout_s)
        return [lp for lp in logprobs[window.score_from - window.start:] if lp is not None]

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        per_window = list(pool.map(scored, windows))  # in window order, whatever order they finish in
    logprobs = [lp for window in per_window for lp in window]
    mean_nll = -math.fsum(logprobs) / len(logprobs)
    return PPLResult(
        ppl=math.exp(mean_nll), mean_nll=mean_nll, scored_tokens=len(logprobs), windows=len(windows),
        corpus_tokens=len(token_ids), truncated=windows[-1].end < len(token_ids), window_tokens=window_tokens,
        stride=window_tokens - 1 if stride is None else stride,
        clamped_tokens=sum(1 for lp in logprobs if lp <= CLAMPED_LOGPROB),
        duration_s=round(time.monotonic() - t0, 3))


def corpus_perplexity(server: dict[str, Any], corpus_path: str | Path, tokenizer: Any,
                      cfg: PPLConfig | None = None) -> PPLResult:
    """read_wikitext → tokenize (with the checkpoint's tokenizer) → server_perplexity."""
    cfg = cfg or PPLConfig()
    ids = tokenize(read_wikitext(corpus_path, detokenize=cfg.detokenize), tokenizer)
    return server_perplexity(server, ids, cfg.window_tokens, cfg.stride, cfg.max_windows, cfg.concurrency,
                             cfg.timeout_s)


HF_PREFIX = "hf:"  # --data hf:<dataset>/<config>/<split>, e.g. hf:wikitext/wikitext-2-raw-v1/test
TOKENIZATION = "the served checkpoint's tokenizer, the whole text at once, no special tokens"


def load_hf_text(spec: str) -> str:
    """The text of a dataset split from the local HF datasets cache (offline: nothing is fetched at run time),
    rows joined as wikitext's own files are. A clear error says how to get it when it is missing."""
    name, config, split = (spec[len(HF_PREFIX):].split("/") + ["", "", ""])[:3]
    if not (name and config and split):
        raise ValueError(f"--data {spec!r}: write hf:<dataset>/<config>/<split>, e.g. hf:wikitext/wikitext-2-raw-v1/test")
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets

        rows = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - the cache miss comes as several exception types
        raise ValueError(
            f"--data {spec}: {name} ({config}, {split} split) is not in the local HF datasets cache "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). Fetch it once on a machine with network: "
            f"python -c \"import datasets; datasets.load_dataset('{name}', '{config}', split='{split}')\" "
            f"(then copy ~/.cache/huggingface/datasets), or give --data a local text file") from None
    return "".join(rows["text"])


def run(ev: dict[str, Any], server: dict[str, Any], out_dir: Path | None = None) -> dict[str, Any]:
    """Token-level perplexity through vLLM's prompt_logprobs (card 002's method), as an eval record.

    args: --data (a text file; `hf:<dataset>/<config>/<split>` from the local HF datasets cache, e.g.
    hf:wikitext/wikitext-2-raw-v1/test; `m3lab:filler` = 400 sentences of m3lab's own needle filler, the text the
    tiny model was trained on), --window-tokens, --stride (default window - 1), --max-windows, --detokenize
    (wikitext's tokenized v1 spacing). The record says how the text was tokenized, windowed and strided."""
    from transformers import AutoTokenizer

    args = ev["args"]
    data = str(args.get("--data", ""))
    try:
        if data == "m3lab:filler":
            corpus = needle.filler_text(400, seed=ev["seeds"][0] if ev["seeds"] else 0)
        elif data.startswith(HF_PREFIX):
            corpus = load_hf_text(data)
        elif Path(data).is_file():
            corpus = read_wikitext(data, detokenize=bool(args.get("--detokenize")))
        else:
            raise ValueError(f"--data {data!r}: no such file")
    except ValueError as e:
        return {"id": ev["id"], "status": "not run", "reason": str(e)}
    tok = AutoTokenizer.from_pretrained(server["model_dir"])
    window = int(args.get("--window-tokens", 2048))
    stride = int(args["--stride"]) if args.get("--stride") is not None else None
    protocol = {"data": data, "tokenization": TOKENIZATION, "tokenizer": server["model_dir"],
                "window_tokens": window, "stride": stride if stride is not None else window - 1,
                "detokenize": bool(args.get("--detokenize"))}
    try:
        r = server_perplexity(server, tokenize(corpus, tok), window, stride, max_windows=args.get("--max-windows"))
    except PPLNotSupported as e:
        return {"id": ev["id"], "status": "not run", "reason": str(e), "protocol": protocol}
    except RequestFailed as e:  # the server is alive but refused (e.g. vLLM could not serialize a NaN logprob)
        return {"id": ev["id"], "status": "failed", "reason": str(e), "protocol": protocol}
    return {"id": ev["id"], "status": "ok", "runner": ev["runner"], "score": r.ppl, **asdict(r),
            "protocol": protocol}


def plan_lines(ev: dict[str, Any], server: dict[str, Any]) -> list[str]:
    a = ev.get("args") or {}
    window = int(a.get("--window-tokens", 2048))
    stride = a.get("--stride") if a.get("--stride") is not None else window - 1
    return [f"perplexity of {a.get('--data')} through /v1/completions prompt_logprobs, windows of {window} tokens, "
            f"stride {stride} (max {a.get('--max-windows')}); {TOKENIZATION}"]
