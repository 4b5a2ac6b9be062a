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


def test_every_package_data_file_is_declared_by_a_module():
    declared = set(fingerprint.data_files(_all_modules()))
    data = {p for p in PKG.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")
            and "__pycache__" not in p.parts}
    assert data - declared == set(), "package data no module declares in DATA (m3lab.fingerprint)"


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
