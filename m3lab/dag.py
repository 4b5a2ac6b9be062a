"""The DAG runner: plans which stages execute and which are reused, then executes them with papermill.

    download → quantize → serve → correctness ┐
                                  → needle      ├→ plot
                                  → benchmark  ┘

The stages are declared once, in `m3lab.registry.STAGES`. A stage's *fingerprint* hashes what decides its
output: the params sections it reads, its notebook's code, the source of every m3lab module its notebook and
module reach by imports (and of the registered implementations its params pick: the engine, the recipe, the
eval runners, the fault), the data files those modules declare, and its upstream stages' fingerprints
(`m3lab.fingerprint`). Nothing is listed by hand.

A stage is *reused* (its small outputs copied into the new run, marked `reused`) only when an earlier run of
the same profile made it with the same fingerprint, it ended ok there, its upstream stages ended the same way
in this run as they did there (a plot made after a failed needle is not reused once the needle passes), and the
big artifacts it lists (`artifacts` in its result.json: checkpoints under `results/.cache`) are still there
with the same content. Otherwise it runs.

`serve` is special: its product is a live process. It runs whenever a stage that needs the server runs, and is
reused (not started) when none does. Every server a run starts is stopped at the end — on success, on failure,
and on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from m3lab import fingerprint, report, serve
from m3lab.digest import verify_artifacts
from m3lab.params import REPO_ROOT, Params, load_params, params_hash
from m3lab.registry import REGISTRIES, STAGES, StageSpec
from m3lab.report import RunReport
from m3lab.stage import newest_ok_run, read_json, results_root, write_json

__all__ = ["STAGES", "RunError", "RunReport", "run", "plan_run", "fingerprints", "stage_modules"]

NOTEBOOKS = REPO_ROOT / "notebooks"


class RunError(RuntimeError):
    """The run cannot start or cannot go on; the message says why."""


def _picked(params: dict[str, Any], path: str) -> list[str]:
    """Values at a params path such as `serve.engine` or `correctness.evals[].runner`."""
    nodes: list[Any] = [params]
    for part in path.split("."):
        many = part.endswith("[]")
        key = part.removesuffix("[]")
        nodes = [n.get(key) for n in nodes if isinstance(n, dict)]
        if many:
            nodes = [x for n in nodes for x in (n or [])]
    return [n for n in nodes if isinstance(n, str)]


def stage_modules(st: StageSpec, params: dict[str, Any]) -> list[str]:
    """Every m3lab module whose code decides this stage's output, for these params."""
    roots = {st.module} | fingerprint.notebook_imports(NOTEBOOKS / st.notebook)
    for kind, path in st.plugins:
        roots |= {REGISTRIES[kind].get(name).module for name in _picked(params, path)}
    return fingerprint.closure(roots)


def fingerprints(params: dict[str, Any]) -> dict[str, str]:
    fps: dict[str, str] = {}
    for st in STAGES.values():
        h = hashlib.sha256()
        h.update(st.name.encode())
        h.update(params_hash(st.slice(params)).encode())
        h.update(fingerprint.notebook_code(NOTEBOOKS / st.notebook).encode())
        mods = stage_modules(st, params)
        fingerprint.digest_files([fingerprint.module_path(m) for m in mods] + fingerprint.data_files(mods), h)
        for d in st.deps:
            h.update(fps[d].encode())
        h.update(_outside_inputs(st.name, params))
        fps[st.name] = h.hexdigest()
    return fps


def _outside_inputs(stage: str, params: dict[str, Any]) -> bytes:
    """What a stage reads from outside this run: the correctness stage's baseline profile run (its newest ok
    run's result), so a re-run of the baseline profile re-runs the comparison instead of reusing it."""
    base = (params.get("correctness") or {}).get("baseline") or {}
    if stage != "correctness" or not base.get("profile"):
        return b""
    run_dir = newest_ok_run(base["profile"], "correctness")
    if run_dir is None:
        return b"baseline: none"
    return hashlib.sha256((run_dir / "correctness" / "result.json").read_bytes()).hexdigest().encode()


# --------------------------------------------------------------------------------------------------------------
# Planning: which stages execute, which are reused.


@dataclass
class StagePlan:
    name: str
    action: str  # "run" | "reuse" | "skip"
    fingerprint: str
    reuse_from: Path | None = None
    reason: str = ""


def _outcome(status: str | None) -> str:
    """What a downstream stage cares about: did its input exist (ok), or not (failed, not run, …)."""
    return "ok" if status in ("ok", "reused") else (status or "not run")


