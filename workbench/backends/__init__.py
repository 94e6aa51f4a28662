"""Backends: what computes the tiles of a :class:`~workbench.backends.problem.Problem`.

Each backend is a :class:`~workbench.backends.registry.Backend` in one module, registered below
in ``auto``'s order of preference (:func:`choose` says which runs a call and why).
"""

from __future__ import annotations

from dataclasses import asdict

from . import blockwise, flex, gather, reference, registry, sdpa, triton_sparse
from .blockwise import blockwise_attention
from .dropout import AttentionDropout
from .flex import flex_attention
from .merge import accumulation_dtype, empty_partial, merge_into_, merge_partials
from .problem import MaskFn, Problem
from .reference import reference_attention
from .registry import (
    Backend,
    BackendUnsupported,
    Capabilities,
    Choice,
    Request,
    Runner,
    backend_names,
    choose,
    expand_kv_heads,
    get_backend,
    grouped_runner,
    kv_group,
    register,
    registered,
    run_backend,
)
from .sdpa import NO_LSE, sdpa_form
from .triton_sparse import triton_attention

__all__ = ["AttentionDropout", "Backend", "BackendUnsupported", "Capabilities", "Choice", "MaskFn",
           "NO_LSE", "Problem", "Request", "Runner", "accumulation_dtype", "backend_names",
           "blockwise_attention", "check_backend", "choose", "describe_backends",
           "empty_partial", "expand_kv_heads", "flex_attention", "get_backend", "grouped_runner",
           "kv_group", "merge_into_", "merge_partials",
           "reference_attention", "register", "registry", "registered", "run_backend",
           "sdpa_form", "triton_attention"]

for _module in (sdpa, gather, triton_sparse, flex, blockwise, reference):
    register(_module.BACKEND)


def check_backend(name: object) -> str:
    """``name`` if it is ``"auto"`` or a registered backend; otherwise a ``ValueError`` listing
    them."""
    if name not in backend_names():
        raise ValueError(f"backend must be one of {backend_names()}, got {name!r}")
    return name  # type: ignore[return-value]


def describe_backends() -> list[dict[str, object]]:
    """One row per registered backend, in ``auto``'s order: its name, summary, the fields of its
    :class:`Capabilities` and whether ``auto`` ever picks it."""
    return [{"backend": b.name, "summary": b.summary, **asdict(b.capabilities),
             "auto": b.prefers is not None} for b in registered()]
