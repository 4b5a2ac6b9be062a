"""Correctness stage: does the served model say the right things, and does the server compute what the model does?

1. Prompt suite (params): each prompt is completed greedily by the server; it passes if every expected substring
   appears in the continuation (card 002 checked "The capital of France is" → Paris, "日本の首都は" → 東京).
2. Serving parity: the server's greedy continuation of each parity prompt against transformers' offline greedy
   continuation of the same checkpoint (`generate(do_sample=False)`). Both texts are tokenized with the
   checkpoint's tokenizer and compared position by position up to the first divergence: the *token match rate*
   is the length of the common prefix over the longer sequence (1.0 = identical). Greedy decoding diverges for
   good after one different token, which is why the prefix is what counts.
3. Chat checks (params `correctness.chat`): a reasoning and a tool-call prompt through /v1/chat/completions,
   judged on the parsed message (the engine's parsers, or m3lab.parsers on raw M3 text).
4. Accuracy evals (params `correctness.evals`): the real lm-eval harness against the server (`m3lab.evals`),
   one run per seed; the claims ledger reads their scores. With `correctness.baseline`, the same evals on the
   unquantized checkpoint (a second server) or another profile's run, paired item by item (m3lab.evals.paired).
5. Numerics (params `correctness.numerics`, m3lab.numerics): non-finite outputs, determinism, parity at length,
   prefix-cache A/B. Last, because its concurrent batch is what crashed vLLM 0.25.1.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from m3lab import evals, numerics, parsers
from m3lab.client import RequestFailed, complete, post
from m3lab.engines import served_checkpoint
from m3lab.evals import paired
from m3lab.numerics import prefix_match_rate
from m3lab.registry import ENGINES
from m3lab.stage import StageContext, newest_ok_run, read_json, results_root

__all__ = ["PromptResult", "ParityResult", "run_suite", "prefix_match_rate", "offline_greedy", "run_parity",
           "baseline_target", "with_baseline", "run_evals", "run_stage"]


@dataclass
class PromptResult:
    id: str
    lang: str
    prompt: str
    expect: list[str]
    output: str
    passed: bool
    missing: list[str]


@dataclass
class ParityResult:
    prompt: str
    server: str
    offline: str
    match_rate: float
    passed: bool


def run_suite(server: dict[str, Any], prompts: list[dict[str, Any]], max_tokens: int) -> list[PromptResult]:
    results = []
    for p in prompts:
        out = complete(server, p["prompt"], max_tokens)["choices"][0]["text"]
        missing = [e for e in p["expect"] if e not in out]
        results.append(PromptResult(p["id"], p.get("lang", "en"), p["prompt"], p["expect"], out, not missing,
                                    missing))
    return results


def offline_greedy(model_dir: str, prompts: list[str], max_tokens: int) -> list[str]:
    """transformers' own greedy continuations of `prompts` from the checkpoint on disk."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype="auto")
    model.eval()
    outs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt")
            gen = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
            outs.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return outs


def run_parity(server: dict[str, Any], model_dir: str, prompts: list[str], max_tokens: int,
               min_match_rate: float) -> list[ParityResult]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    offline = offline_greedy(model_dir, prompts, max_tokens)
    results = []
    for prompt, ref in zip(prompts, offline):
        served = complete(server, prompt, max_tokens)["choices"][0]["text"]
        rate = prefix_match_rate(tok.encode(served, add_special_tokens=False), tok.encode(ref, add_special_tokens=False))
        results.append(ParityResult(prompt, served, ref, round(rate, 4), rate >= min_match_rate))
    return results


def run_chat_check(server: dict[str, Any], check: dict[str, Any]) -> dict[str, Any]:
    """One chat check (params `correctness.chat`): the engine's parsed message where it parsed (vLLM with
    --reasoning-parser/--tool-call-parser), else m3lab.parsers on the raw text (transformers serve)."""
    body = {"model": server["model"], "messages": check["messages"], "max_tokens": check["max_tokens"],
            "temperature": 0, **({"tools": check["tools"]} if check["tools"] else {})}
    status, answer = post(server, "/chat/completions", body)
    if status != 200 or not isinstance(answer, dict):
        raise RequestFailed(f"chat check {check['id']}: HTTP {status}: {str(answer)[:300]}", status, answer)
    raw = answer["choices"][0]["message"]
    engine_parsed = bool(raw.get("tool_calls") or raw.get("reasoning_content") or raw.get("reasoning"))
    if engine_parsed:
        msg = {"content": raw.get("content"), "reasoning_content": raw.get("reasoning_content") or raw.get("reasoning"),
               "tool_calls": raw.get("tool_calls") or []}
    else:
        msg = parsers.parse_assistant_message(raw.get("content") or "", tools=check["tools"] or None)
    content = msg.get("content") or ""
    problems = [f"content lacks {e!r}" for e in check["expect"] if e not in content]
    if check["expect_reasoning"]:
        if not (msg.get("reasoning_content") or "").strip():
            problems.append("no reasoning_content")
        if "<mm:think>" in content or "</mm:think>" in content:
            problems.append("think markup left in the content")
    want = check.get("expect_tool")
    if want:
        calls = [c.get("function", {}) for c in msg.get("tool_calls") or []]
        hit = [c for c in calls if c.get("name") == want["name"]]
        if not hit:
            problems.append(f"no call to {want['name']} (calls: {[c.get('name') for c in calls]})")
        else:
            args = hit[0].get("arguments")
            try:
                args = json.loads(args) if isinstance(args, str) else (args or {})
            except json.JSONDecodeError:
                problems.append(f"{want['name']}'s arguments are not JSON: {args[:80]!r}")
                args = {}
            problems += [f"{want['name']}.{k} is {args.get(k)!r}, expected {v!r}"
                         for k, v in want["arguments"].items() if args.get(k) != v]
    return {"id": check["id"], "parser": "the engine's" if engine_parsed else "m3lab.parsers",
            "raw": (raw.get("content") or "")[:400], "message": msg, "passed": not problems, "problems": problems}


