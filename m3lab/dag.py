"""The DAG, declared once, and the runner that executes it with papermill.

    download → quantize → serve → correctness ┐
                                  → needle      ├→ plot
                                  → benchmark  ┘

Each stage is a notebook in `notebooks/` plus one `m3lab` module. A stage's *fingerprint* hashes what decides
its output: the params sections it reads, its notebook's code, its module's source, and its upstream stages'
fingerprints. A stage whose fingerprint matches an earlier successful run of the same profile is not executed
again: its (small) outputs are copied into the new run and marked `reused`. Big artifacts (checkpoints) live in
content-addressed folders under `results/.cache`, so they are never copied.

`serve` is special: its product is a live process. It runs whenever a stage that needs the server runs, and is
reused (not started) when none does. Every server a run starts is stopped at the end — on success, on failure,
and on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from m3lab.params import REPO_ROOT, Params, load_params, params_hash
from m3lab.stage import read_json, results_root, write_json

__all__ = ["Stage", "STAGES", "RunError", "RunReport", "run", "plan_run"]

NOTEBOOKS = REPO_ROOT / "notebooks"


class RunError(RuntimeError):
    """The run cannot start or cannot go on; the message says why."""


@dataclass(frozen=True)
class Stage:
    name: str
    notebook: str
    module: str  # m3lab module holding the stage's logic
    sections: tuple[str, ...]  # params sections the stage reads
    deps: tuple[str, ...] = ()
    needs_server: bool = False
    soft_deps: bool = False  # runs even if a dep failed (plot shows what there is)
    sources: tuple[str, ...] = ()  # further files under m3lab/ (globs) whose content decides the stage's output

    def slice(self, params: dict[str, Any]) -> dict[str, Any]:
        return {s: params[s] for s in self.sections}


_ORDER = [
    Stage("download", "01_download.ipynb", "download", ("model", "download"),
          sources=("hub.py", "tinymodel.py", "checkpoint.py", "assets/**/*")),
    Stage("quantize", "02_quantize.ipynb", "quantize", ("quantize",), deps=("download",), sources=("checkpoint.py",)),
    Stage("serve", "03_serve.ipynb", "serve", ("serve", "hardware", "model"), deps=("quantize",),
          sources=("procs.py", "checkpoint.py", "faults.py", "vllm_obs.py")),
    Stage("correctness", "04_correctness.ipynb", "correctness", ("correctness",), deps=("serve",), needs_server=True,
          sources=("client.py", "evals.py", "tasks/*")),
    Stage("needle", "05_needle.ipynb", "needle", ("needle", "model"), deps=("serve",), needs_server=True),
    Stage("benchmark", "06_benchmark.ipynb", "benchmark", ("benchmark",), deps=("serve",), needs_server=True),
    Stage("plot", "07_plot.ipynb", "plot", ("plot", "claims"), deps=("correctness", "needle", "benchmark"),
          soft_deps=True, sources=("claims.py",)),
]
STAGES: dict[str, Stage] = {s.name: s for s in _ORDER}


def _code_of_notebook(path: Path) -> str:
    """Only code cells count: editing markdown or clearing outputs does not invalidate a stage."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


def fingerprints(params: dict[str, Any]) -> dict[str, str]:
    fps: dict[str, str] = {}
    for st in _ORDER:
        h = hashlib.sha256()
        h.update(st.name.encode())
        h.update(params_hash(st.slice(params)).encode())
        h.update(_code_of_notebook(NOTEBOOKS / st.notebook).encode())
        pkg = REPO_ROOT / "m3lab"
        files = [pkg / f"{st.module}.py"] + sorted(f for g in st.sources for f in pkg.glob(g) if f.is_file())
        for f in files:
            h.update(f.relative_to(pkg).as_posix().encode())
            h.update(f.read_bytes())
        for d in st.deps:
            h.update(fps[d].encode())
        fps[st.name] = h.hexdigest()
    return fps


# --------------------------------------------------------------------------------------------------------------
# Planning: which stages execute, which are reused.


