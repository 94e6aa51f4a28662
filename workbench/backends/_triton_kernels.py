"""The Triton kernels behind :mod:`workbench.backends.triton_sparse` (imported on first use, so
that ``TRITON_INTERPRET`` is read when they are defined)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rows(X, head, off_b, off_h, start, limit, stride,
          HEAD_DIM: tl.constexpr, N: tl.constexpr, USE_TMA: tl.constexpr, CHECK: tl.constexpr):
    """Rows ``start .. start + N`` of head (off_b, off_h) as ``[N, HEAD_DIM]``: through the TMA
    descriptor ``X`` (rows past the end come back as zeros), or from the pointer ``X`` at the
    head's offset ``head`` (:func:`_head`) with row ``stride`` (zeros past ``limit`` when
    ``CHECK``)."""
    if USE_TMA:
        x = X.load([off_b, off_h, start, 0]).reshape(N, HEAD_DIM)
    else:
        rows = start + tl.arange(0, N)
        ptrs = X + head + rows[:, None].to(tl.int64) * stride + tl.arange(0, HEAD_DIM)[None, :]
        if CHECK:
            x = tl.load(ptrs, mask=rows[:, None] < limit, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _program(H, HL, N, BLOCK: tl.constexpr, TILE: tl.constexpr):
    """Where this program works: grid axis 0 walks ``TILE``-row tiles of the ``BLOCK``-row
    layout blocks (query blocks, or key blocks for the ``dk, dv`` kernel; ``N`` of them per
    head), axis 1 batch x head. Returns (batch x head, batch, head, layout block, first row of
    the tile, the block's line in the layout's lists)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    blk = pid // (BLOCK // TILE)
    first = blk * BLOCK + (pid % (BLOCK // TILE)) * TILE
    off_b = bh // H
    off_h = bh % H
    return bh, off_b, off_h, blk, first, ((off_h % HL) * N + blk).to(tl.int64)


@triton.jit
def _head(off_b, off_h, sb, sh):
    """Element offset of head (off_b, off_h) from strides ``sb, sh`` (unused through TMA)."""
    return off_b.to(tl.int64) * sb + off_h.to(tl.int64) * sh


@triton.jit
def _row_walk(acc, m_i, l_i, q, do, lse2, delta, K, V, k_head, v_head, off_b, off_h,
              row, qb, m0, F_N, F_I, P_N, P_I, P_START, BITS, skn, svn, NK, k_len, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr, GRAD: tl.constexpr):
    """A query tile's walk along its row of the layout: the full tiles unmasked, then the
    partial tiles through their bit masks, each layout tile as ``BLOCK / BLOCK_N`` key tiles.
    Each key tile updates the online softmax (``acc, m_i, l_i``), or with ``GRAD`` adds its
    share of the query gradient to ``acc`` (``do, lse2, delta``: this tile's output gradient and
    saved statistics; ``m_i, l_i`` pass through)."""
    SUB_N: tl.constexpr = BLOCK // BLOCK_N
    WORDS: tl.constexpr = BLOCK // 32
    for j in range(tl.load(F_N + row)):
        kb = tl.load(F_I + row * NK + j)
        for sub in tl.static_range(SUB_N):
            c0 = kb * BLOCK + sub * BLOCK_N
            k = _rows(K, k_head, off_b, off_h, c0, k_len, skn, HEAD_DIM, BLOCK_N, USE_TMA, False)
            v = _rows(V, v_head, off_b, off_h, c0, k_len, svn, HEAD_DIM, BLOCK_N, USE_TMA, False)
            if GRAD:
                acc = _dq_tile(acc, q, do, k, v, lse2, delta, None, qk_scale, False)
            else:
                acc, m_i, l_i = _tile(acc, m_i, l_i, q, k, v, None, qk_scale, False)

    start = tl.load(P_START + row).to(tl.int64)
    r = m0 - qb * BLOCK + tl.arange(0, BLOCK_M)  # query rows inside the layout tile
    for j in range(tl.load(P_N + row)):
        kb = tl.load(P_I + row * NK + j)
        tile_bits = BITS + (start + j) * (BLOCK * WORDS)
        for sub in tl.static_range(SUB_N):
            c0 = kb * BLOCK + sub * BLOCK_N
            k = _rows(K, k_head, off_b, off_h, c0, k_len, skn, HEAD_DIM, BLOCK_N, USE_TMA, True)
            v = _rows(V, v_head, off_b, off_h, c0, k_len, svn, HEAD_DIM, BLOCK_N, USE_TMA, True)
            ok = _allowed(tile_bits, r, sub * BLOCK_N, BLOCK_M, BLOCK_N, WORDS, False)
            if GRAD:
                acc = _dq_tile(acc, q, do, k, v, lse2, delta, ok, qk_scale, True)
            else:
                acc, m_i, l_i = _tile(acc, m_i, l_i, q, k, v, ok, qk_scale, True)
    return acc, m_i, l_i


@triton.jit
def _tile(acc, m_i, l_i, q, k, v, ok, qk_scale, MASKED: tl.constexpr):
    """One key tile of the online softmax (base 2): scores, running max ``m_i`` and denominator
    ``l_i``, accumulator ``acc``; ``ok`` (``MASKED``) says which pairs are allowed."""
    s = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_M, BLOCK_N]
    if MASKED:
        s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:  # a row with nothing allowed yet keeps m = -inf: shift by 0 instead
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _allowed(tile_bits, r, c0, M: tl.constexpr, N: tl.constexpr, WORDS: tl.constexpr,
             KEYS_FIRST: tl.constexpr):
    """Which pairs of a partial tile are allowed, from its bit mask (``[block, block / 32]``
    int32 words, bit ``c % 32`` of word ``c // 32`` of query row ``r``), for the ``M`` query rows
    ``r`` and the ``N`` key columns from ``c0`` inside the tile: ``[M, N]``, or ``[N, M]`` with
    ``KEYS_FIRST``. Each row's ``N / 32`` words are loaded once, as ``M``-vectors, and spread over
    their 32 columns in registers (loading a word per pair would move 32 times the bytes)."""
    lane = tl.arange(0, N)
    if N >= 32:
        if KEYS_FIRST:
            words = tl.zeros([N, M], dtype=tl.int32)
        else:
            words = tl.zeros([M, N], dtype=tl.int32)
        for j in tl.static_range(N // 32):
            w = tl.load(tile_bits + r * WORDS + c0 // 32 + j)
            if KEYS_FIRST:
                words = tl.where((lane // 32)[:, None] == j, w[None, :], words)
            else:
                words = tl.where((lane // 32)[None, :] == j, w[:, None], words)
    else:  # fewer than 32 columns: part of one word each
        if KEYS_FIRST:
            words = tl.load(tile_bits + r[None, :] * WORDS + ((c0 + lane) // 32)[:, None])
        else:
            words = tl.load(tile_bits + r[:, None] * WORDS + ((c0 + lane) // 32)[None, :])
    if KEYS_FIRST:  # one return at the end: a return inside a branch is not one here
        ok = ((words >> ((c0 + lane) % 32)[:, None]) & 1) != 0
    else:
        ok = ((words >> ((c0 + lane) % 32)[None, :]) & 1) != 0
    return ok


@triton.jit
def _store_rows(X, off_b, off_h, start, limit, sb, sh, sm, x,
                HEAD_DIM: tl.constexpr, N: tl.constexpr, CHECK: tl.constexpr):
    """Write ``x`` ``[N, HEAD_DIM]`` to rows ``start .. start + N`` of head (off_b, off_h)."""
    rows = start + tl.arange(0, N)
    ptrs = (X + _head(off_b, off_h, sb, sh) + rows[:, None].to(tl.int64) * sm
            + tl.arange(0, HEAD_DIM)[None, :])
    if CHECK:
        tl.store(ptrs, x, mask=rows[:, None] < limit)
    else:
        tl.store(ptrs, x)


@triton.jit
def sparse_forward(
    Q, K, V, OUT, LSE,
    F_N, F_I, P_N, P_I, P_START, BITS,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
    H, HL, NQ, NK, q_len, k_len, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_Q: tl.constexpr, STORE_LSE: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Program (query tile, batch x head): full tiles unmasked, then partial tiles through
    their bit masks, each layout tile as ``BLOCK / BLOCK_N`` key tiles; writes out (and the
    natural-log log-sum-exp). ``Q, K, V, OUT`` are pointers, or TMA descriptors of
    ``[B, H, S, HEAD_DIM]`` when ``USE_TMA``."""
    bh, off_b, off_h, qb, m0, row = _program(H, HL, NQ, BLOCK, BLOCK_M)
    k_head = _head(off_b, off_h, skb, skh)
    v_head = _head(off_b, off_h, svb, svh)
    q = _rows(Q, _head(off_b, off_h, sqb, sqh), off_b, off_h, m0, q_len, sqm,
              HEAD_DIM, BLOCK_M, USE_TMA, not EVEN_Q)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, m_i, l_i = _row_walk(acc, m_i, l_i, q, q, m_i, l_i, K, V, k_head, v_head, off_b, off_h,
                              row, qb, m0, F_N, F_I, P_N, P_I, P_START, BITS, skn, svn, NK,
                              k_len, qk_scale, HEAD_DIM, BLOCK, BLOCK_M, BLOCK_N, USE_TMA, False)

    empty = l_i == 0.0
    out = (acc / tl.where(empty, 1.0, l_i)[:, None]).to(q.dtype)  # out has the dtype of q
    offs_m = m0 + tl.arange(0, BLOCK_M)
    if USE_TMA:  # the descriptor clips rows past the end of the sequence
        OUT.store([off_b, off_h, m0, 0], out.reshape(1, 1, BLOCK_M, HEAD_DIM))
    else:
        _store_rows(OUT, off_b, off_h, m0, q_len, sob, soh, som, out, HEAD_DIM, BLOCK_M,
                    not EVEN_Q)
    if STORE_LSE:
        log2_l = tl.math.log2(tl.where(empty, 1.0, l_i))
        lse = tl.where(empty, float("-inf"), (m_i + log2_l) * 0.6931471805599453)  # x ln 2
        lse_ptrs = LSE + bh.to(tl.int64) * q_len + offs_m
        if EVEN_Q:
            tl.store(lse_ptrs, lse)
        else:
            tl.store(lse_ptrs, lse, mask=offs_m < q_len)


@triton.jit
def row_dot(X, Y, OUT, n_rows, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr):
    """``OUT[i] = sum_d X[i, d] * Y[i, d]`` in float32 for ``ROWS`` rows a program, of
    row-contiguous ``[n_rows, HEAD_DIM]`` inputs (the backward's ``delta`` from ``dO`` and
    ``O``)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    ok = rows < n_rows
    offs = rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    x = tl.load(X + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    y = tl.load(Y + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(OUT + rows, tl.sum(x * y, 1), mask=ok)


@triton.jit
def _stats(LSE2, DELTA, base, start, limit, N: tl.constexpr, CHECK: tl.constexpr):
    """Base-2 log-sum-exp (``+inf`` for rows with nothing allowed, and past ``limit``) and
    ``delta`` of rows ``start .. start + N``."""
    rows = start + tl.arange(0, N)
    if CHECK:
        lse2 = tl.load(LSE2 + base + rows, mask=rows < limit, other=float("inf"))
        delta = tl.load(DELTA + base + rows, mask=rows < limit, other=0.0)
    else:
        lse2 = tl.load(LSE2 + base + rows)
        delta = tl.load(DELTA + base + rows)
    return lse2, delta


@triton.jit
def _dkdv_tile(dk, dv, k, v, Q, DO, q_head, do_head, LSE2, DELTA, stats, off_b, off_h, m0,
               q_len, sqm, sdm, ok, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
               USE_TMA: tl.constexpr, CHECK: tl.constexpr, MASKED: tl.constexpr):
    """The query tile at row ``m0``'s share of this key tile's gradients, in transposed form
    ``[keys, queries]``: probabilities recomputed from the saved log-sum-exp, ``dv += p^T do``
    and ``dk += (p * (dp - delta))^T q`` (the softmax scale is applied once, at the end)."""
    q = _rows(Q, q_head, off_b, off_h, m0, q_len, sqm, HEAD_DIM, BLOCK_M, USE_TMA, CHECK)
    do = _rows(DO, do_head, off_b, off_h, m0, q_len, sdm, HEAD_DIM, BLOCK_M, USE_TMA, CHECK)
    lse2, delta = _stats(LSE2, DELTA, stats, m0, q_len, BLOCK_M, CHECK)
    p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse2[None, :])
    if MASKED:
        p_t = tl.where(ok, p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv)
    ds_t = p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _dq_tile(dq, q, do, k, v, lse2, delta, ok, qk_scale, MASKED: tl.constexpr):
    """One key tile's share of this query tile's gradient: ``dq += (p * (dp - delta)) k``."""
    p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where(ok, p, 0.0)
    ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq)


@triton.jit
def sparse_backward_dkdv(
    Q, K, V, DO, DK, DV, LSE2, DELTA,
    F_N, F_I, P_N, P_I, P_T, BITS,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm, sgb, sgh, sgn,
    H, HL, NQ, NK, q_len, k_len, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_Q: tl.constexpr, EVEN_K: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Program (key tile, batch x head): walks the query blocks of its *column* of the layout
    (full ones unmasked, partial ones through the same bit masks as the forward, read
    transposed) and writes ``dk`` and ``dv``. ``sd*`` are the strides of ``do``, ``sg*`` those
    of ``dk`` and ``dv`` (both contiguous)."""
    SUB_M: tl.constexpr = BLOCK // BLOCK_M
    WORDS: tl.constexpr = BLOCK // 32
    bh, off_b, off_h, kb, n0, col = _program(H, HL, NK, BLOCK, BLOCK_N)  # a column, by key
    stats = bh.to(tl.int64) * q_len
    q_head = _head(off_b, off_h, sqb, sqh)
    do_head = _head(off_b, off_h, sdb, sdh)
    k = _rows(K, _head(off_b, off_h, skb, skh), off_b, off_h, n0, k_len, skn,
              HEAD_DIM, BLOCK_N, USE_TMA, not EVEN_K)
    v = _rows(V, _head(off_b, off_h, svb, svh), off_b, off_h, n0, k_len, svn,
              HEAD_DIM, BLOCK_N, USE_TMA, not EVEN_K)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    for j in range(tl.load(F_N + col)):
        qb = tl.load(F_I + col * NQ + j)
        for sub in tl.static_range(SUB_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, Q, DO, q_head, do_head, LSE2, DELTA, stats,
                                off_b, off_h, qb * BLOCK + sub * BLOCK_M, q_len, sqm, sdm, None,
                                qk_scale, HEAD_DIM, BLOCK_M, USE_TMA, not EVEN_Q, False)

    for j in range(tl.load(P_N + col)):
        qb = tl.load(P_I + col * NQ + j)
        tile_bits = BITS + tl.load(P_T + col * NQ + j).to(tl.int64) * (BLOCK * WORDS)
        for sub in tl.static_range(SUB_M):
            r = sub * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows inside the layout tile
            ok = _allowed(tile_bits, r, n0 - kb * BLOCK, BLOCK_M, BLOCK_N, WORDS,
                          True)  # [keys, queries]
            dk, dv = _dkdv_tile(dk, dv, k, v, Q, DO, q_head, do_head, LSE2, DELTA, stats,
                                off_b, off_h, qb * BLOCK + sub * BLOCK_M, q_len, sqm, sdm, ok,
                                qk_scale, HEAD_DIM, BLOCK_M, USE_TMA, not EVEN_Q, True)

    _store_rows(DK, off_b, off_h, n0, k_len, sgb, sgh, sgn, (dk * sm_scale).to(k.dtype),
                HEAD_DIM, BLOCK_N, not EVEN_K)
    _store_rows(DV, off_b, off_h, n0, k_len, sgb, sgh, sgn, dv.to(v.dtype),
                HEAD_DIM, BLOCK_N, not EVEN_K)


@triton.jit
def sparse_backward_dq(
    Q, K, V, DO, DQ, LSE2, DELTA,
    F_N, F_I, P_N, P_I, P_START, BITS,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm, sgb, sgh, sgm,
    H, HL, NQ, NK, q_len, k_len, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_Q: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Program (query tile, batch x head) over the forward's row lists: writes ``dq``."""
    bh, off_b, off_h, qb, m0, row = _program(H, HL, NQ, BLOCK, BLOCK_M)
    k_head = _head(off_b, off_h, skb, skh)
    v_head = _head(off_b, off_h, svb, svh)
    q = _rows(Q, _head(off_b, off_h, sqb, sqh), off_b, off_h, m0, q_len, sqm,
              HEAD_DIM, BLOCK_M, USE_TMA, not EVEN_Q)
    do = _rows(DO, _head(off_b, off_h, sdb, sdh), off_b, off_h, m0, q_len, sdm,
               HEAD_DIM, BLOCK_M, USE_TMA, not EVEN_Q)
    lse2, delta = _stats(LSE2, DELTA, bh.to(tl.int64) * q_len, m0, q_len, BLOCK_M, not EVEN_Q)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq, lse2, delta = _row_walk(dq, lse2, delta, q, do, lse2, delta, K, V, k_head, v_head,
                                off_b, off_h, row, qb, m0, F_N, F_I, P_N, P_I, P_START, BITS,
                                skn, svn, NK, k_len, qk_scale, HEAD_DIM, BLOCK, BLOCK_M, BLOCK_N,
                                USE_TMA, True)

    _store_rows(DQ, off_b, off_h, m0, q_len, sgb, sgh, sgm, (dq * sm_scale).to(q.dtype),
                HEAD_DIM, BLOCK_M, not EVEN_Q)
