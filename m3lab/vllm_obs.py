"""What a vLLM server says about itself: its startup log and its Prometheus `/metrics`.

    parse_server_log(text)      → VllmLogFacts   weights GiB, KV cache GiB/tokens, max concurrency, version,
                                                  resolved max_model_len / quantization / attention backend,
                                                  startup and CUDA-graph times, per rank, and the error lines
    decisive_lines(text, n)     → the few lines that say why a server died (for the serve stage's error message)
    parse_prometheus(text)      → {family: {"type", "help", "samples": [{"name", "labels", "value"}]}}
    scrape_metrics(base_url)    → parse_prometheus(GET <root>/metrics)
    metrics_delta(before, after)→ the same shape, counters and histograms reduced to what happened in between
    summarize_metrics(parsed)   → the flat numbers m3lab reports (KV usage, prefix hits, TTFT/ITL/E2E percentiles)

Every pattern below is written from a vLLM source line (file named next to it); vLLM has reworded several of
them across releases, so each fact accepts the spellings seen from ~0.8 to 0.30 and a line that matches none is
simply not a fact: a missing or odd line gives None, never an exception. Lines look like

    (EngineCore_DP0 pid=199) INFO 05-21 21:08:08 [gpu_model_runner.py:4879] Model loading took 21.42 GiB memory ...
    └ process prefix (vllm/utils/system_utils.py decorate_logs) ┘└ vllm/logger.py _FORMAT, _DATE_FORMAT ┘

With tensor parallelism each worker logs its own weights / KV memory / graph lines under its own prefix
(`Worker_TP0`, `Worker_TP1`, ...): those land in `ranks`, and the top-level number is the per-GPU worst case.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import Any

from m3lab import transport

__all__ = ["RankFacts", "VllmLogFacts", "parse_server_log", "decisive_lines", "MetricsUnavailable",
           "parse_prometheus", "scrape_metrics", "metrics_delta", "summarize_metrics", "histogram_quantile"]

# ---------------------------------------------------------------------------------------------------------------
# Log lines: prefix and header
# ---------------------------------------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# One or more process prefixes, e.g. "(EngineCore pid=311) (RayWorkerWrapper pid=144, ip=172.18.0.2) ";
# a repeated group keeps its last repetition, which is the process that actually wrote the line.
# One space is eaten after each prefix: what follows keeps its indentation (traceback frames are indented).
_PREFIX = re.compile(r"(?:\((?P<proc>[A-Za-z_][\w -]*?) pid=(?P<pid>\d+)[^)]*\) ?)+")
# vllm/logger.py: _FORMAT "%(levelname)s %(asctime)s [%(fileinfo)s:%(lineno)d] %(message)s",
# _DATE_FORMAT "%m-%d %H:%M:%S" (some builds print "04/20 04:20:32"; a fraction is tolerated).
_HEADER = re.compile(r"\b(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) "
                     r"(?P<ts>\d\d[-/]\d\d \d\d:\d\d:\d\d)(?:[.,]\d+)? \[(?P<src>[^\]]+)\] ?")


@dataclass
class _Line:
    proc: str | None  # "EngineCore_DP0", "Worker_TP1", "APIServer", ... None when unprefixed
    pid: int | None
    level: str | None  # None for lines vLLM's logger did not format (uvicorn, tracebacks printed raw, tqdm)
    ts: datetime | None
    msg: str  # right-stripped only: a leading indent marks a traceback frame


def _ts(stamp: str) -> datetime | None:
    try:  # the log has no year; 2000 is a leap year, so "02-29" parses
        return datetime.strptime("2000-" + stamp.replace("/", "-"), "%Y-%m-%d %H:%M:%S")
    except ValueError:
        return None


def _lines(text: str) -> Iterable[_Line]:
    # tqdm bars use "\r"; splitlines() splits on it too, so each redraw is its own (fact-free) line
    for raw in _ANSI.sub("", text or "").splitlines():
        proc = pid = None
        body = raw
        m = _PREFIX.search(raw)
        # a prefix starts the line, or follows a docker ("name  | ") or journald ("... vllm[17578]: ") prefix;
        # anywhere else "(X pid=N)" is part of a message
        if m and (m.start() == 0 or raw[: m.start()].rstrip().endswith(("|", ":"))):
            proc, pid, body = m.group("proc"), int(m.group("pid")), raw[m.end():]
        h = _HEADER.search(body)
        if h and h.start() < 40:
            yield _Line(proc, pid, h.group("level"), _ts(h.group("ts")), body[h.end():].rstrip())
        else:
            yield _Line(proc, pid, None, None, body.rstrip())


# ---------------------------------------------------------------------------------------------------------------
# Facts
# ---------------------------------------------------------------------------------------------------------------

_NUM = r"(-?[\d.]+)"
_INT = r"([\d,]+)"
_GIB = _NUM + r" ?GiB"

# vllm/v1/worker/gpu_model_runner.py load_model (V1 runner): "Model loading took %s GiB memory and %.6f seconds"
# vllm/v1/worker/gpu/model_runner.py (V2 runner):             "Model loading took %s GiB and %.6f seconds"
# older V1 and V0 runners:                                   "Model loading took %.4f GiB and %.6f seconds"
_MODEL_LOADING = re.compile(r"Model loading took " + _GIB + r"(?: memory)? and " + _NUM + r" ?s")
# vllm/model_executor/model_loader/default_loader.py: "Loading weights took %.2f seconds"
_WEIGHTS_LOADING = re.compile(r"Loading weights took " + _NUM + r" ?s")
# vllm/v1/worker/gpu_worker.py determine_available_memory: "Available KV cache memory: %s GiB"
# (some builds append " (process-scoped)" / " (profiling fallback)")
_AVAILABLE_KV = re.compile(r"Available KV cache memory: " + _GIB)
# vllm/utils/mem_utils.py MemoryProfilingResult.__repr__, logged by gpu_worker.py at DEBUG only:
# "Memory profiling takes %.2f seconds. Total non KV cache memory: %sGiB; torch peak memory increase: %sGiB;
#  non-torch forward increase memory: %sGiB; weights memory: %sGiB."
_MEM_PROFILE = re.compile(r"Total non KV cache memory: " + _GIB + r"; torch peak memory increase: " + _GIB +
                          r"; non-torch forward increase memory: " + _GIB + r"; weights memory: " + _GIB)
# the V0 worker (vllm/worker/worker.py): "model weights take %.2fGiB; non_torch_memory takes %.2fGiB; PyTorch
# activation peak memory takes %.2fGiB; the rest of the memory reserved for KV Cache is %.2fGiB."
_MEM_PROFILE_V0 = re.compile(r"model weights take " + _GIB + r"; non_torch_memory takes " + _GIB +
                             r"; PyTorch activation peak memory takes " + _GIB +
                             r"; the rest of the memory reserved for KV Cache is " + _GIB)
# vllm/v1/core/kv_cache_utils.py _report_kv_cache_config: "GPU KV cache size: %s tokens" and
# "Maximum concurrency for %s tokens per request: %.2fx" (two lines, or one merged line in later releases:
# "GPU KV cache size: %s tokens, Maximum concurrency for %s tokens per request: %.2fx")
_KV_TOKENS = re.compile(r"GPU KV cache size: " + _INT + r" tokens")
_CONCURRENCY = re.compile(r"Maximum (?:[\w ]+? )?concurrency for " + _INT + r" tokens per request: " + _NUM + r"x")
# vllm/v1/worker/gpu_model_runner.py capture_model: "Graph capturing finished in %.0f secs, took %.2f GiB"
_GRAPHS = re.compile(r"Graph capturing finished in " + _NUM + r" secs?, took " + _GIB)
# vllm/v1/engine/core.py _initialize_kv_caches: "init engine (profile, create kv cache, warmup model) took
# %.2f seconds" (later: "took %.2f s (compilation: %.2f s)")
_ENGINE_INIT = re.compile(r"init engine \(profile, create kv cache, warmup model\) took " + _NUM +
                          r" ?(?:s|seconds)\b(?: \(compilation: " + _NUM + r" ?s\))?")
# vllm/v1/engine/core.py: "Initializing a V1 LLM engine (v%s) with config: model='...', ..., max_seq_len=...,
# tensor_parallel_size=..., quantization=..., enforce_eager=..., kv_cache_dtype=..., ..."
_ENGINE_CONFIG = re.compile(r"Initializing a V1 LLM engine \(v?(?P<version>[^)\s]+)\) with config: (?P<cfg>.*)")
_CFG_MODEL = re.compile(r"(?:^|, )model='(?P<v>[^']*)'")
_CFG = {key: re.compile(r"(?:^|, )" + key + r"=(?P<v>[^,\s]+)") for key in (
    "max_seq_len", "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "quantization",
    "kv_cache_dtype", "dtype", "enforce_eager", "enable_prefix_caching")}
# vllm/entrypoints/utils.py (banner, 0.11+): "█▄█▀ █ ... version 0.20.2"; older api_server.py:
# "vLLM API server version %s"
_VERSION_BANNER = re.compile(r"█.*\bversion (\d+\.\d+[\w.+-]*)")
_VERSION_API = re.compile(r"vLLM API server version (\d+\.\d+[\w.+-]*)")
# vllm/config/model.py: "Using max model len %s"; kv_cache_utils.py _auto_fit_max_model_len:
# "Auto-fit max_model_len: reduced from %d to %d to fit in available GPU memory ..."
_MAX_LEN = re.compile(r"Using max model len (\d+)")
_MAX_LEN_AUTOFIT = re.compile(r"Auto-fit max_model_len: reduced from \d+ to (\d+)")
# vllm/platforms/cuda.py: "Using %s attention backend out of potential backends: %s" (0.12+),
# "Using AttentionBackendEnum.%s backend." (0.11), "Using Flash Attention backend on V1 engine." (0.8-0.10)
_ATTN = (re.compile(r"Using (\w+) attention backend out of potential backends"),
         re.compile(r"Using AttentionBackendEnum\.(\w+) backend\.?$"),
         re.compile(r"Using (.+?) backend on V1 engine"))
# vllm/v1/metrics/loggers.py LoggingStatLogger.log: "Engine %03d: Avg prompt throughput: ... GPU KV cache usage:
# %.1f%%, Prefix cache hit rate: %.1f%%"
_KV_USAGE = re.compile(r"KV cache usage: " + _NUM + r"%")
# kv_cache_utils.py _check_enough_kv_cache_memory: "... Based on the available memory, the estimated maximum
# model length is %d. Try increasing `gpu_memory_utilization` or decreasing `max_model_len` ..."
_EST_MAX_LEN = re.compile(r"estimated maximum model length is (\d+)")
# uvicorn (not vLLM's logger, so no timestamp): "INFO:     Application startup complete."
_STARTUP_DONE = "Application startup complete"


@dataclass
class RankFacts:
    """What one process (one GPU worker, or the engine core on a single GPU) logged about itself."""
    pid: int | None = None
    model_memory_gib: float | None = None  # weights (and anything allocated while loading) on this GPU
    model_load_s: float | None = None
    weights_load_s: float | None = None
    kv_cache_gib: float | None = None  # "Available KV cache memory"
    non_kv_cache_gib: float | None = None  # the memory-profiling breakdown (DEBUG level in V1)
    activation_peak_gib: float | None = None
    non_torch_gib: float | None = None
    cuda_graph_s: float | None = None
    cuda_graph_gib: float | None = None
    kv_cache_tokens: int | None = None
    max_concurrency: float | None = None


@dataclass
class VllmLogFacts:
    vllm_version: str | None = None
    model: str | None = None
    max_model_len: int | None = None  # the resolved one (auto-fit and the KV report win over the request)
    quantization: str | None = None
    kv_cache_dtype: str | None = None
    dtype: str | None = None
    tensor_parallel_size: int | None = None
    pipeline_parallel_size: int | None = None
    enforce_eager: bool | None = None
    enable_prefix_caching: bool | None = None
    attention_backend: str | None = None
    # per GPU, worst rank: max for what a GPU spends, min for what the KV pool gets (vLLM sizes every rank's
    # pool to the smallest one, kv_cache_utils.get_kv_cache_configs)
    model_memory_gib: float | None = None
    model_load_s: float | None = None
    weights_load_s: float | None = None
    kv_cache_gib: float | None = None
    non_kv_cache_gib: float | None = None
    activation_peak_gib: float | None = None
    non_torch_gib: float | None = None
    cuda_graph_s: float | None = None
    cuda_graph_gib: float | None = None
    kv_cache_tokens: int | None = None
    max_concurrency: float | None = None  # how many max_model_len requests the KV cache holds at once
    engine_init_s: float | None = None  # profile + KV cache + warmup/graphs, from the engine core
    compile_s: float | None = None  # torch.compile share of engine_init_s, when logged
    startup_s: float | None = None  # first timestamped line → the last one before "Application startup complete"
    startup_complete: bool = False
    peak_kv_cache_usage_pct: float | None = None  # from the periodic "Engine 000: ..." stats lines
    estimated_max_model_len: int | None = None  # from the "KV cache is needed, which is larger" startup error
    errors: list[str] = field(default_factory=list)  # decisive_lines() when the log holds an exception, else []
    ranks: dict[str, RankFacts] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _f(s: str) -> float | None:
    try:
        v = float(str(s).replace(",", ""))
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _i(s: str) -> int | None:
    v = _f(s)
    return None if v is None else int(v)


def _cfg_value(raw: str) -> str | None:
    raw = raw.strip().strip("'\"")
    return None if raw in ("", "None") else raw


def _first(patterns: Iterable[re.Pattern[str]], msg: str) -> re.Match[str] | None:
    return next((m for p in patterns if (m := p.search(msg))), None)


def _bool(raw: str | None) -> bool | None:
    return {"True": True, "False": False}.get(raw or "")


_AGG_MAX = ("model_memory_gib", "model_load_s", "weights_load_s", "non_kv_cache_gib", "activation_peak_gib",
            "non_torch_gib", "cuda_graph_s", "cuda_graph_gib")
_AGG_MIN = ("kv_cache_gib", "kv_cache_tokens", "max_concurrency")


def parse_server_log(text: str) -> VllmLogFacts:
    """Everything `parse_server_log`'s patterns find in a vLLM server log (see the module docstring)."""
    facts = VllmLogFacts()
    ranks: dict[str, RankFacts] = {}
    pid_of: dict[str, int | None] = {}
    max_lens: list[int] = []  # in order of appearance: the last one is the resolved value
    first_ts = last_ts = None

    def rank(line: _Line) -> RankFacts:
        # key by process label; a second process with the same label (Ray workers) gets its pid appended
        key = line.proc or "main"
        if key in pid_of and pid_of[key] != line.pid:
            key = f"{key} pid={line.pid}"
        pid_of.setdefault(key, line.pid)
        return ranks.setdefault(key, RankFacts(pid=line.pid))

    for line in _lines(text):
        msg = line.msg
        if line.ts is not None:
            first_ts = first_ts or line.ts
            if not facts.startup_complete:
                last_ts = line.ts
        if not msg:
            continue
        if _STARTUP_DONE in msg:
            facts.startup_complete = True
        if m := _MODEL_LOADING.search(msg):
            r = rank(line)
            r.model_memory_gib, r.model_load_s = _f(m.group(1)), _f(m.group(2))
        elif m := _WEIGHTS_LOADING.search(msg):
            rank(line).weights_load_s = _f(m.group(1))
        elif m := _AVAILABLE_KV.search(msg):
            rank(line).kv_cache_gib = _f(m.group(1))
        elif m := _MEM_PROFILE.search(msg):
            r = rank(line)
            r.non_kv_cache_gib, r.activation_peak_gib, r.non_torch_gib = (_f(m.group(k)) for k in (1, 2, 3))
            r.model_memory_gib = r.model_memory_gib if r.model_memory_gib is not None else _f(m.group(4))
        elif m := _MEM_PROFILE_V0.search(msg):
            r = rank(line)
            weights, r.non_torch_gib, r.activation_peak_gib, r.kv_cache_gib = (_f(m.group(k)) for k in (1, 2, 3, 4))
            r.model_memory_gib = r.model_memory_gib if r.model_memory_gib is not None else weights
        elif m := _GRAPHS.search(msg):
            r = rank(line)
            r.cuda_graph_s, r.cuda_graph_gib = _f(m.group(1)), _f(m.group(2))
        elif m := _ENGINE_INIT.search(msg):
            facts.engine_init_s = _f(m.group(1))
            facts.compile_s = _f(m.group(2)) if m.group(2) else None
        elif m := _ENGINE_CONFIG.search(msg):
            facts.vllm_version = facts.vllm_version or m.group("version")
            cfg = m.group("cfg")
            if mm := _CFG_MODEL.search(cfg):
                facts.model = mm.group("v")
            got = {key: _cfg_value(mm.group("v")) if (mm := pattern.search(cfg)) else None
                   for key, pattern in _CFG.items()}
            if (length := _i(got["max_seq_len"] or "")) is not None:
                max_lens.append(length)
            facts.quantization = got["quantization"]
            facts.kv_cache_dtype = got["kv_cache_dtype"]
            facts.dtype = got["dtype"].removeprefix("torch.") if got["dtype"] else None
            facts.tensor_parallel_size = _i(got["tensor_parallel_size"] or "")
            facts.pipeline_parallel_size = _i(got["pipeline_parallel_size"] or "")
            facts.enforce_eager = _bool(got["enforce_eager"])
            facts.enable_prefix_caching = _bool(got["enable_prefix_caching"])
        elif m := (_VERSION_BANNER.search(msg) or _VERSION_API.search(msg)):
            facts.vllm_version = facts.vllm_version or m.group(1)
        elif m := (_MAX_LEN_AUTOFIT.search(msg) or _MAX_LEN.search(msg)):
            max_lens.append(int(m.group(1)))
        elif facts.attention_backend is None and (m := _first(_ATTN, msg)):
            facts.attention_backend = m.group(1)  # the first one: the language model's, not a later drafter's
        if m := _KV_TOKENS.search(msg):  # may share a line with the concurrency report
            rank(line).kv_cache_tokens = _i(m.group(1))
        if m := _CONCURRENCY.search(msg):
            rank(line).max_concurrency = _f(m.group(2))
            if length := _i(m.group(1)):
                max_lens.append(length)
        if m := _KV_USAGE.search(msg):
            usage = _f(m.group(1))
            if usage is not None:
                facts.peak_kv_cache_usage_pct = max(usage, facts.peak_kv_cache_usage_pct or 0.0)
        if m := _EST_MAX_LEN.search(msg):
            facts.estimated_max_model_len = int(m.group(1))

    # the engine core on one GPU reports both worker facts and scheduler facts: no need to keep empty ranks
    facts.ranks = {k: r for k, r in ranks.items() if any(getattr(r, f.name) is not None
                                                          for f in fields(r) if f.name != "pid")}
    for name in _AGG_MAX + _AGG_MIN:
        values = [getattr(r, name) for r in facts.ranks.values() if getattr(r, name) is not None]
        if values:
            setattr(facts, name, (max if name in _AGG_MAX else min)(values))
    facts.max_model_len = max_lens[-1] if max_lens else None
    if facts.startup_complete and first_ts and last_ts:
        seconds = (last_ts - first_ts).total_seconds()
        facts.startup_s = seconds + 366 * 86400 if seconds < 0 else seconds  # a log that crossed New Year
    ranked = _ranked_error_lines(text)
    facts.errors = _pick(ranked, 5) if any(tier == 0 for tier, _ in ranked.values()) else []
    return facts


