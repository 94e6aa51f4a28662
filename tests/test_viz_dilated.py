"""The LongNet drawings pick heads as every other drawing does: a head-independent pattern
broadcasts, a head past a multi-head pattern's last is a ValueError (Agg backend: conftest sets
``MPLBACKEND``)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest

import workbench as wb

P = wb.patterns
S, B = 96, 16


@pytest.mark.parametrize("level, zoom", [("token", None), ("token", 40), ("block", None)])
def test_head_masks_refuse_a_head_the_pattern_lacks(level, zoom):
    _, axes = plt.subplots(1, 3)
    with pytest.raises(ValueError, match="head=2 is out of range"):
        wb.viz.plot_head_masks(P.dilated([32, 64], [1, 2], 2), S, B, axes, level=level, zoom=zoom)
    plt.close("all")


def test_zoomed_head_masks_draw_each_heads_pairs():
    pattern = P.dilated([32, 64], [1, 2], 2)
    _, axes = plt.subplots(1, 2)
    wb.viz.plot_head_masks(pattern, S, B, axes, zoom=40)
    masks = pattern.token_mask(S)[:, :40, :40].numpy()
    assert not np.array_equal(masks[0], masks[1])
    for ax, mask in zip(axes, masks):
        assert np.array_equal(ax.images[0].get_array(), mask)
    plt.close("all")


@pytest.mark.parametrize("pattern, head", [(P.local_window(8), 1),
                                           (P.dilated([32, 64], [1, 2], 2), 1)])
def test_natural_vs_ordered_gives_the_heads_useful_density(pattern, head):
    fig, nat, ordered = wb.viz.plot_natural_vs_ordered(pattern, S, B, head, 32, 2, 1)
    mask = pattern.token_mask(S)[min(head, pattern.num_heads - 1)]
    assert f"useful density {float(mask.double().mean()):.2%}" in fig._suptitle.get_text()
    assert nat.num_heads == ordered.num_heads == 1
    assert int(nat.active.sum()) > 0
    plt.close("all")
