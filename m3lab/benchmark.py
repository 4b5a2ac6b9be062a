"""Async streaming load generator for an OpenAI-compatible /v1/completions server.

A much smaller cousin of vLLM's `vllm/benchmarks/serve.py` ("vllm bench serve"):
fixed-length random prompts, a closed-loop concurrency sweep, per-request timings
recorded from the SSE stream, and vLLM's metric names and units so numbers can be
compared side by side with published vLLM results.

The story of one run (`run_sweep(target, load)`):
  1. `target` is where the load goes, known only at run time: the serve stage's base_url, model name,
     tokenizer and engine. `load` is the params section `m3lab.params.Benchmark`, validated, the only
     declaration of every load setting and its default.
  2. For each concurrency level, in order, with fresh prompts (seeded by level, so a prefix cache
     cannot make later levels look faster):
     a. warm-up: warmup_factor × concurrency untimed requests at that concurrency, so at least one
        full batch has run before anything is timed (InferenceX warms with 2 × conc; first batches
        compile kernels and fill caches: on the H200 reference, one warm-up request per level left
        c=2 stalled 4.8 s). It is recorded on its own (`LevelResult.warmup`), never in the metrics;
     b. the timed part: num_prompts requests, at most `concurrency` in flight.
  3. With `crosscheck_vllm_bench` (vLLM only), `vllm bench serve` measures the same load at every level,
     with the same warm-up, and each of throughput, median TTFT and median TPOT is judged: the two
     clients agree within ±10%, or they disagree (`judge_crosscheck`). Only agreement at every level is
     "cross-checked".

Definitions (same as vLLM unless noted):
- TTFT  = arrival of the first chunk that carries text - send time.
- E2EL  = arrival of the last chunk that carries text - send time. (Like vLLM, the
          trailing usage-only / finish-only chunk and `[DONE]` do not count: they
          carry no token.)
- TPOT  = (E2EL - TTFT) / (output_tokens - 1), only for requests with > 1 output
          token; it averages away chunking.
- ITL   = gaps between consecutive text chunks, pooled over all requests. This is
          per *chunk*, not per token: a server that packs several tokens into one
          SSE event (vLLM with stream intervals / speculative decoding, or
          `transformers serve` when its queue backs up or its incremental detokenizer
          holds back a partial UTF-8 token) yields fewer, larger gaps, and events that
          arrive in the same network read get the same timestamp (gap 0). Compare
          ITL across servers with care; TPOT is the robust per-token number.
- Output tokens come from the server's `usage.completion_tokens` when it sends one
  (we always ask with `stream_options.include_usage`), else from tokenizing the
  generated text locally (may differ by a token or so); each record says which.
- duration_s is the wall time of the timed part of one concurrency level (warm-up
  excluded); throughputs divide by it. Statistics of an empty set are 0.0, as in
  vLLM, so the JSON stays strict (no NaN).

Exactly output_len tokens (`ignore_eos`) is asked for the engine's way, by its module's
`force_output_len` (m3lab.engines): vLLM takes `ignore_eos: true`; `transformers serve`
answers 422 to fields outside the OpenAI schema, so it gets a generation_config with
min_new_tokens; `mlx_lm.server` has neither and silently drops fields it does not know,
so its answers may end at EOS early, and the result says `output_len_forced: false`.

Server notes (transformers 5.17 `transformers serve`, checked against its source and a
live server): it streams one SSE event per decoded piece of text (a token, or nothing
while a multi-byte character is incomplete), ends with an empty-text chunk carrying
finish_reason and usage (always, `stream_options` is ignored) and sends no `[DONE]`;
and without `--continuous-batching` it generates one request at a time, so at
concurrency > 1 the extra requests queue inside the server and that wait shows up in
their TTFT.
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import csv
import json
import math
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Sequence

import aiohttp
import numpy as np

from m3lab.client import endpoint_url
from m3lab.params import Benchmark
from m3lab.procs import ensure_alive
from m3lab.registry import ENGINES
from m3lab.vllm_obs import metrics_delta, scrape_metrics, summarize_metrics

__all__ = [
    "run_stage",
    "vllm_bench_command",
    "crosscheck_with_vllm_bench",
    "judge_crosscheck",
    "CROSSCHECK_METRICS",
    "CROSSCHECK_REL_TOL",
    "Target",
    "RequestRecord",
    "BenchMetrics",
    "Warmup",
    "LevelResult",
    "SweepResult",
    "BenchmarkError",
    "SSEDecoder",
    "parse_completion_event",
    "compute_metrics",
    "make_prompts",
    "output_len_forced",
    "run_sweep",
    "run_sweep_async",
    "save_results",
]

# vLLM's default --metric-percentiles is "99"; we keep a few more for plots. BenchMetrics
# has one field per entry, so change both together.
_PERCENTILES: tuple[int, ...] = (50, 90, 99)
_LATENCY_METRICS: tuple[str, ...] = ("ttft", "tpot", "itl", "e2el")


class BenchmarkError(RuntimeError):
    """The benchmark could not produce a single successful request (server down, bad URL, ...)."""


# -----------------------------------------------------------------------------
# target and records (the load settings are m3lab.params.Benchmark)


@dataclass(frozen=True)
class Target:
    """Where the load goes: the running server, from the serve stage. Not a user setting."""

    base_url: str  # server root "http://127.0.0.1:8000" (a trailing "/v1" is tolerated)
    model: str  # value of the "model" field; transformers serve wants its exact force_model path
    tokenizer_dir: str  # builds prompts of exact token length and counts output tokens
    engine: str  # an m3lab.registry.ENGINES name: decides how ignore_eos is asked for
    endpoint: str = "/v1/completions"

    def __post_init__(self) -> None:
        ENGINES.get(self.engine)  # an unknown engine: an error that lists the registered ones
        if not self.endpoint.startswith("/"):
            raise ValueError(f"endpoint must start with '/', got {self.endpoint!r}")

    @property
    def url(self) -> str:
        return endpoint_url(self.base_url, self.endpoint)


@dataclass
class RequestRecord:
    """Everything observed for one request. Times are seconds since its batch started."""

    index: int
    prompt_len: int  # server's usage.prompt_tokens if given, else local count
    send_s: float = 0.0
    first_token_s: float | None = None
    chunk_s: list[float] = field(default_factory=list)  # arrival of each text-bearing chunk
    end_s: float | None = None  # arrival of the last text-bearing chunk (vLLM's latency end)
    generated_text: str = ""
    output_tokens: int = 0
    output_tokens_source: Literal["usage", "tokenizer", ""] = ""
    finish_reason: str | None = None
    success: bool = False
    error: str = ""

    @property
    def ttft_s(self) -> float:
        assert self.first_token_s is not None, f"request {self.index} has no first token"
        return self.first_token_s - self.send_s

    @property
    def e2el_s(self) -> float:
        assert self.end_s is not None, f"request {self.index} has no end time"
        return self.end_s - self.send_s

    @property
    def itl_s(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_s, self.chunk_s[1:])]


@dataclass
class BenchMetrics:
    """One concurrency level, flat, vLLM's names and units (ms for latencies)."""

    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    duration_s: float  # vLLM's result JSON calls this "duration"
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # (input + output tokens) / s
    mean_ttft_ms: float
    median_ttft_ms: float
    std_ttft_ms: float
    p50_ttft_ms: float
    p90_ttft_ms: float
    p99_ttft_ms: float
    mean_tpot_ms: float
    median_tpot_ms: float
    std_tpot_ms: float
    p50_tpot_ms: float
    p90_tpot_ms: float
    p99_tpot_ms: float
    mean_itl_ms: float
    median_itl_ms: float
    std_itl_ms: float
    p50_itl_ms: float
    p90_itl_ms: float
    p99_itl_ms: float
    mean_e2el_ms: float
    median_e2el_ms: float
    std_e2el_ms: float
    p50_e2el_ms: float
    p90_e2el_ms: float
    p99_e2el_ms: float


