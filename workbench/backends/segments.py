"""Dense attention over a batch of equal segments on PyTorch's fused kernels (cuDNN's or flash
attention), forward and backward, with the log-sum-exp, for strided views of q, k and v.

These backwards read ``out`` only through ``rowsum(dout * out)`` and ``lse`` only to rebuild the
probabilities: given the output and log-sum-exp of a softmax merged over several key sets they
return each set's exact share of its gradient, so LongNet's branches need no backward through
the merge.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["SegmentKernel", "segment_kernel"]

_aten = torch.ops.aten


class SegmentKernel(NamedTuple):
    """``forward(q, k, v, causal, scale) -> (out, lse, state)`` over ``[N, M, L, D]`` inputs
    (last dimension contiguous, any other strides): ``out`` ``[N, M, L, D]``, ``lse`` ``[N, M,
    L]`` (float32, float64 for float64 inputs), ``state`` what ``backward`` needs of that call.
    ``backward(dout, q, k, v, out, lse, state, causal, scale) -> (dq, dk, dv)`` for any ``out``
    and ``lse`` of these rows (see the module docstring)."""

    forward: Callable[[Tensor, Tensor, Tensor, bool, float], tuple[Tensor, Tensor, Any]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]


def _cpu_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float
                 ) -> tuple[Tensor, Tensor, Any]:
    out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal,
                                                                 scale=scale)
    return out, lse, None


def _cpu_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  state: Any, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return _aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, scale=scale)


def _cuda_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float
                  ) -> tuple[Tensor, Tensor, Any]:
    out, lse, *state = _aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False,
                                                                  scale=scale)
    return out, lse, state[:6]  # sequence bounds and (unused) random state


def _cuda_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   state: Any, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    cum_q, cum_k, max_q, max_k, seed, offset = state
    return _aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset,
        scale=scale)


def _cudnn_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float
                   ) -> tuple[Tensor, Tensor, Any]:
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = \
        _aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                  scale=scale)
    return out, lse.squeeze(-1), (seed, offset, cum_q, cum_k, max_q, max_k)


def _cudnn_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                    state: Any, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    seed, offset, cum_q, cum_k, max_q, max_k = state
    return _aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse.unsqueeze(-1), seed, offset, None, cum_q, cum_k, max_q, max_k,
        0.0, causal, scale=scale)


_CPU = SegmentKernel(_cpu_forward, _cpu_backward)
_CUDA = SegmentKernel(_cuda_forward, _cuda_backward)
_CUDNN = SegmentKernel(_cudnn_forward, _cudnn_backward)


def segment_kernel(q: Tensor, k: Tensor, v: Tensor) -> SegmentKernel | None:
    """The fused kernel for inputs like ``q, k, v`` (one dtype, one head size ``D``), or None:
    on CUDA (float16/bfloat16, ``D`` a multiple of 8 up to 256, sm80+) cuDNN's on sm90+ up to
    ``D`` = 128, else flash attention, each where its SDPA backend is enabled; on the CPU flash
    attention."""
    d = q.shape[-1]
    if not q.dtype == k.dtype == v.dtype or k.shape[-1] != d or v.shape[-1] != d:
        return None
    if q.device.type == "cpu":
        return _CPU if q.dtype.is_floating_point else None
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    major = torch.cuda.get_device_capability(q.device)[0]
    if d % 8 or d > 256 or major < 8:
        return None
    if major >= 9 and d <= 128 and torch.backends.cuda.cudnn_sdp_enabled():
        return _CUDNN
    return _CUDA if torch.backends.cuda.flash_sdp_enabled() else None
