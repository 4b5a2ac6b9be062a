"""Writes notebooks/*.ipynb (without outputs). The notebooks are the source of truth once written; this script
keeps the seven thin notebooks uniform: a title, the parameters cell, one call into m3lab, tables and figures.

    python tools/make_notebooks.py
"""

from pathlib import Path

import nbformat

PARAMS_CELL = '''# Parameters — papermill injects the run's values; these defaults run the embedded profile in JupyterLab.
profile = "cpu-tiny"  # params file: params/<profile>.yaml
run_dir = ""  # "" → results/<profile>/interactive
params = None  # None → this stage's slice of the profile'''

STAGES = {
    "01_download": ("download", "Download",
                    "Fetch the checkpoint with `huggingface_hub.snapshot_download` at a pinned revision. For the "
                    "embedded default, m3lab builds the tiny MiniMax-M3 and publishes it on a Hub-compatible server "
                    "on 127.0.0.1, so the real client does the real download.",
                    ['pd.DataFrame(result["files"])',
                     'pd.Series({k: result[k] for k in ("repo_id", "revision", "commit", "total_bytes", "model_dir")})']),
    "02_quantize": ("quantize", "Quantize",
                    "Apply the profile's recipe (`fp8_dynamic`: llm-compressor FP8_DYNAMIC, compressed-tensors; "
                    "`none`: pass through) and report size, bits per weight, formats, exclusions and the "
                    "shared-expert check that card 002's loader failed silently.",
                    ['pd.Series({k: v for k, v in result["report"].items() if not isinstance(v, (dict, list))})',
                     'pd.Series(result["report"]["formats"], name="modules")',
                     'pd.Series(result["report"]["shared_expert_check"])']),
    "03_serve": ("serve", "Serve",
                 "Start the profile's engine (`transformers serve` on CPU, `vllm serve` on GPUs) on 127.0.0.1 as a "
                 "detached process, wait for `/health`, and record endpoint, pid, command and log. The runner "
                 "stops it at the end of the run.",
                 ['print(result["server"]["command"])',
                  'pd.Series({k: result["server"][k] for k in ("engine", "base_url", "pid", "startup_s", "log_path")})']),
    "04_correctness": ("correctness", "Correctness",
                       "Greedy prompt suite (expected substrings, EN and JA) and serving parity: the server's greedy "
                       "continuation against transformers' offline greedy continuation of the same checkpoint.",
                       ['pd.DataFrame(result["prompts"])[["id", "lang", "prompt", "expect", "output", "passed"]]',
                        'pd.DataFrame(result["parity"].get("rows", [])) if result["parity"]["status"] == "ok" '
                        'else result["parity"]']),
    "05_needle": ("needle", "Long-context needle",
                  "A pass key planted at depth d of a haystack of L tokens, retrieved greedily; exact match. "
                  "The grid comes from params, up to the model's max context.",
                  ['m3lab.plot.needle_table(result)']),
    "06_benchmark": ("benchmark", "Benchmark",
                     "Async streaming load at the profile's concurrency levels: TTFT, TPOT, ITL, end-to-end latency, "
                     "throughput — with vLLM's benchmark names and units.",
                     ['m3lab.plot.benchmark_table(result)']),
    "07_plot": ("plot", "Plots and summary",
                "The claims ledger (each number the card states: claimed, measured, delta, verdict), figures "
                "(correctness, needle heatmap, latency and throughput vs concurrency, claims, recovery) and the "
                "run's headline numbers.",
                ['m3lab.plot.claims_table(result["claims"])', 'm3lab.plot.show_figures(result)',
                 'pd.DataFrame(result["headline"])']),
}


def make(name: str, stage: str, title: str, intro: str, shows: list[str]) -> nbformat.NotebookNode:
    cells = [
        nbformat.v4.new_markdown_cell(f"# {title}\n\n{intro}"),
        nbformat.v4.new_code_cell(PARAMS_CELL, metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(
            f"import pandas as pd\n\nimport m3lab.plot\nimport m3lab.stage\nfrom m3lab import {stage}\n\n"
            f"ctx = m3lab.stage.context({stage!r}, profile, run_dir, params)\n"
            f"result = {stage}.run_stage(ctx)\nprint(\"saved\", ctx.save(result))"),
    ]
    cells += [nbformat.v4.new_code_cell(s) for s in shows]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for c in nb.cells:  # stable ids: regenerating must not churn the diff
        c.id = f"{name}-{nb.cells.index(c)}"
    return nb


if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "notebooks"
    for name, (stage, title, intro, shows) in STAGES.items():
        nbformat.write(make(name, stage, title, intro, shows), str(out / f"{name}.ipynb"))
