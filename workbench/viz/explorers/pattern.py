"""Pattern explorer: one pattern family at a time, token view beside block view, live numbers."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from ... import patterns as P
from ...layout import BlockLayout
from ...orderings import dilation_permutation, permuted
from ...patterns import Pattern
from ..heatmaps import plot_pattern, tile_grid
from .binding import Explorer, int_slider, panels, widgets
from .core import check_int, parse_int_list

__all__ = ["MAX_SEQ_LEN", "ORDERINGS", "PatternParams", "PatternReadout", "PatternView",
           "build_pattern", "check_pattern_params", "draw_pattern_view", "parameters_used",
           "pattern_explorer", "pattern_readout_html", "pattern_view"]

MAX_SEQ_LEN = 2048  # the token view draws seq_len x seq_len pixels
FLOPS_PER_PAIR_AND_DIM = 4  # q.k and p.v: one multiply-add (2 FLOPs) per head dimension each

ORDERINGS = ("natural", "dilation")

_COMMON = frozenset({"family", "ordering", "causal", "seq_len", "block_size", "num_heads", "head",
                     "head_dim"})
_FIELD_OF = {"segment_lengths": "segments", "dilation_rates": "dilations",
             "density": "random_density"}  # builder arguments whose field has another name


@dataclass(frozen=True)
class PatternParams:
    """Everything the pattern explorer can change (defaults: notebook 01's).

    ``family`` is a registry name (:data:`workbench.patterns.FAMILIES`); the fields named like
    its parameters set them. ``causal`` is the family's own argument where it has one, else
    ``& causal()``. ``ordering="dilation"`` shows the pattern in the dilation order of the shown
    head's (segment, dilation) pair, at offset ``head mod dilation``. ``head_dim`` only scales
    the FLOP counts.
    """

    family: str = "local"
    seq_len: int = 256
    block_size: int = 32
    window: int = 24
    num_global: int = 8
    stride: int = 16
    dilation: int = 4
    segments: tuple[int, ...] = (64, 128)
    dilations: tuple[int, ...] = (1, 4)
    random_density: float = 0.15
    seed: int = 0
    cell: int = 32
    prefix: int = 64
    num_heads: int = 4
    head: int = 0
    causal: bool = False
    ordering: str = "natural"
    head_dim: int = 64

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> PatternParams:
        """Parameters from control values; ``segments``/``dilations`` may be text ("64, 128")."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise TypeError(f"unknown pattern parameters {sorted(unknown)}; known: {sorted(names)}")
        fixed = dict(values)
        for key in ("segments", "dilations"):
            if key in fixed:
                fixed[key] = parse_int_list(key, fixed[key])
        return cls(**fixed)


PATTERN_FIELDS = frozenset(f.name for f in dataclasses.fields(PatternParams))


def _knobs(family: str) -> dict[str, str]:
    """``{builder argument: field}`` of the family's parameters that a field sets."""
    fields = {a: _FIELD_OF.get(a, a) for a in P.family(family).parameters}
    return {a: f for a, f in fields.items() if f in PATTERN_FIELDS}


def parameters_used(family: str, ordering: str = "natural") -> frozenset[str]:
    """The parameters that change the picture for ``family`` in ``ordering``."""
    used = _COMMON | frozenset(_knobs(family).values())
    return used | {"segments", "dilations"} if ordering == "dilation" else used


def check_pattern_params(p: PatternParams) -> None:
    """Raise a readable ``ValueError`` for a value the pattern cannot be drawn with."""
    used = parameters_used(p.family, p.ordering)
    if p.ordering not in ORDERINGS:
        raise ValueError(f"ordering must be one of {ORDERINGS}, got {p.ordering!r}")
    seq_len = check_int("seq_len", p.seq_len, 1, MAX_SEQ_LEN,
                        "the token view draws seq_len x seq_len pixels")
    check_int("block_size", p.block_size, 1, seq_len, "a tile is 1 to seq_len tokens wide")
    num_heads = check_int("num_heads", p.num_heads, 1, 64)
    check_int("head", p.head, 0, num_heads - 1, f"heads are numbered 0..{num_heads - 1}")
    check_int("head_dim", p.head_dim, 1)
    if "window" in used:
        check_int("window", p.window, 1, seq_len,
                  f"a window larger than the sequence ({seq_len} tokens) is full attention")
    if "num_global" in used:
        check_int("num_global", p.num_global, 1, seq_len - 1,
                  "fewer global tokens than the sequence (all-global is full attention)")
    for name in ("stride", "dilation", "cell", "prefix"):
        if name in used:
            check_int(name, getattr(p, name), 1, seq_len)
    if "random_density" in used and not 0.0 < float(p.random_density) <= 1.0:
        raise ValueError(f"random_density={p.random_density} must be in (0, 1]")
    if "segments" in used:
        P.check_dilation_pairs(list(p.segments), list(p.dilations))
        P.head_groups(num_heads, len(p.segments))


def _dilation_order(p: PatternParams) -> torch.Tensor:
    """The dilation permutation of the shown head's (segment, dilation) pair and offset."""
    group = P.head_groups(p.num_heads, len(p.segments))[p.head]
    segment, dilation = p.segments[group], p.dilations[group]
    return dilation_permutation(p.seq_len, segment, dilation, p.head % dilation)


def build_pattern(p: PatternParams) -> Pattern:
    """The pattern ``p`` describes, in its token order (validated first)."""
    check_pattern_params(p)
    knobs = _knobs(p.family)
    args = {a: getattr(p, f) for a, f in knobs.items()}
    args = {a: list(v) if isinstance(v, tuple) else v for a, v in args.items()}
    pattern = P.family(p.family).pattern(p.seq_len, p.num_heads, **args)
    if p.causal and "causal" not in knobs:
        pattern = pattern & P.causal()
    if p.ordering == "dilation":
        pattern = permuted(pattern, _dilation_order(p))
    return pattern


@dataclass(frozen=True)
class PatternReadout:
    """The numbers beside the picture: densities (fractions of the ``S x S`` pairs) over all
    heads and, ``head_*``, the shown head; FLOPs of one forward pass over ``num_heads`` heads;
    the layout's two bool maps' bytes against a dense token mask's."""

    useful_density: float
    computed_density: float
    head_useful_density: float
    head_computed_density: float
    active_tiles: int
    full_tiles: int
    total_tiles: int
    computed_flops: float
    dense_flops: float
    layout_bytes: int
    token_mask_bytes: int


@dataclass(frozen=True)
class PatternView:
    """What the explorer shows: ``token_mask``, bool ``[S, S]``, and ``block_grid``, int
    ``[nq, nk]`` (0 skipped, 1 partial, 2 full), of the shown head."""

    params: PatternParams
    pattern: Pattern
    layout: BlockLayout
    token_mask: np.ndarray
    block_grid: np.ndarray
    readout: PatternReadout


def _readout(p: PatternParams, masks: torch.Tensor, layout: BlockLayout, h: int) -> PatternReadout:
    seq_len = p.seq_len
    pairs = layout.computed_pairs().to(torch.float64)  # [H of the layout]
    heads_per_layout_head = p.num_heads if layout.num_heads == 1 else 1
    flops_per_pair = FLOPS_PER_PAIR_AND_DIM * p.head_dim
    return PatternReadout(
        useful_density=float(masks.float().mean()), computed_density=layout.stats().density,
        head_useful_density=float(masks[h].float().mean()),
        head_computed_density=float(pairs[h]) / seq_len**2,
        active_tiles=int(layout.active[h].sum()), full_tiles=int(layout.full[h].sum()),
        total_tiles=layout.active[h].numel(),
        computed_flops=float(pairs.sum()) * heads_per_layout_head * flops_per_pair,
        dense_flops=float(seq_len**2 * p.num_heads * flops_per_pair),
        layout_bytes=2 * layout.active.numel(), token_mask_bytes=masks.numel())


def pattern_view(params: PatternParams) -> PatternView:
    """The explorer's pure function: parameters to pattern, panel arrays and readout."""
    pattern = build_pattern(params)
    layout = pattern.block_structure(params.seq_len, params.block_size)
    masks = pattern.token_mask(params.seq_len)
    h = params.head if pattern.num_heads > 1 else 0
    return PatternView(params, pattern, layout, masks[h].numpy(), tile_grid(layout, h),
                       _readout(params, masks, layout, h))


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.1f} MiB"


