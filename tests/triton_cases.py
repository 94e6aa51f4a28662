"""Cases the triton backend must match the float64 dense reference on, shared by the CPU test
(Triton's interpreter, in a subprocess: ``python tests/triton_cases.py``) and the GPU test."""

from __future__ import annotations

import sys

import torch

import workbench as wb
from workbench.backends import Problem, reference_attention
from workbench.backends.triton_sparse import BackwardConfig, KernelConfig, triton_attention

P = wb.patterns

#: (name, pattern, q_len, k_len, block, heads, kernel config or None)
CASES = [
    ("local|global & causal, ragged", (P.local_window(40) | P.global_tokens(5)) & P.causal(),
     200, 200, 32, 2, None),
    ("random tiles, exact length", P.random_blocks(0.3, seed=1, cell=32), 128, 128, 32, 2, None),
    ("dilated heads, rows kept by no head", P.dilated([64, 128], [1, 4], num_heads=3),
     250, 250, 32, 3, None),
    ("cross attention, q shorter than k", P.full(), 70, 150, 32, 2, None),
    ("sub-tiles of the block", P.local_window(50) & P.causal(), 161, 161, 64, 2,
     KernelConfig(block_m=16, block_n=32, num_warps=4, num_stages=1)),
    ("TMA loads", (P.local_window(40) | P.global_tokens(5)) & P.causal(),
     200, 200, 32, 2, KernelConfig(32, 16, 4, 1, use_tma=True)),
    ("TMA, cross attention, sub-tiles", P.random_blocks(0.5, seed=2, cell=32), 90, 173, 64, 2,
     KernelConfig(32, 32, 4, 1, use_tma=True)),
    ("two mask words per row of a key tile", (P.local_window(40) | P.strided(9)) & P.causal(),
     200, 200, 64, 2, KernelConfig(32, 64, 4, 1)),
]


def _inputs(b: int, h: int, sq: int, sk: int, d: int, dtype, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(device, dtype) for n in (sq, sk, sk)]


def check_case(name, pattern, sq, sk, block, heads, config, device, dtype, d=32, tol=2e-5,
               grow=0.0):
    """``grow``: keys grow along the sequence by this factor, so each key tile raises the row
    maxima a lot (the running rescaling must keep up)."""
    q, k, v = _inputs(2, heads, sq, sk, d, dtype, device, seed=len(name))
    k = k * (1 + grow * torch.arange(sk, device=device, dtype=dtype) / sk)[:, None]
    lay = pattern.block_structure(sq, block, device, k_len=sk)
    prob = Problem(lay, pattern.predicate(device), d ** -0.5, pattern=pattern)
    out, lse = triton_attention(q, k, v, prob, True, config=config)
    ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), prob)
    err = (out.double() - ref).abs().max().item()
    assert err < tol, f"{name}: out differs from the reference by {err}"
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), f"{name}: -inf rows differ"
    fin = torch.isfinite(ref_lse)
    lerr = (lse.double()[fin] - ref_lse[fin]).abs().max().item()
    assert lerr < tol, f"{name}: lse differs by {lerr}"
    assert bool((out[~fin.unsqueeze(-1).expand_as(out)] == 0).all()), f"{name}: empty rows != 0"


#: (name, pattern, q_len, k_len, block, heads, backward config or None)
GRAD_CASES = [
    ("local|global & causal, ragged", (P.local_window(40) | P.global_tokens(5)) & P.causal(),
     200, 200, 32, 2, None),
    ("dilated heads, rows kept by no head", P.dilated([64, 128], [1, 4], num_heads=3),
     250, 250, 32, 3, None),
    ("cross attention, ragged keys, one layout head", P.random_blocks(0.5, seed=3, cell=32),
     70, 150, 32, 2, None),
    ("sub-tiles of the block, TMA", P.local_window(50) & P.causal(), 161, 161, 64, 2,
     BackwardConfig(KernelConfig(16, 32, 4, 1, use_tma=True),
                    KernelConfig(32, 16, 4, 1, use_tma=True))),
    ("two mask words per row of a key tile", (P.local_window(40) | P.strided(9)) & P.causal(),
     200, 200, 64, 2, BackwardConfig(KernelConfig(32, 64, 4, 1), KernelConfig(32, 64, 4, 1))),
]


