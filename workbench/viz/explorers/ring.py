"""Ring stepper: play or step through the ring schedule of a pattern's block layout."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from matplotlib.figure import Figure

from ...layout import BlockLayout, num_blocks
from ...sharding import DistributedPlan, distributed_plan, shard_plan
from ..ring import RingRegion, plot_ring_schedule, plot_ring_step, ring_step_regions
from .binding import Explorer, int_slider, panels, widgets
from .core import check_int
from .pattern import PatternParams, build_pattern, enable_used_controls, pattern_controls

__all__ = ["RingParams", "RingView", "draw_ring_view", "ring_explorer", "ring_readout_html",
           "ring_view"]

RING_PATTERN_CONTROLS = frozenset({"family", "causal", "seq_len", "block_size", "window",
                                   "num_global", "stride"})
PLAY_INTERVAL_MS = 1200
DEFAULT_PATTERN = PatternParams(family="local", seq_len=256, block_size=16, window=48)


@dataclass(frozen=True)
class RingParams:
    """A pattern (:class:`PatternParams`), the number of ranks of the ring, and the step shown."""

    pattern: PatternParams = DEFAULT_PATTERN
    ranks: int = 4
    step: int = 0


@dataclass(frozen=True)
class RingView:
    """One step of the ring: the pattern's layout, its plan, and each rank's pairs of runs at
    ``step`` (:func:`~workbench.viz.ring.ring_step_regions`)."""

    params: RingParams
    layout: BlockLayout
    plan: DistributedPlan
    regions: list[RingRegion]


def ring_view(params: RingParams) -> RingView:
    """The stepper's pure function: pattern, ranks and step to plan and highlighted tiles."""
    p = params.pattern
    pattern = build_pattern(p)
    blocks = num_blocks(p.seq_len, p.block_size)
    ranks = check_int("ranks", params.ranks, 1, blocks,
                      f"the sequence has {blocks} blocks and each rank needs one at least; use "
                      "fewer ranks or a smaller block_size")
    step = check_int("step", params.step, 0, ranks - 1, f"a ring of {ranks} ranks has "
                     f"steps 0..{ranks - 1}")
    layout = pattern.block_structure(p.seq_len, p.block_size)
    plan = distributed_plan(layout, shard_plan(p.seq_len, ranks, p.block_size))
    return RingView(params, layout, plan, ring_step_regions(plan, step))


def draw_ring_view(view: RingView, figure: Figure) -> None:
    """Schedule beside the layout at the step, in ``figure`` (its axes are reused)."""
    axes = panels(figure)
    step = view.params.step
    plot_ring_schedule(view.plan, step=step, ax=axes[0])
    plot_ring_step(view.layout, view.plan, step, ax=axes[1])
    figure.suptitle(f"{build_pattern(view.params.pattern)!r}: ring of {view.plan.world_size} "
                    f"ranks, step {step}", fontsize=9)


def ring_readout_html(view: RingView) -> str:
    """The readout line of a view (HTML)."""
    plan, step = view.plan, view.params.step
    held = ", ".join(f"r{r.rank}: kv r{r.kv_rank}" for r in view.regions)
    computing = [r.rank for r in view.regions if r.computed]
    tiles = sum(r.tiles for r in view.regions)
    return (f"<b>step {step}</b> · K/V held ({held}) · <b>computing</b> "
            f"{', '.join(f'r{r}' for r in computing) or 'none'} · <b>tiles</b> {tiles} this step, "
            f"{int(plan.tiles.sum())} in all · <b>skipped</b> {plan.skipped} of "
            f"{plan.world_size ** 2} (rank, step) pairs")


def _params(values: Mapping[str, Any], base: PatternParams) -> RingParams:
    """Ring parameters from control values; pattern fields without a control keep ``base``'s."""
    pattern = {k: v for k, v in values.items() if k not in ("ranks", "step")}
    return RingParams(PatternParams.from_values({**dataclasses.asdict(base), **pattern}),
                      ranks=values["ranks"], step=values["step"])


def ring_explorer(ranks: int = 4, step: int = 0, **pattern: Any) -> Explorer[RingView]:
    """The ring stepper widget: a pattern (:class:`PatternParams` fields in ``pattern``), the
    number of ranks, and Play / a step slider."""
    w = widgets()
    start = dataclasses.replace(DEFAULT_PATTERN, **pattern)
    controls = pattern_controls(start, RING_PATTERN_CONTROLS)
    controls["ranks"] = int_slider(ranks, 1, 16, "ranks")
    controls["step"] = w.IntSlider(value=step, min=0, max=ranks - 1, description="step")
    play = w.Play(value=step, min=0, max=ranks - 1, interval=PLAY_INTERVAL_MS,
                  description="play the ring")
    w.jslink((play, "value"), (controls["step"], "value"))

    def follow_ranks(ctrls: Mapping[str, Any]) -> None:
        enable_used_controls(ctrls)
        last = max(0, ctrls["ranks"].value - 1)
        ctrls["step"].max = play.max = last

    return Explorer(controls=controls, compute=lambda values: ring_view(_params(values, start)),
                    draw=draw_ring_view, readout=ring_readout_html, figsize=(9.0, 4.6),
                    adjust=follow_ranks, name="wb-ring", header=(w.HBox(
                        [play, w.Label("play / pause steps through the ring")]),))
