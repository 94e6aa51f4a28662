"""The attention code stands alone: nothing in it imports the lab (benchmarks, records, figures
runner, command line), and importing workbench loads neither the lab nor matplotlib."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import workbench

PACKAGE = Path(workbench.__file__).resolve().parent


def _imports(path: Path) -> set[str]:
    """Absolute names of the workbench modules ``path`` imports."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    here = list(rel.parts[:-1])  # the package that relative imports start from
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            mod = ".".join([*base, node.module] if node.module else base)
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("workbench")}


def test_no_attention_module_imports_the_lab():
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "lab" or rel.name == "__main__.py":
            continue
        bad = {n for n in _imports(path) if n.startswith("workbench.lab")}
        assert not bad, f"workbench/{rel} imports {sorted(bad)}"


def test_importing_workbench_loads_neither_the_lab_nor_matplotlib():
    code = ("import sys, workbench; print(sorted(m for m in sys.modules "
            "if m.startswith(('workbench.lab', 'matplotlib', 'seaborn'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", out
