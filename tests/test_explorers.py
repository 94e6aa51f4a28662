"""Explorers without a browser: parameters -> view -> figure, bad values, and the widget layer."""

from __future__ import annotations

import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from workbench import patterns as P  # noqa: E402
from workbench.sharding import distributed_plan, shard_plan  # noqa: E402
from workbench.viz import plot_ring_schedule, plot_ring_step  # noqa: E402
from workbench.viz.explorers import (  # noqa: E402
    CurveParams,
    ExplorerState,
    PatternParams,
    RingParams,
    advance,
    curve_view,
    draw_curve_view,
    draw_pattern_view,
    draw_ring_view,
    pattern_view,
    ring_view,
)
from workbench.viz.explorers.core import parse_int_list  # noqa: E402
from workbench.viz.explorers.pattern import parameters_used  # noqa: E402
from workbench.viz.heatmaps import head_layout  # noqa: E402
from workbench.viz.ring import distributed_tile_steps, ring_step_regions  # noqa: E402


def _reduced_over_tiles(mask: np.ndarray, block: int) -> np.ndarray:
    """0 empty, 1 partial, 2 full tiles of a token mask (the block view, from scratch)."""
    s = mask.shape[0]
    n = -(-s // block)
    grid = np.zeros((n, n), dtype=np.int64)
    for i in range(n):
        for j in range(n):
            tile = mask[i * block : (i + 1) * block, j * block : (j + 1) * block]
            grid[i, j] = 2 if tile.all() else int(tile.any())
    return grid


# ----------------------------------------------------------------------------- pattern explorer
@pytest.mark.parametrize("family", list(P.FAMILIES))
def test_pattern_view_panels_agree_with_the_pattern(family):
    params = PatternParams(family=family, seq_len=200, block_size=24, causal=family == "local")
    view = pattern_view(params)
    h = params.head if view.pattern.num_heads > 1 else 0
    assert np.array_equal(view.token_mask, view.pattern.token_mask(200)[h].numpy())
    assert np.array_equal(view.block_grid, _reduced_over_tiles(view.token_mask, 24))
    r = view.readout
    assert r.computed_density == pytest.approx(view.layout.stats().density)
    assert r.computed_flops / r.dense_flops == pytest.approx(r.computed_density)
    assert r.layout_bytes == 2 * view.layout.active.numel()
    assert r.active_tiles == int((view.block_grid > 0).sum())


def test_changing_the_window_changes_the_layout_and_the_density():
    narrow = pattern_view(PatternParams(window=16))
    wide = pattern_view(PatternParams(window=64))
    assert not np.array_equal(narrow.block_grid, wide.block_grid)
    assert wide.readout.computed_density > narrow.readout.computed_density
    assert wide.readout.useful_density > narrow.readout.useful_density


def test_dilation_ordering_makes_a_dilated_head_dense():
    # head 3 is in the (128, 4) group at offset 3: 32 kept tokens per segment = one tile of 32
    base = PatternParams(family="dilated", head=3)
    natural = pattern_view(base).readout
    ordered = pattern_view(PatternParams(family="dilated", head=3, ordering="dilation")).readout
    assert ordered.head_useful_density == pytest.approx(natural.head_useful_density)
    assert ordered.head_computed_density == pytest.approx(ordered.head_useful_density)
    assert natural.head_computed_density > 3 * ordered.head_computed_density


def test_the_prefix_and_causal_controls_set_the_new_families():
    assert pattern_view(PatternParams(family="prefix_lm", prefix=40)).pattern == P.prefix_lm(40)
    assert "prefix" in parameters_used("prefix_lm") and "prefix" not in parameters_used("local")
    docs = pattern_view(PatternParams(family="documents", seq_len=200, causal=True)).pattern
    assert docs == P.family("documents").pattern(200) and docs.causal


def test_parameters_used_follow_the_family():
    assert "window" in parameters_used("local") and "window" not in parameters_used("dilated")
    assert "segments" in parameters_used("local", "dilation")
    with pytest.raises(ValueError, match="unknown family"):
        parameters_used("diagonal")


@pytest.mark.parametrize("bad, words", [
    ({"window": 300}, "window=300"),
    ({"window": 0}, "window=0"),
    ({"block_size": 0}, "block_size=0"),
    ({"block_size": -8}, "block_size=-8"),
    ({"seq_len": 5000}, "seq_len=5000"),
    ({"family": "dilated", "segments": "64, 128", "dilations": "1, 200"}, "dilation rate 200"),
    ({"family": "dilated", "segments": "64, x"}, "segments must be whole numbers"),
    ({"family": "dilated", "segments": "", "dilations": "1"}, "segments needs at least one"),
    ({"head": 4}, "head=4"),
    ({"family": "global_local", "num_global": 256}, "num_global=256"),
    ({"family": "random", "random_density": 0.0}, "random_density"),
    ({"family": "prefix_lm", "prefix": 300}, "prefix=300"),
    ({"family": "spiral"}, "unknown family"),
])
def test_bad_pattern_values_give_a_message_and_keep_the_last_good_view(bad, words):
    def compute(values):
        return pattern_view(PatternParams.from_values(values))

    good = advance(ExplorerState(), compute, {"window": 24})
    assert good.ok and good.view.params.window == 24
    refused = advance(good, compute, {"window": 24, **bad})
    assert not refused.ok
    assert words in refused.message
    assert refused.view is good.view
    again = advance(refused, compute, {"window": 32})
    assert again.ok and again.view.params.window == 32


def test_parse_int_list():
    assert parse_int_list("segments", " 64, 128 ") == (64, 128)
    assert parse_int_list("segments", [2, 3]) == (2, 3)
    with pytest.raises(ValueError, match="every entry of dilations"):
        parse_int_list("dilations", "1, 0")


def test_draw_pattern_view_redraws_the_same_axes():
    fig = plt.figure(figsize=(8, 4))
    draw_pattern_view(pattern_view(PatternParams(window=16)), fig)
    axes = list(fig.axes)
    fig.canvas.draw()
    before = np.asarray(fig.canvas.buffer_rgba()).copy()
    draw_pattern_view(pattern_view(PatternParams(window=64)), fig)
    fig.canvas.draw()
    assert fig.axes == axes
    assert not np.array_equal(before, np.asarray(fig.canvas.buffer_rgba()))
    plt.close(fig)


# ----------------------------------------------------------------------------- curve explorer
@pytest.mark.parametrize("curve", ["raster", "morton", "hilbert", "gilbert"])
@pytest.mark.parametrize("shape", [(8, 8), (6, 10), (1, 7), (13, 5)])
def test_curve_path_visits_every_cell_once(curve, shape):
    view = curve_view(CurveParams(rows=shape[0], cols=shape[1], curve=curve, block=3))
    flat = view.path[:, 0] * shape[1] + view.path[:, 1]
    assert np.array_equal(np.sort(flat), np.arange(shape[0] * shape[1]))
    counts = np.bincount(view.block_ids.ravel())
    assert counts[:-1].tolist() == [3] * (len(counts) - 1) and 1 <= counts[-1] <= 3


def test_curve_readout_numbers():
    hilbert = curve_view(CurveParams(rows=16, cols=16, curve="hilbert", block=16))
    assert hilbert.jumps == 0 and hilbert.longest_step == 1
    assert hilbert.block_box == (4.0, 4.0)  # aligned 4 x 4 squares
    assert hilbert.raster_block_box == (1.0, 16.0)  # one row
    assert curve_view(CurveParams(rows=8, cols=8, curve="morton")).jumps > 0


@pytest.mark.parametrize("bad, words", [
    ({"block": 100}, "block=100"), ({"rows": 0}, "rows=0"), ({"cols": 65}, "cols=65"),
    ({"curve": "peano"}, "curve must be one of"),
])
def test_bad_curve_values_keep_the_last_good_view(bad, words):
    good = advance(ExplorerState(), curve_view, CurveParams())
    refused = advance(good, curve_view, CurveParams(**bad))
    assert words in refused.message and refused.view is good.view


def test_draw_curve_view():
    fig = plt.figure(figsize=(8, 4))
    draw_curve_view(curve_view(CurveParams(rows=6, cols=10, curve="gilbert")), fig)
    assert len(fig.axes) == 2 and "gilbert" in fig.axes[0].get_title()
    plt.close(fig)


# ----------------------------------------------------------------------------- ring stepper
RING = RingParams(PatternParams(family="global_local", causal=True, seq_len=300, block_size=16,
                                window=40), ranks=5)


@pytest.mark.parametrize("step", range(5))
def test_ring_step_highlights_exactly_the_computing_ranks(step):
    view = ring_view(RingParams(RING.pattern, ranks=5, step=step))
    assert [r.computed for r in view.regions] == view.plan.computed[:, step].tolist()
    assert [r.kv_rank for r in view.regions] == [(p - step) % 5 for p in range(5)]
    step_tiles = distributed_tile_steps(view.layout, view.plan) == step
    assert int(step_tiles.sum()) == sum(r.tiles for r in view.regions)  # one head


def test_every_active_tile_is_computed_at_exactly_one_step():
    layout = P.dilated([64, 128], [1, 4], 4).block_structure(256, 16)
    plan = distributed_plan(layout, shard_plan(256, 4, 16))
    per_step = torch.stack([distributed_tile_steps(layout, plan) == t for t in range(4)])
    assert torch.equal(per_step.sum(0), head_layout(layout, None).active[0].to(torch.int64))
    head2 = torch.stack([distributed_tile_steps(layout, plan, head=2) == t for t in range(4)])
    assert torch.equal(head2.sum(0), layout.active[2].to(torch.int64))


@pytest.mark.parametrize("ranks, step, words", [
    (50, 0, "ranks=50"), (4, 4, "step=4"), (0, 0, "ranks=0"),
])
def test_bad_ring_values_keep_the_last_good_view(ranks, step, words):
    good = advance(ExplorerState(), ring_view, RING)
    refused = advance(good, ring_view, RingParams(RING.pattern, ranks=ranks, step=step))
    assert words in refused.message and refused.view is good.view


def test_ring_drawings():
    layout = ring_view(RING).layout
    plan = distributed_plan(layout, shard_plan(300, 5, 16))
    fig, (a, b) = plt.subplots(1, 2)
    plot_ring_schedule(plan, step=1, ax=a)
    assert f"{plan.skipped} of 25" in a.get_title()
    plot_ring_step(layout, plan, 1, ax=b)
    outlines = [p for p in b.patches if p.get_edgecolor()[3] > 0]
    assert len(outlines) == 5  # one per rank
    solid = [p for p in outlines if p.get_linestyle() == "-"]
    assert len(solid) == int(plan.computed[:, 1].sum())
    with pytest.raises(ValueError, match="step=5"):
        ring_step_regions(plan, 5)
    fig2 = plt.figure()
    draw_ring_view(ring_view(RingParams(RING.pattern, ranks=5, step=2)), fig2)
    assert "step 2" in fig2.axes[1].get_title()
    plt.close("all")


# ----------------------------------------------------------------------------- widget layer
def test_importing_workbench_imports_no_widget_library():
    code = "import sys, workbench; print('ipywidgets' in sys.modules or 'ipympl' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _pixels(explorer) -> np.ndarray:
    for _ in range(3):  # constrained layout settles over a couple of draws
        explorer.figure.canvas.draw()
    return np.asarray(explorer.figure.canvas.buffer_rgba()).copy()


def test_pattern_explorer_widget_updates_in_place():
    pytest.importorskip("ipywidgets")
    pytest.importorskip("ipympl")
    import workbench as wb

    ex = wb.viz.pattern_explorer(seq_len=128, block_size=16, window=8)
    figure, readout, pixels = ex.figure, ex.readout.value, _pixels(ex)
    assert "density" in readout and ex.message.value == ""
    ex.controls["window"].value = 32
    assert ex.figure is figure and ex.readout.value != readout
    assert not np.array_equal(_pixels(ex), pixels)
    good_readout, good_image = ex.readout.value, ex.figure.axes[0].images[0]
    ex.controls["block_size"].value = 0
    assert "block_size=0" in ex.message.value
    assert ex.readout.value == good_readout
    assert list(ex.figure.axes[0].images) == [good_image]  # not redrawn: the last good picture
    ex.controls["block_size"].value = 32
    assert ex.message.value == ""
    ex.set(family="dilated", num_heads=2)
    assert ex.controls["window"].disabled and not ex.controls["segments"].disabled
    assert ex.controls["head"].max == 1
    assert "application/vnd.jupyter.widget-view+json" in ex._repr_mimebundle_()


def test_curve_and_ring_explorer_widgets():
    pytest.importorskip("ipywidgets")
    pytest.importorskip("ipympl")
    import workbench as wb

    curve = wb.viz.curve_explorer(rows=6, cols=10)
    assert "60 cells" in curve.readout.value
    curve.controls["block"].value = 61
    assert "block=61" in curve.message.value
    ring = wb.viz.ring_explorer(ranks=4, family="dilated", num_heads=2, segments=(32, 64))
    assert ring.state.view.layout.num_heads == 2  # fields without a control keep their value
    ring.controls["step"].value = 3
    assert "<b>step 3</b>" in ring.readout.value
    ring.controls["ranks"].value = 2
    assert ring.controls["step"].max == 1 and ring.controls["step"].value == 1
    assert "<b>step 1</b>" in ring.readout.value and ring.message.value == ""
