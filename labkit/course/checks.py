"""How a build-it-yourself exercise is checked: hidden cases, labkit's reference, a message that says what is wrong.

A student writes one function in a marked cell; `labkit.course.exercises.check(name, function)` runs it on cases
the notebook does not show, beside the reference (labkit's own implementation, the one the lab's results come
from), and stops at the first disagreement with a message that names the case and the first wrong position,
shape or value. When the student's answers match a known mistake on every case, the message adds that mistake's
hint. A check never answers a bare "False".
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch


class ExerciseFailed(AssertionError):
    """A check that did not pass; Jupyter shows only its message (`_render_traceback_`), not a traceback."""

    def _render_traceback_(self) -> list[str]:
        return [
            f"\x1b[31mExerciseFailed\x1b[0m: {line}" if i == 0 else line
            for i, line in enumerate(str(self).splitlines())
        ]


COMPUTE = object()  # a case's `expected` when the reference computes it


@dataclass(frozen=True)
class Case:
    """One hidden case: what it is (shown when it fails), the arguments both functions receive, and the answer
    when the case carries it (made by labkit's own code alongside the arguments) instead of the reference."""

    description: str
    args: tuple
    kwargs: dict = field(default_factory=dict)
    expected: Any = COMPUTE


@dataclass(frozen=True)
class Mistake:
    """A common wrong answer: the tests feed it to the check, and a student whose answers equal it gets the hint."""

    description: str
    function: Callable
    hint: str


@dataclass(frozen=True)
class Exercise:
    """One exercise: where it lives, the reference and its hidden cases, how answers are compared."""

    name: str
    notebook: str  # "05": the notebook (by number) whose marked cell the student fills
    title: str
    signature: str  # what the student writes, as the notebook states it
    reference: Callable | None  # labkit's answer, called with the student's signature (None: the cases carry it)
    reference_name: str  # where the reference lives in labkit, printed when the check passes
    cases: Callable[[], list[Case]]
    compare: Callable[[Any, Any], str | None]  # (got, expected) -> None when they agree, else what differs
    mistakes: tuple[Mistake, ...] = ()


# ---- comparisons: each returns None when the answers agree, else one sentence about the first difference ----


def compare_positions(got: Any, expected: Sequence[int], what: str = "position") -> str | None:
    """Two lists of integers: the first index where they differ, or which one is longer."""
    if got is None or isinstance(got, (str, bytes)) or not hasattr(got, "__iter__"):
        return f"returned {got!r}, expected a list of {len(expected)} {what}s"
    got = [int(v) for v in got]
    for index, (mine, theirs) in enumerate(zip(got, expected)):
        if mine != theirs:
            return f"the first wrong {what} is item {index}: you have {mine}, the reference has {theirs}"
    if len(got) != len(expected):
        longer = "you have" if len(got) > len(expected) else "you miss"
        extra = got[len(expected)] if len(got) > len(expected) else expected[len(got)]
        return f"{len(got)} {what}s instead of {len(expected)}: {longer} {extra} (item {min(len(got), len(expected))})"
    return None


def compare_flags(got: Any, expected: Sequence[bool], what: str = "position") -> str | None:
    """Two lists of booleans: the first position where they differ."""
    if got is None or not hasattr(got, "__len__"):
        return f"returned {got!r}, expected a list of {len(expected)} booleans"
    if len(got) != len(expected):
        return f"{len(got)} values instead of {len(expected)} (one per {what})"
    for index, (mine, theirs) in enumerate(zip(got, expected)):
        if bool(mine) != bool(theirs):
            return f"the first wrong {what} is {index}: you say {bool(mine)}, the reference says {bool(theirs)}"
    return None


def compare_tensors(got: Any, expected: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-4) -> str | None:
    """Type, shape, then the first element outside the tolerance (its index and both values)."""
    if not isinstance(got, torch.Tensor):
        return f"returned a {type(got).__name__}, expected a torch.Tensor of shape {tuple(expected.shape)}"
    if tuple(got.shape) != tuple(expected.shape):
        return f"shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    mine, theirs = got.detach().double(), expected.detach().double()
    bad = ~torch.isclose(mine, theirs, rtol=rtol, atol=atol)
    if bad.any() and mine.dim() == 0:
        return f"you get {mine.item():.6g}, the reference {theirs.item():.6g} (tolerance atol={atol:g}, rtol={rtol:g})"
    if bad.any():
        where = tuple(int(i) for i in bad.nonzero()[0])
        count = int(bad.sum())
        at = f" at index {where}" if where else ""
        return (
            f"the first wrong value{at}: {mine[where].item():.6g} instead of {theirs[where].item():.6g} "
            f"({count} of {bad.numel()} values differ beyond atol={atol:g}, rtol={rtol:g})"
        )
    return None


def compare_numbers(
    got: Any, expected: Sequence[float] | float, names: Sequence[str] = (), atol: float = 1e-6
) -> str | None:
    """A number or a tuple of numbers (named for the message); NaN equals NaN."""
    single = not isinstance(expected, (tuple, list))
    expected = [expected] if single else list(expected)
    got_list = [got] if single else got
    if isinstance(got_list, torch.Tensor) or not hasattr(got_list, "__len__") or len(got_list) != len(expected):
        return f"returned {got!r}, expected {'a number' if single else f'{len(expected)} numbers'}"
    names = list(names) or [f"value {i}" for i in range(len(expected))]
    for name, mine, theirs in zip(names, got_list, expected):
        mine = float(mine)
        if math.isnan(theirs) and math.isnan(mine):
            continue
        if math.isnan(theirs) != math.isnan(mine) or abs(mine - theirs) > atol + 1e-6 * abs(theirs):
            return f"{name} is {mine:.6g}, the reference gives {theirs:.6g}"
    return None


def compare_names(got: Any, expected: set[str], what: str = "parameter") -> str | None:
    """Two sets of names: what is extra and what is missing, with an example of each."""
    if not isinstance(got, (set, frozenset, list, tuple)):
        return f"returned a {type(got).__name__}, expected a set of {what} names"
    got = set(got)
    extra, missing = sorted(got - expected), sorted(expected - got)
    if not extra and not missing:
        return None
    parts = []
    if extra:
        parts.append(f"{len(extra)} {what}s the reference leaves out (e.g. {extra[0]})")
    if missing:
        parts.append(f"{len(missing)} {what}s missing (e.g. {missing[0]})")
    return "you have " + "; and ".join(parts)


def compare_equal(got: Any, expected: Any) -> str | None:
    """Plain equality, for small values such as a verdict string."""
    return None if got == expected else f"returned {got!r}, the reference gives {expected!r}"


# ---- running a check -------------------------------------------------------------------------------------------


def _call(function: Callable, case: Case) -> Any:
    # Each call gets fresh copies where an argument carries state (a random generator) or may be edited in place.
    args = tuple(_fresh(a) for a in case.args)
    return function(*args, **{k: _fresh(v) for k, v in case.kwargs.items()})


def _fresh(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    return copy.deepcopy(value)  # random.Random and modules too: a student may freeze parameters in place


def failure(exercise: Exercise, function: Callable) -> str | None:
    """The message for the first case where `function` disagrees with the reference, or None when all agree."""
    cases = exercise.cases()
    for number, case in enumerate(cases, 1):
        expected = _call(exercise.reference, case) if case.expected is COMPUTE else case.expected
        try:
            got = _call(function, case)
        except NotImplementedError:
            return (
                f"{exercise.name}: not written yet. Replace `raise NotImplementedError()` in the cell marked "
                f"YOUR CODE HERE with {exercise.signature}."
            )
        except Exception as error:  # noqa: BLE001 - a student's bug of any kind is reported, not raised
            where = f"{exercise.name}: case {number} of {len(cases)} ({case.description})"
            return f"{where} raised {type(error).__name__}: {error}"
        problem = exercise.compare(got, expected)
        if problem is not None:
            message = f"{exercise.name}: case {number} of {len(cases)} ({case.description}): {problem}."
            hint = _recognised_mistake(exercise, function, cases)
            return message + (f"\nHint: {hint}" if hint else "")
    return None


def _recognised_mistake(exercise: Exercise, function: Callable, cases: list[Case]) -> str | None:
    for mistake in exercise.mistakes:
        try:
            if all(exercise.compare(_call(function, c), _call(mistake.function, c)) is None for c in cases):
                return mistake.hint
        except Exception:  # noqa: BLE001 - a mistake that cannot run on a case is simply not this student's
            continue
    return None


def run_check(exercise: Exercise, function: Callable) -> str:
    """Raise `ExerciseFailed` with the first difference; return the one-line success message otherwise."""
    problem = failure(exercise, function)
    if problem is not None:
        raise ExerciseFailed(problem)
    return f"✓ {exercise.name}: all {len(exercise.cases())} hidden cases agree with {exercise.reference_name}"
