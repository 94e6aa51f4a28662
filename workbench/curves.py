"""Space-filling curves over 2-D and 3-D grids: Hilbert, Morton (Z-order), gilbert and raster.

The ``*_encode``/``*_decode`` pairs work on a ``2**bits`` square or cube (coordinates a trailing
axis ``(c0, c1[, c2])``, ``c0`` the slowest); grid functions take any shape, ranking its cells
along the curve of the enclosing cube (it may jump; ``"gilbert"``, 2-D, never does).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .layout import MAX_POSITION

__all__ = ["CURVES", "curve_order", "grid_decode", "grid_encode", "hilbert_decode",
           "hilbert_encode", "inverse_permutation", "morton_decode", "morton_encode"]

CURVES = ("raster", "morton", "hilbert", "gilbert")
_MAX_BITS = 62


def _check_cube(dims: int, bits: int) -> None:
    if dims not in (2, 3):
        raise ValueError(f"curves are defined for 2-D and 3-D grids, got {dims} dimensions")
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 0:
        raise ValueError(f"bits must be a non-negative int, got {bits!r}")
    if dims * bits > _MAX_BITS:
        raise ValueError(f"dims * bits = {dims * bits} exceeds {_MAX_BITS}: index not int64-exact")


def _int64(x: Tensor, name: str) -> Tensor:
    x = torch.as_tensor(x)
    if x.is_floating_point() or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    return x.to(torch.int64)


def _in_range(x: Tensor, end: int | Tensor, message: str) -> Tensor:
    """``x``, else a ``ValueError(message)`` unless every entry is in ``[0, end)``."""
    if x.numel() and (bool((x < 0).any()) or bool((x >= end).any())):
        raise ValueError(message)
    return x


def _coords(coords: Tensor, bits: int) -> list[Tensor]:
    c = _int64(coords, "coords")
    _check_cube(c.shape[-1] if c.dim() else 0, bits)
    _in_range(c, 1 << bits, f"coords must lie in [0, {1 << bits}) for bits={bits}")
    return [c[..., i] for i in range(c.shape[-1])]


def _index(index: Tensor, dims: int, bits: int) -> Tensor:
    _check_cube(dims, bits)
    return _in_range(_int64(index, "index"), 1 << (dims * bits),
                     f"index must lie in [0, {1 << dims * bits}) for dims={dims}, bits={bits}")


def _interleave(xs: list[Tensor], bits: int) -> Tensor:
    """Index whose bit group ``j`` (from the top) holds bit ``j`` of each ``xs[i]``, xs[0] first."""
    n = len(xs)
    out = torch.zeros_like(xs[0])
    for b in range(bits - 1, -1, -1):
        for i, x in enumerate(xs):
            out |= ((x >> b) & 1) << (b * n + (n - 1 - i))
    return out


def _deinterleave(d: Tensor, dims: int, bits: int) -> list[Tensor]:
    xs = [torch.zeros_like(d) for _ in range(dims)]
    for b in range(bits):
        for i in range(dims):
            xs[i] |= ((d >> (b * dims + (dims - 1 - i))) & 1) << b
    return xs


def morton_encode(coords: Tensor, bits: int) -> Tensor:
    """Z-order index of integer ``coords`` ``[..., dims]`` in a ``2**bits`` square/cube: in each
    group of ``dims`` index bits, the bit of ``c0`` is the most significant."""
    return _interleave(_coords(coords, bits), bits)


def morton_decode(index: Tensor, dims: int, bits: int) -> Tensor:
    """Inverse of :func:`morton_encode`: int64 ``[..., dims]``."""
    return torch.stack(_deinterleave(_index(index, dims, bits), dims, bits), dim=-1)


def _invert_or_exchange(x: list[Tensor], i: int, q: int) -> None:
    """Skilling's per-level step on bit ``q`` of axis ``i``, in place (its own inverse): where
    axis ``i`` has the bit, axis 0's low bits are inverted, elsewhere axes 0 and ``i`` swap them."""
    p = q - 1
    hit = (x[i] & q) != 0
    t = (x[0] ^ x[i]) & p
    x0 = torch.where(hit, x[0] ^ p, x[0] ^ t)
    if i:
        x[i] = torch.where(hit, x[i], x[i] ^ t)
    x[0] = x0