@dataclass
class Warmup:
    """A level's untimed warm-up, sent at the level's concurrency. Never part of its metrics."""

    count: int  # requests sent: warmup_factor × concurrency
    completed: int
    failed: int
    duration_s: float  # wall time of the whole warm-up
    e2el_ms: list[float]  # each completed request's end-to-end latency, in send order
    errors: list[str]  # each failed request's error

    @classmethod
    def of(cls, records: Sequence[RequestRecord], duration_s: float) -> "Warmup":
        ok = [r for r in records if r.success]
        return cls(count=len(records), completed=len(ok), failed=len(records) - len(ok),
                   duration_s=float(duration_s), e2el_ms=[r.e2el_s * 1000.0 for r in ok],
                   errors=[r.error for r in records if not r.success])


@dataclass
class LevelResult:
    concurrency: int
    metrics: BenchMetrics  # the timed part only
    records: list[RequestRecord]  # the timed part only
    warmup: Warmup
    timed_out: bool = False  # total_timeout_s ran out during this level


@dataclass
class SweepResult:
    target: Target
    load: Benchmark
    levels: list[LevelResult]
    output_len_forced: bool  # each answer was asked for exactly output_len tokens (see output_len_forced())
    timed_out: bool = False  # later levels were skipped

    def to_dict(self) -> dict[str, Any]:
        """JSON view: target, load, and per level the flat metrics (report/plot read them at the
        level's top level, like vLLM's result JSON), its warm-up, and the per-request records."""
        return {
            "target": asdict(self.target),
            "load": self.load.model_dump(mode="json"),
            "output_len_forced": self.output_len_forced,
            "timed_out": self.timed_out,
            "levels": [
                {
                    "concurrency": lv.concurrency,
                    **asdict(lv.metrics),
                    "timed_out": lv.timed_out,
                    "warmup": asdict(lv.warmup),
                    "requests": [asdict(r) for r in lv.records],
                }
                for lv in self.levels
            ],
        }

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per level: the CSV / DataFrame view."""
        return [{"concurrency": lv.concurrency, **asdict(lv.metrics)} for lv in self.levels]


# -----------------------------------------------------------------------------
# metric math (pure)


def _stats(values_s: Sequence[float], name: str) -> dict[str, float]:
    """mean/median/std/pXX in ms of a list in seconds; numpy's defaults like vLLM (linear
    interpolation percentiles, population std). Empty -> all 0.0, as vLLM does."""
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0
    if arr.size == 0:
        arr = np.zeros(1)
    out = {
        f"mean_{name}_ms": float(arr.mean()),
        f"median_{name}_ms": float(np.median(arr)),
        f"std_{name}_ms": float(arr.std()),
    }
    for p in _PERCENTILES:
        out[f"p{p}_{name}_ms"] = float(np.percentile(arr, p))
    return out


def compute_metrics(records: Sequence[RequestRecord], duration_s: float) -> BenchMetrics:
    """Per-request timings -> level metrics. Failed requests only count in `failed`."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s!r}")
    ok = [r for r in records if r.success]
    ttft = [r.ttft_s for r in ok]
    e2el = [r.e2el_s for r in ok]
    # TPOT is undefined for a 1-token answer (no decode step), so those are left out.
    tpot = [(r.e2el_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [gap for r in ok for gap in r.itl_s]
    n_in = sum(r.prompt_len for r in ok)
    n_out = sum(r.output_tokens for r in ok)
    values: dict[str, Any] = dict(
        completed=len(ok),
        failed=len(records) - len(ok),
        total_input_tokens=n_in,
        total_output_tokens=n_out,
        duration_s=float(duration_s),
        request_throughput=len(ok) / duration_s,
        output_throughput=n_out / duration_s,
        total_token_throughput=(n_in + n_out) / duration_s,
    )
    for name, vals in zip(_LATENCY_METRICS, (ttft, tpot, itl, e2el)):
        values.update(_stats(vals, name))
    return BenchMetrics(**values)


# -----------------------------------------------------------------------------
# SSE


class SSEDecoder:
    """Incremental Server-Sent-Events decoder: bytes in, complete `data:` payloads out.

    Network reads split events anywhere (even inside a UTF-8 character), so we buffer
    until the blank line that ends an event. Comments (":ping") and other fields
    (event:, id:, retry:) are dropped; multi-line data is joined with "\\n" per spec.
    """

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._buf = ""
        self._cr = ""  # a trailing "\r" may be the first half of a "\r\n" split across reads

    def feed(self, chunk: bytes) -> list[str]:
        text = self._cr + self._utf8.decode(chunk)
        self._cr = ""
        if text.endswith("\r"):
            text, self._cr = text[:-1], "\r"
        self._buf += text.replace("\r\n", "\n").replace("\r", "\n")
        out: list[str] = []
        while "\n\n" in self._buf:
            event, self._buf = self._buf.split("\n\n", 1)
            data = [line[5:].removeprefix(" ") for line in event.split("\n") if line.startswith("data:")]
            if data:
                out.append("\n".join(data))
        return out

    def flush(self) -> list[str]:
        """End of stream: a last event without its blank line still counts."""
        rest = self.feed(b"\n\n") if (self._buf + self._cr).strip() else []
        self._buf, self._cr = "", ""
        return rest


def parse_completion_event(payload: str) -> dict[str, Any]:
    """One SSE data payload of /v1/completions -> {"done", "text", "finish_reason", "usage", "error"}.

    `text` is None for events that carry no token: the final usage-only chunk (vLLM),
    the empty finish chunk (transformers serve), `[DONE]`, errors.
    """
    out: dict[str, Any] = {"done": False, "text": None, "finish_reason": None, "usage": None, "error": None}
    if payload.strip() == "[DONE]":
        out["done"] = True
        return out
    data = json.loads(payload)
    if "error" in data:  # both servers report mid-stream failures this way
        err = data["error"]
        out["error"] = err.get("message", json.dumps(err)) if isinstance(err, dict) else str(err)
        return out
    out["usage"] = data.get("usage")
    choices = data.get("choices") or []
    if choices:
        choice = choices[0]
        text = choice.get("text")
        if text is None:  # chat-style delta, in case someone points us at chat/completions
            text = (choice.get("delta") or {}).get("content")
        out["finish_reason"] = choice.get("finish_reason")
        # An empty string mid-stream is a real token that decoded to nothing (vLLM does
        # this for special tokens); an empty string together with finish_reason/usage
        # is just the closing bookkeeping chunk.
        if text or (text == "" and out["finish_reason"] is None and out["usage"] is None):
            out["text"] = text
    return out


# -----------------------------------------------------------------------------
# prompts


def _load_tokenizer(tokenizer_dir: str):
    from transformers import AutoTokenizer  # heavy import; keep module import cheap

    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception as e:  # noqa: BLE001 - re-raise with the key that pointed at it
        raise ValueError(f"tokenizer_dir={tokenizer_dir!r}: cannot load a tokenizer ({e})") from e


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _clean_vocab(tokenizer) -> list[int]:
    """Ids that decode on their own to printable text. Byte-level BPE has tokens that are
    half a UTF-8 character; sampled alone they decode to U+FFFD and never re-encode to
    the same length, so we leave them (and special tokens) out."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=True)
    vocab = [i for i, t in zip(ids, texts) if t.strip() and "\ufffd" not in t and t.isprintable()]
    if not vocab:
        raise ValueError("tokenizer has no printable non-special tokens to sample prompts from")
    return vocab


def make_prompts(
    tokenizer, n: int, input_len: int, seed: int, vocab: list[int] | None = None
) -> list[tuple[str, int]]:
    """n prompts of ~input_len tokens from random vocabulary ids (like vLLM's "random" dataset).

    decode(ids) does not re-encode to the same ids (merges across the joins), so we
    re-encode, cut or pad, and repeat until the text is exactly input_len tokens, or
    take the closest after a few rounds. Returns (prompt, token_count) pairs.
    Pass `vocab` (from a previous call's `_clean_vocab`) to skip re-scanning a big vocabulary.
    """
    rng = random.Random(seed)
    vocab = vocab if vocab is not None else _clean_vocab(tokenizer)
    prompts: list[tuple[str, int]] = []
    for _ in range(n):
        ids = [rng.choice(vocab) for _ in range(input_len)]
        best: tuple[str, int] | None = None
        for _attempt in range(10):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            got = tokenizer(text, add_special_tokens=False)["input_ids"]
            if best is None or abs(len(got) - input_len) < abs(best[1] - input_len):
                best = (text, len(got))
            if len(got) == input_len:
                break
            ids = got[:input_len] + [rng.choice(vocab) for _ in range(input_len - len(got))]
        assert best is not None
        prompts.append(best)
    return prompts


# -----------------------------------------------------------------------------
# one request


def output_len_forced(target: Target, load: Benchmark) -> bool:
    """Whether requests ask for exactly output_len tokens: ignore_eos is on and the engine has a way to ask."""
    return load.ignore_eos and ENGINES.load(target.engine).force_output_len({}, load.output_len) is not None


def _payload(target: Target, load: Benchmark, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": target.model,
        "prompt": prompt,
        "max_tokens": load.output_len,
        "temperature": load.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},  # transformers serve ignores it but always sends usage
    }
    if load.ignore_eos:
        body = ENGINES.load(target.engine).force_output_len(body, load.output_len) or body
    return body


async def _send(
    session: aiohttp.ClientSession,
    target: Target,
    load: Benchmark,
    tokenizer,
    rec: RequestRecord,
    prompt: str,
    t0: float,
) -> RequestRecord:
    """Stream one completion into `rec`. Never raises except on cancellation."""
    dec = SSEDecoder()
    texts: list[str] = []
    usage: dict[str, Any] | None = None
    timeout = aiohttp.ClientTimeout(total=load.request_timeout_s)
    url = target.url

    def handle(payload: str, now: float) -> bool:
        """Fold one SSE payload into rec; True when the stream is over."""
        nonlocal usage
        ev = parse_completion_event(payload)
        if ev["error"] is not None:
            rec.error = f"server error mid-stream from {url}: {ev['error']}"
            return True
        if ev["usage"]:
            usage = ev["usage"]
        if ev["finish_reason"] is not None:
            rec.finish_reason = ev["finish_reason"]
        if ev["text"] is not None:
            if rec.first_token_s is None:
                rec.first_token_s = now
            rec.chunk_s.append(now)
            rec.end_s = now
            texts.append(ev["text"])
        return ev["done"]

    rec.send_s = time.perf_counter() - t0
    try:
        async with session.post(url, json=_payload(target, load, prompt), timeout=timeout) as resp:
            if resp.status != 200:
                body = (await resp.text())[:500]
                rec.error = f"HTTP {resp.status} from {url}: {body}"
                return rec
            done = False
            async for chunk in resp.content.iter_any():
                now = time.perf_counter() - t0  # one timestamp per network read
                for payload in dec.feed(chunk):
                    if done := handle(payload, now):
                        break
                if done:
                    break
            if not done:
                for payload in dec.flush():
                    handle(payload, time.perf_counter() - t0)
    except asyncio.CancelledError:
        raise
    except asyncio.TimeoutError:
        rec.error = f"request timed out after request_timeout_s={load.request_timeout_s} ({url})"
        return rec
    except Exception as e:  # noqa: BLE001 - connection refused/reset: a failed request, not a crash
        rec.error = f"{type(e).__name__} talking to {url}: {e}"
        return rec

    if rec.error:  # error event mid-stream
        return rec
    rec.generated_text = "".join(texts)
    if rec.first_token_s is None:
        rec.error = f"stream from {url} ended without any text chunk (cannot measure TTFT)"
        return rec
    if rec.finish_reason is None:
        # Every server m3lab drives closes each stream with a finish_reason (not all send
        # [DONE]); a stream that just stops was cut: the server died mid-answer.
        rec.error = f"stream from {url} closed before any finish_reason (server died mid-response?)"
        return rec
    if usage and usage.get("completion_tokens") is not None:
        rec.output_tokens = int(usage["completion_tokens"])
        rec.output_tokens_source = "usage"
    else:
        rec.output_tokens = _count(tokenizer, rec.generated_text)
        rec.output_tokens_source = "tokenizer"
    if usage and usage.get("prompt_tokens") is not None:
        rec.prompt_len = int(usage["prompt_tokens"])  # includes BOS etc., like vLLM reports
    rec.success = True
    return rec


# -----------------------------------------------------------------------------
# sweep


async def _closed_loop(
    session: aiohttp.ClientSession,
    target: Target,
    load: Benchmark,
    tokenizer,
    concurrency: int,
    prompts: list[tuple[str, int]],
    deadline: float,
) -> tuple[list[RequestRecord], float, bool]:
    """All `prompts`, at most `concurrency` in flight -> (records, wall time, cut by the deadline)."""
    sem = asyncio.Semaphore(concurrency)
    records = [RequestRecord(index=i, prompt_len=n) for i, (_, n) in enumerate(prompts)]
    t0 = time.perf_counter()

    async def limited(rec: RequestRecord, prompt: str) -> None:
        async with sem:
            await _send(session, target, load, tokenizer, rec, prompt, t0)

    tasks = [asyncio.create_task(limited(r, p)) for r, (p, _) in zip(records, prompts)]
    if not tasks:
        return records, 0.0, False
    _, pending = await asyncio.wait(tasks, timeout=max(deadline - time.perf_counter(), 1e-3))
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    duration = time.perf_counter() - t0
    for rec, task in zip(records, tasks):
        if task in pending:
            rec.success = False
            rec.error = f"not finished within total_timeout_s={load.total_timeout_s}"
    return records, duration, bool(pending)


async def _run_level(
    session: aiohttp.ClientSession,
    target: Target,
    load: Benchmark,
    tokenizer,
    concurrency: int,
    prompts: list[tuple[str, int]],
    warmup_prompts: list[tuple[str, int]],
    deadline: float,
) -> LevelResult:
    """The warm-up at this level's concurrency (at least one full batch), then the timed part; only the timed
    part is measured."""
    warm, warm_s, warm_cut = await _closed_loop(session, target, load, tokenizer, concurrency, warmup_prompts,
                                                deadline)
    records, duration, cut = await _closed_loop(session, target, load, tokenizer, concurrency, prompts, deadline)
    return LevelResult(
        concurrency=concurrency,
        metrics=compute_metrics(records, duration),
        records=records,
        warmup=Warmup.of(warm, warm_s),
        timed_out=warm_cut or cut,
    )


async def run_sweep_async(target: Target, load: Benchmark, tokenizer=None) -> SweepResult:
    """Run every concurrency level in order; see `run_sweep`."""
    tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(target.tokenizer_dir)
    deadline = time.perf_counter() + load.total_timeout_s
    result = SweepResult(target=target, load=load, levels=[], output_len_forced=output_len_forced(target, load))
    vocab = _clean_vocab(tokenizer)
    # Connection pool as large as the largest level so the semaphore, not aiohttp, limits.
    connector = aiohttp.TCPConnector(limit=max(load.concurrency) + 1, force_close=False)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        for li, conc in enumerate(load.concurrency):
            if time.perf_counter() >= deadline:
                result.timed_out = True
                return result
            # Fresh prompts per level (seeded by level) so a prefix cache cannot make later levels look faster
            # than earlier ones; the warm-up's prompts are others again, after the timed ones.
            n_warm = load.warmup_factor * conc
            prompts = make_prompts(tokenizer, load.num_prompts + n_warm, load.input_len,
                                   seed=load.seed * 1000 + li, vocab=vocab)
            timed, warm = prompts[:load.num_prompts], prompts[load.num_prompts:]
            level = await _run_level(session, target, load, tokenizer, conc, timed, warm, deadline)
            result.levels.append(level)
            if level.metrics.completed == 0:
                first = next((r.error for r in level.records if r.error), "no error recorded")
                raise BenchmarkError(
                    f"all {len(level.records)} requests to {target.url} failed at concurrency={conc}; "
                    f"is the server up? first error: {first}"
                )
            if level.timed_out:
                result.timed_out = True
                return result
    return result


def run_sweep(target: Target, load: Benchmark, tokenizer=None) -> SweepResult:
    """Blocking entry point for notebooks/scripts. Raises BenchmarkError if a whole level fails.

    Partial failures (some requests erroring) are recorded, not raised. Everything is
    bounded: num_prompts (+ the warm-up) per level, request_timeout_s per request,
    total_timeout_s for the sweep (then unfinished requests fail and remaining levels are
    skipped).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run_sweep_async(target, load, tokenizer))
    # Jupyter/papermill kernels already run an event loop, where asyncio.run refuses to
    # start; give the sweep its own loop in a worker thread (or `await run_sweep_async`).
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, run_sweep_async(target, load, tokenizer)).result()


def save_results(result: SweepResult, out_dir: str | Path, stem: str = "benchmark") -> tuple[Path, Path]:
    """Write <stem>.json (target, load, per-level metrics and warm-up, per-request records) and <stem>.csv
    (one row per level)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / f"{stem}.json", out / f"{stem}.csv"
    json_path.write_text(json.dumps(result.to_dict(), indent=1))
    cols = ["concurrency"] + [f.name for f in fields(BenchMetrics)]
    with csv_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(result.rows())
    return json_path, csv_path


# -----------------------------------------------------------------------------
# cross-check against `vllm bench serve`

# What must agree, and how closely (issue 9): throughput, median TTFT, median TPOT, within ±10%, at every level.
CROSSCHECK_METRICS: tuple[str, ...] = ("output_throughput", "median_ttft_ms", "median_tpot_ms")
CROSSCHECK_REL_TOL = 0.10
# Both clients' numbers that are recorded side by side (the judged ones and a few more to read).
_CROSS_KEYS = ("request_throughput", "output_throughput", "median_ttft_ms", "median_tpot_ms", "median_itl_ms",
               "median_e2el_ms")


def vllm_bench_command(target: Target, load: Benchmark, concurrency: int, result_dir: Path) -> list[str]:
    """`vllm bench serve` at the same load as one of our levels: random prompts of the same lengths, the same
    number of requests, the same concurrency cap, the same warm-up, ignore_eos — so the two clients' numbers are
    comparable."""
    argv = ["vllm", "bench", "serve", "--backend", "openai",
            "--base-url", target.base_url.rstrip("/").removesuffix("/v1"), "--endpoint", target.endpoint,
            "--model", target.model, "--tokenizer", target.tokenizer_dir, "--dataset-name", "random",
            "--random-input-len", str(load.input_len), "--random-output-len", str(load.output_len),
            "--num-prompts", str(load.num_prompts), "--max-concurrency", str(concurrency), "--seed", str(load.seed),
            "--temperature", str(load.temperature),
            "--save-result", "--result-dir", str(result_dir), "--result-filename", f"vllm-bench-c{concurrency}.json"]
    if load.warmup_factor:
        argv += ["--num-warmups", str(load.warmup_factor * concurrency)]
    return argv + (["--ignore-eos"] if load.ignore_eos else [])


def crosscheck_with_vllm_bench(target: Target, load: Benchmark, ours: dict[str, Any],
                               out_dir: Path) -> list[dict[str, Any]]:
    """Run `vllm bench serve` at each of our levels; per level: both clients' numbers, side by side (judged by
    `judge_crosscheck`)."""
    rows = []
    for lv in ours["levels"]:
        argv = vllm_bench_command(target, load, lv["concurrency"], out_dir)
        try:
            done = subprocess.run([sys.executable, "-m", "vllm.entrypoints.cli.main", *argv[1:]],
                                  capture_output=True, text=True, timeout=load.total_timeout_s)
        except subprocess.TimeoutExpired:
            rows.append({"concurrency": lv["concurrency"], "status": "failed", "command": " ".join(argv),
                         "reason": f"not finished within total_timeout_s={load.total_timeout_s}"})
            continue
        (out_dir / f"vllm-bench-c{lv['concurrency']}.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
            rows.append({"concurrency": lv["concurrency"], "status": "failed", "reason": last[0],
                         "command": " ".join(argv)})
            continue
        theirs = json.loads((out_dir / f"vllm-bench-c{lv['concurrency']}.json").read_text())
        rows.append({"concurrency": lv["concurrency"], "status": "ok", "command": " ".join(argv),
                     **{f"m3lab_{k}": lv.get(k) for k in _CROSS_KEYS},
                     **{f"vllm_{k}": theirs.get(k) for k in _CROSS_KEYS}})
    return rows


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _check(metric: str, ours: Any, theirs: Any, rel_tol: float) -> dict[str, Any]:
    """One metric at one level: ratio = m3lab / vllm bench serve; agree when within ±rel_tol of 1."""
    m, v = _number(ours), _number(theirs)
    if m is None or v is None or v <= 0:
        missing = "m3lab" if m is None else "vllm bench serve"
        return {"metric": metric, "m3lab": m, "vllm": v, "ratio": None, "agree": False,
                "reason": f"{missing} reported no usable {metric}"}
    ratio = m / v
    return {"metric": metric, "m3lab": m, "vllm": v, "ratio": ratio, "agree": abs(ratio - 1.0) <= rel_tol}


def _not_run(reason: str) -> dict[str, Any]:
    return {"status": f"not run ({reason})", "reason": reason, "summary": f"not cross-checked: {reason}"}


def judge_crosscheck(rows: Sequence[dict[str, Any]], rel_tol: float = CROSSCHECK_REL_TOL) -> dict[str, Any]:
    """The verdict on both clients' numbers (pure: rows as `crosscheck_with_vllm_bench` writes them).

    Per level and metric of CROSSCHECK_METRICS a check {metric, m3lab, vllm, ratio, agree}; a level is "agree"
    when all its checks agree, "disagree" when one measured pair differs by more than ±rel_tol, else "not run
    (why)". Overall status: "disagree" if any level disagrees, "not run (why)" if any level could not
    be judged, "agree" only when every level agrees; only then does the summary say "cross-checked".
    """
    levels = []
    for row in rows:
        lv = {k: v for k, v in row.items() if k not in ("status", "reason")}
        if row.get("status") != "ok":
            lv["checks"], reason = [], f"vllm bench serve failed: {row.get('reason') or 'no reason given'}"
        else:
            lv["checks"] = [_check(m, row.get(f"m3lab_{m}"), row.get(f"vllm_{m}"), rel_tol)
                            for m in CROSSCHECK_METRICS]
            reason = "; ".join(ch["reason"] for ch in lv["checks"] if ch["ratio"] is None)
        if any(ch["ratio"] is not None and not ch["agree"] for ch in lv["checks"]):
            lv["status"] = "disagree"
        elif reason:
            lv.update(status=f"not run ({reason})", reason=reason)
        else:
            lv["status"] = "agree"
        levels.append(lv)

    tol = f"±{rel_tol:.0%}"
    off = [f"c={lv['concurrency']} {ch['metric']} ×{ch['ratio']:.2f}" for lv in levels for ch in lv["checks"]
           if ch["ratio"] is not None and not ch["agree"]]
    not_run = [f"c={lv['concurrency']}: {lv['reason']}" for lv in levels if "reason" in lv]
    verdict: dict[str, Any] = {}
    if off:
        verdict["status"] = "disagree"
        verdict["summary"] = f"m3lab and vllm bench serve disagree beyond {tol}: {', '.join(off)}" + (
            f"; not judged: {'; '.join(not_run)}" if not_run else "")
    elif not_run or not levels:
        verdict = _not_run("; ".join(not_run) or "no levels to compare")
    else:
        verdict["status"] = "agree"
        verdict["summary"] = (f"cross-checked against vllm bench serve: {', '.join(CROSSCHECK_METRICS)} agree "
                              f"within {tol} at every level (c={', '.join(str(lv['concurrency']) for lv in levels)})")
    return {**verdict, "rel_tol": rel_tol, "metrics": list(CROSSCHECK_METRICS), "levels": levels}


# -----------------------------------------------------------------------------
# the DAG's stage


def _scrape(server: dict[str, Any]) -> dict[str, Any] | None:
    """The server's Prometheus /metrics (vLLM has them; transformers serve and mlx_lm.server do not → None)."""
    if server["engine"] != "vllm":
        return None
    return scrape_metrics(server["base_url"], timeout=30)


def run_stage(ctx) -> dict[str, Any]:
    """The DAG's benchmark stage: the params sweep against the served model; JSON + CSV in the stage folder."""
    load = Benchmark.model_validate(ctx.params["benchmark"])
    serve = ctx.upstream("serve")
    server = serve["server"]
    target = Target(base_url=server["base_url"], model=server["model"], tokenizer_dir=serve["tokenizer_dir"],
                    engine=server["engine"])
    ensure_alive(server, settle_s=0)  # one that died in an earlier stage: ServerDied with its log, not a refusal
    metrics_before = _scrape(server)
    try:
        result = run_sweep(target, load)
    except BenchmarkError:
        ensure_alive(server)  # a dead server is the real cause: say so, with its log tail
        raise
    metrics_after = _scrape(server)
    save_results(result, ctx.stage_dir)
    out = result.to_dict()
    for lv in out["levels"]:
        # The single-stream rates cards quote (card 003: "decode ~21.7 tok/s, prefill ~214 tok/s"): decode from
        # the median TPOT, prefill from the median TTFT (which at concurrency 1 is the prompt's prefill plus one
        # decode step, so it slightly understates prefill speed).
        lv["decode_tok_s"] = round(1000.0 / lv["median_tpot_ms"], 3) if lv["median_tpot_ms"] > 0 else None
        lv["prefill_tok_s"] = round(load.input_len * 1000.0 / lv["median_ttft_ms"], 3) \
            if lv["median_ttft_ms"] > 0 else None
    if metrics_before is not None and metrics_after is not None:
        # The server's own view of the sweep (its /metrics before and after): KV-cache usage, request histograms.
        out["server_metrics"] = {"status": "ok", **summarize_metrics(metrics_delta(metrics_before, metrics_after))}
        (ctx.stage_dir / "server-metrics.json").write_text(json.dumps(metrics_after, indent=1))
    else:
        out["server_metrics"] = {"status": "not run", "reason": f"{server['engine']} exposes no /metrics"}
    if load.crosscheck_vllm_bench:
        if target.engine != "vllm":
            out["crosscheck"] = _not_run(f"vllm bench serve needs the vllm engine, this server is {target.engine}")
        else:
            out["crosscheck"] = judge_crosscheck(crosscheck_with_vllm_bench(target, load, out, ctx.stage_dir))
    return out
