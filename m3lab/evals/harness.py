"""Accuracy evals through a harness's CLI (lm-eval; lighteval's command): the real lm-eval harness, run the way a card's users ran it, against the serve stage's server.

An eval in params (one entry of `evals:`):

    id: gsm8k
    runner: lm_eval                 # or lighteval (command built and planned; running it is not wired yet)
    args:                           # lm_eval CLI flags verbatim; true → bare flag, false/null → absent
      --model: local-chat-completions
      --model_args: "model={model},base_url={base_url}/chat/completions,num_concurrent=32,max_gen_toks=16384"
      --tasks: gsm8k
      --num_fewshot: 5
      --batch_size: 1
      --apply_chat_template: true
      --fewshot_as_multiturn: true
    seeds: [42, 1234, 4158]         # one lm_eval run per seed (--seed N); absent/[] → one run, lm-eval's defaults
    metric: "exact_match,flexible-extract"   # a key of lm-eval's results[task]
    task: gsm8k                     # optional: whose results to read (default: the one task in --tasks)
    limit: null                     # optional --limit, for smoke runs
    timeout_s: 21600                # optional, per seed run
    env: {}                         # optional extra environment for lm_eval

Placeholders in string values: `{model}` (the name to send), `{base_url}` (ending in /v1), `{tokenizer}` (the
folder the server loads). Only these three are replaced, so JSON values (`--metadata`, `--gen_kwargs`) keep
their braces. m3lab adds `--seed`, `--output_path` and, when a task is one m3lab ships (m3lab/tasks/),
`--include_path`, and `--log_samples` (one record per item, for paired comparisons); everything else is the
card's command line as typed.

lm-eval 0.4.13 writes `<output_path>/<model name sanitized>/results_<ISO time>.json` (and `samples_<task>_<time>
.jsonl` with --log_samples); each seed gets its own output folder, so the newest results file there is this
run's. Scores are fractions (0..1), as lm-eval reports them.
"""

from __future__ import annotations

import importlib
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from m3lab import procs
from m3lab.params import Eval
from m3lab.procs import ensure_alive
from m3lab.stage import StageError, write_json

__all__ = ["TASKS_DIR", "OFFLINE_ENV", "EvalError", "SeedRun", "EvalResult", "local_tasks", "check_eval",
           "task_names", "build_command", "display_command", "parse_results", "run_eval"]

TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"
# The lm-eval tasks m3lab ships, and the items its tiny_arith task reads (m3lab.fingerprint).
DATA = ("tasks/*", "assets/tiny-m3/arith_eval.jsonl")
RESERVED = ("--seed", "--output_path")  # m3lab owns these: seeds come from `seeds`, output from the run folder
# Nothing may be fetched at eval time: a Hub task whose dataset is not cached fails fast instead of hanging.
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
PLACEHOLDERS = ("model", "base_url", "tokenizer")


class EvalError(StageError):
    """An eval could not run or its results could not be read; the message names the eval and says why."""


@dataclass
class SeedRun:
    seed: int | None  # None: lm-eval's default seeds (no --seed)
    score: float
    stderr: float | None  # lm-eval's per-run stderr; None where it reports "N/A"
    samples: int  # documents scored (after --limit)
    command: str  # exactly what ran, as a user would type it
    log_path: str
    results_path: str
    wall_s: float


@dataclass
class EvalResult:
    id: str
    runner: str
    runner_version: str
    task: str
    metric: str
    score: float  # mean over seeds
    stderr: float | None  # mean of the per-seed stderrs (see _summarize for why not / sqrt(k))
    seed_std: float | None  # spread across seeds (sample std); None with one seed
    samples: int  # per run
    limit: float | None
    runs: list[SeedRun] = field(default_factory=list)


def _where(ev: dict[str, Any]) -> str:
    return f"evals[{ev.get('id', '?')}]"


def local_tasks() -> dict[str, Path]:
    """{task name: yaml} for the tasks m3lab ships. A line scan: the YAMLs use lm-eval's `!function` tag."""
    out = {}
    for yaml_path in sorted(TASKS_DIR.glob("*.yaml")):
        for line in yaml_path.read_text(encoding="utf-8").splitlines():
            if line.startswith("task:"):
                out[line.split(":", 1)[1].split("#")[0].strip().strip("'\"")] = yaml_path
    return out


