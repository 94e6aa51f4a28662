"""Block lists in one Triton kernel: a program per row of a tile grid counts the row's selected
columns, then writes them, and the others after them, each in increasing order, reading the
row twice and nothing else (imported on first use, so that ``TRITON_INTERPRET`` is read when
the kernel is defined)."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

_BLOCK = 1024  # columns per step of a program


@triton.jit
def _rows_kernel(SEL, COUNT, OUT, rows, nk, width, s_h, s_r, s_c, BLOCK: tl.constexpr):
    """Row ``program_id(0)`` of head ``program_id(1)``: its count, and its column list cut to
    ``width`` (a column's place: its rank among the selected, or the count plus its rank
    among the others)."""
    r = tl.program_id(0)
    h = tl.program_id(1)
    row = SEL + h.to(tl.int64) * s_h + r.to(tl.int64) * s_r
    counts = tl.zeros([BLOCK], dtype=tl.int32)
    for c0 in range(0, nk, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        counts += tl.load(row + c.to(tl.int64) * s_c, mask=c < nk, other=0).to(tl.int32)
    n = tl.sum(counts, axis=0)
    at = h.to(tl.int64) * rows + r
    out = OUT + at * width
    before = n - n  # selected columns left of the step (an int32 scalar, carried)
    for c0 in range(0, nk, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        x = tl.load(row + c.to(tl.int64) * s_c, mask=c < nk, other=0).to(tl.int32)
        upto = before + tl.cumsum(x, axis=0)  # selected up to c
        place = tl.where(x != 0, upto - 1, n + c - upto)
        tl.store(out + place, c, mask=(c < nk) & (place < width))
        before += tl.sum(x, axis=0)
    tl.store(COUNT + at, n)


def row_lists(sel: Tensor, count: Tensor, out: Tensor) -> None:
    """Fill ``count [H, R]`` and ``out [H, R, width]`` (contiguous int32) from the bool grid
    ``sel [H, R, C]`` (any strides): each row's count, and its selected columns then the
    others, each in increasing order, cut to ``width``."""
    heads, rows, nk = sel.shape
    grid = (rows, heads)
    _rows_kernel[grid](sel, count, out, rows, nk, out.shape[-1], *sel.stride(), BLOCK=_BLOCK)
