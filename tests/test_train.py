"""The trained tiny M3: its synthetic data is deterministic and in the stages' formats, the committed weights load
and are what the builder writes, and the model still answers (so a broken or stale asset fails CI)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from m3lab.download import DownloadError, _embedded_checkpoint
from m3lab.needle import QUESTION, Haystack, build_prompt, make_key, score_completion
from m3lab.tinymodel import TRAINED_DIR, TinySpec, build_tiny_checkpoint, build_tiny_model, trained_weights
from tools.tiny_m3 import synthdata  # the training code lives beside the package (pytest's pythonpath: the repo)
from tools.tiny_m3.synthdata import EOS, MixConfig, Mixture
from tools.tiny_m3.train import IndexerDistillation, RoutedExpertDropout, _suite, collate, lm_losses


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("trained") / "vl")


@pytest.fixture(scope="module")
def tok(checkpoint):
    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def model():
    return build_tiny_model()


def _greedy(model, tok, prompt: str, new: int) -> str:
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=new, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


# --- data ----------------------------------------------------------------------------------------------------


def test_mixture_is_deterministic_and_has_every_task(tok):
    mix = Mixture(tok, MixConfig(needle_tokens=2048, max_length=600, short_batch=24))
    first, again = mix.batch(5), Mixture(tok, MixConfig(needle_tokens=2048, max_length=600, short_batch=24)).batch(5)
    assert [(e.prompt, e.completion) for part in first for e in part] == \
           [(e.prompt, e.completion) for part in again for e in part]
    assert mix.batch(6)[0][0].ids != first[0][0].ids
    needles, short = first
    assert {e.task for e in needles} == {"needle"} and {e.task for e in short} == {"facts", "arith", "chat"}
    # one prompt length per step; build_prompt lands on it, or within a few tokens where merges forbid it
    assert all(abs(len(e.prompt) - mix.needle_length(5)) <= 2 for e in needles)


def test_needle_examples_are_the_needle_stage_prompt(tok):
    e = synthdata.needle_example(tok, 3, 700)
    prompt, answer = tok.decode(e.prompt), tok.decode(e.completion)
    assert prompt.endswith(QUESTION) and len(e.prompt) == 700
    key = answer.removeprefix(" ").removesuffix("." + EOS)
    assert answer == f" {key}.{EOS}" and f"The pass key is {key}. Remember it." in prompt
    assert e.ids == synthdata.needle_example(tok, 3, 700).ids


def test_facts_arith_and_chat_use_the_graded_formats(tok):
    facts = [tok.decode(synthdata.fact_example(tok, i).ids) for i in range(200)]
    assert f"The capital of France is Paris.{EOS}" in facts and f"日本の首都は東京です。{EOS}" in facts
    a = synthdata.arith_example(tok, 0)
    text = tok.decode(a.prompt)
    assert text.startswith("Question: ") and text.endswith("\nAnswer:")
    assert tok.decode(a.completion).rstrip(EOS).rsplit("\n#### ", 1)[1].isdigit()
    chats = [tok.decode(synthdata.chat_example(tok, i).ids) for i in range(30)]
    assert all(c.startswith("]~!b[]~b]system\n") and c.endswith(EOS) for c in chats)
    assert any("<mm:think>" in c and "</mm:think>" in c for c in chats)
    assert any('<invoke name="get_weather">]<]minimax[>[<city>' in c for c in chats)


def test_arith_eval_set_is_committed_held_out_and_gsm8k_shaped():
    lines = (TRAINED_DIR / "arith_eval.jsonl").read_text().splitlines()
    items = [json.loads(line) for line in lines]
    assert items == synthdata.arith_eval_items(len(items)) and len(items) == 300
    assert all(set(it) == {"question", "answer"} and "\n#### " in it["answer"] for it in items)
    train = {synthdata.arith_problem(i)["question"] for i in range(3000)}
    assert not train & {it["question"] for it in items}


def test_offline_eval_suite_is_what_the_embedded_run_grades():
    """`train eval` grades the 4 correctness prompts and the 20 needle cells the model card reports (4/4, 20/20):
    the grid of the merged cpu-tiny profile, whichever params file holds it."""
    from m3lab.params import load_params

    prompts, lengths, depths = _suite()
    run = load_params("cpu-tiny")
    assert [p["id"] for p in prompts] == [p.id for p in run.correctness.prompts] and len(prompts) == 4
    assert (lengths, depths) == ([512, 1024, 2048, 4000], [0, 25, 50, 75, 100])
    assert lengths == run.needle.lengths and depths == run.needle.depths


# --- the committed weights -----------------------------------------------------------------------------------


def test_committed_weights_match_the_default_spec_and_stay_small():
    meta = json.loads((TRAINED_DIR / "spec.json").read_text())
    assert meta["seed"] == 0 and meta["spec"]["head_dim"] == meta["spec"]["index_head_dim"] == 128
    assert trained_weights(TinySpec(), 0) == TRAINED_DIR / "model.safetensors"
    assert TinySpec.hopper() == TinySpec()  # one checkpoint for CPU and vLLM on Hopper
    assert (TRAINED_DIR / "model.safetensors").stat().st_size < 20e6
    with pytest.raises(ValueError, match="weights='random'"):
        trained_weights(TinySpec(hidden_size=128), 0)


def test_builder_writes_the_committed_weights_and_the_model_is_them(checkpoint, model):
    from transformers import MiniMaxM3SparseForConditionalGeneration

    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    assert digest(checkpoint / "model.safetensors") == digest(TRAINED_DIR / "model.safetensors")
    loaded = MiniMaxM3SparseForConditionalGeneration.from_pretrained(checkpoint).state_dict()
    assert all(torch.equal(loaded[k].float(), v.float()) for k, v in model.state_dict().items())


def test_embedded_cache_key_follows_the_weights(tmp_path):
    trained = _embedded_checkpoint(tmp_path, {}, 0)
    random_ = _embedded_checkpoint(tmp_path, {"weights": "random"}, 0)
    assert trained != random_
    assert (trained / "model.safetensors").read_bytes() == (TRAINED_DIR / "model.safetensors").read_bytes()
    with pytest.raises(DownloadError, match="weights"):
        _embedded_checkpoint(tmp_path, {"weights": "best"}, 0)
    with pytest.raises(DownloadError, match="random"):
        _embedded_checkpoint(tmp_path, {"hidden_size": 64}, 0)


# --- the trained model answers --------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt, expect", [("The capital of France is", "Paris"), ("日本の首都は", "東京"),
                                            ("The capital of Italy is", "Rome"), ("ドイツの首都は", "ベルリン")])
def test_trained_model_knows_the_correctness_facts(model, tok, prompt, expect):
    assert expect in _greedy(model, tok, prompt, 12)


@pytest.mark.parametrize("depth", [0, 50, 100])
def test_trained_model_finds_a_short_needle(model, tok, depth):
    key = make_key(7, 600, depth)
    p = build_prompt(tok, 600, depth, key, haystack=Haystack(tok, seed=7))
    assert score_completion(_greedy(model, tok, p.text, 8), key)


# --- the training pieces --------------------------------------------------------------------------------------


def test_indexer_distillation_trains_only_the_indexers(tok):
    model = build_tiny_model(weights="random").float().train()
    distill = IndexerDistillation(model, n_queries=32)
    needles = [synthdata.needle_example(tok, i, 700) for i in range(2)]
    batch = collate(needles, tok.pad_token_id)
    distill.enabled, distill.min_length = True, int(batch["lengths"].min())
    losses = lm_losses(model, batch, "cpu")
    kl = distill.pop_loss()
    assert kl is not None and kl.item() > 0 and len(distill.indexers) == 2
    kl.backward()  # the KL alone: its gradient reaches the indexers and nothing else
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(".indexer." in n for n in grads)
    before = {n: p.grad.clone() for n, p in model.named_parameters() if ".indexer." in n}
    losses["answer"].backward()  # the LM loss never reaches them: they only feed a top-k
    assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters() if ".indexer." in n)
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_routed_expert_dropout_drops_only_in_training_and_spares_the_shared_experts():
    model = build_tiny_model(weights="random").float().train()
    dropout = RoutedExpertDropout(model, 0.5, seed=0, device="cpu", dense_p=0.5)
    assert dropout.layers == 4  # three MoE layers' routed experts, the dense layer's MLP
    ids = torch.randint(0, 2000, (2, 48))
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
        mlp = model.model.language_model.layers[1].mlp
        # the hook sits on the routed experts, never on the shared expert (a misplaced hook fails here)
        assert len(mlp.experts._forward_hooks) == 1 and not mlp.shared_experts._forward_hooks
        dense = model.model.language_model.layers[0].mlp
        assert len(dense._forward_hooks) == 1  # the dense first layer's MLP, at dense_p
        model.eval()  # inference: the full model, no masks
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
