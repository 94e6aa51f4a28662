"""One visual grammar: palettes that give the same thing the same colour in every figure,
seaborn's theme (:func:`use`), the provenance stamp of measured figures (:func:`stamp`), and the
axes helpers every figure shares."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

__all__ = ["FAMILY", "ORDERING", "Provenance", "SHARDING", "TILE", "TILE_CMAP", "TOKEN_CMAP",
           "VARIANT", "VARIANT_LABEL", "color_of", "palette", "rank_colors", "stamp", "use"]

# Colour-blind-safe base (Okabe-Ito), plus neutrals.
_BLUE, _ORANGE, _GREEN, _VERMILION = "#0072B2", "#E69F00", "#009E73", "#D55E00"
_SKY, _PURPLE, _YELLOW, _GREY, _BLACK = "#56B4E9", "#CC79A7", "#F0E442", "#7F7F7F", "#000000"
_NAVY, _PALE = "#1f3b73", "#f2f2f2"

TILE: dict[str, str] = {
    "empty": _PALE,     # no allowed pair: never computed
    "partial": _ORANGE,  # some pairs allowed: computed under the token mask
    "full": _NAVY,      # every pair allowed: computed without a mask
    "allowed": _NAVY,   # one allowed (query, key) pair in a token-level view
}
"""Tile states of a block layout, and allowed tokens."""

TILE_CMAP = ListedColormap([TILE["empty"], TILE["partial"], TILE["full"]])
"""``imshow`` colour map of a tile-state grid (0 empty, 1 partial, 2 full)."""

TOKEN_CMAP = ListedColormap([TILE["empty"], TILE["allowed"]])
"""``imshow`` colour map of a token mask (0 not allowed, 1 allowed)."""

VARIANT: dict[str, str] = {
    "ours": _BLUE, "triton": _SKY, "blockwise": _GREEN, "flex_natural": _ORANGE,
    "strided_gather": _VERMILION, "strided_view": _PURPLE, "paper": _GREEN, "sdpa_dense": _GREY,
    "sdpa_masked": _BLACK, "reference": _BLACK,
}
"""Who computes: ``ours`` is what ``backend="auto"`` gives; the rest are baselines."""

VARIANT_LABEL: dict[str, str] = {
    "ours": "ours (auto)", "triton": "ours, Triton kernel", "blockwise": "ours, pure PyTorch",
    "flex_natural": "FlexAttention, natural order", "strided_gather": "gather + SDPA + scatter",
    "strided_view": "strided views into SDPA", "sdpa_dense": "dense SDPA",
    "paper": "ours, paper mode (every pair on every head)",
    "sdpa_masked": "SDPA + dense mask", "reference": "float64 reference",
}
"""Legend text of each variant."""

FAMILY: dict[str, str] = {
    "dense": _GREY, "full": _GREY, "causal": _PURPLE, "local": _ORANGE, "global_local": _YELLOW,
    "strided": _VERMILION, "sparse_transformer": "#A6761D", "random": _GREEN, "random10": _GREEN,
    "dilated": _BLUE, "longnet": _SKY, "dilated_window": "#882255", "documents": "#44AA99",
    "prefix_lm": "#332288", "adaptive": _BLACK,
}
"""Pattern families: every family of :data:`workbench.patterns.FAMILIES`, and the names the
benchmarks write (``dense`` is ``full``, ``random10`` is ``random``)."""

ORDERING: dict[str, str] = {"natural": _GREY, "raster": _GREY, "dilation": _BLUE,
                            "morton": _ORANGE, "hilbert": _GREEN, "zigzag": _PURPLE}
"""Token and block orders."""

SHARDING: dict[str, str] = {"contiguous": _GREY, "zigzag": _PURPLE}
"""Ring shardings."""

SEPARATOR_MAX_TILES = 48  # tile_separators draws lines up to this many tiles a side

_RANKS = (_BLUE, _ORANGE, _GREEN, _VERMILION, _SKY, _PURPLE, _YELLOW, _GREY)


def rank_colors(n: int) -> list[str]:
    """Colours of ranks ``0 .. n-1`` (the same rank has the same colour in every figure)."""
    return [_RANKS[r % len(_RANKS)] for r in range(n)]


def color_of(name: str, palette_: Mapping[str, str], default: str = _GREY) -> str:
    """The colour ``palette_`` gives ``name``; names such as ``"dilated_causal"`` fall back to
    their longest known prefix, anything else to ``default``."""
    if name in palette_:
        return palette_[name]
    prefixes = [p for p in palette_ if str(name).startswith(p)]
    return palette_[max(prefixes, key=len)] if prefixes else default


def distinct(values: Iterable[object]) -> str:
    """The distinct ``values`` as text, in first-seen order, joined by commas."""
    return ", ".join(dict.fromkeys(str(v) for v in values))


def palette(names: Iterable[str], palette_: Mapping[str, str]) -> dict[str, str]:
    """``{name: colour}`` for the given names: what seaborn's ``palette=`` takes."""
    return {n: color_of(n, palette_) for n in names}


