"""Block-sparse attention inside HuggingFace transformers models.

Importing this module registers ``"workbench"`` with transformers' ``AttentionInterface`` (and,
for the masks, the boolean masks transformers builds for its own ``"sdpa"``), so that any model
whose attention goes through that interface runs on :func:`~workbench.block_sparse_attention`
over the patterns :func:`use_pattern` gives it. A layer computes the pairs its pattern *and* the
model's mask allow. The mask must be what transformers builds for self-attention: causal or
bidirectional, with per-batch key padding; any other mask raises a ``ValueError`` (express it as
the pattern). Positions index the keys as the cache holds them. NOTE: a query that may see no
key outputs zeros, as with transformers' boolean ``sdpa`` masks.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .. import patterns as P
from ..attention import block_sparse_attention, check_pattern
from ..backends import check_backend
from ..patterns import Pattern, check_positive_int
from ..plan import Plans
from ..score_mods import soft_cap

__all__ = ["NAME", "MaskStructure", "attention_forward", "mask_structure", "use_pattern"]

NAME = "workbench"
"""The ``attn_implementation`` this module registers."""

_ATTR = "_workbench_attention"  # where use_pattern leaves a model's settings on its modules

PatternSpec = Pattern | Mapping[int, "Pattern | None"] | Callable[[int | None], "Pattern | None"]


@dataclass
class MaskStructure:
    """What a transformers mask says (:func:`mask_structure`): causal or not, the position of
    the first query, and which keys are real."""

    causal: bool
    q_offset: int
    keys: Tensor | None  # bool [B, Sk]; None: every key of every batch element is real
    _runs: dict = field(default_factory=dict, repr=False, compare=False)  # pattern -> run


@dataclass
class _Settings:
    """A model's patterns and options (:func:`use_pattern`), shared by its attention modules."""

    spec: PatternSpec | None
    block_size: int = 64
    backend: str = "auto"
    plans: Plans | None = None
    _layers: dict = field(default_factory=dict)
    _last: tuple | None = None  # (mask ref, shape, MaskStructure) of the last mask

    def __getstate__(self) -> dict:  # what it derived is a cache: copies start without it
        return {**self.__dict__, "_layers": {}, "_last": None}

    def pattern(self, layer_idx: int | None) -> Pattern:
        """Layer ``layer_idx``'s pattern (full attention where the spec names none)."""
        if layer_idx not in self._layers:
            spec = self.spec
            if spec is None or isinstance(spec, Pattern):
                pat = spec
            elif isinstance(spec, Mapping):
                pat = spec.get(layer_idx)
            else:
                pat = spec(layer_idx)
            if pat is not None and not isinstance(pat, Pattern):
                raise TypeError(f"the pattern of layer {layer_idx} must be a workbench Pattern "
                                f"or None, got {type(pat).__name__}")
            self._layers[layer_idx] = P.full() if pat is None else pat
        return self._layers[layer_idx]

    def structure(self, mask: Tensor | None, causal: bool, batch: int, heads: int, q_len: int,
                  k_len: int) -> MaskStructure:
        """:func:`mask_structure` of ``mask``, kept while the same mask comes back (every layer
        of one forward pass receives the same one)."""
        shape = (causal, batch, heads, q_len, k_len)
        if self._last is not None:
            ref, last_shape, st = self._last
            if last_shape == shape and (ref is None if mask is None else
                                        ref is not None and ref() is mask):
                return st
        st = mask_structure(mask, causal, batch, heads, q_len, k_len)
        self._last = (None if mask is None else weakref.ref(mask), shape, st)
        return st


