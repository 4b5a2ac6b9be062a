"""m3lab.evals: real lm-eval (0.4.13) subprocesses against a real `transformers serve` of the tiny model.

The tiny model has random weights here, so scores are ~0: these tests check the plumbing (command lines, seeds,
results parsing, errors), not the model. Each lm_eval process spends ~10 s of a core indexing lm-eval's own
task YAMLs, so the file runs only three to completion, two at a time (the failure and timeout cases stop early).
"""

from __future__ import annotations

import json
import shlex
import statistics
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import pytest

from conftest import CPU_SERVE
from m3lab import serve
from m3lab.evals.harness import TASKS_DIR, EvalError, build_command, check_eval, local_tasks, run_eval
from m3lab.procs import ServerDied

# Card 001 (amd/MiniMax-M3-MXFP4), "Evaluating model in a new terminal", exactly as printed there.
CARD_001 = """lm_eval \\
  --model local-chat-completions \\
  --model_args "model=/mnt/amd/MiniMax-M3-MXFP4,base_url=http://127.0.0.1:8000/v1/chat/completions,num_concurrent=32,max_gen_toks=16384" \\
  --tasks gsm8k \\
  --num_fewshot 5 \\
  --batch_size 1 \\
  --apply_chat_template \\
  --fewshot_as_multiturn"""

# The same eval as m3lab params hold it: the card's flags, with the server's address as placeholders.
CARD_001_EVAL = {
    "id": "gsm8k",
    "runner": "lm_eval",
    "args": {
        "--model": "local-chat-completions",
        "--model_args": "model={model},base_url={base_url}/chat/completions,num_concurrent=32,max_gen_toks=16384",
        "--tasks": "gsm8k",
        "--num_fewshot": 5,
        "--batch_size": 1,
        "--apply_chat_template": True,
        "--fewshot_as_multiturn": True,
    },
    "metric": "exact_match,flexible-extract",
}

# Four GSM8K test items (openai/gsm8k, MIT), short ones: the task's data in its jsonl shape.
GSM8K_ITEMS = [
    {"question": "A robe takes 2 bolts of blue fiber and half that much white fiber.  How many bolts in total does "
                 "it take?",
     "answer": "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total amount of fabric is 2+1=<<2+1=3>>3 bolts "
               "of fabric\n#### 3"},
    {"question": "James decides to run 3 sprints 3 times a week.  He runs 60 meters each sprint.  How many total "
                 "meters does he run a week?",
     "answer": "He sprints 3*3=<<3*3=9>>9 times\nSo he runs 9*60=<<9*60=540>>540 meters\n#### 540"},
    {"question": "A candle melts by 2 centimeters every hour that it burns. How many centimeters shorter will a "
                 "candle be after burning from 1:00 PM to 5:00 PM?",
     "answer": "The candle burns for 5 - 1 = <<5-1=4>>4 hours.\nThus, the candle will be 2 * 4 = <<2*4=8>>8 "
               "centimeters shorter.\n#### 8"},
    {"question": "John takes care of 10 dogs.  Each dog takes .5 hours a day to walk and take care of their "
                 "business.  How many hours a week does he spend taking care of dogs?",
     "answer": "He spends 10*.5=<<10*.5=5>>5 hours per day\nThat means he spends 5*7=<<5*7=35>>35 hours per week"
               "\n#### 35"},
]


@pytest.fixture(scope="module")
def arith_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("arith") / "arith_eval.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in GSM8K_ITEMS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def server(tiny_text_checkpoint, tmp_path_factory):
    """One tiny server for the module (lm_eval runs are the slow part; a server per test would add ~6 s each)."""
    run_dir = tmp_path_factory.mktemp("evals-run")
    rec = serve.start_server("transformers", str(tiny_text_checkpoint), dict(CPU_SERVE), run_dir)
    yield rec
    serve.stop_server({"pid": rec.pid}, grace_s=5)


def arith_eval(model: str, data_file: Path, **extra) -> dict:
    """tiny_arith through `model`, 3 of the 4 items, 16 new tokens (the random model never stops early)."""
    model_args = {"local-completions": "model={model},base_url={base_url}/completions,tokenizer_backend=None,"
                                       "num_concurrent=2,max_gen_toks=16",
                  "local-chat-completions": "model={model},base_url={base_url}/chat/completions,"
                                            "num_concurrent=2,max_gen_toks=16"}[model]
    return {"id": "tiny_arith", "runner": "lm_eval", "metric": "exact_match,flexible-extract", "limit": 3,
            "args": {"--model": model, "--model_args": model_args, "--tasks": "tiny_arith",
                     "--metadata": {"data_file": str(data_file)}, **extra.pop("args", {})},
            "timeout_s": 300, **extra}


