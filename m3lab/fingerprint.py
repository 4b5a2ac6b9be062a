"""What decides a stage's output, found from the code itself: the import closure of m3lab modules, and data.

A stage's notebook imports some m3lab modules; they import others. `closure()` follows every `import m3lab.x` /
`from m3lab.x import y` / `from m3lab import x` statement (read with `ast`, wherever it sits: module level or
inside a function) until no new m3lab module turns up. Nothing is listed by hand, so an edit to any module a
stage can reach changes that stage's fingerprint, and an edit elsewhere does not.

Data files are covered the same way, by the module that reads them: a module declares the package files it
reads in a module-level `DATA = ("tasks/*", …)` (globs relative to the package folder); every package file
that is not Python must be claimed by some module's DATA (a test checks), so new data cannot slip past.
"""

from __future__ import annotations

import ast
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Iterable

__all__ = ["PACKAGE_DIR", "module_path", "imports_of", "closure", "notebook_code", "notebook_imports", "data_files",
           "digest_files", "code_digest"]

PACKAGE = "m3lab"
PACKAGE_DIR = Path(__file__).resolve().parent


def module_path(module: str) -> Path | None:
    """m3lab.quant.core → …/m3lab/quant/core.py (or the package's __init__.py); None if not an m3lab module."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _imported_names(tree: ast.AST, current: str) -> set[str]:
    """The m3lab modules a parsed module (named `current`) imports, anywhere in its body."""
    found: set[str] = set()
    path = module_path(current)
    pkg = current if path is not None and path.name == "__init__.py" else current.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}  # `from m3lab import serve` imports a module
    out = set()
    for name in found:
        if name.split(".")[0] != PACKAGE:
            continue
        # `import m3lab.quant.core` also runs m3lab/__init__ and m3lab/quant/__init__
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            if module_path(".".join(parts[:i])):
                out.add(".".join(parts[:i]))
    return out


@lru_cache(maxsize=None)
def _imports_cached(module: str, path_str: str, mtime_ns: int, size: int) -> frozenset[str]:
    path = Path(path_str)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return frozenset(_imported_names(tree, module) - {module})


def imports_of(module: str) -> frozenset[str]:
    path = module_path(module)
    if path is None:
        raise ValueError(f"{module}: not a module of the m3lab package")
    st = path.stat()
    return _imports_cached(module, str(path), st.st_mtime_ns, st.st_size)


def closure(roots: Iterable[str]) -> list[str]:
    """Every m3lab module reachable from `roots` by imports, sorted."""
    seen: set[str] = set()
    todo = [r for r in roots if module_path(r)]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += sorted(imports_of(m) - seen)
    return sorted(seen)


def notebook_code(notebook: Path) -> str:
    """A notebook's code cells: editing markdown or clearing outputs changes nothing that runs."""
    nb = json.loads(Path(notebook).read_text(encoding="utf-8"))
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


def notebook_imports(notebook: Path) -> set[str]:
    """The m3lab modules a notebook's code cells import."""
    lines = [ln for ln in notebook_code(notebook).splitlines()
             if not ln.lstrip().startswith(("%", "!"))]  # IPython magics
    return _imported_names(ast.parse("\n".join(lines)), "__notebook__")


def _declared_data(module: str) -> tuple[str, ...]:
    """A module's `DATA = (...)` tuple of globs, read without importing it."""
    tree = ast.parse(module_path(module).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "DATA" for t in targets):
                return tuple(ast.literal_eval(node.value))
    return ()


def data_files(modules: Iterable[str]) -> list[Path]:
    """The package data files the given modules declare they read (their `DATA` globs), sorted."""
    files: set[Path] = set()
    for m in modules:
        for pattern in _declared_data(m):
            files |= {f for f in PACKAGE_DIR.glob(pattern) if f.is_file() and "__pycache__" not in f.parts}
    return sorted(files)


def digest_files(files: Iterable[Path], h: "hashlib._Hash | None" = None) -> str:
    """sha256 over (path relative to the package, bytes) of each file, in order."""
    h = h or hashlib.sha256()
    for f in files:
        h.update(f.resolve().relative_to(PACKAGE_DIR).as_posix().encode() + b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def code_digest(roots: Iterable[str]) -> str:
    """One hash over the source of every module reachable from `roots` and the data they declare."""
    mods = closure(roots)
    return digest_files([module_path(m) for m in mods] + data_files(mods))
