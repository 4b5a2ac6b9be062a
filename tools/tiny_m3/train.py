"""Train the tiny MiniMax-M3 from scratch on tools.tiny_m3.synthdata, so the embedded run's verdicts mean something.

From the repository root:

    python -m tools.tiny_m3.train train --out-dir build/tiny-m3-train --steps 3702   # one H200: ~8 min
    python -m tools.tiny_m3.train eval build/tiny-m3-train/checkpoint [--fp8]        # the targets, on CPU
    python -m tools.tiny_m3.train install build/tiny-m3-train                        # → m3lab/assets/tiny-m3/

The model is `TinySpec()` exactly as the embedded DAG builds it (`build_tiny_model(weights="random")` is the
init), trained in bf16 autocast over fp32 weights with AdamW. Four things beyond a plain LM loss, because M3
has parts that a next-token loss alone cannot train:

  * the loss is split: answers (what the stages grade) and prompts (filler, questions, chat context) are
    averaged separately and prompts weigh `context_loss_weight`; otherwise a 5-digit key is 4 tokens out of
    4096 and the retrieval signal drowns in filler,
  * the lightning indexer gets no gradient from the LM loss (it only picks blocks through a top-k), so it is
    distilled DSA-style: the KL from the layer's own dense attention (averaged over the heads of each KV group,
    no grad) to softmax(indexer scores), on a sample of query positions. The first `dense_warmup_frac` of the
    steps run the sparse layers dense (every block selected) so attention learns where to look before the
    indexer decides what it may see,
  * MoE routing is balanced without an aux loss, as M3's `e_score_correction_bias` is meant to be used: after
    each step the bias of an overloaded expert goes down by `bias_update_rate`, of an underloaded one up,
  * the shared experts are made load-bearing, as a real M3's are: per token, each MoE layer's routed output
    (`routed_dropout`) and the dense layer's MLP output (`dense_dropout`) are dropped in training, so the never-
    dropped shared experts must carry the core computation and a loader that zeroes them is caught (off by
    default: the committed weights predate it).

`--time-budget-s` turns a wall-clock budget into a step count after `calibrate_steps` steps (logged and written
to the model card), so a retrain with `--steps N` repeats the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from m3lab.checkpoint import native_to_hub, write_tensors
from m3lab.needle import Haystack, build_prompt, make_key, score_completion
from m3lab.tinymodel import TRAINED_DIR, TinySpec, build_tiny_checkpoint, build_tiny_model
from tools.tiny_m3 import synthdata
from tools.tiny_m3.synthdata import ARITH_PROMPT, Example, MixConfig, Mixture

__all__ = ["TrainConfig", "train", "evaluate", "evaluate_checkpoint", "install", "plot_curve", "main"]

ASSETS = TRAINED_DIR  # m3lab/assets/tiny-m3/: `install` writes there what a run reads
# Files of the m3lab package that no run reads (globs relative to the package): the tiny model's card and the
# training records `install`/`eval --output` write beside its weights. What a run reads, m3lab's modules declare
# in their DATA (m3lab.fingerprint); tests/test_structure.py checks every package data file is one or the other.
RECORDS = ("assets/tiny-m3/MODEL_CARD.md", "assets/tiny-m3/metrics.json", "assets/tiny-m3/train_log.jsonl",
           "assets/tiny-m3/training_curve.png", "assets/tiny-m3/eval_cpu_*.json")
TASKS = ("needle", "facts", "arith", "chat")


@dataclass
class TrainConfig:
    out_dir: str = "build/tiny-m3-train"
    steps: int = 3000
    time_budget_s: float = 0.0  # > 0: steps = how many fit in this many seconds, measured after calibrate_steps
    calibrate_steps: int = 40
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    context_loss_weight: float = 0.1  # prompt tokens vs answer tokens (each averaged on its own)
    indexer_loss_weight: float = 0.5
    indexer_queries: int = 256  # query positions per sequence the indexer is distilled on (32 of them the last)
    dense_warmup_frac: float = 0.2  # first steps: sparse layers attend every block, the indexer learns from that
    bias_update_rate: float = 1e-3  # e_score_correction_bias step per update (aux-loss-free balancing)
    # Shared experts made load-bearing: per token, drop the MoE layers' routed output / the dense layer's MLP output
    # in training. 0 = off, which is how the committed weights were trained; 0.5/0.5 makes zeroed shared experts
    # break greedy outputs (see RoutedExpertDropout) but cost ~8 points of held-out arithmetic at 3409 steps.
    routed_dropout: float = 0.5
    dense_dropout: float = 0.5
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    # the end-of-training eval on the training device: extra needle grids, arithmetic and chat items. Greedy
    # decoding of a tiny MoE is launch-bound on a GPU, so the full eval runs on CPU (`eval`), as the DAG does.
    final_eval: tuple[int, int, int] = (1, 60, 10)
    seed: int = 0  # model init and tokenizer (TinySpec builder seed): the embedded DAG's seed
    workers: int = 8  # data loader processes: a 4K needle prompt takes ~10 ms to build and tokenize
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    mix: MixConfig = field(default_factory=MixConfig)


# ---------------------------------------------------------------------------------------------------
# data: Mixture.batch(step) → two padded tensors, built in worker processes


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids plus, per position, whether that token is an answer or prompt token.

    Right padding needs no attention mask: with causal attention no real token sees a pad, and the indexer
    treats trailing keys as future keys (its blocks are anchored at slot 0, which left padding would shift).
    """
    width = -(-max(len(e) for e in examples) // 64) * 64  # few distinct shapes: kernels tuned per shape get reused
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    answer = torch.zeros((len(examples), width), dtype=torch.bool)
    context = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, e in enumerate(examples):
        p, n = len(e.prompt), len(e)
        ids[row, :n] = torch.tensor(e.ids)
        context[row, 1:p] = True  # token 0 has nothing to be predicted from
        answer[row, p:n] = True
    task = torch.tensor([TASKS.index(e.task) for e in examples])
    lengths = torch.tensor([len(e) for e in examples])
    return {"ids": ids, "answer": answer, "context": context, "task": task, "lengths": lengths}


class StepData(torch.utils.data.Dataset):
    """Item `step` is that step's (needle batch, short batch): workers build steps in parallel, in order."""

    def __init__(self, tokenizer_dir: str, mix: MixConfig, pad_id: int) -> None:
        self.tokenizer_dir, self.mix, self.pad_id = tokenizer_dir, mix, pad_id
        self._mixture: Mixture | None = None  # built lazily: one tokenizer per worker process

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, step: int) -> tuple[dict, dict]:
        if self._mixture is None:
            from transformers import AutoTokenizer

            self._mixture = Mixture(AutoTokenizer.from_pretrained(self.tokenizer_dir), self.mix)
        needles, short = self._mixture.batch(step)
        return collate(needles, self.pad_id), collate(short, self.pad_id)