# ---------------------------------------------------------------------------------------------------------------
# Why it died
# ---------------------------------------------------------------------------------------------------------------

# A Python exception line: "ValueError: ...", "torch.OutOfMemoryError: CUDA out of memory. ...",
# "vllm.v1.engine.exceptions.EngineDeadError: ...", a bare "AssertionError".
_EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)*(?:[A-Z]\w*)?(?:Error|Exception|Exit|Interrupt)(?::\s.*)?$")
_FATAL = re.compile(r"Segmentation fault|core dumped|CUDA error|NCCL error|out of memory|^Killed$")
# Lines that only point elsewhere ("see root cause above"): kept, but after every line that says something.
_WRAPPERS = re.compile(r"Engine core initialization failed|See root cause above|EngineDeadError|"
                       r"EngineCore failed to start|WorkerProc hit an exception|"
                       r"See stack trace \(above\)|check the stack trace above|EngineCore encountered|"
                       r"WorkerProc failed to start|AsyncLLM output_handler failed|Worker proc \S+ died")
_FRAME = re.compile(r"^(?:File \"|Traceback \(most recent call last\)|\^+$|~+|During handling of|"
                    r"The above exception was the direct cause)")
_MAX_LINE = 500


def _ranked_error_lines(text: str) -> dict[str, tuple[int, int]]:
    """{message: (tier, index of its first appearance)} for every line that may say why the server died."""
    seen: dict[str, tuple[int, int]] = {}
    for index, line in enumerate(_lines(text)):
        msg = line.msg
        if not msg.strip() or msg[:1].isspace() or _FRAME.match(msg):
            continue  # traceback frames and source lines are indented; they say where, not why
        if _EXCEPTION.match(msg) or (_FATAL.search(msg) and line.level in (None, "ERROR", "CRITICAL")):
            tier = 0
        elif line.level in ("ERROR", "CRITICAL"):
            tier = 1
        else:
            continue
        if _WRAPPERS.search(msg):
            tier = 2
        msg = msg[:_MAX_LINE]
        seen.setdefault(msg, (tier, index))  # once, however many TP ranks printed it
    return seen


