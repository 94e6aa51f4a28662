"""Queries at an offset (``q_offset``: a KV-cache decode, a chunk of a prefill) and grouped-query
key/value heads, on every registered backend, against a float64 softmax over the dense token
mask evaluated at the queries' true positions."""

from __future__ import annotations

import math

import pytest
import torch

import workbench as wb
from workbench.backends import BackendUnsupported, Request, get_backend, registered
from workbench.plan import query_window_layout

P = wb.patterns
H = 4
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPE = {"cpu": torch.float64, "cuda": torch.float16}
BLOCK = {"cpu": 16, "cuda": 32}
HEAD_DIM = {"cpu": 8, "cuda": 16}
TOL = {"cpu": 1e-9, "cuda": 2e-2}

PATTERNS = {
    "causal": lambda: P.causal(),
    "local_causal": lambda: P.local_window(20, causal=True),
    "dilated_causal": lambda: P.dilated([16, 32], [1, 2], H, causal=True),
    "random": lambda: P.random_blocks(0.3, seed=3, cell=8),
    "local_global": lambda: (P.local_window(9) | P.global_tokens(3)) & P.causal(),
    "full": lambda: P.full(),
}
#: (queries, keys, q_offset): one decoded token; a prefill chunk of 37 at 100 (inside a block);
#: a chunk that starts on a block boundary; the chunk with more keys than positions it reaches
WINDOWS = {"decode": (1, 150, 149), "chunk": (37, 150, 100), "aligned": (32, 150, 64),
           "short_keys": (37, 120, 100)}


def dense_reference(q, k, v, pattern, q_offset):
    """float64 attention restricted to ``pattern`` at query positions ``q_offset + i``; rows
    with no allowed key give zeros. k and v may have fewer heads (grouped-query)."""
    q, k, v = (x.to("cpu", torch.float64) for x in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    sq, sk = q.shape[2], k.shape[2]
    h = torch.arange(q.shape[1])[:, None, None] * (pattern.num_heads > 1)
    mask = pattern.allowed(h, torch.arange(sq)[None, :, None] + q_offset,
                           torch.arange(sk)[None, None, :]).expand(q.shape[1], sq, sk)
    s = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, -1)
    return torch.exp(s - lse.nan_to_num(neginf=0.0)[..., None]) @ v


def _inputs(device, sq, sk, heads_kv=H, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed + sq * 1000 + sk)
    return tuple(torch.randn(2, h, n, HEAD_DIM[device], generator=g, dtype=torch.float64)
                 .to(device, DTYPE[device]).requires_grad_(grad)
                 for h, n in ((H, sq), (heads_kv, sk), (heads_kv, sk)))


def _cases():
    for backend in registered():
        for name in PATTERNS:
            for window in WINDOWS:
                for device in DEVICES:
                    yield pytest.param(backend.name, name, window, device,
                                       id=f"{backend.name}-{name}-{window}-{device}")


@pytest.mark.parametrize("backend, name, window, device", list(_cases()))
def test_offset_queries_match_the_dense_reference_or_refuse(backend, name, window, device):
    pattern = PATTERNS[name]()
    sq, sk, off = WINDOWS[window]
    block = BLOCK[device]
    grad = backend != "flex" or device == "cuda"
    q, k, v = _inputs(device, sq, sk, grad=grad)
    req = Request(q, k, v, need_lse=False, dense_form=pattern.dense_form(), pattern=pattern,
                  q_offset=off, block_size=block,
                  build_layout=lambda: query_window_layout(pattern, sq, sk, block, device, off))
    if get_backend(backend).refusal(req) is not None:
        with pytest.raises(BackendUnsupported, match=f"backend '{backend}' cannot"):
            wb.block_sparse_attention(q, k, v, pattern, block, backend=backend, q_offset=off)
        return
    out = wb.block_sparse_attention(q, k, v, pattern, block, backend=backend, q_offset=off)
    ref = dense_reference(q, k, v, pattern, off)
    tol = TOL[device]
    torch.testing.assert_close(out.cpu().double(), ref, atol=tol, rtol=tol)
    if grad:
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                        dtype=torch.float64)
        mine = torch.autograd.grad((out.cpu().double() * w).sum(), (q, k, v))
        xs = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
        theirs = torch.autograd.grad((dense_reference(*xs, pattern, off) * w).sum(), xs)
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a.cpu().double(), b, atol=tol * 10, rtol=tol * 10)


