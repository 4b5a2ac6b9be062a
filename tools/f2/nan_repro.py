#!/usr/bin/env python3
"""F2 engine-level repro: offline vllm.LLM on the tiny MiniMax-M3 (vLLM text layout), counting NaN.

Phases (one engine, greedy, ids fed as token ids so lengths are exact):
  alone   each long prompt (lengths around multiples of 128) sent by itself, --repeat times, with
          prompt_logprobs=1 and 4 sampled tokens with logprobs=1: NaN positions, first NaN position, and the
          max |delta| of the prompt logprobs between repeats (determinism)
  shorts  each of the 8 short prompts alone, 48 greedy tokens: the reference decode tokens
  mixed   the 8 shorts (decoding 48 tokens each) and all the long prompts in ONE generate call, so steps mix
          decodes with (chunked) prefills: NaN in the long prompts' prompt logprobs, NaN in the shorts' sample
          logprobs, token-id-0 outputs, shorts whose tokens differ from their alone run, and long prompts whose
          prompt logprobs differ from their alone run by more than 0.05
Writes one JSON line per phase to --json and prints a summary. Engine flags come from the command line; the
fix is the general plugin in tools/f2/vllm_plugin (on PYTHONPATH; M3LAB_F2FIX=0 turns it off).
"""

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LONG = [129, 255, 256, 257, 383, 384, 385, 511, 512, 513, 639, 640, 641, 1025]


def lp_list(prompt_logprobs, ids):
    """logprob of the actual prompt token at each position (None for position 0)."""
    out = []
    for i, d in enumerate(prompt_logprobs or []):
        if d is None:
            out.append(None)
            continue
        lp = d.get(ids[i]) if hasattr(d, "get") else None
        if lp is None:  # token not in the dict: take any entry (only NaN-ness matters then)
            lp = next(iter(d.values()))
        out.append(lp.logprob)
    return out


def nan_stats(vals):
    bad = [i for i, v in enumerate(vals) if v is not None and not math.isfinite(v)]
    return {"nonfinite": len(bad), "first_nonfinite_pos": bad[0] if bad else None,
            "last_nonfinite_pos": bad[-1] if bad else None}


def sample_stats(comp):
    """sampled token ids and how many of their logprobs are not finite."""
    toks = list(comp.token_ids)
    bad = 0
    for tok, d in zip(toks, comp.logprobs or []):
        if not d:
            continue
        lp = d.get(tok) if hasattr(d, "get") else None
        lp = lp if lp is not None else next(iter(d.values()))
        bad += 0 if math.isfinite(lp.logprob) else 1
    return toks, bad


