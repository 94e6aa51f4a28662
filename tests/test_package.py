"""The package as users get it: a wheel that carries its licence, its type marker and the one
version, and whose command line, installed into a fresh environment, runs a project's notebooks
into that project and never into its own folder.

The wheel is built offline from a copy of the sources and installed without dependencies into a
new virtual environment that sees this interpreter's site-packages (torch is never installed)."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import workbench
from workbench.lab.figures import discover

pytestmark = pytest.mark.slow
pytest.importorskip("setuptools", minversion="77")  # builds the wheel (the dev extra has it)

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = "00"  # the cheapest lesson


def run(*argv: str | Path, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """``argv`` in ``cwd`` with no path into the sources and no ``WORKBENCH_*`` setting."""
    env = {k: v for k, v in os.environ.items()
           if k != "PYTHONPATH" and not k.startswith("WORKBENCH_")}
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env={**env, "MPLBACKEND": "Agg"},
                          capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("package")


@pytest.fixture(scope="module")
def wheel(tmp: Path) -> Path:
    src = tmp / "src"
    shutil.copytree(REPO / "workbench", src / "workbench",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
        "-q", "-w", tmp / "dist", src, cwd=tmp)
    (path,) = (tmp / "dist").glob("workbench-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(tmp: Path, wheel: Path) -> Path:
    """A fresh environment with the wheel installed; this interpreter's site-packages (torch and
    the notebook tools) are visible behind its own, the sources are not."""
    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp)
    python = venv / "bin" / "python"
    purelib = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                       cwd=tmp).stdout.strip())
    (purelib / "outer.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
        "-q", wheel, cwd=tmp)
    return venv


def test_the_wheel_carries_the_licence_the_type_marker_and_the_one_version(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(f"{info}/METADATA").decode()
        licences = [n for n in names if n.startswith(info) and n.endswith("/LICENSE")]
        assert licences, names
        assert z.read(licences[0]) == (REPO / "LICENSE").read_bytes()
    assert "workbench/py.typed" in names
    assert f"\nVersion: {workbench.__version__}\n" in metadata
    assert "\nLicense-Expression: MIT\n" in metadata
    assert wheel.name.startswith(f"workbench-{workbench.__version__}-")


def test_the_installed_package_is_the_wheel(venv, tmp):
    code = ("import importlib.metadata as m, workbench; print(workbench.__file__); "
            "print(workbench.__version__); print(m.version('workbench'))")
    path, version, installed = run(venv / "bin" / "python", "-c", code, cwd=tmp).stdout.split()
    assert Path(path).is_relative_to(venv), path
    assert version == installed == workbench.__version__


def test_the_installed_command_runs_a_notebook_into_the_project(venv, tmp):
    project = tmp / "project"
    shutil.copytree(REPO / "notebooks", project / "notebooks",
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    shutil.copy(REPO / "pyproject.toml", project)
    command = venv / "bin" / "workbench"

    done = run(command, "figures", "--only", NOTEBOOK, cwd=project / "notebooks")
    (spec,) = [s for s in discover(REPO) if s.name.startswith(NOTEBOOK)]
    assert f"ok: {len(spec.figures)} figures from 1 notebooks" in done.stdout
    for fig in spec.figures:
        assert (project / "figures" / fig).is_file(), fig
    assert (project / "build" / "notebooks" / spec.path.name).is_file()
    purelib = next((venv / "lib").glob("python*/site-packages"))
    for folder in ("figures", "data", "build", "notebooks"):
        assert not (purelib / folder).exists(), folder

    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    done = run(command, "figures", "--check", "--only", NOTEBOOK, "--root", project,
               cwd=elsewhere)
    assert f"ok: {len(spec.figures)} figures" in done.stdout
    done = run(command, "figures", "--check", cwd=elsewhere, check=False)
    assert done.returncode == 2 and "no workbench project" in done.stderr, done.stderr