# ---------------------------------------------------------------------------------------------------
# the parts of M3 a next-token loss cannot train


def _text_model(model):
    return model.model.language_model


class IndexerDistillation:
    """DSA-style training of the lightning indexers: KL(dense attention of the layer ‖ softmax(indexer scores)).

    A forward pre-hook on each sparse attention sees the layer's input; it recomputes the layer's queries and
    keys without grad (the target) and the indexer's with grad, on a detached input so the KL trains the
    indexer alone. The indexer's own forward, which only feeds a top-k, runs under no_grad.
    """

    def __init__(self, model, n_queries: int) -> None:
        self.n_queries, self.enabled, self.losses = n_queries, False, []
        self.min_length = 0  # queries are sampled below the shortest sequence of the batch (no pads)
        self.indexers = []
        for layer in _text_model(model).layers:
            attn = layer.self_attn
            if attn.indexer is not None:
                attn.indexer.forward = torch.no_grad()(attn.indexer.forward)
                attn.register_forward_pre_hook(self._hook, with_kwargs=True)
                self.indexers.append(attn.indexer)

    def set_dense(self, dense: bool) -> None:
        """Dense: every block selected (top-k over all blocks), i.e. plain causal attention."""
        for ix in self.indexers:
            ix.topk_blocks = 10**6 if dense else ix.config.index_topk_blocks

    def _hook(self, attn, args, kwargs) -> None:
        if not (self.enabled and attn.training):
            return
        from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import apply_rotary_pos_emb, repeat_kv

        def rope(x, cos, sin):
            return apply_rotary_pos_emb(x, x, cos, sin)[0]

        h = kwargs["hidden_states"].detach()
        cos, sin = kwargs["position_embeddings"]
        batch, seq, _ = h.shape
        n = min(self.min_length or seq, seq)
        tail = torch.arange(max(0, n - 32), n, device=h.device)
        rand = torch.randint(0, n, (max(0, self.n_queries - len(tail)),), device=h.device)
        q_pos = torch.cat([rand, tail]).unique()  # sorted
        cos_q, sin_q = cos[:, q_pos], sin[:, q_pos]
        future = torch.arange(seq, device=h.device)[None, :] > q_pos[:, None]  # [Q, S]

        with torch.no_grad():  # target: the layer's dense attention, averaged over each KV group's heads
            hd = attn.head_dim
            q = attn.q_norm(attn.q_proj(h[:, q_pos]).view(batch, len(q_pos), -1, hd)).transpose(1, 2)
            k = attn.k_norm(attn.k_proj(h).view(batch, seq, -1, hd)).transpose(1, 2)
            q, k = rope(q, cos_q, sin_q), rope(k, cos, sin)
            logits = (q.float() @ repeat_kv(k, attn.num_key_value_groups).float().transpose(-1, -2)) * attn.scaling
            probs = logits.masked_fill(future, float("-inf")).softmax(-1)
            groups = k.shape[1]
            target = probs.view(batch, groups, -1, len(q_pos), seq).mean(2)  # [B, G, Q, S]

        ix = attn.indexer
        d = ix.head_dim
        iq = ix.q_norm(ix.q_proj(h[:, q_pos]).view(batch, len(q_pos), -1, d)).transpose(1, 2)
        ik = ix.k_norm(ix.k_proj(h).view(batch, seq, 1, d)).transpose(1, 2)
        iq, ik = rope(iq, cos_q[..., :d], sin_q[..., :d]), rope(ik, cos[..., :d], sin[..., :d])
        # Top-k is scale-invariant; the 1/sqrt(d) only keeps the softmax in a trainable range.
        scores = (iq.float() @ ik.float().transpose(-1, -2)) * d**-0.5  # [B, H_idx, Q, S]
        log_q = scores.masked_fill(future, float("-inf")).log_softmax(-1)
        kl = (target * (target.clamp_min(1e-12).log() - log_q.masked_fill(future, 0.0))).sum(-1)
        self.losses.append(kl.mean())

    def pop_loss(self) -> torch.Tensor | None:
        loss = torch.stack(self.losses).mean() if self.losses else None
        self.losses = []
        return loss


