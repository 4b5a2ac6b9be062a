"""The run's products for people and for scripts: per-stage HTML, index.html, summary.json, provenance.json.

Every HTML page is self-contained: nbconvert's `basic` template (no CDN scripts) inside a small page of our
own, images inlined as data URIs. `summary.json` holds every headline number of the run in one place; its keys
are documented in the README ("summary.json") and built by `headline()` below, one small function per stage.
A stage that did not run contributes `{"status": "not run", "reason": ...}` — never a number.
"""

from __future__ import annotations

import html
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import m3lab
from m3lab.digest import folder_manifest
from m3lab.params import REPO_ROOT, Params, params_hash
from m3lab.registry import STAGES
from m3lab.stage import read_json, write_json

__all__ = ["RunReport", "notebook_to_html", "headline", "build_summary", "provenance", "write_index", "finish_run"]

SUMMARY_SCHEMA = "m3lab.summary/1"


@dataclass
class RunReport:
    """What the runner hands over at the end of a run: which stages did what (their status.json contents)."""

    profile: str
    run_id: str
    run_dir: Path
    status: str  # ok | failed | interrupted
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def index_html(self) -> Path:
        return self.run_dir / "index.html"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1b1f23;line-height:1.45}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}th,td{border:1px solid #d0d7de;padding:.3em .6em;
text-align:left;vertical-align:top}th{background:#f6f8fa}pre{background:#f6f8fa;padding:.6em;overflow-x:auto;
font-size:.85em}img{max-width:100%}.ok{color:#1a7f37;font-weight:600}.failed,.interrupted{color:#cf222e;
font-weight:600}.reused{color:#6e7781}.notrun{color:#9a6700}.jp-InputPrompt,.jp-OutputPrompt{display:none}
.jp-Cell{margin:.4em 0}.jp-InputArea-editor{background:#f6f8fa;padding:.2em .6em;border-left:3px solid #d0d7de}
.jp-RenderedText pre,.jp-OutputArea-output pre{background:none;padding:0}
"""

PACKAGES = ["m3lab", "torch", "transformers", "vllm", "llmcompressor", "compressed-tensors", "lm_eval",
            "papermill", "huggingface_hub", "pandas", "matplotlib", "tokenizers", "safetensors"]


def _page(title: str, body: str) -> str:
    from pygments.formatters import HtmlFormatter

    css = _CSS + HtmlFormatter().get_style_defs(".highlight")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{css}</style></head><body>\n{body}\n</body></html>\n")


def notebook_to_html(notebook: Path, out: Path, title: str) -> Path:
    """Executed notebook → one self-contained HTML page (no external scripts or stylesheets)."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(notebook), as_version=4)
    body, _ = HTMLExporter(template_name="basic").from_notebook_node(nb)
    back = '<p><a href="../index.html">← run index</a></p>'
    out.write_text(_page(title, back + body), encoding="utf-8")
    return out


# --------------------------------------------------------------------------------------------------------------
# Headline numbers, one extractor per stage: result.json → the few numbers a dashboard wants.


def _download(r: dict) -> dict:
    return {k: r.get(k) for k in ("repo_id", "revision", "commit", "total_bytes")} | {"files": len(r.get("files", []))}


def _quantize(r: dict) -> dict:
    rep = r.get("report") or {}
    return {"recipe": r.get("recipe"), "card_recipe": r.get("card_recipe"), "published": r.get("published"),
            "size_bytes": rep.get("size_bytes"),
            "bits_per_weight": rep.get("bits_per_weight"),
            "shared_expert_check": (rep.get("shared_expert_check") or {}).get("passed")}


def _serve(r: dict) -> dict:
    s = r.get("server", {})
    out = {"engine": s.get("engine"), "engine_version": r.get("engine_version"), "startup_s": s.get("startup_s"),
           "command": s.get("command"), "opt_ins": r.get("opt_ins")}
    if r.get("python_path"):  # engine plugins the profile put on the server's path, and what they said
        out["python_path"] = r["python_path"]
        out["plugin_said"] = (r.get(s.get("engine") or "") or {}).get("f2fix")
    return out


def _correctness(r: dict) -> dict:
    par = r.get("parity", {})
    return {"pass_rate": r.get("pass_rate"), "passed": r.get("passed"), "total": r.get("total"),
            "parity_match_rate": par.get("match_rate"), "parity_passed": par.get("passed"),
            "parity_status": par.get("status")}


def _needle(r: dict) -> dict:
    return {k: r.get(k) for k in ("accuracy", "hits", "cells_run", "cells_total")}


_BENCH_KEYS = ["concurrency", "completed", "failed", "request_throughput", "output_throughput", "mean_ttft_ms",
               "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms",
               "median_e2el_ms", "p99_e2el_ms", "decode_tok_s", "prefill_tok_s"]


def _benchmark(r: dict) -> dict:
    return {"levels": [{k: row[k] for k in _BENCH_KEYS if k in row} for row in r.get("levels", [])]}


_HEADLINES = {"download": _download, "quantize": _quantize, "serve": _serve, "correctness": _correctness,
              "needle": _needle, "benchmark": _benchmark}


def headline(run_dir: Path, stage: str, status: dict[str, Any]) -> dict[str, Any]:
    if status.get("status") not in ("ok", "reused"):
        return {"status": "not run", "reason": status.get("error") or status.get("reason") or status.get("status")}
    path = run_dir / stage / "result.json"
    if not path.is_file():
        return {"status": "not run", "reason": f"{stage} wrote no result.json"}
    return {"status": status["status"], **_HEADLINES[stage](read_json(path))}


def build_summary(rep: RunReport, duration_s: float) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "schema": SUMMARY_SCHEMA,
        "profile": rep.profile,
        "run_id": rep.run_id,
        "status": rep.status,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(duration_s, 2),
        "stages": {n: {k: v for k, v in s.items() if k in ("status", "duration_s", "reused_from", "reason", "error")}
                   for n, s in rep.stages.items()},
    }
    for stage in _HEADLINES:
        summary[stage] = headline(rep.run_dir, stage, rep.stages.get(stage, {"status": "not run",
                                                                             "reason": "not reached"}))
    summary["checks"] = checks(rep.run_dir, summary)
    plot = rep.run_dir / "plot" / "result.json"
    summary["claims"] = [{k: c[k] for k in ("id", "card", "metric", "unit", "claimed", "measured", "delta",
                                            "verdict")} for c in (read_json(plot).get("claims", [])
                                                                  if plot.is_file() else [])]
    return summary


def _result(run_dir: Path, stage: str, summary: dict[str, Any]) -> dict[str, Any] | None:
    if summary.get(stage, {}).get("status") not in ("ok", "reused"):
        return None
    path = run_dir / stage / "result.json"
    return read_json(path) if path.is_file() else None


def checks(run_dir: Path, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Every verdict a reader must see beside the numbers: the numerics checks (m3lab.numerics), each eval's
    paired comparison with its baseline (m3lab.evals.paired), and the benchmark's cross-check against vllm bench
    serve. One row each: {check, verdict, detail}; a check whose stage did not run says `not run`."""
    rows: list[dict[str, Any]] = []
    corr = _result(run_dir, "correctness", summary)
    num = (corr or {}).get("numerics")
    for name in ("nonfinite", "determinism", "parity", "prefix_cache"):
        label = f"numerics: {name.replace('_', ' ')}"
        if not isinstance(num, dict) or name not in num:
            why = num.get("reason") if isinstance(num, dict) else "the correctness stage did not run ok"
            rows.append({"check": label, "verdict": "not run", "detail": why or "not measured"})
            continue
        c = num[name]
        if c.get("verdict") == "not run":
            detail = c.get("reason", "")
        elif name == "nonfinite":
            f = c.get("findings", [])
            detail = (f"{len(f)} of {c.get('probes')} probes: " + "; ".join(
                f"{x['n_tokens']} tokens: {x['kind']}" for x in f[:4])) if f else f"0 of {c.get('probes')} probes"
        elif name == "determinism":
            detail = f"mismatch rate {c.get('mismatch_rate', 0):.3g} over {c.get('requests')} requests"
        elif name == "parity":
            bad = [r for r in c.get("rows", []) if not r.get("passed")]
            detail = c.get("method", "") + (f"; failing lengths: {[r['n_tokens'] for r in bad]}" if bad else "")
        else:
            bad = [r for r in c.get("rows", []) if not r.get("same_tokens")]
            detail = f"{len(bad)} of {len(c.get('rows', []))} probes differ cached vs cold"
        rows.append({"check": label, "verdict": c.get("verdict"), "detail": detail})
    chat = (corr or {}).get("chat")
    if isinstance(chat, dict) and "checks" in chat:
        bad = [c for c in chat["checks"] if not c["passed"]]
        rows.append({"check": "chat: reasoning and tool calls", "verdict": "fail" if bad else "pass",
                     "detail": f"{chat['passed']} of {chat['total']} ({', '.join(sorted({c['parser'] for c in chat['checks']}))} parser)"
                               + "".join(f"; {c['id']}: {', '.join(c['problems'])}" for c in bad)})
    for ev in (corr or {}).get("evals", []):
        pair = ev.get("paired") or {}
        label = f"recovery: {ev.get('id')}"
        if pair.get("status") != "ok":
            rows.append({"check": label, "verdict": "not run", "detail": pair.get("reason", "no paired record")})
            continue
        rec, se = pair.get("recovery_pct"), pair.get("recovery_stderr_pct")
        d = pair["discordant"]
        detail = (f"{pair['items']} items: baseline {100 * pair['baseline_mean']:.1f}%, quantized "
                  f"{100 * pair['quantized_mean']:.1f}%, recovery "
                  f"{'—' if rec is None else f'{rec:.1f}'}% ± {'—' if se is None else f'{se:.1f}'} (paired stderr), "
                  f"Δ {pair['diff_pct']:+.1f} ± {pair['diff_stderr_pct']:.1f} points; flipped "
                  f"{d['only_baseline_right']} lost / {d['only_quantized_right']} gained, McNemar p "
                  f"{pair['mcnemar_p']:.3g}; baseline: {pair.get('source')}")
        rows.append({"check": label, "verdict": "measured", "detail": detail})
    bench = _result(run_dir, "benchmark", summary)
    cross = (bench or {}).get("crosscheck")
    if cross:
        verdict = cross.get("status", "not run")
        rows.append({"check": "benchmark: cross-check with vllm bench serve",
                     "verdict": "fail" if verdict == "disagree" else "pass" if verdict == "agree" else "not run",
                     "detail": cross.get("summary") or cross.get("reason") or verdict})
    return rows


def add_roofline(summary: dict[str, Any], params: Params) -> None:
    """summary["roofline"]: the profile's single-stream decode bound (m3lab.memplan.decode_bound_for_params,
    from the hardware file's bandwidth and the quant report's measured bits per weight), and each benchmark level's
    decode tok/s as a percentage of it. No bandwidth, no model shape: `not run` and why."""
    from m3lab import memplan

    bpw = (summary.get("quantize") or {}).get("bits_per_weight")
    try:
        roof = memplan.decode_bound_for_params(params, bits_per_weight=bpw if isinstance(bpw, (int, float)) else None)
    except (memplan.PlanError, KeyError, ValueError) as e:
        roof = {"status": "not run", "reason": f"{type(e).__name__}: {e}"}
    summary["roofline"] = roof
    if roof.get("status") != "ok":
        return
    for lv in (summary.get("benchmark") or {}).get("levels", []):
        if isinstance(lv.get("decode_tok_s"), (int, float)):
            lv["decode_pct_of_bound"] = round(100.0 * lv["decode_tok_s"] / roof["decode_bound_tok_s"], 4)


def _checks_html(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>No checks ran.</p>"
    css = {"pass": "ok", "fail": "failed", "measured": "ok"}
    body = "".join(f"<tr><td>{_fmt(r['check'])}</td><td class='{css.get(r['verdict'], 'notrun')}'>"
                   f"{_fmt(r['verdict'])}</td><td>{_fmt(r['detail'])}</td></tr>" for r in rows)
    return f"<table><tr><th>check</th><th>verdict</th><th>detail</th></tr>{body}</table>"


# --------------------------------------------------------------------------------------------------------------
# Provenance: what exactly produced these numbers.


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)


def git_state() -> dict[str, Any]:
    """The commit this code is, and whether the tree differs from it. A launcher that copies the tree to another
    host says which commit it sent in `M3LAB_GIT_COMMIT` ("<sha>" or "<sha>-dirty"): that statement wins, because
    the copy may carry a stale .git of its own (the lent GPU host's did: it reported an older commit, dirty).
    Otherwise git itself, and outside a checkout "unknown" and why."""
    given = os.environ.get("M3LAB_GIT_COMMIT", "").strip()
    try:
        head = _git("rev-parse", "--verify", "HEAD")
        if head.returncode == 0:
            dirty = _git("status", "--porcelain", "--untracked-files=no")
            found = {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0
                     else None, "source": "git"}
        else:
            found = None
            why = (head.stderr.strip().splitlines() or [f"git rev-parse exited {head.returncode}"])[-1]
    except (OSError, subprocess.SubprocessError) as e:
        found, why = None, f"git not available: {e}"
    if given:
        commit, _, flag = given.partition("-")
        out = {"commit": commit, "dirty": flag == "dirty", "source": "M3LAB_GIT_COMMIT (set by the launcher)"}
        if found and found["commit"] != commit:
            out["git_here"] = found  # what the copy's own .git said, kept so the disagreement is visible
        return out
    if found:
        return found
    return {"commit": "unknown", "dirty": None, "source": "none", "reason": f"{REPO_ROOT}: {why}"}


def _gpus() -> list[str]:
    try:
        import torch

        if torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:
        pass
    return []


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(params: Params, run_dir: Path) -> dict[str, Any]:
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    checkpoints: dict[str, Any] = {}
    for stage in ("download", "quantize", "serve"):
        path = run_dir / stage / "result.json"
        if not path.is_file():
            continue
        r = read_json(path)
        if stage == "download":
            checkpoints[stage] = {"commit": r.get("commit"), "model_dir": r.get("model_dir"),
                                  "files": {f["path"]: f.get("sha256") for f in r.get("files", [])}}
        elif stage == "quantize":
            model = (r.get("artifacts") or {}).get("model") or {}
            checkpoints[stage] = {"model_dir": r.get("model_dir"), "files": model.get("files")}
        elif stage == "serve" and r.get("tokenizer_dir") and Path(r["tokenizer_dir"]).is_dir():
            # What the server loaded (a text-only or fault copy where the engine needs one), hashed now.
            checkpoints["served"] = {"model_dir": r["tokenizer_dir"], "files": folder_manifest(r["tokenizer_dir"])}
    return {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpu": _cpu(),
        "cpu_count": os.cpu_count(),
        "gpus": _gpus(),
        "m3lab_version": m3lab.__version__,
        "git": git_state(),
        "packages": versions,
        "params_hash": params_hash(params),
        "checkpoints": checkpoints,
    }


# --------------------------------------------------------------------------------------------------------------
# index.html


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _headline_rows(summary: dict[str, Any]) -> str:
    rows = []
    for stage in _HEADLINES:
        h = summary.get(stage, {})
        if h.get("status") == "not run":
            rows.append(f"<tr><td>{stage}</td><td class='notrun' colspan=2>not run: {_fmt(h.get('reason'))}</td></tr>")
            continue
        if stage == "benchmark":
            for lvl in h.get("levels", []):
                txt = ", ".join(f"{k} {_fmt(lvl.get(k))}" for k in ("output_throughput", "median_ttft_ms",
                                                                    "median_tpot_ms", "p99_e2el_ms", "decode_tok_s",
                                                                    "decode_pct_of_bound") if k in lvl)
                rows.append(f"<tr><td>benchmark</td><td>concurrency {_fmt(lvl.get('concurrency'))}</td>"
                            f"<td>{txt}</td></tr>")
            continue
        items = ", ".join(f"{k} {_fmt(v)}" for k, v in h.items() if k not in ("status", "command"))
        rows.append(f"<tr><td>{stage}</td><td colspan=2>{items}</td></tr>")
    return "\n".join(rows)


def _claims_html(claims: list[dict[str, Any]]) -> str:
    if not claims:
        return "<p>This profile states no claims.</p>"
    rows = "".join(
        f"<tr><td>{_fmt(c['id'])}</td><td>{_fmt(c['metric'])}</td><td>{_fmt(c['claimed'])} {_fmt(c['unit'])}</td>"
        f"<td>{_fmt(c['measured'])}</td><td>{_fmt(c['delta'])}</td>"
        f"<td class='{'ok' if c['verdict'] == 'reproduced' else 'failed' if c['verdict'] == 'not reproduced' else 'notrun'}'>"
        f"{_fmt(c['verdict'])}</td></tr>" for c in claims)
    return ("<table><tr><th>claim</th><th>metric</th><th>claimed</th><th>measured</th><th>delta</th>"
            f"<th>verdict</th></tr>{rows}</table>")


def write_index(run_dir: Path, summary: dict[str, Any], params: Params) -> Path:
    stage_rows = []
    for name, st in STAGES.items():
        s = summary["stages"].get(name, {"status": "not run"})
        status = s.get("status", "not run")
        page = run_dir / name / f"{name}.html"
        link = f"<a href='{name}/{name}.html'>{name}</a>" if page.is_file() else name
        extra = s.get("error") or s.get("reason") or (f"from run {s['reused_from']}" if s.get("reused_from") else "")
        dur = f"{s['duration_s']:.1f}s" if isinstance(s.get("duration_s"), (int, float)) else ""
        stage_rows.append(f"<tr><td>{link}</td><td class='{status.replace(' ', '')}'>{status}</td><td>{dur}</td>"
                          f"<td>{_fmt(extra)}</td></tr>")
    figs = sorted((run_dir / "plot").glob("*.png")) if (run_dir / "plot").is_dir() else []
    names = [f.stem.split("-", 1)[-1] for f in figs]  # "2-needle" → "needle"
    fig_html = "".join(f"<figure><img src='data:image/png;base64,{_b64(f)}' alt='{name}'>"
                       f"<figcaption>{name}</figcaption></figure>" for f, name in zip(figs, names))
    body = f"""
<h1>m3lab run {html.escape(summary['run_id'])}</h1>
<p>Profile <b>{html.escape(params.profile)}</b> — {html.escape(params.description)}<br>
Status <span class='{summary['status']}'>{summary['status']}</span> in {summary['duration_s']:.1f}s.
Machine-readable: <a href='summary.json'>summary.json</a>, <a href='provenance.json'>provenance.json</a>,
<a href='params.json'>params.json</a>.</p>
<h2>Stages</h2>
<table><tr><th>stage</th><th>status</th><th>time</th><th>note</th></tr>
{''.join(stage_rows)}</table>
<h2>Headline numbers</h2>
<table>{_headline_rows(summary)}</table>
<h2>Checks</h2>{_checks_html(summary.get("checks", []))}
<h2>Claims</h2>{_claims_html(summary.get("claims", []))}
<h2>Figures</h2>{fig_html or '<p>No figures (the plot stage did not run).</p>'}
"""
    out = run_dir / "index.html"
    out.write_text(_page(f"m3lab {params.profile} {summary['run_id']}", body), encoding="utf-8")
    return out


def _b64(path: Path) -> str:
    import base64

    return base64.b64encode(path.read_bytes()).decode()


def finish_run(rep: RunReport, params: Params, duration_s: float) -> None:
    """Called by the runner at the end, whatever happened: HTML per stage, summary, provenance, index."""
    for name, st in STAGES.items():
        nb = rep.run_dir / name / st.notebook
        page = rep.run_dir / name / f"{name}.html"
        if nb.is_file() and rep.stages.get(name, {}).get("status") in ("ok", "failed", "interrupted"):
            try:
                notebook_to_html(nb, page, f"{params.profile} · {name}")
            except Exception as e:  # a broken notebook must not hide the rest of the report
                page.write_text(_page(name, f"<p>Could not render {nb.name}: {html.escape(str(e))}</p>"))
    summary = build_summary(rep, duration_s)
    add_roofline(summary, params)
    write_json(rep.run_dir / "summary.json", summary)
    write_json(rep.run_dir / "provenance.json", provenance(params, rep.run_dir))
    write_index(rep.run_dir, summary, params)