def _pick(ranked: dict[str, tuple[int, int]], n: int) -> list[str]:
    chosen: list[tuple[int, str]] = []
    for tier in (0, 1, 2):
        if len(chosen) >= n:
            break
        # within a tier the latest lines win: the root cause is the last exception, not an early warning
        chosen += sorted((i, m) for m, (t, i) in ranked.items() if t == tier)[-(n - len(chosen)):]
    return [m for _, m in sorted(chosen)]


def decisive_lines(text: str, n: int = 5) -> list[str]:
    """The (at most) n lines that say why a vLLM server died, oldest first, without prefixes or timestamps.

    The root cause is usually an exception line printed far above the end of the log (a worker's traceback),
    followed by a wall of generic "Engine core initialization failed. See root cause above." lines from the
    API server and a copy from every TP rank. So: exception lines and fatal lines (CUDA/NCCL errors, out of
    memory, segfaults) first, then other ERROR/CRITICAL messages, then the generic wrappers; each line once."""
    return _pick(_ranked_error_lines(text), n) if n > 0 else []


# ---------------------------------------------------------------------------------------------------------------
# Prometheus text exposition format (what vLLM's /metrics serves through prometheus_client)
# ---------------------------------------------------------------------------------------------------------------

class MetricsUnavailable(RuntimeError):
    """The server has no readable /metrics (not vLLM, metrics disabled, or not reachable)."""


