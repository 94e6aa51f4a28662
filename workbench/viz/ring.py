"""The ring schedule of a :class:`~workbench.sharding.DistributedPlan` drawn: a rank x step grid,
one step's pairs of runs outlined on the layout, and every active tile coloured by its step."""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from ..layout import BlockLayout
from ..sharding import DistributedPlan
from .heatmaps import head_layout, plot_block_layout
from .style import TILE, TOKEN_CMAP, new_axes, rank_colors, set_title, tile_separators

__all__ = ["RingRegion", "distributed_tile_steps", "plot_distributed_layout",
           "plot_ring_schedule", "plot_ring_step", "ring_step_regions", "step_colors"]

ANNOTATE_MAX_RANKS = 12  # write the K/V shard and tile count in each cell up to this many ranks
_DIMMED = 0.7  # opacity of the white veil over tiles that a step does not compute


@dataclass(frozen=True)
class RingRegion:
    """One (query run, K/V run) pair a rank covers at one ring step: ``q_blocks`` of its queries,
    ``k_blocks`` of the K/V shard of ``kv_rank`` (``[start, stop)`` blocks); ``tiles`` counts its
    active tiles (all heads)."""

    rank: int
    kv_rank: int
    q_blocks: tuple[int, int]
    k_blocks: tuple[int, int]
    tiles: int

    @property
    def computed(self) -> bool:
        return self.tiles > 0


def _check_step(plan: DistributedPlan, step: int) -> None:
    p = plan.world_size
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"step must be an int, got {step!r}")
    if not 0 <= step < p:
        raise ValueError(f"step={step} is out of range for a ring of {p} ranks "
                         f"(steps 0..{p - 1})")


def ring_step_regions(plan: DistributedPlan, step: int) -> list[RingRegion]:
    """Every (query run, K/V run) pair of every rank at ``step``, rank by rank."""
    _check_step(plan, step)
    regions = []
    for rank, runs in enumerate(plan.sharding.pieces):
        src = plan.kv_rank(rank, step)
        for i, q_blocks in enumerate(runs):
            for j, k_blocks in enumerate(plan.kv.pieces[src]):
                regions.append(RingRegion(rank, src, q_blocks, k_blocks,
                                          plan.pair_tiles(rank, i, src, j)))
    return regions


def _shard_lines(ax, plan: DistributedPlan, color: str) -> None:
    """Dotted lines where a query run (rows) or a K/V run (columns) of the shards starts."""
    for sharding, line in ((plan.sharding, ax.axhline), (plan.kv, ax.axvline)):
        for b0, _ in (run for runs in sharding.pieces for run in runs):
            if b0:
                line(b0 - 0.5, color=color, lw=0.6, ls=":")


def plot_ring_step(layout: BlockLayout, plan: DistributedPlan, step: int, *,
                   head: int | None = None, ax=None, title: str | None = None):
    """The block layout with each rank's pairs of runs at ``step`` outlined in its colour, solid
    where it computes and dashed where it skips; other tiles are veiled. ``head`` picks one
    head; by default all heads are merged (:func:`~.heatmaps.head_layout`)."""
    shown = head_layout(layout, head)
    ax = plot_block_layout(shown, ax=ax, annotate=False, title="")
    nq, nk = shown.active.shape[1:]
    veil = np.ones((nq, nk, 4))
    veil[..., 3] = _DIMMED
    regions = ring_step_regions(plan, step)
    colors = rank_colors(plan.world_size)
    for region in regions:
        (q0, q1), (k0, k1) = region.q_blocks, region.k_blocks
        if region.computed:
            veil[q0:q1, k0:k1, 3] = 0.0
        color = colors[region.rank]
        ax.add_patch(Rectangle((k0 - 0.5, q0 - 0.5), k1 - k0, q1 - q0, fill=False,
                               edgecolor=color, lw=2.2 if region.computed else 1.0,
                               ls="-" if region.computed else "--"))
        ax.text(k0 - 0.3, q0 - 0.3, f"r{region.rank}", color=color, fontsize=7, va="top",
                fontweight="bold", bbox={"facecolor": "white", "alpha": 0.7, "lw": 0, "pad": 0.5})
    ax.imshow(veil, interpolation="nearest")
    _shard_lines(ax, plan, "#999999")
    computing = len({r.rank for r in regions if r.computed})
    set_title(ax, title, f"step {step}: {computing} of {plan.world_size} ranks compute, "
              f"{sum(r.tiles for r in regions)} tiles")
    ax.legend(handles=[Patch(facecolor="none", edgecolor="#333333", lw=2.0, label="rank computes"),
                       Patch(facecolor="none", edgecolor="#333333", ls="--", label="rank skips")],
              loc="upper right", fontsize=7, frameon=True)
    return ax