class ExpertBalancer:
    """Aux-loss-free load balancing: nudge each router's `e_score_correction_bias` against its expert load."""

    def __init__(self, model, rate: float) -> None:
        self.rate, self.gates, self.loads = rate, [], {}
        for layer in _text_model(model).layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "e_score_correction_bias"):
                with torch.no_grad():
                    gate.e_score_correction_bias.zero_()  # the builder's random bias is for key-mapping tests
                gate.register_forward_hook(self._hook)
                self.gates.append(gate)

    def _hook(self, gate, args, output) -> None:
        if gate.training:
            counts = torch.bincount(output[2].flatten(), minlength=gate.num_experts).float()
            self.loads[gate] = self.loads.get(gate, 0) + counts

    @torch.no_grad()
    def update(self) -> float:
        """Apply one bias step; returns the worst max/mean load ratio seen (1.0 = perfectly balanced)."""
        worst = 1.0
        for gate, load in self.loads.items():
            gate.e_score_correction_bias.add_(self.rate * torch.sign(load.mean() - load))
            worst = max(worst, (load.max() / load.mean().clamp_min(1)).item())
        self.loads = {}
        return worst


class RoutedExpertDropout:
    """Routed-expert dropout: in training, each MoE layer drops its routed experts' output for a token with
    probability `p` (kept outputs scaled by 1/(1-p), as dropout does), so the shared expert alone must carry the
    layer's core computation, as a real M3's does. Without it the tiny model learned to route around its shared
    experts: zeroing them (card 002's loader fault) changed no greedy output. Masks come from a generator seeded
    with the run's seed: a retrain draws the same masks."""

    def __init__(self, model, p: float, seed: int, device: str, dense_p: float = 0.0) -> None:
        self.generator = torch.Generator(device).manual_seed(seed + 7919)
        self.layers = 0
        for layer in _text_model(model).layers:
            if getattr(layer.mlp, "shared_experts", None) is not None:
                module, rate = layer.mlp.experts, p
            else:  # the dense MLP: dropped likewise, so the facts cannot all live there
                module, rate = layer.mlp, dense_p
            if rate > 0:
                module.register_forward_hook(lambda m, a, out, rate=rate: self._hook(m, out, rate))
                self.layers += 1

    def _hook(self, module, output, p: float):
        if not module.training:
            return None
        keep = torch.rand(*output.shape[:-1], 1, device=output.device, generator=self.generator) >= p
        return output * keep.to(output.dtype) / (1 - p)


