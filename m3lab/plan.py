"""`m3lab plan PARAMS`: everything a profile would run, printed without running anything.

Per stage, the exact command or call (download repo/revision/patterns; the quantization recipe as the card's
tool takes it; the full server line; each eval command per seed; the needle grid; the benchmark sweep), then a
memory plan — weights per GPU and KV-cache capacity at the profile's max model length — computed from the model
config, the quantization's bits per weight and the parallelism (`m3lab.memplan`). A plan whose weights cannot
fit on the profile's GPUs is an error that names the profile and the numbers.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m3lab.memplan import PlanError  # the profile cannot work as declared (e.g. its weights do not fit)
from m3lab.params import Params
from m3lab.serve import build_command

__all__ = ["Plan", "make_plan", "format_plan", "PlanError"]

MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"


@dataclass
class Plan:
    profile: str
    card: dict[str, Any] | None
    stages: dict[str, list[str]] = field(default_factory=dict)  # stage → lines (commands first)
    memory: dict[str, Any] | None = None


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
    if q.recipe == "none":
        return ["none: the download is served as is"]
    if q.recipe == "fp8_dynamic":
        from m3lab.quantize import DEFAULT_IGNORE

        ignore = q.ignore or list(DEFAULT_IGNORE)
        return ["llmcompressor.oneshot(model=<download>, recipe=QuantizationModifier(targets='Linear', "
                f"scheme='FP8_DYNAMIC', ignore={ignore})) → compressed-tensors, renamed back to the hub layout"]
    if q.recipe == "mxfp4":
        o = q.quark
        return [f"quark LLMTemplate(model_type={o.model_type!r}, kv_layers_name={o.kv_layers_name}, "
                f"q_layer_name={o.q_layer_name!r}, exclude_layers_name={o.exclude_layers_name})",
                f"template.get_config(scheme={o.scheme!r}, exclude_layers={o.exclude_layers})",
                "ModelQuantizer(config).direct_quantize_checkpoint(pretrained_model_path=<download>, "
                "save_path=<out>)" + ("  # file to file, no full model load" if o.file_to_file else "")]
    if q.recipe == "autoround":
        o = q.autoround
        return [f"auto-round mixed {'/'.join(map(str, o.bits))}-bit (average {o.average_bits} bits), group_size "
                f"{o.group_size}, sym={o.sym}",
                f"vLLM hf_overrides the card needed: {json.dumps(o.hf_overrides)}"]
    if q.recipe == "mlx_q4":
        o = q.mlx
        return [f"mlx_lm.convert --hf-path <download> -q --q-bits {o.bits} --q-group-size {o.group_size}  "
                f"# {o.high_bits}-bit on {o.high_bits_modules}; vision tower "
                f"{'kept' if o.keep_vision else 'dropped'}"]
    raise PlanError(f"quantize.recipe: no plan for {q.recipe!r}")


def _serve_lines(p: Params) -> list[str]:
    m = p.model
    if m.source == "embedded" or m.use != "published":
        model_dir = "results/.cache/quantized/<download>-<recipe>-<hash>"
    else:
        model_dir = f"results/.cache/models/{m.published}/{m.published_revision or 'main'}"
    if p.serve.engine == "transformers" or p.serve.text_only:
        model_dir += ".text-" + ("transformers" if p.serve.engine == "transformers" else "vllm")
    argv = build_command(p.serve.engine, model_dir, p.serve.model_dump(mode="json"), p.serve.port or 8000)
    lines = [shlex.join(argv)]
    if p.serve.env:
        lines.append("env: " + " ".join(f"{k}={v}" for k, v in p.serve.env.items()))
    if p.serve.sampling:
        lines.append(f"sampling defaults the card's users set: {p.serve.sampling}")
    if p.hardware.nodes > 1:
        lines.append(f"on a Ray cluster of {p.hardware.nodes} nodes (`ray start --head` / `ray start --address`)")
    return lines


def _correctness_lines(p: Params) -> list[str]:
    c = p.correctness
    lines = [f"{len(c.prompts)} greedy prompts: " + ", ".join(f"{x.id}→{x.expect}" for x in c.prompts),
             "serving parity vs offline transformers greedy" if c.parity.enabled else "parity: off"]
    server = {"model": p.serve.served_model_name, "base_url": "http://127.0.0.1:8000/v1", "engine": p.serve.engine}
    from m3lab import evals

    for e in c.evals:
        if e.runner == "prompt_logprobs_ppl":
            lines.append(f"perplexity of {e.args.get('--data')} through /v1/completions prompt_logprobs, windows of "
                         f"{e.args.get('--window-tokens', 2048)} tokens (max {e.args.get('--max-windows')})")
            continue
        for seed in e.seeds or [None]:  # no seeds: one run with the runner's own default
            argv = evals.build_command(e.model_dump(mode="json"), server, Path(f"<run>/correctness/evals/{e.id}"),
                                       seed)
            lines.append(shlex.join(argv))
    return lines


def _memory(p: Params) -> dict[str, Any] | None:
    if p.hardware.accelerator == "none":
        return None
    from m3lab import memplan

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
    for stage, lines in plan.stages.items():
        out.append(f"\n[{stage}]")
        out += [f"  {line}" for line in lines]
    if plan.memory:
        out.append("\n[memory plan]")
        out += [f"  {k}: {_fmt(v)}" for k, v in plan.memory.items() if v not in ((), [], None)]
    return "\n".join(out) + "\n"
