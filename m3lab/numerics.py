"""Numerics checks of a served model: the failures that make a server return garbage without an error.

vLLM 0.25.1's MiniMax-M3 sparse path returned NaN logits for some prompts (tools/f2/): greedy over NaN picks token
id 0 again and again, a logprobs request gets HTTP 400 ("Out of range float values are not JSON compliant: nan"),
and which prompts fail changes from request to request. Four checks, each with its own verdict, run by the
correctness stage on every profile (params `correctness.numerics`), over probe prompts at every needle length and
at the 128-token block edges (127, 128, 129, 511, 512, 513 by default):

    nonfinite     every probe, greedy with logprobs where the engine returns them: NaN/inf in a returned logprob,
                  an HTTP 400 about NaN, or the NaN signature (a completion of token id 0 only) is a finding with
                  the prompt and its length. The stage goes on with the other probes.
    determinism   the same greedy probes sent alone `repeats` times, then together as one concurrent batch: every
                  answer must equal the first. Reports the mismatch rate.
    parity        teacher-forced: the server's prompt_logprobs against offline transformers log-softmax of the
                  same token ids and checkpoint, per probe length: max and mean |Δ| and top-1 agreement. Engines
                  without prompt_logprobs (transformers serve): greedy continuations against offline greedy,
                  token by token, instead (said so in the record).
    prefix_cache  where the engine has a prefix cache: the same probes cold (a fresh `cache_salt`) and cached
                  (the same salt twice) must give the same tokens and logprobs.

A check that cannot run says `not run` and why; a verdict is `pass` or `fail`, never a number alone.
"""

from __future__ import annotations

import math
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from m3lab.client import RequestFailed, post
from m3lab.evals.ppl import PPLResponseError, token_logprobs

__all__ = ["Probe", "is_nan_error", "zero_token_run", "nan_signature", "prefix_match_rate", "spread", "probe_lengths", "make_probes",
           "check_nonfinite", "check_determinism", "check_parity", "check_prefix_cache", "OfflineModel",
           "run_checks"]

@dataclass
class Probe:
    length: int  # requested prompt tokens
    n_tokens: int  # measured (the checkpoint's tokenizer, special tokens included: what the server counts)
    text: str
    ids: list[int]


def is_nan_error(status: int, body: Any) -> bool:
    """An engine refusing to send NaN (vLLM: "Out of range float values are not JSON compliant: nan")."""
    text = str(body).lower()
    return status == 400 and ("not json compliant" in text or "nan" in text.split() or "'nan'" in text
                              or ": nan" in text)


def zero_token_run(completion_ids: Sequence[int]) -> bool:
    """Greedy over all-NaN logits: argmax is the first index, so the answer is token id 0 repeated."""
    return len(completion_ids) >= 2 and all(t == 0 for t in completion_ids)


def nan_signature(text: str, ids: Sequence[int], finish_reason: Any, max_tokens: int) -> str | None:
    """What greedy over NaN logits looks like from outside, or None. Token id 0 is usually a special token
    that decodes to nothing, so the answer is an empty text that still ran to max_tokens ("length")."""
    if zero_token_run(ids):
        return "token id 0 repeated (NaN logits under greedy)"
    if max_tokens >= 2 and not text.strip() and finish_reason == "length":
        return "an empty answer that ran to max_tokens (token id 0, a special token, repeated: NaN logits)"
    return None


def prefix_match_rate(a: Sequence[int], b: Sequence[int]) -> float:
    """Common-prefix length over the longer length; two empty sequences match fully. Greedy decoding diverges
    for good after one different token, which is why the prefix is what counts."""
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n / longest


def spread(items: Sequence[Any], k: int) -> list[Any]:
    """k items spread evenly over a list, first and last included."""
    if k >= len(items):
        return list(items)
    if k <= 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def probe_lengths(needle_lengths: Sequence[int], edges: Sequence[int], max_len: int) -> list[int]:
    """Every needle length and block edge that fits the context (with room for the answer), sorted, unique."""
    return sorted({n for n in [*needle_lengths, *edges] if 0 < n <= max_len})


