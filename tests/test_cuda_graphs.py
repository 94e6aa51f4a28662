"""CUDA graphs: a module call that repeats the last one only launches kernels, so a CUDA graph
can capture it, and replaying the graph on new inputs gives what an eager call gives; nor does
such a call ever wait for the GPU."""

from __future__ import annotations

import pytest
import torch

import workbench as wb

P = wb.patterns
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PATTERNS = {
    "random": lambda h: P.random_blocks(0.3, seed=4, cell=64, num_heads=h) | P.local_window(1),
    "local_global": lambda h: (P.local_window(200) | P.global_tokens(8)) & P.causal(),
    "causal": lambda h: P.causal(),  # SDPA
    "dilated": lambda h: P.dilated([256, 512], [1, 4], h, causal=True),  # LongNet's gather
}


def _inputs(shape, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(shape, device="cuda", dtype=dtype, generator=g) for _ in range(3)]


def _replays_like_eager(call, shape, dtype):
    """Warm ``call`` up on a side stream, capture it, replay it on new inputs copied into the
    captured ones, and compare with an eager call on those inputs."""
    static = _inputs(shape, dtype, 0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            call(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        captured = call(*static)
    fresh = _inputs(shape, dtype, 1)
    for dst, src in zip(static, fresh):
        dst.copy_(src)
    graph.replay()
    with torch.no_grad():
        eager = call(*fresh)
    for a, b in zip(captured if isinstance(captured, tuple) else (captured,),
                    eager if isinstance(eager, tuple) else (eager,)):
        assert torch.equal(a, b)
    return captured


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("backend, dtype", [("auto", torch.float32), ("auto", torch.bfloat16),
                                            ("triton", torch.float16)])
def test_a_block_sparse_attention_call_is_captured_and_replayed(name, backend, dtype):
    module = wb.BlockSparseAttention(PATTERNS[name](4), 128, backend=backend)
    lse = not (backend == "auto" and name == "causal")  # SDPA gives no log-sum-exp
    res = _replays_like_eager(lambda q, k, v: module(q, k, v, return_lse=lse),
                              (2, 4, 1000, 64), dtype)
    q, k, v = _inputs((2, 4, 1000, 64), dtype, 1)
    ref = wb.block_sparse_attention(q, k, v, module.pattern, 128, backend="reference",
                                    return_lse=True)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for a, b in zip(res if lse else (res,), ref):
        torch.testing.assert_close(a, b.to(a.dtype), atol=tol, rtol=tol)


@pytest.mark.parametrize("is_causal", [False, True])
def test_a_multihead_call_is_captured_and_replayed(is_causal):
    torch.manual_seed(0)
    mha = wb.BlockSparseMultiheadAttention(256, 4, pattern=PATTERNS["random"](4),
                                           block_size=128, batch_first=True).cuda().eval()
    _replays_like_eager(lambda x, _k, _v: mha(x, x, x, is_causal=is_causal)[0], (2, 700, 256),
                        torch.float32)


@pytest.mark.parametrize("mode", ["paper", "head_groups"])
def test_a_dilated_attention_call_is_captured_and_replayed(mode):
    attn = wb.DilatedAttention([256, 512], [1, 2], mode=mode, causal=True, block_size=128)
    out = _replays_like_eager(lambda q, k, v: attn(q, k, v), (1, 4, 1024, 64), torch.float32)
    q, k, v = _inputs((1, 4, 1024, 64), torch.float32, 1)
    ref = wb.dilated_attention(q, k, v, [256, 512], [1, 2], mode=mode, causal=True,
                               backend="reference")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_a_repeated_call_never_waits_for_the_gpu():
    q, k, v = _inputs((1, 4, 1000, 64), torch.bfloat16, 0)
    x = torch.randn(1, 1000, 256, device="cuda", dtype=torch.bfloat16)
    pattern = PATTERNS["random"](4)
    plan = wb.Plan(pattern, 1000, block_size=128, device=q.device)
    module = wb.BlockSparseAttention(PATTERNS["local_global"](4), 128)
    mha = wb.BlockSparseMultiheadAttention(256, 4, pattern=PATTERNS["local_global"](4),
                                           block_size=128, batch_first=True, device="cuda",
                                           dtype=torch.bfloat16)
    dilated = wb.DilatedAttention([256, 512], [1, 2], block_size=128)
    calls = [lambda: wb.block_sparse_attention(q, k, v, pattern, 128, plan=plan),
             lambda: module(q, k, v), lambda: mha(x, x, x), lambda: dilated(q, k, v)]
    with torch.no_grad():
        for call in calls:
            call()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                call()
            finally:
                torch.cuda.set_sync_debug_mode("default")
