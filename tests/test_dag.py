"""DAG planning: order, reuse of unchanged stages, --force/--only/--from, and the live-server rule.

These tests plan against earlier runs laid out on disk (status.json files, as the runner writes them); the full
embedded DAG test (test_embedded_dag.py) executes the plan for real with papermill.
"""

import json

import pytest

from m3lab.dag import STAGES, RunError, fingerprints, plan_run
from m3lab.params import load_params


@pytest.fixture
def params():
    return load_params("cpu-tiny")


def fake_run(root, params, run_id, statuses=None):
    """An earlier run in which every stage finished ok with the current fingerprints (unless overridden)."""
    fps = fingerprints(params.model_dump(mode="json"))
    for name in STAGES:
        d = root / params.profile / run_id / name
        d.mkdir(parents=True)
        status = (statuses or {}).get(name, "ok")
        (d / "status.json").write_text(json.dumps({"fingerprint": fps[name], "status": status}))
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