# sample line: name{label="value",...} value [timestamp]
_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][\w:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+-?\d+)?\s*$")
_LABEL = re.compile(r'\s*(?P<k>[A-Za-z_]\w*)\s*=\s*"(?P<v>(?:[^"\\]|\\.)*)"\s*,?')
_SUFFIXES = ("_total", "_created", "_bucket", "_sum", "_count", "_gsum", "_gcount", "_info")
_CUMULATIVE = ("counter", "histogram", "summary")


def _unescape(v: str) -> str:
    return v.replace(r"\\", "\x00").replace(r"\"", '"').replace(r"\n", "\n").replace("\x00", "\\")


def _labels(raw: str | None) -> dict[str, str] | None:
    labels: dict[str, str] = {}
    pos = 0
    raw = (raw or "").strip()
    while pos < len(raw):
        m = _LABEL.match(raw, pos)
        if not m:
            return None  # malformed: skip the sample rather than guess
        labels[m.group("k")] = _unescape(m.group("v"))
        pos = m.end()
    return labels


def _value(raw: str) -> float | None:
    try:
        return float(raw)  # also reads "+Inf", "-Inf", "NaN"
    except ValueError:
        return None


def _family_of(name: str, declared: dict[str, dict[str, Any]]) -> str:
    if name in declared:
        return name
    for suffix in _SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in declared:
            return name[: -len(suffix)]
    return name