def make_probes(tokenizer: Any, lengths: Sequence[int], seed: int = 0) -> list[Probe]:
    """Needle-shaped prompts (the needle stage's builder, depth 50) of each length: the prompts the needle stage
    sends, so a fault that breaks it shows here with the same lengths."""
    from m3lab.needle import Haystack, build_prompt, make_key

    hay = Haystack(tokenizer, seed)
    out = []
    for n in lengths:
        p = build_prompt(tokenizer, n, 50.0, make_key(seed, n, 50.0), hay, seed)
        out.append(Probe(n, p.n_tokens, p.text, list(tokenizer(p.text)["input_ids"])))
    return out


# --------------------------------------------------------------------------------------------------------------
# Requests


def _complete(server: dict[str, Any], prompt: Any, max_tokens: int, timeout_s: float,
              **extra: Any) -> tuple[int, Any]:
    body = {"model": server["model"], "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return post(server, "/completions", body, timeout_s)


def _text(body: Any) -> str:
    try:
        return str(body["choices"][0]["text"])
    except (KeyError, IndexError, TypeError):
        raise RequestFailed(f"not a completion answer: {str(body)[:300]}") from None


def _gen_logprobs(body: Any) -> list[Any] | None:
    """choices[0].logprobs.token_logprobs (OpenAI legacy shape), None where the engine returned none."""
    try:
        lp = body["choices"][0].get("logprobs")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    if not isinstance(lp, dict) or lp.get("token_logprobs") is None:
        return None
    return list(lp["token_logprobs"])


def _nonfinite(values: Sequence[Any]) -> int:
    return sum(1 for v in values if isinstance(v, (int, float)) and not math.isfinite(v))


# --------------------------------------------------------------------------------------------------------------
# Checks


def check_nonfinite(server: dict[str, Any], probes: Sequence[Probe], tokenizer: Any, max_tokens: int,
                    logprobs: bool, timeout_s: float) -> dict[str, Any]:
    """One greedy request per probe. Returns the record, plus `answers` (probe length → completion text) that the
    parity fallback reuses."""
    findings, answers, rows = [], {}, []
    for p in probes:
        extra = {"logprobs": 1} if logprobs else {}
        status, body = _complete(server, p.text, max_tokens, timeout_s, **extra)
        row: dict[str, Any] = {"length": p.length, "n_tokens": p.n_tokens, "status": status}
        if status != 200:
            if is_nan_error(status, body):
                findings.append({"length": p.length, "n_tokens": p.n_tokens, "kind": "HTTP 400: NaN",
                                 "detail": str(body)[:300], "prompt_head": p.text[:80]})
                row["finding"] = "HTTP 400: NaN"
                rows.append(row)
                continue
            raise RequestFailed(f"numerics: a {p.n_tokens}-token probe got HTTP {status}: {str(body)[:300]}",
                                status, body)
        text = _text(body)
        answers[p.length] = text
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        lps = _gen_logprobs(body)
        bad = _nonfinite(lps) if lps is not None else 0
        row.update({"completion": text[:80], "logprobs": "returned" if lps is not None else "not returned"})
        if bad:
            findings.append({"length": p.length, "n_tokens": p.n_tokens, "kind": f"{bad} non-finite logprobs",
                             "detail": str(lps)[:200], "prompt_head": p.text[:80]})
            row["finding"] = "non-finite logprobs"
        elif sig := nan_signature(text, ids, body["choices"][0].get("finish_reason"), max_tokens):
            findings.append({"length": p.length, "n_tokens": p.n_tokens, "kind": sig, "detail": repr(text[:40]),
                             "prompt_head": p.text[:80]})
            row["finding"] = sig
        rows.append(row)
    return {"verdict": "fail" if findings else "pass", "probes": len(probes), "findings": findings,
            "logprobs": "requested" if logprobs else "not returned by this engine (only the HTTP 400 and "
                                                      "token-0 signatures are checked)",
            "rows": rows, "answers": answers}


def check_determinism(server: dict[str, Any], probes: Sequence[Probe], max_tokens: int, repeats: int,
                      timeout_s: float) -> dict[str, Any]:
    """Alone `repeats` times each, then all probes at once (one concurrent batch)."""
    def ask(p: Probe) -> str | None:
        status, body = _complete(server, p.text, max_tokens, timeout_s)
        return _text(body) if status == 200 else None  # a NaN 400 is nonfinite's finding; here: a mismatch

    alone = {p.length: [ask(p) for _ in range(repeats)] for p in probes}
    with ThreadPoolExecutor(max_workers=len(probes)) as pool:
        batch = dict(zip([p.length for p in probes], pool.map(ask, probes)))
    rows, mismatches, total = [], 0, 0
    for p in probes:
        first = alone[p.length][0]
        answers = alone[p.length][1:] + [batch[p.length]]
        bad = sum(a != first or a is None for a in answers) + (first is None)
        mismatches += bad
        total += len(answers) + 1
        rows.append({"length": p.length, "first": None if first is None else first[:60],
                     "mismatched": bad, "of": len(answers) + 1,
                     "differing": [a[:60] if a is not None else None for a in answers if a != first][:3]})
    return {"verdict": "fail" if mismatches else "pass", "mismatch_rate": mismatches / total if total else 0.0,
            "requests": total, "repeats_alone": repeats, "batch": len(probes), "rows": rows}


def _top1(entry: Any) -> int | None:
    if not isinstance(entry, dict):
        return None
    for key, value in entry.items():
        if isinstance(value, dict) and value.get("rank") == 1:
            return int(key)
    return None


def check_parity(server: dict[str, Any], probes: Sequence[Probe], offline: "OfflineModel", prompt_logprobs: bool,
                 max_tokens: int, answers: dict[int, str], tokenizer: Any, max_mean_abs_delta: float,
                 min_top1: float, timeout_s: float, top1_margin: float = 0.5) -> dict[str, Any]:
    rows, ok = [], True
    if prompt_logprobs:
        for p in probes:
            status, body = _complete(server, p.ids, 1, timeout_s, prompt_logprobs=1)
            row: dict[str, Any] = {"length": p.length, "n_tokens": p.n_tokens}
            if status != 200:
                if not is_nan_error(status, body):
                    raise RequestFailed(f"numerics parity: HTTP {status} for a {p.n_tokens}-token probe: "
                                        f"{str(body)[:300]}", status, body)
                rows.append({**row, "passed": False, "finding": "HTTP 400: NaN"})
                ok = False
                continue
            entries = body["choices"][0].get("prompt_logprobs") or body.get("prompt_logprobs")
            try:
                served = token_logprobs(entries, p.ids)
            except PPLResponseError as e:
                rows.append({**row, "passed": False, "finding": f"unreadable prompt_logprobs: {e}"})
                ok = False
                continue
            ref_lp, ref_top1, ref_margin = offline.token_logprobs(p.ids)
            deltas = [abs(s - r) for s, r in zip(served[1:], ref_lp[1:])]
            nonfinite = sum(not math.isfinite(s) for s in served[1:])
            pairs = [(_top1(e), t, m) for e, t, m in zip(entries[1:], ref_top1[1:], ref_margin[1:])
                     if _top1(e) is not None]
            top1 = sum(a == t for a, t, _ in pairs) / len(pairs) if pairs else float("nan")
            # Where the reference's top-1 leads by less than top1_margin nats, bf16 rounding alone can swap the
            # two (measured on the H200: max |Δ| 0.13 nats between vLLM and transformers, same bf16 weights):
            # the verdict counts only the positions where the reference is sure.
            sure = [(a, t) for a, t, m in pairs if m >= top1_margin]
            top1_sure = sum(a == t for a, t in sure) / len(sure) if sure else float("nan")
            mean_d = sum(deltas) / len(deltas) if deltas else 0.0
            passed = (nonfinite == 0 and math.isfinite(mean_d) and mean_d <= max_mean_abs_delta
                      and (not sure or top1_sure >= min_top1))
            ok &= passed
            rows.append({**row, "max_abs_delta": max(deltas, default=0.0), "mean_abs_delta": mean_d,
                         "top1_agreement": top1, "top1_agreement_sure": top1_sure, "sure_positions": len(sure),
                         "nonfinite": nonfinite, "passed": passed})
        method = ("teacher-forced: the server's prompt_logprobs against offline transformers log-softmax of the "
                  "same token ids")
    else:
        for p in probes:
            if p.length not in answers:
                rows.append({"length": p.length, "n_tokens": p.n_tokens, "passed": False,
                             "finding": "no server answer (see nonfinite)"})
                ok = False
                continue
            ref = offline.greedy(p.ids, max_tokens)
            served_ids = tokenizer(answers[p.length], add_special_tokens=False)["input_ids"]
            ref_ids = tokenizer(ref, add_special_tokens=False)["input_ids"]
            rate = prefix_match_rate(served_ids, ref_ids)
            ok &= rate >= 1.0
            rows.append({"length": p.length, "n_tokens": p.n_tokens, "token_match_rate": rate,
                         "server": answers[p.length][:60], "offline": ref[:60], "passed": rate >= 1.0})
        method = ("greedy continuations against offline transformers greedy, token by token (the engine returns "
                  "no prompt_logprobs)")
    return {"verdict": "pass" if ok else "fail", "method": method, "rows": rows,
            "tolerance": {"max_mean_abs_delta": max_mean_abs_delta, "min_top1": min_top1,
                          "top1_margin": top1_margin}}


def check_prefix_cache(server: dict[str, Any], probes: Sequence[Probe], max_tokens: int,
                       timeout_s: float) -> dict[str, Any]:
    """Cold (a salt never used) against cached (one salt, twice: the second request reads the cached blocks).
    An engine that refuses `cache_salt` (a 400 that is not about NaN) makes the check `not run`, not red."""
    def ask(p: Probe, salt: str) -> tuple[int, Any]:
        return _complete(server, p.text, max_tokens, timeout_s, logprobs=1, cache_salt=salt)

    rows, ok = [], True
    for p in probes:
        status, cold = ask(p, uuid.uuid4().hex)
        if status != 200 and not is_nan_error(status, cold):
            return {"verdict": "not run", "reason": f"the engine refused a cache_salt request (HTTP {status}: "
                                                    f"{str(cold)[:200]})"}
        salt = uuid.uuid4().hex
        ask(p, salt)
        status2, cached = ask(p, salt)
        texts = [_text(b) if s == 200 else None for s, b in ((status, cold), (status2, cached))]
        same = texts[0] is not None and texts[0] == texts[1]
        lp_delta = None
        lps = [_gen_logprobs(b) if s == 200 else None for s, b in ((status, cold), (status2, cached))]
        if same and lps[0] and lps[1]:
            pairs = [(a, b) for a, b in zip(lps[0], lps[1]) if isinstance(a, (int, float)) and isinstance(b, (int, float))]
            lp_delta = max((abs(a - b) for a, b in pairs), default=0.0)
        ok &= same
        rows.append({"length": p.length, "same_tokens": same, "max_logprob_delta": lp_delta,
                     "cold": None if texts[0] is None else texts[0][:60],
                     "cached": None if texts[1] is None else texts[1][:60]})
    return {"verdict": "pass" if ok else "fail", "rows": rows}


# --------------------------------------------------------------------------------------------------------------
# The offline reference: transformers on the checkpoint the server was given (before any planted fault).


class OfflineModel:
    def __init__(self, model_dir: str, tokenizer: Any) -> None:
        import torch
        from transformers import AutoModelForImageTextToText

        self.torch, self.tokenizer = torch, tokenizer
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype="auto").to(self.device).eval()

    def token_logprobs(self, ids: Sequence[int]) -> tuple[list[float | None], list[int | None], list[float | None]]:
        """(logprob of each prompt token given the ones before it, the argmax there, the margin of that argmax
        over the runner-up in nats); None for the first token."""
        torch = self.torch
        with torch.inference_mode():
            x = torch.tensor([list(ids)], device=self.device)
            logits = self.model(input_ids=x).logits[0].float()
            lp = torch.log_softmax(logits[:-1], dim=-1)
            actual = lp.gather(1, x[0, 1:, None])[:, 0].tolist()
            top2 = lp.topk(2, dim=-1)
            top1 = top2.indices[:, 0].tolist()
            margin = (top2.values[:, 0] - top2.values[:, 1]).tolist()
        return [None, *actual], [None, *top1], [None, *margin]

    def greedy(self, ids: Sequence[int], max_tokens: int) -> str:
        torch = self.torch
        with torch.inference_mode():
            x = torch.tensor([list(ids)], device=self.device)
            out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens,
                                      do_sample=False)
        return self.tokenizer.decode(out[0, x.shape[1]:].tolist(), skip_special_tokens=True)