# -----------------------------------------------------------------------------
# command lines (no server)


def test_card_001_command_verbatim(tmp_path):
    server = {"model": "/mnt/amd/MiniMax-M3-MXFP4", "base_url": "http://127.0.0.1:8000/v1",
              "model_dir": "/mnt/amd/MiniMax-M3-MXFP4"}
    card_argv = shlex.split(CARD_001.replace("\\\n", " "))
    out = tmp_path / "out"
    # No seeds: the card gives none, so lm-eval's default seeds, exactly as the card ran. m3lab adds only
    # --log_samples (one record per item, for paired recoveries) and the output folder.
    assert build_command(CARD_001_EVAL, server, out, None) == card_argv + ["--log_samples", "--output_path", str(out)]
    assert build_command(CARD_001_EVAL, server, out, 42) == card_argv + ["--seed", "42", "--log_samples",
                                                                         "--output_path", str(out)]


def test_local_task_gets_include_path_and_json_keeps_its_braces(tmp_path):
    assert local_tasks() == {"tiny_arith": TASKS_DIR / "tiny_arith.yaml"}
    ev = arith_eval("local-completions", tmp_path / "a.jsonl", args={"--log_samples": True, "--write_out": False,
                                                                      "--model_args": "pretrained={tokenizer}"})
    server = {"model": "m3", "base_url": "http://h:1/v1/", "model_dir": "/ckpt"}
    argv = build_command(ev, server, tmp_path, 7)
    assert argv[argv.index("--model_args") + 1] == "pretrained=/ckpt"
    assert json.loads(argv[argv.index("--metadata") + 1]) == {"data_file": str(tmp_path / "a.jsonl")}
    assert argv[argv.index("--include_path") + 1] == str(TASKS_DIR)
    assert "--log_samples" in argv and "--write_out" not in argv  # true → bare flag, false → absent
    assert argv[-6:] == ["--limit", "3", "--seed", "7", "--output_path", str(tmp_path)]


def test_lighteval_command_fills_its_two_positionals_and_the_seed(tmp_path):
    ev = {"id": "aime25", "runner": "lighteval", "metric": "math_pass@1:1_samples", "seeds": [42],
          "args": {"--model_args": "model_name=openai/{model},base_url={base_url},generation_parameters={seed:{seed}}",
                   "--tasks": "lighteval|aime25|0"}}
    argv = build_command(ev, {"model": "m3", "base_url": "http://h:1/v1"}, tmp_path, 42)
    assert argv[:5] == ["lighteval", "endpoint", "litellm",
                        "model_name=openai/m3,base_url=http://h:1/v1,generation_parameters={seed:42}",
                        "lighteval|aime25|0"]
    assert argv[-2:] == ["--output-dir", str(tmp_path)]


def test_unknown_runner_and_reserved_flags_are_named():
    with pytest.raises(EvalError, match=r"evals\[ifeval\]\.runner: 'helm' is not a command-line harness"):
        check_eval({**CARD_001_EVAL, "id": "ifeval", "runner": "helm"})
    with pytest.raises(EvalError, match=r"--seed.*set by m3lab"):
        check_eval({**CARD_001_EVAL, "args": {**CARD_001_EVAL["args"], "--seed": 1}})
    with pytest.raises(EvalError, match=r"seeds"):
        check_eval({**CARD_001_EVAL, "seeds": [42, 42]})


# -----------------------------------------------------------------------------
# real lm_eval against the real server


@pytest.fixture(scope="module")
def both_runs(server, arith_jsonl, tmp_path_factory) -> dict[str, Future]:
    """The completions eval (two seeds) and the chat eval, run side by side: each lm_eval process spends ~10 s
    of one core indexing lm-eval's task YAMLs, so on 2 cores this halves the file's time. Futures, so that
    each test re-raises its own eval's error."""
    out = tmp_path_factory.mktemp("evals")
    completions = arith_eval("local-completions", arith_jsonl, seeds=[42, 1234])
    chat = arith_eval("local-chat-completions", arith_jsonl, args={"--apply_chat_template": True,
                                                                   "--log_samples": True})
    with ThreadPoolExecutor(2) as pool:
        futures = {"completions": pool.submit(run_eval, completions, server, out / "completions"),
                   "chat": pool.submit(run_eval, chat, server, out / "chat")}
        wait(futures.values())
    futures["out"] = out
    return futures


