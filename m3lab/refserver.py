"""m3lab's reference engine: a small OpenAI-compatible `/v1/completions` server over a transformers model.

    python -m m3lab.refserver MODEL_DIR --host 127.0.0.1 --port 8000 [--served-model-name m3]
        [--dtype auto|bfloat16|float32] [--threads N] [--allow-nonlocal-host]

What it is for: the measurements m3lab makes through vLLM's extensions, on a machine where vLLM cannot run (a
2-core CPU). `transformers serve` ignores `logprobs` and refuses `prompt_logprobs`, so on CPU there was no way
to check teacher-forced parity (server prompt logprobs against offline transformers), perplexity through
prompt_logprobs (card 002's method, m3lab.evals.ppl), or NaN in logprobs. This server computes real numbers with
the real model: `AutoModelForCausalLM` forward passes, the transformers KV cache (`past_key_values`) token by
token, so a stream is a real stream and a greedy answer is `model.generate(do_sample=False)`'s.

What it is not: a performance engine. One model forward runs at a time (a lock; concurrent requests queue, as in
`transformers serve` without continuous batching), there is no batching, no prefix cache, and n = 1 only.
/health and /v1/models answer while a request generates. Benchmark numbers measured against it say nothing
about vLLM.

vLLM behaviours copied on purpose (vLLM 0.25.1, vllm/entrypoints/openai):
  - `prompt_logprobs: k` → `choices[0].prompt_logprobs` = [null, {"<id>": {"logprob", "rank", "decoded_token"},
    …}, …]: one entry per prompt token, the first null, each holding the prompt token itself (its rank among
    all tokens, 1 = likeliest) plus the top-k alternatives; -inf is clamped to -9999.0 (clamp_prompt_logprobs;
    the generated tokens' `logprobs` likewise).
  - A NaN or inf logprob in the answer is HTTP 400 "Out of range float values are not JSON compliant: nan"
    (vLLM fails to serialize it); greedy over NaN logits without logprobs picks torch's argmax (token 0 for an
    all-NaN row), as vLLM's sampler does.
  - Logprobs are the raw model's (log_softmax of the logits before temperature, top-k, top-p, min_tokens);
    sampling is vLLM's: temperature (below 1e-5 is greedy), then top-k, then top-p, then an exponential race
    (argmax(probs / q)).
  - The sampling extensions `ignore_eos`, `min_tokens` (EOS and stop_token_ids blocked, stop strings not
    checked before it), `stop_token_ids`, `include_stop_str_in_output`, `skip_special_tokens`,
    `add_special_tokens`, `return_token_ids`; stop strings are cut from the text; the EOS or stop token that
    ends a completion is counted but not detokenized.
  - Errors are {"error": {"message", "type", "param", "code"}}; a wrong `model` is 404 NotFoundError.
  - Streaming: one `data: {…}` chunk per generated token (text may be "" while a character or a possible stop
    string is incomplete), the last one with finish_reason, then with `stream_options.include_usage` a chunk
    with `choices: []` and usage, then `data: [DONE]`.
Fields outside the protocol are accepted and ignored (named in the request's log line); sampling fields it does
not implement (penalties, logit_bias, min_p, best_of > 1, beam search, suffix, echo) are refused with a 400 when
they would change the answer, never silently dropped.
"""

from __future__ import annotations

import argparse
import http.server
import json
import math
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from m3lab.transport import is_loopback

__all__ = ["STARTUP_PREFIX", "RequestError", "Engine", "parse_request", "main"]

STARTUP_PREFIX = "m3lab.refserver ready "  # then one JSON object: what m3lab.engines.reference reads back
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
CLAMPED_LOGPROB = -9999.0  # vLLM's stand-in for a -inf logprob
MAX_BODY_BYTES = 64 << 20
SAMPLING_EPS = 1e-5  # vLLM: a temperature below it is greedy

# Fields of vLLM's CompletionRequest this server reads; any other field is ignored (and logged).
KNOWN_FIELDS = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
    "ignore_eos", "min_tokens", "logprobs", "prompt_logprobs", "echo", "stream", "stream_options", "n",
    "skip_special_tokens", "add_special_tokens", "include_stop_str_in_output", "return_token_ids", "user",
    # refused unless neutral:
    "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "logit_bias", "best_of",
    "use_beam_search", "suffix",
}
_NEUTRAL = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "repetition_penalty": (1, 1.0),
            "min_p": (0, 0.0), "best_of": (1,), "use_beam_search": (False,)}


