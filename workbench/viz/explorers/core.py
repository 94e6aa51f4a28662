"""What every explorer shares, free of widgets: parameters in, a view out, bad values refused
with a readable message while the last good view is kept."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["ExplorerState", "advance", "check_int", "parse_int_list"]

ParamsT = TypeVar("ParamsT")
ViewT = TypeVar("ViewT")


@dataclass(frozen=True)
class ExplorerState(Generic[ViewT]):
    """The last good view (None before the first) and, when the latest parameters were refused,
    why (``message``, empty otherwise)."""

    view: ViewT | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return not self.message


def advance(state: ExplorerState[ViewT], compute: Callable[[ParamsT], ViewT],
            params: ParamsT) -> ExplorerState[ViewT]:
    """``compute(params)`` as the new view, or the old view with the error as message."""
    try:
        return ExplorerState(compute(params))
    except (ValueError, TypeError) as err:
        return ExplorerState(state.view, str(err))


def check_int(name: str, value: object, minimum: int, maximum: int | None = None,
              hint: str = "") -> int:
    """``value`` if it is an int in ``[minimum, maximum]``; otherwise a readable ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise ValueError(f"{name}={value} must be {bound}{'; ' + hint if hint else ''}")
    return value


def parse_int_list(name: str, text: str | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """``"64, 128"`` (or a list of ints) as ``(64, 128)``; a readable ``ValueError`` otherwise."""
    if isinstance(text, (tuple, list)):
        items = list(text)
    else:
        parts = [p for p in str(text).replace(";", ",").split(",") if p.strip()]
        try:
            items = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"{name} must be whole numbers separated by commas, e.g. "
                             f"'64, 128'; got {text!r}") from None
    if not items:
        raise ValueError(f"{name} needs at least one number, e.g. '64, 128'")
    for item in items:
        check_int(f"every entry of {name}", item, 1)
    return tuple(items)
