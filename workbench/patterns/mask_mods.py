"""Patterns from FlexAttention mask functions, ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (the
way back is :meth:`Pattern.mask_mod`)."""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from .base import FlexMaskMod, Pattern, check_positive_int


class MaskModPattern(Pattern):
    """The pairs a FlexAttention ``mask_mod`` allows: ``allowed(h, q, k)`` is ``fn(0, h, q, k)``.
    Its layout evaluates every tile; equal only to itself (``fn`` may read changing tensors)."""

    def __init__(self, fn: FlexMaskMod, num_heads: int = 1, name: str | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be a mask_mod(b, h, q_idx, kv_idx), got {fn!r}")
        try:
            inspect.signature(fn).bind(0, 0, 0, 0)
        except TypeError:
            raise TypeError(f"fn must take four arguments (b, h, q_idx, kv_idx) like a "
                            f"FlexAttention mask_mod, got {fn!r}") from None
        except ValueError:  # no signature to check (a builtin)
            pass
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {name!r}")
        self.fn = fn
        self.num_heads = check_positive_int("num_heads", num_heads)
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def allowed(self, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        out = self.fn(torch.zeros_like(h), h, q, k)
        if not isinstance(out, Tensor) or out.dtype != torch.bool:
            raise TypeError(f"mask_mod {self.name} must return a bool tensor, got "
                            f"{getattr(out, 'dtype', type(out).__name__)}")
        return out

    def __repr__(self) -> str:
        heads = f", num_heads={self.num_heads}" if self.num_heads != 1 else ""
        return f"from_mask_mod({self.name}{heads})"


def from_mask_mod(fn: FlexMaskMod, num_heads: int = 1, name: str | None = None) -> Pattern:
    """A :class:`MaskModPattern` from a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``.

    Args:
        fn: the mask function; called with batch index 0 and only real positions, on the
            device of the call (tensors it reads must be there).
        num_heads: 1 if ``fn`` is the same for every head (it then broadcasts), else the number
            of heads ``fn`` distinguishes.
        name: what the pattern's repr calls ``fn`` (default: its ``__name__``).

    Raises:
        TypeError: ``fn`` is not callable with four arguments, or ``name`` is not a string.
        ValueError: ``num_heads`` is not a positive int.
    """
    return MaskModPattern(fn, num_heads, name)
