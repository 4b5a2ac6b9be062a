"""DAG planning: order, reuse of unchanged stages, --force/--only/--from, and the live-server rule.

These tests plan against earlier runs laid out on disk (status.json files, as the runner writes them); the full
embedded DAG test (test_embedded_dag.py) executes the plan for real with papermill.
"""

import json
import shutil

import pytest

from m3lab.dag import STAGES, RunError, fingerprints, plan_run
from m3lab.params import load_params


@pytest.fixture
def params():
    return load_params("cpu-tiny")


def fake_run(root, params, run_id, statuses=None, results=None):
    """An earlier run in which every stage finished ok with the current fingerprints (unless overridden), each
    recording its upstream stages' outcomes as the runner does."""
    fps = fingerprints(params.model_dump(mode="json"))
    statuses = statuses or {}
    for name, st in STAGES.items():
        d = root / params.profile / run_id / name
        d.mkdir(parents=True)
        status = statuses.get(name, "ok")
        upstream = {dep: "ok" if statuses.get(dep, "ok") in ("ok", "reused") else statuses[dep] for dep in st.deps}
        (d / "status.json").write_text(json.dumps({"fingerprint": fps[name], "status": status,
                                                   "upstream": upstream}))
        if results and name in results:
            (d / "result.json").write_text(json.dumps(results[name]))
    return fps


def actions(plans):
    return {p.name: p.action for p in plans}


def test_stages_are_in_dag_order_with_their_notebooks():
    assert list(STAGES) == ["download", "quantize", "serve", "correctness", "needle", "benchmark", "plot"]
    for i, st in enumerate(STAGES.values()):
        assert all(list(STAGES).index(d) < i for d in st.deps)


def test_first_run_runs_everything(params, tmp_path):
    assert set(actions(plan_run(params, root=tmp_path)).values()) == {"run"}


def test_unchanged_rerun_reuses_everything_and_starts_no_server(params, tmp_path):
    fake_run(tmp_path, params, "20260101-000000-aaaa")
    plans = plan_run(params, root=tmp_path)
    assert set(actions(plans).values()) == {"reuse"}
    assert all(p.reuse_from.parent.name == "20260101-000000-aaaa" for p in plans)


def test_force_reruns_everything(params, tmp_path):
    fake_run(tmp_path, params, "20260101-000000-aaaa")
    assert set(actions(plan_run(params, force=True, root=tmp_path)).values()) == {"run"}


def test_changed_stage_params_rerun_that_stage_and_downstream_only(params, tmp_path):
    fake_run(tmp_path, params, "20260101-000000-aaaa")
    changed = params.model_copy(update={"needle": params.needle.model_copy(update={"depths": [50.0]})})
    a = actions(plan_run(changed, root=tmp_path))
    assert a["needle"] == "run" and a["plot"] == "run"
    assert a["serve"] == "run"  # needle needs a live server
    assert a["download"] == a["quantize"] == a["correctness"] == a["benchmark"] == "reuse"


def test_changed_quantize_recipe_invalidates_everything_after_it(params, tmp_path):
    fake_run(tmp_path, params, "20260101-000000-aaaa")
    changed = params.model_copy(update={"quantize": params.quantize.model_copy(update={"recipe": "none"})})
    a = actions(plan_run(changed, root=tmp_path))
    assert a["download"] == "reuse"
    assert all(a[s] == "run" for s in ("quantize", "serve", "correctness", "needle", "benchmark", "plot"))


def test_failed_stage_of_an_earlier_run_is_not_reused(params, tmp_path):
    fake_run(tmp_path, params, "20260101-000000-aaaa", {"benchmark": "failed"})
    a = actions(plan_run(params, root=tmp_path))
    assert a["benchmark"] == "run" and a["serve"] == "run" and a["correctness"] == "reuse"


def test_only_runs_one_stage_plus_the_server_it_needs(params, tmp_path):
    fake_run(tmp_path, params, "20260101-000000-aaaa")
    a = actions(plan_run(params, only="correctness", root=tmp_path))
    assert a == {"download": "reuse", "quantize": "reuse", "serve": "run", "correctness": "run",
                 "needle": "reuse", "benchmark": "reuse", "plot": "reuse"}


def test_only_without_earlier_upstream_output_is_a_clear_error(params, tmp_path):
    with pytest.raises(RunError, match=r"stage .download. has no earlier output .* `--from download`"):
        plan_run(params, only="needle", root=tmp_path)


