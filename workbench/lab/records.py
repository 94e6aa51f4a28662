"""Recorded results: tidy CSV files in the project's ``data/`` (or ``$WORKBENCH_DATA_DIR``)
whose every row carries ``device``, ``torch``, ``date`` (UTC) and ``commit`` (the code that ran).
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import os
import platform
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from ..project import data_dir, source_checkout

__all__ = ["code_commit", "data_dir", "environment", "read_csv", "write_csv"]


def code_commit() -> str:
    """The commit of the code that runs: ``$WORKBENCH_COMMIT`` when set, else git's short hash of
    the checkout imported from (``+changes`` when the package differs), else ``""``."""
    return os.environ.get("WORKBENCH_COMMIT") or _git_commit()


@functools.lru_cache(maxsize=1)
def _git_commit() -> str:
    """:func:`code_commit` from git, asked once per process (a benchmark writes every case)."""
    repo = source_checkout()
    if repo is None:
        return ""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True).stdout
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "workbench"],
                               capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return head.strip() + ("+changes" if dirty.strip() else "")


def environment(device: torch.device | str = "cpu") -> dict[str, str]:
    """Device name, torch version, today's date (UTC) and the code's commit (:func:`code_commit`)
    for a record; on CUDA also the version of Triton, which compiles the kernels there."""
    dev = torch.device(device)
    name = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    env = {"device": name, "torch": torch.__version__,
           "date": _dt.datetime.now(_dt.timezone.utc).date().isoformat(), "commit": code_commit()}
    if dev.type == "cuda":
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = ""
    return env


def write_csv(rows: Iterable[Mapping[str, object]], name: str,
              device: torch.device | str = "cpu") -> Path:
    """Write ``rows`` to ``data/<name>.csv`` with run metadata; the columns are every row's keys,
    in order of first appearance (missing cells stay empty)."""
    if not name or "/" in name or name.endswith(".csv"):
        raise ValueError(f"data name must be a bare stable name like '01_density', got {name!r}")
    meta = environment(device)  # after each row's own columns, where it has none of its own
    rows = [{**r, **{k: v for k, v in meta.items() if k not in r}} for r in rows]
    if not rows:
        raise ValueError(f"no rows to write to {name}.csv")
    path = data_dir() / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(name: str) -> list[dict[str, str]]:
    """Rows of ``data/<name>.csv`` as dicts of strings."""
    with (data_dir() / f"{name}.csv").open(newline="") as f:
        return list(csv.DictReader(f))
