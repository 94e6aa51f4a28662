"""The backends as a registry: each declares what it can compute (:class:`Capabilities`, and
optional ``refuses`` and ``prefers`` rules); ``auto`` takes the first registered backend that can
run the request and prefers it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from ..layout import BlockLayout
from ..score_mods import ScoreMod, reads
from .problem import Problem

__all__ = ["Backend", "BackendUnsupported", "Capabilities", "Choice", "Request", "Runner",
           "backend_names", "choose", "expand_kv_heads", "get_backend", "grouped_runner",
           "kv_group", "prepare_backend", "register", "registered", "run_backend"]

ANY_DEVICE = ("cpu", "cuda")


@dataclass(frozen=True)
class Capabilities:
    """What a backend computes: devices it runs on, where it gives the log-sum-exp and gradients,
    dtypes (None: any floating type), dropout, ``block_order``, ``score_mod``, patterns (words),
    and ``grouped_kv``: it reads ``k, v`` of fewer heads than ``q`` as they are (the others are
    given them with their heads repeated)."""

    devices: tuple[str, ...] = ANY_DEVICE
    lse_devices: tuple[str, ...] = ANY_DEVICE
    grad_devices: tuple[str, ...] = ANY_DEVICE
    dtypes: tuple[torch.dtype, ...] | None = None
    dropout: bool = False
    block_order: bool = False
    score_mod: bool = False
    patterns: str = "any"
    grouped_kv: bool = False

    def refusal(self, req: Request) -> str | None:
        """Why these capabilities do not cover ``req`` (phrases after "it"), or None."""
        dev = req.device_type
        if dev not in self.devices:
            return f"runs on {' or '.join(self.devices)}, not {dev}"
        reasons = []
        if self.dtypes is not None and req.q.dtype not in self.dtypes:
            reasons.append(f"takes {', '.join(map(str, self.dtypes))}, not {req.q.dtype}")
        if req.need_lse and dev not in self.lse_devices:
            reasons.append(f"gives no log-sum-exp on {dev} (return_lse, a ring and a process "
                           "group need it)")
        if req.grad and dev not in self.grad_devices:
            reasons.append(f"computes no gradients on {dev} (these inputs require grad)")
        if req.dropout and not self.dropout:
            reasons.append("has no attention dropout")
        if req.score_mod is not None and not self.score_mod:
            able = [b.name for b in registered() if b.capabilities.score_mod]
            reasons.append(f"applies no score_mod (backends that do: {', '.join(able)})")
        return " and ".join(reasons) or None


@dataclass
class Request:
    """What one call asks of a backend; ``layout`` is built on first use (``build_layout``), so
    a backend that needs none never makes one."""

    q: Tensor
    k: Tensor
    v: Tensor
    need_lse: bool
    dense_form: str | None = None
    dropout: bool = False
    pattern: object = None
    q_offset: int = 0
    k_offset: int = 0
    block_size: int = 64
    build_layout: Callable[[], BlockLayout] | None = None
    _layout: BlockLayout | None = field(default=None, repr=False)
    score_mod: ScoreMod | None = None

    @classmethod
    def of(cls, q: Tensor, k: Tensor, v: Tensor, problem: Problem, need_lse: bool) -> Request:
        """The request of computing ``problem`` on these inputs."""
        return cls(q, k, v, need_lse, problem.dense_form, problem.dropout is not None,
                   problem.pattern, problem.q_offset, problem.k_offset,
                   problem.layout.block_size, _layout=problem.layout,
                   score_mod=problem.score_mod)

    @property
    def layout(self) -> BlockLayout | None:
        if self._layout is None and self.build_layout is not None:
            self._layout = self.build_layout()
        return self._layout

    @property
    def device_type(self) -> str:
        return self.q.device.type

    @property
    def k_len(self) -> int:
        return self.k.shape[2]

    @property
    def grad(self) -> bool:
        """Whether the call is differentiated: in q, k, v or the tensors the score mod reads."""
        return torch.is_grad_enabled() and (
            any(x.requires_grad for x in (self.q, self.k, self.v))
            or (self.score_mod is not None and bool(reads(self.score_mod))))


Run = Callable[[Tensor, Tensor, Tensor, Problem, bool], tuple[Tensor, "Tensor | None"]]
Runner = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, "Tensor | None"]]
"""``runner(q, k, v) -> (out, lse or None)``: one call prepared, for inputs of the shapes, dtype,
device and grad mode it was prepared with."""
Prepare = Callable[[Tensor, Tensor, Tensor, Problem, bool], Runner]
PreparePattern = Callable[[Tensor, Tensor, Tensor, object, float, bool, int], Runner]
Rule = Callable[[Request], "str | None"]


@dataclass(frozen=True)
class Backend:
    """A named way of computing a :class:`~.problem.Problem`.

    ``run(q, k, v, problem, need_lse) -> (out, lse or None)``; ``refuses(request)``: why it
    cannot run a request its capabilities cover, or None; ``prefers(request)``: why ``auto``
    should pick it, or None (``prefers=None``: never picked by ``auto``). Optional: ``prepare``
    (``run``'s arguments) and ``prepare_pattern`` (the pattern, no layout) return a
    :data:`Runner`."""

    name: str
    run: Run
    capabilities: Capabilities
    summary: str
    refuses: Rule | None = None
    prefers: Rule | None = None
    prepare: Prepare | None = None
    prepare_pattern: PreparePattern | None = None

    def refusal(self, req: Request) -> str | None:
        """Why this backend cannot run ``req`` (a phrase after "it"), or None."""
        reason = self.capabilities.refusal(req)
        if reason is None and self.refuses is not None:
            reason = self.refuses(req)
        return reason

    def runner(self, q: Tensor, k: Tensor, v: Tensor, problem: Problem, need_lse: bool
               ) -> Runner:
        """``run(q, k, v, problem, need_lse)`` prepared for inputs like these."""
        def runner(q: Tensor, k: Tensor, v: Tensor) -> Runner:
            if self.prepare is not None:
                return self.prepare(q, k, v, problem, need_lse)
            run = self.run
            return lambda q, k, v: run(q, k, v, problem, need_lse)

        return grouped_runner(runner, q, k, v, self.capabilities.grouped_kv)


def kv_group(q: Tensor, k: Tensor, v: Tensor) -> int:
    """How many query heads read each key/value head (1 unless ``k, v`` are grouped-query
    ``[B, H_kv, S, D]`` with ``H_kv`` dividing q's ``H``; 1 too for tensors not of 4 dims,
    which :func:`~workbench.attention.check_qkv` refuses).

    Raises:
        ValueError: ``k`` and ``v`` of different head counts, or one that does not divide H.
    """
    if not all(isinstance(x, Tensor) and x.dim() == 4 for x in (q, k, v)):
        return 1
    h, hk = q.shape[1], k.shape[1]
    if hk == h and v.shape[1] == h:
        return 1
    if hk != v.shape[1] or hk == 0 or h % hk:
        raise ValueError(
            f"k and v must have q's {h} heads or one divisor of it (grouped-query attention), "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    return h // hk


def expand_kv_heads(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``k, v`` with each head repeated for the query heads that read it (:func:`kv_group`);
    unchanged when the heads already match. Raises as :func:`kv_group` does."""
    group = kv_group(q, k, v)
    if group == 1:
        return k, v
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


def grouped_runner(prepare: Callable[[Tensor, Tensor, Tensor], Runner], q: Tensor, k: Tensor,
                   v: Tensor, native: bool) -> Runner:
    """``prepare(q, k, v)``; for ``k, v`` of fewer heads than ``q`` and a backend that does not
    read them ``native``-ly, prepared for and run on their heads repeated (every call)."""
    if native or k.shape[1] == q.shape[1]:
        return prepare(q, k, v)
    inner = prepare(q, *expand_kv_heads(q, k, v))
    return lambda q, k, v: inner(q, *expand_kv_heads(q, k, v))


class BackendUnsupported(NotImplementedError, ValueError):
    """A backend was asked for something it cannot compute (the message says what instead)."""


class Choice(NamedTuple):
    """The backend a call runs on and why."""

    name: str
    reason: str


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add ``backend`` (``auto`` tries backends in the order they were registered)."""
    if backend.name in _REGISTRY or backend.name == "auto":
        raise ValueError(f"a backend named {backend.name!r} is already registered")
    _REGISTRY[backend.name] = backend
    return backend


def registered() -> tuple[Backend, ...]:
    """Every registered backend, in ``auto``'s order."""
    return tuple(_REGISTRY.values())


def backend_names() -> tuple[str, ...]:
    """``"auto"`` and every registered backend's name."""
    return ("auto", *_REGISTRY)


def get_backend(name: str) -> Backend:
    """The registered backend ``name``; a ``ValueError`` listing the names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"backend must be one of {backend_names()}, got {name!r}")
    return _REGISTRY[name]


def choose(name: str, req: Request) -> Choice:
    """The backend ``name`` means for ``req``, and why; a named backend that cannot run ``req``
    raises :class:`BackendUnsupported` naming the backends that can."""
    if name != "auto":
        backend = get_backend(name)
        reason = backend.refusal(req)
        if reason is not None:
            able = [b.name for b in registered() if b.name != name and b.refusal(req) is None]
            raise BackendUnsupported(
                f"backend {name!r} cannot run this call: it {reason}. Use backend='auto'"
                + (f" or one of {', '.join(map(repr, able))}" if able else ""))
        return Choice(name, "asked for by name")
    for backend in registered():
        if backend.prefers is None or backend.refusal(req) is not None:
            continue
        why = backend.prefers(req)
        if why is not None:
            return Choice(backend.name, why)
    raise BackendUnsupported("no registered backend can run this call")  # pragma: no cover


def prepare_backend(name: str, q: Tensor, k: Tensor, v: Tensor, problem: Problem,
                    need_lse: bool) -> Runner:
    """``problem`` on backend ``name`` (``auto`` chooses), prepared (:meth:`Backend.runner`)."""
    chosen = choose(name, Request.of(q, k, v, problem, need_lse)).name
    return _REGISTRY[chosen].runner(q, k, v, problem, need_lse)


def run_backend(name: str, q: Tensor, k: Tensor, v: Tensor, problem: Problem,
                need_lse: bool) -> tuple[Tensor, Tensor | None]:
    """Compute ``problem`` on backend ``name`` (``auto`` chooses); ``(out, lse or None)``."""
    return prepare_backend(name, q, k, v, problem, need_lse)(q, k, v)
