"""Block layouts as tile lists: per-row sorted block indices and FlexAttention's ``BlockMask``.

Tile-list kernels read a layout as, per (head, query block), the count and indices of its key
blocks. :func:`block_mask_from_layout` is the one conversion of an exact
:class:`~workbench.layout.BlockLayout` into a ``BlockMask`` (full tiles become full blocks,
partial ones partial blocks); the ``S x S`` grid is never evaluated.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .layout import BlockLayout

__all__ = ["SORT_CHUNK", "block_mask_from_layout", "empty_lists", "sorted_block_indices"]

ROW_KERNEL = True
"""On CUDA, where Triton is installed, grids without a visit order are listed by one pass of a
Triton kernel (:mod:`workbench._row_lists_kernel`, a program per few rows); False, or
elsewhere: by PyTorch's chunked passes."""

SORT_CHUNK = {"cpu": 1 << 20, "cuda": 1 << 26}
"""Tiles placed per step, by device type: on a CPU small steps keep the temporaries in cache;
on a GPU large ones keep the number of kernel launches down (others use the GPU's)."""


def sorted_block_indices(sel: Tensor, rank: Tensor | None = None, chunk: int | None = None,
                         width: int | None = None, out: tuple[Tensor, Tensor] | None = None,
                         selected: bool | None = None) -> tuple[Tensor, Tensor]:
    """(count ``[H, nq]``, column indices ``[H, nq, width]`` with selected ones first), int32.

    Selected columns come in increasing order (or by ``rank``, int64 ``[H, nq, nk]``: each
    tile's place in a visit order), then the others in increasing order. ``width`` (default
    ``nk``, at least every row's count) keeps a row's first columns only: enough for a reader
    that stops at the count. Rows go ``chunk`` tiles at a time (default :data:`SORT_CHUNK` of
    the device), so the int64 temporaries stay small whatever the length (or, with
    :data:`ROW_KERNEL`, one Triton pass). ``out``: the
    (count, indices) tensors to fill and return (:func:`empty_lists`), allocated by the caller
    (before any temporary, they take no place among the temporaries' freed memory); their
    last size is the width. ``selected``: whether ``sel`` has a selected tile, where the caller
    knows (``False`` skips the sort); ``None`` asks on a CPU and assumes so on a GPU, where
    asking would wait for it.

    Raises:
        ValueError: a ``width`` outside ``[0, nk]``, or shorter than a row's count (checked
            after the sort: one host-device sync); an ``out`` that is not int32 tensors of
            these shapes on ``sel``'s device, or of another width than ``width``.
    """
    if chunk is None:
        chunk = SORT_CHUNK.get(sel.device.type, SORT_CHUNK["cuda"])
    nk = sel.shape[-1]
    if out is not None:
        width = _check_out(out, sel, width)
    width = nk if width is None else width
    if isinstance(width, bool) or not isinstance(width, int) or not 0 <= width <= nk:
        raise ValueError(f"width must be an int in [0, {nk}] (the columns), got {width!r}")
    count, out = out if out is not None else empty_lists(sel.shape[:-1], width, sel.device)
    if selected is None and sel.device.type == "cpu":
        selected = bool(sel.any())
    if selected is False:
        cols = torch.arange(width, device=sel.device, dtype=torch.int32)
        return count.zero_(), out.copy_(cols.expand_as(out))
    by_rows = ROW_KERNEL and rank is None and sel.is_cuda and sel.dim() == 3
    if by_rows and (kernel := _row_kernel()) is not None:
        kernel(sel, count, out)
    else:
        _sort_steps(sel, rank, chunk, count, out)
    longest = int(count.max()) if width < nk and count.numel() else 0
    if longest > width:
        raise ValueError(f"width={width} would cut rows of {longest} selected columns: give at "
                         "least the longest row's count")
    return count, out


def _row_kernel() -> Callable[[Tensor, Tensor, Tensor], None] | None:
    """:func:`workbench._row_lists_kernel.row_lists`, or None where Triton is not installed."""
    try:
        from ._row_lists_kernel import row_lists
    except ModuleNotFoundError as err:
        if err.name != "triton":
            raise
        return None
    return row_lists