def run_stage(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.params["correctness"]
    server = ctx.upstream("serve")["server"]
    seconds: dict[str, float] = {}  # wall time of each part (where the stage's time goes; bench/ reads it)
    t = time.perf_counter()

    def lap(part: str) -> None:
        nonlocal t
        now = time.perf_counter()
        seconds[part] = round(now - t, 2)
        t = now

    suite = run_suite(server, cfg["prompts"], cfg["max_tokens"])
    lap("prompts")
    passed = sum(r.passed for r in suite)
    result: dict[str, Any] = {
        "prompts": [asdict(r) for r in suite],
        "passed": passed,
        "total": len(suite),
        "pass_rate": passed / len(suite),
    }
    parity = cfg["parity"]
    if parity["enabled"]:
        prompts = parity["prompts"] or [p["prompt"] for p in cfg["prompts"]]
        model_dir = ctx.upstream("quantize")["model_dir"]
        rows = run_parity(server, model_dir, prompts, parity["max_tokens"], parity["min_match_rate"])
        result["parity"] = {
            "status": "ok",
            "reference": f"transformers generate(do_sample=False) on {model_dir}",
            "rows": [asdict(r) for r in rows],
            "match_rate": round(sum(r.match_rate for r in rows) / len(rows), 4),
            "passed": all(r.passed for r in rows),
            "min_match_rate": parity["min_match_rate"],
        }
    else:
        result["parity"] = {"status": "not run", "reason": "correctness.parity.enabled is false in the profile"}
    lap("parity")
    if cfg.get("chat"):
        chat = [run_chat_check(server, c) for c in cfg["chat"]]
        result["chat"] = {"checks": chat, "passed": sum(c["passed"] for c in chat), "total": len(chat),
                          "pass_rate": sum(c["passed"] for c in chat) / len(chat)}
    else:
        result["chat"] = {"status": "not run", "reason": "correctness.chat is empty in the profile"}
    lap("chat")
    result["evals"] = run_evals(ctx, cfg, server)
    lap("evals")
    result["numerics"] = run_numerics(ctx, cfg["numerics"], server)  # last: its concurrent batch may crash a server
    lap("numerics")
    result["seconds"] = seconds
    return result


def _prefix_cache_off(argv: list[str]) -> str | None:
    if "--no-enable-prefix-caching" in argv:
        return "prefix caching is off (--no-enable-prefix-caching in serve.args)"
    return None


def run_numerics(ctx: StageContext, cfg: dict[str, Any], server: dict[str, Any]) -> dict[str, Any]:
    """m3lab.numerics's four checks. The offline reference is the checkpoint the quantize stage made, so a fault
    planted in the served copy (serve.fault) shows as a parity failure."""
    if not cfg["enabled"]:
        return {"verdict": "not run", "reason": "correctness.numerics.enabled is false in the profile"}
    from transformers import AutoTokenizer

    served = ctx.upstream("serve")
    tok = AutoTokenizer.from_pretrained(served["tokenizer_dir"])
    model_dir = ctx.upstream("quantize")["model_dir"]
    return numerics.run_checks(server, cfg, ENGINES.get(server["engine"]).meta, tok,
                               lambda: numerics.OfflineModel(model_dir, tok), ctx.params["needle"]["lengths"],
                               served["max_model_len"], _prefix_cache_off(server.get("argv") or []))


# --------------------------------------------------------------------------------------------------------------
# Accuracy evals, and their baseline measured item by item (params `correctness.baseline`).


def _newest_ok_run(profile: str) -> Path:
    run_dir = newest_ok_run(profile, "correctness")
    if run_dir is None:
        raise paired.Unpaired(f"no run of profile {profile!r} under {results_root() / profile} has a correctness "
                              f"stage that ended ok (run it first: m3lab run {profile})")
    return run_dir


def _rebase(record: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """An eval record read from another run folder, its files found there even if that folder has moved."""
    runs = []
    for r in record.get("runs", []):
        path = Path(r["results_path"])
        if not path.is_file() and "correctness" in path.parts:
            path = run_dir.joinpath(*path.parts[path.parts.index("correctness"):])
        runs.append({**r, "results_path": str(path)})
    return {**record, "runs": runs}


@contextmanager
def baseline_target(ctx: StageContext, base: dict[str, Any] | None, server: dict[str, Any]) -> Iterator[dict | None]:
    """Where the baseline's evals come from, for the duration of the evals: {"server": …} to run them on (a
    second server of the same engine and settings, on the download checkpoint, stopped afterwards), or
    {"run_dir": …} of another profile's run to read them from. None: no baseline in the profile."""
    if not base:
        yield None
        return
    if base.get("checkpoint") != "download":
        try:
            run_dir = _newest_ok_run(base["profile"])
        except paired.Unpaired as e:
            yield {"source": f"profile {base['profile']}", "error": str(e)}
            return
        yield {"source": f"profile {base['profile']}, run {run_dir.name}", "run_dir": run_dir}
        return
    from m3lab import serve  # the serve stage's own start/stop: the server is recorded, so the runner stops it

    cfg = ctx.params["serve"]
    engine = server["engine"]
    served = served_checkpoint(engine, ctx.upstream("download")["model_dir"], cfg.get("text_only", False))
    # Needs room for a second server (on a GPU: memory for both models).
    rec = serve.start_server(engine, served, cfg, ctx.run_dir, name="baseline")
    try:
        yield {"source": f"the download checkpoint, served by a second {engine} server with the same settings",
               "server": {**asdict(rec), "model_dir": served}}
    finally:
        serve.stop_server(asdict(rec))


def with_baseline(record: dict[str, Any], target: dict[str, Any] | None, base: dict[str, Any] | None = None,
                  error: str | None = None) -> dict[str, Any]:
    """The eval record, with `baseline` (its record) and `paired` (m3lab.evals.paired) — or `paired` saying
    `not run (why)`, never a number, when the two cannot be compared item by item."""
    if target is None:
        return {**record, "paired": {"status": "not run", "reason": "no baseline measured (correctness.baseline "
                                                                    "is not set in the profile)"}}
    if record.get("status") != "ok":
        return {**record, "paired": {"status": "not run", "reason": f"the eval itself did not run: "
                                                                    f"{record.get('reason')}"}}
    try:
        if error or base is None:
            raise paired.Unpaired(error or "no baseline record")
        if base.get("status") != "ok":
            raise paired.Unpaired(f"the baseline eval did not run: {base.get('reason')}")
        pair = {**paired.pair_records(record, base), "source": target["source"]}
    except paired.Unpaired as e:
        return {**record, "paired": {"status": "not run", "reason": f"{target['source']}: {e}"}}
    keep = ("status", "score", "stderr", "score_pct", "stderr_pct", "runner_version", "samples", "runs")
    return {**record, "baseline": {k: base.get(k) for k in keep}, "paired": pair}


def _read_baseline(run_dir: Path, ev: dict[str, Any]) -> dict[str, Any]:
    result = read_json(run_dir / "correctness" / "result.json")
    hits = [e for e in result.get("evals", []) if e.get("id") == ev["id"]]
    if not hits:
        raise paired.Unpaired(f"that run has no eval {ev['id']!r}")
    return _rebase(hits[0], run_dir)


def run_evals(ctx: StageContext, cfg: dict[str, Any], server: dict[str, Any]) -> list[dict[str, Any]]:
    """Each eval on this run's server; with a baseline server, the same eval on it at the same time (two
    servers, two lm-eval processes: the pair costs about one eval's wall time on two cores)."""
    if not cfg.get("evals"):
        return []
    out = []
    # The pool outside: on an error or an interrupt the baseline server is stopped first, so the baseline's
    # lm-eval fails at once instead of being waited for.
    with ThreadPoolExecutor(max_workers=1) as pool, baseline_target(ctx, cfg.get("baseline"), server) as target:
        for ev in cfg["evals"]:
            ev_dir = ctx.stage_dir / "evals" / ev["id"]
            future = None
            if target is not None and "server" in target:
                future = pool.submit(evals.run_one, ev, target["server"], ev_dir / "baseline")
            record = evals.run_one(ev, server, ev_dir)
            base, error = None, (target or {}).get("error")
            if future is not None:
                base = future.result()
            elif target is not None and "run_dir" in target:
                try:
                    base = _read_baseline(target["run_dir"], ev)
                except paired.Unpaired as e:
                    error = str(e)
            out.append(with_baseline(record, target, base, error))
    return out
