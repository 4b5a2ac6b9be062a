"""Correctness stage: does the served model say the right things, and does the server compute what the model does?

1. Prompt suite (params): each prompt is completed greedily by the server; it passes if every expected substring
   appears in the continuation (card 002 checked "The capital of France is" → Paris, "日本の首都は" → 東京).
2. Serving parity: the server's greedy continuation of each parity prompt against transformers' offline greedy
   continuation of the same checkpoint (`generate(do_sample=False)`). Both texts are tokenized with the
   checkpoint's tokenizer and compared position by position up to the first divergence: the *token match rate*
   is the length of the common prefix over the longer sequence (1.0 = identical). Greedy decoding diverges for
   good after one different token, which is why the prefix is what counts.
3. Accuracy evals (params `correctness.evals`): the real lm-eval harness against the server (`m3lab.evals`),
   one run per seed; the claims ledger reads their scores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from m3lab import evals
from m3lab.client import RequestFailed, complete
from m3lab.stage import StageContext

__all__ = ["PromptResult", "ParityResult", "run_suite", "prefix_match_rate", "offline_greedy", "run_parity",
           "run_one_eval", "run_stage"]


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


def prefix_match_rate(a: list[int], b: list[int]) -> float:
    """Common-prefix length over the longer length; two empty sequences match fully."""
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n / longest


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


def run_stage(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.params["correctness"]
    server = ctx.upstream("serve")["server"]
    suite = run_suite(server, cfg["prompts"], cfg["max_tokens"])
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
    result["evals"] = [evals.run_one(ev, server, ctx.stage_dir / "evals" / ev["id"]) for ev in cfg.get("evals", [])]
    return result