def test_completions_one_run_per_seed_and_the_mean(both_runs, server):
    res, out = both_runs["completions"].result(), both_runs["out"] / "completions"
    assert [r.seed for r in res.runs] == [42, 1234]
    for run in res.runs:
        assert f"--seed {run.seed}" in run.command and "tokenizer_backend=None" in run.command
        assert 0.0 <= run.score <= 1.0 and run.samples == 3  # --limit 3 of the 4 items
        assert Path(run.results_path).is_relative_to(out / f"seed{run.seed}")
        assert run.command.startswith("lm_eval --model local-completions") and Path(run.log_path).is_file()
    assert res.score == pytest.approx(statistics.fmean(r.score for r in res.runs))
    assert res.samples == 3 and res.task == "tiny_arith" and res.runner_version == "0.4.13"
    assert res.seed_std is not None and 0.0 <= res.score <= 1.0
    assert json.loads((out / "eval.json").read_text())["score"] == res.score
    # the server really answered lm-eval's requests
    assert Path(server.log_path).read_text().count('"POST /v1/completions HTTP/1.1" 200') >= 6


def test_chat_completions_with_chat_template(both_runs, server):
    res = both_runs["chat"].result()
    (run,) = res.runs
    assert run.seed is None and "--seed" not in run.command and "--apply_chat_template" in run.command
    assert 0.0 <= res.score <= 1.0 and res.samples == 3 and res.stderr is not None
    # lm-eval sent messages (not a flat prompt): the logged request is a chat message list
    (samples,) = Path(run.results_path).parent.glob("samples_tiny_arith_*.jsonl")
    request = json.loads(samples.read_text().splitlines()[0])["arguments"]["gen_args_0"]["arg_0"]
    messages = json.loads(request[0] if isinstance(request, list) else request)
    assert messages[-1]["role"] == "user" and messages[-1]["content"].startswith("Question: ")
    assert '"POST /v1/chat/completions HTTP/1.1" 200' in Path(server.log_path).read_text()


def test_lm_eval_failure_raises_with_log_tail(server, arith_jsonl, tmp_path):
    # A real user error lm-eval itself rejects: multi-turn few-shot needs the chat template.
    ev = arith_eval("local-completions", arith_jsonl, args={"--fewshot_as_multiturn": True})
    with pytest.raises(EvalError, match=r"(?s)exited with status 1.*lm_eval --model.*apply_chat_template"):
        run_eval(ev, server, tmp_path / "ev")


def test_missing_data_file_fails_before_lm_eval_starts(server, tmp_path):
    with pytest.raises(EvalError, match=r"tiny_arith: data file .*nope\.jsonl not found"):
        run_eval(arith_eval("local-completions", tmp_path / "nope.jsonl"), server, tmp_path / "ev")
    assert not (tmp_path / "ev").exists()


def test_dead_server_is_reported_as_such(start_tiny_server, arith_jsonl, tmp_path):
    rec = start_tiny_server()
    serve.stop_server({"pid": rec.pid}, grace_s=5)
    with pytest.raises(ServerDied, match=r"died"):
        run_eval(arith_eval("local-completions", arith_jsonl), rec, tmp_path / "ev")


def test_timeout_stops_lm_eval(server, arith_jsonl, tmp_path):
    ev = arith_eval("local-completions", arith_jsonl, timeout_s=2)
    with pytest.raises(EvalError, match=r"did not finish in 2s"):
        run_eval(ev, server, tmp_path / "ev")
    # no lm_eval left behind: none of the live processes was started with this eval's output folder
    leftovers = [p for p in Path("/proc").glob("[0-9]*/cmdline")
                 if str(tmp_path / "ev").encode() in _read(p)]
    assert leftovers == []


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # the process exited while we looked
        return b""


def test_tiny_arith_data_hook(arith_jsonl):
    from m3lab.tasks import tiny_arith

    ds = tiny_arith.load(data_file=str(arith_jsonl), model="m3", version=1.0)  # lm-eval passes metadata too
    assert ds["test"].num_rows == 4 and ds["fewshot"].num_rows == len(tiny_arith.FEWSHOT)
    assert ds["test"][0]["answer"].endswith("#### 3")
    if tiny_arith.DEFAULT_DATA_FILE.is_file():  # the trained model's held-out set, once it is written
        assert all("#### " in item["answer"] for item in tiny_arith.read_items(tiny_arith.DEFAULT_DATA_FILE))
