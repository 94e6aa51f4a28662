"""Block lists in one Triton kernel: a program per few rows of a tile grid counts the rows'
selected columns, then writes them, and the others after them, each in increasing order,
reading the rows twice and nothing else (imported on first use, so that ``TRITON_INTERPRET``
is read when the kernel is defined)."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rows_kernel(SEL, COUNT, OUT, rows, nk, width, s_h, s_r, s_c, ROWS: tl.constexpr,
                 BLOCK: tl.constexpr):
    """Rows ``program_id(0) * ROWS`` on of head ``program_id(1)``: their counts, and their
    column lists cut to ``width`` (a column's place: its rank among the selected, or the count
    plus its rank among the others), ``BLOCK`` columns a step."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    h = tl.program_id(1)
    real = r < rows
    base = SEL + h.to(tl.int64) * s_h + r.to(tl.int64)[:, None] * s_r
    n = tl.zeros([ROWS], dtype=tl.int32)
    for c0 in range(0, nk, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        inside = real[:, None] & (c < nk)[None, :]
        x = tl.load(base + c.to(tl.int64)[None, :] * s_c, mask=inside, other=0)
        n += tl.sum(x.to(tl.int32), axis=1)
    at = h.to(tl.int64) * rows + r
    out = OUT + at[:, None] * width
    before = tl.zeros([ROWS], dtype=tl.int32)  # selected columns left of the step
    for c0 in range(0, nk, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        inside = real[:, None] & (c < nk)[None, :]
        x = tl.load(base + c.to(tl.int64)[None, :] * s_c, mask=inside, other=0).to(tl.int32)
        upto = before[:, None] + tl.cumsum(x, axis=1)  # selected up to c
        place = tl.where(x != 0, upto - 1, n[:, None] + c[None, :] - upto)
        tl.store(out + place, c[None, :] + 0 * place, mask=inside & (place < width))
        before += tl.sum(x, axis=1)
    tl.store(COUNT + at, n, mask=real)


def row_lists(sel: Tensor, count: Tensor, out: Tensor) -> None:
    """Fill ``count [H, R]`` and ``out [H, R, width]`` (contiguous int32) from the bool grid
    ``sel [H, R, C]`` (any strides): each row's count, and its selected columns then the
    others, each in increasing order, cut to ``width``."""
    heads, rows, nk = sel.shape
    s_h, s_r, s_c = sel.stride()
    # a step reads contiguous bytes along the grid's memory order: along a row, or (for a
    # transposed grid) across rows
    rows_per, block = (64, 64) if s_c > s_r else (1, 1024)
    grid = (triton.cdiv(rows, rows_per), heads)
    _rows_kernel[grid](sel, count, out, rows, nk, out.shape[-1], s_h, s_r, s_c, ROWS=rows_per,
                       BLOCK=block)