def test_from_reruns_that_stage_and_everything_after(params, tmp_path):
    fake_run(tmp_path, params, "20260101-000000-aaaa")
    a = actions(plan_run(params, from_="needle", root=tmp_path))
    assert a["download"] == a["quantize"] == a["correctness"] == "reuse"
    assert a["needle"] == a["benchmark"] == a["plot"] == a["serve"] == "run"


def test_unknown_stage_names_the_flag(params, tmp_path):
    with pytest.raises(RunError, match=r"--only benchmarks: unknown stage"):
        plan_run(params, only="benchmarks", root=tmp_path)


def test_a_plot_made_after_a_failed_needle_is_not_reused_once_the_needle_runs(params, tmp_path):
    fake_run(tmp_path, params, "20260101-000000-aaaa", {"needle": "failed"})
    a = actions(plan_run(params, root=tmp_path))
    assert a["needle"] == "run" and a["plot"] == "run"
    assert a["correctness"] == a["benchmark"] == "reuse"


def test_an_older_run_with_ok_upstream_is_reused_over_a_newer_one_without(params, tmp_path):
    fake_run(tmp_path, params, "20260101-000000-aaaa")
    fake_run(tmp_path, params, "20260102-000000-bbbb", {"needle": "failed"})
    plans = {p.name: p for p in plan_run(params, root=tmp_path)}
    assert plans["plot"].action == "reuse" and plans["plot"].reuse_from.parent.name == "20260101-000000-aaaa"


def test_a_run_that_did_not_record_upstream_outcomes_is_not_reused(params, tmp_path):
    fake_run(tmp_path, params, "20260101-000000-aaaa")
    status = tmp_path / params.profile / "20260101-000000-aaaa" / "plot" / "status.json"
    s = json.loads(status.read_text())
    del s["upstream"]
    status.write_text(json.dumps(s))
    plans = {p.name: p for p in plan_run(params, root=tmp_path)}
    assert plans["plot"].action == "run" and "did not record its upstream outcomes" in plans["plot"].reason


def test_a_stage_whose_cached_artifact_was_deleted_or_changed_runs_again(params, tmp_path):
    art = tmp_path / "cache" / "model"
    art.mkdir(parents=True)
    (art / "w.safetensors").write_bytes(b"weights")
    from m3lab.digest import artifact

    fake_run(tmp_path, params, "20260101-000000-aaaa", results={"quantize": {"artifacts": {"model": artifact(art)}}})
    assert actions(plan_run(params, root=tmp_path))["quantize"] == "reuse"
    (art / "w.safetensors").write_bytes(b"weightz")  # one byte flipped
    plans = {p.name: p for p in plan_run(params, root=tmp_path)}
    assert plans["quantize"].action == "run" and "changed" in plans["quantize"].reason
    # Re-made from the same inputs and code, it lands in the same content-addressed folder with the same content,
    # so what downstream stages measured on it still holds.
    assert plans["correctness"].action == "reuse"
    shutil.rmtree(art)  # deleted behind m3lab's back
    plans = {p.name: p for p in plan_run(params, root=tmp_path)}
    assert plans["quantize"].action == "run" and "missing" in plans["quantize"].reason


def test_fingerprint_changes_with_notebook_code_but_not_markdown(params, tmp_path, monkeypatch):
    import m3lab.dag as dag

    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    for st in STAGES.values():
        (nb_dir / st.notebook).write_bytes((dag.NOTEBOOKS / st.notebook).read_bytes())
    monkeypatch.setattr(dag, "NOTEBOOKS", nb_dir)
    resolved = params.model_dump(mode="json")
    before = fingerprints(resolved)
    nb_path = nb_dir / STAGES["needle"].notebook
    nb = json.loads(nb_path.read_text())
    nb["cells"][0]["source"] = ["# a new title\n"]  # markdown
    nb_path.write_text(json.dumps(nb))
    assert fingerprints(resolved) == before
    nb["cells"][-1]["source"] = ["result['accuracy']\n"]  # code
    nb_path.write_text(json.dumps(nb))
    after = fingerprints(resolved)
    assert after["needle"] != before["needle"] and after["plot"] != before["plot"]
    assert after["benchmark"] == before["benchmark"]