def check_grad_case(name, pattern, sq, sk, block, heads, config, device, dtype, d=32,
                    tol=2e-5):
    """Gradients of a loss on both outputs (the log-sum-exp's gradient is what a ring's merge
    sends back) against the float64 reference's autograd."""
    q, k, v = _inputs(1, heads, sq, sk, d, dtype, device, seed=len(name) + 1)
    lay = pattern.block_structure(sq, block, device, k_len=sk)
    prob = Problem(lay, pattern.predicate(device), d ** -0.5, pattern=pattern)
    g = torch.Generator().manual_seed(5)
    w_out = torch.randn(q.shape, generator=g).to(device)
    w_lse = torch.randn(q.shape[:3], generator=g).to(device)

    def loss(out, lse):
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        return (out.double() * w_out).sum() + (lse.double() * w_lse).sum()

    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = triton_attention(*xs, prob, True, backward_config=config)
    got = torch.autograd.grad(loss(out, lse), xs)
    ref_xs = [x.double().requires_grad_() for x in (q, k, v)]
    want = torch.autograd.grad(loss(*reference_attention(*ref_xs, prob)), ref_xs)
    for label, a, b in zip(("dq", "dk", "dv"), got, want):
        err = ((a.double() - b).abs().max() / b.abs().max().clamp_min(1.0)).item()
        assert err < tol, f"{name}: {label} differs from the reference by {err}"


def check_public_api(device, dtype, tol=2e-5):
    """Through ``block_sparse_attention``: a ring of 3 chunks (tiles at offsets), a Hilbert
    visit order, and the errors for what the kernel does not do."""
    pat = (P.local_window(48) | P.global_tokens(4)) & P.causal()
    q, k, v = _inputs(1, 2, 300, 300, 32, dtype, device, seed=7)
    ref = wb.block_sparse_attention(q.double(), k.double(), v.double(), pat, 32,
                                    backend="reference")
    for kw in ({"ring_chunks": 3}, {"block_order": "hilbert"}):
        out = wb.block_sparse_attention(q, k, v, pat, 32, backend="triton", **kw)
        err = (out.double() - ref).abs().max().item()
        assert err < tol, f"{kw}: {err}"
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_xs = [x.double().requires_grad_() for x in (q, k, v)]
    out = wb.block_sparse_attention(*xs, pat, 32, backend="triton", ring_chunks=3)
    ref = wb.block_sparse_attention(*ref_xs, pat, 32, backend="reference")
    got = torch.autograd.grad(out.double().square().sum(), xs)
    want = torch.autograd.grad(ref.square().sum(), ref_xs)
    for a, b in zip(got, want):  # through the ring's log-sum-exp merges
        err = (a.double() - b).abs().max().item()
        assert err < tol * 10, f"ring backward: {err}"
    x = q[..., :24]
    try:
        wb.block_sparse_attention(x, x, x, pat, 32, backend="triton")
    except NotImplementedError as e:
        assert "flex" in str(e), str(e)
    else:
        raise AssertionError("no error for head_dim 24")


def check_query_offsets(device, dtype, tol=2e-5):
    """Queries at an offset (one decoded token, a chunk starting inside a block), forward and
    backward, through ``block_sparse_attention`` with grouped-query key/value heads."""
    pat = (P.local_window(48) | P.global_tokens(4)) & P.causal()
    for sq, sk, off in ((1, 150, 149), (37, 150, 100)):
        q, k, v = _inputs(1, 2, sq, sk, 32, dtype, device, seed=sq)
        k, v = k[:, :1], v[:, :1]
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        ref_xs = [x.double().requires_grad_() for x in (q, k, v)]
        out = wb.block_sparse_attention(*xs, pat, 32, backend="triton", q_offset=off)
        ref = wb.block_sparse_attention(*ref_xs, pat, 32, backend="reference", q_offset=off)
        err = (out.double() - ref).abs().max().item()
        assert err < tol, f"q_offset={off}: out differs by {err}"
        got = torch.autograd.grad(out.double().square().sum(), xs)
        want = torch.autograd.grad(ref.square().sum(), ref_xs)
        for a, b in zip(got, want):
            err = (a.double() - b).abs().max().item()
            assert err < tol * 10, f"q_offset={off}: a gradient differs by {err}"