def use_pattern(model: nn.Module, pattern: PatternSpec | None = None, *, block_size: int = 64,
                backend: str = "auto") -> nn.Module:
    """Run ``model``'s attention on workbench with ``pattern``; returns ``model``.

    Args:
        model: a transformers ``PreTrainedModel`` whose attention goes through
            ``AttentionInterface``; switched to ``attn_implementation="workbench"``.
        pattern: one :class:`~workbench.patterns.Pattern` for every layer; a ``{layer_idx:
            pattern}`` dict (other layers keep full attention); a function ``layer_idx ->
            pattern or None`` (called once per layer); or None (full attention). A pattern has 1
            head or the model's query heads; it only removes pairs (a causal model stays causal).
        block_size, backend: as :func:`~workbench.block_sparse_attention`.

    Raises:
        TypeError, ValueError: a pattern, block size or backend of the wrong kind, named.
    """
    check_positive_int("block_size", block_size)
    check_backend(backend)
    if not (pattern is None or isinstance(pattern, (Pattern, Mapping)) or callable(pattern)):
        raise TypeError(f"pattern must be a workbench Pattern, a {{layer_idx: pattern}} dict, a "
                        f"function of layer_idx or None, got {type(pattern).__name__}")
    settings = _Settings(pattern, block_size, backend, Plans())
    for layer_idx in pattern if isinstance(pattern, Mapping) else ():
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
            raise TypeError(f"the keys of a pattern dict must be layer indices (ints), got "
                            f"{layer_idx!r}")
        settings.pattern(layer_idx)  # a value that is not a pattern raises here, not in forward
    model.set_attn_implementation(NAME)
    if model.config._attn_implementation != NAME:
        raise ValueError(f"{type(model).__name__} does not dispatch its attention through "
                         "transformers' AttentionInterface, so no pattern can reach it")
    for module in model.modules():
        setattr(module, _ATTR, settings)
    return model