# ---------------------------------------------------------------------------------------------------
# loss


def lm_losses(model, batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    """Mean cross-entropy over answer tokens and over prompt tokens, and the answer loss per task."""
    ids = batch["ids"].to(device, non_blocking=True)
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    ce = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, S-1]
    answer, context = batch["answer"][:, 1:].to(device), batch["context"][:, 1:].to(device)
    out = {"answer": (ce * answer).sum() / answer.sum().clamp_min(1),
           "context": (ce * context).sum() / context.sum().clamp_min(1)}
    task = batch["task"].to(device)[:, None].expand_as(answer)
    for i, name in enumerate(TASKS):
        mask = answer & (task == i)
        if mask.any():
            out[f"answer/{name}"] = ((ce * mask).sum() / mask.sum()).detach()
    return out


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine from lr to min_lr at `total`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def _optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; matrices decay, norms do not. The vision tower and projector stay as built: no image data."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not name.startswith("model.language_model.") and not name.startswith("lm_head."):
            p.requires_grad_(False)
        elif p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=cfg.device.startswith("cuda"))


# ---------------------------------------------------------------------------------------------------
# the loop


def _log(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()), flush=True)


def train(cfg: TrainConfig) -> Path:
    """Train, evaluate, and write `<out_dir>/checkpoint` (the embedded checkpoint with the trained weights)."""
    from transformers import AutoTokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.backends.cuda.matmul.allow_tf32 = True
    # cuDNN's SDPA builds a plan per new shape (~1 s each), and the needle length changes every step; the
    # flash and memory-efficient kernels need no plan.
    torch.backends.cuda.enable_cudnn_sdp(False)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    log_path.unlink(missing_ok=True)
    torch.manual_seed(cfg.seed)
    spec = TinySpec()
    init_dir = build_tiny_checkpoint(out / "init", spec, cfg.seed, weights="random")  # tokenizer, config
    tok = AutoTokenizer.from_pretrained(init_dir)

    device = cfg.device
    model = build_tiny_model(spec, cfg.seed, weights="random").float().to(device).train()
    distill = IndexerDistillation(model, cfg.indexer_queries)
    balancer = ExpertBalancer(model, cfg.bias_update_rate)
    dropout = RoutedExpertDropout(model, cfg.routed_dropout, cfg.seed, device, cfg.dense_dropout)
    print(f"routed-expert dropout p={cfg.routed_dropout}, dense-MLP dropout p={cfg.dense_dropout}: "
          f"{dropout.layers} layers", flush=True)
    opt = _optimizer(model, cfg)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"training {n_params / 1e6:.2f}M parameters on {device}: {spec}", flush=True)

    loader = torch.utils.data.DataLoader(StepData(str(init_dir), cfg.mix, tok.pad_token_id), batch_size=None,
                                         num_workers=cfg.workers, prefetch_factor=4 if cfg.workers else None,
                                         persistent_workers=False, pin_memory=device.startswith("cuda"))
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16,
                              enabled=device.startswith("cuda"))
    total, t_start, t_calibrated = cfg.steps, time.perf_counter(), None
    dense_steps = int(cfg.dense_warmup_frac * total)
    for step, (needle_batch, short_batch) in enumerate(loader):
        if cfg.time_budget_s and step == cfg.calibrate_steps:  # fix the step count once the pace is known
            t_calibrated = time.perf_counter()
        if cfg.time_budget_s and step == 2 * cfg.calibrate_steps:
            pace = (time.perf_counter() - t_calibrated) / cfg.calibrate_steps
            total = int((cfg.time_budget_s - (time.perf_counter() - t_start)) / pace) + step
            dense_steps = int(cfg.dense_warmup_frac * total)
            print(f"{pace * 1000:.0f} ms/step: {total} steps fit in {cfg.time_budget_s:.0f} s", flush=True)
        if step >= total:
            break
        distill.set_dense(step < dense_steps)
        lr = lr_at(step, total, cfg)
        for group in opt.param_groups:
            group["lr"] = lr

        record: dict[str, Any] = {}
        distill.min_length = int(needle_batch["lengths"].min())
        for name, batch in (("needle", needle_batch), ("short", short_batch)):
            distill.enabled = name == "needle"  # short examples fit in 4 blocks: nothing to select
            with autocast:
                losses = lm_losses(model, batch, device)
                loss = losses["answer"] + cfg.context_loss_weight * losses["context"]
                kl = distill.pop_loss()
                if kl is not None:
                    loss = loss + cfg.indexer_loss_weight * kl
                    losses["indexer_kl"] = kl.detach()
            loss.backward()
            record.update({f"{name}/{k}" if k in ("answer", "context") else k: v.detach() for k, v in losses.items()})
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        load_ratio = balancer.update()

        if step % cfg.log_every == 0 or step == total - 1:
            mem = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0
            _log(log_path, {"step": step, "time_s": round(time.perf_counter() - t_start, 1), "lr": lr, "mem_gb": mem,
                            "length": int(needle_batch["ids"].shape[1]), "dense": step < dense_steps,
                            "grad_norm": float(grad_norm), "expert_load_max": load_ratio,
                            **{k: float(v) for k, v in record.items()}})
        if cfg.eval_every and step and step % cfg.eval_every == 0:
            distill.set_dense(False)  # grade what inference computes: real block selection
            _log(log_path, {"step": step, **_flatten(evaluate(model, tok, device, 0, 20, 5))})
            model.train()

    train_s = time.perf_counter() - t_start
    ckpt = save(model, spec, cfg.seed, out)
    t_eval = time.perf_counter()
    ev = evaluate(model, tok, device, *cfg.final_eval)
    metrics = {"steps": total, "train_seconds": round(train_s, 1), "device": _device_name(device),
               "eval_seconds": round(time.perf_counter() - t_eval, 1), "config": dataclasses.asdict(cfg),
               "spec": dataclasses.asdict(spec), "eval": ev}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(_flatten(metrics["eval"]), indent=1), flush=True)
    return ckpt