@dataclass
class StagePlan:
    name: str
    action: str  # "run" | "reuse" | "skip"
    fingerprint: str
    reuse_from: Path | None = None
    reason: str = ""


def _find_reusable(profile_dir: Path, stage: str, fp: str) -> Path | None:
    """The newest earlier run whose stage finished ok with this fingerprint."""
    if not profile_dir.is_dir():
        return None
    for run in sorted((p for p in profile_dir.iterdir() if p.is_dir() and p.name[:1].isdigit()), reverse=True):
        status = run / stage / "status.json"
        if status.is_file():
            s = read_json(status)
            if s.get("fingerprint") == fp and s.get("status") in ("ok", "reused"):
                return run / stage
    return None


def plan_run(params: Params, only: str | None = None, from_: str | None = None, force: bool = False,
             root: Path | None = None) -> list[StagePlan]:
    for name, flag in ((only, "--only"), (from_, "--from")):
        if name is not None and name not in STAGES:
            raise RunError(f"{flag} {name}: unknown stage; stages: {', '.join(STAGES)}")
    resolved = params.model_dump(mode="json")
    fps = fingerprints(resolved)
    profile_dir = (root or results_root()) / params.profile
    names = list(STAGES)
    if only:
        selected = {only}
    elif from_:
        selected = set(names[names.index(from_):])
    else:
        selected = set(names)
    forced = force or only is not None or from_ is not None

    serve_needed = any((s.name in selected and (forced or _find_reusable(profile_dir, s.name, fps[s.name]) is None))
                       for s in _ORDER if s.needs_server)
    plans: dict[str, StagePlan] = {}
    for name in names:
        fp = fps[name]
        prev = _find_reusable(profile_dir, name, fp)
        if name == "serve" and serve_needed:
            # The server is a live process, not a file: start it iff a stage that needs it executes.
            plans[name] = StagePlan(name, "run", fp, reason="needed by a stage that runs")
        elif name in selected and (forced or prev is None):
            plans[name] = StagePlan(name, "run", fp, reason="forced" if prev else "new or changed")
        elif prev is not None:
            plans[name] = StagePlan(name, "reuse", fp, reuse_from=prev, reason=f"unchanged since {prev.parent.name}")
        elif (only is not None and names.index(name) > names.index(only)) or name == "serve":
            plans[name] = StagePlan(name, "skip", fp, reason=f"not needed (--only {only})")
        else:
            raise RunError(
                f"stage {name!r} has no earlier output for these params to reuse, and it is not selected; "
                f"run it first (`m3lab run {params.profile}` or `--from {name}`)"
            )
    return [plans[n] for n in names]


# --------------------------------------------------------------------------------------------------------------
# Running.


@dataclass
class RunReport:
    profile: str
    run_id: str
    run_dir: Path
    status: str  # ok | failed | interrupted
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def index_html(self) -> Path:
        return self.run_dir / "index.html"