class RequestError(Exception):
    """A request this server answers with an error status (the OpenAI error object)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status, self.param, self.kind = status, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.status}}


# ---------------------------------------------------------------------------------------------------------------
# The request
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Request:
    model: str
    prompt: str | list[int]
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    stream: bool = False
    include_usage: bool = False
    skip_special_tokens: bool = True
    add_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False
    ignored: list[str] = field(default_factory=list)  # fields outside the protocol
    prompt_ids: list[int] = field(default_factory=list)  # filled by the engine


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise RequestError(f"{name}: expected a boolean, got {_type_name(v)} {v!r}", param=name)
    return v


def _int(body: dict, name: str, default: int | None, minimum: int | None = None,
         maximum: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)  # 16.0, as pydantic's lax mode takes it
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"{name}: expected an integer, got {_type_name(v)} {v!r}", param=name)
    if minimum is not None and v < minimum:
        raise RequestError(f"{name}: must be at least {minimum}, got {v}", param=name)
    if maximum is not None and v > maximum:
        raise RequestError(f"{name}: must be at most {maximum}, got {v}", param=name)
    return v


def _float(body: dict, name: str, default: float, minimum: float | None = None,
           maximum: float | None = None, open_min: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RequestError(f"{name}: expected a number, got {_type_name(v)} {v!r}", param=name)
    v = float(v)
    if not math.isfinite(v):
        raise RequestError(f"{name}: must be a finite number, got {v!r}", param=name)
    if minimum is not None and (v <= minimum if open_min else v < minimum):
        raise RequestError(f"{name}: must be {'greater than' if open_min else 'at least'} {minimum:g}, got {v:g}",
                           param=name)
    if maximum is not None and v > maximum:
        raise RequestError(f"{name}: must be at most {maximum:g}, got {v:g}", param=name)
    return v


def _prompt(body: dict) -> str | list[int]:
    if "prompt" not in body or body["prompt"] is None:
        raise RequestError("prompt: required (a string or a list of token ids)", param="prompt")
    p = body["prompt"]
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a one-element batch
    if isinstance(p, str):
        if not p:
            raise RequestError("prompt: must not be empty", param="prompt")
        return p
    if isinstance(p, list):
        if not p:
            raise RequestError("prompt: must not be empty", param="prompt")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return list(p)
        if all(isinstance(t, (str, list)) for t in p):
            raise RequestError(f"prompt: a batch of {len(p)} prompts; this server takes one prompt per request",
                               param="prompt")
    raise RequestError(f"prompt: expected a string, a list of token ids, or a one-element list of either; got "
                       f"{_type_name(p)} {json.dumps(p)[:80]}", param="prompt")


def parse_request(body: Any) -> Request:
    """The body of POST /v1/completions, checked field by field (a RequestError names the field)."""
    if not isinstance(body, dict):
        raise RequestError(f"request body: expected a JSON object, got {_type_name(body)}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(f"model: expected a string, got {_type_name(model)} {model!r}", param="model")
    req = Request(model=model or "", prompt=_prompt(body))
    req.max_tokens = _int(body, "max_tokens", 16, minimum=1)
    req.temperature = _float(body, "temperature", 0.0, minimum=0.0)
    req.top_p = _float(body, "top_p", 1.0, minimum=0.0, maximum=1.0, open_min=True)
    req.top_k = _int(body, "top_k", -1, minimum=-1)
    req.seed = _int(body, "seed", None, minimum=-(2 ** 63), maximum=2 ** 64 - 1)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise RequestError(f"stop: expected a string or a list of strings, got {json.dumps(stop)[:80]}", param="stop")
    req.stop = [s for s in (stop or []) if s]  # an empty string would match everywhere: it is no stop
    ids = body.get("stop_token_ids")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                                              and t >= 0 for t in ids)):
        raise RequestError(f"stop_token_ids: expected a list of non-negative integers, got {json.dumps(ids)[:80]}",
                           param="stop_token_ids")
    req.stop_token_ids = list(ids or [])
    req.ignore_eos = _bool(body, "ignore_eos", False)
    req.min_tokens = _int(body, "min_tokens", 0, minimum=0)
    if req.min_tokens > req.max_tokens:
        raise RequestError(f"min_tokens: must be at most max_tokens ({req.max_tokens}), got {req.min_tokens}",
                           param="min_tokens")
    for name in ("logprobs", "prompt_logprobs"):
        k = _int(body, name, None, minimum=0)
        if k is not None and k > MAX_LOGPROBS:
            raise RequestError(f"{name}: requested {k}, more than the maximum allowed {MAX_LOGPROBS}", param=name)
        setattr(req, name, k)
    if _bool(body, "echo", False):
        raise RequestError("echo: only false is supported by m3lab.refserver", param="echo")
    req.stream = _bool(body, "stream", False)
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise RequestError(f"stream_options: expected an object, got {_type_name(opts)}", param="stream_options")
        if not req.stream:
            raise RequestError("stream_options: can only be given when stream is true", param="stream_options")
        req.include_usage = _bool(opts, "include_usage", False)
    n = _int(body, "n", 1, minimum=1)
    if n != 1:
        raise RequestError(f"n: only n=1 is supported by m3lab.refserver, got {n}", param="n")
    req.skip_special_tokens = _bool(body, "skip_special_tokens", True)
    req.add_special_tokens = _bool(body, "add_special_tokens", True)
    req.include_stop_str_in_output = _bool(body, "include_stop_str_in_output", False)
    req.return_token_ids = _bool(body, "return_token_ids", False)
    for name, neutral in _NEUTRAL.items():
        if body.get(name) is not None and body[name] not in neutral:
            raise RequestError(f"{name}: {body[name]!r} is not supported by m3lab.refserver (only {neutral[0]!r})",
                               param=name)
    if body.get("logit_bias"):
        raise RequestError("logit_bias: not supported by m3lab.refserver", param="logit_bias")
    if body.get("suffix"):
        raise RequestError("suffix: not supported", param="suffix")
    req.ignored = sorted(k for k in body if k not in KNOWN_FIELDS)
    return req


def _nonfinite(obj: Any) -> float | None:
    """The first NaN or infinity anywhere in a JSON-bound object."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else obj
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for x in items:
        if (bad := _nonfinite(x)) is not None:
            return bad
    return None