def pattern_readout_html(view: PatternView) -> str:
    """The readout line of a view (HTML)."""
    r, p = view.readout, view.params
    return (f"<b>density</b> useful {r.useful_density:.2%}, computed {r.computed_density:.2%} "
            f"(head {p.head}: {r.head_useful_density:.2%} / {r.head_computed_density:.2%}) · "
            f"<b>tiles</b> {r.active_tiles} of {r.total_tiles} active, {r.full_tiles} full · "
            f"<b>FLOPs</b> {r.computed_flops / 1e6:,.1f} M computed vs {r.dense_flops / 1e6:,.1f}"
            f" M dense ({r.computed_flops / r.dense_flops:.2%}; {p.num_heads} heads, "
            f"d={p.head_dim}) · <b>layout memory</b> {_bytes(r.layout_bytes)} (token mask: "
            f"{_bytes(r.token_mask_bytes)})")


def draw_pattern_view(view: PatternView, figure: Figure) -> None:
    """Token view beside block view of the shown head, in ``figure`` (its axes are reused)."""
    p = view.params
    plot_pattern(view.pattern, p.seq_len, p.block_size, head=p.head, axes=panels(figure))


def pattern_controls(p: PatternParams, names: frozenset[str] | None = None) -> dict[str, Any]:
    """Widgets for the fields of ``p`` (all, or those in ``names``), keyed by field name."""
    w, wide = widgets(), {"description_width": "initial"}
    make = {
        "family": lambda: w.Dropdown(options=list(P.FAMILIES), value=p.family,
                                     description="family"),
        "ordering": lambda: w.ToggleButtons(options=list(ORDERINGS), value=p.ordering,
                                            description="ordering", style=wide),
        "causal": lambda: w.Checkbox(value=p.causal, description="& causal()"),
        "seq_len": lambda: int_slider(p.seq_len, 16, 1024, "seq_len", step=16),
        "block_size": lambda: w.IntText(value=p.block_size, description="block_size", style=wide),
        "window": lambda: int_slider(p.window, 1, 512, "window"),
        "num_global": lambda: int_slider(p.num_global, 1, 128, "num_global", style=wide),
        "stride": lambda: int_slider(p.stride, 1, 128, "stride"),
        "dilation": lambda: int_slider(p.dilation, 1, 64, "dilation"),
        "segments": lambda: w.Text(value=", ".join(map(str, p.segments)),
                                   description="segments", continuous_update=False),
        "dilations": lambda: w.Text(value=", ".join(map(str, p.dilations)),
                                    description="dilations", continuous_update=False),
        "random_density": lambda: w.FloatSlider(
            value=p.random_density, min=0.01, max=1.0, step=0.01, continuous_update=False,
            description="density"),
        "seed": lambda: w.IntText(value=p.seed, description="seed"),
        "cell": lambda: int_slider(p.cell, 1, 256, "cell"),
        "prefix": lambda: int_slider(p.prefix, 1, 1024, "prefix"),
        "num_heads": lambda: int_slider(p.num_heads, 1, 16, "num_heads", style=wide),
        "head": lambda: int_slider(p.head, 0, p.num_heads - 1, "head"),
        "head_dim": lambda: w.IntText(value=p.head_dim, description="head_dim", style=wide),
    }
    return {name: build() for name, build in make.items() if names is None or name in names}


def enable_used_controls(controls: Mapping[str, Any]) -> None:
    """Grey out controls the current family ignores; bound the head slider by num_heads."""
    family = controls["family"].value
    ordering = controls["ordering"].value if "ordering" in controls else "natural"
    used = parameters_used(family, ordering)
    for name, control in controls.items():
        control.disabled = name in PATTERN_FIELDS and name not in used
    if "head" in controls and "num_heads" in controls:
        controls["head"].max = max(0, controls["num_heads"].value - 1)


def pattern_explorer(**params: Any) -> Explorer[PatternView]:
    """The pattern explorer widget, started at ``PatternParams(**params)``; a bad value shows a
    message and keeps the last good picture."""
    return Explorer(controls=pattern_controls(PatternParams.from_values(params)),
                    compute=lambda values: pattern_view(PatternParams.from_values(values)),
                    draw=draw_pattern_view, readout=pattern_readout_html, figsize=(9.0, 4.6),
                    adjust=enable_used_controls, name="wb-pattern")