def _new_run_dir(profile_dir: Path) -> tuple[str, Path]:
    profile_dir.mkdir(parents=True, exist_ok=True)
    while True:
        run_id = datetime.now().strftime("%Y%m%d-%H%M%S-") + os.urandom(2).hex()
        run_dir = profile_dir / run_id
        try:
            run_dir.mkdir()  # never overwrite an earlier run
            return run_id, run_dir
        except FileExistsError:
            continue


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def _stderr_to(path: Path):
    """Send this process's fd 2 (and so the kernel's, which inherits it) to a log file while a stage runs: the
    terminal shows progress lines, the stage folder keeps the kernel's chatter (`kernel.log`)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _execute_notebook(stage: Stage, run_dir: Path, params: Params, sliced: dict[str, Any]) -> None:
    import papermill

    out = run_dir / stage.name / f"{stage.notebook}"
    out.parent.mkdir(parents=True, exist_ok=True)
    # tqdm bars (llm-compressor, huggingface_hub) would land in the notebook as widget-less noise.
    os.environ.setdefault("TQDM_DISABLE", "1")
    with _stderr_to(out.parent / "kernel.log"):
        papermill.execute_notebook(
            str(NOTEBOOKS / stage.notebook),
            str(out),
            parameters={"profile": params.profile, "run_dir": str(run_dir), "params": sliced},
            kernel_name="python3",
            progress_bar=False,
            cwd=str(NOTEBOOKS),
            request_save_on_cell_execute=False,
        )


def run(profile: str | Path | None = None, only: str | None = None, from_: str | None = None, force: bool = False,
        echo: Callable[[str], None] = print, root: Path | None = None) -> RunReport:
    """Run the DAG for a profile; returns the report (the run's folder holds everything)."""
    from m3lab import report, serve

    params = load_params(profile)
    plans = plan_run(params, only=only, from_=from_, force=force, root=root)
    resolved = params.model_dump(mode="json")
    run_id, run_dir = _new_run_dir((root or results_root()) / params.profile)
    write_json(run_dir / "params.json", resolved)
    rep = RunReport(params.profile, run_id, run_dir, "ok")
    echo(f"m3lab: profile {params.profile} → {run_dir}")
    t_run = time.monotonic()
    failed: set[str] = set()
    try:
        for i, plan in enumerate(plans, 1):
            st = STAGES[plan.name]
            label = f"[{i}/{len(plans)}] {st.name:<12}"
            info: dict[str, Any] = {"stage": st.name, "fingerprint": plan.fingerprint, "started_at": _now()}
            blocked = [d for d in st.deps if d in failed]
            if plan.action == "skip" or (blocked and not st.soft_deps):
                why = plan.reason if plan.action == "skip" else f"upstream failed: {', '.join(blocked)}"
                info.update(status="not run", reason=why)
                if blocked:
                    failed.add(st.name)  # its dependents cannot run either
                echo(f"{label} not run ({why})")
            elif plan.action == "reuse":
                dst = run_dir / st.name
                shutil.copytree(plan.reuse_from, dst, ignore=shutil.ignore_patterns("status.json"))
                info.update(status="reused", reused_from=plan.reuse_from.parent.name, duration_s=0.0)
                echo(f"{label} reused ({plan.reason})")
            else:
                echo(f"{label} running …")
                t0 = time.monotonic()
                try:
                    _execute_notebook(st, run_dir, params, st.slice(resolved))
                    info.update(status="ok")
                except KeyboardInterrupt:
                    info.update(status="interrupted", duration_s=round(time.monotonic() - t0, 2))
                    write_json(run_dir / st.name / "status.json", info)
                    rep.stages[st.name] = info
                    raise
                except Exception as e:  # papermill keeps the executed notebook with its error cell
                    info.update(status="failed", error=_short_error(e))
                    failed.add(st.name)
                info["duration_s"] = round(time.monotonic() - t0, 2)
                echo(f"{label} {info['status']} ({info['duration_s']:.1f}s)"
                     + (f": {info['error']}" if info["status"] == "failed" else ""))
            info["finished_at"] = _now()
            write_json(run_dir / st.name / "status.json", info)
            rep.stages[st.name] = info
        rep.status = "failed" if failed else "ok"
    except KeyboardInterrupt:
        rep.status = "interrupted"
        echo("m3lab: interrupted — stopping servers")
    finally:
        stopped = serve.stop_all(run_dir)
        if stopped:
            echo(f"m3lab: stopped {len(stopped)} server(s)")
        report.finish_run(rep, params, duration_s=time.monotonic() - t_run)
    echo(f"m3lab: run {rep.status} in {time.monotonic() - t_run:.1f}s — report: {rep.index_html}")
    if rep.status == "interrupted":
        raise KeyboardInterrupt
    return rep


def _short_error(e: BaseException) -> str:
    """papermill's error text: the exception line of the failing cell (the notebook keeps the traceback)."""
    name = getattr(e, "ename", type(e).__name__)
    value = getattr(e, "evalue", str(e))
    return f"{name}: {value}".strip()[:2000]