def run_checks(server: dict[str, Any], cfg: dict[str, Any], engine_meta: dict[str, Any], tokenizer: Any,
               offline_factory: Callable[[], OfflineModel] | None, needle_lengths: Sequence[int], max_len: int,
               prefix_cache_off: str | None = None) -> dict[str, Any]:
    """All four checks (see the module docstring); `cfg` is params `correctness.numerics`."""
    lengths = probe_lengths(cfg["lengths"] or needle_lengths, cfg["edges"], max_len - cfg["max_tokens"])
    probes = make_probes(tokenizer, lengths, cfg["seed"])
    timeout = cfg["request_timeout_s"]
    out: dict[str, Any] = {"lengths": lengths, "measured_tokens": [p.n_tokens for p in probes]}
    nonfinite = check_nonfinite(server, probes, tokenizer, cfg["max_tokens"], bool(engine_meta.get("logprobs")),
                                timeout)
    answers = nonfinite.pop("answers")
    out["nonfinite"] = nonfinite
    if offline_factory is None:
        out["parity"] = {"verdict": "not run", "reason": "no offline reference for this checkpoint"}
    else:
        out["parity"] = check_parity(server, probes, offline_factory(), bool(engine_meta.get("prompt_logprobs")),
                                     cfg["max_tokens"], answers, tokenizer, cfg["max_mean_abs_delta"],
                                     cfg["min_top1"], timeout, cfg["top1_margin"])
    some = spread(probes, cfg["batch"])
    if not engine_meta.get("prefix_cache"):
        out["prefix_cache"] = {"verdict": "not run", "reason": "the engine has no prefix cache"}
    elif prefix_cache_off:
        out["prefix_cache"] = {"verdict": "not run", "reason": prefix_cache_off}
    else:
        # Other haystacks than the probes above (seed + 1): the "cold" request is then the first ever sent with
        # its text, even on an engine that ignores cache_salt.
        fresh = make_probes(tokenizer, [p.length for p in some], cfg["seed"] + 1)
        out["prefix_cache"] = check_prefix_cache(server, fresh, cfg["max_tokens"], timeout)
    # Last: its concurrent batch is what crashed vLLM 0.25.1 (a dead server fails the stage with its log tail).
    out["determinism"] = check_determinism(server, some, cfg["max_tokens"], cfg["repeats"], timeout)
    checks = [out[k]["verdict"] for k in ("nonfinite", "determinism", "parity", "prefix_cache")]
    out["verdict"] = "fail" if "fail" in checks else "pass"
    return out
