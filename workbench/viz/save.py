"""One way to write figures: stable names, deterministic bytes, one folder: the project's
``figures/`` (:func:`workbench.project.figures_dir`), or ``$WORKBENCH_FIGURES_DIR``."""

from __future__ import annotations

from pathlib import Path

import matplotlib

from ..project import figures_dir

matplotlib.rcParams["svg.hashsalt"] = "workbench"  # deterministic SVG ids

__all__ = ["figures_dir", "save_figure"]


def save_figure(fig, name: str, *, formats: tuple[str, ...] = ("png",),
                dpi: int = 110) -> list[Path]:
    """Save ``fig`` as ``<figures_dir>/<name>.<fmt>`` for each format; returns the paths.

    ``name`` is a stable identifier such as ``"01_pattern_gallery"`` (no extension, no
    folders); metadata that changes between runs is left out, so the same figure gives the same
    bytes. Raises ``ValueError`` for any other name.
    """
    if not name or "/" in name or "." in name:
        raise ValueError(f"figure name must be a bare stable name like '01_gallery', got {name!r}")
    out = figures_dir()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out / f"{name}.{fmt}"
        meta = {"Software": None} if fmt == "png" else {"Date": None, "Creator": None}
        fig.savefig(path, format=fmt, dpi=dpi, bbox_inches="tight", metadata=meta)
        paths.append(path)
    return paths
