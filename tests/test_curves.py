"""Hilbert, Morton and raster curves: bijections, inverses, adjacency, an independent check."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench import curves as C


def xy2d(n: int, x: int, y: int) -> int:
    """Textbook Hilbert index (Wikipedia "Hilbert curve", scalar loop), written independently."""
    d, s = 0, n // 2
    while s > 0:
        rx, ry = int(x & s > 0), int(y & s > 0)
        d += s * s * ((3 * rx) ^ ry)
        if ry == 0:
            if rx == 1:
                x, y = n - 1 - x, n - 1 - y
            x, y = y, x
        s //= 2
    return d


def morton_scalar(coords, bits):
    d = 0
    for b in range(bits - 1, -1, -1):
        for c in coords:
            d = (d << 1) | ((c >> b) & 1)
    return d


@pytest.mark.parametrize("dims,bits", [(2, 0), (2, 1), (2, 2), (2, 5), (3, 1), (3, 2), (3, 4)])
def test_cube_bijection_inverse_and_adjacency(dims, bits):
    n = 1 << (dims * bits)
    d = torch.arange(n)
    for enc, dec in ((C.hilbert_encode, C.hilbert_decode), (C.morton_encode, C.morton_decode)):
        c = dec(d, dims, bits)
        assert c.shape == (n, dims)
        assert int(c.min()) >= 0 and int(c.max()) < max(1, 1 << bits)
        assert torch.equal(enc(c, bits), d)  # inverse, hence bijection (n distinct cells)
        assert torch.unique(c, dim=0).shape[0] == n
    c = C.hilbert_decode(d, dims, bits)
    if n > 1:
        steps = (c[1:] - c[:-1]).abs().sum(-1)
        assert bool((steps == 1).all()), "consecutive Hilbert indices must be grid neighbours"
        assert c[0].tolist() == [0] * dims


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6])
def test_hilbert_2d_matches_textbook_curve(bits):
    """Same curve as Wikipedia's xy2d with x = c0, y = c1 (the convention stated in curves.py)."""
    n = 1 << bits
    c = torch.cartesian_prod(torch.arange(n), torch.arange(n))
    ours = C.hilbert_encode(c, bits)
    theirs = torch.tensor([xy2d(n, int(a), int(b)) for a, b in c])
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dims,bits", [(2, 3), (3, 3)])
def test_morton_matches_scalar_interleave(dims, bits):
    c = torch.randint(0, 1 << bits, (200, dims), generator=torch.Generator().manual_seed(0))
    expect = torch.tensor([morton_scalar(row, bits) for row in c.tolist()])
    assert torch.equal(C.morton_encode(c, bits), expect)


def test_hilbert_3d_is_self_similar():
    """The first eighth of a 3-D Hilbert curve fills one octant: a structural property that any
    correct 3-D Hilbert curve has, independent of the implementation."""
    for bits in (2, 3):
        c = C.hilbert_decode(torch.arange(1 << (3 * bits)), 3, bits)
        eighth = c[: 1 << (3 * (bits - 1))]
        half = 1 << (bits - 1)
        assert bool((eighth < half).all())


def test_large_bits_exact():
    bits = 20  # 60-bit 3-D indices, beyond float precision
    c = torch.tensor([[0, 0, 0], [2**20 - 1, 12345, 999_999], [7, 2**19, 3]])
    assert torch.equal(C.hilbert_decode(C.hilbert_encode(c, bits), 3, bits), c)
    assert torch.equal(C.morton_decode(C.morton_encode(c, bits), 3, bits), c)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 13), min_size=2, max_size=3), st.sampled_from(C.CURVES))