def dumps(obj: Any) -> bytes:
    """Strict JSON; a NaN or inf is vLLM's 400 (its serializer's message, as Python 3.13 words it)."""
    if (bad := _nonfinite(obj)) is not None:
        raise RequestError(f"Out of range float values are not JSON compliant: {bad!r}")
    return json.dumps(obj, allow_nan=False, ensure_ascii=False).encode()


# ---------------------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Token:
    """One generated token as the answer reports it."""
    id: int
    delta: str  # text to emit with it (may be "")
    logprobs: dict[str, Any] | None  # {"token", "logprob", "top"} when logprobs were asked for
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ClientGone(Exception):
    """The client closed the connection mid-stream: generation stops."""


class Engine:
    """The model, its tokenizer and the one-forward-at-a-time lock."""

    def __init__(self, model_dir: str, dtype: str = "auto", threads: int | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.threads = threads
        if threads:
            torch.set_num_threads(threads)
        torch_dtype = {"auto": "auto", "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
        cfg = self.model.config
        limit = getattr(cfg, "max_position_embeddings", None)
        if limit is None and getattr(cfg, "text_config", None) is not None:
            limit = getattr(cfg.text_config, "max_position_embeddings", None)
        if limit is None:
            raise SystemExit(f"m3lab.refserver: {model_dir}/config.json states no max_position_embeddings")
        self.max_model_len = int(limit)
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        eos: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.tokenizer):
            v = getattr(src, "eos_token_id", None) if src is not None else None
            eos |= set(v if isinstance(v, (list, tuple)) else [] if v is None else [v])
        self.eos_ids = sorted(eos)
        self.dtype = str(self.model.dtype).removeprefix("torch.")
        self.lock = threading.Lock()
        self._piece_cache: dict[int, str] = {}

    # -- text --------------------------------------------------------------------------------------------------
    def piece(self, token_id: int) -> str:
        """One token's own text (the logprobs' `tokens` / `decoded_token`)."""
        s = self._piece_cache.get(token_id)
        if s is None:
            s = self._piece_cache[token_id] = self.tokenizer.decode([token_id])
        return s

    def tokenize(self, req: Request) -> list[int]:
        if isinstance(req.prompt, str):
            ids = list(self.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"])
            if not ids:
                raise RequestError("prompt: tokenizes to no tokens", param="prompt")
        else:
            ids = req.prompt
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise RequestError(f"prompt: token id {bad} is outside the vocabulary [0, {self.vocab_size})",
                                   param="prompt")
        bad = next((t for t in req.stop_token_ids if t >= self.vocab_size), None)
        if bad is not None:
            raise RequestError(f"stop_token_ids: token id {bad} is outside the vocabulary [0, {self.vocab_size})",
                               param="stop_token_ids")
        if len(ids) + req.max_tokens > self.max_model_len:
            raise RequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) = {len(ids) + req.max_tokens} tokens "
                f"exceeds this model's maximum context length of {self.max_model_len} tokens "
                f"(max_position_embeddings); shorten the prompt or lower max_tokens",
                param="prompt" if len(ids) >= self.max_model_len else "max_tokens")
        return ids

    # -- numbers -----------------------------------------------------------------------------------------------
    def prompt_logprobs(self, logits: Any, ids: list[int], k: int) -> list[dict[str, Any] | None]:
        """vLLM's prompt_logprobs from the prompt's own forward pass: position i > 0 is scored by logits[i-1]."""
        torch = self.torch
        lp = logits[:-1].float().log_softmax(-1)  # [T-1, V]
        target = torch.tensor(ids[1:], dtype=torch.long)
        chosen = lp.gather(1, target[:, None]).squeeze(1)
        ranks = ((lp > chosen[:, None]).sum(1) + 1).tolist()
        chosen = chosen.tolist()
        top_v, top_i = (lp.topk(k, dim=-1) if k else (None, None))
        top_v = top_v.tolist() if k else None
        top_i = top_i.tolist() if k else None

        def entry(logprob: float, rank: int, token: int) -> dict[str, Any]:
            return {"logprob": CLAMPED_LOGPROB if logprob == -math.inf else logprob, "rank": rank,
                    "decoded_token": self.piece(token)}

        out: list[dict[str, Any] | None] = [None]
        for pos, token in enumerate(ids[1:]):
            d = {str(token): entry(chosen[pos], ranks[pos], token)}
            for r in range(k):
                alt = top_i[pos][r]
                if str(alt) not in d:
                    d[str(alt)] = entry(top_v[pos][r], r + 1, alt)
            out.append(d)
        return out

    def _pick(self, logits: Any, req: Request, step: int, gen: Any) -> tuple[int, dict[str, Any] | None]:
        torch = self.torch
        raw = logits.float()
        x = raw
        blocked: list[int] = []
        if step < req.min_tokens:  # vLLM's min_tokens: EOS (unless ignored) and stop_token_ids cannot come yet
            blocked = sorted(set(req.stop_token_ids) | (set() if req.ignore_eos else set(self.eos_ids)))
        if blocked:
            x = x.clone()
            x[blocked] = -math.inf
        if req.temperature < SAMPLING_EPS:
            token = int(x.argmax())  # NaN rows: torch's argmax (the first NaN; 0 for an all-NaN row)
        else:
            x = x / req.temperature
            if req.top_k > 0 or req.top_p < 1.0:
                x = _top_k_top_p(torch, x, req.top_k, req.top_p)
            probs = x.softmax(-1)
            q = torch.empty_like(probs).exponential_(generator=gen)
            token = int((probs / q).argmax())
        info = None
        if req.logprobs is not None:
            lp = raw.log_softmax(-1)
            top = []
            if req.logprobs:
                v, i = lp.topk(req.logprobs)
                top = list(zip(i.tolist(), v.tolist()))
            info = {"token": token, "logprob": float(lp[token]), "top": top}
        return token, info

    def complete(self, req: Request, on_prompt: Callable[[list | None], None],
                 on_token: Callable[[Token], None]) -> tuple[int, str, str | None, str | int | None]:
        """Generate for `req` (its prompt_ids set). Calls on_prompt(prompt_logprobs or None) once, then
        on_token for each token, in order. Returns (completion tokens, text, finish_reason, stop_reason)."""
        torch = self.torch
        ids = req.prompt_ids
        stop_ids = set(req.stop_token_ids) | (set() if req.ignore_eos else set(self.eos_ids))
        max_stop = max((len(s) for s in req.stop), default=0)
        gen = None
        if req.temperature >= SAMPLING_EPS:
            gen = torch.Generator()
            if req.seed is None:
                gen.seed()
            else:
                gen.manual_seed(req.seed % 2 ** 64)
        with self.lock, torch.inference_mode():
            if self.threads:
                torch.set_num_threads(self.threads)  # OpenMP's count is per thread: set it in this one
            want_prompt = req.prompt_logprobs is not None
            out = self.model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=0 if want_prompt else 1)
            cache = out.past_key_values
            on_prompt(self.prompt_logprobs(out.logits[0], ids, req.prompt_logprobs) if want_prompt else None)
            last = out.logits[0, -1]
            generated: list[int] = []
            text, sent = "", 0
            finish: str | None = None
            stop_reason: str | int | None = None
            for step in range(req.max_tokens):
                token, info = self._pick(last, req, step, gen)
                generated.append(token)
                shown = generated
                if token in stop_ids and step >= req.min_tokens:
                    finish = "stop"
                    stop_reason = None if token in self.eos_ids and token not in req.stop_token_ids else token
                    shown = generated[:-1]  # the token that ends it is counted, not detokenized (vLLM)
                before, text = len(text), self.tokenizer.decode(shown, skip_special_tokens=req.skip_special_tokens)
                if req.stop and len(generated) > req.min_tokens:
                    # only where the new text could complete one (vLLM's check_stop_strings): a stop string
                    # written while min_tokens held the check off stays in the text
                    hits = [(i, s) for s in req.stop if (i := text.find(s, max(0, before - len(s) + 1))) >= 0]
                    if hits:
                        i, s = min(hits)
                        text = text[: i + len(s)] if req.include_stop_str_in_output else text[:i]
                        finish, stop_reason = "stop", s
                if finish is None and step == req.max_tokens - 1:
                    finish = "length"
                if finish is not None:
                    upto = len(text)
                else:  # hold back an incomplete character, and what may yet grow into a stop string
                    upto = len(text.rstrip("\ufffd"))
                    if max_stop:
                        upto = min(upto, len(text) - (max_stop - 1))
                delta = text[sent:max(sent, upto)]
                sent += len(delta)
                on_token(Token(token, delta, info, finish, stop_reason))
                if finish is not None:
                    break
                out = self.model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                last = out.logits[0, -1]
        return len(generated), text, finish, stop_reason

    def legacy_logprobs(self, tokens: list[Token], start_offset: int = 0) -> dict[str, Any]:
        """OpenAI's legacy completions logprobs object for the generated tokens; -inf reads -9999.0 and NaN stays
        NaN (vLLM's `max(logprob, -9999.0)` in _create_completion_logprobs)."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = start_offset
        for t in tokens:
            info = t.logprobs
            piece = self.piece(t.id)
            out["tokens"].append(piece)
            out["token_logprobs"].append(max(info["logprob"], CLAMPED_LOGPROB))
            top = {self.piece(i): max(v, CLAMPED_LOGPROB) for i, v in info["top"]}
            top.setdefault(piece, max(info["logprob"], CLAMPED_LOGPROB))  # vLLM's dict holds the sampled token
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(piece)
        return out


def _top_k_top_p(torch: Any, logits: Any, k: int, p: float) -> Any:
    """vLLM's apply_top_k_top_p for one row: sort ascending, mask below the k-th largest, then the smallest
    tokens whose cumulative probability stays within 1 - p (the likeliest always kept)."""
    s, idx = logits.sort(descending=False)
    if k > 0 and k < s.numel():
        s = s.masked_fill(s < s[-k], -math.inf)
    if p < 1.0:
        mask = s.softmax(-1).cumsum(-1) <= 1 - p
        mask[-1] = False
        s = s.masked_fill(mask, -math.inf)
    return torch.empty_like(logits).scatter_(0, idx, s)


# ---------------------------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------------------------

def _log(line: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} m3lab.refserver: {line}", file=sys.stderr, flush=True)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "m3lab-refserver/1"
    server: "RefServer"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass  # one line per completion instead (see do_POST); health polls stay quiet

    # -- plumbing ----------------------------------------------------------------------------------------------
    def _send(self, status: int, payload: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _send_error(self, err: RequestError) -> None:
        self._send(err.status, json.dumps(err.body()).encode())

    def _chunk(self, data: bytes) -> None:
        try:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError) as e:
            raise ClientGone(str(e)) from None

    # -- GET ---------------------------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send(200, b"")
        elif path in ("/v1/models", "/models"):
            srv = self.server
            self._send(200, json.dumps({"object": "list", "data": [{
                "id": srv.served_name, "object": "model", "created": srv.started, "owned_by": "m3lab",
                "root": srv.model_dir, "parent": None, "max_model_len": srv.engine.max_model_len}]}).encode())
        else:
            self._send_error(RequestError(f"no route GET {path}", 404, kind="NotFoundError"))

    # -- POST --------------------------------------------------------------------------------------------------
    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        t0 = time.monotonic()
        self._headers_sent = False  # one handler serves every request of a kept-alive connection
        stats = {"prompt_tokens": 0, "completion_tokens": 0, "stream": False, "ignored": []}
        status = 200
        try:
            body = self._read_body()
            if path != "/v1/completions":
                raise RequestError(f"no route POST {path}; this server answers /v1/completions only", 404,
                                   kind="NotFoundError")
            status = self._complete(body, stats)
        except RequestError as e:
            status = e.status
            stats["error"] = str(e)
            if not self._headers_sent:
                self._send_error(e)
        except ClientGone:
            stats["error"] = "client closed the connection"
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a failed request must never take the server down
            traceback.print_exc(file=sys.stderr)
            status = 500
            stats["error"] = f"{type(e).__name__}: {e}"
            if not self._headers_sent:
                self._send_error(RequestError(f"{type(e).__name__}: {e}", 500, kind="InternalServerError"))
            self.close_connection = True
        extra = f" ignored={','.join(stats['ignored'])}" if stats["ignored"] else ""
        err = f" error={stats['error']!r}" if "error" in stats else ""
        _log(f"POST {path} {status} prompt_tokens={stats['prompt_tokens']} "
             f"completion_tokens={stats['completion_tokens']} seconds={time.monotonic() - t0:.3f} "
             f"stream={stats['stream']}{extra}{err}")

    def _read_body(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            self.close_connection = True
            raise RequestError("request body: a Content-Length header is required")
        n = int(length)
        if n > MAX_BODY_BYTES:
            self.close_connection = True
            raise RequestError(f"request body: {n} bytes is more than {MAX_BODY_BYTES}", 413)
        raw = self.rfile.read(n)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"request body: malformed JSON ({e})") from None

    def _complete(self, body: Any, stats: dict[str, Any]) -> int:
        srv = self.server
        engine = srv.engine
        req = parse_request(body)
        stats["ignored"], stats["stream"] = req.ignored, req.stream
        if req.model and req.model not in srv.model_names:
            raise RequestError(f"The model `{req.model}` does not exist.", 404, param="model", kind="NotFoundError")
        req.prompt_ids = engine.tokenize(req)
        stats["prompt_tokens"] = len(req.prompt_ids)
        rid, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), srv.served_name

        def usage(n: int) -> dict[str, Any]:
            return {"prompt_tokens": len(req.prompt_ids), "total_tokens": len(req.prompt_ids) + n,
                    "completion_tokens": n, "prompt_tokens_details": None}

        if not req.stream:
            prompt_lp: list = []
            tokens: list[Token] = []
            n, text, finish, stop_reason = engine.complete(req, prompt_lp.append, tokens.append)
            stats["completion_tokens"] = n
            choice = {"index": 0, "text": text,
                      "logprobs": engine.legacy_logprobs(tokens) if req.logprobs is not None else None,
                      "finish_reason": finish, "stop_reason": stop_reason,
                      "token_ids": [t.id for t in tokens] if req.return_token_ids else None,
                      "prompt_logprobs": prompt_lp[0],
                      "prompt_token_ids": req.prompt_ids if req.return_token_ids else None}
            self._send(200, dumps({"id": rid, "object": "text_completion", "created": created, "model": name,
                                   "choices": [choice], "service_tier": None, "system_fingerprint": None,
                                   "usage": usage(n), "kv_transfer_params": None}))
            return 200

        # Streaming: headers go out with the first chunk, so a first chunk that cannot be serialized (NaN prompt
        # logprobs) is still a plain HTTP 400; a later one becomes an error event, as vLLM sends them.
        pending: dict[str, Any] = {}
        offset = [0]

        def on_prompt(entries: list | None) -> None:
            if entries is not None:
                dumps(entries)  # a NaN here is the 400 before any byte is sent
                pending["prompt_logprobs"] = entries

        def emit(payload: bytes) -> None:
            if not self._headers_sent:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self._headers_sent = True
            self._chunk(b"data: " + payload + b"\n\n")

        def on_token(t: Token) -> None:
            choice: dict[str, Any] = {"index": 0, "text": t.delta, "logprobs": None,
                                      "finish_reason": t.finish_reason, "stop_reason": t.stop_reason}
            if req.logprobs is not None:
                choice["logprobs"] = engine.legacy_logprobs([t], offset[0])
                offset[0] += len(engine.piece(t.id))
            if req.return_token_ids:
                choice["token_ids"] = [t.id]
            if "prompt_logprobs" in pending:  # the first chunk carries them (vLLM)
                choice["prompt_logprobs"] = pending.pop("prompt_logprobs")
                if req.return_token_ids:
                    choice["prompt_token_ids"] = req.prompt_ids
            chunk = {"id": rid, "object": "text_completion", "created": created, "model": name,
                     "choices": [choice]}
            try:
                payload = dumps(chunk)
            except RequestError as e:
                if not self._headers_sent:
                    raise
                emit(json.dumps(e.body()).encode())
                emit(b"[DONE]")
                self._chunk(b"")
                raise
            stats["completion_tokens"] += 1
            emit(payload)

        n, _text, _finish, _stop = engine.complete(req, on_prompt, on_token)
        if req.include_usage:
            emit(dumps({"id": rid, "object": "text_completion", "created": created, "model": name,
                        "choices": [], "usage": usage(n)}))
        emit(b"[DONE]")
        self._chunk(b"")  # the chunked body's end
        return 200


class RefServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], engine: Engine, served_name: str, model_dir: str) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        self.engine, self.served_name, self.model_dir = engine, served_name, model_dir
        self.model_names = {served_name, model_dir, str(Path(model_dir).resolve())}
        self.started = int(time.time())


# ---------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m m3lab.refserver", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="a transformers checkpoint folder (AutoModelForCausalLM + AutoTokenizer)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the `model` requests name (default: MODEL_DIR)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", choices=["cpu"], default="cpu", help="CPU only (accepted so a `transformers "
                                                                     "serve` profile's --device cpu carries over)")
    p.add_argument("--allow-nonlocal-host", action="store_true",
                   help="bind a host beyond loopback (exposes the server to the network)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if not is_loopback(f"http://[{args.host}]/" if ":" in args.host else f"http://{args.host}/") \
            and not args.allow_nonlocal_host:
        print(f"m3lab.refserver: --host {args.host} binds beyond this machine's loopback; the reference server "
              f"listens on 127.0.0.1 unless --allow-nonlocal-host is given", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print(f"m3lab.refserver: --threads must be at least 1, got {args.threads}", file=sys.stderr)
        return 2
    if not (Path(args.model_dir) / "config.json").is_file():
        print(f"m3lab.refserver: {args.model_dir} has no config.json", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    engine = Engine(args.model_dir, args.dtype, args.threads)
    name = args.served_model_name or args.model_dir
    try:
        server = RefServer((args.host, args.port), engine, name, args.model_dir)
    except OSError as e:
        print(f"m3lab.refserver: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    facts = {"host": args.host, "port": server.server_address[1], "model_dir": args.model_dir,
             "served_model_name": name, "dtype": engine.dtype, "threads": engine.torch.get_num_threads(),
             "max_model_len": engine.max_model_len, "model_class": type(engine.model).__name__,
             "load_s": round(time.monotonic() - t0, 2)}
    print(STARTUP_PREFIX + json.dumps(facts), file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