def _earlier_runs(profile_dir: Path) -> list[Path]:
    if not profile_dir.is_dir():
        return []
    return sorted((p for p in profile_dir.iterdir() if p.is_dir() and p.name[:1].isdigit()), reverse=True)


def _find_reusable(profile_dir: Path, st: StageSpec, fp: str, upstream: dict[str, str] | None = None,
                   exclude: Path | None = None, verified: dict[Path, list[str]] | None = None
                   ) -> tuple[Path | None, str]:
    """The newest earlier run whose stage ended ok with this fingerprint, made from the same upstream outcomes
    (when given), and whose artifacts are intact; else (None, why not). `verified` keeps, for one run, what
    re-hashing each result's artifacts found, so the runner's re-check does not read a checkpoint twice."""
    why = ""
    for run in _earlier_runs(profile_dir):
        if run == exclude:
            continue
        status = run / st.name / "status.json"
        if not status.is_file():
            continue
        s = read_json(status)
        if s.get("fingerprint") != fp or s.get("status") not in ("ok", "reused"):
            continue
        made_from = s.get("upstream")
        if made_from is None and st.deps:
            why = why or f"{run.name} did not record its upstream outcomes"
            continue
        if upstream is not None and made_from != upstream:
            why = why or f"{run.name} was made from upstream outcomes {made_from}, this run has {upstream}"
            continue
        result = run / st.name / "result.json"
        if verified is not None and result in verified:
            problems = verified[result]
        else:
            problems = verify_artifacts(read_json(result)) if result.is_file() else []
            if verified is not None:
                verified[result] = problems
        if problems:
            why = why or f"{run.name}'s cached artifacts changed: {problems[0]}"
            continue
        return run / st.name, ""
    return None, why


def plan_run(params: Params, only: str | None = None, from_: str | None = None, force: bool = False,
             root: Path | None = None, verified: dict[Path, list[str]] | None = None) -> list[StagePlan]:
    """What each stage will do, assuming every stage that runs ends ok (the runner re-checks reuse against the
    outcomes it actually gets)."""
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
    ok_upstream = {n: {d: "ok" for d in STAGES[n].deps} for n in names}
    prev = {n: _find_reusable(profile_dir, STAGES[n], fps[n], ok_upstream[n], verified=verified) for n in names}

    serve_needed = any(s.name in selected and (forced or prev[s.name][0] is None)
                       for s in STAGES.values() if s.needs_server)
    plans: dict[str, StagePlan] = {}
    for name in names:
        fp = fps[name]
        found, why_not = prev[name]
        if name == "serve" and serve_needed:
            # The server is a live process, not a file: start it iff a stage that needs it executes.
            plans[name] = StagePlan(name, "run", fp, reason="needed by a stage that runs")
        elif name in selected and (forced or found is None):
            plans[name] = StagePlan(name, "run", fp, reason="forced" if found else (why_not or "new or changed"))
        elif found is not None:
            plans[name] = StagePlan(name, "reuse", fp, reuse_from=found, reason=f"unchanged since {found.parent.name}")
        elif (only is not None and names.index(name) > names.index(only)) or name == "serve":
            plans[name] = StagePlan(name, "skip", fp, reason=f"not needed (--only {only})")
        else:
            raise RunError(
                f"stage {name!r} has no earlier output for these params to reuse ({why_not or 'none made'}), and "
                f"it is not selected; run it first (`m3lab run {params.profile}` or `--from {name}`)"
            )
    return [plans[n] for n in names]


# --------------------------------------------------------------------------------------------------------------
# Running.


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


def _execute_notebook(stage: StageSpec, run_dir: Path, params: Params, sliced: dict[str, Any]) -> None:
    import papermill  # 1-2 s to import: a fully reused run never needs it

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
    params = load_params(profile)
    if params.plan_only:
        raise RunError(f"profile {params.profile} is plan-only (plan_only: true): it describes hardware this "
                       f"profile was never run on; `m3lab plan {params.profile}` prints what it would do")
    profile_dir = (root or results_root()) / params.profile
    with _run_lock(profile_dir), _signals_as_interrupt():
        return _run(params, profile_dir, only, from_, force, echo, root)


class RunLocked(RunError):
    """Another `m3lab run` of this profile is running on this results folder."""


