"""The project folder: found from the working directory, ``$WORKBENCH_ROOT`` or ``--root``, never
the package's own folder; outside a project, or with nothing to run, the command line stops with
one line and a non-zero status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workbench import project
from workbench.lab.cli import main
from workbench.lab.figures import select
from workbench.lab.records import write_csv
from workbench.project import ROOT_ENV, ProjectNotFoundError, find_root

BENCH = ["bench", "--study", "project_test", "--seq-lens", "64", "--families", "causal",
         "--variants", "sdpa_dense", "--heads", "1", "--head-dim", "16", "--reps", "1",
         "--warmup", "0", "--device", "cpu", "--dtype", "fp32"]


@pytest.fixture(autouse=True)
def _no_project_env(monkeypatch):
    for name in (ROOT_ENV, "WORKBENCH_FIGURES_DIR", "WORKBENCH_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)


def make_project(path: Path, figures: tuple[str, ...] = ()) -> Path:
    """A project at ``path``; with ``figures``, one notebook ``00_tiny`` that declares them."""
    (path / "notebooks").mkdir(parents=True)
    (path / "pyproject.toml").write_text("[project]\nname = 'mine'\n")
    if figures:
        nb = {"cells": [], "metadata": {"workbench": {"figures": list(figures)}},
              "nbformat": 4, "nbformat_minor": 5}
        (path / "notebooks" / "00_tiny.ipynb").write_text(json.dumps(nb))
    return path


def test_the_root_is_the_nearest_project_at_or_above_the_working_directory(tmp_path,
                                                                          monkeypatch):
    outer = make_project(tmp_path / "outer")
    inner = make_project(outer / "inner")
    (inner / "sub" / "pyproject.toml").mkdir(parents=True)  # a folder so named is not a project
    (outer / "half").mkdir()
    (outer / "half" / "pyproject.toml").write_text("")  # no notebooks/: not a project
    for cwd, root in [(inner / "sub" / "pyproject.toml", inner), (inner / "notebooks", inner),
                      (outer / "half", outer), (outer, outer)]:
        monkeypatch.chdir(cwd)
        assert find_root() == root.resolve()
        assert project.figures_dir() == root.resolve() / "figures"
        assert project.data_dir() == root.resolve() / "data"
        assert project.notebooks_dir() == root.resolve() / "notebooks"


def test_the_env_var_beats_the_working_directory_and_an_explicit_root_beats_both(tmp_path,
                                                                                  monkeypatch):
    here, there, named = (make_project(tmp_path / n) for n in ("here", "there", "named"))
    monkeypatch.chdir(here)
    monkeypatch.setenv(ROOT_ENV, str(there))
    assert find_root() == there.resolve()
    assert find_root(named) == named.resolve()
    assert project.figures_dir(named) == named.resolve() / "figures"
    monkeypatch.setenv("WORKBENCH_FIGURES_DIR", str(tmp_path / "figs"))
    monkeypatch.setenv("WORKBENCH_DATA_DIR", str(tmp_path / "rows"))
    assert project.figures_dir(named) == tmp_path / "figs"
    assert project.data_dir() == tmp_path / "rows"


def test_outside_a_project_every_way_of_naming_one_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ProjectNotFoundError, match=f"at or above {tmp_path}.*{ROOT_ENV}"):
        find_root()
    with pytest.raises(ProjectNotFoundError, match="not a workbench project"):
        find_root(tmp_path)
    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    with pytest.raises(ProjectNotFoundError, match=f"{ROOT_ENV}=.*not a workbench project"):
        project.figures_dir()
    with pytest.raises(ProjectNotFoundError):
        write_csv([{"a": 1}], "nowhere")
    assert not (tmp_path / "data").exists()


def test_the_source_checkout_is_a_project_and_an_installed_package_has_none(tmp_path,
                                                                          monkeypatch):
    repo = make_project(tmp_path / "repo")
    monkeypatch.setattr(project, "__file__", str(repo / "workbench" / "project.py"))
    assert project.source_checkout() == repo.resolve()
    installed = repo / ".venv" / "lib" / "python3" / "site-packages" / "workbench" / "project.py"
    monkeypatch.setattr(project, "__file__", str(installed))
    assert project.source_checkout() is None


def test_figures_checks_the_project_it_is_given_or_finds(tmp_path, monkeypatch, capsys):
    mine = make_project(tmp_path / "mine", figures=("00_a.png",))
    monkeypatch.chdir(mine / "notebooks")
    assert main(["figures", "--check"]) == 1
    assert str(mine.resolve() / "figures" / "00_a.png") in capsys.readouterr().err
    (mine / "figures").mkdir()
    (mine / "figures" / "00_a.png").write_bytes(b"")
    assert main(["figures", "--check"]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["figures", "--check", "--root", str(mine)]) == 0
    assert "ok: 1 figures from 1 notebooks" in capsys.readouterr().out


def error(argv: list[str], capsys) -> str:
    """The one line ``main(argv)`` ends with on stderr, before any work (nothing on stdout),
    with status 2."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert not out, out
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_run_of_no_notebook_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv in (["figures", "--check"], ["figures", "--list"], ["figures", "--only", "00"]):
        assert "no workbench project" in error(argv, capsys)
    assert "--root" in error(["figures", "--check", "--root", str(tmp_path)], capsys)
    empty = make_project(tmp_path / "empty")
    assert "holds no notebook" in error(["figures", "--check", "--root", str(empty)], capsys)
    one = make_project(tmp_path / "one", figures=("00_a.png",))
    assert "--only 01" in error(["figures", "--check", "--root", str(one), "--only", "01"],
                                capsys)
    with pytest.raises(ValueError, match="no notebook matches"):
        select([], None)


def test_a_command_that_records_rows_stops_before_its_work_outside_a_project(tmp_path,
                                                                             monkeypatch,
                                                                             capsys):
    monkeypatch.chdir(tmp_path)
    line = error(BENCH, capsys)
    assert "data/" in line and "WORKBENCH_DATA_DIR" in line
    monkeypatch.setenv("WORKBENCH_DATA_DIR", str(tmp_path / "rows"))
    assert main(BENCH) == 0
    assert (tmp_path / "rows" / "bench_project_test.csv").is_file()
