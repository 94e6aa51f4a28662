"""The figure pipeline: notebooks declare their outputs, docs/notebooks.md lists them, the
runner checks them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from workbench.lab.cli import main
from workbench.lab.figures import check_figures, discover, select

REPO = Path(__file__).resolve().parents[1]


def test_every_notebook_declares_figures_and_has_a_parameters_cell():
    specs = discover()
    assert [s.name[:2] for s in specs][:3] == ["00", "01", "02"]
    for spec in specs:
        nb = json.loads(spec.path.read_text())
        tags = [c.get("metadata", {}).get("tags", []) for c in nb["cells"]]
        assert any("parameters" in t for t in tags), f"{spec.name} has no parameters cell"
        assert spec.figures, f"{spec.name} declares no figures"
        prefix = "results_" if spec.name.startswith("results_") else spec.name[:3]
        for fig in spec.figures:
            assert re.fullmatch(r"(\d\d|results)_[a-z0-9_]+\.(png|svg)", fig), fig
            assert fig.startswith(prefix), f"{fig} should be prefixed {prefix}"


def test_the_notebooks_page_lists_every_notebook_and_declared_figure():
    page = (REPO / "docs" / "notebooks.md").read_text()
    for spec in discover():
        assert f"notebooks/{spec.path.name}" in page, f"docs/notebooks.md misses {spec.path.name}"
        for fig in spec.figures:
            assert f"figures/{fig}" in page, f"docs/notebooks.md does not list figures/{fig}"


def test_committed_figures_exist(monkeypatch):
    monkeypatch.setenv("WORKBENCH_FIGURES_DIR", str(REPO / "figures"))
    assert check_figures(discover()) == []


def test_committed_notebooks_carry_outputs():
    for spec in discover():
        nb = json.loads(spec.path.read_text())
        assert any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), spec.name


def test_cli_list_and_check(capsys, monkeypatch):
    monkeypatch.setenv("WORKBENCH_FIGURES_DIR", str(REPO / "figures"))
    assert main(["figures", "--list"]) == 0
    out = capsys.readouterr().out
    assert "01_sparsity_patterns" in out and "figures/01_" in out
    assert main(["figures", "--check", "--only", "02"]) == 0


def test_cli_reports_missing_figures(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORKBENCH_FIGURES_DIR", str(tmp_path))
    assert main(["figures", "--check"]) == 1
    assert "not written" in capsys.readouterr().err


def test_unknown_notebook_and_profile_are_reported():
    with pytest.raises(ValueError, match="available"):
        select(discover(), ["99"])
    from workbench.lab.figures import _parameters

    with pytest.raises(ValueError, match="no profile"):
        _parameters(discover()[0], "nonexistent", {})
