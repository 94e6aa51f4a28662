"""Recorded results: tidy CSV files under ``data/`` that carry where and when they were made.

Every row written by :func:`write_csv` gets the columns ``device``, ``torch``, ``date`` (UTC,
ISO day) unless it already has them, so a number can always be traced to its run.
``WORKBENCH_DATA_DIR`` redirects the folder (the tests use a temporary one).
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

__all__ = ["data_dir", "environment", "read_csv", "write_csv"]

_REPO_DATA = Path(__file__).resolve().parents[1] / "data"


def data_dir() -> Path:
    """Where data files go: ``$WORKBENCH_DATA_DIR`` or the repository's ``data/``."""
    env = os.environ.get("WORKBENCH_DATA_DIR")
    return Path(env) if env else _REPO_DATA


def environment(device: torch.device | str = "cpu") -> dict[str, str]:
    """Device name, torch version and today's date (UTC) for a record; on CUDA also the Triton
    version, which compiles the kernels there."""
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    env = {
        "device": name,
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).date().isoformat(),
    }
    if dev.type == "cuda":
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = ""
    return env


def write_csv(rows: Iterable[Mapping[str, object]], name: str,
              device: torch.device | str = "cpu") -> Path:
    """Write ``rows`` to ``data/<name>.csv`` with run metadata. The columns are every key of
    every row, in order of first appearance (a failed case may have fewer keys than the rest:
    its missing cells stay empty)."""
    if not name or "/" in name or name.endswith(".csv"):
        raise ValueError(f"data name must be a bare stable name like '01_density', got {name!r}")
    rows = [dict(r) for r in rows]
    if not rows:
        raise ValueError(f"no rows to write to {name}.csv")
    meta = environment(device)
    for r in rows:
        for key, val in meta.items():
            r.setdefault(key, val)
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
