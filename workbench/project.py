"""Where a project's notebooks, figures and data live.

A project is a folder holding ``pyproject.toml`` and ``notebooks/`` (:func:`find_root`), never
the installed package's own folder. ``$WORKBENCH_FIGURES_DIR`` and ``$WORKBENCH_DATA_DIR``
redirect figures and data alone.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ROOT_ENV", "ProjectNotFoundError", "data_dir", "figures_dir", "find_root",
           "is_project", "notebooks_dir", "source_checkout"]

ROOT_ENV = "WORKBENCH_ROOT"


class ProjectNotFoundError(FileNotFoundError):
    """No project where one was looked for; the message says where and how to name one."""


def is_project(path: Path) -> bool:
    """Whether ``path`` holds ``pyproject.toml`` and ``notebooks/``."""
    return (path / "pyproject.toml").is_file() and (path / "notebooks").is_dir()


def find_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The project root, resolved: ``root`` if given, else ``$WORKBENCH_ROOT`` if set, else the
    nearest project at or above the current working directory.

    Raises:
        ProjectNotFoundError: ``root`` or ``$WORKBENCH_ROOT`` is not a project, or no folder at
            or above the working directory is one.
    """
    source = ""
    if root is None and os.environ.get(ROOT_ENV):
        root, source = os.environ[ROOT_ENV], f"{ROOT_ENV}={os.environ[ROOT_ENV]}: "
    if root is not None:
        path = Path(root).expanduser().resolve()
        if not is_project(path):
            raise ProjectNotFoundError(f"{source}{path} is not a workbench project (it needs "
                                       "pyproject.toml and notebooks/)")
        return path
    cwd = Path.cwd().resolve()
    for path in (cwd, *cwd.parents):
        if is_project(path):
            return path
    raise ProjectNotFoundError(f"no workbench project (a folder with pyproject.toml and "
                               f"notebooks/) at or above {cwd}: run inside one, or set "
                               f"{ROOT_ENV}=PATH")


def notebooks_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """The project's ``notebooks/`` (see :func:`find_root` for ``root`` and what it raises)."""
    return find_root(root) / "notebooks"


def figures_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """Where figures are written: ``$WORKBENCH_FIGURES_DIR``, else the project's ``figures/``."""
    env = os.environ.get("WORKBENCH_FIGURES_DIR")
    return Path(env) if env else find_root(root) / "figures"


def data_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """Where recorded data goes: ``$WORKBENCH_DATA_DIR``, else the project's ``data/``."""
    env = os.environ.get("WORKBENCH_DATA_DIR")
    return Path(env) if env else find_root(root) / "data"


def source_checkout() -> Path | None:
    """The project this package is imported from (an editable install, or ``PYTHONPATH`` on a
    checkout); None for an installed wheel."""
    path = Path(__file__).resolve().parents[1]
    return path if is_project(path) else None
