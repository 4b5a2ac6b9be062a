#!/usr/bin/env python3
"""F2 kernel-level repro: vLLM 0.25.1's MiniMax-M3 Triton indexer + block-sparse attention, called exactly the
way `MiniMaxM3IndexerTritonImpl.forward` / `MiniMaxM3SparseTritonImpl.forward` call them, on the token-major
top-k buffer that `MiniMaxM3Model.__init__` allocates (vllm/models/minimax_m3/nvidia/model.py:797).

Three ways to run the same synthetic batch (decodes first, then prefill chunks, as vLLM orders a batch):
  v0.25.1  the buffer as vLLM 0.25.1 passes it: `out=buf`, `buf[:, nd:, :]`, `topk[:, :nd, :]`, `topk[:, nd:T, :]`
  fixed    the same storage passed as its head-major view `buf.transpose(0, 1)` (upstream fix, vllm#49149)
  ref      a plain torch reference: per-head block max-scores, local block forced, top-k, causal attention over
           the selected blocks
and reports, per case: top-k rows that differ from the reference, block ids the attention actually read that are
-1 (padding) or beyond the query's causal blocks, tokens whose output is NaN, and max |err| against the reference.

KV pages that no request owns are filled with NaN (stale pages of an earlier poisoned request), page 0 (vLLM's
null block) with zeros, so a read of a wrong page shows up as NaN. Needs a CUDA GPU and vLLM 0.25.1 on the path.
Under compute-sanitizer, set PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that block_table[-1] lies outside any allocation.
"""

import argparse
import json
import math
import sys
import time

import torch

from vllm.models.minimax_m3.common.ops.index_topk import (
    minimax_m3_index_decode,
    minimax_m3_index_score,
    minimax_m3_index_topk,
)
from vllm.models.minimax_m3.common.ops.sparse_attn import (
    minimax_m3_sparse_attn,
    minimax_m3_sparse_attn_decode,
)

BS = 128  # sparse block == KV page
D = 128  # head dim == index head dim


def cdiv(a, b):
    return (a + b - 1) // b