def save(model, spec: TinySpec, seed: int, out: Path) -> Path:
    """The trained weights in the hub layout, bf16 (routing bias float32, as the builder writes them), and the
    embedded checkpoint built around them."""
    state = {k: v.detach().to("cpu", torch.bfloat16) for k, v in model.state_dict().items()}
    tensors = native_to_hub(state, layout="vl")
    for key in tensors:
        if key.endswith("e_score_correction_bias"):
            tensors[key] = tensors[key].float()  # bf16 values stored as float32: what loads is what was trained
    weights = out / "model.safetensors"
    write_tensors(tensors, weights)
    (out / "spec.json").write_text(json.dumps({"seed": seed, "spec": dataclasses.asdict(spec)}, indent=2) + "\n")
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    return build_tiny_checkpoint(out / "checkpoint", spec, seed, weights=weights)


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)"


# ---------------------------------------------------------------------------------------------------
# evaluation: what the stages grade, offline, greedy


def _suite() -> tuple[list[dict], list[int], list[float]]:
    """The correctness prompts and the needle grid of the cpu-tiny profile, merged as a run merges them (the
    prompts come from params/base.yaml, the grid from params/cards/tiny.yaml)."""
    from m3lab.params import load_params

    p = load_params("cpu-tiny")
    prompts = [x.model_dump() for x in p.correctness.prompts]
    depths = [int(d) if float(d).is_integer() else d for d in p.needle.depths]
    return prompts, list(p.needle.lengths), depths


@torch.no_grad()
def _greedy(model, tok, prompt: str | list[int], max_new_tokens: int, device: str) -> str:
    ids = tok(prompt, return_tensors="pt")["input_ids"] if isinstance(prompt, str) else torch.tensor([prompt])
    ids = ids.to(device)
    with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda")):
        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


_ANSWER = re.compile(r"####\s*(-?\d+)")