def test_grid_bijection_any_shape(shape, curve):
    if curve == "gilbert" and len(shape) == 3:
        with pytest.raises(ValueError, match="2-D"):
            C.curve_order(shape, curve)
        return
    order = C.curve_order(shape, curve)
    n = math.prod(shape)
    assert torch.equal(torch.sort(order).values, torch.arange(n))
    raster = torch.stack(torch.unravel_index(order, shape), dim=-1)
    assert torch.equal(C.grid_encode(raster, shape, curve), torch.arange(n))
    coords = C.grid_decode(torch.arange(n), shape, curve)
    assert torch.equal(C.grid_encode(coords, shape, curve), torch.arange(n))
    for i, s in enumerate(shape):
        assert int(coords[:, i].min()) >= 0 and int(coords[:, i].max()) < s


@pytest.mark.parametrize("shape", [(6, 5), (7, 3), (10, 16), (3, 5, 6)])
def test_non_power_of_two_rule(shape):
    """Rule: ranks of the grid's cells along the curve of the enclosing power-of-two cube."""
    bits = math.ceil(math.log2(max(shape)))
    for curve, enc in (("hilbert", C.hilbert_encode), ("morton", C.morton_encode)):
        coords = C.grid_decode(torch.arange(math.prod(shape)), shape, curve)
        cube = enc(coords, bits)
        assert bool((cube[1:] > cube[:-1]).all())


def test_grid_hilbert_adjacent_on_power_of_two_grids():
    for shape in [(8, 8), (16, 16), (4, 4, 4)]:
        c = C.grid_decode(torch.arange(math.prod(shape)), shape, "hilbert")
        assert bool(((c[1:] - c[:-1]).abs().sum(-1) == 1).all())
    # a non-square grid may jump where the curve leaves the grid; the rule is stated, not hidden
    c = C.grid_decode(torch.arange(48), (6, 8), "hilbert")
    assert bool(((c[1:] - c[:-1]).abs().sum(-1) >= 1).all())


@pytest.mark.parametrize("h", range(1, 26))
def test_gilbert_steps_to_neighbours_on_any_rectangle(h):
    for w in range(1, 26):
        c = C.grid_decode(torch.arange(h * w), (h, w), "gilbert")
        assert torch.equal(C.grid_encode(c, (h, w), "gilbert"), torch.arange(h * w))
        assert c[0].tolist() == [0, 0]
        d = (c[1:] - c[:-1]).abs()
        assert bool((d.amax(-1) == 1).all())  # never a jump
        diagonal = int((d.sum(-1) == 2).sum())
        long_, short = max(h, w), min(h, w)
        assert diagonal == 0 or (diagonal == 1 and long_ % 2 == 1 and short % 2 == 0), (h, w)


@pytest.mark.parametrize("n", [2, 4, 8, 32])
def test_gilbert_is_transposed_hilbert_on_power_of_two_squares(n):
    g = C.grid_decode(torch.arange(n * n), (n, n), "gilbert")
    h = C.grid_decode(torch.arange(n * n), (n, n), "hilbert")
    assert torch.equal(g, h.flip(-1))


def test_raster_is_row_major():
    assert torch.equal(C.curve_order((3, 4), "raster"), torch.arange(12))
    assert C.grid_decode(torch.tensor(5), (3, 4), "raster").tolist() == [1, 1]


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="curve"):
        C.curve_order((4, 4), "peano")
    with pytest.raises(ValueError, match="shape"):
        C.curve_order((4,), "hilbert")
    for not_a_shape in (16, "44"):
        with pytest.raises(TypeError, match="shape must be a tuple"):
            C.curve_order(not_a_shape, "hilbert")
    with pytest.raises(ValueError, match="coords"):
        C.hilbert_encode(torch.tensor([[4, 0]]), 2)
    with pytest.raises(ValueError, match="index"):
        C.hilbert_decode(torch.tensor([16]), 2, 2)
    with pytest.raises(ValueError, match="dimensions"):
        C.hilbert_encode(torch.tensor([[1, 2, 3, 4]]), 3)
    with pytest.raises(TypeError, match="integer"):
        C.morton_encode(torch.tensor([[0.5, 1.0]]), 2)
