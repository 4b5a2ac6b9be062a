#!/usr/bin/env python3
"""F2, FP8 on vLLM: which FP8 part makes vLLM's FP8 tiny M3 differ from transformers' (needle 5/20 on vLLM,
teacher-forced parity red at every length, in results/reference/h200-tiny-fp8)?

Builds, on CPU, from the embedded download, four checkpoints that differ only in what llm-compressor's
FP8_DYNAMIC touches (m3lab.quant.core.quantize, the recipe the quantize stage runs):

    bf16         nothing quantized
    fp8          the card-000 recipe (DEFAULT_IGNORE): attention, shared and routed experts, dense MLP in FP8
    fp8-dense    routed experts left bf16 (attention, shared expert, dense MLP in FP8)
    fp8-experts  only the routed experts in FP8

each in vLLM's text layout (what the serve stage hands vLLM), plus the prompts `fp8_probe.py` sends (needle
prompts of the tiny card's grid, as token ids) and transformers' own teacher-forced prompt logprobs and greedy
answers for every variant on CPU (the reference the GPU's numbers are compared with):

    python tools/f2/fp8_variants.py <download dir> <out dir>
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from m3lab import checkpoint
from m3lab.needle import build_prompt, make_key, Haystack, score_completion
from m3lab.quant.core import DEFAULT_IGNORE, QuantRecipe, quantize

ROUTED = r"re:.*(block_sparse_moe|mlp)\.experts\..*"  # native `mlp.experts.E.*`, hub `block_sparse_moe.experts.E.*`
NOT_ROUTED = [r"re:.*self_attn\..*", r"re:.*shared_experts?\..*", r"re:.*layers\.0\.mlp\..*"]
VARIANTS = {"fp8": DEFAULT_IGNORE, "fp8-dense": DEFAULT_IGNORE + [ROUTED], "fp8-experts": DEFAULT_IGNORE + NOT_ROUTED}
LENGTHS, DEPTHS, MAX_TOKENS = [512, 1024, 2048, 4000], [0, 25, 50, 75, 100], 12


def prompts(tok) -> list[dict]:
    hay = Haystack(tok, 0)
    out = []
    for n in LENGTHS:
        for d in DEPTHS:
            key = make_key(0, n, d)
            p = build_prompt(tok, n, d, key, haystack=hay)
            out.append({"length": n, "depth": d, "key": key, "ids": tok(p.text)["input_ids"]})
    return out


def reference(model_dir: Path, items: list[dict]) -> list[dict]:
    """transformers on CPU: logprob of each prompt token given the ones before, and the greedy answer."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype="auto").eval()
    rows = []
    with torch.inference_mode():
        for it in items:
            ids = torch.tensor([it["ids"]])
            logits = model(input_ids=ids).logits[0].float()
            lp = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None])[:, 0]
            gen = model.generate(input_ids=ids, max_new_tokens=MAX_TOKENS, do_sample=False)
            text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
            rows.append({"length": it["length"], "depth": it["depth"], "prompt_logprobs": [None] + lp.tolist(),
                         "answer": text, "hit": score_completion(text, it["key"])})
    return rows


def main() -> int:
    src, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    items = prompts(AutoTokenizer.from_pretrained(src))
    (out / "prompts.json").write_text(json.dumps(items))
    hub = {"bf16": src}
    for name, ignore in VARIANTS.items():
        t = time.time()
        r = quantize(src, out / f"hub-{name}", QuantRecipe(recipe="fp8_dynamic", ignore=ignore, verify=False))
        fmt = r.report.routed_expert_formats
        print(f"{name}: {r.report.bits_per_weight:.2f} bpw, routed experts {fmt}, "
              f"excluded {len(r.report.excluded_modules)} modules ({time.time() - t:.0f}s)", flush=True)
        hub[name] = Path(r.model_dir)
    refs = {}
    for name, d in hub.items():
        text_dir = out / name
        if not (text_dir / "config.json").is_file():
            checkpoint.text_only(d, text_dir, flavor="vllm")
        t = time.time()
        refs[name] = reference(d, items)
        print(f"{name}: transformers CPU reference {sum(r['hit'] for r in refs[name])}/{len(items)} needles "
              f"({time.time() - t:.0f}s)", flush=True)
    (out / "reference-cpu.json").write_text(json.dumps(refs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