def check_eval(ev: dict[str, Any]) -> dict[str, Any]:
    """Validate an eval entry and fill its defaults; raises EvalError naming the eval and the field."""
    where = _where(ev)
    if not isinstance(ev.get("id"), str) or not ev["id"]:
        raise EvalError(f"{where}.id: a non-empty string is required")
    runner = ev.get("runner", "lm_eval")
    if runner not in ("lm_eval", "lighteval"):
        raise EvalError(f"{where}.runner: {runner!r} is not a command-line harness (lm_eval, lighteval)")
    args = ev.get("args")
    if not isinstance(args, dict) or not args:
        raise EvalError(f"{where}.args: a mapping of lm_eval flags is required (e.g. {{'--tasks': 'gsm8k'}})")
    if bad := [k for k in args if not str(k).startswith("-")]:
        raise EvalError(f"{where}.args: {bad} are not flags; write them as typed, e.g. '--tasks'")
    if clash := [k for k in RESERVED if k in args]:
        raise EvalError(f"{where}.args: {clash} are set by m3lab (seeds: `seeds:`, output: the run folder)")
    if "--limit" in args and ev.get("limit") is not None:
        raise EvalError(f"{where}: both args['--limit'] and limit are set; keep one")
    if not args.get("--tasks"):
        raise EvalError(f"{where}.args: --tasks is required")
    if runner == "lighteval":
        # lighteval's CLI is positional (`lighteval endpoint litellm MODEL_ARGS TASKS`): the two positionals go
        # under the names lighteval's docs give them, --model_args and --tasks.
        if not args.get("--model_args"):
            raise EvalError(f"{where}.args: --model_args is required for lighteval (its MODEL_ARGS positional)")
        if not isinstance(ev.get("metric"), str) or not ev["metric"]:
            raise EvalError(f"{where}.metric: lighteval's metric name is required, e.g. 'math_pass@1:1_samples'")
    elif not isinstance(ev.get("metric"), str) or "," not in ev["metric"]:
        raise EvalError(f"{where}.metric: lm-eval's results key is required, e.g. 'exact_match,flexible-extract'")
    seeds = ev.get("seeds") or [None]
    if not isinstance(seeds, list) or not all(s is None or (isinstance(s, int) and not isinstance(s, bool))
                                              for s in seeds):
        raise EvalError(f"{where}.seeds: a list of integers is required, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise EvalError(f"{where}.seeds: {seeds} repeats a seed")
    tasks = task_names(args)
    task = ev.get("task") or (tasks[0] if len(tasks) == 1 else None)
    if task is None:
        raise EvalError(f"{where}.task: --tasks names {tasks}; say which task's {ev['metric']!r} to report")
    # Defaults (timeout, env, limit) come from the params schema, their only declaration.
    fields = {k: v for k, v in ev.items() if k in Eval.model_fields and k not in ("seeds", "task")}
    filled = Eval.model_validate(fields).model_dump(mode="json")
    return {**filled, "runner": runner, "seeds": seeds, "task": task}


def task_names(args: dict[str, Any]) -> list[str]:
    """--tasks as lm-eval splits it (comma or space separated; a YAML list is accepted too)."""
    value = args.get("--tasks")
    parts = value if isinstance(value, list) else str(value).replace(",", " ").split()
    return [str(p) for p in parts if str(p)]


def _server_dict(server: Any) -> dict[str, Any]:
    return asdict(server) if is_dataclass(server) else dict(server)


def _fill(value: str, server: dict[str, Any]) -> str:
    """Replace our three placeholders only; str.format would choke on the braces of JSON values."""
    fills = {"model": server["model"], "base_url": server["base_url"].rstrip("/"),
             "tokenizer": server.get("model_dir") or server["model"]}
    for name in PLACEHOLDERS:
        value = value.replace("{" + name + "}", str(fills[name]))
    return value


def _flags(args: dict[str, Any], server: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for flag, value in args.items():
        if value is True:
            out.append(flag)  # --apply_chat_template: lm-eval's boolean flags take no value
        elif value is False or value is None:
            continue
        elif isinstance(value, dict):
            out += [flag, _fill(json.dumps(value), server)]
        elif isinstance(value, list):
            out += [flag, ",".join(_fill(str(v), server) for v in value)]
        else:
            out += [flag, _fill(str(value), server)]
    return out


def build_command(ev: dict[str, Any], server: Any, output_dir: str | Path, seed: int | None) -> list[str]:
    """The lm_eval command line (first word `lm_eval`) for one seed; `seed=None` adds no --seed."""
    ev = check_eval(ev)
    server = _server_dict(server)
    if ev["runner"] == "lighteval":
        return _lighteval_command(ev, server, output_dir, seed)
    argv = ["lm_eval", *_flags(ev["args"], server)]
    ours = [t for t in task_names(ev["args"]) if t in local_tasks()]
    if ours:
        given = ev["args"].get("--include_path")
        if given and Path(given).resolve() != TASKS_DIR:
            raise EvalError(f"{_where(ev)}.args: --include_path {given} given, but {ours} live in {TASKS_DIR} "
                            f"(lm-eval takes one include path)")
        if not given:
            argv += ["--include_path", str(TASKS_DIR)]
    if ev["limit"] is not None:
        argv += ["--limit", str(ev["limit"])]
    if seed is not None:
        argv += ["--seed", str(seed)]
    if "--log_samples" not in ev["args"]:
        argv.append("--log_samples")  # one record per item: what paired comparisons (m3lab.evals.paired) read
    return argv + ["--output_path", str(output_dir)]


def _lighteval_command(ev: dict[str, Any], server: dict[str, Any], output_dir: str | Path,
                       seed: int | None) -> list[str]:
    """`lighteval endpoint litellm MODEL_ARGS TASKS --output-dir DIR [flags]` — {seed} fills into MODEL_ARGS
    (lighteval takes the seed inside its generation_parameters)."""
    args = dict(ev["args"])
    model_args = _fill(str(args.pop("--model_args")), server).replace("{seed}", "" if seed is None else str(seed))
    tasks = ",".join(task_names({"--tasks": args.pop("--tasks")}))
    limit = ["--max-samples", str(ev["limit"])] if ev["limit"] is not None else []
    return ["lighteval", "endpoint", "litellm", model_args, tasks, *_flags(args, server), *limit,
            "--output-dir", str(output_dir)]


def display_command(argv: list[str]) -> str:
    return shlex.join(argv)


def _executable(argv: list[str]) -> list[str]:
    """lm_eval from this interpreter's environment: the one that has m3lab's pinned lm-eval."""
    return [sys.executable, "-m", "lm_eval", *argv[1:]]


def _metadata(args: dict[str, Any]) -> dict[str, Any]:
    """--metadata as lm-eval reads it: a JSON object, or key=value pairs."""
    value = args.get("--metadata")
    if isinstance(value, dict) or not value:
        return dict(value or {})
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return dict(kv.split("=", 1) for kv in str(value).replace(",", " ").split() if "=" in kv)


def _preflight(ev: dict[str, Any]) -> None:
    """Let m3lab's own tasks check their inputs (e.g. tiny_arith's jsonl) before lm-eval's slow start."""
    for task in task_names(ev["args"]):
        if task not in local_tasks():
            continue
        try:
            module = importlib.import_module(f"m3lab.tasks.{task}")
        except ModuleNotFoundError:
            continue
        if hasattr(module, "preflight"):
            try:
                module.preflight(_metadata(ev["args"]))
            except (FileNotFoundError, ValueError) as e:
                raise EvalError(f"{_where(ev)}: {e}") from e


def _stderr(value: Any) -> float | None:
    """lm-eval writes "N/A" where it has no stderr (one sample, or bootstrap off)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def _samples(results: dict[str, Any], task: str) -> int:
    """Documents scored: n-samples' `effective` (after --limit); a group's is the sum over its leaves."""
    n = results.get("n-samples", {})
    if task in n:
        return int(n[task]["effective"])
    subtasks = results.get("group_subtasks", {}).get(task, [])
    return sum(_samples(results, t) for t in subtasks)


def parse_results(path: str | Path, task: str, metric: str) -> tuple[float, float | None, int, str]:
    """(score, stderr, samples, lm_eval version) from one lm-eval results JSON."""
    results = json.loads(Path(path).read_text(encoding="utf-8"))
    per_task = results.get("results", {})
    if task not in per_task:
        raise EvalError(f"{path}: no results for task {task!r}; tasks there: {sorted(per_task)}")
    row = per_task[task]
    if metric not in row:
        keys = sorted(k for k in row if "," in k and "_stderr," not in k)
        raise EvalError(f"{path}: task {task!r} has no metric {metric!r}; metrics there: {keys}")
    name, _, filt = metric.partition(",")
    return (float(row[metric]), _stderr(row.get(f"{name}_stderr,{filt}")), _samples(results, task),
            str(results.get("lm_eval_version", "")))


def _newest_results(output_dir: Path, since: float) -> Path | None:
    # 1 s of slack: file mtimes can be coarser than time.time()
    found = [p for p in output_dir.rglob("results_*.json") if p.stat().st_mtime >= since - 1]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _run_once(ev: dict[str, Any], server: dict[str, Any], seed_dir: Path, seed: int | None) -> SeedRun:
    argv = build_command(ev, server, seed_dir, seed)
    command = display_command(argv)
    log_path = seed_dir / "lm_eval.log"
    seed_dir.mkdir(parents=True, exist_ok=True)
    log_path.write_text(f"$ {command}\n", encoding="utf-8")  # the log says what produced it
    where = f"{_where(ev)} (seed {seed if seed is not None else 'lm-eval default'})"
    t0 = time.time()
    proc = procs.start_detached(_executable(argv), log_path, env={**OFFLINE_ENV, **ev["env"]})
    try:
        rc = proc.wait(timeout=ev["timeout_s"])
    except subprocess.TimeoutExpired:
        procs.stop_process_tree(proc.pid, grace_s=10)
        raise EvalError(f"{where}: lm_eval did not finish in {ev['timeout_s']:.0f}s (raise timeout_s?); "
                        f"command: {command}\nlog tail of {log_path}:\n{procs.log_tail(log_path)}") from None
    except BaseException:  # interrupted: leave no orphan hammering the server
        procs.stop_process_tree(proc.pid, grace_s=5)
        raise
    wall_s = time.time() - t0
    if rc != 0:
        ensure_alive(server)  # a dead server is the real cause: say so, with *its* log tail
        raise EvalError(f"{where}: lm_eval exited with status {rc}; command: {command}\n"
                        f"log tail of {log_path}:\n{procs.log_tail(log_path)}")
    results_path = _newest_results(seed_dir, t0)
    if results_path is None:
        raise EvalError(f"{where}: lm_eval exited 0 but wrote no results_*.json under {seed_dir}; "
                        f"log tail of {log_path}:\n{procs.log_tail(log_path)}")
    score, stderr, samples, _ = parse_results(results_path, ev["task"], ev["metric"])
    return SeedRun(seed=seed, score=score, stderr=stderr, samples=samples, command=command,
                   log_path=str(log_path), results_path=str(results_path), wall_s=round(wall_s, 2))


def _summarize(runs: list[SeedRun]) -> tuple[float, float | None, float | None]:
    """(mean, stderr, seed_std). Every seed scores the same documents, so the documents' sampling error does
    not shrink with more seeds: the stderr of the mean is the per-run stderr (averaged), not that / sqrt(k).
    What seeds do average out is generation randomness; seed_std shows how much there was."""
    scores = [r.score for r in runs]
    errs = [r.stderr for r in runs]
    stderr = statistics.fmean(errs) if all(e is not None for e in errs) else None
    return statistics.fmean(scores), stderr, (statistics.stdev(scores) if len(scores) > 1 else None)


def run_eval(ev: dict[str, Any], server: Any, output_dir: str | Path) -> EvalResult:
    """Run one eval, one lm_eval process per seed, in order; writes `<output_dir>/eval.json` and returns it."""
    ev = check_eval(ev)
    server = _server_dict(server)
    output_dir = Path(output_dir).resolve()  # lm_eval's cwd is ours, but keep paths unambiguous in records
    if ev["runner"] == "lighteval":
        # m3lab builds lighteval's command (see `m3lab plan`) but does not install or parse lighteval yet.
        raise EvalError(f"{_where(ev)}: the lighteval runner is not wired into m3lab's environment yet; "
                        f"its command would be: {display_command(build_command(ev, server, output_dir, ev['seeds'][0]))}")
    _preflight(ev)
    ensure_alive(server)  # a dead server now: fail at once, not after lm-eval's start-up and retries
    runs = []
    for seed in ev["seeds"]:
        seed_dir = output_dir / ("seed-default" if seed is None else f"seed{seed}")
        runs.append(_run_once(ev, server, seed_dir, seed))
    if len({r.samples for r in runs}) > 1:
        raise EvalError(f"{_where(ev)}: seeds scored different numbers of documents "
                        f"({[r.samples for r in runs]}); their mean would mix different test sets")
    score, stderr, seed_std = _summarize(runs)
    version = parse_results(runs[0].results_path, ev["task"], ev["metric"])[3]
    result = EvalResult(id=ev["id"], runner=ev["runner"], runner_version=version, task=ev["task"],
                        metric=ev["metric"], score=score, stderr=stderr, seed_std=seed_std,
                        samples=runs[0].samples, limit=ev["limit"], runs=runs)
    write_json(output_dir / "eval.json", asdict(result))
    return result
