#!/usr/bin/env python3
"""F2, FP8 on vLLM (GPU side of tools/f2/fp8_variants.py): one offline vllm.LLM per checkpoint variant, each
needle prompt sent alone (no batching: the sparse-path batch bug is not what this measures; the f2fix plugin is
on the path too), greedy, with prompt_logprobs=1. Writes <out>/vllm-<variant>.json with the same rows as the
CPU reference, so `--compare` can say, per variant, how far vLLM is from transformers:

    python tools/f2/fp8_probe.py run <variants dir> <variant> <out dir>
    python tools/f2/fp8_probe.py compare <variants dir> <out dir>
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

MAX_TOKENS = 12


def run(vdir: Path, name: str, out: Path) -> None:
    from vllm import LLM, SamplingParams

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from m3lab.needle import score_completion

    items = json.loads((vdir / "prompts.json").read_text())
    t0 = time.time()
    llm = LLM(model=str(vdir / name), max_model_len=4096, block_size=128, attention_backend="TRITON_ATTN",
              enforce_eager=True, gpu_memory_utilization=0.2, trust_remote_code=True, seed=0,
              enable_prefix_caching=False)
    start = time.time() - t0
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, prompt_logprobs=1)
    tok = llm.get_tokenizer()
    rows = []
    for it in items:
        o = llm.generate([{"prompt_token_ids": it["ids"]}], sp, use_tqdm=False)[0]
        lps = [None]
        for i, d in enumerate(o.prompt_logprobs[1:], 1):
            lp = d.get(it["ids"][i]) if d else None
            lps.append(lp.logprob if lp is not None else None)
        text = tok.decode(o.outputs[0].token_ids, skip_special_tokens=True)
        rows.append({"length": it["length"], "depth": it["depth"], "prompt_logprobs": lps, "answer": text,
                     "hit": score_completion(text, it["key"])})
    quant = getattr(llm.llm_engine.vllm_config.model_config, "quantization", None)
    (out / f"vllm-{name}.json").write_text(json.dumps({"variant": name, "engine_start_s": round(start, 1),
                                                       "quantization": quant, "rows": rows}))
    print(f"[{name}] quantization={quant} needles {sum(r['hit'] for r in rows)}/{len(rows)} "
          f"({time.time() - t0:.0f}s)", flush=True)


def compare(vdir: Path, out: Path) -> dict:
    """Per variant: needle hits (vLLM, transformers), and mean |Δ prompt logprob| vLLM vs transformers, overall
    and by 128-token block (the sparse block size), plus the share of positions where they differ by > 0.5."""
    ref = json.loads((vdir / "reference-cpu.json").read_text())
    vllm_bf16 = out / "vllm-bf16.json"
    report = {}
    for path in sorted(out.glob("vllm-*.json")):
        got = json.loads(path.read_text())
        name = got["variant"]
        # a variant without a CPU reference (another recipe's checkpoint) is set against vLLM's own bf16 run
        if name in ref:
            against, base = "transformers CPU, same checkpoint", ref[name]
        elif vllm_bf16.is_file():
            against, base = "vLLM bf16 (no CPU reference for this checkpoint)", json.loads(vllm_bf16.read_text())["rows"]
        else:
            continue
        deltas, by_block = [], {}
        for g, r in zip(got["rows"], base):
            for i, (a, b) in enumerate(zip(g["prompt_logprobs"], r["prompt_logprobs"])):
                if a is None or b is None:
                    continue
                d = abs(a - b) if math.isfinite(a) else float("inf")
                deltas.append(d)
                by_block.setdefault(i // 128, []).append(d)
        finite = [d for d in deltas if math.isfinite(d)]
        report[name] = {
            "against": against, "quantization": got.get("quantization"),
            "vllm_needles": sum(r["hit"] for r in got["rows"]), "reference_needles": sum(r["hit"] for r in base),
            "n": len(got["rows"]), "positions": len(deltas), "nonfinite": len(deltas) - len(finite),
            "mean_abs_dlogprob": round(sum(finite) / max(len(finite), 1), 4),
            "share_gt_0.5": round(sum(d > 0.5 for d in deltas) / max(len(deltas), 1), 4),
            "mean_by_block": {k: round(sum(v) / len(v), 4) for k, v in sorted(by_block.items())
                              if all(math.isfinite(x) for x in v)},
            "answers": [(g["length"], g["depth"], g["answer"], r["answer"]) for g, r in zip(got["rows"], base)
                        if g["answer"] != r["answer"]][:8],
        }
    return report


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
    else:
        print(json.dumps(compare(Path(sys.argv[2]), Path(sys.argv[3])), indent=1))