def test_the_offset_cases_are_computed_not_refused():
    """Each pattern and window is computed by a backend besides the reference (the sweep above
    cannot pass by refusals alone), and ``auto`` decodes a causal pattern with SDPA."""
    for build in PATTERNS.values():
        for sq, sk, off in WINDOWS.values():
            q, k, v = _inputs("cpu", sq, sk)
            pattern = build()
            req = Request(q, k, v, need_lse=False, dense_form=pattern.dense_form(),
                          pattern=pattern, q_offset=off)
            assert any(b.refusal(req) is None for b in registered() if b.name != "reference")
    q, k, v = _inputs("cpu", 1, 150)
    assert wb.explain_backend(q, k, v, P.causal(), 16, q_offset=149).name == "sdpa"
    assert wb.explain_backend(q, k, v, P.causal(), 16, q_offset=100).name == "blockwise"


@pytest.mark.parametrize("block", [1, 5, 16, 64])
@pytest.mark.parametrize("off", [0, 3, 16, 37, 100])
def test_window_layout_covers_the_token_mask_exactly(block, off):
    """Every allowed pair of the window lies in an active tile, and a full tile allows every
    real pair: what makes the backends exact (partial tiles are decided token by token)."""
    pattern = (P.local_window(11) | P.global_tokens(2)) & P.causal() | P.strided(13)
    sq, sk = 37, 150
    lay = query_window_layout(pattern, sq, sk, block, "cpu", off)
    mask = pattern.allowed(torch.zeros(1, 1, 1, dtype=torch.long),
                           torch.arange(sq)[None, :, None] + off,
                           torch.arange(sk)[None, None, :])[0]
    nq, nk = lay.shape[1:]
    padded = torch.zeros(nq * block, nk * block, dtype=torch.bool)
    real = torch.zeros_like(padded)
    padded[:sq, :sk], real[:sq, :sk] = mask, True
    tiles = padded.view(nq, block, nk, block).transpose(1, 2)
    reals = real.view(nq, block, nk, block).transpose(1, 2)
    has_pair = tiles.flatten(2).any(-1)
    all_pairs = (tiles | ~reals).flatten(2).all(-1)
    assert bool((lay.active[0] | ~has_pair).all())
    assert bool((~lay.full[0] | all_pairs).all())
    assert bool((~lay.full[0] | lay.active[0]).all())
    if off % block == 0:  # on a block boundary the window is the whole layout's rows
        whole = pattern.block_structure(off + sq, block, k_len=sk)
        assert torch.equal(lay.active[0], whole.active[0, off // block:])
        assert torch.equal(lay.full[0], whole.full[0, off // block:])


@pytest.mark.parametrize("heads_kv", [1, 2, 4])
@pytest.mark.parametrize("backend", ["blockwise", "reference", "auto"])
def test_grouped_query_heads_match_repeated_heads(heads_kv, backend):
    """Query head h reads key/value head h // (H / H_kv), forward and backward, also with a
    pattern of H heads and at an offset."""
    for pattern, (sq, sk, off) in ((P.causal(), (37, 150, 113)),
                                   (P.dilated([16, 32], [1, 2], H), (70, 70, 0))):
        q, k, v = _inputs("cpu", sq, sk, heads_kv, grad=True)
        out = wb.block_sparse_attention(q, k, v, pattern, 16, backend=backend, q_offset=off)
        ref = dense_reference(q, k, v, pattern, off)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2),
                        dtype=torch.float64)
        mine = torch.autograd.grad((out * w).sum(), (q, k, v))
        theirs = torch.autograd.grad((ref * w).sum(), (q, k, v))
        for a, b in zip(mine, theirs):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


CUDA_ONLY = [pytest.mark.gpu,
             pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("backend, device", [
    ("sdpa", "cpu"), pytest.param("flex", "cpu", marks=pytest.mark.slow),
    pytest.param("sdpa", "cuda", marks=CUDA_ONLY), pytest.param("flex", "cuda", marks=CUDA_ONLY)])
def test_backends_that_read_grouped_heads_get_them_unrepeated(backend, device, monkeypatch):
    """sdpa and flex read grouped-query k, v as they are: with repeating made to fail, they
    still match the float64 reference, forward and backward (flex's CPU kernel: forward only);
    a backend that cannot is given them repeated."""
    from workbench.backends import registry

    def no_repeat(*args):
        raise AssertionError("k, v were repeated")

    monkeypatch.setattr(registry, "expand_kv_heads", no_repeat)
    pattern = P.causal() if backend == "sdpa" else P.local_window(20, causal=True)
    grad = backend == "sdpa" or device == "cuda"
    q, k, v = _inputs(device, 37, 37, heads_kv=2, grad=grad)
    if (backend, device) == ("flex", "cpu"):  # its CPU kernel: float32, inference
        q, k, v = (x.float() for x in (q, k, v))
    with torch.set_grad_enabled(grad):
        out = wb.block_sparse_attention(q, k, v, pattern, BLOCK[device], backend=backend)
    ref = dense_reference(q, k, v, pattern, 0)
    tol = {"cpu": 1e-9 if backend == "sdpa" else 1e-5, "cuda": TOL["cuda"]}[device]
    torch.testing.assert_close(out.double().cpu(), ref, atol=tol, rtol=tol)
    if grad:
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2),
                        dtype=torch.float64)
        mine = torch.autograd.grad((out * w.to(out)).sum(), (q, k, v))
        theirs = torch.autograd.grad((ref * w).sum(), (q, k, v))
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a.double().cpu(), b.double().cpu(), atol=tol, rtol=tol)
    with pytest.raises(AssertionError, match="repeated"), torch.no_grad():
        wb.block_sparse_attention(q, k, v, pattern, BLOCK[device], backend="blockwise")