def use() -> None:
    """Apply the workbench look to matplotlib and seaborn (white grid, readable sizes)."""
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.95,
                  rc={"axes.spines.top": False, "axes.spines.right": False,
                      "figure.dpi": 110, "savefig.dpi": 110})
    mpl.rcParams["image.interpolation"] = "nearest"


# --------------------------------------------------------------------- provenance
@dataclass(frozen=True)
class Provenance:
    """Where and when numbers were measured (``device``, ISO ``date``, ``dtype``, ``shape``
    such as ``"B=1, H=16, D=128"``, optional ``software``): printed on every figure that shows
    them."""

    device: str
    date: str
    dtype: str
    shape: str
    software: str = ""

    def __post_init__(self) -> None:
        for name in ("device", "date", "dtype", "shape"):
            if not str(getattr(self, name)).strip():
                raise ValueError(f"Provenance.{name} must be given: a measured figure says "
                                 "where and when it was measured")

    @classmethod
    def from_rows(cls, df, *, shape: str | None = None) -> Provenance:
        """The provenance of tidy benchmark rows (columns ``device``, ``date``, ``dtype`` and,
        when present, ``torch``, ``batch``, ``heads``, ``head_dim``); several values of a
        column are joined."""
        def values(col: str) -> str:
            return distinct(df[col]) if col in df else ""

        if shape is None:
            shape = ", ".join(f"{k}={values(c)}" for k, c in (("B", "batch"), ("H", "heads"),
                                                              ("D", "head_dim")) if c in df)
        torch_v = values("torch")
        return cls(values("device"), values("date"), values("dtype"), shape,
                   f"torch {torch_v}" if torch_v else "")

    def line(self) -> str:
        """One line for the bottom of a figure."""
        parts = [f"measured on {self.device}", self.date, self.dtype, self.shape]
        return " · ".join([*parts, self.software] if self.software else parts)


def stamp(fig, provenance: Provenance) -> None:
    """Print ``provenance`` at the bottom of ``fig`` (kept as ``fig._workbench_stamp``)."""
    if not isinstance(provenance, Provenance):
        raise TypeError(f"provenance must be a Provenance, got {type(provenance).__name__}")
    fig.text(0.01, -0.01, provenance.line(), fontsize=8, color=_GREY, ha="left", va="top")
    fig._workbench_stamp = provenance


# --------------------------------------------------------------------- axes helpers
def new_axes(ax, size: float = 4.0):
    """``ax``, or the axes of a new ``size x size`` inch figure when ``ax`` is None."""
    if ax is None:
        _, ax = plt.subplots(figsize=(size, size))
    return ax


def set_title(ax, title: str | None, default: str, fontsize: float = 9) -> None:
    """``title``, or ``default`` when ``title`` is None (``""`` leaves the axes untitled)."""
    ax.set_title(default if title is None else title, fontsize=fontsize)


def grid_lines(ax, rows: Iterable[float], cols: Iterable[float] | None = None, *,
               color: str = "white", lw: float = 0.8) -> None:
    """Horizontal lines at ``rows`` and vertical ones at ``cols`` (default: ``rows``)."""
    for y in rows:
        ax.axhline(y, color=color, lw=lw)
    for x in rows if cols is None else cols:
        ax.axvline(x, color=color, lw=lw)


def tile_separators(ax, nq: int, nk: int, *, lw: float = 0.8) -> None:
    """White lines between the cells of an ``nq x nk`` image, so that equal neighbours stay
    countable; none when a side has more than ``SEPARATOR_MAX_TILES`` cells."""
    if max(nq, nk) <= SEPARATOR_MAX_TILES:
        grid_lines(ax, np.arange(1, nq) - 0.5, np.arange(1, nk) - 0.5, lw=lw)