def hilbert_encode(coords: Tensor, bits: int) -> Tensor:
    """Hilbert index of integer ``coords`` ``[..., dims]`` in a ``2**bits`` square/cube: John
    Skilling's curve (AIP Conf. Proc. 707, 2004), from the origin along ``c0`` first (in 2-D the
    textbook ``xy2d(n, x=c0, y=c1)``)."""
    x = _coords(coords, bits)
    n = len(x)
    for q in (1 << b for b in range(bits - 1, 0, -1)):
        for i in range(n):
            _invert_or_exchange(x, i, q)
    for i in range(1, n):
        x[i] = x[i] ^ x[i - 1]
    t = torch.zeros_like(x[0])
    for q in (1 << b for b in range(bits - 1, 0, -1)):
        t = torch.where((x[n - 1] & q) != 0, t ^ (q - 1), t)
    return _interleave([xi ^ t for xi in x], bits)


def hilbert_decode(index: Tensor, dims: int, bits: int) -> Tensor:
    """Inverse of :func:`hilbert_encode`: int64 coordinates ``[..., dims]``."""
    x = _deinterleave(_index(index, dims, bits), dims, bits)
    t = x[dims - 1] >> 1
    for i in range(dims - 1, 0, -1):
        x[i] = x[i] ^ x[i - 1]
    x[0] = x[0] ^ t
    for q in (1 << b for b in range(1, bits)):
        for i in range(dims - 1, -1, -1):
            _invert_or_exchange(x, i, q)
    return torch.stack(x, dim=-1)


# ------------------------------------------------------------------ grids of any size
def _check_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise TypeError(f"shape must be a tuple of 2 or 3 grid sizes, got {shape!r}")
    shape = tuple(shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"shape must be a 2-D or 3-D grid shape, got {shape!r}")
    for s in shape:
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"grid sizes must be positive ints, got shape {shape!r}")
    if math.prod(shape) > MAX_POSITION:
        raise ValueError(f"a grid of shape {shape!r} has more than {MAX_POSITION} cells, the most "
                         "int32 positions can index")
    return shape


def _check_curve(curve: str, name: str = "curve") -> str:
    """``curve`` if it is one of :data:`CURVES`, else a ``ValueError`` naming ``name``."""
    if curve not in CURVES:
        raise ValueError(f"{name} must be one of {CURVES}, got {curve!r}")
    return curve


def _sign(v: int) -> int:
    return (v > 0) - (v < 0)


def _gilbert_cells(height: int, width: int) -> list[int]:
    """Raster indices of a ``height x width`` grid along J. Červený's generalized Hilbert curve
    ("gilbert"), from ``(0, 0)`` along the long side; every step to an edge neighbour but at
    most one diagonal (long side odd, short side even)."""
    out: list[int] = []

    def fill(r: int, c: int, ar: int, ac: int, br: int, bc: int) -> None:
        # Fill the rectangle with corner (r, c), major side vector (ar, ac) along which the
        # curve travels, minor side vector (br, bc); both vectors are axis-aligned.
        major, minor = abs(ar + ac), abs(br + bc)
        (ur, uc), (vr, vc) = (_sign(ar), _sign(ac)), (_sign(br), _sign(bc))
        if minor == 1 or major == 1:  # a single line: walk it
            (sr, sc), steps = ((ur, uc), major) if minor == 1 else ((vr, vc), minor)
            for _ in range(steps):
                out.append(r * width + c)
                r, c = r + sr, c + sc
            return
        hr, hc, gr, gc = ar // 2, ac // 2, br // 2, bc // 2
        if 2 * major > 3 * minor:  # long and thin: two halves along the major side
            if abs(hr + hc) % 2 and major > 2:
                hr, hc = hr + ur, hc + uc  # keep the first half's length even
            fill(r, c, hr, hc, br, bc)
            fill(r + hr, c + hc, ar - hr, ac - hc, br, bc)
            return
        if abs(gr + gc) % 2 and minor > 2:
            gr, gc = gr + vr, gc + vc  # keep the first leg's length even
        fill(r, c, gr, gc, hr, hc)  # up the minor side,
        fill(r + gr, c + gc, ar, ac, br - gr, bc - gc)  # across the whole major side,
        fill(r + (ar - ur) + (gr - vr), c + (ac - uc) + (gc - vc),  # and back down
             -gr, -gc, -(ar - hr), -(ac - hc))

    if width >= height:
        fill(0, 0, 0, width, height, 0)
    else:
        fill(0, 0, height, 0, 0, width)
    return out


