#!/usr/bin/env python3
"""Config/weight variants of the tiny vLLM-layout checkpoint, for the F2 A/B runs (run on the GPU host).

  SRC.topk16  sparse_topk_blocks 16 (the real M3's value), same weights (symlinked)
  SRC.kv1     1 KV head = 1 index head per rank, as real M3 has per rank at TP4/TP8 (4 KV heads / TP):
              k_proj, v_proj and index_q_proj keep head 0's rows (a different but valid M3; for A/B only)
usage: make_variants.py SRC_DIR
"""
import json
import os
import shutil
import sys

from safetensors.torch import load_file, save_file

src = sys.argv[1].rstrip("/")
cfg = json.load(open(f"{src}/config.json"))
for name in ("topk16", "kv1"):
    dst = f"{src}.{name}"
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    for f in os.listdir(src):
        if f not in ("config.json", "model.safetensors"):
            shutil.copyfile(f"{src}/{f}", f"{dst}/{f}")
    c = json.loads(json.dumps(cfg))
    t = c["text_config"]
    if name == "topk16":
        t["sparse_attention_config"]["sparse_topk_blocks"] = 16
        t["index_topk_blocks"] = 16
        os.symlink(f"{src}/model.safetensors", f"{dst}/model.safetensors")
    else:
        hd = t["head_dim"]
        t["num_key_value_heads"] = 1
        t["sparse_attention_config"]["sparse_num_index_heads"] = 1
        t["index_n_heads"] = 1
        w = load_file(f"{src}/model.safetensors")
        for k in list(w):
            if k.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.index_q_proj.weight")):
                w[k] = w[k][:hd].contiguous()
        save_file(w, f"{dst}/model.safetensors", metadata={"format": "pt"})
    json.dump(c, open(f"{dst}/config.json", "w"), indent=1)
    print("wrote", dst)