def check_row_dot(device: str, dtype) -> None:
    """The backward's ``delta``: rows not a multiple of a program's, and a log-sum-exp gradient."""
    from workbench.backends.triton_sparse import _delta

    g = torch.Generator().manual_seed(5)
    out, dout = (torch.randn(2, 3, 37, 16, generator=g).to(device, dtype) for _ in range(2))
    dlse = torch.randn(2, 3, 37, generator=g).to(device)
    whole = (dout.double() * out.double()).sum(-1)
    for lse_grad, want in ((None, whole), (dlse, whole - dlse.double())):
        got = _delta(out, dout, lse_grad)
        assert got.dtype == torch.float32 and got.shape == (2, 3, 37)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def check_random_tiles(device: str) -> None:
    """Random tiles' layout kernel against the cell grid hashed by PyTorch and reduced: ragged
    lengths, several heads, a seed past 32 bits, query rows from the middle, every cell on and
    almost none, cells of a block and of several."""
    cpu = torch.device("cpu")
    for density, seed, cell, block, q_len, k_len, heads, rows in [
            (0.3, 1, 32, 64, 1000, 777, 3, (0, 16)),
            (0.1, 2**40 + 5, 16, 128, 513, 2000, 1, (1, 4)),
            (0.9, 7, 8, 64, 640, 640, 2, (0, 10)), (1.0, 0, 16, 32, 100, 100, 1, (0, 4)),
            (1e-6, 3, 16, 32, 100, 100, 1, (2, 4)), (0.4, 5, 64, 64, 300, 333, 2, (1, 5)),
            (0.4, 6, 128, 32, 300, 333, 2, (3, 10))]:
        pat = P.random_blocks(density, seed, cell=cell, num_heads=heads)
        got = pat._kernel_tiles(q_len, k_len, block, torch.device(device), rows)
        want = pat.tiles(q_len, k_len, block, cpu, rows)
        for g, w in zip(got, want):
            assert torch.equal(g.cpu(), w.expand_as(g)), (density, seed, cell, block, rows)


def check_row_lists(device: str) -> None:
    """The block lists' row kernel against a stable sort (selected columns first): rows longer
    than a step, empty and full rows, transposed grids (read a few rows a program, the last
    few ragged), lists cut to the longest row; on CUDA
    also through ``sorted_block_indices`` with the kernel switched on."""
    from workbench import blockmask
    from workbench._row_lists_kernel import row_lists

    g = torch.Generator().manual_seed(3)
    grids = [torch.rand(2, 7, 1500, generator=g) < 0.3,
             (torch.rand(3, 40, 33, generator=g) < 0.5).transpose(1, 2),
             (torch.rand(2, 70, 130, generator=g) < 0.4).transpose(1, 2)]
    grids[0][0, 1], grids[0][1, 2] = False, True
    for sel in grids:
        sel = sel.to(device)
        count = sel.sum(-1, dtype=torch.int32)
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        for width in (sel.shape[-1], int(count.max())):
            got = blockmask.empty_lists(sel.shape[:-1], width, sel.device)
            row_lists(sel, *got)
            assert torch.equal(got[0], count) and torch.equal(got[1], order[..., :width])
            if sel.is_cuda:
                switch, by = blockmask.ROW_KERNEL, {}
                try:
                    for on in (True, False):
                        blockmask.ROW_KERNEL = on
                        by[on] = blockmask.sorted_block_indices(sel, width=width)
                finally:
                    blockmask.ROW_KERNEL = switch
                assert all(torch.equal(a, b) for a, b in zip(by[True], by[False]))


def run_all(device: str = "cpu", dtype=torch.float32, tol: float = 2e-5) -> None:
    check_random_tiles(device)
    check_row_lists(device)
    check_row_dot(device, dtype)
    for case in CASES:
        check_case(*case, device=device, dtype=dtype, tol=tol)
    check_case("growing maxima", P.full(), 64, 256, 32, 1, KernelConfig(32, 16, 4, 1), device,
               dtype, tol=tol * 10, grow=40.0)
    for case in GRAD_CASES:
        check_grad_case(*case, device=device, dtype=dtype, tol=tol * 5)
    check_public_api(device, dtype, tol)
    check_query_offsets(device, dtype, tol)


if __name__ == "__main__":
    run_all(*sys.argv[1:2])
    check_case(*CASES[0], device="cpu", dtype=torch.float16, tol=2e-2)  # half-precision inputs
    check_grad_case(*GRAD_CASES[0], device="cpu", dtype=torch.float16, tol=2e-2)
    print("ok")