@functools.lru_cache(maxsize=32)
def _order(shape: tuple[int, ...], curve: str) -> Tensor:
    n = math.prod(shape)
    if curve == "raster":
        return torch.arange(n, dtype=torch.int64)
    if curve == "gilbert":
        if len(shape) != 2:
            raise ValueError(f"curve 'gilbert' is defined for 2-D grids only, got shape {shape}")
        return torch.tensor(_gilbert_cells(*shape), dtype=torch.int64)
    bits = max(1, math.ceil(math.log2(max(shape))))
    axes = [torch.arange(s, dtype=torch.int64) for s in shape]
    c = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape))
    key = hilbert_encode(c, bits) if curve == "hilbert" else morton_encode(c, bits)
    return torch.argsort(key)  # keys are distinct: the order is unique


def inverse_permutation(perm: Tensor) -> Tensor:
    """``inv`` with ``inv[perm[i]] = i``, so ``x[perm][inv] == x`` (int64)."""
    perm = torch.as_tensor(perm, dtype=torch.int64)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), dtype=torch.int64, device=perm.device)
    return inv


@functools.lru_cache(maxsize=32)
def _rank(shape: tuple[int, ...], curve: str) -> Tensor:
    return inverse_permutation(_order(shape, curve))


def curve_order(shape, curve: str = "hilbert") -> Tensor:
    """Row-major flat indices of the cells of grid ``shape`` in ``curve`` order (int64 ``[N]``):
    as a token permutation, new position ``i`` holds raster token ``order[i]``."""
    return _order(_check_shape(shape), _check_curve(curve)).clone()


def grid_encode(coords: Tensor, shape, curve: str = "hilbert") -> Tensor:
    """Curve index (rank among the grid's cells) of integer ``coords`` ``[..., len(shape)]``."""
    shape = _check_shape(shape)
    c = _int64(coords, "coords")
    if c.shape[-1:] != (len(shape),):
        raise ValueError(f"coords must end in an axis of {len(shape)}, got {tuple(c.shape)}")
    lim = torch.tensor(shape, dtype=torch.int64, device=c.device)
    _in_range(c, lim, f"coords must lie inside the grid {shape}")
    flat = torch.zeros(c.shape[:-1], dtype=torch.int64, device=c.device)
    for i, s in enumerate(shape):
        flat = flat * s + c[..., i]
    return _rank(shape, _check_curve(curve)).to(c.device)[flat]


def grid_decode(index: Tensor, shape, curve: str = "hilbert") -> Tensor:
    """Inverse of :func:`grid_encode`: int64 coordinates ``[..., len(shape)]``."""
    shape = _check_shape(shape)
    n = math.prod(shape)
    d = _in_range(_int64(index, "index"), n, f"index must lie in [0, {n}) for grid {shape}")
    flat = _order(shape, _check_curve(curve)).to(d.device)[d]
    return torch.stack(torch.unravel_index(flat, shape), dim=-1)
