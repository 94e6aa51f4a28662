"""The triton backend: our kernel against the float64 dense reference (under Triton's
interpreter on the CPU, compiled on a GPU), and the plan it reads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import workbench as wb
from workbench.backends import Problem
from workbench.backends.triton_sparse import _pack_bits, build_column_plan, build_plan
from workbench.layout import BlockLayout

P = wb.patterns


def _interpreter_usable() -> str | None:
    """Why Triton's interpreter cannot run here, or None."""
    try:
        import numpy
        import triton
    except ImportError:
        return "triton is not installed"
    version = lambda text: tuple(int(x) for x in text.split(".")[:2])  # noqa: E731
    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        return "Triton's interpreter before 3.7 cannot run loops under NumPy 2.4 or newer"
    return None


@pytest.mark.skipif(_interpreter_usable() is not None, reason=str(_interpreter_usable()))
def test_kernel_matches_reference_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    script = Path(__file__).with_name("triton_cases.py")
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr


def test_plan_bits_are_the_token_mask_of_the_partial_tiles():
    pat = (P.local_window(37) | P.global_tokens(3)) & P.causal()
    s, b = 203, 32
    lay = pat.block_structure(s, b)
    plan = build_plan(Problem(lay, pat.predicate("cpu"), 1.0), "cpu")
    mask = pat.token_mask(s)[0]  # [S, S]
    padded = torch.zeros(7 * b, 7 * b, dtype=torch.bool)
    padded[:s, :s] = mask
    tiles = padded.view(7, b, 7, b).permute(0, 2, 1, 3)  # [nq, nk, b, b]
    nq = lay.shape[1]
    seen = 0
    for i in range(nq):
        n_full, n_part = int(plan.full_count[i]), int(plan.part_count[i])
        assert int(plan.part_start[i]) == seen
        for j in plan.full_index[i, :n_full].tolist():
            assert bool(tiles[i, j].all())
        for t, j in enumerate(plan.part_index[i, :n_part].tolist()):
            assert torch.equal(plan.bits[seen + t], _pack_bits(tiles[i, j][None])[0])
            assert bool(tiles[i, j].any())
        assert n_full + n_part == int(lay.active[0, i].sum())
        seen += n_part
    assert plan.bits.shape[0] == seen  # one mask per partial tile, nothing for full ones


