"""Imports flow one way: no cycles; nothing in the attention code imports the lab (benchmarks,
records, figures runner, command line); importing workbench loads neither the lab, matplotlib
nor the libraries of its integrations (transformers)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import workbench

PACKAGE = Path(workbench.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its ``__init__``)."""
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        mods[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    return mods


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The workbench modules ``path`` imports (``from . import x`` imports the module ``x``)."""
    here = list(path.relative_to(PACKAGE.parent).parts[:-1])  # where relative imports start
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            mod = ".".join([*base, node.module] if node.module else base)
            subs = {f"{mod}.{a.name}" for a in node.names} & modules.keys()
            names.update(subs if subs else {mod})
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    found = set()
    for name in names:  # the module itself, or the package a name comes from
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name.startswith("workbench"):
            found.add(name)
    return found


def test_no_attention_module_imports_the_lab():
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "lab" or rel.name == "__main__.py":
            continue
        bad = {n for n in _imports(path, _modules()) if n.startswith("workbench.lab")}
        assert not bad, f"workbench/{rel} imports {sorted(bad)}"


def test_importing_workbench_loads_neither_the_lab_nor_matplotlib_nor_transformers():
    code = ("import sys, workbench; print(sorted(m for m in sys.modules "
            "if m.startswith(('workbench.lab', 'matplotlib', 'seaborn', 'transformers', "
            "'workbench.integrations.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", out


def test_imports_flow_one_way():
    """No module imports, directly or through others, a module that imports it back."""
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [name, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