def _allowed(mask: Tensor, batch: int, heads: int, q_len: int, k_len: int) -> Tensor:
    """transformers' 4-D mask as bool ``[B, Sq, Sk]`` (True: may attend)."""
    if (mask.dim() != 4 or tuple(mask.shape[2:]) != (q_len, k_len)
            or mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, heads)):
        raise ValueError(f"attention_mask must be [{batch} or 1, 1 or {heads}, {q_len}, "
                         f"{k_len}], got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if not mask.is_floating_point():
            raise TypeError(f"attention_mask must be bool or float, got {mask.dtype}")
        keep = mask == 0
        if not bool((keep | (mask <= torch.finfo(mask.dtype).min / 2)).all()):
            raise ValueError("attention_mask adds biases other than 0 and -inf (or the dtype's "
                             "minimum); workbench restricts pairs, it adds no bias")
        mask = keep
    if mask.shape[1] > 1 and not bool((mask == mask[:, :1]).all()):
        raise ValueError("attention_mask differs between heads: give per-head structure as a "
                         "pattern with one entry per head")
    return mask[:, 0].expand(batch, q_len, k_len)


def mask_structure(mask: Tensor | None, causal: bool, batch: int, heads: int, q_len: int,
                   k_len: int) -> MaskStructure:
    """Read a transformers attention mask as (causal or not, query offset, real keys).

    ``mask``: None (no padding: causal over the last ``Sq`` of ``Sk`` positions when
    ``causal``, else full) or ``[B or 1, 1 or H, Sq, Sk]`` bool (True: attend) or additive float.
    A causal mask allows query ``i`` the real keys ``j <= q_offset + i``; ``q_offset`` is read
    from the mask (a real query sees its own key, the last it may see).

    Raises:
        ValueError: a mask that is neither causal nor bidirectional over per-batch real keys.
    """
    if mask is None:
        return MaskStructure(causal, k_len - q_len if causal else 0, None)
    allowed = _allowed(mask, batch, heads, q_len, k_len)
    dev = allowed.device
    keys = allowed.any(1)  # [B, Sk]: a key nobody may see is padding
    pos, rows = torch.arange(k_len, device=dev), torch.arange(q_len, device=dev)
    last = torch.where(allowed, pos, -1).amax(-1)  # [B, Sq] the last key a query may see
    seen = last >= 0
    shift = int((last - rows)[seen].max()) if bool(seen.any()) else k_len - q_len
    is_causal = shift >= 0 and torch.equal(
        allowed, (pos <= rows[:, None] + shift) & keys[:, None, :])
    is_full = torch.equal(allowed, keys[:, None, :].expand_as(allowed))
    real = None if bool(keys.all()) else keys
    if is_causal and (causal or not is_full):
        return MaskStructure(True, shift, real)
    if is_full:
        return MaskStructure(False, max(k_len - q_len, 0) if causal else 0, real)
    raise ValueError(
        "attention_mask is neither causal nor bidirectional with key padding (a sliding "
        "window, chunked or packed sequences, a prefix): give that structure as the pattern "
        "(e.g. wb.patterns.local_window(w, causal=True)) and let transformers build a causal "
        "mask")


def _layer_pattern(pattern: Pattern, st: MaskStructure, batch: int, heads: int) -> Pattern:
    """The pattern a layer runs: its own, within the mask's causal band and real keys; with
    padding, over the batch folded into the heads (head ``b * H + h``)."""
    if pattern not in st._runs:
        run = pattern
        if st.causal and pattern.dense_form() != "causal":
            run = run & P.causal()
        if st.keys is not None:
            run = P.tile_batch(run, batch) & P.KeyMask(st.keys.repeat_interleave(heads, 0))
        st._runs[pattern] = run
    return st._runs[pattern]


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, scaling: float | None = None,
                      dropout: float = 0.0, is_causal: bool | None = None, **kwargs
                      ) -> tuple[Tensor, None]:
    """transformers' attention-function contract, computed by
    :func:`~workbench.block_sparse_attention` over the layer's pattern.

    Args:
        module: the attention module (its ``layer_idx`` picks the pattern, ``is_causal`` says
            whether a missing mask means causal, ``training`` whether dropout applies).
        query, key, value: ``[B, H, Sq, D]``, ``[B, H_kv, Sk, D]``, ``[B, H_kv, Sk, Dv]``
            (``H_kv`` divides ``H``: grouped-query attention).
        attention_mask: None or the mask transformers built (see :func:`mask_structure`).
        scaling: score scale (None: ``1 / sqrt(D)``).
        dropout: attention-weight dropout probability, applied in training mode (workbench's
            hashed dropout: ``torch.manual_seed`` makes it repeatable).
        is_causal: overrides ``module.is_causal`` (as transformers' ``sdpa``).

    Returns:
        ``(out [B, Sq, H, Dv], None)``: no attention weights.

    Raises:
        ValueError: a mask this cannot follow exactly, or a score modifier it does not apply
            (``position_bias``, attention sinks; a ``softcap`` is applied, as
            :func:`~workbench.score_mods.soft_cap`).
    """
    for name in ("position_bias", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation='{NAME}' does not apply {name}; use 'eager'")
    softcap = kwargs.get("softcap")
    settings: _Settings = getattr(module, _ATTR, None) or _Settings(None)  # full attention
    layer_idx = getattr(module, "layer_idx", None)
    pattern = settings.pattern(layer_idx)
    b, h, sq, _ = query.shape
    check_pattern(pattern, h, f"the pattern of layer {layer_idx}")
    causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    if attention_mask is None and causal and 1 < sq < key.shape[2]:
        # transformers' sdpa: a static cache at prefill, its slots after the queries unused
        key, value = key[:, :, :sq], value[:, :, :sq]
    sk = key.shape[2]
    st = settings.structure(attention_mask, causal, b, h, sq, sk)
    run = _layer_pattern(pattern, st, b, h)
    if st.keys is not None:  # per-batch padding: the batch folded into the heads
        query, key, value = (x.reshape(1, -1, *x.shape[2:]) for x in (query, key, value))
    out = block_sparse_attention(
        query, key, value, run, settings.block_size, backend=settings.backend, scale=scaling,
        dropout_p=float(dropout) if module.training else 0.0, q_offset=st.q_offset,
        plan=settings.plans, score_mod=None if softcap is None else _soft_cap(softcap))
    return out.reshape(b, h, sq, -1).transpose(1, 2).contiguous(), None


_SOFT_CAPS: dict[float, Callable[..., Tensor]] = {}


def _soft_cap(cap: object) -> Callable[..., Tensor]:
    """One :func:`~workbench.score_mods.soft_cap` per cap value: a layer's repeated calls pass
    the same function, so what is kept for the last call serves them. Every cap is checked by
    ``soft_cap`` first (``True`` is refused, not taken as the cap 1.0 it hashes like)."""
    mod = soft_cap(cap)
    return _SOFT_CAPS.setdefault(float(cap), mod)


AttentionInterface.register(NAME, attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)  # the boolean masks transformers' sdpa gets
