"""Plot stage: figures and the run's headline table, from the other stages' result.json files.

The plot stage runs even when a measuring stage failed (it shows what there is): a stage without a result is
listed as "not run" with the reason, and no number is drawn for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dataclasses import asdict

import matplotlib

matplotlib.use("Agg")  # files first; the notebook displays the PNGs it wrote, so the HTML shows the same pixels
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from m3lab.claims import evaluate_claims  # noqa: E402
from m3lab.stage import StageContext, StageError, read_json  # noqa: E402


def _use_cjk_fallback_font() -> None:
    """Japanese prompts and outputs (card 002's 日本の首都は) need a CJK glyph fallback; matplotlib's DejaVu has
    none. The IPAex Gothic font ships in the japanize-matplotlib wheel; we register only the font (importing that
    package would restyle every figure)."""
    import importlib.util

    spec = importlib.util.find_spec("japanize_matplotlib")
    if spec is None or not spec.submodule_search_locations:
        return
    font = Path(spec.submodule_search_locations[0]) / "fonts" / "ipaexg.ttf"
    if font.is_file():
        matplotlib.font_manager.fontManager.addfont(str(font))
        plt.rcParams["font.family"] = ["DejaVu Sans", "IPAexGothic"]


_use_cjk_fallback_font()

__all__ = ["claims_table", "claims_figure", "recovery_figure", "needle_table", "benchmark_table", "benchmark_rows", "needle_heatmap", "latency_throughput",
           "correctness_figure", "headline_rows", "show_figures", "run_stage"]


def needle_table(needle: dict[str, Any]) -> pd.DataFrame:
    """Rows: context length; columns: depth %; cells: ✓ hit, ✗ miss, — not run."""
    mark = {1: "✓", 0: "✗", None: "—"}
    return pd.DataFrame([[mark[v] for v in row] for row in needle["matrix"]],
                        index=pd.Index(needle["lengths"], name="length (tokens)"),
                        columns=pd.Index([f"{d:g}%" for d in needle["depths"]], name="depth"))


def benchmark_rows(bench: dict[str, Any]) -> list[dict[str, Any]]:
    """The flat metrics of each level (per-request records left out)."""
    return [{k: v for k, v in lv.items() if k not in ("requests", "warmup")} for lv in bench["levels"]]


_BENCH_COLS = ["concurrency", "completed", "failed", "request_throughput", "output_throughput", "median_ttft_ms",
               "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "median_e2el_ms", "p99_e2el_ms"]


def benchmark_table(bench: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(benchmark_rows(bench))[_BENCH_COLS].set_index("concurrency").round(2)


def needle_heatmap(needle: dict[str, Any], dpi: int = 110) -> plt.Figure:
    import numpy as np

    m = np.array([[np.nan if v is None else v for v in row] for row in needle["matrix"]], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(needle["depths"]), 1.0 + 0.6 * len(needle["lengths"])), dpi=dpi)
    cmap = matplotlib.colors.ListedColormap(["#d73027", "#1a9850"])
    ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    for i, row in enumerate(needle["matrix"]):
        for j, v in enumerate(row):
            ax.text(j, i, {1: "hit", 0: "miss", None: "not run"}[v], ha="center", va="center", fontsize=8,
                    color="white" if v is not None else "black")
    ax.set_xticks(range(len(needle["depths"])), [f"{d:g}%" for d in needle["depths"]])
    ax.set_yticks(range(len(needle["lengths"])), [str(n) for n in needle["lengths"]])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context length (tokens)")
    ax.set_title(f"Needle retrieval: {needle['hits']}/{needle['cells_run']} ({needle['accuracy']:.0%})")
    fig.tight_layout()
    return fig


def latency_throughput(bench: dict[str, Any], dpi: int = 110) -> plt.Figure:
    df = pd.DataFrame(benchmark_rows(bench))
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(12, 3.4), dpi=dpi)
    a1.plot(df.concurrency, df.output_throughput, "o-")
    a1.set_title("output throughput")
    a1.set_ylabel("tok/s")
    for q, style in (("median", "o-"), ("p99", "s--")):
        a2.plot(df.concurrency, df[f"{q}_ttft_ms"], style, label=f"{q} TTFT")
        a3.plot(df.concurrency, df[f"{q}_tpot_ms"], style, label=f"{q} TPOT")
    a2.set_title("time to first token")
    a3.set_title("time per output token")
    for a in (a2, a3):
        a.set_ylabel("ms")
        a.legend(fontsize=8)
    for a in (a1, a2, a3):
        a.set_xlabel("concurrency")
        a.set_xticks(list(df.concurrency))
        a.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def correctness_figure(corr: dict[str, Any], dpi: int = 110) -> plt.Figure:
    rows = [[p["id"], p["lang"], p["prompt"][:28], p["output"][:36].replace("\n", " "), "pass" if p["passed"] else "FAIL"]
            for p in corr["prompts"]]
    par = corr.get("parity", {})
    if par.get("status") == "ok":
        rows.append(["parity", "", "server vs offline greedy", f"token match {par['match_rate']:.0%}",
                     "pass" if par["passed"] else "FAIL"])
    fig, ax = plt.subplots(figsize=(11, 0.45 * (len(rows) + 1.5)), dpi=dpi)
    ax.axis("off")
    t = ax.table(cellText=rows, colLabels=["id", "lang", "prompt", "output", "verdict"], loc="center",
                 cellLoc="left", colWidths=[0.14, 0.06, 0.28, 0.4, 0.1])
    t.auto_set_font_size(False)
    t.set_fontsize(8)
    for i, r in enumerate(rows, 1):
        t[i, 4].set_facecolor("#d4edda" if r[4] == "pass" else "#f8d7da")
    ax.set_title(f"Correctness: {corr['passed']}/{corr['total']} prompts pass", fontsize=10)
    fig.tight_layout()
    return fig


_VERDICT_COLOR = {"reproduced": "#d4edda", "not reproduced": "#f8d7da"}


def claims_table(claims: list[dict[str, Any]]) -> pd.DataFrame:
    """claimed / measured / delta / verdict; a claim that was not measured shows no number."""
    cols = ["id", "metric", "claimed", "measured", "delta", "unit", "rule", "verdict"]
    return pd.DataFrame(claims, columns=cols).astype(object).where(lambda d: d.notna(), "—")


def claims_figure(claims: list[dict[str, Any]], dpi: int = 110) -> plt.Figure:
    def cell(v: Any) -> str:
        return "—" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    rows = [[c["id"], c["metric"][:34], cell(c["claimed"]), cell(c["measured"]), cell(c["delta"]), c["rule"],
             c["verdict"][:48]] for c in claims]
    fig, ax = plt.subplots(figsize=(12, 0.42 * (len(rows) + 1.5)), dpi=dpi)
    ax.axis("off")
    t = ax.table(cellText=rows, colLabels=["claim", "metric", "claimed", "measured", "delta", "tolerance", "verdict"],
                 loc="center", cellLoc="left", colWidths=[0.17, 0.25, 0.08, 0.08, 0.07, 0.09, 0.26])
    t.auto_set_font_size(False)
    t.set_fontsize(7.5)
    for i, c in enumerate(claims, 1):
        t[i, 6].set_facecolor(_VERDICT_COLOR.get(c["verdict"], "#fff3cd"))
    n_ok = sum(c["verdict"] == "reproduced" for c in claims)
    n_run = sum(c["measured"] is not None for c in claims)
    ax.set_title(f"Claims: {n_ok} reproduced of {n_run} measured ({len(claims)} in the ledger)", fontsize=10)
    fig.tight_layout()
    return fig


def recovery_figure(claims: list[dict[str, Any]], dpi: int = 110) -> plt.Figure | None:
    """Claimed vs measured recovery (%), only for recovery claims that were measured."""
    rec = [c for c in claims if c.get("kind") == "recovery"]
    if not rec:
        return None
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(rec), 3.4), dpi=dpi)
    xs = range(len(rec))
    ax.bar([x - 0.2 for x in xs], [c["claimed"] for c in rec], 0.4, label="claimed", color="#9ecae1")
    ax.bar([x + 0.2 for x in xs], [c["measured"] or 0 for c in rec], 0.4, label="measured", color="#3182bd")
    for x, c in zip(xs, rec):
        if c["measured"] is None:
            ax.text(x + 0.2, 1, "not run", rotation=90, ha="center", va="bottom", fontsize=7)
    ax.axhline(100, color="gray", lw=0.8, ls="--")
    ax.set_xticks(list(xs), [c["id"] for c in rec], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("recovery (%)")
    ax.legend(fontsize=8)
    ax.set_title("Quantized / baseline score")
    fig.tight_layout()
    return fig


def headline_rows(results: dict[str, dict[str, Any] | None], reasons: dict[str, str]) -> list[dict[str, Any]]:
    """A flat table: stage, metric, value — or 'not run (reason)' where a stage has no result."""
    rows: list[dict[str, Any]] = []

    def add(stage: str, metric: str, value: Any) -> None:
        rows.append({"stage": stage, "metric": metric, "value": value})

    for stage in ("correctness", "needle", "benchmark"):
        if results.get(stage) is None:
            add(stage, "—", f"not run ({reasons.get(stage, 'no result')})")
    if (c := results.get("correctness")) is not None:
        add("correctness", "pass rate", f"{c['passed']}/{c['total']} ({c['pass_rate']:.0%})")
        par = c["parity"]
        add("correctness", "serving parity (token match)",
            f"{par['match_rate']:.0%}" if par["status"] == "ok" else f"not run ({par['reason']})")
    if (n := results.get("needle")) is not None:
        add("needle", "accuracy", f"{n['hits']}/{n['cells_run']} ({n['accuracy']:.0%})")
    if (b := results.get("benchmark")) is not None:
        for r in benchmark_rows(b):
            add("benchmark", f"c={r['concurrency']} output tok/s", round(r["output_throughput"], 2))
            add("benchmark", f"c={r['concurrency']} median TTFT ms", round(r["median_ttft_ms"], 1))
            add("benchmark", f"c={r['concurrency']} median TPOT ms", round(r["median_tpot_ms"], 1))
    return rows


def show_figures(result: dict[str, Any]) -> None:
    from IPython.display import Image, display

    for path in result["figures"]:
        display(Image(filename=path))


def run_stage(ctx: StageContext) -> dict[str, Any]:
    dpi = ctx.params["plot"]["dpi"]
    results: dict[str, dict[str, Any] | None] = {}
    reasons: dict[str, str] = {}
    for stage in ("correctness", "needle", "benchmark"):
        try:
            results[stage] = ctx.upstream(stage)
        except StageError:
            results[stage] = None
            status = ctx.run_dir / stage / "status.json"
            reasons[stage] = read_json(status).get("error", "no result") if status.is_file() else "did not finish"
    claims = [{**asdict(v), "kind": c.get("kind", "value")}
              for v, c in zip(evaluate_claims(ctx.params["claims"], ctx.run_dir), ctx.params["claims"])]
    figs: dict[str, plt.Figure | None] = {
        "correctness": correctness_figure(results["correctness"], dpi) if results["correctness"] else None,
        "needle": needle_heatmap(results["needle"], dpi) if results["needle"] else None,
        "benchmark": latency_throughput(results["benchmark"], dpi) if results["benchmark"] else None,
        "claims": claims_figure(claims, dpi) if claims else None,
        "recovery": recovery_figure(claims, dpi),
    }
    figures = []
    for i, (name, fig) in enumerate(figs.items(), 1):
        if fig is None:
            continue
        path = ctx.stage_dir / f"{i}-{name}.png"  # index.html shows the figures in this order
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        figures.append(str(path))
    return {"figures": figures, "headline": headline_rows(results, reasons), "claims": claims, "missing": reasons}
