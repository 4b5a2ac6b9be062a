"""vLLM general plugin (entry point `vllm.general_plugins`): MiniMax-M3 top-k buffer layout fix.

vLLM 0.25.1's MiniMax-M3 model allocates the top-k block-index buffer shared by all sparse layers token-major,
`[tokens, index_heads, topk]` (vllm/models/minimax_m3/nvidia/model.py, "Token-major [total_q, num_index_heads,
topk]"), for the SM100 MSA path. The Triton path that every non-Blackwell GPU (Hopper, Ampere) takes still slices
it head-major, `[index_heads, tokens, topk]`: `out=buf`, `buf[:, nd:, :]` (common/indexer.py,
MiniMaxM3IndexerTritonImpl.forward) and `topk[:, :nd, :]`, `topk[:, nd:num_tokens, :]`
(common/sparse_attention.py, MiniMaxM3SparseTritonImpl.forward). Heads and tokens then alias in the buffer, and
`[:, nd:]` slices the head dimension (clamped to its size) instead of skipping the decode tokens, so attention
reads other tokens' (or other requests') block ids: -1 padding, non-causal blocks, blocks of another request.

The fix is upstream's (vllm-project/vllm#49149, for issues #48603 / #49147): hand the Triton writer and reader
the head-major *view* `buf.transpose(0, 1)` of the same storage. No copy, no kernel change.

This plugin applies it only where the installed vLLM still has the bug (source check), so it is a no-op on a
fixed vLLM. Set M3LAB_F2FIX=0 to keep vLLM as shipped (for A/B runs).
"""

import inspect
import os
import sys

_DONE = False


def _log(msg: str) -> None:
    print(f"[m3lab_f2fix pid={os.getpid()}] {msg}", file=sys.stderr, flush=True)


def register() -> None:
    global _DONE
    if _DONE:
        return
    _DONE = True
    if os.environ.get("M3LAB_F2FIX", "1") == "0":
        _log("M3LAB_F2FIX=0: vLLM left as shipped")
        return
    try:
        from vllm.models.minimax_m3.common import indexer as ix
        from vllm.models.minimax_m3.common import sparse_attention as sa
    except Exception as e:  # no MiniMax-M3 in this vLLM: nothing to fix
        _log(f"MiniMax-M3 modules not importable ({e!r}); nothing patched")
        return
    ix_src = inspect.getsource(ix.MiniMaxM3IndexerTritonImpl.forward)
    sa_src = inspect.getsource(sa.MiniMaxM3SparseTritonImpl.forward)
    if "transpose" in ix_src or "transpose" in sa_src or "out=buf," not in ix_src:
        _log("this vLLM's Triton MiniMax-M3 path already handles the buffer layout; nothing patched")
        return

    ix_forward = ix.MiniMaxM3IndexerTritonImpl.forward
    sa_forward = sa.MiniMaxM3SparseTritonImpl.forward

    def indexer_forward(self, index_query):
        buf = self.topk_indices_buffer
        if buf is None:
            return ix_forward(self, index_query)
        self.topk_indices_buffer = buf.transpose(0, 1)  # [T, H, K] storage seen as [H, T, K]
        try:
            return ix_forward(self, index_query)
        finally:
            self.topk_indices_buffer = buf

    def attend_forward(self, layer, query, kv_cache, output):
        buf = layer.topk_indices_buffer
        if buf is None:
            return sa_forward(self, layer, query, kv_cache, output)
        layer.topk_indices_buffer = buf.transpose(0, 1)
        try:
            return sa_forward(self, layer, query, kv_cache, output)
        finally:
            layer.topk_indices_buffer = buf

    ix.MiniMaxM3IndexerTritonImpl.forward = indexer_forward
    sa.MiniMaxM3SparseTritonImpl.forward = attend_forward
    _log("patched MiniMaxM3IndexerTritonImpl.forward and MiniMaxM3SparseTritonImpl.forward "
         "(token-major top-k buffer passed as its head-major view)")
