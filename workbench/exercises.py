"""Self-checking exercises for the lessons in ``notebooks/``.

An exercise cell leaves ``answer = None`` and calls :func:`check`: unanswered, it says so and
lets the notebook run on; a wrong answer fails with a hint; a right one says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["check"]


def check(answer: Any, expected: Any, *, hint: str = "", atol: float = 1e-6,
          test: Callable[[Any], bool] | None = None) -> bool:
    """Compare an exercise's ``answer`` with ``expected``; True when right.

    Args:
        answer: the reader's answer; ``None`` means not answered yet (prints a note, no error).
        expected: the right answer (a number, tensor, or anything comparable with ``==``);
            ignored when ``test`` is given.
        hint: what to look at again, printed with a wrong answer.
        atol: absolute tolerance for numbers and floating-point tensors.
        test: a predicate on the answer, for exercises with several right answers.

    Raises:
        AssertionError: the answer is wrong (the message carries ``hint``).
    """
    if answer is None:
        print("Not answered yet: replace None with your answer and run the cell again.")
        return False
    if test is not None:
        ok = bool(test(answer))
    elif isinstance(expected, torch.Tensor) or isinstance(answer, torch.Tensor):
        a, e = torch.as_tensor(answer), torch.as_tensor(expected)
        ok = a.shape == e.shape and bool(
            torch.allclose(a.double(), e.double(), atol=atol, rtol=0.0, equal_nan=True)
            if a.is_floating_point() or e.is_floating_point() else torch.equal(a, e))
    elif isinstance(expected, float):
        ok = isinstance(answer, (int, float)) and abs(float(answer) - expected) <= atol
    else:
        ok = answer == expected
    if not ok:
        raise AssertionError(f"Not quite. {hint}".strip())
    print("Correct.")
    return True
