"""`m3lab plan PARAMS`: everything a profile would run, printed without running anything.

Per stage, the exact command or call (download repo/revision/patterns; the quantization recipe as the card's
tool takes it; the full server line; each eval command per seed; the needle grid; the benchmark sweep), then a
memory plan — weights per GPU and KV-cache capacity at the profile's max model length — computed from the model
config, the quantization's bits per weight and the parallelism (`m3lab.memplan`). A plan whose weights cannot
fit on the profile's GPUs is an error that names the profile and the numbers.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any

from m3lab import memplan
from m3lab.memplan import PlanError  # the profile cannot work as declared (e.g. its weights do not fit)
from m3lab.params import Params
from m3lab.registry import ENGINES, EVAL_RUNNERS, RECIPES
from m3lab.serve import build_command

__all__ = ["Plan", "make_plan", "format_plan", "PlanError"]


@dataclass
class Plan:
    profile: str
    card: dict[str, Any] | None
    stages: dict[str, list[str]] = field(default_factory=dict)  # stage → lines (commands first)
    memory: dict[str, Any] | None = None
    roofline: dict[str, Any] | None = None  # m3lab.memplan.decode_bound_for_params


def _download_lines(p: Params) -> list[str]:
    m, d = p.model, p.download
    if m.source == "embedded":
        return [f"build the tiny MiniMax-M3 (m3lab.tinymodel), publish it as {m.repo_id} on a LocalHub at "
                f"127.0.0.1, then snapshot_download(repo_id={m.repo_id!r}, revision={m.revision!r}, "
                f"allow_patterns={d.allow_patterns})"]
    published = m.use == "published" and m.published
    repo = m.published if published else m.repo_id
    rev = (m.published_revision or "main") if published else m.revision
    lines = [f"snapshot_download(repo_id={repo!r}, revision={rev!r}, allow_patterns={d.allow_patterns}, "
             f"endpoint={d.endpoint or 'https://huggingface.co (or $HF_ENDPOINT)'}), token from ${d.token_env}"]
    if rev in ("main", "master"):
        lines.append(f"note: revision {rev!r} is a branch; pin a 40-hex commit sha to make the run re-runnable")
    return lines


def _quantize_lines(p: Params) -> list[str]:
    q, m = p.quantize, p.model
    if m.use == "published" and m.published:
        return [f"skipped: the card's published {q.recipe} checkpoint {m.published} is downloaded as is "
                f"(model.use: published; set `reproduce` to quantize {m.repo_id} yourself)"]
    entry = RECIPES.get(q.recipe)
    lines = RECIPES.load(q.recipe).plan_lines(q)
    if not entry.meta["implemented"]:
        lines.append(f"note: {q.recipe} is planned, not implemented yet: `m3lab run` stops before quantizing")
    return lines


def _serve_lines(p: Params) -> list[str]:
    m = p.model
    if m.source == "embedded" or m.use != "published":
        model_dir = "results/.cache/quantized/<download>-<recipe>-<hash>"
    else:
        model_dir = f"results/.cache/models/{m.published}/{m.published_revision or 'main'}"
    flavor = ENGINES.load(p.serve.engine).checkpoint_flavor(p.serve.text_only)
    if flavor:
        model_dir += f".text-{flavor}"
    argv = build_command(p.serve.engine, model_dir, p.serve.model_dump(mode="json"), p.serve.port or 8000)
    lines = [shlex.join(argv)]
    if p.serve.env:
        lines.append("env: " + " ".join(f"{k}={v}" for k, v in p.serve.env.items()))
    if p.serve.python_path:
        lines.append("PYTHONPATH in front: " + ":".join(p.serve.python_path) + " (engine plugins the profile states)")
    if p.serve.sampling:
        lines.append(f"sampling defaults the card's users set: {p.serve.sampling}")
    if p.hardware.nodes > 1:
        lines.append(f"on a Ray cluster of {p.hardware.nodes} nodes (`ray start --head` / `ray start --address`)")
    return lines


def _correctness_lines(p: Params) -> list[str]:
    c = p.correctness
    lines = [f"{len(c.prompts)} greedy prompts: " + ", ".join(f"{x.id}→{x.expect}" for x in c.prompts),
             "serving parity vs offline transformers greedy" if c.parity.enabled else "parity: off"]
    if c.numerics.enabled:
        n = c.numerics
        lines.append(f"numerics: non-finite outputs, determinism ({n.repeats}× alone + a batch of {n.batch}), "
                     f"parity at lengths {n.lengths or 'of the needle'} + edges {n.edges}, prefix-cache A/B "
                     f"(where the engine has one)")
    if c.baseline is not None:
        src = "the download checkpoint on the same server" if c.baseline.checkpoint else f"profile {c.baseline.profile}"
        lines.append(f"baseline for recoveries: every eval again on {src}, paired item by item (--log_samples)")
    server = {"model": p.serve.served_model_name, "base_url": "http://127.0.0.1:8000/v1", "engine": p.serve.engine}
    for e in c.evals:
        lines += EVAL_RUNNERS.load(e.runner).plan_lines(e.model_dump(mode="json"), server)
    return lines


def _memory(p: Params) -> dict[str, Any] | None:
    if p.hardware.accelerator == "none":
        return None
    return memplan.plan_for_params(p)


def make_plan(p: Params) -> Plan:
    plan = Plan(profile=p.profile, card=p.card.model_dump() if p.card else None)
    plan.stages["download"] = _download_lines(p)
    plan.stages["quantize"] = _quantize_lines(p)
    plan.stages["serve"] = _serve_lines(p)
    plan.stages["correctness"] = _correctness_lines(p)
    plan.stages["needle"] = [f"lengths {p.needle.lengths} × depths {p.needle.depths}% (max_tokens "
                             f"{p.needle.max_tokens}; cells longer than max_model_len {p.model.max_model_len} "
                             f"are marked not run)"]
    b = p.benchmark
    plan.stages["benchmark"] = [f"streaming /v1/completions at concurrency {b.concurrency}: {b.num_prompts} prompts "
                                f"per level, input {b.input_len} / output {b.output_len} tokens, "
                                f"ignore_eos={b.ignore_eos}, seed {b.seed}"]
    plan.stages["plot"] = [f"{len(p.claims)} claims: " + ", ".join(c.id for c in p.claims)] if p.claims else \
        ["no claims"]
    plan.memory = _memory(p)
    plan.roofline = memplan.decode_bound_for_params(p)
    return plan


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.2f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return "; ".join(map(str, v))
    return str(v)


def format_plan(plan: Plan) -> str:
    out = [f"profile {plan.profile}"]
    if plan.card:
        out.append(f"card {plan.card['id']}: {plan.card['title']} — {plan.card['url']}")
        if plan.card.get("seed_file"):
            out.append(f"card text: shared/seeds/{plan.card['seed_file']}")
    for stage, lines in plan.stages.items():
        out.append(f"\n[{stage}]")
        out += [f"  {line}" for line in lines]
    if plan.roofline:
        r = plan.roofline
        out.append("\n[roofline]")
        if r.get("status") == "ok":
            out.append(f"  single-stream decode bound: {r['decode_bound_tok_s']:,.1f} tok/s = {r['gpus']} × "
                       f"{r['bandwidth_gb_s']:g} GB/s over {r['bytes_per_token'] / 1e9:.3f} GB per token "
                       f"({r['weights']}, plus the KV cache at {r['context_tokens']} tokens)")
            out.append(f"  bandwidth source: {r.get('bandwidth_source')}")
        else:
            out.append(f"  not run: {r.get('reason')}")
    if plan.memory:
        out.append("\n[memory plan]")
        out += [f"  {k}: {_fmt(v)}" for k, v in plan.memory.items() if v not in ((), [], None)]
    return "\n".join(out) + "\n"
