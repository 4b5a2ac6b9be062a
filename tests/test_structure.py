"""The package's shape: imports flow one way (no circles, counting imports inside functions), every package
data file is declared by the module that reads it, and every registry entry's module exists and has the
interface its kind promises."""

from __future__ import annotations

import ast

import pytest

from m3lab import fingerprint
from m3lab.registry import ENGINES, EVAL_RUNNERS, FAULTS, RECIPES, STAGES, Registry, RegistryError, Entry

PKG = fingerprint.PACKAGE_DIR


def _all_modules() -> list[str]:
    mods = []
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods.append(".".join(parts))
    return mods


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_circles_counting_imports_inside_functions():
    # A package's __init__ is imported on the way to its submodules; that edge is not a circle by itself.
    graph = {m: {x for x in fingerprint.imports_of(m) if not m.startswith(x + ".")} for m in _all_modules()}
    assert _cycle(graph) is None, f"import circle: {' → '.join(_cycle(graph))}"


def test_cycle_finder_fires_on_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def _tiny_m3_records() -> set:
    """The package files no run reads, as tools/tiny_m3/train.py lists them (RECORDS, read without importing it)."""
    tree = ast.parse((PKG.parent / "tools" / "tiny_m3" / "train.py").read_text(encoding="utf-8"))
    (records,) = [ast.literal_eval(n.value) for n in tree.body
                  if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "RECORDS" for t in n.targets)]
    return {f for pattern in records for f in PKG.glob(pattern) if f.is_file()}


def test_every_package_data_file_is_declared_by_a_module():
    declared = set(fingerprint.data_files(_all_modules()))
    records = _tiny_m3_records()
    data = {p for p in PKG.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")
            and "__pycache__" not in p.parts}
    assert data - declared - records == set(), ("package data no module declares in DATA (m3lab.fingerprint) and "
                                                "tools/tiny_m3/train.py does not list in RECORDS")
    assert not records & declared, "a file a run reads (DATA) is not a record (RECORDS): list it in one place"
    assert {p.name for p in records} >= {"MODEL_CARD.md", "training_curve.png", "train_log.jsonl"}


def test_the_runtime_package_does_not_import_the_training_code():
    """Training the tiny model (tools/tiny_m3/) is not part of a run: no m3lab module imports it."""
    for m in _all_modules():
        tree = ast.parse(fingerprint.module_path(m).read_text(encoding="utf-8"))
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {x for x in names if x == "tools" or x.startswith("tools.")}, f"{m} imports the training code"
    assert not (PKG / "train.py").exists() and not (PKG / "synthdata.py").exists()


def test_closure_follows_imports_anywhere_and_only_m3lab(tmp_path):
    src = "import os\nfrom m3lab.registry import STAGES\ndef f():\n    from m3lab import digest\n"
    names = fingerprint._imported_names(ast.parse(src), "m3lab.x")
    assert names == {"m3lab", "m3lab.registry", "m3lab.digest"}


@pytest.mark.parametrize("registry, attrs", [
    (ENGINES, ("PACKAGE", "MODULE", "command", "checkpoint_flavor", "request_model", "startup_facts",
               "force_output_len")),
    (RECIPES, ("quantize", "plan_lines")),
    (EVAL_RUNNERS, ("run", "plan_lines")),
    (FAULTS, ("apply",)),
])
def test_registry_entries_have_their_kinds_interface(registry, attrs):
    for entry in registry:
        mod = registry.load(entry.name)
        missing = [a for a in attrs if not hasattr(mod, a)]
        assert not missing, f"{registry.kind} {entry.name} ({entry.module}) lacks {missing}"


def test_stage_modules_have_run_stage():
    import importlib

    for st in STAGES.values():
        assert hasattr(importlib.import_module(st.module), "run_stage"), st.module


def test_an_entry_whose_module_is_missing_fails_at_import_naming_it():
    with pytest.raises(RegistryError, match=r"engine 'sglang': its module m3lab\.engines\.sglang does not exist"):
        Registry("engine", "serve.engine", [Entry("sglang", "m3lab.engines.sglang", "not written")])


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(RegistryError, match=r"serve\.engine: unknown engine 'sglang'; registered: transformers, "
                                            r"vllm, mlx"):
        ENGINES.get("sglang")


def _layout_rows() -> dict[str, str]:
    """README's Layout table: path cell -> what cell."""
    import re

    readme = (PKG.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Layout"):readme.index("\n## ", readme.index("## Layout") + 1)]
    rows = [line.split(" | ", 1) for line in section.splitlines() if line.startswith("| `")]
    return {re.sub(r"\s*\|\s*$", "", p.strip("| ")): re.sub(r"\s*\|\s*$", "", w) for p, w in rows}


def test_readme_layout_table_names_every_module_and_folder_of_the_package():
    import re

    rows = _layout_rows()
    text = " ".join(f"{p} {w}" for p, w in rows.items())
    named = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", " ".join(re.findall(r"`([^`]+)`", text))))
    modules = {p.stem for p in PKG.glob("*.py")} - {"__init__", "__main__"}
    for sub in sorted(p for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__"):
        assert f"`m3lab/{sub.name}/" in text, f"README's Layout table does not name the folder m3lab/{sub.name}/"
        modules |= {p.stem for p in sub.glob("*.py")} - {"__init__", "__main__"}
    assert modules - named == set(), "modules the README's Layout table does not name"
    rest = rows["`m3lab/` (the rest)"]
    listed = set(re.findall(r"`([a-z_]+)`", rest))
    assert listed <= {p.stem for p in PKG.glob("*.py")}, f"the Layout table lists modules that do not exist: " \
                                                       f"{listed - {p.stem for p in PKG.glob('*.py')}}"
    assert "`tiny_m3/`" in rows["`tools/`"]