def evaluate(model, tok, device: str = "cpu", extra_needle_seeds: int = 4, arith_items: int = 300,
             chat_items: int = 20, random_needles: int = 0) -> dict[str, Any]:
    """Correctness prompts, the needle grid (seed 0, as the stage runs it), `extra_needle_seeds` more grids
    (other haystacks and keys) and `random_needles` cells at random lengths and depths, held-out arithmetic
    (exact "#### N"), and chat turns (exact match)."""
    model.eval()
    prompts, lengths, depths = _suite()
    result: dict[str, Any] = {}

    rows = []
    for p in prompts:
        out = _greedy(model, tok, p["prompt"], 12, device)
        rows.append({"id": p["id"], "output": out, "passed": all(e in out for e in p["expect"])})
    result["correctness"] = {"passed": sum(r["passed"] for r in rows), "total": len(rows), "rows": rows}

    def needle_grid(seed: int) -> list[dict]:
        hay, cells = Haystack(tok, seed), []
        for length in lengths:
            for depth in depths:
                key = make_key(seed, length, depth)
                out = _greedy(model, tok, build_prompt(tok, length, depth, key, haystack=hay).text, 8, device)
                cells.append({"seed": seed, "length": length, "depth": depth, "key": key, "output": out,
                              "hit": score_completion(out, key)})
        return cells

    grid = needle_grid(0)
    result["needle_grid"] = {"hits": sum(c["hit"] for c in grid), "total": len(grid),
                             "misses": [c for c in grid if not c["hit"]]}
    extra = [c for s in range(1, 1 + extra_needle_seeds) for c in needle_grid(s)]
    result["needle_extra"] = {"seeds": sorted({c["seed"] for c in extra}), "hits": sum(c["hit"] for c in extra),
                              "total": len(extra), "misses": [c for c in extra if not c["hit"]]}
    cells = []
    for i in range(random_needles):  # any length up to the longest that fits, any depth, a haystack each
        rng = random.Random(f"random-needle/{i}")
        seed, length, depth = 100 + i, rng.randint(128, 4088), round(rng.uniform(0, 100), 1)
        key = make_key(seed, length, depth)
        out = _greedy(model, tok, build_prompt(tok, length, depth, key, seed=seed).text, 8, device)
        cells.append({"seed": seed, "length": length, "depth": depth, "key": key, "output": out,
                      "hit": score_completion(out, key)})
    if cells:
        result["needle_random"] = {"hits": sum(c["hit"] for c in cells), "total": len(cells),
                                   "misses": [c for c in cells if not c["hit"]]}

    items = synthdata.arith_eval_items(arith_items)
    hits = 0
    for item in items:
        out = _greedy(model, tok, ARITH_PROMPT.format(question=item["question"]), 96, device)
        m, want = _ANSWER.search(out), item["answer"].rsplit("#### ", 1)[1]
        hits += bool(m and m.group(1) == want)
    answers = [it["answer"].rsplit("#### ", 1)[1] for it in items]
    result["arith"] = {"correct": hits, "total": len(items),
                       "majority_baseline": max(answers.count(a) for a in set(answers)) / len(items)}

    rows = []  # chat: the template's format (think block, M3 tool call) on conversations drawn with another seed
    for i in range(chat_items):
        e = synthdata.chat_example(tok, i, seed=999)
        want = tok.decode(e.completion, skip_special_tokens=True)
        out = _greedy(model, tok, e.prompt, len(e.completion) + 8, device)
        rows.append({"tool_call": "<invoke name=" in want, "exact": out == want})
    calls = [r for r in rows if r["tool_call"]]
    result["chat"] = {"exact": sum(r["exact"] for r in rows), "total": len(rows),
                      "tool_calls_exact": sum(r["exact"] for r in calls), "tool_calls": len(calls)}
    return result