def parse_prometheus(text: str) -> dict[str, dict[str, Any]]:
    """Parse the Prometheus text format into {family: {"type", "help", "samples": [...]}}.

    A family is named as its `# TYPE` line names it: prometheus_client writes a counter created as
    `vllm:prompt_tokens` as `# TYPE vllm:prompt_tokens_total counter` (and its `_created` series as a separate
    gauge family); a histogram `vllm:e2e_request_latency_seconds` keeps its name and carries `_bucket` (with
    an `le` label), `_sum` and `_count` samples. Samples without a TYPE line form "untyped" families, except
    `*_total` (counter) and `*_bucket/_sum/_count` groups (histogram). Malformed lines are skipped."""
    declared: dict[str, dict[str, Any]] = {}
    helps: dict[str, str] = {}
    samples: list[tuple[str, dict[str, str], float]] = []
    for raw in (text or "").splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] == "TYPE":
                declared.setdefault(parts[2], {"type": parts[3].strip() if len(parts) > 3 else "untyped"})
            elif len(parts) >= 3 and parts[1] == "HELP":
                helps[parts[2]] = parts[3] if len(parts) > 3 else ""
            continue  # other comments (and OpenMetrics' "# EOF")
        m = _SAMPLE.match(line)
        labels = _labels(m.group("labels")) if m else None
        value = _value(m.group("value")) if m else None
        if m is None or labels is None or value is None:
            continue
        samples.append((m.group("name"), labels, value))

    names = {name for name, _, _ in samples}
    for name in names:  # infer what undeclared samples are
        if _family_of(name, declared) != name or name in declared:
            continue
        if name.endswith("_bucket") and name[:-7] not in declared:
            declared[name[:-7]] = {"type": "histogram"}
        elif name.endswith("_total") and name not in declared:
            declared[name] = {"type": "counter"}
    families: dict[str, dict[str, Any]] = {}
    for name, labels, value in samples:
        fam = _family_of(name, declared)
        entry = families.setdefault(fam, {"type": declared.get(fam, {}).get("type", "untyped"),
                                          "help": helps.get(fam, ""), "samples": []})
        entry["samples"].append({"name": name, "labels": labels, "value": value})
    return families