@contextlib.contextmanager
def _run_lock(profile_dir: Path):
    """One run per (profile, results folder) at a time: a second one would reuse the first one's half-made
    stages and write into the same cache folders. The lock is an flock on `<profile_dir>/.run.lock`, so the
    kernel releases it when its holder dies however it dies (a stale lock of a dead pid is simply taken over);
    the file says who holds it."""
    try:
        profile_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(profile_dir / ".run.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunError(f"{profile_dir}: cannot create the run lock ({e.strerror}); is the results folder "
                       f"writable? (set M3LAB_RESULTS to another folder)") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
            raise RunLocked(f"profile {profile_dir.name}: another m3lab run holds {profile_dir / '.run.lock'} "
                            f"({holder}); wait for it, or stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, started {_now()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def _signals_as_interrupt():
    """SIGTERM and SIGHUP (how schedulers, CI and closed terminals stop a job) end a run the way Ctrl-C does:
    servers stopped, the stage and run marked `interrupted`, summary and index written."""
    pending: list[int] = []
    done = threading.Event()

    def interrupt(signum, frame):
        pending.append(signum)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def redeliver():
        # A KeyboardInterrupt raised while Python runs a weakref callback or __del__ is printed as "Exception
        # ignored" and lost (seen: SIGTERM during a notebook stage's garbage collection). Until the runner starts
        # its cleanup (_ignore_further_signals), deliver the signal again every second.
        while not done.wait(1.0):
            if pending and not _CLEANING.is_set():
                signal.pthread_kill(main, pending[-1])  # a real signal: it also wakes a blocking sleep or wait

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    _CLEANING.clear()
    main = threading.main_thread().ident
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    watchdog = threading.Thread(target=redeliver, name="m3lab-signal-redelivery", daemon=True)
    watchdog.start()
    try:
        yield
    finally:
        done.set()
        watchdog.join(timeout=5)  # no re-delivery may land after the default handlers are back
        for sig, handler in saved.items():
            signal.signal(sig, handler)


_CLEANING = threading.Event()  # set once the runner has caught the interrupt and is stopping servers


def _ignore_further_signals() -> None:
    _CLEANING.set()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)


def _run(params: Params, profile_dir: Path, only: str | None, from_: str | None, force: bool,
         echo: Callable[[str], None], root: Path | None) -> RunReport:
    verified: dict[Path, list[str]] = {}  # artifacts re-hashed once per run (m3lab.digest)
    plans = plan_run(params, only=only, from_=from_, force=force, root=root, verified=verified)
    resolved = params.model_dump(mode="json")
    run_id, run_dir = _new_run_dir(profile_dir)
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
            upstream = {d: _outcome(rep.stages.get(d, {}).get("status")) for d in st.deps}
            info["upstream"] = upstream
            blocked = [d for d in st.deps if d in failed]
            if plan.action == "reuse" and not blocked:
                # Re-check against the outcomes this run actually got: a stage made after a failed upstream
                # stage is not what this run's upstream would produce.
                found, why_not = _find_reusable(run_dir.parent, st, plan.fingerprint, upstream, exclude=run_dir,
                                                verified=verified)
                if found is None:
                    plan = StagePlan(plan.name, "run", plan.fingerprint, reason=why_not or "upstream changed")
                    echo(f"{label} cannot be reused ({plan.reason})")
                else:
                    plan.reuse_from = found
            if plan.action == "skip" or (blocked and not st.soft_deps):
                why = plan.reason if plan.action == "skip" else f"upstream failed: {', '.join(blocked)}"
                info.update(status="not run", reason=why)
                if blocked:
                    failed.add(st.name)  # its dependents cannot run either
                echo(f"{label} not run ({why})")
            elif plan.action == "reuse":
                dst = run_dir / st.name
                try:
                    shutil.copytree(plan.reuse_from, dst, ignore=shutil.ignore_patterns("status.json"))
                    info.update(status="reused", reused_from=plan.reuse_from.parent.name, duration_s=0.0)
                    echo(f"{label} reused ({plan.reason})")
                except OSError as e:  # a full or read-only disk: say where, and fail the stage, not the program
                    shutil.rmtree(dst, ignore_errors=True)
                    why = e.strerror or str(e)
                    info.update(status="failed", error=f"copying {plan.reuse_from} to {dst}: {why}")
                    failed.add(st.name)
                    echo(f"{label} failed: {info['error']}")
            else:
                echo(f"{label} running …")
                t0 = time.monotonic()
                try:
                    _execute_notebook(st, run_dir, params, st.slice(resolved))
                    info.update(status="ok")
                except KeyboardInterrupt:
                    _CLEANING.set()  # caught: no more re-deliveries (see _signals_as_interrupt)
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
        _CLEANING.set()
        rep.status = "interrupted"
        echo("m3lab: interrupted — stopping servers")
    finally:
        _ignore_further_signals()  # a second Ctrl-C/SIGTERM must not cut the clean-up short (orphan servers)
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