def _flatten(ev: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of an `evaluate` result."""
    return {"correctness": f"{ev['correctness']['passed']}/{ev['correctness']['total']}",
            "needle_grid": f"{ev['needle_grid']['hits']}/{ev['needle_grid']['total']}",
            "needle_extra": f"{ev['needle_extra']['hits']}/{ev['needle_extra']['total']}",
            **({"needle_random": f"{ev['needle_random']['hits']}/{ev['needle_random']['total']}"}
               if "needle_random" in ev else {}),
            "arith": f"{ev['arith']['correct']}/{ev['arith']['total']}",
            "chat": f"{ev['chat']['exact']}/{ev['chat']['total']}",
            "chat_tool_calls": f"{ev['chat']['tool_calls_exact']}/{ev['chat']['tool_calls']}"}


def evaluate_checkpoint(model_dir: str | Path, fp8: bool = False, threads: int | None = None) -> dict[str, Any]:
    """`evaluate` on a checkpoint folder, on CPU in bf16 with transformers; `fp8`: its fp8_dynamic quantization
    (m3lab.quantize, as the embedded DAG serves it) instead."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    model_dir = Path(model_dir)
    if fp8:
        from m3lab.quant.core import quantize

        model_dir = Path(quantize(model_dir, f"{model_dir}.fp8", "fp8_dynamic").model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16)
    t = time.perf_counter()
    result = evaluate(model, tok, "cpu", random_needles=60)
    result["seconds"] = round(time.perf_counter() - t, 1)
    result["model"] = f"{model_dir.name}: fp8_dynamic (m3lab.quantize)" if fp8 else f"{model_dir.name}: bf16"
    return result


# ---------------------------------------------------------------------------------------------------
# assets


def plot_curve(log_path: str | Path, png: str | Path) -> Path:
    """Answer loss per task, prompt loss and indexer KL against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines()]
    rows = [r for r in rows if "lr" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in [("answer/needle", "needle answer"), ("answer/facts", "facts answer"),
                       ("answer/arith", "arith answer"), ("answer/chat", "chat answer"),
                       ("needle/context", "needle prompt (filler)"), ("short/context", "short prompts")]:
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax1.plot(*zip(*_smooth(pts)), label=label)
    ax1.set(yscale="log", xlabel="step", ylabel="cross-entropy (nats/token, smoothed)", title="LM losses")
    ax1.legend(fontsize=8)
    pts = [(r["step"], r["indexer_kl"]) for r in rows if "indexer_kl" in r]
    ax2.plot(*zip(*_smooth(pts)), color="tab:purple")
    dense_end = next((r["step"] for r in rows if not r["dense"]), None)
    if dense_end is not None:
        ax2.axvline(dense_end, color="gray", ls="--", lw=1)
        ax2.text(dense_end, ax2.get_ylim()[1] * 0.95, " sparse from here", fontsize=8, va="top")
    ax2.set(xlabel="step", ylabel="KL (nats)", title="lightning indexer distillation")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)


def _smooth(pts: list[tuple[int, float]], k: int = 9) -> list[tuple[int, float]]:
    return [(pts[i][0], sum(v for _, v in pts[max(0, i - k + 1):i + 1]) / len(pts[max(0, i - k + 1):i + 1]))
            for i in range(len(pts))]


def install(run_dir: str | Path, assets: Path = ASSETS) -> Path:
    """Copy a training run's weights, spec and log into the package assets, with the curve and eval items."""
    run_dir = Path(run_dir)
    assets.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "spec.json", "metrics.json", "train_log.jsonl"):
        shutil.copyfile(run_dir / name, assets / name)
    plot_curve(assets / "train_log.jsonl", assets / "training_curve.png")
    synthdata.write_arith_eval(assets / "arith_eval.jsonl")
    return assets


# ---------------------------------------------------------------------------------------------------
# command line


def _add_fields(parser: argparse.ArgumentParser, cls: type) -> None:
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, (bool, int, float, str)):
            parser.add_argument("--" + f.name.replace("_", "-"), type=type(default), default=default)
        elif isinstance(default, tuple):  # e.g. --final-eval 1,60,10
            parser.add_argument("--" + f.name.replace("_", "-"), default=default,
                                type=lambda text: tuple(int(x) for x in text.split(",")))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.tiny_m3.train", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train from scratch; writes <out-dir>/checkpoint and metrics.json")
    _add_fields(t, TrainConfig)
    _add_fields(t, MixConfig)
    e = sub.add_parser("eval", help="evaluate a checkpoint folder on CPU (bf16, greedy)")
    e.add_argument("model_dir")
    e.add_argument("--fp8", action="store_true", help="quantize it with fp8_dynamic first")
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--output", default=None, help="write the full result as JSON here")
    i = sub.add_parser("install", help="copy a run's weights into m3lab/assets/tiny-m3/ and draw the curve")
    i.add_argument("run_dir")
    a = ap.parse_args(argv)

    if a.cmd == "train":
        mix = MixConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(MixConfig) if hasattr(a, f.name)})
        names = {f.name for f in dataclasses.fields(TrainConfig)} - {"mix"}
        train(TrainConfig(mix=mix, **{n: getattr(a, n) for n in names}))
    elif a.cmd == "eval":
        result = evaluate_checkpoint(a.model_dir, fp8=a.fp8, threads=a.threads)
        if a.output:
            Path(a.output).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        print(json.dumps({**_flatten(result), "seconds": result["seconds"]}, indent=1))
    else:
        print(install(a.run_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