def _metrics_url(base_url: str) -> str:
    root = base_url.rstrip("/")
    root = root.removesuffix("/v1")  # the OpenAI API lives under /v1, /metrics at the root
    return f"{root}/metrics"


def scrape_metrics(base_url: str, timeout: float = 10.0) -> dict[str, dict[str, Any]]:
    """GET <root>/metrics (base_url may be the server root or its `/v1` API base) and parse it."""
    url = _metrics_url(base_url)
    try:
        status, body = transport.get_text(url, timeout)
    except transport.TransportError as e:
        raise MetricsUnavailable(f"{url} could not be read: {e}") from None
    if status != 200:
        raise MetricsUnavailable(f"{url} answered HTTP {status} (not a vLLM server, or metrics are off)")
    parsed = parse_prometheus(body)
    if not parsed:
        raise MetricsUnavailable(f"{url} answered, but not in the Prometheus text format: {body[:200]!r}")
    return parsed


def _key(sample: dict[str, Any]) -> tuple[str, tuple[tuple[str, str], ...]]:
    return sample["name"], tuple(sorted(sample["labels"].items()))


def metrics_delta(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`after` with every counter, histogram and summary sample reduced by its `before` value, so a benchmark
    level's own requests can be summarized on their own. Gauges (and `_created` timestamps) are `after`'s.
    A sample that went down means the server restarted in between: its `after` value is kept as the delta."""
    old = {_key(s): s["value"] for fam in before.values() for s in fam["samples"]}
    out: dict[str, dict[str, Any]] = {}
    for name, fam in after.items():
        samples = []
        for s in fam["samples"]:
            value = s["value"]
            if fam["type"] in _CUMULATIVE and not s["name"].endswith("_created"):
                prev = old.get(_key(s), 0.0)
                value = value - prev if value >= prev else value
            samples.append({"name": s["name"], "labels": dict(s["labels"]), "value": value})
        out[name] = {"type": fam["type"], "help": fam.get("help", ""), "samples": samples}
    return out


# ---------------------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------------------

def _family(parsed: dict[str, dict[str, Any]], *names: str) -> dict[str, Any] | None:
    """The first family present under any of `names` (each tried bare and with `_total`)."""
    for name in names:
        for candidate in (name, f"{name}_total", name.removesuffix("_total")):
            if candidate in parsed:
                return parsed[candidate]
    return None


def _sum(parsed: dict[str, dict[str, Any]], *names: str) -> float | None:
    fam = _family(parsed, *names)
    if fam is None:
        return None
    values = [s["value"] for s in fam["samples"] if not s["name"].endswith("_created")]
    return float(sum(values)) if values else None


def _max(parsed: dict[str, dict[str, Any]], *names: str) -> float | None:
    fam = _family(parsed, *names)
    values = [s["value"] for s in fam["samples"]] if fam else []
    return max(values) if values else None


def _histogram(parsed: dict[str, dict[str, Any]], *names: str) -> tuple[list[tuple[float, float]], float, float] | None:
    """(cumulative buckets [(le, count)], sum, count), merged over label sets (engines): the buckets of one
    histogram are the same in every engine, so adding counts per `le` is exact."""
    fam = _family(parsed, *names)
    if fam is None:
        return None
    buckets: dict[float, float] = {}
    total = count = 0.0
    for s in fam["samples"]:
        if s["name"].endswith("_bucket") and "le" in s["labels"]:
            le = _value(s["labels"]["le"])
            if le is not None:
                buckets[le] = buckets.get(le, 0.0) + s["value"]
        elif s["name"].endswith("_sum"):
            total += s["value"]
        elif s["name"].endswith("_count"):
            count += s["value"]
    if not buckets:
        return None
    return sorted(buckets.items()), total, count


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus' histogram_quantile(): find the bucket holding rank q·count and interpolate linearly inside
    it (the lowest bucket starts at 0). In the +Inf bucket, the highest finite bound is the answer. These are
    estimates, as coarse as the buckets (vLLM's TTFT buckets jump 0.1 → 0.25 → 0.5 s)."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0 or not 0 <= q <= 1:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank and count > prev_count:
            if math.isinf(le):
                return prev_le
            lower = prev_le if prev_le < le else 0.0
            return lower + (le - lower) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


# summary key → vLLM histogram families, newest name first (vllm/v1/metrics/loggers.py PrometheusStatLogger)
_HISTOGRAMS = {
    "ttft": ("vllm:time_to_first_token_seconds",),
    "itl": ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),  # renamed in 0.11
    "tpot": ("vllm:request_time_per_output_token_seconds",),
    "e2el": ("vllm:e2e_request_latency_seconds",),
    "queue_time": ("vllm:request_queue_time_seconds",),
    "prefill_time": ("vllm:request_prefill_time_seconds",),
    "decode_time": ("vllm:request_decode_time_seconds",),
}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def summarize_metrics(parsed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The numbers m3lab reports from one scrape (or from a `metrics_delta`), in vLLM bench's vocabulary:
    latencies as `mean_ttft_ms`, `median_ttft_ms`, `p90_ttft_ms`, `p99_ttft_ms` (bucket-interpolated), counts
    as totals summed over engines; None where the server does not export the metric."""
    out: dict[str, Any] = {}
    usage = _max(parsed, "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # renamed in 0.10; 1 = 100 %
    out["kv_cache_usage_pct"] = None if usage is None else round(100.0 * usage, 3)
    out["num_requests_running"] = _sum(parsed, "vllm:num_requests_running")
    out["num_requests_waiting"] = _sum(parsed, "vllm:num_requests_waiting")
    out["prompt_tokens"] = _sum(parsed, "vllm:prompt_tokens")
    out["generation_tokens"] = _sum(parsed, "vllm:generation_tokens")
    out["num_requests_success"] = _sum(parsed, "vllm:request_success")
    out["num_preemptions"] = _sum(parsed, "vllm:num_preemptions")
    queries = _sum(parsed, "vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries")  # tokens (blocks < 0.9)
    hits = _sum(parsed, "vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits")
    out["prefix_cache_queries"], out["prefix_cache_hits"] = queries, hits
    out["prefix_cache_hit_rate"] = round(hits / queries, 6) if queries and hits is not None else None
    # vllm:cache_config_info is a gauge fixed at 1 whose labels are the CacheConfig (kv_cache_size_tokens from
    # later releases on; num_gpu_blocks × block_size overstates hybrid models, so it is not used as a fallback)
    info = _family(parsed, "vllm:cache_config_info")
    labels = info["samples"][0]["labels"] if info and info["samples"] else {}
    for key, label in (("kv_cache_tokens", "kv_cache_size_tokens"), ("num_gpu_blocks", "num_gpu_blocks"),
                       ("block_size", "block_size")):
        out[key] = _i(labels.get(label) or "")  # absent, "None" or junk → None
    for key, names in _HISTOGRAMS.items():
        hist = _histogram(parsed, *names)
        buckets, total, count = hist if hist else ([], 0.0, 0.0)
        out[f"{key}_count"] = int(count) if hist else None
        out[f"mean_{key}_ms"] = _ms(total / count) if count else None
        for label, q in (("median", 0.5), ("p90", 0.9), ("p99", 0.99)):
            out[f"{label}_{key}_ms"] = _ms(histogram_quantile(buckets, q)) if count else None
    return out