def test_the_module_takes_grouped_query_heads_as_the_function_does():
    pattern = P.dilated([16, 32], [1, 2], H)
    module = wb.BlockSparseAttention(pattern, 16)
    for heads_kv in (2, H, 1):  # a kept call, then others
        q, k, v = _inputs("cpu", 70, 70, heads_kv, grad=True)
        out = module(q, k, v)
        torch.testing.assert_close(out, dense_reference(q, k, v, pattern, 0), atol=1e-10,
                                   rtol=1e-10)
        assert torch.autograd.grad(out.sum(), k)[0].shape == k.shape
    q3, k3, v3 = _inputs("cpu", 70, 70, heads_kv=3)
    with pytest.raises(ValueError, match="grouped-query"):
        module(q3, k3, v3)


def test_the_module_takes_query_offsets_as_the_function_does():
    """A decode step after another: each offset gets its own layout and runner, and a bad
    offset raises as in the function."""
    pattern = P.local_window(20, causal=True) | P.global_tokens(3)
    module = wb.BlockSparseAttention(pattern, 16, ring_chunks=1)
    for sq, sk, off in ((37, 150, 113), (37, 150, 113), (1, 151, 150), (37, 150, 0)):
        q, k, v = _inputs("cpu", sq, sk, grad=True)
        out = module(q, k, v, q_offset=off)
        ref = dense_reference(q, k, v, pattern, off)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
        for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)),
                        torch.autograd.grad(ref.sum(), (q, k, v))):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    assert module.plan(37, 150, "cpu", 113).q_offset == 113
    for bad, err in ((-1, ValueError), (True, TypeError), (2.0, TypeError)):
        with pytest.raises(err, match="q_offset"):
            module(q, k, v, q_offset=bad)
    ring = wb.BlockSparseAttention(pattern, 16, ring_chunks=2)
    q, k, v = _inputs("cpu", 37, 150)
    torch.testing.assert_close(ring(q, k, v, q_offset=100), dense_reference(q, k, v, pattern,
                                                                            100))