class Batch:
    """decodes: list of seq lens (1 query token each); prefills: list of (context_len, query_len)."""

    def __init__(self, H, gqa, decodes, prefills, seed, dev, guard=True):
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.H, self.gqa, self.NH = H, gqa, H * gqa
        self.reqs = [(s - 1, 1) for s in decodes] + list(prefills)  # (ctx, qlen)
        self.nd = len(decodes)
        self.seq = [c + q for c, q in self.reqs]
        self.R = len(self.reqs)
        self.T = sum(q for _, q in self.reqs)
        max_blocks = max(cdiv(s, BS) for s in self.seq) + 2
        npages = 1 + sum(cdiv(s, BS) for s in self.seq) + 8
        perm = (torch.randperm(npages - 1, generator=g) + 1).tolist()  # page 0 = null block, never assigned
        bt = torch.zeros(self.R, max_blocks, dtype=torch.int32)
        it = iter(perm)
        for r, s in enumerate(self.seq):
            for b in range(cdiv(s, BS)):
                bt[r, b] = next(it)
        # per-request tensors (cpu fp32 master copies, rounded through bf16)
        rnd = lambda *shape: torch.randn(*shape, generator=g).bfloat16().float()  # noqa: E731
        self.ik = [rnd(s, D) for s in self.seq]  # index keys: one shared index head
        self.k = [rnd(s, H, D) for s in self.seq]
        self.v = [rnd(s, H, D) for s in self.seq]
        self.iq = [rnd(q, H, D) for _, q in self.reqs]
        self.q = [rnd(q, self.NH, D) for _, q in self.reqs]
        kvc = torch.full((npages, 2, BS, H, D), float("nan"))
        ikc = torch.full((npages, BS, D), float("nan"))
        kvc[0] = 0.0
        ikc[0] = 0.0
        for r, s in enumerate(self.seq):
            for j in range(s):
                p, o = int(bt[r, j // BS]), j % BS
                kvc[p, 0, o] = self.k[r][j]
                kvc[p, 1, o] = self.v[r][j]
                ikc[p, o] = self.ik[r][j]
        self.dev = dev
        self.kvc = kvc.bfloat16().to(dev)
        self.ikc = ikc.bfloat16().to(dev)
        if guard:  # a zero row before row 0, as in vLLM where the persistent block table has rows before
            self.bt = torch.cat([torch.zeros(1, max_blocks, dtype=torch.int32), bt]).to(dev)[1:]
        else:  # own allocation: row 0's [-1] lies outside it (memcheck flags the read)
            self.bt = bt.to(dev)
        self.max_blocks = max_blocks
        self.iq_all = torch.cat(self.iq).bfloat16().to(dev)
        self.q_all = torch.cat(self.q).bfloat16().to(dev)
        self.seq_t = torch.tensor(self.seq, dtype=torch.int32, device=dev)
        self.ctx_t = torch.tensor([c for c, _ in self.reqs], dtype=torch.int32, device=dev)
        qsl = [0]
        for _, q in self.reqs:
            qsl.append(qsl[-1] + q)
        self.qsl = torch.tensor(qsl, dtype=torch.int32, device=dev)
        self.max_query_len = max(q for _, q in self.reqs)
        self.max_seq_len = max(self.seq)
        # per-token (request, absolute position)
        self.tok = [(r, c + i) for r, (c, q) in enumerate(self.reqs) for i in range(q)]


def run_vllm(b: Batch, K, mode, T_budget):
    """One sparse layer's indexer + attention, as vLLM 0.25.1 runs it (mode v0.25.1) or with the fix."""
    H, nd, T = b.H, b.nd, b.T
    pad = (T_budget + 3) // 4 * 4
    buf = torch.zeros(pad, H, K, dtype=torch.int32, device=b.dev)  # model.py:797 token-major [T, H, K]
    view = buf if mode == "v0.25.1" else buf.transpose(0, 1)  # fixed: head-major view of the same storage
    scale = D**-0.5
    if nd:
        minimax_m3_index_decode(b.iq_all[:nd], b.ikc, b.bt[:nd], b.seq_t[:nd], b.max_seq_len, K, 0, 1, H,
                                1, 1, out=view)
    if b.R > nd:
        cu = (b.qsl[nd:] - nd).to(torch.int32)
        score = minimax_m3_index_score(b.iq_all[nd:], b.ikc, b.bt[nd:], cu, b.seq_t[nd:], b.ctx_t[nd:],
                                       b.max_query_len, b.max_seq_len, H)
        minimax_m3_index_topk(score, cu, b.ctx_t[nd:], b.max_query_len, K, 0, 1, out=view[:, nd:, :])
    out = torch.full((T, b.NH, D), 7.0, dtype=torch.bfloat16, device=b.dev)
    if nd:
        minimax_m3_sparse_attn_decode(b.q_all[:nd], b.kvc, view[:, :nd, :], b.bt[:nd], b.seq_t[:nd], H, scale,
                                      out[:nd], 1)
    if b.R > nd:
        cu = (b.qsl[nd:] - nd).to(torch.int32)
        minimax_m3_sparse_attn(b.q_all[nd:], b.kvc, view[:, nd:T, :], b.bt[nd:], cu, b.seq_t[nd:],
                               b.ctx_t[nd:], b.max_query_len, H, scale, out[nd:])
    torch.cuda.synchronize()
    # What each reader actually saw: [H, T, K] through the strides the attention kernels were given.
    seen = torch.empty(H, T, K, dtype=torch.int32)
    flat = buf.flatten()
    if nd:
        v = view[:, :nd, :]
        seen[:, :nd] = torch.as_strided(flat, (H, nd, K), (v.stride(0), v.stride(1), 1),
                                        v.storage_offset()).cpu()
    if b.R > nd:
        v = view[:, nd:T, :]
        seen[:, nd:] = torch.as_strided(flat, (H, T - nd, K), (v.stride(0), v.stride(1), 1),
                                        v.storage_offset()).cpu()
    return out.float().cpu(), seen


def reference(b: Batch, K, dev):
    """torch reference of the same layer (fp32, vectorized per request): selection sets [H][T], output [T,NH,D]."""
    sel = [[None] * b.T for _ in range(b.H)]
    out = torch.zeros(b.T, b.NH, D)
    scale = D**-0.5
    t0 = 0
    for r, (c, q) in enumerate(b.reqs):
        s = c + q
        nblk = cdiv(s, BS)
        pos_q = torch.arange(c, s, device=dev)  # [q]
        causal = torch.arange(s, device=dev)[None, :] <= pos_q[:, None]  # [q, s]
        ik = b.ik[r].to(dev)
        for h in range(b.H):
            sc = b.iq[r][:, h].to(dev) @ ik.T  # [q, s]
            sc = sc.masked_fill(~causal, -float("inf"))
            padded = torch.full((q, nblk * BS), -float("inf"), device=dev)
            padded[:, :s] = sc
            bs = padded.view(q, nblk, BS).max(dim=2).values  # [q, nblk]
            bs[torch.arange(q, device=dev), pos_q // BS] = 1e29  # local block forced
            top = torch.topk(bs, min(K, nblk), dim=1).indices  # [q, k]
            nvalid = torch.clamp(pos_q // BS + 1, max=K)
            chosen = torch.zeros(q, nblk, dtype=torch.bool, device=dev)
            keep = torch.arange(top.shape[1], device=dev)[None, :] < nvalid[:, None]
            chosen.scatter_(1, top, keep)  # (scatter of False onto a False row keeps it False)
            for i in range(q):
                sel[h][t0 + i] = sorted(top[i, : int(nvalid[i])].tolist())
            mask = chosen.repeat_interleave(BS, dim=1)[:, :s] & causal  # [q, s]
            qh = b.q[r][:, h * b.gqa:(h + 1) * b.gqa].to(dev)  # [q, g, D]
            att = torch.einsum("qgd,sd->qgs", qh, b.k[r][:, h].to(dev)) * scale
            att = att.masked_fill(~mask[:, None, :], -float("inf")).softmax(dim=2)
            out[t0:t0 + q, h * b.gqa:(h + 1) * b.gqa] = torch.einsum("qgs,sd->qgd", att,
                                                                     b.v[r][:, h].to(dev)).cpu()
        t0 += q
    return sel, out


def analyse(b: Batch, K, out, seen, ref_sel, ref_out):
    rows_diff = bad = 0
    bad_tokens, nan_tokens, first_nan = set(), [], {}
    for t, (r, p) in enumerate(b.tok):
        real = min(K, p // BS + 1) if t >= b.nd else min(K, cdiv(b.seq[r], BS))
        for h in range(b.H):
            got = seen[h, t, :real].tolist()
            if sorted(got) != ref_sel[h][t]:
                rows_diff += 1
            nbad = sum(1 for x in got if x < 0 or x > p // BS)
            bad += nbad
            if nbad:
                bad_tokens.add(t)
        if torch.isnan(out[t]).any():
            nan_tokens.append(t)
            first_nan.setdefault(r, p)
    ok = [t for t in range(b.T) if t not in set(nan_tokens)]
    err = (out[ok] - ref_out[ok]).abs().max().item() if ok else float("nan")
    def where(ts):
        return sorted({(b.tok[t][0], b.tok[t][1]) for t in ts})[:12]
    return {"topk_rows_differ": rows_diff, "topk_rows": b.T * b.H, "bad_block_reads": bad,
            "tokens_with_bad_reads": len(bad_tokens), "bad_read_positions(req,pos)": where(bad_tokens),
            "nan_tokens": len(nan_tokens), "first_nan_pos_per_req": first_nan,
            "max_abs_err_vs_ref(non-nan)": round(err, 4)}


CASES = {
    # name: (H index heads per rank, topk, gqa, decode seq lens, prefills (ctx, qlen), note)
    "tiny_prefill_641": (2, 4, 2, [], [(0, 641)], "tiny M3 (2 index heads, topk 4): one 641-token prompt alone"),
    "tiny_chunk_ctx512_q129": (2, 4, 2, [], [(512, 129)], "tiny: second chunk (512 cached + 129) alone"),
    "tiny_mixed_8dec_prefill": (2, 4, 2, [37, 60, 90, 130, 200, 260, 300, 390], [(256, 385)],
                                 "tiny: 8 decodes + a 385-token chunk after 256 cached"),
    "tiny_mixed_1dec_prefill": (2, 4, 2, [200], [(256, 385)], "tiny: 1 decode + a 385-token chunk (nd=1 < H=2)"),
    "tiny_decode_only_8": (2, 4, 2, [37, 60, 90, 130, 200, 260, 300, 390], [], "tiny: 8 decodes, no prefill"),
    "tiny_topk16_mixed": (2, 16, 2, [37, 60, 90, 130, 200, 260, 300, 390], [(256, 385)],
                          "tiny heads with the real topk 16"),
    "realM3_tp8_prefill_only": (1, 16, 16, [], [(0, 2100)], "real M3 per rank at TP4/TP8 (1 index head, topk 16)"),
    "realM3_tp8_1dec_prefill": (1, 16, 16, [700], [(0, 1500)], "real M3 TP4/8: 1 decode + prefill"),
    "realM3_tp8_8dec_prefill": (1, 16, 16, [300, 700, 1300, 1900, 2300, 2600, 2900, 3100], [(0, 1500)],
                                "real M3 TP4/8: 8 decodes + a 1500-token prefill"),
    "realM3_tp1_8dec_prefill": (4, 16, 16, [300, 700, 1300, 1900, 2300, 2600, 2900, 3100], [(0, 1500)],
                                "real M3 at TP1 (4 index heads, topk 16)"),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--modes", default="v0.25.1,fixed")
    ap.add_argument("--no-ref", action="store_true", help="skip the torch reference (sanitizer runs)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-guard", action="store_true", help="block table in its own allocation (sanitizer)")
    a = ap.parse_args()
    dev = torch.device("cuda")
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}", flush=True)
    results = {}
    for name in a.cases.split(","):
        H, K, gqa, dec, pre, note = CASES[name]
        t0 = time.time()
        b = Batch(H, gqa, dec, pre, a.seed, dev, guard=not a.no_guard)
        ref = None if a.no_ref else reference(b, K, dev)
        results[name] = {"note": note, "H": H, "topk": K, "decodes": dec, "prefills": pre}
        for mode in a.modes.split(","):
            out, seen = run_vllm(b, K, mode, T_budget=max(2048, b.T))
            if ref is None:
                res = {"nan_tokens": int(torch.isnan(out).any(dim=(1, 2)).sum())}
            else:
                res = analyse(b, K, out, seen, *ref)
            results[name][mode] = res
            print(f"[kernel] {name:28s} {mode:8s} {json.dumps(res)}", flush=True)
            if a.json:  # after every mode: a later crash (illegal memory access) keeps what came before
                with open(a.json, "w") as f:
                    json.dump(results, f, indent=1)
        print(f"[kernel] {name} done in {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