def top2_gaps(comp):
    """per generated position: logprob(top-1) - logprob(top-2), when two are returned (logprobs >= 2)."""
    gaps = []
    for d in comp.logprobs or []:
        v = sorted((x.logprob for x in d.values()), reverse=True) if d else []
        gaps.append(v[0] - v[1] if len(v) >= 2 and all(math.isfinite(x) for x in v[:2]) else None)
    return gaps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--label", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--prefix-caching", type=int, default=1)
    ap.add_argument("--chunked-prefill", type=int, default=1)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--n-shorts", type=int, default=8)
    ap.add_argument("--short-len", type=int, default=40)
    ap.add_argument("--short-tokens", type=int, default=48)
    ap.add_argument("--lengths", default=",".join(map(str, LONG)))
    ap.add_argument("--phases", default="alone,shorts,mixed")
    ap.add_argument("--gpu-mem", type=float, default=0.3)
    ap.add_argument("--kv-cache-gib", type=float, default=0.0,
                    help="fixed KV cache size (skips memory profiling, so engines can share the GPU)")
    a = ap.parse_args()

    from vllm import LLM, SamplingParams
    import vllm

    data = json.load(open(os.path.join(HERE, "prompts.json")))
    filler = data["filler_ids"]
    shorts = [s[: a.short_len] for s in data["short_ids"][: a.n_shorts]]
    lengths = [int(x) for x in a.lengths.split(",")]
    longs = {L: filler[:L] for L in lengths}

    t0 = time.time()
    kw = dict(model=a.model, tokenizer=a.model, max_model_len=4096, block_size=128,
              attention_backend="TRITON_ATTN", enforce_eager=True, gpu_memory_utilization=a.gpu_mem,
              trust_remote_code=True, seed=0, enable_prefix_caching=bool(a.prefix_caching),
              max_num_seqs=a.max_num_seqs)
    if a.kv_cache_gib:
        kw["kv_cache_memory_bytes"] = int(a.kv_cache_gib * 2**30)
    if a.chunked_prefill:
        kw.update(enable_chunked_prefill=True, max_num_batched_tokens=a.max_num_batched_tokens)
    else:
        kw.update(enable_chunked_prefill=False, max_num_batched_tokens=4096)
    llm = LLM(**kw)
    start_s = time.time() - t0
    cfg = llm.llm_engine.vllm_config
    head = {"label": a.label, "vllm": vllm.__version__, "engine_start_s": round(start_s, 1),
            "M3LAB_F2FIX": os.environ.get("M3LAB_F2FIX", "(unset: plugin on if on path)"),
            "CUDA_LAUNCH_BLOCKING": os.environ.get("CUDA_LAUNCH_BLOCKING", ""),
            "prefix_caching": cfg.cache_config.enable_prefix_caching,
            "chunked_prefill": cfg.scheduler_config.enable_chunked_prefill,
            "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
            "max_num_seqs": cfg.scheduler_config.max_num_seqs,
            "sparse_attention_config": cfg.model_config.hf_text_config.sparse_attention_config,
            "num_key_value_heads": cfg.model_config.hf_text_config.num_key_value_heads}
    print(f"[{a.label}] engine up in {start_s:.1f}s: {json.dumps(head)}", flush=True)
    fout = open(a.json, "a")
    fout.write(json.dumps({"phase": "engine", **head}) + "\n")

    sp_long = SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=1, logprobs=1)
    sp_short = SamplingParams(max_tokens=a.short_tokens, temperature=0.0, logprobs=2, ignore_eos=True)
    alone_lp = {}
    phases = a.phases.split(",")

    if "alone" in phases:
        rows = []
        for L, ids in longs.items():
            reps = []
            for rep in range(a.repeat):
                o = llm.generate([{"prompt_token_ids": ids}], sp_long, use_tqdm=False)[0]
                lps = lp_list(o.prompt_logprobs, ids)
                toks, sbad = sample_stats(o.outputs[0])
                reps.append((lps, toks, sbad))
            alone_lp[L] = reps[0][0]
            st = [nan_stats(r[0]) for r in reps]
            fin = [[v for v in r[0][1:]] for r in reps]
            delta = 0.0
            for r in fin[1:]:
                for x, y in zip(fin[0], r):
                    if x is not None and y is not None and math.isfinite(x) and math.isfinite(y):
                        delta = max(delta, abs(x - y))
            row = {"L": L, "per_repeat": st, "sampled": [r[1] for r in reps],
                   "sample_nonfinite": [r[2] for r in reps], "max_abs_delta_between_repeats": round(delta, 5)}
            rows.append(row)
            print(f"[{a.label}] alone L={L:5d} nonfinite/repeat={[s['nonfinite'] for s in st]} "
                  f"first={[s['first_nonfinite_pos'] for s in st]} sampled={[r[1] for r in reps]} "
                  f"repeat|d|={delta:.4f}", flush=True)
        fout.write(json.dumps({"phase": "alone", "label": a.label, "rows": rows}) + "\n")

    ref_short = {}
    if "shorts" in phases or "mixed" in phases:
        for i, ids in enumerate(shorts):
            o = llm.generate([{"prompt_token_ids": ids}], sp_short, use_tqdm=False)[0]
            ref_short[i] = (*sample_stats(o.outputs[0]), top2_gaps(o.outputs[0]))
        nbad = sum(v[1] for v in ref_short.values())
        print(f"[{a.label}] shorts alone: sample nonfinite total={nbad}; "
              f"first short tokens={ref_short[0][0][:12]}", flush=True)
        fout.write(json.dumps({"phase": "shorts", "label": a.label,
                               "nonfinite": {i: v[1] for i, v in ref_short.items()}}) + "\n")

    if "mixed" in phases:
        for rep in range(a.repeat):
            prompts = [{"prompt_token_ids": s} for s in shorts] + [{"prompt_token_ids": v} for v in longs.values()]
            sps = [sp_short] * len(shorts) + [sp_long] * len(longs)
            t1 = time.time()
            outs = llm.generate(prompts, sps, use_tqdm=False)
            dt = time.time() - t1
            srows, lrows = [], []
            for i, o in enumerate(outs[: len(shorts)]):
                toks, sbad = sample_stats(o.outputs[0])
                ref = ref_short[i][0]
                mism = next((k for k, (x, y) in enumerate(zip(toks, ref)) if x != y), None)
                gap = ref_short[i][2][mism] if mism is not None and mism < len(ref_short[i][2]) else None
                srows.append({"i": i, "sample_nonfinite": sbad, "zeros": toks.count(0), "first_mismatch": mism,
                              "alone_top2_gap_at_mismatch": None if gap is None else round(gap, 4)})
            for (L, ids), o in zip(longs.items(), outs[len(shorts):]):
                lps = lp_list(o.prompt_logprobs, ids)
                st = nan_stats(lps)
                d = None
                if L in alone_lp:
                    d = 0.0
                    for x, y in zip(alone_lp[L][1:], lps[1:]):
                        if x is not None and y is not None and math.isfinite(x) and math.isfinite(y):
                            d = max(d, abs(x - y))
                    d = round(d, 5)
                lrows.append({"L": L, **st, "max_abs_delta_vs_alone": d})
            n_s_nan = sum(1 for r in srows if r["sample_nonfinite"])
            n_s_mis = sum(1 for r in srows if r["first_mismatch"] is not None)
            n_l_nan = sum(1 for r in lrows if r["nonfinite"])
            n_l_dif = sum(1 for r in lrows if (r["max_abs_delta_vs_alone"] or 0) > 0.05)
            print(f"[{a.label}] mixed rep{rep} ({dt:.1f}s): shorts with nonfinite logprobs {n_s_nan}/{len(srows)}, "
                  f"shorts differing from alone {n_s_mis}/{len(srows)} (first mismatch "
                  f"{[r['first_mismatch'] for r in srows]}, alone top1-top2 gap there "
                  f"{[r['alone_top2_gap_at_mismatch'] for r in srows]}, zeros {[r['zeros'] for r in srows]}); "
                  f"long prompts with nonfinite prompt logprobs {n_l_nan}/{len(lrows)}, "
                  f"differing from alone by >0.05 {n_l_dif}/{len(lrows)}", flush=True)
            for r in lrows:
                if r["nonfinite"] or (r["max_abs_delta_vs_alone"] or 0) > 0.05:
                    print(f"[{a.label}]   mixed rep{rep} L={r['L']}: nonfinite={r['nonfinite']} "
                          f"first={r['first_nonfinite_pos']} last={r['last_nonfinite_pos']} "
                          f"|d| vs alone={r['max_abs_delta_vs_alone']}", flush=True)
            fout.write(json.dumps({"phase": "mixed", "label": a.label, "rep": rep, "shorts": srows,
                                   "longs": lrows}) + "\n")
    fout.close()
    print(f"[{a.label}] done in {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