# --------------------------------------------------------------------------------------------------------------
# Fingerprints from the import closure: edit a copy of the package, never the package itself.


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    import m3lab.dag as dag
    from m3lab import fingerprint

    pkg = tmp_path / "m3lab"
    shutil.copytree(fingerprint.PACKAGE_DIR, pkg, copy_function=shutil.copy,
                    ignore=shutil.ignore_patterns("__pycache__", "model.safetensors"))
    shutil.copy(fingerprint.PACKAGE_DIR / "assets" / "tiny-m3" / "model.safetensors",
                pkg / "assets" / "tiny-m3" / "model.safetensors")
    nbs = tmp_path / "notebooks"
    shutil.copytree(dag.NOTEBOOKS, nbs)
    monkeypatch.setattr(fingerprint, "PACKAGE_DIR", pkg)
    monkeypatch.setattr(dag, "NOTEBOOKS", nbs)
    return pkg


def _downstream(stage: str) -> set[str]:
    out = {stage}
    for name, st in STAGES.items():
        if any(d in out for d in st.deps):
            out.add(name)
    return out


def test_editing_any_file_in_a_stages_import_closure_reruns_it_and_downstream(params, package_copy):
    import m3lab.dag as dag
    from m3lab import fingerprint

    resolved = params.model_dump(mode="json")
    users: dict = {}  # file → the stages whose closure holds it
    for name, st in STAGES.items():
        mods = dag.stage_modules(st, resolved)
        for f in [fingerprint.module_path(m) for m in mods] + fingerprint.data_files(mods):
            users.setdefault(f, set()).add(name)
    before = fingerprints(resolved)
    for f, stages in sorted(users.items()):
        original = f.read_bytes()
        f.write_bytes(original + b"\n# edited\n")
        after = fingerprints(resolved)
        f.write_bytes(original)
        changed = {n for n in STAGES if after[n] != before[n]}
        for name in stages:
            assert _downstream(name) <= changed, f"editing {f.relative_to(package_copy)} left {name} unchanged"
    assert len(users) > 20  # the closure is the real one, not a hand-kept list


def test_editing_a_file_outside_a_stages_closure_leaves_it_reusable(params, package_copy, tmp_path):
    import m3lab.dag as dag
    from m3lab import fingerprint

    resolved = params.model_dump(mode="json")
    closures = {n: set(dag.stage_modules(st, resolved)) for n, st in STAGES.items()}
    # wheelhouse is in no stage's closure (the CLI's); memplan only in plan's; lighteval only where an eval names
    # that runner.
    for module in ("m3lab.wheelhouse", "m3lab.memplan", "m3lab.evals.lighteval", "m3lab.engines.vllm"):
        f = fingerprint.module_path(module)
        before = fingerprints(resolved)
        f.write_bytes(f.read_bytes() + b"\n# edited\n")
        after = fingerprints(resolved)
        for n in STAGES:
            if module not in closures[n]:
                assert after[n] == before[n], f"editing {module} changed {n}, which never imports it"
    # The tiny model's card and training records sit beside its weights but no run reads them.
    before = fingerprints(resolved)
    card = package_copy / "assets" / "tiny-m3" / "MODEL_CARD.md"
    card.write_text(card.read_text() + "\nedited\n")
    assert fingerprints(resolved) == before, "editing the tiny model's card changed a stage's fingerprint"
    fake_run(tmp_path / "runs", params, "20260101-000000-aaaa")
    assert set(actions(plan_run(params, root=tmp_path / "runs")).values()) == {"reuse"}


def test_the_engine_a_profile_picks_is_in_serves_closure(params):
    import m3lab.dag as dag

    resolved = params.model_dump(mode="json")
    mods = dag.stage_modules(STAGES["serve"], resolved)
    assert "m3lab.engines.transformers" in mods and "m3lab.engines.vllm" not in mods
    resolved["serve"]["engine"] = "vllm"
    assert "m3lab.engines.vllm" in dag.stage_modules(STAGES["serve"], resolved)


def test_a_plan_only_profile_is_refused_by_run_before_anything_is_written(tmp_path):
    import yaml

    from m3lab.dag import run
    from m3lab.params import PARAMS_DIR

    p = tmp_path / "plan-only.yaml"
    p.write_text(yaml.safe_dump({"extends": str(PARAMS_DIR / "cpu-tiny.yaml"), "profile": "plan-only",
                                 "plan_only": True}))
    with pytest.raises(RunError, match=r"profile plan-only is plan-only .* `m3lab plan plan-only`"):
        run(p, root=tmp_path / "results")
    assert not (tmp_path / "results").exists()