@pytest.mark.parametrize("cell, block, q_len, k_len, offsets, order, side", [
    (32, 64, 333, 333, (0, 0), None, 32),
    (64, 128, 1000, 1000, (0, 0), None, 64),
    (64, 128, 1000, 333, (96, 64), "hilbert", 32),  # a query offset on 32, not on the cell
    (128, 64, 333, 1000, (0, 128), None, 64),  # each tile inside one cell
    (256, 128, 1000, 1000, (256, 64), "hilbert", 64),  # a key offset off the tiles
    (64, 128, 1000, 1000, (16, 0), None, 16),  # an offset off the word grid: squares of 16
    (8, 64, 333, 333, (0, 0), "hilbert", 8),  # cells narrower than a word: bytes
    (4, 64, 333, 333, (0, 0), None, 4),  # narrower than a byte: answers spread, then packed
    (64, 128, 1000, 1000, (3, 0), None, 1),  # an odd offset: token by token
])
def test_plan_bits_on_a_grain_equal_the_token_predicates(cell, block, q_len, k_len, offsets,
                                                         order, side, monkeypatch):
    from workbench.backends import triton_sparse as T

    monkeypatch.setattr(T, "_BITS_BUDGET", 5 * block * block)  # several steps, the last cut
    pat = P.random_blocks(0.4, 3, cell=cell, num_heads=3) | P.random_blocks(0.2, cell=2 * cell)
    nq, nk = -(-q_len // block), -(-k_len // block)
    lay = BlockLayout(torch.ones(3, nq, nk, dtype=torch.bool),
                      torch.zeros(3, nq, nk, dtype=torch.bool), q_len, k_len, block)
    asked = []

    def allowed(h, q, k):  # the pattern's predicate, noting how many queries a tile asks about
        asked.append(q.shape[1])
        return P.head_predicate(pat, "cpu")(h, q, k)

    def bits(pattern):
        problem = Problem(lay, allowed, 1.0, *offsets, block_order=order, pattern=pattern)
        return build_plan(problem, "cpu").bits

    fast = bits(pat)
    assert set(asked) == {block // side}  # one question per square of the side expected
    asked.clear()
    assert torch.equal(fast, bits(None)) and set(asked) == {block}
    words = fast.reshape(fast.shape[0], -1)  # every tile, so tiles of mixed squares too
    assert cell >= block or bool(((words == 0).any(1) & (words == -1).any(1)).any())


def test_column_plan_lists_each_key_blocks_tiles_with_their_bit_masks():
    pat = P.dilated([64, 128], [1, 4], num_heads=2) | (P.local_window(30) & P.causal())
    s, b = 300, 32
    lay = pat.block_structure(s, b)
    plan = build_plan(Problem(lay, pat.predicate("cpu"), 1.0), "cpu")
    cols = build_column_plan(plan)
    n = 10  # blocks per side
    padded = torch.zeros(2, n * b, n * b, dtype=torch.bool)
    padded[:, :s, :s] = pat.token_mask(s)
    tiles = padded.view(2, n, b, n, b).permute(0, 1, 3, 2, 4)  # [h, nq, nk, b, b]
    pad_rows = padded.clone()
    pad_rows[:, s:] = True  # a full tile may hold padded query rows (the kernels skip them)
    full_ok = pad_rows.view(2, n, b, n, b).permute(0, 1, 3, 2, 4)
    checked = 0
    for h in range(2):
        for j in range(n):
            c = h * n + j
            n_full, n_part = int(cols.full_count[c]), int(cols.part_count[c])
            full = cols.full_index[c, :n_full].tolist()
            part = cols.part_index[c, :n_part].tolist()
            assert full == sorted(full) and part == sorted(part)
            for i in full:
                assert bool(full_ok[h, i, j].all()) and j < n - 1  # the short last block: partial
            for i, t in zip(part, cols.part_tile[c, :n_part].tolist()):
                assert torch.equal(plan.bits[t], _pack_bits(tiles[h, i, j][None])[0])
                checked += 1
            assert n_full + n_part == int(lay.active[h, :, j].sum())
    assert checked == plan.bits.shape[0]  # every partial tile is some column's


def test_pack_bits_roundtrip():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(5, 64, 64, generator=g) < 0.5
    words = _pack_bits(m).to(torch.int64) & 0xFFFFFFFF
    bits = (words[..., None] >> torch.arange(32)) & 1
    assert torch.equal(bits.reshape(5, 64, 64).bool(), m)


def test_triton_backend_errors_name_the_fix():
    with pytest.raises(ValueError, match="power-of-two block_size"):
        lay = P.causal().block_structure(100, 24)
        build_plan(Problem(lay, P.causal().predicate("cpu"), 1.0), "cpu")
    q = torch.randn(1, 2, 64, 32)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(NotImplementedError, match="runs on CUDA"):
            wb.block_sparse_attention(q, q, q, P.causal(), 32, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_matches_reference_on_the_gpu():
    sys.path.insert(0, str(Path(__file__).parent))
    from triton_cases import check_case, check_grad_case, run_all

    run_all("cuda", torch.bfloat16, tol=3e-2)
    # the shapes the benchmarks use: 128-token tiles, head_dim 128, default launch parameters
    for name, pat in (("random10", P.random_blocks(0.1, seed=0, cell=128)),
                      ("causal", P.causal()), ("local", P.local_window(700, causal=True))):
        check_case(name, pat, 4096 + 77, 4096 + 77, 128, 2, None, "cuda", torch.bfloat16,
                   d=128, tol=3e-2)
        check_grad_case(name, pat, 2048 + 77, 2048 + 77, 128, 2, None, "cuda", torch.bfloat16,
                        d=128, tol=3e-2)
    for d in (64, 256):  # other head widths under the default launch parameters
        pat = (P.local_window(300) | P.global_tokens(7)) & P.causal()
        check_case(f"head_dim {d}", pat, 1000, 1000, 128, 2, None, "cuda", torch.bfloat16, d=d,
                   tol=3e-2)
        check_grad_case(f"head_dim {d}", pat, 1000, 1000, 128, 2, None, "cuda", torch.bfloat16,
                        d=d, tol=3e-2)
    # auto's choice on a mostly partial layout (LongNet in natural order)
    import workbench.backends as B

    pat = P.dilated([512, 1024], [1, 4], num_heads=4)
    q, k, v = (torch.randn(1, 4, 2048, 128, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    lay = pat.block_structure(2048, 128, "cuda")
    assert B.choose("auto", B.Request(q, k, v, False, _layout=lay)).name == "triton"
    with torch.no_grad():
        out = wb.block_sparse_attention(q, k, v, pat, 128)
    ref = wb.block_sparse_attention(q.double(), k.double(), v.double(), pat, 128,
                                    backend="reference")
    assert (out.double() - ref).abs().max().item() < 3e-2


def test_plans_are_cached_per_layout_object_and_dropped_with_it():
    import gc
    import weakref

    from workbench.backends import triton_sparse as T

    pat = P.local_window(40) & P.causal()
    lay = pat.block_structure(256, 32)
    prob = Problem(lay, pat.predicate("cpu"), 1.0)
    plan = T.cached_plan(prob, torch.device("cpu"))
    assert T.cached_plan(prob, torch.device("cpu")) is plan  # built once
    other = Problem(pat.block_structure(256, 32), pat.predicate("cpu"), 1.0)  # equal, not same
    assert T.cached_plan(other, torch.device("cpu")) is not plan
    plans = [weakref.ref(plan), weakref.ref(T.cached_plan(other, torch.device("cpu")))]
    del prob, lay, other, plan
    gc.collect()
    assert [p() for p in plans] == [None, None]  # the plans went with their layouts


def test_auto_picks_triton_only_on_mostly_partial_layouts(monkeypatch):
    import workbench.backends as B
    from workbench.backends import triton_sparse as T

    longnet = P.dilated([256, 512], [1, 4], num_heads=4).block_structure(2048, 64)
    local = (P.local_window(300) & P.causal()).block_structure(2048, 64)
    assert T.partial_share(longnet) >= T.PARTIAL_HEAVY > T.partial_share(local)
    assert T._tile_counts(longnet) is T._tile_counts(longnet)  # counted once per layout
    q = torch.randn(1, 4, 2048, 64)

    def chosen(layout, dropout=False):
        return B.choose("auto", B.Request(q, q, q, False, dropout=dropout, _layout=layout)).name

    assert chosen(longnet) == "blockwise"  # not on CUDA
    # on a GPU (faked: the rule, not a kernel, is under test)
    monkeypatch.setattr(B.Request, "device_type", property(lambda self: "cuda"))
    monkeypatch.setattr(T, "unsupported", lambda *args: None)
    assert chosen(longnet) == "triton"
    assert chosen(local) == "flex"
    assert chosen(longnet, dropout=True) == "blockwise"
    assert chosen(None) == "flex"  # no layout to judge
    monkeypatch.setattr(T, "unsupported", lambda *args: "needs head_dim 24")
    assert chosen(longnet) == "flex"
    monkeypatch.setattr(T, "unsupported", lambda *args: None)
    partial = int((longnet.active & ~longnet.full).sum())
    assert T.plan_bits_bytes(longnet) == partial * 64 * 64 // 8
    monkeypatch.setattr(T, "BITS_BUDGET", T.plan_bits_bytes(longnet) - 1)
    assert chosen(longnet) == "flex"  # its bit masks too large


def _offline_compiler() -> str | None:
    """Why our kernels cannot be compiled for a GPU here, or None."""
    try:
        import triton
    except ImportError:
        return "triton is not installed"
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return None if tool.exists() else "this triton has no NVIDIA tools"


@pytest.mark.slow
@pytest.mark.skipif(_offline_compiler() is not None, reason=str(_offline_compiler()))
def test_default_launch_parameters_fit_a_hopper_programs_shared_memory():
    """Compiled for an H100/H200 without one: a configuration that asks for more shared memory
    than a program may have fails at launch, so every first choice must fit."""
    from workbench.backends.triton_sparse import KernelConfig, default_configs
    from workbench.lab.triton_resources import kernel_resources

    cuda = torch.device("cuda")  # only named: the defaults are asked for its type
    for d in (128, 256):
        for kernel in ("forward", "dkdv", "dq"):
            cfg = default_configs(kernel, 128, cuda, d, (9, 0))[0]
            res = kernel_resources(kernel, cfg, d)
            assert res.fits((9, 0)) and res.spill_bytes == 0, (kernel, d, cfg, res)
    too_big = kernel_resources("dkdv", KernelConfig(64, 128, 8, 2, use_tma=True), 256)
    assert not too_big.fits((9, 0))  # the check can fail: two stages of 256-wide heads


@pytest.mark.skipif(_offline_compiler() is not None, reason=str(_offline_compiler()))
def test_launch_steps_down_to_parameters_the_gpu_can_hold_and_names_them_when_none_can():
    from triton.runtime.errors import OutOfResources

    from workbench.backends import triton_sparse as T

    class Kernel:
        fn = T.build_plan  # anything with a __name__

    tried = []

    def launch(cfg):  # this GPU holds tiles of at most 32 rows
        tried.append(cfg)
        if cfg.block_m > 32:
            raise OutOfResources(263200, 232448, "shared memory")

    chain = T.default_configs("dkdv", 128, torch.device("cuda"), 128, (9, 0))
    key = ("test", id(tried))
    with pytest.warns(UserWarning, match="needs more shared memory than this GPU has"):
        T._launch(Kernel(), chain, launch, key)
    assert tried == list(chain) and tried[-1].block_n == 32
    tried.clear()
    T._launch(Kernel(), chain, launch, key)  # remembered: straight to what fits
    assert tried == [chain[-1]]
    with pytest.raises(ValueError, match=r"KernelConfig\(block_m=64.*smaller tiles"):
        T._launch(Kernel(), (chain[0],), launch, ("given", 1))  # a caller's own: no stepping
    T._CHOSEN.pop(key)


def test_a_plan_whose_bit_masks_cannot_fit_says_so_before_allocating(monkeypatch):
    from workbench.backends import triton_sparse as T

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 2**31))
    T._check_bits_fit(8192, 128, torch.device("cuda"))  # 16 MiB: fits
    with pytest.raises(ValueError, match=r"need 2.0 GiB, more than the 1.0 GiB free.*flex"):
        T._check_bits_fit(2**20, 128, torch.device("cuda"))
    T._check_bits_fit(2**20, 128, torch.device("cpu"))  # the CPU is not asked
    # what the allocator holds unused counts as free: it releases it before it fails
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2**30)
    T._check_bits_fit(2**20, 128, torch.device("cuda"))  # 2 GiB of 3 GiB
    with pytest.raises(ValueError, match=r"need 4.0 GiB, more than the 3.0 GiB free"):
        T._check_bits_fit(2**21, 128, torch.device("cuda"))


def test_no_jitted_function_returns_from_inside_a_branch():
    """Triton's compiler does not end a function at a ``return`` inside an ``if`` (even on a
    constexpr): it compiles the statements after it too, so the function's last ``return``
    wins where the interpreter, plain Python, takes the branch's; the tests under the
    interpreter could not see such a bug. One return, at the end, in every kernel function."""
    import ast

    from workbench.backends import triton_sparse

    src = Path(triton_sparse.__file__).with_name("_triton_kernels.py").read_text()
    jitted = [f for f in ast.walk(ast.parse(src)) if isinstance(f, ast.FunctionDef)
              and any("jit" in ast.unparse(d) for d in f.decorator_list)]
    assert len(jitted) >= 10
    for f in jitted:
        nested = [n for branch in ast.walk(f) if isinstance(branch, (ast.If, ast.For))
                  for n in ast.walk(branch) if isinstance(n, ast.Return)]
        assert not nested, f"{f.name} returns inside a branch or loop (line {nested[0].lineno})"

