"""Every registered backend x every kind of pattern x forward / backward / log-sum-exp / ring /
dropout / score mod, against a float64 softmax over the dense token mask.

A backend either computes what the oracle computes, or, where its capabilities or rules say it
cannot (:meth:`workbench.backends.Backend.refusal`; in a ring, for one of the ring's slices),
raises ``BackendUnsupported`` naming itself. A backend added to the registry is run here
without any change to this file.
"""

from __future__ import annotations

import math

import pytest
import torch

import workbench as wb
from workbench.backends import BackendUnsupported, Request, flex, get_backend, registered
from workbench.orderings import grid_neighborhood, permuted
from workbench.score_mods import alibi, soft_cap

P = wb.patterns
H = 4  # LongNet families split heads into 4 groups
BLOCK = {"cpu": 16, "cuda": 32}  # the triton kernels take blocks of 32 or more
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPE = {"cpu": torch.float64, "cuda": torch.float16}
HEAD_DIM = {"cpu": 8, "cuda": 16}  # the compiled kernels need 16 on CUDA
TOL = {"cpu": 1e-9, "cuda": 2e-2}


def _perm(n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(5))


# every registered family at this suite's lengths, and what users build from them
PATTERNS = {name: (lambda f=f: f.pattern(96, H)) for name, f in P.FAMILIES.items()}
PATTERNS.update({
    "local_causal": lambda: P.local_window(9, causal=True),
    "union": lambda: P.strided(7) | P.local_window(4),
    "intersection": lambda: P.local_window(20) & P.causal(),
    "dilated_small": lambda: P.dilated([16, 32], [1, 2], H),
    "dilated_causal": lambda: P.dilated([16, 32], [1, 2], H, causal=True),
    "dilated_odd": lambda: P.dilated([7, 11], [3, 4], H),  # 77 = 7 x 11: strided views
    "one_head_broadcast": lambda: P.random_blocks(0.3, seed=3, cell=8),
    "permuted": lambda: permuted(P.local_window(6), _perm(96)),
    "grid_hilbert": lambda: grid_neighborhood((8, 12), 1),
    "grid_shift_dilated": lambda: grid_neighborhood((8, 12), 1, dilation=2, border="shift"),
    "documents_padded": lambda: P.documents([30, 1, 17, 9]),  # 57..: padding attends nothing
    "key_mask": lambda: P.KeyMask((torch.arange(96) % 7 != 3)[None]),
})
SHAPES = {"square": (77, 77), "ragged": (45, 70)}
OPERATIONS = ("forward", "backward", "lse", "ring", "dropout", "score_mod")


def score_mod(s, b, h, q, k):
    """What the score_mod operation applies: ALiBi by head and position, then a soft cap."""
    return soft_cap(2.0)(alibi(H)(s, b, h, q, k), b, h, q, k)


def oracle(q, k, v, pattern, mod=None):
    """(out, lse) of a float64 softmax over the pattern's dense token mask (the scores changed
    by ``mod`` first); rows that attend nothing give zeros and -inf."""
    device, dtype = q.device, q.dtype
    q, k, v = (x.to("cpu", torch.float64) for x in (q, k, v))  # differentiable copies
    sq, sk = q.shape[2], k.shape[2]
    h = torch.arange(H)[:, None, None]
    mask = pattern.allowed(h * (pattern.num_heads > 1), torch.arange(sq)[None, :, None],
                           torch.arange(sk)[None, None, :]).expand(H, sq, sk)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mod is not None:
        s = mod(s, torch.arange(q.shape[0])[:, None, None, None], h[None],
                torch.arange(sq)[:, None], torch.arange(sk)[None, :])
    s = s.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.nan_to_num(neginf=0.0)[..., None])
    return (p @ v).to(device, dtype), lse.to(device)


def _inputs(device, sq, sk, grad):
    g = torch.Generator().manual_seed(sq * 1000 + sk)
    return tuple(torch.randn(1, H, n, HEAD_DIM[device], generator=g, dtype=torch.float64)
                 .to(device, DTYPE[device]).requires_grad_(grad) for n in (sq, sk, sk))


def _cases():
    for backend in registered():
        for name in PATTERNS:
            for shape in SHAPES:
                for op in OPERATIONS:
                    if op == "ring" and shape == "ragged":
                        continue
                    for device in DEVICES:
                        yield pytest.param(backend.name, name, shape, op, device,
                                           id=f"{backend.name}-{name}-{shape}-{op}-{device}")


@pytest.mark.parametrize("backend, name, shape, op, device", list(_cases()))
def test_backend_matches_the_oracle_or_refuses(backend, name, shape, op, device):
    pattern = PATTERNS[name]()
    sq, sk = SHAPES[shape]
    block = BLOCK[device]
    if backend == "flex" and len(flex._seen) >= flex.RECOMPILE_LIMIT // 2:
        flex.reset_compiled()  # this suite compiles more shapes than one process may keep
    grad = op in ("backward", "score_mod")  # a score mod: out, lse and gradients
    mod = score_mod if op == "score_mod" else None
    q, k, v = _inputs(device, sq, sk, grad)
    kw = dict(backend=backend, return_lse=op in ("lse", "score_mod"),
              ring_chunks=3 if op == "ring" else 1,
              dropout_p=0.3 if op == "dropout" else 0.0, dropout_seed=7, score_mod=mod)
    req = Request(q, k, v, need_lse=op in ("lse", "ring", "score_mod"),
                  dense_form=pattern.dense_form(), dropout=op == "dropout", pattern=pattern,
                  block_size=block, score_mod=mod,
                  build_layout=lambda: pattern.block_structure(sq, block, device, k_len=sk))
    refusal = get_backend(backend).refusal(req)
    if refusal is not None:
        with pytest.raises(BackendUnsupported, match=f"backend '{backend}' cannot"):
            wb.block_sparse_attention(q, k, v, pattern, block, **kw)
        return
    try:
        res = wb.block_sparse_attention(q, k, v, pattern, block, **kw)
    except BackendUnsupported as e:  # a ring's slices are requests of their own
        assert op == "ring" and f"backend '{backend}' cannot" in str(e), e
        return
    out, lse = res if kw["return_lse"] else (res, None)
    if op == "dropout":  # the oracle of a hashed dropout mask is the dense reference's
        ref = wb.block_sparse_attention(q, k, v, pattern, block, **{**kw, "backend": "reference"})
    else:
        ref, ref_lse = oracle(q, k, v, pattern, mod)
    tol = TOL[device]
    torch.testing.assert_close(out, ref.to(out.dtype), atol=tol, rtol=tol)
    if lse is not None:
        torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)
    if grad:
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                        dtype=torch.float64).to(device, out.dtype)
        mine = torch.autograd.grad((out * g).sum(), (q, k, v))
        theirs = torch.autograd.grad((ref * g).sum(), (q, k, v))
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, atol=tol * 10, rtol=tol * 10)


def test_every_pattern_kind_is_exercised_by_a_backend_other_than_the_reference():
    """The suite cannot pass vacuously: each pattern is computed (not refused) by at least one
    backend besides the reference, in every operation."""
    q, k, v = _inputs("cpu", 77, 77, False)
    for name, build in PATTERNS.items():
        pattern = build()
        req = Request(q, k, v, need_lse=True, dense_form=pattern.dense_form(), pattern=pattern)
        able = [b.name for b in registered() if b.name != "reference" and b.refusal(req) is None]
        assert able, name
