"""The ring drawn: the schedule grid and the step of every tile match the plan (Agg backend:
conftest sets ``MPLBACKEND``)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgba

import workbench as wb
from workbench.distributed import distributed_plan, shard_plan
from workbench.viz.ring import distributed_tile_steps, step_colors
from workbench.viz.style import TILE

P = wb.patterns
S, B, W = 1024, 32, 4


def _plan(pattern, sharding):
    layout = pattern.block_structure(S, B)
    return layout, distributed_plan(layout, shard_plan(S, W, B, sharding))


CASES = [(P.causal(), "contiguous"), (P.causal(), "zigzag"),
         (P.local_window(64, causal=True), "contiguous"),
         (P.local_window(64, causal=True), "zigzag"),
         (P.dilated([64, 128], [1, 2], 2), "zigzag")]


@pytest.mark.parametrize("pattern,sharding", CASES)
def test_schedule_by_step_matches_plan(pattern, sharding):
    _, plan = _plan(pattern, sharding)
    tiles = plan.tiles_per_step()
    for r in range(W):
        for d in range(W):
            src = (r - d) % W
            assert plan.kv_rank(r, d) == src
            assert int(tiles[r, d]) == int(plan.tiles[r, src])
            assert bool(plan.computed[r, d]) == plan.needed(r, src) == (int(tiles[r, d]) > 0)
            assert sum(t for *_, t in plan.pairs(r, src)) == int(plan.tiles[r, src])
    assert plan.skipped == int((tiles == 0).sum())


@pytest.mark.parametrize("pattern,sharding", CASES)
def test_drawn_schedule_colours_and_labels(pattern, sharding):
    _, plan = _plan(pattern, sharding)
    fig, ax = plt.subplots()
    wb.viz.plot_ring_schedule(plan, ax=ax)
    image = ax.images[0]
    grid = np.asarray(image.get_array())
    rgba = image.to_rgba(grid)
    texts = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text()
             for t in ax.texts}
    for r in range(W):
        for d in range(W):
            src = (r - d) % W
            need = plan.needed(r, src)
            assert bool(grid[r, d]) == need
            assert np.allclose(rgba[r, d], to_rgba(TILE["allowed"] if need else TILE["empty"]))
            label = texts[(d, r)]
            assert label.startswith(f"kv r{src}\n")
            assert label.endswith(str(int(plan.tiles[r, src])) if need else "skip")
    hatched = [p for p in ax.patches if p.get_hatch()]
    assert len(hatched) == (plan.last_step() < W - 1)
    plt.close(fig)


def test_contiguous_local_stops_early_and_zigzag_balances_causal():
    _, local = _plan(P.local_window(64, causal=True), "contiguous")
    assert local.last_step() == 1
    _, causal = _plan(P.causal(), "zigzag")
    load = causal.tiles.sum(1)
    assert int(load.max()) == int(load.min())


@pytest.mark.parametrize("pattern,sharding", CASES)
def test_tile_steps_cover_the_layout_once(pattern, sharding):
    layout, plan = _plan(pattern, sharding)
    steps = distributed_tile_steps(layout, plan)
    active = layout.active.any(0)
    assert torch.equal(steps >= 0, active)
    own = plan.sharding.owner()
    # the tiles computed at step d by rank r, summed over heads, are the plan's
    per_head = layout.active.sum(0)
    for r in range(W):
        for d in range(W):
            mask = (steps == d) & (own[:, None] == r)
            assert int(per_head[mask].sum()) == int(plan.tiles_per_step()[r, d])


def test_drawn_layout_colours_are_the_steps():
    layout, plan = _plan(P.causal(), "zigzag")
    fig, ax = plt.subplots()
    wb.viz.plot_distributed_layout(layout, plan, ax=ax)
    image = ax.images[0]
    rgba = image.to_rgba(np.asarray(image.get_array()))
    steps = distributed_tile_steps(layout, plan).numpy()
    colors = [to_rgba(TILE["empty"]), *step_colors(W)]
    for i in range(steps.shape[0]):
        for j in range(steps.shape[1]):
            assert np.allclose(rgba[i, j], colors[steps[i, j] + 1])
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [f"step {d}" for d in range(W)] + [f"rank {r}" for r in range(W)]
    plt.close(fig)


def test_tile_steps_rejects_a_mismatched_plan():
    layout, _ = _plan(P.causal(), "contiguous")
    other = distributed_plan(P.causal().block_structure(2 * S, B), shard_plan(2 * S, W, B))
    with pytest.raises(ValueError, match="disagree"):
        distributed_tile_steps(layout, other)


@pytest.mark.parametrize("pattern,sharding", CASES)
def test_step_regions_are_the_pairs_of_runs(pattern, sharding):
    layout, plan = _plan(pattern, sharding)
    runs = len(plan.sharding.pieces[0])
    for d in range(W):
        regions = wb.viz.ring.ring_step_regions(plan, d)
        assert len(regions) == W * runs * runs
        for g in regions:
            (q0, q1), (k0, k1) = g.q_blocks, g.k_blocks
            assert g.kv_rank == (g.rank - d) % W
            assert g.tiles == int(layout.active[:, q0:q1, k0:k1].sum())
    fig, (a, b) = plt.subplots(1, 2)
    wb.viz.plot_ring_schedule(plan, ax=a, step=1)
    wb.viz.plot_ring_step(layout, plan, 1, ax=b)
    solid = [p for p in b.patches if p.get_edgecolor()[3] > 0 and p.get_linestyle() == "-"]
    assert len(solid) == sum(g.computed for g in wb.viz.ring.ring_step_regions(plan, 1))
    plt.close(fig)
