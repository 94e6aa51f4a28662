"""The figure pipeline: run the notebooks with papermill and check what they declare.

A notebook declares, in its metadata under ``"workbench"``, the files it writes under
``figures/`` (``"figures"``) and ``data/`` (``"data"``) and named parameter sets
(``"profiles"``); :func:`run_notebooks` runs them and checks every declared figure was written.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from ..project import ROOT_ENV, figures_dir, find_root, notebooks_dir

__all__ = ["NotebookSpec", "check_figures", "discover", "run_notebooks", "select"]


@dataclass(frozen=True)
class NotebookSpec:
    """A notebook and what it promises to produce."""

    path: Path
    figures: list[str]
    data: list[str]
    profiles: dict[str, dict[str, Any]]

    @property
    def name(self) -> str:
        return self.path.stem


def discover(root: Path | None = None) -> list[NotebookSpec]:
    """Every ``*.ipynb`` in the project's ``notebooks/`` (sorted by name) with its declared
    outputs; raises ``ProjectNotFoundError`` (an ``OSError``) outside a project."""
    specs = []
    for path in sorted(notebooks_dir(root).glob("*.ipynb")):
        meta = json.loads(path.read_text()).get("metadata", {}).get("workbench", {})
        specs.append(NotebookSpec(path, list(meta.get("figures", [])), list(meta.get("data", [])),
                                  dict(meta.get("profiles", {}))))
    return specs


def select(specs: list[NotebookSpec], only: list[str] | None) -> list[NotebookSpec]:
    """Notebooks whose name starts with one of ``only`` (all when ``only`` is empty); raises
    ``ValueError`` when that is none, so that a run of nothing never reads as a success."""
    chosen = [s for s in specs if not only or any(s.name.startswith(o) for o in only)]
    if not chosen:
        names = ", ".join(s.name for s in specs) or "none"
        raise ValueError(f"no notebook matches {' '.join(only or ['*'])}; available: {names}")
    return chosen


def check_figures(specs: list[NotebookSpec], since: float | None = None,
                  root: Path | None = None) -> list[str]:
    """Declared figures that are missing (or older than ``since``); empty when all are there."""
    missing = []
    for spec in specs:
        for fig in spec.figures:
            path = figures_dir(root) / fig
            if not path.exists() or (since is not None and path.stat().st_mtime < since):
                missing.append(f"{spec.name}: {path}")
    return missing


def _parameters(spec: NotebookSpec, profile: str | None, overrides: dict[str, Any]) -> dict:
    """The profile's parameters with ``overrides`` over them; raises ValueError for a profile
    the notebook lacks."""
    if profile in (None, "", "default"):
        return dict(overrides)
    if profile not in spec.profiles:
        raise ValueError(f"{spec.name} has no profile {profile!r}; it has: "
                         f"{', '.join(['default', *spec.profiles])}")
    return {**spec.profiles[profile], **overrides}


def run_notebooks(specs: list[NotebookSpec], *, profile: str | None = None,
                  overrides: dict[str, Any] | None = None, progress: bool = True,
                  save_outputs: bool = False, root: Path | None = None) -> list[str]:
    """Execute ``specs`` with papermill into ``build/notebooks/`` (kernels in the notebooks'
    folder, ``$WORKBENCH_ROOT`` set to the project); returns the declared figures that were not
    written. ``save_outputs`` (default parameters only, else ValueError): the executed
    notebooks replace those in ``notebooks/``."""
    if save_outputs and (overrides or (profile and profile != "default")):
        raise ValueError("save_outputs records the default parameters' outputs only; drop the "
                         "profile and the overrides")
    import papermill as pm
    from tqdm.auto import tqdm

    root = find_root(root)
    build = root / "build" / "notebooks"
    build.mkdir(parents=True, exist_ok=True)
    start = time.time() - 1.0
    bar = tqdm(specs, desc="notebooks", unit="nb", disable=not progress)
    with mock.patch.dict(os.environ, {ROOT_ENV: str(root)}):  # the kernels inherit it
        for spec in bar:
            bar.set_postfix_str(spec.name)
            pm.execute_notebook(str(spec.path), str(build / spec.path.name),
                                parameters=_parameters(spec, profile, overrides or {}),
                                cwd=str(spec.path.parent), kernel_name="python3",
                                progress_bar=False)
            if save_outputs:
                shutil.copyfile(build / spec.path.name, spec.path)
    return check_figures(specs, since=start, root=root)