def _compact(n: int) -> str:
    """``1234567`` as ``1.23M``: tile counts that fit in a grid cell."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= 10 * div or (unit != "k" and n >= div):
            return f"{n / div:.3g}{unit}"
    return str(n)


def _shard_label(plan: DistributedPlan, rank: int) -> str:
    runs = ", ".join(f"{b0}-{b1 - 1}" for b0, b1 in plan.sharding.pieces[rank])
    return f"rank {rank}\nblocks {runs}"


def plot_ring_schedule(plan: DistributedPlan, *, step: int | None = None, ax=None,
                       title: str | None = None, shard_labels: bool = True):
    """Rank x step grid of ``plan``: dark where a rank computes, pale where it skips the step;
    steps after the plan's ``last_step()`` are hatched. Up to ``ANNOTATE_MAX_RANKS`` ranks each
    cell names the K/V shard held and the tiles computed; ``step`` outlines that column;
    ``shard_labels`` names each rank's block runs.
    """
    ax = new_axes(ax)
    p = plan.world_size
    tiles = plan.tiles_per_step()
    computed = (tiles > 0).to(torch.int64).numpy()
    ax.imshow(computed, cmap=TOKEN_CMAP, vmin=0, vmax=1, interpolation="nearest")
    if p <= ANNOTATE_MAX_RANKS:
        fs = 7 if p <= 4 else 6 if p <= 8 else 5
        for r in range(p):
            for d in range(p):
                on = bool(computed[r, d])
                ax.text(d, r, f"kv r{plan.kv_rank(r, d)}\n"
                        f"{_compact(int(tiles[r, d])) if on else 'skip'}",
                        ha="center", va="center", fontsize=fs,
                        color="white" if on else "#888888")
    last = plan.last_step()
    if last < p - 1:
        ax.add_patch(Rectangle((last + 0.5, -0.5), p - 1 - last, p, fill=False, hatch="///",
                               edgecolor="#bbbbbb", lw=0))
    tile_separators(ax, p, p, lw=1.0)
    if step is not None:
        _check_step(plan, step)
        ax.add_patch(Rectangle((step - 0.5, -0.5), 1, p, fill=False, edgecolor="#d62728",
                               lw=2.5))
    ax.set_xticks(range(p))
    ax.set_xlabel("step d (holds K/V of rank r - d)")
    if shard_labels:
        ax.set_yticks(range(p), [_shard_label(plan, r) for r in range(p)], fontsize=6)
        ax.set_ylabel("")
    else:
        ax.set_yticks(range(p))
        ax.set_ylabel("rank r (query shard)")
    set_title(ax, title, f"{plan.sharding.kind}, {p} ranks: {plan.skipped} of {p * p} steps "
              f"skipped, {int(plan.shards_sent().sum())} shards sent")
    return ax


def distributed_tile_steps(layout: BlockLayout, plan: DistributedPlan, *,
                           head: int | None = None) -> Tensor:
    """int64 ``[nq, nk]``: the ring step at which each active tile is computed (by the rank
    owning its query block), -1 for inactive tiles; of ``head``, or of any head if None."""
    if (layout.q_len, layout.k_len, layout.block_size) != (
            plan.sharding.seq_len, plan.kv.seq_len, plan.sharding.block_size):
        raise ValueError("layout and plan disagree on the sequence length or block size")
    step = (plan.sharding.owner()[:, None] - plan.kv.owner()[None, :]) % plan.world_size
    active = head_layout(layout, head).active[0].cpu()
    return torch.where(active, step, torch.full_like(step, -1))


def step_colors(world_size: int) -> list[tuple[float, float, float, float]]:
    """One colour per ring step, dark (step 0, the local shard) to light purple: apart from the
    rank colours (:func:`~workbench.viz.style.rank_colors`) and the pale of skipped tiles."""
    cmap = plt.get_cmap("Purples")
    return [cmap(0.95 - 0.55 * d / max(1, world_size - 1)) for d in range(world_size)]


def plot_distributed_layout(layout: BlockLayout, plan: DistributedPlan, *,
                            head: int | None = None, ax=None, title: str | None = None,
                            legend: bool = True):
    """The block layout with each active tile coloured by the step that computes it; strips
    left and above give the rank of each query block (which computes the tile) and of each key
    block, dotted lines separate the shards' runs."""
    ax = new_axes(ax, 4.5)
    steps = distributed_tile_steps(layout, plan, head=head)
    p = plan.world_size
    nq, nk = steps.shape
    colors = ListedColormap([TILE["empty"], *step_colors(p)])
    ax.imshow(steps.numpy() + 1, cmap=colors, vmin=0, vmax=p, interpolation="nearest")
    tile_separators(ax, nq, nk, lw=0.5)
    width = max(1.0, nk / 30)
    edge = -0.5 - 1.3 * width
    for r, color in enumerate(rank_colors(p)):
        for b0, b1 in plan.sharding.pieces[r]:  # query blocks: strip on the left
            ax.add_patch(Rectangle((edge, b0 - 0.5), width, b1 - b0, color=color,
                                   clip_on=False, lw=0))
        for b0, b1 in plan.kv.pieces[r]:  # key blocks: strip on top
            ax.add_patch(Rectangle((b0 - 0.5, edge), b1 - b0, width, color=color,
                                   clip_on=False, lw=0))
    _shard_lines(ax, plan, "#666666")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlim=(-0.5 - 1.4 * width, nk - 0.5), ylim=(nq - 0.5, -0.5 - 1.4 * width),
           xlabel="key block (strip: rank holding it)",
           ylabel="query block (strip: rank computing it)")
    set_title(ax, title, f"{plan.sharding.kind} sharding over {p} ranks: tile colour = ring step")
    if legend:
        handles = [Patch(color=c, label=f"step {d}") for d, c in enumerate(step_colors(p))]
        handles += [Patch(color=c, label=f"rank {r}") for r, c in enumerate(rank_colors(p))]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7,
                  frameon=False)
    return ax