def _sort_steps(sel: Tensor, rank: Tensor | None, chunk: int, count: Tensor, out: Tensor
                ) -> None:
    """:func:`sorted_block_indices`'s lists written into ``count`` and ``out`` by PyTorch, rows
    of every head ``chunk`` tiles at a time."""
    nk, width = sel.shape[-1], out.shape[-1]
    cols = torch.arange(nk, device=sel.device, dtype=torch.int32)
    flat, out_rows, counts = sel.reshape(-1, nk), out.view(-1, width), count.view(-1)
    ranks = None if rank is None else rank.reshape(flat.shape)
    step = max(1, chunk // max(1, nk))  # rows (of every head) per step
    rows = min(step, flat.shape[0])
    # one step's places, in two buffers used by every step (fresh temporaries would cost a
    # CPU its page faults each step); cut rows are placed whole in a third, then their first
    # columns copied
    upto_buf, other = (torch.empty(rows if ranks is None else 0, nk, dtype=torch.int32,
                                   device=sel.device) for _ in range(2))
    place = torch.empty_like(upto_buf, dtype=torch.int64)  # what scatter_ takes
    whole = (None if width == nk or ranks is not None else
             torch.empty(rows, nk, dtype=torch.int32, device=sel.device))
    for r0 in range(0, flat.shape[0], step):
        part = flat[r0:r0 + step]
        if ranks is None:
            m = len(part)
            upto = torch.cumsum(part, -1, dtype=torch.int32, out=upto_buf[:m])  # selected <= c
            n = upto[:, -1:].clone()
            # a selected column goes to its rank among the selected, another after them all
            others = torch.sub(cols, upto, out=other[:m]).add_(n)
            at = place[:m].copy_(torch.where(part, upto.sub_(1), others, out=upto))
            dest = out_rows[r0:r0 + step] if whole is None else whole[:m]
            dest.scatter_(-1, at, cols.expand_as(at))
            if whole is not None:
                out_rows[r0:r0 + step] = dest[:, :width]
            counts[r0:r0 + step] = n[:, 0]
        else:
            order = torch.argsort(
                torch.where(part, ranks[r0:r0 + step], torch.iinfo(torch.int64).max), dim=-1)
            out_rows[r0:r0 + step] = order[:, :width]
            counts[r0:r0 + step] = part.sum(-1, dtype=torch.int32)


def _check_out(out: object, sel: Tensor, width: int | None) -> int:
    """The width of ``out``, :func:`sorted_block_indices`'s (count, indices) for ``sel``."""
    rows = tuple(sel.shape[:-1])

    def fits(x: object, dims: int) -> bool:
        return (isinstance(x, Tensor) and x.dtype == torch.int32 and x.device == sel.device
                and x.dim() == dims and tuple(x.shape[:len(rows)]) == rows and x.is_contiguous())

    if not (isinstance(out, tuple) and len(out) == 2 and fits(out[0], len(rows))
            and fits(out[1], len(rows) + 1)):
        got = [_described(x) for x in out] if isinstance(out, tuple) else _described(out)
        raise ValueError(f"out must be (count, indices): contiguous int32 tensors of shapes "
                         f"{list(rows)} and {list(rows)} + [width] on {sel.device}, got {got}")
    if width is not None and width != out[1].shape[-1]:
        raise ValueError(f"width={width!r} differs from out's width {out[1].shape[-1]}")
    return out[1].shape[-1]


def _described(x: object) -> str:
    """A tensor's shape, dtype and device, or another object's type."""
    if isinstance(x, Tensor):
        return f"{list(x.shape)} {x.dtype} on {x.device}"
    return type(x).__name__


def empty_lists(rows: tuple[int, ...], width: int, device: torch.device
                ) -> tuple[Tensor, Tensor]:
    """Uninitialized int32 (count ``rows``, indices ``[*rows, width]``) for
    :func:`sorted_block_indices`'s ``out``."""
    return (torch.empty(rows, dtype=torch.int32, device=device),
            torch.empty(*rows, width, dtype=torch.int32, device=device))


def _list_extents(layout: BlockLayout) -> tuple[int, int, bool, bool]:
    """(longest row, longest column of active tiles, at least 1; whether any tile is partial,
    whether any is full), read in one host-device sync; no temporary of the grid's size
    (ragged last tiles count as partial)."""
    b, active = layout.block_size, layout.active
    nq, nk = active.shape[1] - bool(layout.q_len % b), active.shape[2] - bool(layout.k_len % b)
    n_active, n_full = active.sum(), layout.full[:, :nq, :nk].sum()
    row, col = (active.sum(d).amax().clamp(min=1) for d in (-1, -2))
    rows, cols, partial, full = torch.stack([row, col, n_active > n_full, n_full > 0]).tolist()
    return rows, cols, bool(partial), bool(full)


def block_mask_from_layout(layout: BlockLayout, allowed: Callable[[Tensor, Tensor, Tensor], Tensor],
                           *, q_offset: int | Tensor = 0, k_offset: int | Tensor = 0,
                           rank: Tensor | None = None, backward: bool = True,
                           narrow: bool = False):
    """A FlexAttention ``BlockMask`` with exactly ``layout``'s tiles, on ``layout``'s device.

    Args:
        layout: the exact tiles; its ``block_size`` is the mask's ``BLOCK_SIZE``, its head
            count the mask's (1 broadcasts over every head).
        allowed: the token predicate ``allowed(h, q, k)`` over absolute positions (a
            :meth:`~workbench.patterns.Pattern.predicate`), with its tensors on the layout's
            device; it decides the pairs of partial tiles and is only ever asked about real
            positions (``q_offset <= q < q_offset + q_len``, likewise ``k``).
        q_offset, k_offset: absolute position of the first query and key (a ring's slice):
            ints, or int64 0-dim tensors on the layout's device (kernel inputs, so masks that
            differ only in them share one compilation).
        rank: int64 ``[H, nq, nk]`` place of every tile in a visit order
            (:func:`workbench.orderings.visit_rank`); ``None``: increasing key block.
        backward: also build the query-major lists only the backward pass reads.
        narrow: cut the key-major lists to the longest row of active tiles and the query-major
            ones to the longest column (one host-device sync): enough for FlexAttention's CUDA
            kernels, which stop at a row's count; ``to_dense`` and the CPU kernel need every
            column.

    Returns:
        ``BlockMask`` with ``seq_lengths=(q_len, k_len)`` whose ``mask_mod`` is False on padding
        (ragged last tiles are listed as partial).

    NOTE: both block lists come from :func:`sorted_block_indices`, not ``from_kv_blocks``,
    whose dense ``[H, nk, nq]`` copy and int64 sort dominate a mask's memory at long lengths.
    """
    from torch.nn.attention.flex_attention import BlockMask

    b, q_len, k_len = layout.block_size, layout.q_len, layout.k_len
    heads, nq, nk = layout.active.shape
    # the full and partial lists of one direction keep one width, as the kernels read both by
    # the strides of one; the same sync tells which grids are empty (those are not sorted)
    rows, cols, has_partial, has_full = (_list_extents(layout) if narrow else
                                         (nk, nq, None, None))
    # every list is allocated before the temporaries that fill it: lists placed among the
    # temporaries' freed memory would keep it reserved
    dev = layout.active.device
    kv = [empty_lists((heads, nq), rows, dev) for _ in range(2)]
    qm = [empty_lists((heads, nk), cols, dev) for _ in range(2 if backward else 0)]
    full = layout.full
    if q_len % b or k_len % b:  # padded tiles must go through the mask
        full = full.clone()
        if q_len % b:
            full[:, -1, :] = False
        if k_len % b:
            full[:, :, -1] = False
    partial = layout.active ^ full  # full tiles are active ones

    def lists(tiles: Tensor, into: tuple[Tensor, Tensor], selected: bool | None,
              rank: Tensor | None = None) -> list[Tensor]:
        """With a batch axis of 1: every batch element shares them."""
        return [x[None] for x in sorted_block_indices(tiles, rank, out=into, selected=selected)]

    kv_n, kv_i = lists(partial, kv[0], has_partial, rank)
    f_n, f_i = lists(full, kv[1], has_full, rank)
    # query-major lists: every query block of a key block, in increasing order (as
    # FlexAttention's own transpose gives them)
    q_n, q_i, fq_n, fq_i = ([*lists(partial.transpose(1, 2), qm[0], has_partial),
                             *lists(full.transpose(1, 2), qm[1], has_full)]
                            if backward else [None] * 4)

    def mask_mod(bi, h, qi, ki):
        q_in = torch.clamp(qi, max=q_len - 1) + q_offset  # padding asks about a real position
        k_in = torch.clamp(ki, max=k_len - 1) + k_offset
        return (qi < q_len) & (ki < k_len) & allowed(h, q_in, k_in)

    return BlockMask(
        seq_lengths=(q_len, k_len), kv_num_blocks=kv_n, kv_indices=kv_i,
        full_kv_num_blocks=f_n, full_kv_indices=f_i, q_num_blocks=q_n, q_indices=q_i,
        full_q_num_blocks=fq_n, full_q_indices=fq_i, BLOCK_SIZE=(b, b), mask_mod=mask_mod,
    )
