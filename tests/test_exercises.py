"""The lessons' exercise checker: silent when unanswered, loud when wrong."""

import pytest
import torch

from workbench.exercises import check


def test_unanswered_is_a_note_not_an_error(capsys):
    assert check(None, 3) is False
    assert "Not answered yet" in capsys.readouterr().out


@pytest.mark.parametrize("answer, expected", [
    (3, 3), (0.5, 0.5000001), (torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 1e-9])),
    (torch.tensor([True, False]), torch.tensor([True, False])), ("causal", "causal"),
])
def test_a_right_answer_passes(answer, expected):
    assert check(answer, expected) is True


@pytest.mark.parametrize("answer, expected", [
    (4, 3), (0.6, 0.5), (torch.tensor([1.0, 2.1]), torch.tensor([1.0, 2.0])),
    (torch.ones(3), torch.ones(4)), ("local", "causal"),
])
def test_a_wrong_answer_fails_with_the_hint(answer, expected):
    with pytest.raises(AssertionError, match="look at the diagonal"):
        check(answer, expected, hint="look at the diagonal")


def test_a_predicate_accepts_any_right_answer():
    assert check(12, None, test=lambda a: a % 4 == 0)
    with pytest.raises(AssertionError):
        check(13, None, test=lambda a: a % 4 == 0)