def test_offsets_in_a_ring_a_plan_and_with_dropout():
    pattern = P.local_window(20, causal=True) | P.global_tokens(3)
    q, k, v = _inputs("cpu", 37, 150, grad=False)
    ref = dense_reference(q, k, v, pattern, 100)
    ring = wb.block_sparse_attention(q, k, v, pattern, 16, ring_chunks=2, q_offset=100)
    torch.testing.assert_close(ring, ref, atol=1e-10, rtol=1e-10)
    plans = wb.Plans()
    for _ in range(2):
        out = wb.block_sparse_attention(q, k, v, pattern, 16, plan=plans, q_offset=100)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    assert len(plans) == 1 and next(iter(plans)).q_offset == 100
    plan = wb.Plan(pattern, 37, 150, 16, q_offset=100)
    torch.testing.assert_close(wb.block_sparse_attention(q, k, v, pattern, 16, plan=plan,
                                                         q_offset=100), ref)
    with pytest.raises(ValueError, match="q_offset=100"):
        wb.block_sparse_attention(q, k, v, pattern, 16, plan=plan, q_offset=99)
    # dropout decisions hash true positions: the chunk drops what the whole sequence drops
    qq, kk, vv = _inputs("cpu", 150, 150, grad=False)
    kw = dict(dropout_p=0.4, dropout_seed=3, backend="blockwise")
    whole = wb.block_sparse_attention(qq, kk, vv, pattern, 16, **kw)
    part = wb.block_sparse_attention(qq[:, :, 100:137], kk, vv, pattern, 16, q_offset=100, **kw)
    torch.testing.assert_close(part, whole[:, :, 100:137], atol=1e-10, rtol=1e-10)


def test_bad_offsets_and_head_counts_raise_naming_the_argument():
    q, k, v = _inputs("cpu", 37, 150)
    for bad, err in ((-1, ValueError), (True, TypeError), (1.5, TypeError)):
        with pytest.raises(err, match="q_offset"):
            wb.block_sparse_attention(q, k, v, P.causal(), 16, q_offset=bad)
    lay = P.causal().block_structure(37, 16, k_len=150)
    with pytest.raises(ValueError, match="plan=wb.Plan"):
        wb.block_sparse_attention(q, k, v, P.causal(), 16, layout=lay, q_offset=3)
    q3, k3, v3 = _inputs("cpu", 37, 150, heads_kv=3)
    with pytest.raises(ValueError, match="grouped-query"):
        wb.block_sparse_attention(q3, k3, v3, P.causal(), 16)
    with pytest.raises(ValueError, match="grouped-query"):
        wb.block_sparse_attention(q, k[:, :2], v, P.causal(), 16)


@pytest.mark.slow
def test_flex_on_the_cpu_honours_offsets():
    """FlexAttention's CPU kernel (float32, inference): its mask function reads the offset."""
    for name in ("local_global", "dilated_causal"):
        pattern = PATTERNS[name]()
        for sq, sk, off in (WINDOWS["decode"], WINDOWS["chunk"]):
            q, k, v = (x.float() for x in _inputs("cpu", sq, sk))
            out = wb.block_sparse_attention(q, k, v, pattern, 16, backend="flex", q_offset=off)
            ref = dense_reference(q, k, v, pattern, off)
            torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
