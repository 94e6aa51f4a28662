"""FlexAttention both ways: a pattern as a ``mask_mod`` and a ``BlockMask``, and a ``mask_mod``
as a pattern; every result against the mask brute-forced pair by pair and PyTorch's SDPA."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import grads, make_qkv, sdpa_oracle
from torch.nn.attention.flex_attention import create_block_mask, create_mask, flex_attention

import workbench as wb
from workbench import patterns as P


# ---------------------------------------------------------------- mask functions, gym style
def sliding_window(window: int):
    def within_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)

    return within_window


def prefix_lm(prefix: int):
    def prefix_or_causal(b, h, q_idx, kv_idx):
        return (kv_idx < prefix) | (kv_idx <= q_idx)

    return prefix_or_causal


def document_ids(seq_len: int, seed: int = 0) -> torch.Tensor:
    """Document index of every position: random lengths, exactly ``seq_len`` entries."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 30, (seq_len,), generator=g)
    return torch.repeat_interleave(torch.arange(seq_len), lengths)[:seq_len]


def document_causal(doc: torch.Tensor):
    def same_document(b, h, q_idx, kv_idx):  # indexes doc: out-of-range positions would raise
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

    return same_document


def dilated_sliding_window(window: int, dilation: int):
    def dilated_window(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        return (d.abs() <= window * dilation) & (d % dilation == 0)

    return dilated_window


def per_head_window(widths: torch.Tensor):
    def head_window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= widths[h]

    return head_window


S = 77  # odd, not a multiple of any block size used below
MASKS = {
    "sliding_window": lambda: sliding_window(9),
    "prefix_lm": lambda: prefix_lm(11),
    "document": lambda: document_causal(document_ids(S)),
    "dilated_sliding_window": lambda: dilated_sliding_window(5, 3),
}


def brute_force(fn, seq_len: int, heads: int = 1) -> torch.Tensor:
    """``fn`` asked about every (head, query, key) one scalar at a time: bool ``[H, S, S]``."""
    t = torch.tensor
    return torch.tensor([[[bool(fn(t(0), t(h), t(i), t(j))) for j in range(seq_len)]
                          for i in range(seq_len)] for h in range(heads)])


def reduce_tiles(mask: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(any, all) of ``[H, S, S]`` over ``block x block`` tiles, padding never counted."""
    h, s, _ = mask.shape
    n = -(-s // block)
    pad = n * block - s
    m = torch.nn.functional.pad(mask, (0, pad, 0, pad)).view(h, n, block, n, block)
    real = torch.nn.functional.pad(torch.ones(s, s, dtype=torch.bool), (0, pad, 0, pad))
    return m.any(4).any(2), (m | ~real.view(1, n, block, n, block)).all(4).all(2)


# ---------------------------------------------------------------- mask_mod -> pattern
@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("block", [16, 7])
def test_a_mask_mod_pattern_is_its_brute_force_mask_with_an_exact_layout(name, block):
    fn = MASKS[name]()
    pattern = P.from_mask_mod(fn)
    mask = brute_force(fn, S)
    assert mask.any() and not mask.all()
    assert torch.equal(pattern.token_mask(S), mask)
    lay = pattern.block_structure(S, block)
    any_, all_ = reduce_tiles(mask, block)
    assert torch.equal(lay.active, any_) and torch.equal(lay.full, all_)
    assert pattern.allowed_pairs(S, block) == int(mask.sum())


def test_a_per_head_mask_mod_indexes_heads_and_a_one_head_one_broadcasts():
    widths = torch.tensor([0, 3, 20])
    pattern = P.from_mask_mod(per_head_window(widths), num_heads=3)
    mask = brute_force(per_head_window(widths), S, heads=3)
    assert not torch.equal(mask[0], mask[1])
    assert torch.equal(pattern.token_mask(S), mask)
    assert torch.equal(pattern.block_structure(S, 16).active, reduce_tiles(mask, 16)[0])
    q, k, v = make_qkv(b=1, h=3, s=S, d=8)
    out = wb.block_sparse_attention(q, k, v, pattern, 16, backend="blockwise")
    torch.testing.assert_close(out, sdpa_oracle(q, k, v, mask))
    one = P.from_mask_mod(sliding_window(9))
    out = wb.block_sparse_attention(q, k, v, one, 16, backend="blockwise")  # over 3 heads
    torch.testing.assert_close(out, sdpa_oracle(q, k, v, brute_force(sliding_window(9), S)))


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("backend", ["blockwise", "reference"])
def test_a_mask_mod_pattern_attends_as_sdpa_forward_and_backward(name, backend):
    fn = MASKS[name]()
    mask = brute_force(fn, S)
    q, k, v = make_qkv(b=2, h=2, s=S, d=8)
    for ring in (1, 3):  # a ring asks about absolute positions of its slices
        out = wb.block_sparse_attention(q, k, v, P.from_mask_mod(fn), 16, backend=backend,
                                        ring_chunks=ring)
        ref = sdpa_oracle(q, k, v, mask)
        torch.testing.assert_close(out, ref)
        for a, b in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
            torch.testing.assert_close(a, b)


def test_a_mask_mod_pattern_is_only_asked_about_real_positions():
    asked = []

    def recording(b, h, q_idx, kv_idx):
        asked.append((int(q_idx.max()), int(kv_idx.max()), int(b.abs().max())))
        return kv_idx <= q_idx

    pattern = P.from_mask_mod(recording)
    pattern.block_structure(S, 16, k_len=50)
    q, k, v = make_qkv(b=1, h=1, s=S, d=8, sk=50, requires_grad=False)
    wb.block_sparse_attention(q, k, v, pattern, 16, backend="blockwise")
    wb.block_sparse_attention(q, k, v, pattern & P.local_window(20), 16, backend="blockwise")
    mha = wb.BlockSparseMultiheadAttention(8, 1, pattern=pattern, block_size=16,
                                           batch_first=True, dtype=torch.float64)
    mha(q[0], k[0], v[0], need_weights=True)  # [1, S, 8] as [batch, seq, embed]
    assert asked and max(a[0] for a in asked) == S - 1 and max(a[1] for a in asked) == 49
    assert max(a[2] for a in asked) == 0  # batch index 0


# ---------------------------------------------------------------- composition
@pytest.mark.parametrize("make, combine", [
    (lambda: P.from_mask_mod(MASKS["document"]()) & P.local_window(12), torch.logical_and),
    (lambda: P.from_mask_mod(MASKS["prefix_lm"]()) | P.global_tokens(3), torch.logical_or),
    (lambda: P.dilated([16, 32], [1, 2], num_heads=2) & P.from_mask_mod(sliding_window(20)),
     torch.logical_and),
    (lambda: P.from_mask_mod(sliding_window(4)) | P.from_mask_mod(
        dilated_sliding_window(5, 3)), torch.logical_or),
])
def test_mask_mod_patterns_compose_with_other_patterns(make, combine):
    pattern = make()
    a, b = pattern.a.token_mask(S), pattern.b.token_mask(S)
    mask = combine(a, b).expand(pattern.num_heads, S, S)
    assert not torch.equal(mask, a.expand_as(mask)) and not torch.equal(mask, b.expand_as(mask))
    assert torch.equal(pattern.token_mask(S), mask)
    any_, all_ = reduce_tiles(mask, 16)
    lay = pattern.block_structure(S, 16)
    assert torch.equal(lay.active.expand_as(any_), any_)
    assert torch.equal(lay.full.expand_as(all_), all_)
    q, k, v = make_qkv(b=1, h=2, s=S, d=8)
    out = wb.block_sparse_attention(q, k, v, pattern, 16, backend="blockwise")
    ref = sdpa_oracle(q, k, v, mask)
    torch.testing.assert_close(out, ref)
    for x, y in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("call, error, match", [
    (lambda: P.from_mask_mod(3), TypeError, "fn must be a mask_mod"),
    (lambda: P.from_mask_mod(lambda h, q, k: q >= k), TypeError, r"four arguments \(b, h"),
    (lambda: P.from_mask_mod(sliding_window(3), num_heads=0), ValueError, "num_heads"),
    (lambda: P.from_mask_mod(sliding_window(3), name=5), TypeError, "name"),
    (lambda: P.from_mask_mod(lambda b, h, q, k: q - k, name="diff").token_mask(8), TypeError,
     "mask_mod diff must return a bool tensor, got torch.int64"),
])
def test_bad_mask_mods_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_a_mask_mod_pattern_says_what_it_is_and_equals_only_itself():
    fn = sliding_window(3)
    a = P.from_mask_mod(fn)
    assert repr(a) == "from_mask_mod(within_window)"
    assert repr(P.from_mask_mod(fn, 2, name="w3")) == "from_mask_mod(w3, num_heads=2)"
    assert a == a and a != P.from_mask_mod(fn)


# ---------------------------------------------------------------- pattern -> mask_mod
ROUND_TRIP = {
    "families": lambda s: [P.family(n).pattern(s, num_heads=4) for n in P.FAMILIES],
    "tensors": lambda s: [P.KeyMask(torch.arange(s)[None] % 5 != 0),
                          P.DenseMask(torch.rand(2, s, s, generator=torch.Generator()
                                                 .manual_seed(1)) < 0.3)],
    "algebra": lambda s: [(P.local_window(9) | P.global_tokens(2)) & P.causal(),
                          P.dilated([16, 32], [1, 2], 4) | P.from_mask_mod(prefix_lm(5))],
}


@pytest.mark.parametrize("group", list(ROUND_TRIP))
@pytest.mark.parametrize("s", [77, 130])
def test_a_patterns_mask_mod_on_the_grid_is_its_dense_mask(group, s):
    for i, pattern in enumerate(ROUND_TRIP[group](s)):
        heads = pattern.num_heads if pattern.num_heads > 1 else 3  # 1 head: any head asked
        mask_mod = pattern.mask_mod("cpu" if i % 2 else None)  # None: the default device
        grid = create_mask(mask_mod, 2, heads, s, s, device="cpu")
        dense = pattern.token_mask(s).expand(heads, s, s)
        assert torch.equal(grid, dense[None].expand(2, heads, s, s)), repr(pattern)


def _tile_sets(mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(tiles FlexAttention visits, tiles it visits without the mask function): bool
    ``[H, nq, nk]`` read from a ``BlockMask``'s key-major lists (batch element 0)."""
    nk = -(-mask.seq_lengths[1] // mask.BLOCK_SIZE[1])

    def listed(n: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        cols = torch.arange(idx.shape[-1])
        out = torch.zeros(*idx.shape[1:-1], nk + 1, dtype=torch.bool)
        out.scatter_(-1, torch.where(cols < n[0, ..., None], idx[0].long(), nk), True)
        return out[..., :nk]  # column nk collects the unused list entries

    whole = listed(mask.full_kv_num_blocks, mask.full_kv_indices)
    return listed(mask.kv_num_blocks, mask.kv_indices) | whole, whole


PATTERNS = {
    "window_global": lambda s: (P.local_window(150) | P.global_tokens(4)) & P.causal(),
    "dilated": lambda s: P.dilated([128, 256], [1, 2], num_heads=4),
    "document": lambda s: P.from_mask_mod(document_causal(document_ids(s, seed=2))),
    "random": lambda s: P.random_blocks(0.4, seed=3, cell=64, num_heads=4) | P.causal(),
}


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("s, block", [(300, 64), (256, 128), (517, 128)])
def test_a_patterns_block_mask_has_the_tiles_create_block_mask_finds(name, s, block):
    pattern = PATTERNS[name](s)
    ours = pattern.block_mask(s, block)
    theirs = create_block_mask(pattern.mask_mod(), 1, pattern.num_heads, s, s, device="cpu",
                               BLOCK_SIZE=block)
    assert ours.seq_lengths == (s, s) and ours.BLOCK_SIZE == (block, block)
    visit, skip = _tile_sets(ours)
    their_visit, their_skip = _tile_sets(theirs)
    assert torch.equal(visit, their_visit)  # the same tiles visited
    assert torch.equal(skip, their_skip)  # the same tiles trusted to be full
    assert visit.any()


def test_a_block_masks_mask_function_is_false_on_padding_and_never_asks_about_it():
    # compiled kernels evaluate the mask function on the padding of the last tiles too
    s, padded = 300, 384
    pattern = PATTERNS["document"](s)  # its document ids hold exactly s positions
    grid = create_mask(pattern.block_mask(s, 128).mask_mod, 1, 1, padded, padded, device="cpu")
    pad = padded - s
    assert torch.equal(grid[0], torch.nn.functional.pad(pattern.token_mask(s), (0, pad, 0, pad)))


def test_a_block_mask_never_evaluates_the_token_grid():
    asked = []

    class Counted(P.Pattern):  # the local window, counting the pairs it is asked about
        def allowed(self, h, q, k):
            asked.append(torch.broadcast_shapes(h.shape, q.shape, k.shape).numel())
            return (q - k).abs() <= 200

        def offset_rule(self):
            return lambda d: d.abs() <= 200

    mask = Counted().block_mask(1 << 17, 128)  # 2**34 pairs
    assert asked == [] and mask.kv_num_blocks.shape == (1, 1, 1024)
    rect = Counted().block_mask(300, 64, k_len=130)
    assert rect.seq_lengths == (300, 130) and rect.kv_indices.shape[-2:] == (5, 3)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_eager_flex_attention_with_a_patterns_block_mask_is_sdpa(name):
    s = 300  # eager FlexAttention reads the mask function alone, on every real pair
    pattern = PATTERNS[name](s)
    q, k, v = make_qkv(b=1, h=4, s=s, d=16, dtype=torch.float32, requires_grad=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # FlexAttention's "not compiled" notice
        out = flex_attention(q, k, v, block_mask=pattern.block_mask(s, 128))
    ref = sdpa_oracle(q, k, v, pattern.token_mask(s))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["document", "dilated"])
def test_compiled_flex_attention_with_a_patterns_block_mask_is_sdpa(name):
    s = 300  # padded last tile: its partial block goes through the mask function
    pattern = PATTERNS[name](s)
    q, k, v = make_qkv(b=1, h=4, s=s, d=16, dtype=torch.float32, requires_grad=False)
    out = torch.compile(flex_attention)(q, k, v, block_mask=pattern.block_mask(s, 128))
    ref = sdpa_oracle(q, k, v, pattern.token_mask(s))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("device", ["cuda", None])
def test_compiled_flex_attention_on_cuda_trains_as_sdpa(name, device):
    s = 1000
    pattern = PATTERNS[name](s)
    if name == "document":  # its document ids must be where the kernel runs
        pattern = P.from_mask_mod(document_causal(document_ids(s, seed=2).cuda()))
    q, k, v = (x.cuda() for x in make_qkv(b=1, h=4, s=s, d=64, dtype=torch.float32))
    with torch.device("cuda"):  # device=None: PyTorch's default device
        mask = pattern.block_mask(s, 128, device=device)
    assert mask.kv_indices.is_cuda
    out = torch.compile(flex_attention)(q, k, v, block_mask=mask)
    ref = sdpa_oracle(q, k, v, pattern.token_mask(s, "cuda"))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * g).sum(), (q, k, v)),
                    torch.autograd.grad((ref * g).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
